r"""A dataset folder on disk: shard file names, `meta.json`, `<split>.labels.npy`.

A dataset is a directory (see docs/architecture.md, "Data contract"):

    <data_dir>/<name>/meta.json
    <data_dir>/<name>/<split>-00000-of-00004.array_record
    <data_dir>/<name>/<split>.labels.npy      int32, one label per record, in shard order
    <data_dir>/<name>/<split>_unreadable.txt  importers: input path TAB reason, when any
    <data_dir>/<name>/<split>.progress.json   importers: only while the split is being written

`meta.json` holds the name, the domain (`real` or `synth`), the class list, and per split the
shard file names (relative to the dataset directory), the number of examples and the number of
examples per class. `<split>.labels.npy` lets stratified subsets be drawn without reading the
shards; datasets written before it existed lack it (`read_labels` then returns None). Data dirs
default to `$SDTL_DATA_DIR`, else `~/.cache/sdtl_jax/data` (`default_data_dir`). What a record
holds is `records.py`'s.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sdtl_jax import fileio

DOMAINS = ('real', 'synth')


META_FILE = 'meta.json'


# One record per group: grain reads records at random, and a group is the unit of decompression.
# Images are compressed already, so zstd on top only costs CPU.
WRITER_OPTIONS = 'group_size:1,uncompressed'


DEFAULT_RECORDS_PER_SHARD = 2048  # ImageNet JPEGs average ~110 KB: ~225 MB shards.


_SHARD_RE = r'-(\d{5})-of-(\d{5})\.array_record$'


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
              f'sdtl_jax.datasets.image_folder --src=<image folder> --out={dataset_dir} '
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


def default_data_dir() -> str:
    """$SDTL_DATA_DIR, else ~/.cache/sdtl_jax/data."""
    return os.path.expanduser(os.environ.get('SDTL_DATA_DIR')
                              or os.path.join('~', '.cache', 'sdtl_jax', 'data'))
