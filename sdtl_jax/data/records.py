r"""Record format, ArrayRecord shard writer and the `meta.json` sidecar of a dataset directory.

A dataset is a directory (see docs/architecture.md, "Data contract"):

    <data_dir>/<name>/meta.json
    <data_dir>/<name>/<split>-00000-of-00004.array_record
    <data_dir>/<name>/<split>.labels.npy      int32, one label per record, in shard order
    <data_dir>/<name>/<split>_unreadable.txt  importers: input path TAB reason, when any
    <data_dir>/<name>/<split>.progress.json   importers: only while the split is being written

Each record is a msgpack map `{"image": bytes, "label": int, "id": str, "meta": {...}}`, where
`image` holds encoded JPEG or PNG bytes and `meta` holds provenance (for generated images: the
generator, prompt, seed, ...). An id that is not valid UTF-8 (a file name such as b'bad\xff.jpg',
which Python lists as 'bad\udcff.jpg' with a surrogate escape) is stored losslessly: `id` then
shows the undecodable bytes as backslash escapes (the text `bad\xff.jpg`, see `printable`) and
the record gains `"id_bytes": bytes`, the exact name; `os.fsdecode(record['id_bytes'])` is the
name as `os.listdir` gives it. `meta.json` holds the name, the domain (`real` or `synth`), the
class list, and per split the shard file names (relative to the dataset directory), the number of
examples and the number of examples per class. `<split>.labels.npy` lets stratified subsets be
drawn without reading the shards; datasets written before it existed lack it (`read_labels`
then returns None).
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack
import numpy as np
from PIL import Image

from sdtl_jax import fileio

DOMAINS = ('real', 'synth')
META_FILE = 'meta.json'
# One record per group: grain reads records at random, and a group is the unit of decompression.
# Images are compressed already, so zstd on top only costs CPU.
WRITER_OPTIONS = 'group_size:1,uncompressed'
DEFAULT_RECORDS_PER_SHARD = 2048  # ImageNet JPEGs average ~110 KB: ~225 MB shards.

_SHARD_RE = r'-(\d{5})-of-(\d{5})\.array_record$'


def _utf8_bytes(text: str) -> bytes:
    """`text` as bytes: UTF-8, with surrogate escapes (undecodable bytes of a file name, as
    `os.fsdecode` makes them) turned back into those bytes; any other lone surrogate is kept as
    its 3-byte form."""
    try:
        return text.encode('utf-8', 'surrogateescape')
    except UnicodeEncodeError:
        return text.encode('utf-8', 'surrogatepass')


def printable(text: str) -> str:
    r"""`text` safe for a one-line, UTF-8 listing (`<split>_unreadable.txt`, messages).

    Valid UTF-8 is returned as is, except that tabs and line breaks become `\t`, `\n`, `\r`;
    the bytes of a name that is not valid UTF-8 become `\xNN` escapes, so the file name
    b'bad\xff\xfe.jpg' (which Python lists as 'bad\udcff\udcfe.jpg') reads `bad\xff\xfe.jpg`.
    Back from the escaped text to the name's bytes: `name_bytes` (exact unless the name itself
    holds a backslash followed by `x` and two hex digits, `t`, `n` or `r`).
    """
    text = str(text)
    try:
        text.encode('utf-8')
    except UnicodeEncodeError:
        text = _utf8_bytes(text).decode('utf-8', 'backslashreplace')
    return text.replace('\t', '\\t').replace('\n', '\\n').replace('\r', '\\r')


_ESCAPE = re.compile(rb'\\(x[0-9a-f]{2}|[tnr])')
_CONTROL = {b't': b'\t', b'n': b'\n', b'r': b'\r'}


def name_bytes(text: str) -> bytes:
    r"""The bytes of a name as `printable` escaped it, e.g. from `<split>_unreadable.txt`:
    `name_bytes('bad\xff.jpg') == b'bad\xff.jpg'`; `os.fsdecode` of them is the name as
    `os.listdir` gives it."""
    def unescape(m: re.Match) -> bytes:
        code = m.group(1)
        return bytes([int(code[1:], 16)]) if code.startswith(b'x') else _CONTROL[code]
    return _ESCAPE.sub(unescape, text.encode('utf-8'))


def record_id(id: str) -> tuple[str, bytes | None]:
    r"""(the text stored as a record's `id`, its exact bytes or None).

    A valid UTF-8 id is stored as is (None). Any other (a file name with surrogate escapes) is
    stored as its bytes with the undecodable ones as `\xNN` escapes, plus its exact bytes.
    """
    id = str(id)
    try:
        id.encode('utf-8')
        return id, None
    except UnicodeEncodeError:
        raw = _utf8_bytes(id)
        return raw.decode('utf-8', 'backslashreplace'), raw


def encode_record(image: bytes, label: int, id: str,
                  meta: Mapping[str, Any] | None = None) -> bytes:
    """Serialises one example to a msgpack map; an id that is not valid UTF-8 is stored
    escaped, with its exact bytes in `id_bytes` (see `record_id`)."""
    if not isinstance(image, (bytes, bytearray)):
        raise TypeError(f'image must be encoded bytes (JPEG/PNG), got {type(image).__name__}')
    text, raw = record_id(id)
    record = {'image': bytes(image), 'label': int(label), 'id': text,
              'meta': dict(meta or {})}
    if raw is not None:
        record['id_bytes'] = raw
    return msgpack.packb(record, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
    """Parses a record written by `encode_record`: {'image', 'label', 'id', 'meta'}, and
    'id_bytes' when the id is not valid UTF-8."""
    record = msgpack.unpackb(data, raw=False)
    if not isinstance(record, dict) or 'image' not in record or 'label' not in record:
        raise ValueError('Not an sdtl_jax record: expected a msgpack map with "image" and "label"')
    record.setdefault('id', '')
    record.setdefault('meta', {})
    return record


def _to_pil(image: np.ndarray) -> Image.Image:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f'Expected a uint8 image, got {image.dtype}')
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
        raise ValueError(f'Expected HxW, HxWx3 or HxWx4 uint8, got shape {image.shape}')
    return Image.fromarray(image)


def encode_png(image: np.ndarray) -> bytes:
    """Encodes a uint8 HxW (grayscale), HxWx3 or HxWx4 array as PNG bytes."""
    buf = io.BytesIO()
    _to_pil(image).save(buf, format='PNG')
    return buf.getvalue()


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    """Encodes a uint8 HxW or HxWx3 array as JPEG bytes."""
    pil = _to_pil(image)
    if pil.mode == 'RGBA':
        pil = pil.convert('RGB')
    buf = io.BytesIO()
    pil.save(buf, format='JPEG', quality=quality)
    return buf.getvalue()


def shard_name(split: str, index: int, num_shards: int) -> str:
    """`<split>-NNNNN-of-MMMMM.array_record`."""
    return f'{split}-{index:05d}-of-{num_shards:05d}.array_record'


def is_shard_of(split: str, filename: str) -> bool:
    """Whether `filename` is a shard name of `split`, whatever its shard count."""
    return re.fullmatch(re.escape(split) + _SHARD_RE, filename) is not None


def temporary_shard_name(split: str, index: int) -> str:
    """The name shard `index` of `split` has until it is complete: hidden, and per process, as
    the workers of a generation share a directory."""
    return f'.tmp-{split}-{index:05d}.{os.getpid()}'


def is_temporary_shard(split: str, filename: str, index: int | None = None) -> bool:
    """Whether `filename` is a `temporary_shard_name` of `split` (of shard `index` if given),
    of any process: what a killed write leaves behind."""
    return filename.startswith(f'.tmp-{split}-' if index is None else f'.tmp-{split}-{index:05d}.')


def check_split_name(split: str) -> None:
    """Split names become file names: letters, digits, "_" and "." only."""
    if not re.fullmatch(r'[A-Za-z0-9_.]+', split):
        raise ValueError(f'Split names may use letters, digits, "_" and ".", got {split!r}')


def labels_path(dataset_dir: str | os.PathLike, split: str) -> str:
    """`<dataset_dir>/<split>.labels.npy`."""
    return os.path.join(os.fspath(dataset_dir), f'{split}.labels.npy')


def write_labels(dataset_dir: str | os.PathLike, split: str, labels: Sequence[int]) -> str:
    """Writes `<split>.labels.npy` (int32, record order) atomically; returns its path."""
    path = labels_path(dataset_dir, split)
    with fileio.atomic_path(path) as tmp, open(tmp, 'wb') as f:
        np.save(f, np.asarray(labels, dtype=np.int32).reshape(-1))
    return path


def read_labels(dataset_dir: str | os.PathLike, split: str) -> np.ndarray | None:
    """The labels of a split's records in shard order (int32), or None if the file is absent.

    Raises ValueError when the file's length differs from the split's `num_examples` in
    meta.json (a file left over from another write of the split).
    """
    path = labels_path(dataset_dir, split)
    if not os.path.isfile(path):
        return None
    labels = np.load(path)
    expected = read_meta(dataset_dir)['splits'].get(split, {}).get('num_examples')
    if expected is not None and len(labels) != expected:
        raise ValueError(f'{path} holds {len(labels)} labels, meta.json says split {split!r} has '
                         f'{expected} examples; rewrite the split')
    return labels.astype(np.int32, copy=False)


def class_counts(labels: Sequence[int], num_classes: int) -> list[int]:
    """Examples per class, for meta.json."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist()


class ShardWriter:
    """Writes the records of one split into `<split>-NNNNN-of-MMMMM.array_record` shards.

    Shards are written under temporary names and get their final names only in `close()`, once
    the shard count is known, so a crash never leaves a complete-looking but truncated dataset.
    Older shards of the same split are removed then, and `<split>.labels.npy` is written. Use as
    a context manager, or call `close()`; its result is the split entry of `meta.json`.
    """

    def __init__(self, dataset_dir: str | os.PathLike, split: str, *, num_classes: int,
                 records_per_shard: int = DEFAULT_RECORDS_PER_SHARD):
        check_split_name(split)
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
                            temporary_shard_name(self.split, len(self._tmp_files)))
        self._tmp_files.append(path)
        self._writer = array_record_module.ArrayRecordWriter(path, WRITER_OPTIONS)
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
        self._writer.write(encode_record(image, label, id, meta))
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
        files = [shard_name(self.split, i, num_shards) for i in range(num_shards)]
        # Not `fileio.atomic_path`: a shard's final name holds the shard count, known only now.
        for tmp, name in zip(self._tmp_files, files):
            os.replace(tmp, os.path.join(self.dataset_dir, name))
        # Shards of an earlier write of this split (maybe another shard count) would be stale.
        for name in os.listdir(self.dataset_dir):
            if is_shard_of(self.split, name) and name not in files:
                os.remove(os.path.join(self.dataset_dir, name))
        write_labels(self.dataset_dir, self.split, self._labels)
        self._closed = True
        self._info = {'files': files, 'num_examples': self.num_examples,
                      'class_counts': class_counts(self._labels, self.num_classes)}
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


def _validate_meta(meta: Any, path: str) -> dict[str, Any]:
    """Checks the fields of a parsed meta.json; raises ValueError naming `path`."""
    expected = ('expected a JSON object {"name": str, "domain": "real"|"synth", "classes": [str], '
                '"splits": {split: {"files": [str], "num_examples": int, "class_counts": [int]}}}')
    if not isinstance(meta, dict):
        raise ValueError(f'{path}: {expected}, got {type(meta).__name__}')
    missing = [k for k in ('name', 'domain', 'classes', 'splits') if k not in meta]
    if missing:
        raise ValueError(f'{path}: missing fields {missing}; {expected}')
    if meta['domain'] not in DOMAINS:
        raise ValueError(f'{path}: domain must be one of {DOMAINS}, got {meta["domain"]!r}')
    if not isinstance(meta['classes'], list) or not meta['classes']:
        raise ValueError(f'{path}: "classes" must be a non-empty list of class names')
    if not isinstance(meta['splits'], dict):
        raise ValueError(f'{path}: "splits" must be an object; {expected}')
    for split, info in meta['splits'].items():
        if not isinstance(info, dict) or any(
                k not in info for k in ('files', 'num_examples', 'class_counts')):
            raise ValueError(f'{path}: split {split!r} needs "files", "num_examples" and '
                             f'"class_counts"; {expected}')
        if len(info['class_counts']) != len(meta['classes']):
            raise ValueError(f'{path}: split {split!r} has {len(info["class_counts"])} class '
                             f'counts for {len(meta["classes"])} classes')
        if sum(info['class_counts']) != info['num_examples']:
            raise ValueError(f'{path}: split {split!r}: class_counts sum to '
                             f'{sum(info["class_counts"])}, num_examples is {info["num_examples"]}')
    return meta


def write_meta(dataset_dir: str | os.PathLike, name: str, domain: str, classes: Sequence[str],
               splits: Mapping[str, Mapping[str, Any]]) -> str:
    """Writes `<dataset_dir>/meta.json` atomically; returns its path."""
    dataset_dir = os.fspath(dataset_dir)
    path = os.path.join(dataset_dir, META_FILE)
    meta = {'name': name, 'domain': domain, 'classes': [str(c) for c in classes],
            'splits': {s: {'files': list(i['files']), 'num_examples': int(i['num_examples']),
                           'class_counts': [int(c) for c in i['class_counts']]}
                       for s, i in sorted(splits.items())}}
    _validate_meta(meta, path)
    fileio.write_json(path, meta)
    return path


def read_meta(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """Reads and checks `<dataset_dir>/meta.json`.

    Raises:
      FileNotFoundError: the directory or meta.json is missing (the message says what belongs
        there).
      ValueError: meta.json is not valid JSON or lacks fields.
    """
    dataset_dir = os.fspath(dataset_dir)
    path = os.path.join(dataset_dir, META_FILE)
    layout = (f'A dataset directory holds {META_FILE} (name, domain, classes, splits) and the '
              f'shards <split>-NNNNN-of-MMMMM.array_record; make one with `python -m '
              f'sdtl_jax.data.write_arrayrecord --src=<image folder> --out={dataset_dir} '
              f'--split=<split> --domain=real|synth` (or import_imagenet100, import_pets, '
              f'import_tfds for the real datasets).')
    if not os.path.isdir(dataset_dir):
        raise FileNotFoundError(f'Dataset directory {dataset_dir} does not exist. {layout}')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} is missing. {layout}')
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{path} is not valid JSON ({e}). {layout}') from e
    return _validate_meta(meta, path)


def _same_dataset(old: Mapping[str, Any], dataset_dir: str | os.PathLike, name: str, domain: str,
                  classes: Sequence[str]) -> None:
    """Raises ValueError when an existing meta.json has another name, domain or class list."""
    for key, new in (('name', name), ('domain', domain), ('classes', list(classes))):
        if old[key] != new:
            shown = (f'{len(old[key])} classes vs {len(new)}' if key == 'classes'
                     else f'{old[key]!r} vs {new!r}')
            raise ValueError(f'{dataset_dir}/{META_FILE} exists with another {key} '
                             f'({shown}); write to a new directory or delete it first')


def add_split(dataset_dir: str | os.PathLike, *, name: str, domain: str, classes: Sequence[str],
              split: str, info: Mapping[str, Any]) -> str:
    """Adds (or replaces) one split in meta.json, keeping the other splits already there.

    Raises ValueError when the existing meta.json has another name, domain or class list.
    """
    splits: dict[str, Any] = {}
    if os.path.exists(os.path.join(os.fspath(dataset_dir), META_FILE)):
        old = read_meta(dataset_dir)
        _same_dataset(old, dataset_dir, name, domain, classes)
        splits = dict(old['splits'])
    splits[split] = dict(info)
    return write_meta(dataset_dir, name, domain, classes, splits)


def remove_split(dataset_dir: str | os.PathLike, *, name: str, domain: str,
                 classes: Sequence[str], split: str) -> None:
    """Drops one split from meta.json before it is rewritten, so that no reader sees a mix of
    old and new shards; meta.json goes when no split is left.

    Raises ValueError, before anything changes, when the existing meta.json has another name,
    domain or class list (the new split could never be added to it).
    """
    path = os.path.join(os.fspath(dataset_dir), META_FILE)
    if not os.path.exists(path):
        return
    old = read_meta(dataset_dir)
    _same_dataset(old, dataset_dir, name, domain, classes)
    splits = {s: i for s, i in old['splits'].items() if s != split}
    if splits:
        write_meta(dataset_dir, name, domain, classes, splits)
    else:
        os.remove(path)
