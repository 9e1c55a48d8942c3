"""Model contract tests: exact sizes, the 18 named layers, shapes, cosine head, freezing.

Anything that really runs uses the small variants (same 18 layers, narrow), and each model is
compiled once, for one train step whose results several tests read; shapes at other sizes and
the full-size models are only traced with jax.eval_shape. Real inits use an 'unsafe_rbg' key:
an init's cost is almost all the compilation of one PRNG draw per parameter, and threefry
compiles several times slower.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sdtl_jax import cli, models
from sdtl_jax.models import __main__ as models_main
from sdtl_jax.models import layers, tiny_vit

SMALL = {
    'resnet50': {'name': 'resnet50', 'width': 8},
    'tinyvit_5m': {'name': 'tinyvit_5m', 'embed_dims': (16, 32, 40, 80),
                   'num_heads': (1, 2, 2, 4)},
}
NUM_CLASSES = 5
# num_frozen for the train-step tests: inside a stage for ResNet, after a downsample for TinyViT.
NUM_FROZEN = {'resnet50': 5, 'tinyvit_5m': 7}

# docs/paper.md §2: ResNet-50 with 100 classes and the bias-free cosine head.
RESNET50_LAYER_PARAMS = [9_536, 75_008, 70_400, 70_400, 379_392, 280_064, 280_064, 280_064,
                         1_512_448, 1_117_184, 1_117_184, 1_117_184, 1_117_184, 1_117_184,
                         6_039_552, 4_462_592, 4_462_592, 204_800]


def count(tree):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def shapes(model, image_size=32):
    return jax.eval_shape(functools.partial(models.init, model, 0, image_size))


def images(size, batch=2, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


@functools.cache
def small_variables(name):
    model = models.build(SMALL[name], num_classes=NUM_CLASSES)
    return models.init(model, jax.random.key(0, impl='unsafe_rbg'), 32)


@pytest.mark.parametrize('name, num_classes, expected', [
    ('resnet50', 100, 23_712_832),
    ('tinyvit_5m', 37, 5_083_604),
])
def test_full_size_param_counts(name, num_classes, expected):
    model = models.build({'name': name}, num_classes=num_classes)
    assert count(shapes(model, 224)['params']) == expected


def test_resnet50_per_layer_param_counts():
    model = models.build({'name': 'resnet50'}, num_classes=100)
    params = shapes(model, 224)['params']
    assert [count(params[n]) for n in model.layer_names()] == RESNET50_LAYER_PARAMS


@pytest.mark.parametrize('name', sorted(SMALL))
def test_layer_contract(name):
    model = models.build(SMALL[name], num_classes=NUM_CLASSES)
    names = model.layer_names()
    assert len(names) == len(set(names)) == 18
    variables = shapes(model)
    assert set(variables) == {'params', 'batch_stats'}
    assert set(variables['params']) == set(names)
    assert set(variables['batch_stats']) <= set(names)
    # Every layer but the pooling norm / classifier has BatchNorm.
    assert set(names) - set(variables['batch_stats']) <= {'norm', 'head'}


def test_layer_names():
    resnet = models.build({'name': 'resnet50'}, num_classes=3)
    assert resnet.layer_names() == ('stem', *(f'block{i:02d}' for i in range(16)), 'head')
    vit = models.build({'name': 'tinyvit_5m'}, num_classes=3)
    assert vit.layer_names() == (
        'patch_embed', 'stage0_mbconv0', 'stage0_mbconv1',
        'stage1_downsample', 'stage1_block0', 'stage1_block1',
        'stage2_downsample', *(f'stage2_block{i}' for i in range(6)),
        'stage3_downsample', 'stage3_block0', 'stage3_block1', 'norm', 'head')


# Output shapes of selected layers per image size (small variants).
EXPECTED_SHAPES = {
    ('resnet50', 32): {'stem': (2, 8, 8, 8), 'block00': (2, 8, 8, 32),
                       'block03': (2, 4, 4, 64), 'block15': (2, 1, 1, 256)},
    ('resnet50', 96): {'stem': (2, 24, 24, 8), 'block07': (2, 6, 6, 128),
                       'block15': (2, 3, 3, 256)},
    ('resnet50', 224): {'stem': (2, 56, 56, 8), 'block15': (2, 7, 7, 256)},
    ('tinyvit_5m', 32): {'patch_embed': (2, 8, 8, 16), 'stage1_block1': (2, 4, 4, 32),
                         'stage2_block5': (2, 2, 2, 40), 'stage3_block1': (2, 1, 1, 80),
                         'norm': (2, 80)},
    # docs/paper.md §2: 96 px crops give stage resolutions 24/12/6/3 (windows padded).
    ('tinyvit_5m', 96): {'stage0_mbconv1': (2, 24, 24, 16), 'stage1_block1': (2, 12, 12, 32),
                         'stage2_block5': (2, 6, 6, 40), 'stage3_block1': (2, 3, 3, 80)},
    ('tinyvit_5m', 224): {'stage0_mbconv1': (2, 56, 56, 16), 'stage1_block1': (2, 28, 28, 32),
                          'stage2_block5': (2, 14, 14, 40), 'stage3_block1': (2, 7, 7, 80)},
}


@pytest.mark.parametrize('name, size', sorted(EXPECTED_SHAPES))
def test_output_shapes(name, size):
    model = models.build(SMALL[name], num_classes=NUM_CLASSES)
    logits, out = jax.eval_shape(functools.partial(model.apply, train=False),
                                 shapes(model, size), images(size))
    assert logits.shape == (2, NUM_CLASSES) and logits.dtype == jnp.float32
    # In forward order, even after eval_shape (a plain dict would come back sorted).
    assert list(out) == list(model.layer_names())
    assert out['head'].shape == (2, NUM_CLASSES)
    for layer, shape in EXPECTED_SHAPES[name, size].items():
        assert out[layer].shape == shape, layer


@functools.cache
def train_step(name, num_frozen, frozen_bn='inference'):
    """One jitted forward + backward in train mode on 4 images of 32 px (a small variant).

    Returns (model, variables before, grads, logits, out, updated batch_stats).
    """
    model = models.build(SMALL[name], num_classes=NUM_CLASSES, num_frozen=num_frozen,
                         frozen_bn=frozen_bn)
    variables = small_variables(name)
    x, labels = images(32, batch=4, seed=2), jnp.arange(4) % NUM_CLASSES

    @jax.jit
    def step(variables):
        def loss_fn(params):
            (logits, out), updates = model.apply({**variables, 'params': params}, x,
                                                 train=True, mutable=['batch_stats'])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, (logits, out, updates['batch_stats'])
        return jax.grad(loss_fn, has_aux=True)(variables['params'])

    grads, (logits, out, batch_stats) = step(variables)
    return model, variables, grads, logits, out, batch_stats


def _changed(before, after):
    return any(not np.array_equal(a, b)
               for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def _grad_norm(grads):
    return sum(float(np.abs(np.asarray(g)).sum()) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize('name', sorted(SMALL))
def test_train_step_runs_at_32px(name):
    model, _, _, logits, out, _ = train_step(name, NUM_FROZEN[name])
    assert logits.shape == (4, NUM_CLASSES) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits)) and np.all(np.abs(logits) <= 1 / 0.1 + 1e-4)
    assert list(out) == list(model.layer_names())  # Order survives jit.
    for layer, shape in EXPECTED_SHAPES[name, 32].items():
        assert out[layer].shape == (4, *shape[1:]), layer


@pytest.mark.parametrize('name', sorted(SMALL))
def test_frozen_layers_keep_batch_stats_and_get_zero_gradient(name):
    num_frozen = NUM_FROZEN[name]
    model, variables, grads, _, _, batch_stats = train_step(name, num_frozen)
    before = variables['batch_stats']
    assert set(batch_stats) == set(before)
    for i, layer in enumerate(model.layer_names()):
        if layer in before:
            assert _changed(before[layer], batch_stats[layer]) == (i >= num_frozen), layer
        if i < num_frozen:
            assert _grad_norm(grads[layer]) == 0.0, layer
        else:
            assert _grad_norm(grads[layer]) > 0.0, layer


def test_frozen_batch_norm_adapt_updates_running_stats():
    model = models.build(SMALL['resnet50'], num_classes=NUM_CLASSES, num_frozen=5,
                         frozen_bn='adapt')
    variables = small_variables('resnet50')
    apply = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))
    _, updates = apply(variables, images(32, batch=4, seed=2))
    for layer in variables['batch_stats']:
        assert _changed(variables['batch_stats'][layer], updates['batch_stats'][layer]), layer


@pytest.mark.parametrize('name', sorted(SMALL))
def test_bfloat16_compute_keeps_float32_params_and_logits(name):
    model = models.build(SMALL[name], num_classes=NUM_CLASSES, dtype=jnp.bfloat16)
    variables = shapes(model)
    assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    logits, out = jax.eval_shape(functools.partial(model.apply, train=False), variables,
                                 images(32))
    assert logits.dtype == jnp.float32
    assert out[model.layer_names()[1]].dtype == jnp.bfloat16


def test_cosine_classifier():
    head = layers.CosineClassifier(7, tau=0.1)
    x = jax.random.normal(jax.random.key(1), (4, 16))
    params = head.init(jax.random.key(0, impl='unsafe_rbg'), x)
    kernel = params['params']['kernel']
    assert kernel.shape == (16, 7) and kernel.dtype == jnp.float32
    assert np.all(np.linalg.norm(kernel, axis=0) > 0)  # never zero-initialised
    logits = head.apply(params, x)
    assert np.all(np.abs(logits) <= 10 + 1e-4)
    np.testing.assert_allclose(head.apply(params, 37.0 * x), logits, rtol=1e-5, atol=1e-5)
    # Logits are cosines / tau: a feature equal to a class weight gets exactly 1 / tau.
    aligned = head.apply(params, 3.0 * kernel[:, 2][None])
    np.testing.assert_allclose(aligned[0, 2], 10.0, rtol=1e-5)
    assert np.all(np.isfinite(head.apply(params, jnp.zeros((1, 16)))))


@pytest.mark.parametrize('size, strides', [(7, 1), (8, 2), (7, 2)])
def test_fast_convs_match_lax_convolution(size, strides):
    """DepthwiseConv / PointwiseConv == PyTorch-style conv (symmetric padding k // 2)."""
    x = jax.random.normal(jax.random.key(0), (2, size, size, 6))

    def reference(kernel, groups):
        pad = kernel.shape[0] // 2
        return jax.lax.conv_general_dilated(
            x, kernel, (strides, strides), ((pad, pad), (pad, pad)),
            dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)

    key = jax.random.key(1, impl='unsafe_rbg')
    for conv, groups in [(layers.DepthwiseConv(3, strides), 6),
                         (layers.PointwiseConv(5, strides), 1)]:
        params = conv.init(key, x)
        np.testing.assert_allclose(conv.apply(params, x),
                                   reference(params['params']['kernel'], groups),
                                   rtol=1e-5, atol=1e-5)


def test_tinyvit_details():
    # timm's attention_bias_idxs: offsets numbered in order of first appearance.
    w = 3
    points = list(itertools.product(range(w), range(w)))
    offsets, idxs = {}, []
    for p1, p2 in itertools.product(points, points):
        offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
        idxs.append(offsets.setdefault(offset, len(offsets)))
    np.testing.assert_array_equal(tiny_vit.attention_bias_idxs(w),
                                  np.reshape(idxs, (w * w, w * w)))
    variables = shapes(models.build({'name': 'tinyvit_5m'}, num_classes=37), 224)
    params = variables['params']
    assert params['stage2_block0']['attn']['attention_biases'].shape == (5, 14 * 14)
    assert params['stage3_block0']['attn']['qkv']['kernel'].shape == (320, 960)
    assert params['stage3_block0']['local_conv']['conv']['kernel'].shape == (3, 3, 1, 320)
    small = small_variables('tinyvit_5m')['params']
    np.testing.assert_array_equal(small['stage0_mbconv0']['conv3']['bn']['scale'], 0.0)
    np.testing.assert_array_equal(small['stage0_mbconv0']['conv2']['bn']['scale'], 1.0)
    np.testing.assert_array_equal(small['stage1_block0']['attn']['attention_biases'], 0.0)


@pytest.mark.parametrize('model_config, kwargs, match', [
    ({'name': 'resnet18'}, {}, 'resnet18'),
    ({}, {}, 'None'),
    ({'name': 'resnet50', 'depth': 3}, {}, "'depth'.*width"),
    ({'name': 'tinyvit_5m', 'num_classes': 3}, {}, 'num_classes'),
    ({'name': 'resnet50'}, {'num_frozen': 19}, 'num_frozen'),
    ({'name': 'resnet50'}, {'num_frozen': -1}, 'num_frozen'),
    ({'name': 'tinyvit_5m'}, {'frozen_bn': 'train'}, 'frozen_bn'),
    ({'name': 'resnet50', 'stage_sizes': (1, 1, 1, 1)}, {}, 'stage_sizes'),
    ({'name': 'tinyvit_5m', 'num_heads': (1, 3, 5, 10)}, {}, 'num_heads'),
    ({'name': 'tinyvit_5m', 'window_sizes': (7, 7, 7)}, {}, 'window_sizes'),
])
def test_build_rejects_bad_configs(model_config, kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.build(model_config, num_classes=3, **kwargs)


def test_build_accepts_config_dict_with_lists():
    ml_collections = pytest.importorskip('ml_collections')
    config = ml_collections.ConfigDict({'name': 'tinyvit_5m', 'embed_dims': [16, 32, 40, 80],
                                        'num_heads': [1, 2, 2, 4]})
    model = models.build(config, num_classes=3, num_frozen=18, dtype='bfloat16')
    assert model.embed_dims == (16, 32, 40, 80) and model.num_frozen == 18
    assert model.dtype == jnp.bfloat16


@pytest.mark.parametrize('name, num_classes, total', [
    ('resnet50', 100, 23_712_832),
    ('tinyvit_5m', 37, 5_083_604),
])
def test_main_prints_layers_and_total(name, num_classes, total, capsys):
    cli.call(models_main, [f'--model={name}', f'--num_classes={num_classes}'])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f'total params: {total}'
    assert len(lines) == 1 + 18 + 1


def test_l2_normalize_has_torch_gradient_at_zero():
    """An all-zero feature vector (a dead ReLU output, say) must not give NaN gradients: as
    torch.nn.functional.normalize, the gradient there is upstream / eps."""

    x = jnp.zeros((2, 3)).at[1].set(jnp.array([3.0, 0.0, 4.0]))
    weights = jnp.array([1.0, -2.0, 0.5])
    grad = jax.grad(lambda x: jnp.sum(layers.l2_normalize(x, axis=-1) * weights))(x)
    assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(grad[0], weights / 1e-12, rtol=1e-6)
    # Elsewhere the value is x / ||x||, unchanged.
    np.testing.assert_array_equal(layers.l2_normalize(x, axis=-1)[1], x[1] / 5.0)
