"""A workdir's state never misleads or blocks a run: another experiment's run is neither
reused nor resumed, a transfer starts only from a finished run, a damaged checkpoint is moved
aside, a failed save stops the run at once, and metrics.jsonl never repeats an epoch."""
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
from test_train import smoke

from sdtl_jax import checkpointing, experiment, run_identity, study
from sdtl_jax.errors import UserError

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp('data'))


def _config(data_dir, **overrides):
    """3 epochs of 3 steps: checkpoints 3, 6 and 9, an evaluation after each epoch."""
    return smoke('baseline', 'domain=real', data_dir,
                 **{'num_epochs': 3, 'eval.last_epochs': 3, **overrides})


@pytest.fixture(scope='module')
def finished(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp('finished') / 'run'
    results = experiment.run(_config(data_dir), str(workdir))
    return workdir, results


def _copy(finished, tmp_path):
    workdir = tmp_path / 'run'
    shutil.copytree(finished[0], workdir)
    return workdir


def _metric_steps(workdir):
    return [json.loads(line)['step']
            for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def test_identity_ignores_only_the_listed_keys(data_dir):
    config = _config(data_dir)
    changed = _config(data_dir, **{'checkpoint.keep': 1, 'data.num_workers': 2,
                                   'log_every_steps': 5, 'transfer.init_from': '/elsewhere'})
    assert run_identity.differences(config.to_dict(), changed.to_dict()) == []
    changed = _config(data_dir, **{'transfer.frozen_bn': 'adapt', 'aug.local_scale': (0.1, 0.3)})
    assert run_identity.differences(config.to_dict(), changed.to_dict()) == [
        "aug.local_scale: [0.05, 0.25] -> [0.1, 0.3]",
        "transfer.frozen_bn: 'inference' -> 'adapt'"]


def test_finished_run_is_reused_only_under_the_same_experiment(finished, data_dir, tmp_path,
                                                               capsys):
    workdir = _copy(finished, tmp_path)
    before = sorted(p.name for p in workdir.iterdir())
    # A key that cannot change the results: reused.
    assert experiment.run(_config(data_dir, **{'checkpoint.keep': 2}), str(workdir)) == finished[1]
    assert 'is finished; reusing its results' in capsys.readouterr().err

    with pytest.raises(run_identity.ChangedRunError) as error:
        experiment.run(_config(data_dir, **{'transfer.frozen_bn': 'adapt', 'optim.base_lr': 0.2}),
                  str(workdir))
    message = str(error.value)
    assert '\n' not in message
    assert (f"{workdir} holds a run of another experiment (optim.base_lr: 0.1 -> 0.2; "
            "transfer.frozen_bn: 'inference' -> 'adapt')") in message
    assert '--workdir' in message and run_identity.MOVE_ASIDE_FLAG in message
    assert sorted(p.name for p in workdir.iterdir()) == before      # nothing touched


def test_move_aside_keeps_the_old_run_and_trains_the_new_one(finished, data_dir, tmp_path):
    workdir = _copy(finished, tmp_path)
    old_results = (workdir / 'results.json').read_text()
    config = _config(data_dir, **{'num_epochs': 1, 'eval.last_epochs': 1,
                                  'if_config_changed': 'move_aside'})
    results = experiment.run(config, str(workdir))
    assert results['epochs'] == 1 and results['steps'] == 3
    [aside] = (workdir / run_identity.REPLACED_DIR).iterdir()
    assert (aside / 'results.json').read_text() == old_results
    assert sorted(p.name for p in (aside / 'checkpoints').iterdir()) == ['3', '6', '9']
    assert json.loads((workdir / 'config.json').read_text())['num_epochs'] == 1
    assert _metric_steps(workdir) == [3]


def test_a_study_checks_every_run_before_the_first_trains(data_dir, tmp_path):
    config = _study_config(data_dir)
    runs = study.expand(config)
    for r in runs[:2]:      # two runs of the study exist, under another frozen_bn
        old = r.config.copy_and_resolve_references()
        old.transfer.frozen_bn = 'adapt'
        (tmp_path / r.name).mkdir()
        (tmp_path / r.name / 'config.json').write_text(json.dumps(old.to_dict()))
    trained = []
    with pytest.raises(run_identity.ChangedRunError) as error:
        study.run(config, str(tmp_path), train_fn=lambda c, w: trained.append(w))
    assert trained == []
    for r in runs[:2]:
        assert f"{tmp_path / r.name} holds a run of another experiment (transfer.frozen_bn: " \
               "'adapt' -> 'inference')" in str(error.value)


def _study_config(data_dir):
    from test_train import load_config
    config = load_config('study/layers', 'smoke')
    config.data.data_dir = data_dir
    return config


def test_transfer_starts_only_from_a_finished_run(finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    shutil.rmtree(workdir / 'checkpoints' / '9')     # the final checkpoint is gone
    with pytest.raises(UserError, match=r'init_from=.*: its latest checkpoint is step 6, but the '
                                        r'run ended at step 9'):
        checkpointing.load_for_transfer({}, {}, str(workdir), ['stem'])
    (workdir / 'results.json').unlink()              # and the run never finished
    with pytest.raises(UserError, match=r'is not a finished run: .*results.json is missing'):
        checkpointing.load_for_transfer({}, {}, str(workdir / 'checkpoints'), ['stem'])


def test_loading_a_source_says_nothing_of_read_only(finished, caplog):
    with caplog.at_level(logging.INFO):
        *_, step = checkpointing.load_variables(str(finished[0]))
    assert step == 9
    assert not [r for r in caplog.records if re.search('read.only', r.getMessage())]


def _damage(workdir, step, what):
    checkpoint = workdir / 'checkpoints' / str(step)
    if what == 'data':          # the grain iterator's position: a truncated JSON file
        path = checkpoint / 'data' / 'process_0-of-1.json'
    else:                       # the arrays: the largest TensorStore data file
        path = max((checkpoint / 'state' / 'ocdbt.process_0' / 'd').iterdir(),
                   key=lambda p: p.stat().st_size)
    with open(path, 'r+b') as f:
        f.truncate(5)


def test_damaged_checkpoints_are_moved_aside_and_the_run_resumes_exactly(
        finished, data_dir, tmp_path, capsys):
    workdir = _copy(finished, tmp_path)
    (workdir / 'results.json').unlink()      # unfinished: the run resumes from its checkpoints
    _damage(workdir, 9, 'data')
    _damage(workdir, 6, 'state')
    results = experiment.run(_config(data_dir), str(workdir))
    err = capsys.readouterr().err
    damaged = workdir / checkpointing.DAMAGED_DIR
    for step, why in ((9, 'JSONDecodeError'), (6, 'while reading array')):
        assert (f'Checkpoint {workdir}/checkpoints/{step} does not restore ({why}' in err
                or why in err.split(f'checkpoints/{step} does not restore (')[1].split('\n')[0])
        assert f'moved it to {damaged / str(step)}' in err
        assert (damaged / str(step) / 'state').is_dir()
    assert f'Resumed {workdir} at step 3' in err
    assert 'Traceback' not in err
    # Exact resume from step 3: the same results, and each epoch recorded once.
    assert {k: v for k, v in results.items() if k != 'wall_seconds'} == {
        k: v for k, v in finished[1].items() if k != 'wall_seconds'}
    assert _metric_steps(workdir) == [3, 6, 9]


def test_no_checkpoint_that_restores_stops_with_one_line_and_moves_nothing(
        finished, data_dir, tmp_path):
    workdir = _copy(finished, tmp_path)
    (workdir / 'results.json').unlink()
    for step in (3, 6, 9):
        _damage(workdir, step, 'data')
    with pytest.raises(UserError) as error:
        experiment.run(_config(data_dir), str(workdir))
    assert '\n' not in str(error.value)
    assert all(f'step {s}: JSONDecodeError' in str(error.value) for s in (3, 6, 9))
    assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['3', '6', '9']
    assert not (workdir / checkpointing.DAMAGED_DIR).exists()


# Runs `python -m sdtl_jax.main` where files larger than 1 MB cannot be written: a write fails
# with EFBIG as a full disk fails one with ENOSPC (SIGXFSZ, which would kill it, is ignored).
LIMITED_MAIN = """import resource, runpy, signal, sys
resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
sys.argv[0] = 'sdtl_jax.main'
runpy.run_module('sdtl_jax.main', run_name='__main__')
"""


def test_the_first_failed_save_stops_the_run_with_one_line(data_dir, finished, tmp_path):
    workdir = tmp_path / 'run'
    result = subprocess.run(
        [sys.executable, '-c', LIMITED_MAIN, '--config=configs/baseline.py:smoke',
         f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', '--config.num_epochs=3',
         '--config.eval.last_epochs=3'],
        cwd=ROOT, env={**os.environ, 'JAX_PLATFORMS': 'cpu',
                       'JAX_ENABLE_COMPILATION_CACHE': 'false'},
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    fatal = [line for line in result.stderr.splitlines() if line.startswith('FATAL')]
    assert len(fatal) == 1, result.stderr[-3000:]
    # TensorStore batches the 3 MB of arrays into files of varying size: the first save that
    # writes one over the limit fails (as a rule step 3's, at times a later one).
    failed = re.fullmatch(rf'FATAL Saving checkpoint step (\d+) to {re.escape(str(workdir))}/'
                          r'checkpoints failed \(.*File too large.*\); the disk has \S+ \S+ free, '
                          r'a checkpoint needs about \d\.\d\d MB\. .*', fatal[0])
    assert failed, fatal[0]
    step = int(failed[1])
    assert 'Traceback' not in result.stderr, result.stderr[-5000:]
    assert len(result.stderr.splitlines()) < 40, result.stderr[-5000:]
    # Stopped by the next save at the latest, before training another epoch past it.
    saved = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
    assert saved == [s for s in (3, 6, 9) if s < step]
    assert max(_metric_steps(workdir)) <= step + 3
    assert not (workdir / 'results.json').exists()
