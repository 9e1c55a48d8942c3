"""sdtl_jax.analyze: linear CKA's properties, then S-only against R-only smoke runs end to end."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from sdtl_jax import analyze, analyze_metrics, experiment

ROOT = pathlib.Path(__file__).parent.parent


# --- linear CKA (NumPy only) ------------------------------------------------------------------

def _features(n=500, d=20, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


def test_cka_of_a_matrix_with_itself_is_one():
    x = _features()
    assert analyze_metrics.linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    x = _features()
    y = np.tanh(x @ _features(20, 30, seed=1))          # a nonlinear function of x, 30-d
    q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(30, 30)))
    reference = analyze_metrics.linear_cka(x, y)
    assert 0.05 < reference < 0.95
    assert analyze_metrics.linear_cka(x, y @ q) == pytest.approx(reference, rel=1e-10)
    assert analyze_metrics.linear_cka(x * 7.5, y * 1e-3) == pytest.approx(reference, rel=1e-10)
    # Centred: a constant offset changes nothing either.
    assert analyze_metrics.linear_cka(x + 3.0, y - 2.0) == pytest.approx(reference, rel=1e-10)


def test_cka_is_symmetric_and_near_zero_for_independent_features():
    x, y = _features(5000, 10, seed=3), _features(5000, 12, seed=4)
    assert analyze_metrics.linear_cka(x, y) == pytest.approx(analyze_metrics.linear_cka(y, x),
                                                             rel=1e-12)
    # Expected value for independent Gaussians ~ d_x d_y / (n sqrt(d_x d_y)) ~ 0.002.
    assert analyze_metrics.linear_cka(x, y) < 0.01


def test_cka_is_undefined_without_variance_and_checks_shapes():
    x = _features()
    assert np.isnan(analyze_metrics.linear_cka(x, np.ones((500, 3))))
    with pytest.raises(ValueError, match='same n'):
        analyze_metrics.linear_cka(x, x[:10])


@pytest.mark.parametrize('kind', analyze_metrics.PROBES)
def test_probe_separates_separable_classes(kind):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 5
    labels = rng.integers(0, 3, size=300)
    x = centres[labels] + rng.normal(size=(300, 8))
    top1, converged = analyze_metrics.probe_top1(x[:200], labels[:200], x[200:], labels[200:],
                                                 kind=kind)
    assert top1 > 95 and converged


def test_sample_indices_are_a_sorted_seeded_subset():
    assert analyze.sample_indices(10, 20, 0).tolist() == list(range(10))
    picked = analyze.sample_indices(1000, 50, 0)
    assert len(set(picked.tolist())) == 50 and (np.diff(picked) > 0).all()
    assert picked.max() > 500                   # drawn from the whole split, not its start
    assert np.array_equal(picked, analyze.sample_indices(1000, 50, 0))


def test_resolve_runs():
    assert analyze.resolve_runs('st', None, None, None) == ('st/S', 'st/R', 'st')
    assert analyze.resolve_runs(None, 'x', 'y', None) == ('x', 'y', 'x')
    assert analyze.resolve_runs('st', None, 'y', 'o') == ('st/S', 'y', 'o')
    with pytest.raises(analyze.AnalysisError, match='--workdir=STUDY'):
        analyze.resolve_runs(None, 'x', None, None)


# --- End to end: two smoke runs ---------------------------------------------------------------

@pytest.fixture(scope='module')
def study(tmp_path_factory):
    """A study-shaped folder: S (synthetic only) and R (real only) smoke baselines."""
    from test_train import smoke

    root = tmp_path_factory.mktemp('study')
    data_dir = str(tmp_path_factory.mktemp('data'))
    for name, domain in (('S', 'synth'), ('R', 'real')):
        # The plainest pipeline: the smallest training step to compile.
        experiment.run(smoke('baseline', f'domain={domain}', data_dir, **{'aug.name': 'none'}),
                  str(root / name))
    return root, data_dir


def test_analysis_of_s_against_r(study):
    root, data_dir = study
    result = analyze.analyze(str(root / 'S'), str(root / 'R'), str(root), data_dir=data_dir,
                             max_images=100, probe_train_images=200, probe='ridge')
    saved = json.loads((root / 'analysis.json').read_text())
    assert saved == json.loads(json.dumps(result))
    layers = saved['layers']
    assert [layer['index'] for layer in layers] == list(range(18))
    assert [layer['name'] for layer in layers][:2] == ['stem', 'block00']
    assert layers[-1]['name'] == 'head' and layers[-1]['dim_a'] == 10
    for layer in layers:
        assert -1e-9 <= layer['cka'] <= 1 + 1e-9, layer
        for key in ('probe_top1_a', 'probe_top1_b'):
            assert 0 <= layer[key] <= 100, layer
    assert saved['num_images'] == 100 and saved['probe']['num_train_images'] == 200
    assert saved['probe']['kind'] == 'ridge'
    assert (saved['a']['label'], saved['b']['label']) == ('S', 'R')
    assert saved['a']['train_data'] == 'digits_synth' and saved['eval_data'] == 'digits_real:val'
    markdown = (root / 'analysis.md').read_text()
    assert markdown.count('\n| ') == 18 + 1 and 'block15' in markdown   # header + 18 rows
    for name in ('cka.png', 'probe.png'):
        assert (root / name).read_bytes()[:4] == b'\x89PNG'


def test_a_run_against_itself_has_cka_one_everywhere(study, tmp_path):
    root, data_dir = study
    result = analyze.analyze(str(root / 'R'), str(root / 'R'), str(tmp_path), data_dir=data_dir,
                             max_images=64, probe_train_images=0)
    assert [layer['cka'] for layer in result['layers']] == pytest.approx([1.0] * 18, abs=1e-9)
    assert result['probe'] is None and result['layers'][0]['probe_top1_a'] is None
    assert (result['a']['label'], result['b']['label']) == ('A', 'B')


def test_unfinished_or_missing_runs_are_refused_with_the_path(study, tmp_path):
    root, data_dir = study
    with pytest.raises(analyze.AnalysisError, match=f'{tmp_path / "missing"} does not exist'):
        analyze.analyze(str(root / 'S'), str(tmp_path / 'missing'), str(tmp_path))
    unfinished = tmp_path / 'unfinished'
    unfinished.mkdir()
    (unfinished / 'config.json').write_text((root / 'R' / 'config.json').read_text())
    with pytest.raises(analyze.AnalysisError, match=r'unfinished.*no results.json'):
        analyze.analyze(str(unfinished), str(root / 'R'), str(tmp_path))


def test_runs_of_different_architectures_are_refused(study, tmp_path):
    root, data_dir = study
    other = tmp_path / 'tinyvit'
    shutil.copytree(root / 'R', other)
    config = json.loads((other / 'config.json').read_text())
    config['model'] = {'name': 'tinyvit_5m', 'embed_dims': [16, 32, 40, 80],
                       'num_heads': [1, 2, 2, 4]}
    (other / 'config.json').write_text(json.dumps(config))
    with pytest.raises(analyze.AnalysisError, match='different layers'):
        analyze.analyze(str(root / 'R'), str(other), str(tmp_path), data_dir=data_dir)


def test_cli_exits_2_naming_the_missing_run(tmp_path):
    child = subprocess.run(
        [sys.executable, '-m', 'sdtl_jax.analyze', f'--workdir={tmp_path}'],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    assert child.returncode == 2, child.stderr[-2000:]
    assert f'{tmp_path / "S"} does not exist' in child.stderr
