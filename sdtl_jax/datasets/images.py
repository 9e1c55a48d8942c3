"""An importer's inputs: the `Item`s it lists, and loading each into a record's image.

Every image is decoded once (threads, as PIL decodes outside the GIL). JPEG and 8-bit PNG
images that are RGB already are stored byte for byte; any other decodable image (grayscale,
CMYK, RGBA, palette, 16-bit, WebP, BMP, ...) is converted to RGB and stored as lossless PNG.

EXIF orientation is ignored by default, as torchvision's and timm's ImageFolder do (PIL's
`Image.open(...).convert('RGB')` does not apply it, nor does training's decoder): an image is
stored with its pixels as they are in the file. `--exif_transpose` (every importer) stores an
image whose EXIF Orientation is not 1 turned upright instead (`PIL.ImageOps.exif_transpose`),
re-encoded as lossless PNG (larger than the JPEG, and decoded at full size in training).

`shards.write_split` writes what `load_item` returns; an input it cannot load is listed, never
dropped silently.
"""

from __future__ import annotations

import functools
import io
import os
import stat
import sys
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import tqdm
from PIL import Image, ImageOps

from sdtl_jax.data import records
from sdtl_jax.datasets import archives
from sdtl_jax.errors import UserError

# Images above this many pixels get a warning line at import. PIL's own limit
# (Image.MAX_IMAGE_PIXELS' default), whose DecompressionBombWarning `records.decode_pil`
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
    else is decoded through `records.decode_pil` (the training pipeline's conversion) and
    re-encoded as PNG. EXIF orientation is ignored (as torchvision's ImageFolder does), unless
    `exif_transpose`: then an image whose Orientation is not 1 is turned upright
    (`PIL.ImageOps.exif_transpose`) and re-encoded as PNG.
    """
    # Imported here: it imports grain and JAX, which an importer's --help should not wait for.

    if not data:
        raise ValueError(f'{source}: empty file (0 bytes)')
    pil = records.decode_pil(data, source)   # full decode: catches truncated files
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
        _warn_large(source, pil.size, records.jpeg_size(data) is not None)
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


def file_stamp(path: str) -> tuple:
    """(size, mtime_ns): part of the fingerprint, so that a changed file restarts an import.
    A file that cannot be stat'ed (a dangling link, no permission) gets the error's name: it is
    listed as unreadable when loaded, and the stamp changes once it is fixed."""
    try:
        st = os.stat(path)
    except OSError as e:
        return (type(e).__name__,)
    return st.st_size, st.st_mtime_ns
