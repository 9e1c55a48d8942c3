"""Reduced training sets (Table 6): a seeded random subset of a split, drawn once per workdir.

`data.train_fraction = 1/2^x` keeps fraction * n records (halves rounded up), drawn uniformly
over the whole split (docs/paper.md §9), or per class with `data.stratified=True` (every class
keeps its share; the rounding remainder goes to the classes with the largest fractional parts).
The draw depends only on (seed, split size, fraction, stratified, labels), so every host and
every resume computes the same subset. It is stored in the workdir (`train_subset.json`: the
indices of the chosen records in the split, with the settings that drew them) and a later run
in that workdir must agree with it.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from sdtl_jax import fileio
from sdtl_jax.data import layout, records, sources
from sdtl_jax.errors import UserError

SUBSET_FILE = 'train_subset.json'
_SUBSET_TAG = 2   # keeps this seed independent of the shuffle's and the augmentation's
# What each setting stored with a subset is called in the config.
_CONFIG_KEYS = {'dataset': 'config.data.train', 'split': 'config.data.train_split',
                'num_examples': 'the records in config.data.train',
                'fraction': 'config.data.train_fraction', 'stratified': 'config.data.stratified',
                'seed': 'config.seed', 'max_examples': 'config.data.max_train_examples'}


class SubsetMismatchError(UserError, ValueError):
    """The workdir's stored subset was drawn with other settings than this run's. A ValueError
    too, for the callers that catch it as one."""


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SUBSET_TAG]))


def subset_size(num_examples: int, fraction: float, max_examples: int | None = None) -> int:
    """fraction * n rounded half up, at least 1, at most `max_examples`."""
    if not 0 < fraction <= 1:
        raise ValueError(f'data.train_fraction must be in (0, 1], got {fraction}')
    size = max(1, int(np.floor(fraction * num_examples + 0.5)))
    return min(size, max_examples) if max_examples is not None else size


def uniform(num_examples: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of `size` records drawn uniformly without replacement."""
    return np.sort(_rng(seed).choice(num_examples, size=size, replace=False))


def stratified(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of `size` records, each class keeping its share of the split."""
    labels = np.asarray(labels)
    rng = _rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (size / len(labels))
    take = np.floor(quota).astype(int)
    # The remainder goes to the largest fractional parts; ties are broken at random.
    order = np.lexsort((rng.random(len(classes)), -(quota - take)))
    take[order[:size - take.sum()]] += 1
    chosen = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False)
              for c, k in zip(classes, take)]
    return np.sort(np.concatenate(chosen))


def split_labels(split: sources.DatasetSplit) -> np.ndarray:
    """The label of every record, from the `<split>.labels.npy` sidecar when the dataset has
    one, else read from the records (datasets written before the sidecar existed)."""
    dataset_dir = os.path.dirname(split.files[0])
    labels = layout.read_labels(dataset_dir, split.split)
    if labels is not None:
        return np.asarray(labels)
    from sdtl_jax.data import reader

    source = reader.RecordReader(split)
    return np.array([records.decode_record(source[i]['record'])['label']
                     for i in range(len(source))], np.int64)


def select(split: sources.DatasetSplit, *, fraction: float, stratify: bool, seed: int,
           max_examples: int | None = None, workdir: str | None = None,
           write: bool = True) -> np.ndarray | None:
    """The record indices a run trains on, or None for the whole split.

    With `workdir`, the choice is stored there (if `write`; process 0 writes) or checked
    against the one stored by an earlier run: resuming with another fraction, seed or dataset
    is an error naming both.
    """
    size = subset_size(split.num_examples, fraction, max_examples)
    if size >= split.num_examples:
        return None
    if stratify:
        indices = stratified(split_labels(split), size, seed)
    else:
        indices = uniform(split.num_examples, size, seed)
    if workdir:
        _store_or_check(os.path.join(workdir, SUBSET_FILE), indices, write=write, description={
            'dataset': split.name, 'split': split.split, 'num_examples': split.num_examples,
            'fraction': fraction, 'stratified': stratify, 'seed': seed,
            'max_examples': max_examples})
    return indices


def _store_or_check(path: str, indices: np.ndarray, *, write: bool,
                    description: dict[str, Any]) -> None:
    if fileio.exists(path):
        stored = json.loads(fileio.read_text(path))
        if stored['indices'] != indices.tolist():
            raise SubsetMismatchError(_mismatch_message(path, stored, description))
    elif write:
        fileio.write_text(path, json.dumps(
            {**description, 'size': len(indices), 'indices': indices.tolist()}))


def _mismatch_message(path: str, stored: dict[str, Any], description: dict[str, Any]) -> str:
    """Names the settings that differ, as config keys, with the stored and the new value."""
    changed = [f'{_CONFIG_KEYS[k]}={stored.get(k)!r} there, {description[k]!r} here'
               for k in description if stored.get(k) != description[k]]
    # Same settings, other records: the split was rewritten with as many records, or the draw
    # itself changed with sdtl_jax.
    why = '; '.join(changed) or f'the same settings ({description}) draw other records now'
    return (f'{path} holds another training subset than this run draws ({why}); rerun with '
            f'the settings it was drawn with, or use a new --workdir')
