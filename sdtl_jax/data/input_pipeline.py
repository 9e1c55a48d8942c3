"""grain pipelines over ArrayRecord shards: train (sharded per process, reshuffled per epoch), eval.

Train (`train_dataset`), per process:

    records (reader.RecordReader) -> [subset] -> shuffle (seed, epoch) -> this process's part
    of the epoch -> repeat forever -> augmentation (random_map; a corrupt record raises, or is
    replaced) -> batch(global_batch // process_count) -> read threads -> [worker processes]

Every epoch is a fresh permutation of the whole split (grain's `shuffle` seeds each epoch with
`shuffle_seed + epoch`; the shuffle seed is hashed from `seed`, so runs with seeds 0 and 1 do not
see the same orders one epoch apart). Of each epoch's order, the first
`steps_per_epoch * global_batch` positions are used (the recipe drops the last partial batch,
docs/paper.md §4) and process p takes positions p, p + P, p + 2P, ...: the processes read
disjoint parts whose union is the epoch, and every process ends each epoch after exactly
`steps_per_epoch` batches, so epochs line up with steps. Augmentation randomness is drawn from
(seed, process, position in the stream), so it does not depend on threads or workers.

The iterator supports `get_state()` / `set_state()`, which the checkpoint saves. Batches are
made by stream position first; `num_threads` threads each prepare whole batches, in
`num_workers` worker processes (grain `mp_prefetch`, worker w making batches w, w + W, ...,
interleaved back in order) or in this process (`num_workers=0`). So the batches do not depend
on either count, though a resumed run must keep the worker count (the state holds one position
per worker). Measured on 2 cores (bench/RESULTS.md): the per-image Python work makes the GIL
the limit of threads, and one worker process per core is faster.

Eval (`eval_batches`): process p reads examples p, p + P, ...; batches are padded (mask False)
and every process yields the same number of batches, so every image is seen exactly once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from sdtl_jax.data import reader, sources
from sdtl_jax.data.augment import eval_view, pipelines

# Tags that make the derived seeds of the shuffle and the augmentation independent (the
# subset's is in subsets.py).
_SHUFFLE, _AUGMENT = 0, 1


def _derive_seed(seed: int, *tags: int) -> int:
    """A uint32 seed hashed from (seed, *tags)."""
    return int(np.random.SeedSequence([int(seed), *map(int, tags)]).generate_state(1)[0])


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full global batches per epoch; the last partial batch is dropped (docs/paper.md §4)."""
    return num_examples // global_batch


def _per_process_batch(global_batch: int, process_count: int) -> int:
    if global_batch <= 0 or global_batch % process_count:
        raise ValueError(f'global_batch={global_batch} must be a positive multiple of the '
                         f'process count ({process_count})')
    return global_batch // process_count


class Subset:
    """A fixed subset of a random-access source (the reduced real sets of Table 6; the
    images `analyze` samples)."""

    def __init__(self, source: Any, indices: Sequence[int]):
        self._source, self._indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> Any:
        return self._source[int(self._indices[index])]


def _records(split: sources.DatasetSplit,
             indices: Sequence[int] | None) -> reader.RecordReader | Subset:
    """The split's records, or only its records `indices`."""
    source = reader.RecordReader(split)
    return source if indices is None else Subset(source, indices)


def train_records(split: sources.DatasetSplit, *, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  indices: Sequence[int] | None = None) -> grain.MapDataset:
    """This process's infinite stream of records (`reader.RecordReader` elements), in
    per-epoch shuffled order.

    Element j of the stream is position `process_index + (j % n) * process_count` of epoch
    `j // n`'s permutation, with `n = steps_per_epoch * global_batch // process_count`.
    `indices` restricts the split to those records (`subsets.select`, the same in every
    process).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index={process_index} outside [0, {process_count})')
    _per_process_batch(global_batch, process_count)
    source = _records(split, indices)
    num_steps = steps_per_epoch(len(source), global_batch)
    if num_steps == 0:
        raise ValueError(f'{split.name}:{split.split} has {len(source)} examples, fewer than '
                         f'one global batch ({global_batch})')
    ds = grain.MapDataset.source(source).shuffle(seed=_derive_seed(seed, _SHUFFLE))
    # A slice of a MapDataset maps index j to epoch j // len(slice) of its parent, so after
    # `repeat` epoch e of this process reads its part of the shuffle's epoch e.
    ds = ds[process_index:num_steps * global_batch:process_count]
    return ds.repeat()


def resolve_num_workers(num_workers: int) -> int:
    """-1 (the default): one worker process per CPU core this process may use."""
    return len(os.sched_getaffinity(0)) if num_workers < 0 else num_workers


def train_dataset(split: sources.DatasetSplit, *, global_batch: int, seed: int,
                  aug: Mapping[str, Any] | Any, process_index: int = 0, process_count: int = 1,
                  num_threads: int = 2, num_workers: int = 0,
                  prefetch_buffer_size: int | None = None,
                  indices: Sequence[int] | None = None, skip_corrupt: bool = False,
                  skip_log: str | None = None) -> grain.IterDataset:
    """The infinite training pipeline of one process.

    Args:
      split: from `sources.resolve`.
      global_batch: batch over all processes; each yields `global_batch // process_count`.
      seed: the run's seed (shuffle and augmentation seeds derive from it).
      aug: dict-like config of the augmentation (`pipelines.build`): `name` (default
        multi-crop) and its arguments.
      process_index, process_count: `jax.process_index()`, `jax.process_count()`.
      num_threads: decode/augment threads (per worker process).
      num_workers: worker processes; 0 = none, -1 = one per CPU core.
      prefetch_buffer_size: batches prepared ahead per worker (default: threads + 1).
      indices: train on these records only (`subsets.select`; None: all).
      skip_corrupt: replace records that do not decode by a random readable one of the
        training set (else they raise, naming shard and record).
      skip_log: file to which every skipped record's location is appended.

    Returns:
      An IterDataset of {'global': uint8[b, G, S, S, 3], 'global_ops': float32[b, G, K],
      'local': uint8[b, L, s, s, 3], 'local_ops' (multi-crop with L > 0), 'label': int32[b]}
      with b = global_batch // process_count; its iterator has get_state/set_state.
    """
    batch = _per_process_batch(global_batch, process_count)
    ds = train_records(split, global_batch=global_batch, seed=seed, process_index=process_index,
                       process_count=process_count, indices=indices)
    transform = reader.SkipCorrupt(pipelines.build(aug), skip=skip_corrupt, log_path=skip_log,
                                   substitutes=_records(split, indices))
    ds = ds.random_map(transform, seed=_derive_seed(seed, _AUGMENT, process_index))
    # Batches are formed by stream position, before any thread or worker sees them: batch k
    # is elements [k b, (k + 1) b) whatever the thread and worker counts.
    ds = ds.batch(batch, drop_remainder=True)
    ds = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size or num_threads + 1))
    num_workers = resolve_num_workers(num_workers)
    if num_workers:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                         per_worker_buffer_size=2))
    return ds


def num_eval_batches(num_examples: int, global_batch: int, process_count: int = 1) -> int:
    """Batches every process yields for an eval split (the last ones padded)."""
    batch = _per_process_batch(global_batch, process_count)
    return math.ceil(math.ceil(num_examples / process_count) / batch)


def eval_batches(split: sources.DatasetSplit, *, global_batch: int, resize: int, crop: int,
                 process_index: int = 0, process_count: int = 1, num_threads: int = 8,
                 skip_corrupt: bool = False, skip_log: str | None = None,
                 indices: Sequence[int] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Every image of `split` (or its records `indices`) once over all processes, in order,
    padded to full batches.

    Yields {'image': uint8[b, crop, crop, 3], 'label': int32[b], 'mask': bool[b]} with
    b = global_batch // process_count; padding has mask False, label 0 and a black image.
    Every process yields `num_eval_batches(...)` batches; skipped records become padding.
    """
    batch = _per_process_batch(global_batch, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index={process_index} outside [0, {process_count})')
    source = _records(split, indices)
    total = num_eval_batches(len(source), global_batch, process_count)
    ds = grain.MapDataset.source(source)[process_index::process_count]
    transform = reader.SkipCorruptMap(eval_view.EvalTransform(resize=resize, crop=crop),
                                   skip=skip_corrupt, log_path=skip_log)
    ds = ds.map(transform).filter(lambda element: element is not None)
    # Two batches ahead keeps every thread busy without holding many decoded images.
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                              prefetch_buffer_size=max(2 * batch, num_threads)))
    ds = ds.batch(batch)
    iterator = iter(ds)
    done = 0
    try:
        for b in iterator:
            yield _pad(b, batch, crop)
            done += 1
        for _ in range(total - done):
            yield _pad(None, batch, crop)
    finally:
        iterator.close()


def _pad(b: dict[str, np.ndarray] | None, batch: int, crop: int) -> dict[str, np.ndarray]:
    out = {'image': np.zeros((batch, crop, crop, 3), np.uint8),
           'label': np.zeros((batch,), np.int32), 'mask': np.zeros((batch,), bool)}
    if b is not None:
        n = len(b['label'])
        out['image'][:n] = b['image']
        out['label'][:n] = b['label']
        out['mask'][:n] = True
    return out
