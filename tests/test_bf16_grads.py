"""In bf16, TinyViT's bias, LayerNorm, BatchNorm and depthwise-convolution parameters get the
gradients float32 gives: their gradients are sums over every token or pixel, which must not be
accumulated in bf16 (a Dense bias summed in bf16 over 3,136 tokens is 2% off).

Each building block runs in float32 and in bf16 on the same inputs, parameters and output
cotangent, all exactly representable in bf16, so the only differences are the block's own
roundings. A whole bf16 model differs from float32 by more than that (every activation is
rounded, and the cosine head amplifies it), whatever the gradients' accumulation.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from sdtl_jax.models import layers, tiny_vit

# (block for a compute dtype, input shape): reduced sizes of TinyViT-5M's tokens and maps.
BLOCKS = {
    'dense': (lambda dtype: tiny_vit.dense(32, dtype, 'fc'), (16, 196, 32)),
    'layer_norm': (lambda dtype: layers.layer_norm(dtype=dtype), (4, 196, 32)),
    'batch_norm': (lambda dtype: layers.batch_norm(train=True, dtype=dtype), (4, 14, 14, 32)),
    'depthwise_conv': (lambda dtype: layers.DepthwiseConv(3, 1, dtype), (4, 14, 14, 32)),
}


def _bf16_exact(x):
    return jnp.asarray(x, jnp.bfloat16).astype(jnp.float32)


@pytest.mark.parametrize('name', BLOCKS)
def test_bf16_parameter_gradients_match_float32(name):
    make, shape = BLOCKS[name]
    rng = np.random.default_rng(0)
    x = _bf16_exact(rng.normal(0.5, 1.0, shape))
    variables = make(jnp.float32).init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: _bf16_exact(p + rng.normal(0.0, 0.1, p.shape)),
                          variables['params'])
    out = jax.eval_shape(lambda: make(jnp.float32).apply(variables, x, mutable=['batch_stats']))
    cotangent = _bf16_exact(rng.normal(size=out[0].shape))

    def grads(dtype):
        block = make(dtype)

        def loss(params, x, cotangent):
            y, _ = block.apply({**variables, 'params': params}, x.astype(dtype),
                               mutable=['batch_stats'])
            return jnp.sum(y.astype(jnp.float32) * cotangent)
        return traverse_util.flatten_dict(jax.jit(jax.grad(loss))(params, x, cotangent),
                                          sep='/')

    g32, g16 = grads(jnp.float32), grads(jnp.bfloat16)
    for key, g in g32.items():
        assert g16[key].dtype == jnp.float32
        error = float(jnp.linalg.norm(g16[key] - g) / jnp.linalg.norm(g))
        assert error < 1e-2, f'{name} {key}: relative error {error:.4f}'
