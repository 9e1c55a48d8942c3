"""The benchmark suite (bench/): the steps it times train what they should, each benchmark
reports sane figures on a tiny size, and `bench.all --append` writes a complete section.

The PyTorch reference needs torchvision and timm, which CI does not install: those tests skip.
"""
import datetime
import importlib.util
import math
import re

import jax
import numpy as np
import pytest

from bench import all as bench_all
from bench import results, step_common, train_step_speed
from sdtl_jax import cli, config_lib, models

needs_reference = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ('torchvision', 'timm')),
    reason=f'the PyTorch reference needs torchvision and timm: {step_common.INSTALL_REFERENCE}')

# One step of a tiny batch: 2 images, each 1 x 32 px + 2 x 16 px crops.
TINY = dict(batch=2, global_size=32, num_local=2, local_size=16, warmup=1, repeats=1)
NUM_FROZEN = 16


def _sane(result):
    assert result['samples_per_s'] > 0 and result['step_s'] > 0, result
    assert result['peak_bytes'] > 2 ** 20 and math.isfinite(result['loss']), result


def _changed(before, after):
    return [not np.array_equal(a, b)
            for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]


def test_our_step_updates_only_the_unfrozen_layers():
    spec = step_common.StepSpec('resnet50', num_frozen=NUM_FROZEN, model_kwargs={'width': 8},
                                **TINY)
    step, state, batch = train_step_speed.build(spec)
    assert batch['global_ops'].shape == (2, 1, 12)   # the light ops are in the timed step
    # Copies: the step donates the state's buffers.
    before = jax.tree.map(np.array, (state.params, state.batch_stats))
    state, _ = step(state, batch)
    after = jax.device_get((state.params, state.batch_stats))
    names = models.build(spec.model_kwargs | {'name': 'resnet50'}, num_classes=100).layer_names()
    for i, name in enumerate(names):
        params_changed = _changed(before[0][name], after[0][name])
        stats_changed = _changed(before[1].get(name, {}), after[1].get(name, {}))
        if i < NUM_FROZEN:
            assert not any(params_changed + stats_changed), name
        else:
            assert all(params_changed) and all(stats_changed), name
    result = train_step_speed.time_step(spec, step, state, batch)
    _sane(result)
    assert result['device'] == 'cpu' and result['memory'] == 'max RSS'


@pytest.fixture
def one_torch_thread():
    """Two OpenMP threads on a busy 2-core machine spin: seconds per tiny step, not 0.2 s."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@needs_reference
@pytest.mark.parametrize('model', step_common.MODELS)
def test_reference_step_freezes_like_ours(model, one_torch_thread):
    import torch

    from bench import torch_step
    # torchvision's ResNet-50 has a fixed width; TinyViT shrinks as ours does.
    kwargs = config_lib.SMALL_MODELS[model] if model == 'tinyvit_5m' else {}
    spec = step_common.StepSpec(model, num_frozen=NUM_FROZEN, model_kwargs=kwargs, **TINY)
    step, _, named, _ = torch_step.build(spec, torch.device('cpu'))
    params = [[p for m in group for p in m.parameters()] for group in named]
    buffers = [[b for m in group for b in m.buffers()] for group in named]
    before = [[t.detach().clone() for t in group] for group in params + buffers]
    loss = step()
    assert math.isfinite(float(loss))
    changed = [[not torch.equal(a, b) for a, b in zip(old, new)]
               for old, new in zip(before, params + buffers)]
    for i, group in enumerate(named):
        if i < NUM_FROZEN:   # no gradient, no update, BatchNorm on running statistics
            assert not any(changed[i] + changed[len(named) + i]), group
            assert all(p.grad is None for p in params[i])
            assert not any(m.training for m in group)
        else:
            assert params[i] and all(changed[i]), group
    _sane(torch_step.time_step(spec, step, torch.device('cpu')))


def test_all_appends_a_section_with_its_provenance(tmp_path, monkeypatch):
    original = open(results.RESULTS).read()
    copy = tmp_path / 'RESULTS.md'
    copy.write_text(original)
    monkeypatch.setattr(results, 'RESULTS', str(copy))
    monkeypatch.setattr(bench_all, 'LOADER_ARGS', {False: [
        '--settings=0:1', '--num_images=8', '--batch=4', '--num_batches=1', '--repeats=1']})
    # The step of the first test, in a child process: a hit in conftest's compilation cache.
    # (The flags in the order they are defined, the order the section's command lists them.)
    argv = ['--small', '--models=resnet50', f'--num_frozen={NUM_FROZEN}',
            *(f'--{k}={v}' for k, v in TINY.items())]
    lines = bench_all.run(cli.parse(bench_all, argv + ['--append']))

    text = copy.read_text()
    assert text.startswith(original)   # appended, nothing else touched
    section = text[len(original):]
    assert section.startswith(f'\n### all, {datetime.date.today()}\n')
    assert f'`python -m bench.all {" ".join(argv)}`' in section
    assert '\n'.join(lines) in section
    for field in ('device: ', 'load average at start: ', 'commit: ', 'jax ', 'jaxlib ',
                  'flax ', 'torch ', 'torchvision ', 'timm '):
        assert field in section, field
    assert any('PyTorch reference not run: no small variant of resnet50' in line
               for line in lines)
    step_line = next(line for line in lines if line.strip().startswith('N=16: ours'))
    assert float(step_line.split('ours')[1].split()[0]) > 0          # samples/s
    loader_line = next(line for line in lines if 'samples/s per core' in line)
    assert float(loader_line.split(':')[1].split()[0]) > 0
    assert lines[-2].startswith('generator: not run, needs a CUDA GPU')   # this CPU machine
    assert lines[-1].startswith('load average at end: ')


def test_profile_step_attributes_operations_to_layers_and_passes(capsys):
    from bench import profile_step

    argv = ['--small', '--models=resnet50', f'--num_frozen={NUM_FROZEN}', '--notorch',
            '--top=100000', *(f'--{k}={v}' for k, v in TINY.items())]
    cli.call(profile_step, argv)
    out = capsys.readouterr().out
    assert '  ours by kind (s/step):' in out and '  per layer (s/step): ours fwd / bwd' in out
    # Every operation of the step, listed with its kind, layer and pass.
    ops = re.findall(r'^ +[0-9.]+ (\S+) +(\S+|\(outside the model\)) +(forward|backward) ',
                     out, re.M)
    names = models.build({'name': 'resnet50', 'width': 8}, num_classes=100).layer_names()
    forward = {layer for _, layer, direction in ops if direction == 'forward'}
    backward = {layer for _, layer, direction in ops if direction == 'backward'}
    assert set(names) <= forward, sorted(forward)
    # The frozen prefix has no backward pass; the trained layers have one.
    assert backward & set(names) == set(names[NUM_FROZEN:]), sorted(backward)
    assert {'convolution', 'matmul', 'elementwise'} <= {kind for kind, _, _ in ops}
