"""The schedule, weight-decay mask and frozen prefix of the optimizer (docs/paper.md §4, 7)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdtl_jax import config_lib, layer_trees, optim

BASE, END = 0.025, 1e-6   # 0.1 x 64 / 256


def test_schedule_values():
    lr = optim.schedule(base_lr=BASE, end_lr=END, warmup_steps=100, total_steps=1100)
    assert float(lr(0)) == 0.0                                      # warm-up starts at 0
    assert float(lr(50)) == pytest.approx(BASE / 2)                 # mid-warm-up
    assert float(lr(100)) == pytest.approx(BASE)                    # end of warm-up
    i, i_max = 500, 1000                                            # mid-cosine
    expected = END + 0.5 * (BASE - END) * (1 + math.cos(math.pi * i / i_max))
    assert float(lr(600)) == pytest.approx(expected)
    assert float(lr(1100)) == pytest.approx(END)                    # last
    assert float(lr(1099)) == pytest.approx(
        END + 0.5 * (BASE - END) * (1 + math.cos(math.pi * 999 / 1000)), rel=1e-3)


NAMES = ('stem', 'block', 'head')
PARAMS = {
    'stem': {'conv': {'kernel': jnp.ones((3, 3, 3, 4))}, 'bn': {'scale': jnp.ones(4),
                                                                'bias': jnp.zeros(4)}},
    'block': {'attn': {'attention_biases': jnp.ones((2, 9)), 'qkv': {'kernel': jnp.ones((4, 4)),
                                                                     'bias': jnp.zeros(4)}}},
    'head': {'kernel': jnp.ones((4, 3))},
}


def test_decay_mask_only_multi_dimensional_weights():
    mask = layer_trees.decay_mask(PARAMS)
    assert mask['stem']['conv']['kernel'] and mask['head']['kernel']
    assert mask['block']['attn']['qkv']['kernel']
    assert not mask['stem']['bn']['scale'] and not mask['stem']['bn']['bias']
    assert not mask['block']['attn']['qkv']['bias']
    assert not mask['block']['attn']['attention_biases']     # 2-D, but a bias


def test_layer_labels_reject_keys_outside_the_contract():
    with pytest.raises(ValueError, match='extra'):
        layer_trees.layer_labels({**PARAMS, 'extra': {}}, NAMES, 1)


def _config(num_frozen, weight_decay=1e-4):
    c = config_lib.base(data='digits')
    c.transfer.num_frozen = num_frozen
    c.optim.weight_decay = weight_decay
    return c


@pytest.mark.parametrize('num_frozen', [0, 1, 2, 3])
def test_frozen_layers_stay_bit_identical(num_frozen):
    tx, _ = optim.make(_config(num_frozen), PARAMS, NAMES, warmup_steps=0, total_steps=10)
    state = tx.init(PARAMS)
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    params = PARAMS
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    for i, name in enumerate(NAMES):
        same = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                                            params[name], PARAMS[name]))
        assert all(same) if i < num_frozen else not any(same), name


def test_sgd_momentum_and_decay_match_pytorch():
    """PyTorch SGD: g += wd * p; buf = 0.9 buf + g; p -= lr * buf (no Nesterov)."""
    params = {'head': {'kernel': jnp.full((2, 2), 2.0)}}
    c = _config(0, weight_decay=0.5)
    tx, lr_fn = optim.make(c, params, ('head',), warmup_steps=0, total_steps=1000)
    state, p, buf = tx.init(params), 2.0, 0.0
    for step in range(3):
        updates, state = tx.update({'head': {'kernel': jnp.ones((2, 2))}}, state, params)
        params = jax.tree.map(lambda a, b: a + b, params, updates)
        buf = 0.9 * buf + (1.0 + 0.5 * p)
        p = p - float(lr_fn(step)) * buf
        np.testing.assert_allclose(params['head']['kernel'], p, rtol=1e-6)
