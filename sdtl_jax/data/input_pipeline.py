"""grain pipelines over ArrayRecord shards: train (sharded per process, reshuffled per epoch), eval.

Train (`train_dataset`), per process:

    source -> shuffle (seed, epoch) -> this process's part of the epoch -> repeat forever
           -> MultiCrop (random_map) -> read threads -> batch(global_batch // process_count)

Every epoch is a fresh permutation of the whole split (grain's `shuffle` seeds each epoch with
`shuffle_seed + epoch`; the shuffle seed is hashed from `seed`, so runs with seeds 0 and 1 do not
see the same orders one epoch apart). Of each epoch's order, the first
`steps_per_epoch * global_batch` positions are used (the recipe drops the last partial batch,
SPEC.md section 4) and process p takes positions p, p + P, p + 2P, ...: the processes read
disjoint parts whose union is the epoch, and every process ends each epoch after exactly
`steps_per_epoch` batches, so epochs line up with steps. Augmentation randomness is drawn from
(seed, process, position in the stream), so it does not depend on the number of threads.

The iterator supports `get_state()` / `set_state()` (a few integers), which the checkpoint saves.
Decoding and cropping run in in-process threads (TRAPS.md: on 2 cores threads beat worker
processes; PIL releases the GIL while it decodes and resamples).

Eval (`eval_batches`): process p reads examples p, p + P, ...; batches are padded (mask False)
and every process yields the same number of batches, so every image is seen exactly once.

    python -m sdtl_jax.data.input_pipeline --data=digits_real --global_batch=64   # images/s
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from sdtl_jax.data import sources, transforms

# Tags that make the derived seeds of the shuffle, the augmentation and the subset independent.
_SHUFFLE, _AUGMENT, _SUBSET = 0, 1, 2


def _derive_seed(seed: int, *tags: int) -> int:
    """A uint32 seed hashed from (seed, *tags)."""
    return int(np.random.SeedSequence([int(seed), *map(int, tags)]).generate_state(1)[0])


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full global batches per epoch; the last partial batch is dropped (SPEC.md section 4)."""
    return num_examples // global_batch


def _per_process_batch(global_batch: int, process_count: int) -> int:
    if global_batch <= 0 or global_batch % process_count:
        raise ValueError(f'global_batch={global_batch} must be a positive multiple of the '
                         f'process count ({process_count})')
    return global_batch // process_count


class _Subset:
    """A fixed subset of a random-access source (the reduced real sets of Table 6)."""

    def __init__(self, source: Any, indices: Sequence[int]):
        self._source, self._indices = source, np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> Any:
        return self._source[int(self._indices[index])]


def _open_source(split: sources.DatasetSplit) -> grain.sources.ArrayRecordDataSource:
    if not split.files:
        raise ValueError(f'{split.name}:{split.split} has no shard files')
    source = grain.sources.ArrayRecordDataSource(list(split.files))
    if len(source) != split.num_examples:
        raise ValueError(f'{split.name}:{split.split}: the shards hold {len(source)} records, '
                         f'meta.json says {split.num_examples}; rewrite the dataset')
    return source


def subset_indices(num_examples: int, max_examples: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded uniform random subset of `max_examples` examples."""
    rng = np.random.default_rng(_derive_seed(seed, _SUBSET))
    return np.sort(rng.choice(num_examples, size=max_examples, replace=False))


def train_records(split: sources.DatasetSplit, *, global_batch: int, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  max_examples: int | None = None) -> grain.MapDataset:
    """This process's infinite stream of raw records (bytes), in per-epoch shuffled order.

    Element j of the stream is position `process_index + (j % n) * process_count` of epoch
    `j // n`'s permutation, with `n = steps_per_epoch * global_batch // process_count`.
    `max_examples` keeps a seeded random subset of the split (the same in every process).
    """
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index={process_index} outside [0, {process_count})')
    _per_process_batch(global_batch, process_count)
    source = _open_source(split)
    if max_examples is not None and max_examples < len(source):
        source = _Subset(source, subset_indices(len(source), max_examples, seed))
    num_steps = steps_per_epoch(len(source), global_batch)
    if num_steps == 0:
        raise ValueError(f'{split.name}:{split.split} has {len(source)} examples, fewer than '
                         f'one global batch ({global_batch})')
    ds = grain.MapDataset.source(source).shuffle(seed=_derive_seed(seed, _SHUFFLE))
    # A slice of a MapDataset maps index j to epoch j // len(slice) of its parent, so after
    # `repeat` epoch e of this process reads its part of the shuffle's epoch e.
    ds = ds[process_index:num_steps * global_batch:process_count]
    return ds.repeat()


def _read_options(num_threads: int, prefetch_buffer_size: int | None,
                  batch: int) -> grain.ReadOptions:
    if prefetch_buffer_size is None:
        # Two batches ahead keeps every thread busy without holding many decoded crops.
        prefetch_buffer_size = max(2 * batch, 2 * num_threads)
    return grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size)


def train_dataset(split: sources.DatasetSplit, *, global_batch: int, seed: int,
                  aug: Mapping[str, Any] | Any, process_index: int = 0, process_count: int = 1,
                  num_threads: int = 8, prefetch_buffer_size: int | None = None,
                  max_examples: int | None = None) -> grain.IterDataset:
    """The infinite training pipeline of one process.

    Args:
      split: from `sources.resolve`.
      global_batch: batch over all processes; each yields `global_batch // process_count`.
      seed: the run's seed (shuffle, augmentation and subset seeds derive from it).
      aug: dict-like with `transforms.MultiCrop` arguments: global_size, local_size,
        num_global, num_local, global_scale, local_scale (others keep the SPEC defaults).
      process_index, process_count: `jax.process_index()`, `jax.process_count()`.
      num_threads: decode/augment threads.
      prefetch_buffer_size: elements decoded ahead (default: two batches).
      max_examples: train on a seeded random subset of this size (None: all).

    Returns:
      An IterDataset of {'global': uint8[b, G, S, S, 3], 'local': uint8[b, L, s, s, 3]
      (absent if L == 0), 'label': int32[b]}; its iterator has get_state/set_state.
    """
    batch = _per_process_batch(global_batch, process_count)
    ds = train_records(split, global_batch=global_batch, seed=seed, process_index=process_index,
                       process_count=process_count, max_examples=max_examples)
    ds = ds.random_map(transforms.multicrop_from_config(aug),
                       seed=_derive_seed(seed, _AUGMENT, process_index))
    ds = ds.to_iter_dataset(_read_options(num_threads, prefetch_buffer_size, batch))
    # Only the stacking runs in the caller's thread; decoding and cropping run ahead in the read
    # threads. (A ThreadPrefetchIterDataset on top gains little and its iterator's __del__
    # fails noisily at interpreter exit.)
    return ds.batch(batch, drop_remainder=True)


def num_eval_batches(num_examples: int, global_batch: int, process_count: int = 1) -> int:
    """Batches every process yields for an eval split (the last ones padded)."""
    batch = _per_process_batch(global_batch, process_count)
    return math.ceil(math.ceil(num_examples / process_count) / batch)


def eval_batches(split: sources.DatasetSplit, *, global_batch: int, resize: int, crop: int,
                 process_index: int = 0, process_count: int = 1,
                 num_threads: int = 8) -> Iterator[dict[str, np.ndarray]]:
    """Every image of `split` once (over all processes), in order, padded to full batches.

    Yields {'image': uint8[b, crop, crop, 3], 'label': int32[b], 'mask': bool[b]} with
    b = global_batch // process_count; padding has mask False, label 0 and a black image.
    Every process yields `num_eval_batches(...)` batches.
    """
    batch = _per_process_batch(global_batch, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f'process_index={process_index} outside [0, {process_count})')
    source = _open_source(split)
    total = num_eval_batches(len(source), global_batch, process_count)
    ds = grain.MapDataset.source(source)[process_index::process_count]
    ds = ds.map(transforms.EvalTransform(resize=resize, crop=crop))
    ds = ds.to_iter_dataset(_read_options(num_threads, None, batch)).batch(batch)
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


def _benchmark(argv: Sequence[str] | None = None) -> None:
    """Prints the train pipeline's images/s (one image = all of its crops)."""
    import argparse
    import os
    import time

    parser = argparse.ArgumentParser(description=_benchmark.__doc__)
    parser.add_argument('--data', default='digits_real', help='registered name or dataset dir')
    parser.add_argument('--split', default='train')
    parser.add_argument('--data_dir', default='')
    parser.add_argument('--global_batch', type=int, default=64)
    parser.add_argument('--num_batches', type=int, default=50)
    parser.add_argument('--num_threads', type=int, default=8)
    parser.add_argument('--global_size', type=int, default=None, help='default 32 digits/224')
    parser.add_argument('--local_size', type=int, default=None, help='default 16 digits/96')
    parser.add_argument('--num_local', type=int, default=8)
    args = parser.parse_args(argv)
    small = args.data.startswith('digits')
    aug = {'global_size': args.global_size or (32 if small else 224),
           'local_size': args.local_size or (16 if small else 96), 'num_local': args.num_local}
    if os.path.isdir(args.data):  # any dataset directory, registered or not
        split = sources.split_from_dir(args.data, args.split)
    else:
        split = sources.resolve(args.data, args.data_dir or None, args.split)
    iterator = iter(train_dataset(split, global_batch=args.global_batch, seed=0, aug=aug,
                                  num_threads=args.num_threads))
    next(iterator)  # warm-up: threads start, first shards open
    start = time.perf_counter()
    for _ in range(args.num_batches):
        batch = next(iterator)
    elapsed = time.perf_counter() - start
    shapes = {k: (v.shape, str(v.dtype)) for k, v in batch.items()}
    print(f'{args.data}:{args.split} {shapes}')
    print(f'{args.num_batches * args.global_batch / elapsed:.0f} images/s '
          f'({args.num_batches} batches of {args.global_batch}, {args.num_threads} threads)')


if __name__ == '__main__':
    _benchmark()
