r"""Writing shards: the one engine every writer of a dataset uses.

- `write_planned`: shards named up front, each written under a temporary name and renamed when
  complete, so a finished shard is one whose final name exists; `ordered_map` produces the
  records in parallel and in order; `publish_split` writes the labels, then the meta.json entry
  that makes the split visible. The importers (`write_split`, below) and the Stable Diffusion
  generator (`generate/generator.py`, which adds workers and a merge) are built on them.
- `ShardWriter`: a small split written in one go (the digits demo, benchmarks), its shard count
  known only at the end.

An importer lists its inputs as `Item`s (a file, a tar member, a TFDS record) in a fixed order,
and gives a `load(item)` that returns the record to store. `write_split` then

- plans the shards up front, one per `items_per_shard` consecutive items, so their number and
  names `<split>-NNNNN-of-MMMMM.array_record` are known before any is written;
- writes each shard under a temporary name and renames it when complete, recording it in
  `<split>.progress.json` (the item list's fingerprint and, per shard, its labels and
  unreadable files). A killed import resumes at the first unfinished shard; an import whose
  input changed starts over (and first drops the split from meta.json, so that readers never
  see a mix of old and new shards);
- finishes by writing `<split>.labels.npy`, `<split>_unreadable.txt` (path TAB reason, one line
  per input that could not be read, absent when there is none) and the split's entry in
  meta.json, then deletes the progress file.

Nothing is dropped silently: unreadable inputs are listed, and inputs that `load` skips on
purpose (e.g. TFDS records of classes outside the list) are counted in the summary line.
Loading and checking one input is `images.py`'s.

One odd input never stops an import: a file that cannot be read, decoded or stored is listed
in `<split>_unreadable.txt`, whose lines are UTF-8 with tabs and line breaks escaped and the
bytes of a name that is not valid UTF-8 written as `\xNN` (`records.printable`). Such a name
that is readable is stored: the record's `id` shows it escaped the same way and its
`id_bytes` holds the exact bytes (`records.record_id`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import tqdm

from sdtl_jax import fileio, metrics_io
from sdtl_jax.data import layout, records
from sdtl_jax.datasets import images
from sdtl_jax.datasets.images import Example, Item, Skip

PROGRESS_VERSION = 1
T = TypeVar('T')


# --- The engine: shards planned up front, each written under a temporary name and renamed when
# complete (a finished shard is one whose final name exists), records produced in parallel and
# written in order, and the split published (labels, then meta.json) when all are there.

def write_planned(out_dir: str, split: str, files: Sequence[str], todo: Iterable[int],
                  fill: Callable[[int, Any], T],
                  finished: Callable[[int, T], None] = lambda index, summary: None) -> None:
    """Writes the shards `todo` of a split whose shard names are `files`, one after another.

    `fill(index, path)` writes shard `index` to `path`, its temporary name (with `open_shard`),
    and whatever must exist before the shard counts as finished, and returns its summary; the
    shard gets its final name only when `fill` returns, and then `finished(index, summary)` runs.
    A `fill` that raises leaves no file. Leftovers of killed writes of these shards are removed
    first.
    """
    todo = list(todo)
    for filename in os.listdir(out_dir):
        if any(layout.is_temporary_shard(split, filename, i) for i in todo):
            os.remove(os.path.join(out_dir, filename))
    for index in todo:
        tmp = os.path.join(out_dir, layout.temporary_shard_name(split, index))
        with fileio.atomic_path(os.path.join(out_dir, files[index]), tmp):
            summary = fill(index, tmp)
        finished(index, summary)


@contextlib.contextmanager
def open_shard(path: str):
    """An ArrayRecord writer on `path` with the shards' options, closed when the block ends."""
    from array_record.python import array_record_module

    writer = array_record_module.ArrayRecordWriter(path, layout.WRITER_OPTIONS)
    try:
        yield writer
    finally:
        writer.close()


def ordered_map(pool: concurrent.futures.Executor, fn: Callable[[Any], T], items: Iterable[Any],
                window: int) -> Iterator[tuple[Any, T]]:
    """(item, fn(item)) in the order of `items`, computed on `pool` with at most `window` items
    in flight: the threads stay busy while memory holds only `window` unwritten results.
    `items` may be lazy (a generator producing them batch by batch keeps producing while the
    pool works)."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            item, future = pending.popleft()
            yield item, future.result()
    while pending:
        item, future = pending.popleft()
        yield item, future.result()


def publish_split(out_dir: str, *, name: str, domain: str, classes: Sequence[str], split: str,
                  files: Sequence[str], labels: Sequence[int]) -> dict[str, Any]:
    """Writes `<split>.labels.npy`, then the split's meta.json entry, which makes it visible to
    readers; returns that entry."""
    info = {'files': list(files), 'num_examples': len(labels),
            'class_counts': layout.class_counts(labels, len(classes))}
    layout.write_labels(out_dir, split, labels)
    layout.add_split(out_dir, name=name, domain=domain, classes=classes, split=split, info=info)
    return info


def clear_split(out_dir: str, split: str, *, name: str, domain: str, classes: Sequence[str],
                also: Callable[[str], bool] = lambda filename: False) -> None:
    """Removes every trace of an earlier write of `split`: its meta.json entry first (so no
    reader sees old and new shards mixed), then its shards, temporary shards, labels.npy and
    the files `also` names (a writer's own bookkeeping)."""
    layout.remove_split(out_dir, name=name, domain=domain, classes=classes, split=split)
    labels = os.path.basename(layout.labels_path(out_dir, split))
    for filename in os.listdir(out_dir):
        if (layout.is_shard_of(split, filename) or layout.is_temporary_shard(split, filename)
                or filename == labels or also(filename)):
            os.remove(os.path.join(out_dir, filename))


# --- Importers: a list of inputs -> a split, resumable through <split>.progress.json.

def fingerprint(items: Iterable[Item], problems: Sequence[tuple[str, str]],
                settings: Mapping[str, Any]) -> str:
    """sha256 over the item list, the listing problems and the settings that shape the shards."""
    h = hashlib.sha256(json.dumps({'version': PROGRESS_VERSION, **settings},
                                  sort_keys=True).encode())
    for item in items:
        h.update(repr(tuple(item)).encode())
        h.update(b'\n')
    h.update(repr(list(problems)).encode())
    return h.hexdigest()


def _unreadable_path(out_dir: str, split: str) -> str:
    return os.path.join(out_dir, f'{split}_unreadable.txt')


def _progress_path(out_dir: str, split: str) -> str:
    return os.path.join(out_dir, f'{split}.progress.json')


def _load_progress(path: str, expected: str, num_shards: int,
                   out_dir: str) -> dict[str, dict[str, Any]] | None:
    """The finished shards of an interrupted import of the same input, else None."""
    try:
        with open(path) as f:
            progress = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    if (progress.get('fingerprint') != expected or progress.get('num_shards') != num_shards
            or not isinstance(progress.get('shards'), dict)):
        return None
    return {k: v for k, v in progress['shards'].items()
            if os.path.isfile(os.path.join(out_dir, v['file']))}


def _load_one(load: Callable[[Item], Example], item: Item) -> Example | Skip | str:
    try:
        return load(item)
    except Skip as e:
        return e
    except Exception as e:  # every failure is reported by path, with its reason
        return _reason(e)


def _reason(e: Exception) -> str:
    return f'{type(e).__name__}: {e}'.replace('\n', ' ').replace('\t', ' ')


def _write_shard(path: str, items: Sequence[Item], load: Callable[[Item], Example],
                 pool: concurrent.futures.Executor, window: int, num_classes: int,
                 bar: tqdm.tqdm, unreadable_before: int) -> dict[str, Any]:
    """Writes the records of `items` to `path`; returns the shard's progress entry."""
    labels, unreadable, skipped = [], [], {}
    with open_shard(path) as writer:
        for item, result in ordered_map(pool, lambda it: _load_one(load, it), items, window):
            if isinstance(result, Skip):
                skipped[str(result)] = skipped.get(str(result), 0) + 1
            elif isinstance(result, str):
                unreadable.append((item.source, result))
            elif not 0 <= result.label < num_classes:
                unreadable.append((item.source, f'label {result.label} outside the class '
                                                f'list [0, {num_classes})'))
            else:
                try:
                    record = records.encode_record(result.image, result.label, result.id,
                                                   result.meta)
                except Exception as e:  # e.g. a provenance sidecar msgpack cannot hold
                    result = _reason(e)
                    unreadable.append((item.source, f'cannot be stored: {result}'))
                else:
                    writer.write(record)
                    labels.append(int(result.label))
            bar.update()
            if isinstance(result, str):
                bar.set_postfix(unreadable=unreadable_before + len(unreadable), refresh=False)
    return {'labels': labels, 'unreadable': unreadable, 'skipped': skipped}


def write_split(out_dir: str | os.PathLike, items: Sequence[Item], *, name: str, domain: str,
                classes: Sequence[str], split: str,
                load: Callable[[Item], Example] = images.load_item,
                items_per_shard: int = layout.DEFAULT_RECORDS_PER_SHARD, num_threads: int = 8,
                problems: Sequence[tuple[str, str]] = (),
                settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Writes (or resumes writing) one split of `out_dir` from `items`; see the module docstring.

    Args:
      out_dir: the dataset directory.
      items: the inputs, in record order (a sequence: it is read once for the fingerprint and
        then by shard).
      load: item -> Example; raises `Skip` to leave an item out on purpose, any other exception
        for an unreadable item (listed with its reason).
      items_per_shard: inputs per shard, so at most that many records; an importer whose
        `load` skips most items passes more, for shards of the usual size.
      problems: (source, reason) found while listing the inputs (e.g. a bad annotation line);
        they go to the unreadable list.
      settings: anything else that shapes the output (part of the fingerprint).

    Returns:
      {'name', 'split', 'num_examples', 'files', 'class_counts', 'unreadable': [(source,
      reason)], 'skipped': {reason: count}, 'num_items', 'resumed_shards', 'seconds'}.
    """
    out_dir = os.fspath(out_dir)
    layout.check_split_name(split)
    if domain not in layout.DOMAINS:
        raise ValueError(f'domain must be one of {layout.DOMAINS}, got {domain!r}')
    if items_per_shard < 1:
        raise ValueError(f'items_per_shard must be >= 1, got {items_per_shard}')
    os.makedirs(out_dir, exist_ok=True)
    num_shards = max(1, -(-len(items) // items_per_shard))
    files = [layout.shard_name(split, i, num_shards) for i in range(num_shards)]
    settings = {'name': name, 'domain': domain, 'classes': list(classes),
                'items_per_shard': items_per_shard, **(settings or {})}
    expected = fingerprint(items, problems, settings)
    progress_path = _progress_path(out_dir, split)
    done = _load_progress(progress_path, expected, num_shards, out_dir)
    if done is None:
        unreadable = os.path.basename(_unreadable_path(out_dir, split))
        clear_split(out_dir, split, name=name, domain=domain, classes=classes,
                    also=lambda filename: filename == unreadable)
        done = {}
    todo = [i for i in range(num_shards) if str(i) not in done]
    resumed = num_shards - len(todo)
    start = time.time()
    initial = sum(min(items_per_shard, len(items) - int(i) * items_per_shard) for i in done)
    num_unreadable = sum(len(s['unreadable']) for s in done.values())
    bar = metrics_io.Progress(total=len(items), initial=initial, desc=f'{name}/{split}',
                              unit='img', dynamic_ncols=True, mininterval=1.0, file=sys.stderr,
                              postfix={'unreadable': num_unreadable})
    with bar, concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        def fill(index: int, path: str) -> dict[str, Any]:
            part = items[index * items_per_shard:(index + 1) * items_per_shard]
            return _write_shard(path, part, load, pool, 4 * num_threads, len(classes), bar,
                                num_unreadable)

        def finished(index: int, info: dict[str, Any]) -> None:
            nonlocal num_unreadable
            done[str(index)] = {'file': files[index], **info}
            num_unreadable += len(info['unreadable'])
            fileio.write_json(progress_path, {'fingerprint': expected, 'num_shards': num_shards,
                                              'shards': done}, compact=True)

        write_planned(out_dir, split, files, todo, fill, finished)
    return _finish(out_dir, [done[str(i)] for i in range(num_shards)], problems, name=name,
                   domain=domain, classes=classes, split=split, num_items=len(items),
                   resumed=resumed, num_read=len(items) - initial, seconds=time.time() - start)


def _finish(out_dir: str, shards: list[dict[str, Any]], problems: Sequence[tuple[str, str]],
            *, name: str, domain: str, classes: Sequence[str], split: str, num_items: int,
            resumed: int, num_read: int, seconds: float) -> dict[str, Any]:
    """Labels, unreadable list and meta.json entry of a split whose shards are all written."""
    labels = [label for shard in shards for label in shard['labels']]
    unreadable = [tuple(p) for p in problems]
    unreadable += [tuple(u) for shard in shards for u in shard['unreadable']]
    skipped: dict[str, int] = {}
    for shard in shards:
        for reason, count in shard['skipped'].items():
            skipped[reason] = skipped.get(reason, 0) + count
    unreadable_path = _unreadable_path(out_dir, split)
    if unreadable:
        # One line per input, whatever its name (records.printable): a name that is not UTF-8
        # or holds a tab or line break would otherwise fail the write or break the format.
        with open(unreadable_path, 'w', encoding='utf-8') as f:
            f.writelines(f'{records.printable(source)}\t{records.printable(reason)}\n'
                         for source, reason in unreadable)
    elif os.path.exists(unreadable_path):
        os.remove(unreadable_path)
    info = publish_split(out_dir, name=name, domain=domain, classes=classes, split=split,
                         files=[s['file'] for s in shards], labels=labels)
    os.remove(_progress_path(out_dir, split))
    rate = (num_read / seconds) if seconds > 0 else 0.0
    line = (f'[{name}/{split}] {len(labels):,} records in {len(shards)} shards from '
            f'{num_items:,} inputs ({resumed} shards resumed), {num_read:,} read in '
            f'{seconds:.1f} s, {rate:,.0f}/s; {len(unreadable):,} unreadable')
    if unreadable:
        line += f' (listed in {records.printable(unreadable_path)})'
    for reason, count in sorted(skipped.items()):
        line += f'; {count:,} skipped: {reason}'
    print(line, flush=True)
    return {'name': name, 'split': split, 'num_examples': len(labels), 'files': info['files'],
            'class_counts': info['class_counts'], 'unreadable': unreadable, 'skipped': skipped,
            'num_items': num_items, 'resumed_shards': resumed, 'seconds': seconds}


def warn_count(name: str, split: str, got: int, expected: int) -> None:
    """Warns when a split of the real data has another size than the published one."""
    if got != expected:
        print(f'warning: [{name}/{split}] {got:,} records, the full dataset has {expected:,}',
              file=sys.stderr, flush=True)


class ShardWriter:
    """Writes the records of one split into `<split>-NNNNN-of-MMMMM.array_record` shards.

    Shards are written under temporary names and get their final names only in `close()`, once
    the shard count is known, so a crash never leaves a complete-looking but truncated dataset.
    Older shards of the same split are removed then, and `<split>.labels.npy` is written. Use as
    a context manager, or call `close()`; its result is the split entry of `meta.json`.
    """

    def __init__(self, dataset_dir: str | os.PathLike, split: str, *, num_classes: int,
                 records_per_shard: int = layout.DEFAULT_RECORDS_PER_SHARD):
        layout.check_split_name(split)
        if records_per_shard < 1:
            raise ValueError(f'records_per_shard must be >= 1, got {records_per_shard}')
        self.dataset_dir = os.fspath(dataset_dir)
        self.split = split
        self.num_classes = int(num_classes)
        self.records_per_shard = int(records_per_shard)
        self._tmp_files: list[str] = []
        self._writer = None
        self._in_shard = 0
        self._labels: list[int] = []
        self.num_examples = 0
        self._closed = False
        os.makedirs(self.dataset_dir, exist_ok=True)

    def _open_next(self) -> None:
        # Imported here so that reading records (e.g. in tests of the format) needs no reader lib.
        from array_record.python import array_record_module

        path = os.path.join(self.dataset_dir,
                            layout.temporary_shard_name(self.split, len(self._tmp_files)))
        self._tmp_files.append(path)
        self._writer = array_record_module.ArrayRecordWriter(path, layout.WRITER_OPTIONS)
        self._in_shard = 0

    def write(self, image: bytes, label: int, id: str,
              meta: Mapping[str, Any] | None = None) -> None:
        """Appends one example."""
        if self._closed:
            raise RuntimeError('ShardWriter is closed')
        if not 0 <= int(label) < self.num_classes:
            raise ValueError(f'label {label} of {id!r} outside [0, {self.num_classes})')
        if self._writer is None or self._in_shard >= self.records_per_shard:
            self._close_current()
            self._open_next()
        self._writer.write(records.encode_record(image, label, id, meta))
        self._in_shard += 1
        self._labels.append(int(label))
        self.num_examples += 1

    def _close_current(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> dict[str, Any]:
        """Finishes the shards; returns `{'files', 'num_examples', 'class_counts'}`."""
        if self._closed:
            return self._info
        self._close_current()
        num_shards = len(self._tmp_files)
        files = [layout.shard_name(self.split, i, num_shards) for i in range(num_shards)]
        # Not `fileio.atomic_path`: a shard's final name holds the shard count, known only now.
        for tmp, name in zip(self._tmp_files, files):
            os.replace(tmp, os.path.join(self.dataset_dir, name))
        # Shards of an earlier write of this split (maybe another shard count) would be stale.
        for name in os.listdir(self.dataset_dir):
            if layout.is_shard_of(self.split, name) and name not in files:
                os.remove(os.path.join(self.dataset_dir, name))
        layout.write_labels(self.dataset_dir, self.split, self._labels)
        self._closed = True
        self._info = {'files': files, 'num_examples': self.num_examples,
                      'class_counts': layout.class_counts(self._labels, self.num_classes)}
        return self._info

    def abort(self) -> None:
        """Deletes the temporary shards written so far."""
        self._close_current()
        for tmp in self._tmp_files:
            if os.path.exists(tmp):
                os.remove(tmp)
        self._closed = True
        self._info = {}

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
