"""What a user watches: TensorBoard's tags and config, the progress bar's rate and ETA (also in a
log file), and a study's time left."""
import importlib.util
import io
import json
import pathlib
import struct
import sys

import ml_collections
import pytest
import tqdm.std
from tensorboardX.proto import event_pb2, plugin_hparams_pb2

from sdtl_jax import fileio, metrics_io, study

ROOT = pathlib.Path(__file__).parent.parent
RECORD = {'epoch': 1, 'train_loss': 2.5, 'lr': 0.1, 'step_s': 0.25, 'wall_s': 40.0,
          'top1': 12.5, 'top5': 50.0, 'num_images': 360}


def read_events(logdir: pathlib.Path) -> list[event_pb2.Event]:
    """Every event of the TFRecord files in `logdir`: each record is an 8-byte length, its
    4-byte CRC, the serialized Event, and the Event's 4-byte CRC."""
    events = []
    for path in sorted(logdir.glob('events.out.tfevents.*')):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            length, = struct.unpack('<Q', data[pos:pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
            pos += 12 + length + 4
    return events


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    """One run's writes as train.py makes them: the config, a log step, an evaluation."""
    workdir = tmp_path_factory.mktemp('run')
    writer = metrics_io.Writer(str(workdir))
    writer.write_config(ml_collections.ConfigDict(
        {'seed': 0, 'model': {'name': 'resnet50'}, 'optim': {'base_lr': 0.1},
         'transfer': {'reinit': True, 'dont_load': ('head/.*',)}}))
    writer.scalars(10, {'train/loss': 2.7, 'train/lr': 0.1, 'train/step_s': 0.25})
    writer.scalars(12, RECORD, jsonl=True)
    writer.close()
    return workdir


def test_tensorboard_groups_train_and_eval_scalars(workdir):
    tags = {v.tag for e in read_events(workdir / 'tensorboard') for v in e.summary.value
            if v.HasField('simple_value')}
    assert tags == {'train/loss', 'train/lr', 'train/step_s', 'train/epoch', 'train/epoch_loss',
                    'train/epoch_step_s', 'train/wall_s', 'eval/top1', 'eval/top5',
                    'eval/num_images'}
    # metrics.jsonl keeps its flat keys: the reports read them.
    assert json.loads((workdir / 'metrics.jsonl').read_text()) == {'step': 12, **RECORD}


def test_config_is_tensorboard_text_and_hparams_in_the_runs_folder(workdir):
    logdir = workdir / 'tensorboard'
    assert not [p for p in logdir.iterdir() if p.is_dir()]      # one run: no hparams sub-run
    values = {v.tag: v for e in read_events(logdir) for v in e.summary.value}
    text = values['config/text_summary'].tensor.string_val[0].decode()
    assert '"base_lr": 0.1' in text and '"name": "resnet50"' in text
    start = plugin_hparams_pb2.HParamsPluginData.FromString(
        values['_hparams_/session_start_info'].metadata.plugin_data.content).session_start_info
    assert start.hparams['optim.base_lr'].number_value == 0.1
    assert start.hparams['model.name'].string_value == 'resnet50'
    assert start.hparams['transfer.reinit'].bool_value
    assert start.hparams['transfer.dont_load'].string_value == '["head/.*"]'
    assert '_hparams_/experiment' in values


@pytest.fixture
def clock(monkeypatch):
    """tqdm's clock, advanced by hand: [seconds]."""
    now = [1000.0]
    monkeypatch.setattr(tqdm.std, 'time', lambda: now[0])
    return now


def test_progress_off_a_terminal_logs_few_plain_lines(clock, monkeypatch):
    log = io.StringIO()        # what SLURM or a pipe gets: no TTY
    monkeypatch.setattr(sys, 'stderr', log)
    bar = metrics_io.progress(1000, 0, 'run', enabled=True)
    for step in range(1000):
        clock[0] += 0.5
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss='1.000')
    bar.close()
    lines = log.getvalue().splitlines()
    assert '\r' not in log.getvalue()
    assert 10 <= len(lines) <= 13         # one per 10% (500 s: the per-minute line never fires)
    assert lines[-1].startswith('run: 1000/1000 step (100%), 2.00step/s')


def test_progress_rate_leaves_out_compilation_and_pauses(clock, monkeypatch):
    screen = io.StringIO()
    screen.isatty = lambda: True
    monkeypatch.setattr(sys, 'stderr', screen)
    bar = metrics_io.progress(1000, 0, 'run', enabled=True)
    clock[0] += 100.0          # the first step compiles
    bar.update(1)
    for _ in range(20):
        clock[0] += 1.0
        bar.update(1)
    assert bar.format_dict['rate'] == pytest.approx(1.0)
    clock[0] += 50.0           # evaluation and a checkpoint
    bar.unpause()
    for _ in range(20):
        clock[0] += 1.0
        bar.update(1)
    assert bar.format_dict['rate'] == pytest.approx(1.0)
    bar.close()                # the mean rate over the 40 timed steps
    assert screen.getvalue().endswith('41/1000 [00:40<15:59,  1.00step/s]\n')


def load_study_config(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / 'configs' / 'study' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config('smoke')


def test_study_time_left_comes_from_step_times():
    runs = {r.name: r for r in study.expand(load_study_config('layers'))}
    # Overhead 50 s each; frozen layers make SDTL_N16's steps 4x faster than S's.
    timings = [study.Timing(runs['S'], steps=100, step_s=2.0, wall_s=250.0),
               study.Timing(runs['SDTL_N16'], steps=100, step_s=0.5, wall_s=100.0)]
    # R steps like S (N = 0), RDTL_N16 like SDTL_N16.
    assert study.seconds_left([runs['R'], runs['RDTL_N16']], timings) == (200 + 50) + (50 + 50)
    reduced = {r.name: r for r in study.expand(load_study_config('data_reduction'))}
    half = reduced['R_1of128']       # half the images of R_1of64: half its steps
    timing = study.Timing(reduced['R_1of64'], steps=100, step_s=1.0, wall_s=110.0)
    assert study.seconds_left([half], [timing]) == 50 * 1.0 + 10


def test_study_says_time_left_from_the_finished_runs(tmp_path, monkeypatch):
    said = []
    monkeypatch.setattr(metrics_io, 'say', said.append)

    def train(config, workdir):       # instant, but reports 100 steps of 1 s and 130 s in all
        pathlib.Path(workdir).mkdir()
        result = {'steps': 100, 'wall_seconds': 130.0}
        fileio.write_json(f'{workdir}/results.json', result)
        pathlib.Path(workdir, 'metrics.jsonl').write_text(json.dumps({'epoch': 1, 'step_s': 1.0}))
        return result

    config = load_study_config('layers')
    config.study.report = False
    study.run(config, str(tmp_path), train_fn=train)
    # After S: 3 runs of 100 s of steps and 30 s else.
    assert said[1] == '[2/4] layers: R, about 6 min left'
