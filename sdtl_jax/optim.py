"""The optimizer of the recipe (docs/paper.md §4) with the frozen prefix (docs/paper.md §7).

SGD, momentum 0.9, no Nesterov; L2 weight decay 1e-4 added to the gradient (PyTorch's SGD
`weight_decay`) on >1-D weights of trainable layers only; per-iteration linear warm-up from 0,
then cosine to 1e-6. Frozen layers get `optax.set_to_zero`: their params stay bit-identical
and, under jit, XLA drops their backward work (bench/freeze_speed.py measures it).
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import ml_collections
import optax

from sdtl_jax import config_lib, layer_trees


def schedule(*, base_lr: float, end_lr: float, warmup_steps: int,
             total_steps: int) -> Callable[[int], jnp.ndarray]:
    """lr(i): linear from 0 to base_lr over warm-up, then 1e-6 + 0.5 (base - 1e-6)(1 + cos)."""
    cosine = optax.cosine_decay_schedule(
        init_value=base_lr, decay_steps=max(total_steps - warmup_steps, 1),
        alpha=end_lr / base_lr)
    if warmup_steps == 0:
        return cosine
    warmup = optax.linear_schedule(0.0, base_lr, warmup_steps)
    return optax.join_schedules([warmup, cosine], boundaries=[warmup_steps])


def make(config: ml_collections.ConfigDict, params, layer_names, *, warmup_steps: int,
         total_steps: int):
    """Returns `(tx, lr_fn)` for `params` (arrays or shapes) with the config's frozen prefix."""
    lr_fn = schedule(base_lr=config_lib.learning_rate(config), end_lr=config.optim.end_lr,
                     warmup_steps=warmup_steps, total_steps=total_steps)
    trainable = optax.chain(
        # A callable mask: inside multi_transform this sees only the trainable subtree.
        optax.add_decayed_weights(config.optim.weight_decay, mask=layer_trees.decay_mask),
        optax.sgd(lr_fn, momentum=config.optim.momentum, nesterov=False),
    )
    labels = layer_trees.layer_labels(params, layer_names, config.transfer.num_frozen)
    tx = optax.multi_transform(
        {layer_trees.TRAINABLE: trainable, layer_trees.FROZEN: optax.set_to_zero()}, labels)
    return tx, lr_fn
