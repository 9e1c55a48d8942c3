"""Top-1 / top-5 accuracy over a whole evaluation split (docs/paper.md §6).

The eval pipeline pads the last batch and carries a mask, so every image counts exactly once
and no remainder is dropped.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import jax
import jax.numpy as jnp

from sdtl_jax import sharding
from sdtl_jax.data.augment import normalize


def eval_step(params, batch_stats, batch, *, model, dtype):
    """Sums of correct top-1, correct top-5 and counted images in one (padded) batch."""
    images = normalize.normalize(batch['image'], dtype)
    logits, _ = model.apply({'params': params, 'batch_stats': batch_stats}, images, train=False)
    labels, mask = batch['label'], batch['mask']
    k = min(5, logits.shape[-1])
    top_k = jax.lax.top_k(logits, k)[1]
    hit_k = jnp.any(top_k == labels[:, None], axis=-1)
    return {'top1': jnp.sum((top_k[:, 0] == labels) & mask),
            'top5': jnp.sum(hit_k & mask),
            'count': jnp.sum(mask)}


def make_eval_fn(model, mesh, dtype):
    return jax.jit(functools.partial(eval_step, model=model, dtype=dtype),
                   out_shardings=sharding.replicated(mesh))


def accuracy(eval_fn, params, batch_stats, batches: Iterable[dict], mesh) -> dict[str, Any]:
    """Runs `eval_fn` over every batch; returns top1/top5 in percent and the image count."""
    totals = {'top1': 0, 'top5': 0, 'count': 0}
    for batch in batches:
        sums = eval_fn(params, batch_stats, sharding.to_global(batch, mesh))
        for key, value in jax.device_get(sums).items():
            totals[key] += int(value)
    if totals['count'] == 0:
        raise ValueError('The evaluation split has no images')
    return {'top1': 100.0 * totals['top1'] / totals['count'],
            'top5': 100.0 * totals['top5'] / totals['count'],
            'num_images': totals['count']}
