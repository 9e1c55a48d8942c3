"""End to end on the embedded digits: smoke runs of every config, transfer, reuse, errors."""
import json
import pathlib

import jax
import numpy as np
import pytest

from sdtl_jax import checkpointing, experiment, models

ROOT = pathlib.Path(__file__).parent.parent


def load_config(name, arg):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, ROOT / 'configs' / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
    """One copy of the demo data for the whole session (built on first use by the pipeline)."""
    return str(tmp_path_factory.mktemp('data'))


def smoke(name, arg, data_dir, **overrides):
    config = load_config(name, f'smoke,{arg}' if arg else 'smoke')
    config.data.data_dir = data_dir
    for key, value in overrides.items():
        section, _, leaf = key.rpartition('.')
        (config[section] if section else config)[leaf] = value
    return config


RESULT_KEYS = {'top1_mean', 'top1_std', 'top5_mean', 'top5_std', 'train_loss_mean',
               'train_loss_std', 'num_frozen', 'model', 'train_data', 'eval_data', 'epochs',
               'wall_seconds'}


@pytest.mark.parametrize('name, arg, overrides', [
    # A Table 1 pipeline other than multi-crop, on a reduced set (Table 6), end to end.
    ('baseline', 'domain=real', {'aug.name': 'pixmix', 'data.train_fraction': 0.5}),
    # N = 16 as in the transfer tests below and the notebook: one program, compiled once.
    ('real_to_synth', 'num_frozen=16', {}),
    # TinyViT's step is the slowest to compile: one pass (global crops only) halves it. Its
    # source stage is the S-only baseline of the paper's Pets setting.
    ('synth_to_real', 'num_frozen=8,model=tinyvit_5m,data=pets', {'aug.num_local': 0}),
])
def test_smoke_run(name, arg, overrides, data_dir, tmp_path):
    config = smoke(name, arg, data_dir, **overrides)
    results = experiment.run(config, str(tmp_path))
    assert results['train_examples'] == 24 and results['skipped_records'] == 0
    if 'data.train_fraction' in overrides:
        subset = json.loads((tmp_path / 'train_subset.json').read_text())
        assert (subset['size'], subset['fraction'], subset['dataset']) == (24, 0.5, 'digits_real')
    assert RESULT_KEYS <= set(results)
    assert np.isfinite(results['train_loss_mean']) and 0 <= results['top1_mean'] <= 100
    assert results['top5_mean'] >= results['top1_mean']
    assert json.loads((tmp_path / 'results.json').read_text()) == results
    lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])['num_images'] == 360   # every val image
    # 3 steps logged one by one: the first interval (compilation) is left out, 2 are timed.
    assert json.loads(lines[0])['step_s'] > 0
    assert (tmp_path / 'config.json').exists()
    assert any((tmp_path / 'tensorboard').iterdir())
    if name != 'baseline':
        assert (tmp_path / 'source' / 'results.json').exists()
        assert results['source'] == str(tmp_path / 'source')


def _variables(workdir):
    params, stats, _ = checkpointing.load_variables(str(workdir))
    return params, stats


@pytest.fixture(scope='module')
def source_run(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp('source')
    experiment.run(smoke('baseline', 'domain=real', data_dir), str(workdir))
    return workdir


# One N: every N is a program of its own to compile (the unit tests in test_optim.py and
# test_train_step.py cover other N); 16 is the paper's data-reduction N.
def test_transfer_keeps_frozen_layers_bit_identical(source_run, data_dir, tmp_path,
                                                    num_frozen=16):
    config = smoke('real_to_synth', f'num_frozen={num_frozen}', data_dir,
                   **{'transfer.init_from': str(source_run)})
    results = experiment.run(config, str(tmp_path))
    assert not (tmp_path / 'source').exists()        # init_from given: no source stage
    src_params, src_stats = _variables(source_run)
    params, stats = _variables(tmp_path)
    names = models.build(config.model, num_classes=10).layer_names()
    for i, name in enumerate(names):
        for tree, src in ((params, src_params), (stats, src_stats)):
            if name not in src:
                continue
            equal = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(tree[name]),
                                                           jax.tree.leaves(src[name]))]
            assert all(equal) if i < num_frozen else not all(equal), (name, i)
    assert results['num_frozen'] == num_frozen


@pytest.mark.parametrize('reinit', [True, False])
def test_reinit_false_fine_tunes_the_source_weights(reinit, source_run, data_dir, tmp_path):
    config = smoke('real_to_synth', 'num_frozen=16', data_dir,
                   **{'transfer.init_from': str(source_run), 'transfer.reinit': reinit})
    experiment.run(config, str(tmp_path))
    # The last block (layer 16, trainable): 3 smoke steps barely move its weights, so fine-tuned
    # it stays near the source and re-initialised it does not. (Not the head: the cosine
    # classifier's gradient scales with 1 / |w| and its small init moves fast.)
    kernel = _variables(tmp_path)[0]['block15']['conv2']['kernel']
    source_kernel = _variables(source_run)[0]['block15']['conv2']['kernel']
    distance = np.linalg.norm(kernel - source_kernel) / np.linalg.norm(source_kernel)
    assert distance > 0.5 if reinit else distance < 0.05


def test_all_18_frozen_evaluates_the_source_untouched(source_run, data_dir, tmp_path):
    config = smoke('real_to_synth', 'num_frozen=18', data_dir,
                   **{'transfer.init_from': str(source_run)})
    results = experiment.run(config, str(tmp_path))
    source = json.loads((source_run / 'results.json').read_text())
    assert results['top1_mean'] == source['top1_mean']      # the same weights, the same images
    assert results['train_loss_mean'] is None and results['steps'] == 3
    params, stats = _variables(tmp_path)
    src_params, src_stats = _variables(source_run)
    for a, b in zip(jax.tree.leaves((params, stats)), jax.tree.leaves((src_params, src_stats))):
        assert np.array_equal(a, b)


def test_mismatched_source_is_refused_with_the_keys(source_run, data_dir, tmp_path):
    config = smoke('real_to_synth', 'num_frozen=4', data_dir,
                   **{'transfer.init_from': str(source_run)})
    config.model.width = 16          # another width: every stem tensor differs in shape
    with pytest.raises(ValueError, match=r'params/stem/.*source shape'):
        experiment.run(config, str(tmp_path))


def test_finished_run_is_reused(source_run, data_dir):
    before = (source_run / 'results.json').read_text()
    results = experiment.run(smoke('baseline', 'domain=real', data_dir), str(source_run))
    assert json.loads(before) == results


def test_a_run_compiles_few_programs(data_dir, tmp_path):
    """Start-up makes the optimizer state in one program: made eagerly, it compiled a zeros op
    per parameter shape (~30 compiles, 2-3 s per start for ResNet-50 at full size)."""
    compiled = []

    def listen(event, duration, **kwargs):
        if event == '/jax/core/compile/backend_compile_duration':
            compiled.append(kwargs.get('fun_name'))

    jax.clear_caches()     # programs compiled by earlier tests in this process count too
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        experiment.run(smoke('baseline', 'domain=real', data_dir), str(tmp_path))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert 'jit(train_step)' in compiled and 'jit(init)' in compiled
    assert compiled.count('jit(broadcast_in_dim)') <= 2 and len(compiled) < 20, compiled


def test_missing_dataset_names_the_folder(tmp_path):
    config = load_config('baseline', 'domain=real')
    config.data.data_dir = str(tmp_path)
    with pytest.raises(FileNotFoundError, match='imagenet100_real'):
        experiment.run(config, str(tmp_path / 'run'))
