"""Models with the 18-layer contract (docs/architecture.md, "Model contract").

`build({'name': 'resnet50', 'width': 8}, num_classes=10, num_frozen=4)` returns a Linen module
with `layer_names()` (18 names in forward order; every top-level key of `params` and
`batch_stats` is one of them) and `__call__(x, *, train) -> (logits, out)`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdtl_jax.models import resnet, tiny_vit

MODELS = {
    'resnet50': resnet.ResNet,
    'tinyvit_5m': tiny_vit.TinyViT,
}
# Set by `build`'s own arguments, not by the model config.
_BUILD_ARGS = ('num_classes', 'num_frozen', 'frozen_bn', 'dtype')


def model_kwargs(name: str) -> tuple[str, ...]:
    """The keyword arguments a model config may set for model `name`."""
    fields = (f.name for f in dataclasses.fields(MODELS[name]) if f.init)
    return tuple(f for f in fields if f not in (*_BUILD_ARGS, 'parent', 'name'))


def build(model_config: Mapping[str, Any], *, num_classes: int, num_frozen: int = 0,
          frozen_bn: str = 'inference', dtype: Any = jnp.float32) -> nn.Module:
    """Builds a model from `{'name': ..., **kwargs}` (a dict or ConfigDict).

    Args:
      model_config: `name` is one of MODELS; the other keys are the model's attributes
        (`model_kwargs(name)`), e.g. `width` for ResNet, `embed_dims`/`num_heads` for TinyViT.
      num_classes: classifier outputs.
      num_frozen: the first `num_frozen` layers (0..18) are frozen: BatchNorm on running
        statistics (unless `frozen_bn == 'adapt'`) and no gradient through them.
      frozen_bn: 'inference' or 'adapt'.
      dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32, logits are float32.

    Raises:
      ValueError: unknown model name or keyword, or an invalid value.
    """
    config = dict(model_config.to_dict() if hasattr(model_config, 'to_dict') else model_config)
    name = config.pop('name', None)
    if name not in MODELS:
        raise ValueError(f'Unknown model name {name!r}; allowed: {sorted(MODELS)}')
    allowed = model_kwargs(name)
    for key in config:
        if key not in allowed:
            raise ValueError(f'Unknown keyword {key!r} for model {name!r}; allowed: '
                             f'{list(allowed)} (num_classes, num_frozen, frozen_bn and dtype '
                             f'are arguments of build)')
    # Lists (from a ConfigDict or JSON) become tuples: module attributes should be hashable.
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return MODELS[name](num_classes=num_classes, num_frozen=num_frozen, frozen_bn=frozen_bn,
                        dtype=jnp.dtype(dtype), **config)


def init(model: nn.Module, rng: Any, image_size: int | tuple[int, int]) -> dict[str, Any]:
    """Initialises `model` on a batch of 2 zero images (train=False), under jit.

    Initialisation time is mostly the compilation of one PRNG draw per parameter: jit compiles
    them together (faster than eager), and a key with a cheaper implementation, e.g.
    `jax.random.key(0, impl='unsafe_rbg')`, compiles several times faster than threefry.

    Args:
      model: a module from `build`.
      rng: a PRNG key or an integer seed (both work under jax.eval_shape).
      image_size: side length, or (height, width).

    Returns:
      The variables: {'params': ..., 'batch_stats': ...}.
    """
    rng = jnp.asarray(rng)
    if not (jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) or rng.shape == (2,)):
        rng = jax.random.PRNGKey(rng)
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    model_init = jax.jit(functools.partial(model.init, train=False))
    return dict(model_init(rng, jnp.zeros((2, h, w, 3), jnp.float32)))
