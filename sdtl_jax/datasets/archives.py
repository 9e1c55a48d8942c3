"""Random access to the images inside tar archives (ILSVRC2012, Oxford-IIIT Pet).

Importers read the archives as published, without extracting them: the member headers of an
uncompressed tar (also of the tars inside it, as in `ILSVRC2012_img_train.tar`) give each
image's byte offset and size, and `read_member` then reads one image with a single `pread`.
That lets threads read in parallel, in any order, and a resumed import start at any shard.
A compressed tar (`images.tar.gz`) cannot be read that way: `uncompressed` writes a plain copy
once into a cache directory. Small metadata files (ground truth, annotation lists) are read by
streaming through the archive with `read_small`.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import tarfile
from collections.abc import Callable
from typing import NamedTuple

from sdtl_jax import fileio

_MAGIC = {b'\x1f\x8b': gzip.open, b'BZh': bz2.open, b'\xfd7zXZ\x00': lzma.open}


class Member(NamedTuple):
    """A regular file inside an uncompressed tar: where its bytes are."""
    name: str
    offset: int
    size: int


def _opener(path: str) -> Callable | None:
    """The decompressing `open` for a compressed file, None for a plain one."""
    with open(path, 'rb') as f:
        head = f.read(6)
    return next((op for magic, op in _MAGIC.items() if head.startswith(magic)), None)


def _members(tar: tarfile.TarFile, base: int = 0) -> list[Member]:
    return [Member(m.name, base + m.offset_data, m.size) for m in tar.getmembers() if m.isfile()]


def list_members(path: str) -> list[Member]:
    """The regular files of an uncompressed tar, in archive order."""
    if _opener(path) is not None:
        raise ValueError(f'{path} is compressed; use archives.uncompressed() first')
    with tarfile.open(path, 'r:') as tar:
        return _members(tar)


def list_nested(path: str, select: Callable[[str], bool],
                on_inner: Callable[[str], None] | None = None) -> dict[str, list[Member]]:
    """{inner tar name: its regular files} for the inner tars of `path` that `select` keeps.

    Offsets are in the outer file, so `read_member(path, ...)` reads an inner member directly.
    `on_inner(name)` is called after each inner tar is listed (progress).
    """
    out = {}
    with tarfile.open(path, 'r:') as outer:
        for m in outer.getmembers():
            if m.isfile() and select(m.name):
                with tarfile.open(fileobj=outer.extractfile(m), mode='r:') as inner:
                    out[m.name] = _members(inner, m.offset_data)
                if on_inner is not None:
                    on_inner(m.name)
    return out


def read_member(path: str, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of `path`; OSError when the archive ends before."""
    with open(path, 'rb') as f:
        data = os.pread(f.fileno(), size, offset)
    if len(data) != size:
        raise OSError(f'archive {path} ends {size - len(data)} bytes before this member ends')
    return data


def read_small(path: str, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """{member name: bytes} of the members `wanted` keeps, streaming through a (compressed) tar."""
    out = {}
    with tarfile.open(path, 'r|*') as tar:
        for m in tar:
            if m.isfile() and wanted(m.name):
                out[m.name] = tar.extractfile(m).read()
    return out


def uncompressed(path: str, cache_dir: str) -> str:
    """`path` itself for a plain tar; else a plain copy in `cache_dir`, written once.

    The copy's name holds the source's size and modification time, so a changed archive is
    decompressed again; it is written under a temporary name, so a killed run leaves no
    truncated copy.
    """
    opener = _opener(path)
    if opener is None:
        return path
    st = os.stat(path)
    stem = os.path.basename(path).split('.tar')[0]
    target = os.path.join(cache_dir, f'{stem}.{st.st_size}.{st.st_mtime_ns}.tar')
    if not os.path.exists(target):
        os.makedirs(cache_dir, exist_ok=True)
        print(f'Decompressing {path} into {target} (once) ...', flush=True)
        with (fileio.atomic_path(target) as tmp, opener(path, 'rb') as src,
              open(tmp, 'wb') as dst):
            shutil.copyfileobj(src, dst, 1 << 22)
    return target
