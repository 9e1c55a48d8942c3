"""Studies: expansion into runs, dependency order, reuse, sweeps' subsets, and one real study."""
import importlib.util
import json
import os
import pathlib

import pytest

from sdtl_jax import study
from sdtl_jax.errors import UserError

ROOT = pathlib.Path(__file__).parent.parent


def load_config(name, arg=None):
    spec = importlib.util.spec_from_file_location(name, ROOT / 'configs' / 'study' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def test_layers_study_is_the_papers_tables_2_to_5():
    runs = study.expand(load_config('layers'))
    names = [r.name for r in runs]
    assert names[:2] == ['S', 'R'] and len(runs) == 2 + 2 * 17
    assert names[2:19] == [f'SDTL_N{n:02d}' for n in range(1, 18)]
    assert names[19:] == [f'RDTL_N{n:02d}' for n in range(1, 18)]
    by_name = {r.name: r for r in runs}
    sdtl, rdtl = by_name['SDTL_N05'], by_name['RDTL_N17']
    assert (sdtl.source, sdtl.config.data.train, sdtl.config.transfer.num_frozen) == (
        'S', 'imagenet100_real', 5)
    assert (rdtl.source, rdtl.config.data.train, rdtl.config.transfer.num_frozen) == (
        'R', 'imagenet100_synth', 17)
    assert by_name['S'].config.data.train == 'imagenet100_synth'
    assert by_name['R'].config.transfer.num_frozen == 0 and not by_name['R'].source
    # The recipe is untouched: the paper's epochs, model and evaluation data.
    assert all(r.config.num_epochs == 100 and r.config.model.name == 'resnet50'
               and r.config.data.eval == 'imagenet100_real' for r in runs)
    assert 'study' not in sdtl.config
    pets = study.expand(load_config('layers', 'data=pets'))
    assert pets[0].config.model.name == 'tinyvit_5m' and pets[0].config.data.train == 'pets_synth'


def test_data_reduction_study_is_table_6():
    runs = study.expand(load_config('data_reduction'))
    assert [r.name for r in runs[:3]] == ['S', 'R_1of1', 'SDTL_N16_1of1']
    assert [r.name for r in runs[-2:]] == ['R_1of128', 'SDTL_N16_1of128']
    fractions = [r.config.data.train_fraction for r in runs if r.name.startswith('SDTL')]
    assert fractions == [1 / 2 ** x for x in range(8)]
    sdtl = runs[-1]
    assert (sdtl.source, sdtl.config.transfer.num_frozen, sdtl.config.data.train) == (
        'S', 16, 'imagenet100_real')
    assert runs[0].config.data.train_fraction == 1.0     # the source sees all synthetic data


def test_augmentation_study_is_table_1():
    runs = study.expand(load_config('augmentations'))
    assert len(runs) == 12 and not any(r.source for r in runs)
    assert [r.name for r in runs[:6]] == ['R_none', 'R_pytorch', 'R_autoaugment', 'R_augmix',
                                          'R_pixmix', 'R_multicrop']
    assert runs[7].config.aug.name == 'pytorch' and runs[7].config.data.train == (
        'imagenet100_synth')


def test_demo_studies_are_big_enough():
    layers = study.expand(load_config('layers', 'demo'))
    assert sum(r.name.startswith('SDTL') for r in layers) >= 8
    assert sum(r.name.startswith('RDTL') for r in layers) >= 8
    reduction = study.expand(load_config('data_reduction', 'demo'))
    assert sum(r.name.startswith('SDTL') for r in reduction) >= 5
    assert all(r.config.data.train.startswith('digits') for r in layers + reduction)


def test_stages_put_sources_first():
    runs = study.expand(load_config('layers'))
    first, second = study.stages(runs)
    assert [r.name for r in first] == ['S', 'R'] and len(second) == 34
    aug = study.expand(load_config('augmentations'))
    assert len(study.stages(aug)) == 1          # nothing depends on anything
    first, second = study.stages(study.expand(load_config('data_reduction')))
    assert [r.name for r in first][:3] == ['S', 'R_1of1', 'R_1of2'] and len(first) == 9
    assert all(r.source == 'S' for r in second) and len(second) == 8


@pytest.mark.parametrize('key, value, match', [
    ('only', 'S,SDTL_N99', r"unknown runs \['SDTL_N99'\]"),
    ('num_frozen', (4, 4), r"repeats runs: \['RDTL_N04', 'RDTL_N04', 'SDTL_N04'"),
    ('num_frozen', (19,), r'transfer.num_frozen=19'),
    ('directions', ('sideways',), r"'sideways'"),
])
def test_bad_study_settings_are_refused_before_any_run(key, value, match):
    config = load_config('layers')
    config.study[key] = value
    with pytest.raises(ValueError, match=match):
        study.expand(config)


class FakeTraining:
    """Stands in for experiment.run_validated: records calls, writes the results file a
    finished run has."""

    def __init__(self):
        self.calls = []

    def __call__(self, config, workdir):
        self.calls.append((os.path.basename(workdir), config.transfer.init_from))
        os.makedirs(workdir, exist_ok=True)
        result = {'top1_mean': 1.0}
        pathlib.Path(workdir, 'results.json').write_text(json.dumps(result))
        return result


def test_runs_in_order_from_the_baselines_and_resumes(tmp_path):
    config = load_config('layers', 'smoke')
    config.study.report = False
    fake = FakeTraining()
    study.run(config, str(tmp_path), train_fn=fake)
    assert fake.calls == [('S', ''), ('R', ''), ('SDTL_N16', str(tmp_path / 'S')),
                          ('RDTL_N16', str(tmp_path / 'R'))]
    manifest = json.loads((tmp_path / 'study.json').read_text())
    assert (manifest['study'], manifest['dataset'], manifest['model']) == (
        'layers', 'digits', 'resnet50')
    assert manifest['runs'][2] == {
        'name': 'SDTL_N16', 'kind': 'transfer', 'domain': 'real', 'direction': 'synth_to_real',
        'source': 'S', 'num_frozen': 16, 'train_fraction': 1.0, 'aug': 'multicrop'}


def test_a_sweep_share_needs_its_sources_finished(tmp_path):
    config = load_config('layers', 'smoke')
    config.study.report = False
    config.study.only = 'SDTL_N16'
    with pytest.raises(UserError, match=r'starts from .*/S, which has not finished'):
        study.run(config, str(tmp_path), train_fn=FakeTraining())
    config.study.only = 'S'
    study.run(config, str(tmp_path), train_fn=FakeTraining())
    config.study.only = 'SDTL_N16'
    fake = FakeTraining()
    study.run(config, str(tmp_path), train_fn=fake)
    assert fake.calls == [('SDTL_N16', str(tmp_path / 'S'))]


def test_smoke_study_trains_reports_and_reruns_as_a_no_op(tmp_path):
    """The one command, for real: 4 runs, the report and figure; the same command again
    trains nothing and rewrites the report."""
    config = load_config('layers', 'smoke')
    config.data.data_dir = str(tmp_path / 'data')
    workdir = tmp_path / 'study'
    results = study.run(config, str(workdir))
    assert list(results) == ['S', 'R', 'SDTL_N16', 'RDTL_N16']
    assert results['SDTL_N16']['source'] == str(workdir / 'S')
    assert results['RDTL_N16']['train_data'] == 'digits_synth'
    assert not (workdir / 'SDTL_N16' / 'source').exists()     # no source of its own
    report = (workdir / 'report.md').read_text()
    assert 'N = 16' in report and 'pending' not in report
    assert (workdir / 'figure2_layers.png').stat().st_size > 0

    metrics = {name: (workdir / name / 'metrics.jsonl').read_text() for name in results}
    (workdir / 'report.md').unlink()
    again = study.run(config, str(workdir))
    assert again == results
    assert metrics == {name: (workdir / name / 'metrics.jsonl').read_text() for name in results}
    assert (workdir / 'report.md').exists()
