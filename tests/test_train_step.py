"""The jitted train step: multi-crop loss, BN statistics per pass, sharded == single device.

The step does not depend on the architecture, so these tests run it on `SmallNet`, a 6-layer
network built from the real models' parts (`layers.run_layers`, BatchNorm, cosine classifier):
the same semantics, a fraction of the 18-layer models' compile time. The real models' steps
run in test_models.py and end to end in test_train.py.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sdtl_jax import config_lib, optim, sharding, train
from sdtl_jax.data.augment import normalize
from sdtl_jax.models import layers

NUM_CLASSES = 10


class ConvBN(nn.Module):
    features: int
    strides: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train):
        x = nn.Conv(self.features, (3, 3), (self.strides, self.strides), padding=((1, 1),) * 2,
                    use_bias=False, dtype=self.dtype, param_dtype=jnp.float32)(x)
        return nn.relu(layers.batch_norm(train=train, dtype=self.dtype)(x))


class SmallNet(nn.Module):
    """Five conv + BatchNorm layers and a cosine classifier, under the freezing contract."""
    num_frozen: int = 0
    dtype: jnp.dtype = jnp.float32

    def layer_names(self):
        return ('stem', 'conv1', 'conv2', 'conv3', 'conv4', 'head')

    @nn.compact
    def __call__(self, x, *, train):
        mods = [ConvBN(8, 2, self.dtype, name='stem')]
        mods += [ConvBN(8 * (i + 1), 1 + i % 2, self.dtype, name=f'conv{i}')
                 for i in range(1, 5)]
        head = layers.CosineClassifier(NUM_CLASSES, pool=True, name='head')
        mods.append(lambda y, train: head(y))
        return layers.run_layers(zip(self.layer_names(), mods), x.astype(self.dtype),
                                 train=train, num_frozen=self.num_frozen, frozen_bn='inference')


def _setup(num_frozen=0, dtype=jnp.float32):
    config = config_lib.base(data='digits', smoke=True)
    config.transfer.num_frozen = num_frozen
    model = SmallNet(num_frozen=num_frozen, dtype=dtype)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, 32, 32, 3)), train=False)
    # No warm-up: the first step already moves the params.
    tx, lr_fn = optim.make(config, variables['params'], model.layer_names(), warmup_steps=0,
                           total_steps=10)
    state = train.initial_state(variables['params'], variables['batch_stats'], tx,
                                jax.random.PRNGKey(1))
    step = functools.partial(train.train_step, model=model, tx=tx, lr_fn=lr_fn,
                             dtype=dtype)
    return model, state, step


def _batch(batch=8, num_local=2, seed=0):
    rng = np.random.default_rng(seed)
    return {'global': rng.integers(0, 256, (batch, 1, 32, 32, 3), np.uint8),
            'local': rng.integers(0, 256, (batch, num_local, 16, 16, 3), np.uint8),
            'label': rng.integers(0, NUM_CLASSES, (batch,), np.int32)}


def test_loss_is_the_mean_over_every_crop_with_two_passes():
    model, state, step = _setup()
    batch = _batch(num_local=3)
    variables = {'params': state.params, 'batch_stats': state.batch_stats}

    # Reference: global pass, then local pass on the statistics the global pass left.
    @jax.jit
    def reference(variables, batch):
        g = normalize.normalize(batch['global'].reshape(-1, 32, 32, 3))
        (logits_g, _), upd = model.apply(variables, g, train=True, mutable=['batch_stats'])
        loc = normalize.normalize(batch['local'].reshape(-1, 16, 16, 3))
        (logits_l, _), upd = model.apply({'params': variables['params'], **upd}, loc,
                                         train=True, mutable=['batch_stats'])
        ce = jnp.concatenate([
            optax.softmax_cross_entropy_with_integer_labels(logits_g, batch['label']),
            optax.softmax_cross_entropy_with_integer_labels(logits_l,
                                                            jnp.repeat(batch['label'], 3))])
        return ce, upd

    ce, upd = reference(variables, batch)
    assert ce.shape == (8 * 4,)

    new_state, metrics = jax.jit(step)(state, batch)
    np.testing.assert_allclose(metrics["loss"], ce.mean(), rtol=1e-4)
    # Running statistics were updated by both passes, global first.
    for a, b in zip(jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(upd['batch_stats'])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert int(new_state.step) == 1


def test_no_local_crops_means_one_pass():
    _, state, step = _setup()
    batch = _batch()
    del batch['local']
    _, metrics = jax.jit(step)(state, batch)
    assert np.isfinite(metrics['loss'])


@pytest.mark.devices(8)
def test_sharded_step_matches_one_device(num_frozen=0):
    """8 devices give the loss and updated params of 1 device (1e-5 relative).

    Computed in float64: in float32, merely permuting the batch on ONE device moves this small
    random-init network's gradients by a few percent (BatchNorm over few values amplifies
    summation-order rounding), which would hide any real difference between the two layouts.
    """
    assert jax.device_count() == 8, 'the devices(8) marker runs this test on 8 CPU devices'
    with jax.enable_x64(True):
        _, state, step = _setup(num_frozen=num_frozen, dtype=jnp.float64)
        # float32 params would come back with float64 BN statistics and recompile the step.
        state = jax.tree.map(lambda x: x.astype(jnp.float64)
                             if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
        outputs = []
        for devices in (jax.devices()[:1], jax.devices()):
            mesh = sharding.make_mesh(devices)
            replicated = sharding.replicated(mesh)
            fn = jax.jit(step, out_shardings=(replicated, replicated))
            s = jax.device_put(state, replicated)
            for i in range(2):
                s, metrics = fn(s, sharding.to_global(_batch(batch=16, seed=i), mesh))
            assert len(metrics['loss'].sharding.device_set) == len(devices)
            outputs.append(jax.device_get((metrics['loss'], s.params, s.batch_stats)))
    (loss1, params1, stats1), (loss8, params8, stats8) = outputs
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    flat1 = jax.tree_util.tree_flatten_with_path((params1, stats1))[0]
    for (path, a), b in zip(flat1, jax.tree.leaves((params8, stats8))):
        relative = np.linalg.norm(b - a) / max(np.linalg.norm(a), 1e-12)
        assert relative < 1e-5, (jax.tree_util.keystr(path), relative)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params1),
                                                         jax.tree.leaves(state.params))]
    assert any(changed)


def test_frozen_prefix_params_and_stats_unchanged_by_steps():
    model, state, step = _setup(num_frozen=3)
    names = model.layer_names()
    fn = jax.jit(step)
    new = state
    for i in range(3):
        new, _ = fn(new, _batch(seed=i))
    for collection in ('params', 'batch_stats'):
        before, after = getattr(state, collection), getattr(new, collection)
        for i, name in enumerate(names):
            if name not in before:
                continue
            same = [np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[name]),
                                                          jax.tree.leaves(after[name]))]
            assert all(same) if i < 3 else not all(same), (collection, name)
