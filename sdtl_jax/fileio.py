"""Workdir files on a local disk or in a bucket (`gs://...`): the one module that knows the
difference.

Remote paths go through `etils.epath`, which reads and writes `gs://` with gcsfs (install it
with `pip install gcsfs`, or `SDTL_EXTRAS=gcs bash scripts/setup.sh`). Orbax checkpoints and
TensorBoard reach the bucket through their own GCS support (tensorstore, tensorboardX).

Object stores differ from a disk in two ways that matter here: an object is replaced whole
and atomically (so `write_bytes` needs no temporary file there), and it cannot be appended
to (so `append_text` rewrites it: only small logs are appended to, one line per epoch).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from typing import Any

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs such as gs://bucket/dir (epath's schemes), False for local paths."""
    return '://' in os.fspath(path)


def check_supported(path: str | os.PathLike) -> None:
    """Raises an ImportError naming the package to install if `path` is a gs:// URL and
    gcsfs is missing: better before training than at the first write after an epoch."""
    if os.fspath(path).startswith('gs://'):
        try:
            import gcsfs  # noqa: F401
        except ImportError as e:
            raise ImportError(
                f'The workdir {os.fspath(path)} is on GCS, which needs gcsfs: pip install '
                'gcsfs (or SDTL_EXTRAS=gcs bash scripts/setup.sh)') from e


def absolute(path: str | os.PathLike) -> str:
    """An absolute local path, or the URL unchanged (os.path.abspath would mangle it)."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(path)


def exists(path: str | os.PathLike) -> bool:
    return epath.Path(path).exists()


def isdir(path: str | os.PathLike) -> bool:
    return epath.Path(path).is_dir()


def makedirs(path: str | os.PathLike) -> None:
    """Creates a local folder and its parents; a no-op in a bucket, which has no folders."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def read_text(path: str | os.PathLike) -> str:
    return epath.Path(path).read_text()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, tmp: str | None = None) -> Iterator[str]:
    """A local path to write `path`'s new contents to: renamed onto `path` when the block ends,
    deleted when it raises. A reader, or a run resumed after a crash, then finds the old file
    or the whole new one, never half of one.

    The temporary file is `<path>.tmp.<pid>` (per process: several may write the same file),
    or `tmp`, for a writer whose killed runs' leftovers are found and removed by their name.
    """
    path = os.fspath(path)
    tmp = tmp or f'{path}.tmp.{os.getpid()}'
    try:
        yield tmp
    except BaseException:   # an interrupt too: no partial file is left behind
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes so that a reader sees the old file or the new one, never half of one."""
    if is_remote(path):
        epath.Path(path).write_bytes(data)   # an upload replaces the object atomically
        return
    makedirs(os.path.dirname(os.fspath(path)) or '.')
    with atomic_path(path) as tmp, open(tmp, 'wb') as f:
        f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, value: Any, *, compact: bool = False) -> None:
    """Indented, with sorted keys and a final newline: files that read and diff well, the same
    bytes for the same value. `compact` (one line) is for bookkeeping that holds long lists and
    is rewritten often (an import's progress, a shard's labels). Atomic, as `write_bytes`."""
    text = (json.dumps(value, sort_keys=True, separators=(',', ':')) if compact
            else json.dumps(value, indent=2, sort_keys=True))
    write_text(path, text + '\n')


def append_text(path: str | os.PathLike, text: str) -> None:
    """Appends to a local file; rewrites a remote object with `text` added (no appends)."""
    if is_remote(path):
        old = read_text(path) if exists(path) else ''
        write_text(path, old + text)
        return
    makedirs(os.path.dirname(os.fspath(path)) or '.')
    with open(path, 'a') as f:
        f.write(text)


def remove(path: str | os.PathLike) -> None:
    epath.Path(path).unlink()


# A bucket's conditional writes, for the workdir lock (a disk's are O_EXCL and rename): every
# object has a generation, and a write or delete can be made conditional on it, so of two
# writers racing for one object exactly one wins.

def create_new(url: str, text: str) -> bool:
    """Uploads `text` to `url` unless an object is there (generation 0 as the precondition);
    False if one is."""
    fs, key = _versioned_gcs(url)
    try:
        with fs.open(key, 'xb') as f:
            f.write(text.encode())
    except FileExistsError:
        return False
    return True


def read_generation(url: str) -> tuple[str, str]:
    """The object's text and the generation it was read at."""
    fs, key = _versioned_gcs(url)
    fs.invalidate_cache(key)
    generation = fs.info(key)['generation']
    return fs.cat_file(f'{key}#{generation}').decode(), generation


def remove_generation(url: str, generation: str) -> bool:
    """Deletes the object only at `generation`; False if that generation is gone (replaced or
    deleted by another writer)."""
    fs, key = _versioned_gcs(url)
    try:
        fs.rm_file(f'{key}#{generation}')
    except FileNotFoundError:
        return False
    return True


def _versioned_gcs(url: str):
    """gcsfs with `path#generation` addressing, and the path it takes."""
    import gcsfs
    return gcsfs.GCSFileSystem(version_aware=True), url.removeprefix('gs://')


def save_figure(figure, path: str | os.PathLike, **savefig_kwargs) -> None:
    """Saves a matplotlib figure as PNG to a local path or a URL."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format='png', **savefig_kwargs)
    write_bytes(path, buffer.getvalue())


def glob(directory: str | os.PathLike, pattern: str) -> list[str]:
    """Paths in `directory` matching `pattern` (e.g. 'skipped_records*.txt'), sorted."""
    directory = epath.Path(directory)
    if not directory.is_dir():
        return []
    return sorted(os.fspath(p) for p in directory.glob(pattern))
