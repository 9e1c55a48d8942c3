r"""Resumable writing of one split from a list of input images: the engine of every importer.

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

Every image is decoded once (threads, as PIL decodes outside the GIL). JPEG and 8-bit PNG
images that are RGB already are stored byte for byte; any other decodable image (grayscale,
CMYK, RGBA, palette, 16-bit, WebP, BMP, ...) is converted to RGB and stored as lossless PNG.
Nothing is dropped silently: unreadable inputs are listed, and inputs that `load` skips on
purpose (e.g. TFDS records of classes outside the list) are counted in the summary line.

EXIF orientation is ignored by default, as torchvision's and timm's ImageFolder do (PIL's
`Image.open(...).convert('RGB')` does not apply it, nor does training's decoder): an image is
stored with its pixels as they are in the file. `--exif_transpose` (every importer) stores an
image whose EXIF Orientation is not 1 turned upright instead (`PIL.ImageOps.exif_transpose`),
re-encoded as lossless PNG (larger than the JPEG, and decoded at full size in training).

One odd input never stops an import: a file that cannot be read, decoded or stored is listed
in `<split>_unreadable.txt`, whose lines are UTF-8 with tabs and line breaks escaped and the
bytes of a name that is not valid UTF-8 written as `\xNN` (`records.printable`). Such a name
that is readable is stored: the record's `id` shows it escaped the same way and its
`id_bytes` holds the exact bytes (`records.record_id`).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import hashlib
import io
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import tqdm
from absl import flags
from PIL import Image, ImageOps

from sdtl_jax import fileio, metrics_io
from sdtl_jax.data import archives, records
from sdtl_jax.errors import UserError

PROGRESS_VERSION = 1
# Images above this many pixels get a warning line at import. PIL's own limit
# (Image.MAX_IMAGE_PIXELS' default), whose DecompressionBombWarning `transforms.decode_pil`
# silences, so the line takes its place and says what training does; PIL refuses twice as many
# (listed as unreadable). Even decoded at 1/8, a JPEG that size costs about 0.5 s a training
# visit (multi-crop, one core), some 200 ImageNet-size images; ordinary camera photos stay
# below, so imports of photo collections stay quiet.
LARGE_IMAGE_PIXELS = 89_478_485
ORIENTATION_TAG = 0x0112   # EXIF Orientation: 1 upright, 2..8 mirrored and/or rotated


class Item(NamedTuple):
    """One input of an import."""
    source: str       # what reports name: a path, 'archive.tar/member' or 'tfds:name/split[i]'
    id: str           # the record id
    label: int        # label in the class list; -1 when `load` reads it (TFDS)
    stamp: tuple = ()  # changes when the input file does: (size, mtime_ns)
    member: tuple[str, int, int] | None = None  # (archive, offset, size) of an archive member


class Example(NamedTuple):
    """What `load` returns for one item: the record to store."""
    image: bytes
    label: int
    id: str
    meta: Mapping[str, Any]


class Skip(Exception):
    """Raised by `load` for an input left out on purpose; counted by reason, not an error."""


def exif_orientation(image: Image.Image) -> int:
    """The EXIF Orientation tag of an opened image (1..8); 1 when absent or unreadable."""
    try:
        orientation = int(image.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # a damaged EXIF block: the pixels are still good, leave them as they are
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def checked_image(data: bytes, source: str, exif_transpose: bool = False) -> bytes:
    """The bytes to store for an encoded image; raises ValueError naming `source` if undecodable.

    JPEG, and PNG of 8 bits per channel, that decode to RGB are kept byte for byte; anything
    else is decoded through `transforms.decode_pil` (the training pipeline's conversion) and
    re-encoded as PNG. EXIF orientation is ignored (as torchvision's ImageFolder does), unless
    `exif_transpose`: then an image whose Orientation is not 1 is turned upright
    (`PIL.ImageOps.exif_transpose`) and re-encoded as PNG.
    """
    # Imported here: it imports grain and JAX, which an importer's --help should not wait for.
    from sdtl_jax.data import transforms

    if not data:
        raise ValueError(f'{source}: empty file (0 bytes)')
    pil = transforms.decode_pil(data, source)   # full decode: catches truncated files
    with Image.open(io.BytesIO(data)) as image:
        fmt, mode = image.format, image.mode
        orientation = exif_orientation(image) if exif_transpose else 1
    # PNG byte 24 is the IHDR bit depth; PIL shows 16-bit RGB PNGs as mode 'RGB'.
    keep = mode == 'RGB' and (fmt in ('JPEG', 'MPO') or (fmt == 'PNG' and data[24] == 8))
    if orientation != 1:
        # exif_transpose reads the tag from the image it is given: the converted image may
        # have lost it (16-bit conversion), so it gets the original's.
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = orientation
        pil.info['exif'] = exif.tobytes()
        pil = ImageOps.exif_transpose(pil)
        keep = False
    if not keep:
        buf = io.BytesIO()
        pil.save(buf, format='PNG')
        data = buf.getvalue()
    if pil.width * pil.height > LARGE_IMAGE_PIXELS:
        _warn_large(source, pil.size, transforms.jpeg_size(data) is not None)
    return data


def _warn_large(source: str, size: tuple[int, int], scalable: bool) -> None:
    """One stderr line (above the progress bar) about an image over LARGE_IMAGE_PIXELS."""
    what = ('training decodes this JPEG at 1/2 to 1/8 scale (as far as its crops allow), and '
            'a visit still costs as much as some 200 ImageNet-size images: downscale it if '
            'that matters' if scalable else
            'training decodes it in full at every visit (seconds each): downscale it, or '
            'store it as a plain 8-bit RGB JPEG, which training decodes at reduced scale')
    tqdm.tqdm.write(f'warning: {source}: {size[0]} x {size[1]} pixels '
                    f'({size[0] * size[1] / 1e6:.1f} MP, over {LARGE_IMAGE_PIXELS / 1e6:.1f} '
                    f'MP); {what}', file=sys.stderr)


def load_item(item: Item, exif_transpose: bool = False) -> Example:
    """Reads and checks one image: the archive member `item.member`, else the file
    `item.source`; `exif_transpose`: see `checked_image`."""
    if item.member is not None:
        data = archives.read_member(*item.member)
    else:
        # A FIFO or device in an image folder would block or never end: listed, not read.
        if not stat.S_ISREG(os.stat(item.source).st_mode):
            raise ValueError(f'{item.source}: not a regular file')
        with open(item.source, 'rb') as f:
            data = f.read()
    return Example(checked_image(data, item.source, exif_transpose), item.label, item.id, {})


def image_loader(exif_transpose: bool) -> Callable[[Item], Example]:
    """`load_item`, turning images upright by their EXIF orientation or not."""
    return functools.partial(load_item, exif_transpose=True) if exif_transpose else load_item


def exif_settings(exif_transpose: bool) -> dict[str, Any]:
    """The fingerprint settings of `--exif_transpose`: switching it on restarts an import
    (absent when off, so that fingerprints of imports without it stay as they were)."""
    return {'exif_transpose': True} if exif_transpose else {}


def check_class_folders(counts: Mapping[str, int], *, allow_empty: bool, where: str) -> None:
    """Stops an import before anything is written when a class folder holds no input file
    (`counts`: folder path -> files listed in it): one-line `UserError` naming the folder and
    --allow_empty_classes. With `allow_empty`, each such class is kept with 0 examples and one
    warning line per folder goes to stderr."""
    empty = [folder for folder, count in counts.items() if count == 0]
    if not empty:
        return
    if not allow_empty:
        shown = ', '.join(records.printable(f) for f in empty[:3])
        more = f' and {len(empty) - 3} more' if len(empty) > 3 else ''
        raise UserError(
            f'{where}: empty class folder{"s" if len(empty) > 1 else ""} {shown}{more} (no files '
            f'to import): add images, remove the folder, or pass --allow_empty_classes to '
            f'keep the class with 0 examples')
    for folder in empty:
        print(f'warning: {where}: class folder {records.printable(folder)} is empty; its class '
              f'is kept with 0 examples (--allow_empty_classes)', file=sys.stderr, flush=True)


def define_allow_empty_classes(flag_values: flags.FlagValues) -> None:
    """--allow_empty_classes, for the importers that read class folders."""
    flags.DEFINE_boolean('allow_empty_classes', False,
                         'Keep a class whose folder holds no files, with 0 examples (a warning '
                         'line names it). Default: an empty class folder stops the import.',
                         flag_values=flag_values)


def file_stamp(path: str) -> tuple:
    """(size, mtime_ns): part of the fingerprint, so that a changed file restarts an import.
    A file that cannot be stat'ed (a dangling link, no permission) gets the error's name: it is
    listed as unreadable when loaded, and the stamp changes once it is fixed."""
    try:
        st = os.stat(path)
    except OSError as e:
        return (type(e).__name__,)
    return st.st_size, st.st_mtime_ns


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


def _start_fresh(out_dir: str, split: str, *, name: str, domain: str,
                 classes: Sequence[str]) -> None:
    """Removes every trace of an earlier write of `split` (meta.json entry first)."""
    records.remove_split(out_dir, name=name, domain=domain, classes=classes, split=split)
    for filename in os.listdir(out_dir):
        if records.is_shard_of(split, filename) or records.is_temporary_shard(split, filename):
            os.remove(os.path.join(out_dir, filename))
    for path in (records.labels_path(out_dir, split), _unreadable_path(out_dir, split)):
        if os.path.exists(path):
            os.remove(path)


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


def _ordered(pool: concurrent.futures.Executor, fn: Callable, items: Sequence[Item],
             window: int) -> Iterator[tuple[Item, Any]]:
    """(item, fn(item)) in order, with at most `window` items in flight: the threads stay busy
    while memory holds only `window` loaded-but-unwritten images."""
    pending: collections.deque = collections.deque()
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            item, future = pending.popleft()
            yield item, future.result()
    while pending:
        item, future = pending.popleft()
        yield item, future.result()


def _write_shard(path: str, items: Sequence[Item], load: Callable[[Item], Example],
                 pool: concurrent.futures.Executor, window: int, num_classes: int,
                 bar: tqdm.tqdm, unreadable_before: int) -> dict[str, Any]:
    """Writes the records of `items` to `path`; returns the shard's progress entry."""
    from array_record.python import array_record_module

    labels, unreadable, skipped = [], [], {}
    writer = array_record_module.ArrayRecordWriter(path, records.WRITER_OPTIONS)
    try:
        for item, result in _ordered(pool, lambda it: _load_one(load, it), items, window):
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
    finally:
        writer.close()
    return {'labels': labels, 'unreadable': unreadable, 'skipped': skipped}


def write_split(out_dir: str | os.PathLike, items: Sequence[Item], *, name: str, domain: str,
                classes: Sequence[str], split: str,
                load: Callable[[Item], Example] = load_item,
                items_per_shard: int = records.DEFAULT_RECORDS_PER_SHARD, num_threads: int = 8,
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
    records.check_split_name(split)
    if domain not in records.DOMAINS:
        raise ValueError(f'domain must be one of {records.DOMAINS}, got {domain!r}')
    if items_per_shard < 1:
        raise ValueError(f'items_per_shard must be >= 1, got {items_per_shard}')
    os.makedirs(out_dir, exist_ok=True)
    num_shards = max(1, -(-len(items) // items_per_shard))
    files = [records.shard_name(split, i, num_shards) for i in range(num_shards)]
    settings = {'name': name, 'domain': domain, 'classes': list(classes),
                'items_per_shard': items_per_shard, **(settings or {})}
    expected = fingerprint(items, problems, settings)
    progress_path = _progress_path(out_dir, split)
    done = _load_progress(progress_path, expected, num_shards, out_dir)
    if done is None:
        _start_fresh(out_dir, split, name=name, domain=domain, classes=classes)
        done = {}
    else:
        for filename in os.listdir(out_dir):
            if records.is_temporary_shard(split, filename):
                os.remove(os.path.join(out_dir, filename))
    todo = [i for i in range(num_shards) if str(i) not in done]
    resumed = num_shards - len(todo)
    start = time.time()
    initial = sum(min(items_per_shard, len(items) - int(i) * items_per_shard) for i in done)
    num_unreadable = sum(len(s['unreadable']) for s in done.values())
    bar = metrics_io.Progress(total=len(items), initial=initial, desc=f'{name}/{split}',
                              unit='img', dynamic_ncols=True, mininterval=1.0, file=sys.stderr,
                              postfix={'unreadable': num_unreadable})
    with bar, concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        for index in todo:
            part = items[index * items_per_shard:(index + 1) * items_per_shard]
            tmp = os.path.join(out_dir, records.temporary_shard_name(split, index))
            with fileio.atomic_path(os.path.join(out_dir, files[index]), tmp):
                info = _write_shard(tmp, part, load, pool, 4 * num_threads, len(classes), bar,
                                    num_unreadable)
            done[str(index)] = {'file': files[index], **info}
            num_unreadable += len(info['unreadable'])
            fileio.write_json(progress_path, {'fingerprint': expected, 'num_shards': num_shards,
                                              'shards': done})
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
    records.write_labels(out_dir, split, labels)
    unreadable_path = _unreadable_path(out_dir, split)
    if unreadable:
        # One line per input, whatever its name (records.printable): a name that is not UTF-8
        # or holds a tab or line break would otherwise fail the write or break the format.
        with open(unreadable_path, 'w', encoding='utf-8') as f:
            f.writelines(f'{records.printable(source)}\t{records.printable(reason)}\n'
                         for source, reason in unreadable)
    elif os.path.exists(unreadable_path):
        os.remove(unreadable_path)
    info = {'files': [s['file'] for s in shards], 'num_examples': len(labels),
            'class_counts': records.class_counts(labels, len(classes))}
    records.add_split(out_dir, name=name, domain=domain, classes=classes, split=split, info=info)
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


def define_writer_flags(flag_values: flags.FlagValues) -> None:
    """The flags every importer shares: --records_per_shard, --num_threads. An importer adopts
    them as its key flags (`flags.adopt_module_key_flags`), so that its --help shows them."""
    flags.DEFINE_integer('records_per_shard', records.DEFAULT_RECORDS_PER_SHARD,
                         'Input images per shard (the default is ~225 MB of ImageNet JPEGs).',
                         lower_bound=1, flag_values=flag_values)
    flags.DEFINE_integer('num_threads', 8, 'Threads that read and check images.', lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_boolean('exif_transpose', False,
                         'Store images whose EXIF Orientation is not 1 turned upright '
                         '(PIL.ImageOps.exif_transpose), re-encoded as lossless PNG. Default: '
                         'off, pixels stored as in the file, EXIF orientation ignored, as '
                         "torchvision's and timm's ImageFolder (PIL) and training's decoder do.",
                         flag_values=flag_values)


def run_command(write: Callable[[], Sequence[Mapping[str, Any]]]) -> int:
    """Runs an importer for its command line: exit 0 when some records were written, 1 when
    none were or on an `errors.UserError` (e.g. an empty class folder; one `error:` line), 2
    (with an `error:` line) on missing or bad input."""
    try:
        summaries = write()
    except UserError as e:
        print(f'error: {records.printable(str(e))}', file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0 if any(s['num_examples'] for s in summaries) else 1
