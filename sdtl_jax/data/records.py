r"""The record format: encoding a record, and decoding it back to an image.

Each record is a msgpack map `{"image": bytes, "label": int, "id": str, "meta": {...}}`, where
`image` holds encoded JPEG or PNG bytes and `meta` holds provenance (for generated images: the
generator, prompt, seed, ...). An id that is not valid UTF-8 (a file name such as b'bad\xff.jpg',
which Python lists as 'bad\udcff.jpg' with a surrogate escape) is stored losslessly: `id` then
shows the undecodable bytes as backslash escapes (the text `bad\xff.jpg`, see `printable`) and
the record gains `"id_bytes": bytes`, the exact name; `os.fsdecode(record['id_bytes'])` is the
name as `os.listdir` gives it. Where records are stored is `layout.py`'s.

Decoding: `decode_image` turns encoded bytes into RGB uint8 HxWx3, whatever the file's mode;
JPEGs decode with OpenCV's libjpeg-turbo, bit-identical to PIL, and `decode_jpeg` decodes one
at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling) for crops far smaller than the image
(`reduction_factor`). `record_image` and `record_source` take what the reader hands a
transform. Every decoding error is a `CorruptRecordError` that names the record.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import cv2
import msgpack
import numpy as np
from PIL import Image

# Many read threads already run in parallel: OpenCV's own thread pool would oversubscribe the
# cores on every small image.
cv2.setNumThreads(1)


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


_CV2_FLAGS = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION  # PIL ignores EXIF rotation too


# A reduced decode serves a crop whose box, reduced, is at least this many times its output side.
# Measured on 4000 x 3000 photo collages (quality 90) against crops of the full decode: mean
# absolute differences of 0.6-0.8 grey levels at 2 (the resampler itself is 0.7 from PIL's),
# 0.9-1.3 at 1.5, up to 2.8 at 1. libjpeg's scaled inverse DCT low-passes almost ideally, so
# the reduced image is sharper than a blurred full one, and the margin lets the Gaussian
# pre-filter that follows dominate.
_MIN_ROOM = 2


# The same at 1/2, 1/4, 1/8 scale: OpenCV's IMREAD_REDUCED_COLOR_* flags carry IMREAD_COLOR
# (BGR), which it refuses together with IMREAD_COLOR_RGB, so the GRAYSCALE ones give the scale.
_CV2_REDUCED_FLAGS = {2: cv2.IMREAD_REDUCED_GRAYSCALE_2 | _CV2_FLAGS,
                      4: cv2.IMREAD_REDUCED_GRAYSCALE_4 | _CV2_FLAGS,
                      8: cv2.IMREAD_REDUCED_GRAYSCALE_8 | _CV2_FLAGS}


# Start-of-frame markers of every JPEG coding process (not DHT C4, JPG C8, DAC CC).
_JPEG_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE,
                       0xCF))


class CorruptRecordError(ValueError):
    """A record whose image (or msgpack) does not decode; the message says where it is."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to RGB; high bit-depth grayscale is rescaled, not clipped."""
    if image.mode == 'RGB':
        return image
    if image.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F'):
        arr = np.asarray(image, dtype=np.float64)
        if image.mode == 'F':
            # Float images in [0, 1] are the common case; anything else is taken as 0..255.
            scale = 255.0 if arr.size and arr.max() <= 1.0 else 1.0
        else:
            # 16-bit PNGs: PIL opens them as 'I;16' or as 32-bit 'I' holding 0..65535.
            scale = 255.0 / 65535.0
        arr = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, 'L').convert('RGB')
    if image.mode == 'P':
        # Via RGBA, as PIL asks for palettes with transparency; alpha is then dropped as
        # torchvision's ImageFolder loader (`convert('RGB')`) does.
        image = image.convert('RGBA')
    return image.convert('RGB')


def decode_pil(data: bytes, record_id: str = '?') -> Image.Image:
    """Decodes JPEG/PNG/... bytes to an RGB PIL image; errors name the record id."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
        return _to_rgb(image)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad data.
        raise CorruptRecordError(f'Cannot decode the image of record {record_id!r}: '
                                 f'{type(e).__name__}: {e}') from e


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from the frame header of a complete 8-bit JPEG with 1 or 3 components,
    else None. OpenCV decodes those exactly as PIL does, also at reduced scale (`decode_jpeg`).
    CMYK, 12-bit and truncated files (no end-of-image marker; OpenCV would return a half-grey
    image instead of failing) go through PIL, and so do files whose header leaves the height
    to a later DNL marker (height 0)."""
    if data[:2] != b'\xff\xd8' or not data.rstrip(b'\x00\r\n ').endswith(b'\xff\xd9'):
        return None
    pos = 2
    while pos + 10 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:          # fill byte
            pos += 1
            continue
        if marker in _JPEG_SOF:
            height = int.from_bytes(data[pos + 5:pos + 7], 'big')
            width = int.from_bytes(data[pos + 7:pos + 9], 'big')
            plain = data[pos + 4] == 8 and data[pos + 9] in (1, 3) and height and width
            return (height, width) if plain else None
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], 'big')
    return None


def _plain_jpeg(data: bytes) -> bool:
    """Whether OpenCV decodes `data` (see `jpeg_size`)."""
    return jpeg_size(data) is not None


def decode_image(data: bytes, record_id: str = '?') -> np.ndarray:
    """Decodes image bytes to RGB uint8 [H, W, 3]; CorruptRecordError names the record."""
    if _plain_jpeg(data):
        image = cv2.imdecode(np.frombuffer(data, np.uint8), _CV2_FLAGS)
        if image is not None:
            return image
    return np.asarray(decode_pil(data, record_id))


def decode_jpeg(data: bytes, size: tuple[int, int], factor: int,
                record_id: str = '?') -> np.ndarray:
    """A JPEG whose `jpeg_size` is `size` (height, width), decoded at 1/`factor` of each side
    (1, 2, 4 or 8) by libjpeg's DCT scaling: RGB uint8 [ceil(H / f), ceil(W / f), 3], pixel i
    covering the full image's pixels [i f, (i + 1) f). The scaled inverse DCT skips most of
    the decoding work (a 10,000 x 10,000 JPEG: 0.65 s at full size, 0.08 s at 1/8)."""
    # `size` came from the header, so the file is one OpenCV decodes (no second parse of it).
    flags = _CV2_FLAGS if factor == 1 else _CV2_REDUCED_FLAGS[factor]
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None and factor == 1:
        image = np.asarray(decode_pil(data, record_id))     # as `decode_image` falls back
    # Crop boxes are drawn from the header's size before decoding: a file that decodes to
    # another size would put them in the wrong place.
    expected = (-(-size[0] // factor), -(-size[1] // factor), 3)
    if image is None or image.shape != expected:
        found = 'nothing' if image is None else f'{image.shape[1]} x {image.shape[0]}'
        raise CorruptRecordError(
            f'Cannot decode the image of record {record_id!r}: its JPEG header says '
            f'{size[1]} x {size[0]} pixels, and decoding it at 1/{factor} scale gave {found} '
            f'(expected {expected[1]} x {expected[0]}); re-encode the file')
    return image


def reduction_factor(crops: Iterable[tuple[int, int, int]]) -> int:
    """The largest JPEG DCT scaling factor (8, 4, 2, else 1) that every crop of one decode can
    take: each (box height, box width, output side) box still spans at least `_MIN_ROOM` times
    its output side along both axes once reduced."""
    room = min(min(h, w) / side for h, w, side in crops) / _MIN_ROOM
    return next((f for f in (8, 4, 2) if room >= f), 1)


def _locate(element: Any) -> tuple[dict[str, Any], str]:
    """(decoded record dict, 'id (where)') from raw bytes, a record dict, or the reader's
    {'record': bytes, 'where': location, 'num_classes': int}, whose label is range-checked."""
    where, num_classes = '', None
    if isinstance(element, dict) and 'record' in element:
        where, num_classes, element = element['where'], element['num_classes'], element['record']
    if isinstance(element, (bytes, bytearray)):
        try:
            element = decode_record(element)
        except Exception as e:  # msgpack raises several types on corrupt bytes
            raise CorruptRecordError(f'Cannot parse the record at {where or "?"}: '
                                     f'{type(e).__name__}: {e}') from e
    name = str(element.get('id', '?'))
    name = f'{name} ({where})' if where else name
    if num_classes is not None and not 0 <= int(element['label']) < num_classes:
        raise CorruptRecordError(f'Record {name} has label {element["label"]}, outside the '
                                 f'{num_classes} classes of its dataset')
    return element, name


def record_source(element: Any) -> tuple[Any, int, str]:
    """(the image as the record stores it: encoded bytes or an array, label, name for errors)."""
    element, name = _locate(element)
    return element['image'], int(element['label']), name


def stored_pil(stored: Any, name: str) -> Image.Image:
    if isinstance(stored, (bytes, bytearray)):
        return decode_pil(stored, name)
    return _to_rgb(Image.fromarray(np.asarray(stored)))


def stored_array(stored: Any, name: str) -> np.ndarray:
    if isinstance(stored, (bytes, bytearray)):
        return decode_image(stored, name)
    return np.asarray(_to_rgb(Image.fromarray(np.asarray(stored))))


def scalable_size(stored: Any) -> tuple[int, int] | None:
    """(height, width) of a stored image that `decode_jpeg` can decode at reduced scale."""
    return jpeg_size(stored) if isinstance(stored, (bytes, bytearray)) else None


def record_image(element: Any) -> tuple[Image.Image, int]:
    """(RGB PIL image, label) from raw record bytes, a `records.decode_record` dict, or the
    reader's {'record': bytes, 'where': location} (`input_pipeline`)."""
    stored, label, name = record_source(element)
    return stored_pil(stored, name), label
