"""Parameter trees, layer by layer: which leaves are frozen (`layer_labels`), which decay
(`decay_mask`), grafting pre-trained layers into a new model (`graft`) and naming where a
checkpoint's tree differs from the model's (`differences`).

One mask, built from `layer_names()[:num_frozen]`, drives freezing:
`optim.make` gives frozen leaves `optax.set_to_zero`, the model puts a `stop_gradient` after
the last frozen layer and runs frozen BatchNorm on running statistics.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax

FROZEN, TRAINABLE = 'frozen', 'trainable'

# Leaves that never decay whatever their rank: TinyViT's per-head attention bias tables are 2-D
# but are biases (timm lists them in `no_weight_decay_keywords`).
NO_DECAY_NAMES = ('attention_biases',)


def check_layer_keys(tree: Mapping[str, Any], layer_names: Sequence[str], what: str) -> None:
    """Fails on any top-level key outside the 18-layer contract."""
    if extra := set(tree) - set(layer_names):
        raise ValueError(f'{what} outside the layer contract: {sorted(extra)}; '
                         f'layers are {list(layer_names)}')


def layer_labels(params: Mapping[str, Any], layer_names: Sequence[str], num_frozen: int):
    """`'frozen'` for every leaf of layers [0, num_frozen), `'trainable'` for the others."""
    check_layer_keys(params, layer_names, 'Params')
    frozen = set(layer_names[:num_frozen])
    return {k: jax.tree.map(lambda _, k=k: FROZEN if k in frozen else TRAINABLE, v)
            for k, v in params.items()}


def decay_mask(params) -> Any:
    """True for weights with more than one dimension, except biases (docs/paper.md §4)."""
    def decays(path, leaf):
        names = [getattr(p, 'key', getattr(p, 'name', '')) for p in path]
        return leaf.ndim > 1 and not any(n in NO_DECAY_NAMES for n in names)
    return jax.tree_util.tree_map_with_path(decays, params)


def graft(target: Mapping[str, Any], source: Mapping[str, Any], layers: Sequence[str],
          what: str) -> dict:
    """Returns `target` with the given layers taken from `source`; shapes must match exactly.

    Raises a ValueError naming every missing, unexpected or mis-shaped key, as big_vision's
    `merge_params` does, so a checkpoint of another model or class count is never half-loaded.
    """
    problems = []
    for layer in layers:
        if layer not in source:
            if layer in target:
                problems.append(f'{what}/{layer}: missing in the source checkpoint')
            continue
        if layer not in target:
            problems.append(f'{what}/{layer}: in the source checkpoint, not in the model')
            continue
        problems += differences(target[layer], source[layer], f'{what}/{layer}', 'source')
    if problems:
        raise ValueError('The source checkpoint does not fit this model:\n  '
                         + '\n  '.join(problems))
    merged = dict(target)
    for layer in layers:
        if layer in source:
            merged[layer] = jax.tree.map(
                lambda s, t: jax.numpy.asarray(s, dtype=t.dtype), source[layer], target[layer])
    return merged


def differences(model_tree: Any, checkpoint_tree: Any, prefix: str,
                checkpoint: str = 'source') -> list[str]:
    """Every key under `prefix` that `checkpoint_tree` (anything with `.shape` leaves, e.g.
    Orbax metadata) lacks, has in excess, or holds in another shape than `model_tree`."""
    src = dict(_flatten(checkpoint_tree, prefix))
    dst = dict(_flatten(model_tree, prefix))
    problems = []
    for key in sorted(set(src) | set(dst)):
        if key not in src:
            problems.append(f'{key}: missing in the {checkpoint} checkpoint')
        elif key not in dst:
            problems.append(f'{key}: in the {checkpoint} checkpoint, not in the model')
        elif tuple(src[key].shape) != tuple(dst[key].shape):
            problems.append(f'{key}: {checkpoint} shape {tuple(src[key].shape)} != model shape '
                            f'{tuple(dst[key].shape)}')
    return problems


def _flatten(tree, prefix):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        yield prefix + ''.join(f'/{getattr(p, "key", p)}' for p in path), leaf
