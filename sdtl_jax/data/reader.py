"""Random access to a split's shards that knows where every record lives, and skips bad ones
only when asked to.

`RecordReader` opens every shard up front, so an unreadable shard fails before training with
its path; each element carries its location ('<shard>, record <i>'), so a record that does not
decode stops training with an error naming shard and record (`records.CorruptRecordError`).
With `data.skip_corrupt=True`, such records are skipped instead (in training a random readable
record takes the place in the batch; in evaluation the place becomes padding) and each is
appended to a log in the workdir (`skipped_records.txt`), which the run counts into its
results: nothing is dropped silently. Every process and worker appends to the log (O_APPEND
writes of one line are atomic), so it also works with worker processes. A bucket has no
appends: with a gs:// workdir each process logs to a local file that `SkipLog.sync` uploads as
`skipped_records.process_<i>.txt` after every evaluation.
"""

from __future__ import annotations

import bisect
import os
import tempfile
from typing import Any

import grain
import numpy as np
from absl import logging

from sdtl_jax import fileio
from sdtl_jax.data import records, sources

SKIP_LOG = 'skipped_records.txt'


class RecordReader:
    """The records of one split: {'record': bytes | None, 'where', 'num_classes', 'error'}."""

    def __init__(self, split: sources.DatasetSplit):
        if not split.files:
            raise ValueError(f'{split.name}:{split.split} has no shard files')
        from array_record.python import array_record_module

        counts = []
        for path in split.files:
            try:
                reader = array_record_module.ArrayRecordReader(path)
                counts.append(reader.num_records())
                reader.close()
            except Exception as e:  # array_record raises RuntimeError/ValueError variants
                raise ValueError(f'Cannot read shard {path} of {split.name}:{split.split} '
                                 f'({type(e).__name__}: {e}); re-import the dataset') from e
        if sum(counts) != split.num_examples:
            raise ValueError(f'{split.name}:{split.split}: the shards hold {sum(counts)} '
                             f'records, meta.json says {split.num_examples}; re-import it')
        self._files = list(split.files)
        self._starts = np.cumsum([0] + counts[:-1]).tolist()
        self._num_classes = len(split.classes)
        self._source = grain.sources.ArrayRecordDataSource(self._files)

    def __len__(self) -> int:
        return len(self._source)

    def where(self, index: int) -> str:
        """'<shard path>, record <i>' of a record's global index."""
        shard = bisect.bisect_right(self._starts, index) - 1
        return f'{self._files[shard]}, record {index - self._starts[shard]}'

    def __getitem__(self, index: int) -> dict[str, Any]:
        element = {'record': None, 'where': self.where(index),
                   'num_classes': self._num_classes, 'error': ''}
        try:
            element['record'] = self._source[index]
        except Exception as e:  # a damaged chunk inside a shard that opened fine
            element['error'] = f'{type(e).__name__}: {e}'
        return element

    def __repr__(self) -> str:
        return f'RecordReader({len(self._files)} shards, {len(self)} records)'


class _Guard:
    """Runs a transform on a reader element; a record that does not decode raises, naming
    shard and record, or (skip) is logged and replaced by `substitute()` (None if absent)."""

    def __init__(self, transform: Any, *, skip: bool, log_path: str | None):
        self.transform, self.skip, self.log_path = transform, skip, log_path

    def _guarded(self, apply, element: dict[str, Any], substitute=None) -> Any:
        try:
            if element.get('error'):
                raise records.CorruptRecordError(
                    f'Cannot read the record at {element["where"]}: {element["error"]}')
            return apply(element)
        except records.CorruptRecordError as e:
            if not self.skip:
                raise records.CorruptRecordError(
                    f'{e}. Re-import the dataset, or set --config.data.skip_corrupt=True to '
                    f'skip such records (each is logged to {SKIP_LOG} in the workdir).') from e
            logging.warning('Skipping a corrupt record: %s', e)
            if self.log_path:
                line = f'{element["where"]}\t{str(e).replace(chr(10), " ")}\n'.encode()
                fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line)
                finally:
                    os.close(fd)
            return substitute() if substitute else None


class SkipCorrupt(_Guard, grain.transforms.RandomMap):
    """`_Guard` around a random transform (training augmentation). A skipped record's place in
    the batch goes to a record drawn at random from `substitutes` (the training set), so every
    batch stays full and epochs stay aligned with steps."""

    _MAX_TRIES = 100

    def __init__(self, transform: Any, *, skip: bool, log_path: str | None, substitutes: Any):
        super().__init__(transform, skip=skip, log_path=log_path)
        self.substitutes = substitutes

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> Any:
        return self._guarded(lambda e: self.transform.random_map(e, rng), element,
                             lambda: self._substitute(element, rng))

    def _substitute(self, element: dict[str, Any], rng: np.random.Generator) -> Any:
        for _ in range(self._MAX_TRIES):
            other = self.substitutes[int(rng.integers(len(self.substitutes)))]
            if other.get('error'):
                continue
            try:
                return self.transform.random_map(other, rng)
            except records.CorruptRecordError:
                continue
        raise records.CorruptRecordError(
            f'{self._MAX_TRIES} random records in a row do not decode (drawn to replace '
            f'{element["where"]}); the dataset is broken: re-import it')


class SkipCorruptMap(_Guard, grain.transforms.Map):
    """`_Guard` around a deterministic transform (evaluation)."""

    def map(self, element: dict[str, Any]) -> Any:
        return self._guarded(self.transform.map, element)


class SkipLog:
    """Where one process logs skipped records: `path`, a local file its grain workers append to.

    In a local workdir that is the workdir's SKIP_LOG itself and `sync` does nothing. In a
    remote one it is a local copy, seeded from the bucket (a run resumed on another machine
    keeps its log), that `sync` uploads as skipped_records.process_<i>.txt.
    """

    def __init__(self, workdir: str, process_index: int):
        if not fileio.is_remote(workdir):
            self.path, self.remote = os.path.join(workdir, SKIP_LOG), None
            return
        self.remote = f'{workdir.rstrip("/")}/{_REMOTE_SKIP_LOG.format(process_index)}'
        self.path = os.path.join(tempfile.mkdtemp(prefix='sdtl_skip_log_'), SKIP_LOG)
        if fileio.exists(self.remote):
            with open(self.path, 'w') as f:
                f.write(fileio.read_text(self.remote))

    def sync(self) -> None:
        if self.remote and os.path.exists(self.path):
            with open(self.path, 'rb') as f:
                fileio.write_bytes(self.remote, f.read())


_REMOTE_SKIP_LOG = 'skipped_records.process_{}.txt'


def count_skipped(workdir: str) -> int:
    """Records skipped so far by the runs in `workdir` (distinct locations)."""
    where = set()
    for path in fileio.glob(workdir, 'skipped_records*.txt'):
        where.update(line.split('\t', 1)[0]
                     for line in fileio.read_text(path).splitlines() if line.strip())
    return len(where)
