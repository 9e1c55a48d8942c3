"""Weight import (sdtl_jax.convert): timm / Microsoft / torchvision layouts, the checkpoint
`transfer.init_from` reads, the classifier options, and loud failures naming the tensors.

The inputs are the equivalence fixtures' weights (tests/fixtures/fidelity/: timm's and
torchvision's names, reduced widths); test_equivalence.py checks the converted models' outputs.
"""
import json
import pathlib
import re

import jax
import numpy as np
import pytest
import torch

from sdtl_jax import checkpointing, cli, convert, models

FIXTURES = pathlib.Path(__file__).parent / 'fixtures' / 'fidelity'
CONFIGS = json.loads((FIXTURES / 'meta.json').read_text())['models']
TINYVIT = CONFIGS['tinyvit_5m']['config']
RESNET = CONFIGS['resnet50']['config']


def fixture_state(name):
    return convert.load_state_dict(str(FIXTURES / f'{name}.safetensors'))


def shapes(model_config, num_classes):
    """A fresh model's variables as shapes: what `load_for_transfer` grafts into."""
    model = models.build(model_config, num_classes=num_classes)
    return model, jax.eval_shape(lambda: models.init(model, 0, 32))


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


def microsoft_layout(state):
    """timm's TinyViT names -> those of Microsoft's original code (Cream/TinyViT/models/
    tiny_vit.py: Conv2d_BN's conv is `c`, `patch_embed.seq`, `layers.i` with the downsampling at
    the end of stage i, `norm_head`, `head`), plus the bias index buffers its old checkpoints
    saved, wrapped in `model` as its .pth files are."""
    renamed = {}
    for key, value in state.items():
        key = re.sub(r'^patch_embed\.conv(\d)\.',
                     lambda m: f'patch_embed.seq.{2 * int(m[1]) - 2}.', key)
        key = re.sub(r'^stages\.(\d)\.downsample\.',
                     lambda m: f'layers.{int(m[1]) - 1}.downsample.', key)
        key = re.sub(r'^stages\.', 'layers.', re.sub(r'\.conv\.weight$', '.c.weight', key))
        key = key.replace('head.norm.', 'norm_head.').replace('head.fc.', 'head.')
        renamed[key] = torch.from_numpy(value)
        if key.endswith('attn.attention_biases'):
            n = value.shape[1]
            renamed[key.replace('biases', 'bias_idxs')] = torch.zeros((n, n), dtype=torch.long)
    assert {'patch_embed.seq.2.c.weight', 'layers.0.downsample.conv1.c.weight',
            'layers.2.blocks.5.local_conv.c.weight', 'norm_head.weight', 'head.weight'} <= set(
                renamed)
    return {'model': renamed}


def test_timm_safetensors_converts_to_a_checkpoint_transfer_loads(tmp_path):
    out = tmp_path / 'converted'
    summary = convert.convert(str(FIXTURES / 'tinyvit_5m.safetensors'), str(out),
                              model_config=TINYVIT)
    assert summary['dropped'] == ['head.fc.weight'] and summary['head'] == 'dropped'
    assert json.loads((out / 'convert.json').read_text()) == summary

    # What a transfer with N = 17 does: layers [0, 17) from the checkpoint, a fresh head.
    model, fresh = shapes(TINYVIT, num_classes=37)
    names = model.layer_names()
    params, batch_stats, _ = checkpointing.load_for_transfer(
        fresh['params'], fresh['batch_stats'], str(out), names[:17])
    expected, _ = convert.to_flax(fixture_state('tinyvit_5m'), model)
    assert_trees_equal({k: params[k] for k in names[:17]}, expected['params'])
    assert_trees_equal(batch_stats, expected['batch_stats'])
    assert params['head'] is fresh['params']['head']
    # The dropped classifier cannot be taken over (transfer.reinit=False needs --num_classes).
    with pytest.raises(ValueError, match='params/head: missing in the source checkpoint'):
        checkpointing.load_for_transfer(fresh['params'], fresh['batch_stats'], str(out), names)
    with pytest.raises(FileExistsError, match='already holds checkpoints'):
        convert.convert(str(FIXTURES / 'tinyvit_5m.safetensors'), str(out), model_config=TINYVIT)


def test_microsoft_pth_converts_through_the_cli(tmp_path, capsys):
    checkpoint = tmp_path / 'tiny_vit_5m_1k.pth'
    torch.save(microsoft_layout(fixture_state('tinyvit_5m')), checkpoint)
    widths = {k: v for k, v in TINYVIT.items() if k != 'name'}
    cli.call(convert, ['--model=tinyvit_5m', f'--checkpoint={checkpoint}',
                       f'--out={tmp_path / "out"}', '--keep_classifier',
                       f'--model_kwargs={json.dumps(widths)}'])
    assert 'head kept, 10 classes; dropped: nothing' in capsys.readouterr().out
    params, batch_stats, step = checkpointing.load_variables(str(tmp_path / 'out'))
    # The same variables as from timm's layout, classifier included.
    model = models.build(TINYVIT, num_classes=10)
    expected, _ = convert.to_flax(fixture_state('tinyvit_5m'), model, keep_classifier=True)
    assert step == 0
    assert_trees_equal((params, batch_stats), (expected['params'], expected['batch_stats']))


def test_classifier_is_dropped_or_kept_without_its_bias():
    state = fixture_state('resnet50')
    state['fc.bias'] = np.ones(10, np.float32)          # a linear classifier, as torchvision's
    model = models.build(RESNET, num_classes=10)
    variables, dropped = convert.to_flax(state, model)
    assert 'head' not in variables['params'] and dropped == ['fc.weight', 'fc.bias']
    variables, dropped = convert.to_flax(state, model, keep_classifier=True)
    np.testing.assert_array_equal(variables['params']['head']['kernel'], state['fc.weight'].T)
    assert dropped == ['fc.bias']


def test_num_classes_adds_a_fresh_head_for_full_fine_tuning(tmp_path):
    summary = convert.convert(str(FIXTURES / 'resnet50.safetensors'), str(tmp_path),
                              model_config=RESNET, num_classes=5)
    assert summary['head'] == 'fresh, 5 classes'
    model, fresh = shapes(RESNET, num_classes=5)
    # transfer.reinit=False takes every layer over: the checkpoint must be a whole 5-class model.
    params, _, _ = checkpointing.load_for_transfer(fresh['params'], fresh['batch_stats'],
                                                   str(tmp_path), model.layer_names())
    kernel = np.asarray(params['head']['kernel'])
    assert kernel.shape == (128, 5) and np.all(np.isfinite(kernel))
    assert np.all(np.linalg.norm(kernel, axis=0) > 0)    # never zero (docs/paper.md §3)


def test_mismatches_stop_the_cli_naming_every_tensor(tmp_path, capsys):
    import safetensors.numpy

    state = fixture_state('resnet50')
    del state['layer2.0.downsample.0.weight']                     # missing
    state['layer1.0.conv2.weight'] = np.zeros((4, 4, 5, 5), np.float32)   # wrong shape
    state['layer5.0.conv1.weight'] = np.zeros((4, 4, 1, 1), np.float32)   # left over
    safetensors.numpy.save_file(state, str(tmp_path / 'bad.safetensors'))
    with pytest.raises(SystemExit) as exit_info:
        cli.call(convert, ['--model=resnet50', f'--checkpoint={tmp_path / "bad.safetensors"}',
                           f'--out={tmp_path / "out"}', '--model_kwargs={"width": 4}'])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert '(3 problems)' in error
    assert ('missing: layer2.0.downsample.0.weight (for params/block03/downsample_conv/kernel'
            in error)
    assert ('wrong shape: layer1.0.conv2.weight (4, 4, 5, 5), (5, 5, 4, 4) in Flax layout; '
            'params/block00/conv2/kernel needs (3, 3, 4, 4)') in error
    assert 'left over: layer5.0.conv1.weight (4, 4, 1, 1)' in error
    assert not (tmp_path / 'out').exists()
