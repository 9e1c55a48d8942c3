"""Decoding and augmentation on the host: NumPy/OpenCV/PIL ops usable as grain transforms.

- `decode_image`: encoded bytes -> RGB uint8 HxWx3, whatever the file's mode.
- `decode_jpeg`: a JPEG at 1/2, 1/4 or 1/8 of its size, for crops far smaller than the image.
- `MultiCrop`: DINO multi-crop (docs/paper.md §5) as a grain `RandomMapTransform`.
- `EvalTransform`: shorter side to 256 (bilinear), centre crop 224 (docs/paper.md §6).

Outputs stay uint8 and un-normalised: the jitted step normalises on the device, which keeps host
work and host-to-device transfer small. Randomness comes only from the `np.random.Generator` that
grain passes to `random_map` (seeded from the pipeline seed and the element's index), so a fixed
seed gives the same crops whatever the number of threads.

The ops follow torchvision's PIL backend, which the reference (DINO, t-ReX) used, down to
RandomResizedCrop's 10-attempt sampling. Multi-crop's light ops (jitter, grayscale, blur,
solarize) run on the device (`photometric.py`); its crops are resized with OpenCV, and JPEGs
decode with OpenCV's libjpeg-turbo, bit-identical to PIL. A JPEG far larger than its crops
decodes at reduced scale (libjpeg's DCT scaling) instead, its crops within a grey level of
those of the full decode (`reduction_factor`): a 10,000 x 10,000 JPEG costs a tenth of a second
a visit, not many seconds. Every decoding error is a `CorruptRecordError` that names the record.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import cv2
import grain
import numpy as np
from PIL import Image

from sdtl_jax.data import photometric, records

_BICUBIC = Image.Resampling.BICUBIC
_BILINEAR = Image.Resampling.BILINEAR
# Many read threads already run in parallel: OpenCV's own thread pool would oversubscribe the
# cores on every small image.
cv2.setNumThreads(1)
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
            element = records.decode_record(element)
        except Exception as e:  # msgpack raises several types on corrupt bytes
            raise CorruptRecordError(f'Cannot parse the record at {where or "?"}: '
                                     f'{type(e).__name__}: {e}') from e
    name = str(element.get('id', '?'))
    name = f'{name} ({where})' if where else name
    if num_classes is not None and not 0 <= int(element['label']) < num_classes:
        raise CorruptRecordError(f'Record {name} has label {element["label"]}, outside the '
                                 f'{num_classes} classes of its dataset')
    return element, name


def _record_source(element: Any) -> tuple[Any, int, str]:
    """(the image as the record stores it: encoded bytes or an array, label, name for errors)."""
    element, name = _locate(element)
    return element['image'], int(element['label']), name


def _pil(stored: Any, name: str) -> Image.Image:
    if isinstance(stored, (bytes, bytearray)):
        return decode_pil(stored, name)
    return _to_rgb(Image.fromarray(np.asarray(stored)))


def _array(stored: Any, name: str) -> np.ndarray:
    if isinstance(stored, (bytes, bytearray)):
        return decode_image(stored, name)
    return np.asarray(_to_rgb(Image.fromarray(np.asarray(stored))))


def _scalable_size(stored: Any) -> tuple[int, int] | None:
    """(height, width) of a stored image that `decode_jpeg` can decode at reduced scale."""
    return jpeg_size(stored) if isinstance(stored, (bytes, bytearray)) else None


def record_image(element: Any) -> tuple[Image.Image, int]:
    """(RGB PIL image, label) from raw record bytes, a `records.decode_record` dict, or the
    reader's {'record': bytes, 'where': location} (`input_pipeline`)."""
    stored, label, name = _record_source(element)
    return _pil(stored, name), label


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float],
                            ratio: tuple[float, float], rng: np.random.Generator
                            ) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (top, left, h, w), 10 tries then centre."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the largest centre crop whose aspect ratio lies inside `ratio`.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# Std of the Gaussian pre-filter per unit of sqrt(scale^2 - 1) when downscaling; fitted to
# PIL's antialiased bicubic on ImageNet-size photos (0.45: about 0.7 grey levels mean absolute
# difference at 1.2-2x; OpenCV's area averaging gives 0.8-1.9 and costs 6x more).
_ANTIALIAS_SIGMA = 0.45


def _antialias(region: np.ndarray, scale_y: float, scale_x: float,
               factor: int = 1) -> np.ndarray:
    """The Gaussian pre-filter before a downscale by (scale_y, scale_x) pixels of the full
    image per output pixel, on a region decoded at 1/factor scale; see `resized_crop`."""
    if scale_x <= 1.05 and scale_y <= 1.05:
        return region
    sigma_x = _ANTIALIAS_SIGMA * math.sqrt(max(scale_x * scale_x - 1, 0.0)) / factor or 1e-3
    sigma_y = _ANTIALIAS_SIGMA * math.sqrt(max(scale_y * scale_y - 1, 0.0)) / factor or 1e-3
    return cv2.GaussianBlur(region, (0, 0), sigmaX=sigma_x, sigmaY=sigma_y,
                            borderType=cv2.BORDER_REPLICATE)


def resized_crop(image: np.ndarray, box: tuple[int, int, int, int], size: int,
                 factor: int = 1) -> np.ndarray:
    """The (top, left, h, w) box of an HxWx3 uint8 image, resized to size x size (bicubic).

    torchvision's PIL backend crops, then resizes with a bicubic kernel (a = -0.5) that it
    widens by the scale factor when downscaling (antialiasing) and truncates at the edges.
    OpenCV's cubic (a = -0.75, edges repeated) is 5-10x faster and within a grey level on
    photos at the scales ImageNet crops use; a Gaussian pre-filter stands in for the wider
    kernel when downscaling. Upscaling tiny regions by 2x or more (images far below the crop
    size, like the demo's 8x8 digits) makes the two kernels' ringing differ visibly (the demo
    measured 70% vs 79% top-1), so there PIL does it, at next to no cost on such small images.

    `factor` > 1: `image` is the `decode_jpeg` of the full image at 1/factor scale and `box`
    stays in the full image's pixels, which keeps the crop's geometry exact: the box becomes
    fractional coordinates of the reduced image, resampled there (`reduction_factor` keeps
    that a downscale).
    """
    if factor > 1:
        return _reduced_resized_crop(image, box, size, factor)
    top, left, h, w = box
    region = image[top:top + h, left:left + w]
    if 2 * max(h, w) <= size:
        return np.asarray(Image.fromarray(region).resize((size, size), _BICUBIC))
    region = _antialias(region, h / size, w / size)
    return cv2.resize(region, (size, size), interpolation=cv2.INTER_CUBIC)


def _reduced_resized_crop(image: np.ndarray, box: tuple[int, int, int, int], size: int,
                          factor: int) -> np.ndarray:
    """`resized_crop` of a full-image box from a decode at 1/factor scale."""
    top, left, h, w = (v / factor for v in box)
    # The reduced pixels the box touches; like `resized_crop`, nothing outside the box is
    # filtered in: the blur and the resampling repeat the edge pixels.
    row, col = int(top), int(left)
    region = image[row:math.ceil(top + h), col:math.ceil(left + w)]
    # The full decode's blur, in reduced pixels: the scaled inverse DCT hardly smooths
    # (see _MIN_ROOM), so the same Gaussian is still what the resampling needs.
    region = _antialias(region, box[2] / size, box[3] / size, factor)
    scale_y, scale_x = h / size, w / size
    # Output pixel x samples the region at left - col + (x + 0.5) scale_x - 0.5, the mapping
    # of cv2.resize with the box's fractional offset added (likewise for y).
    to_region = np.array([[scale_x, 0.0, left - col + 0.5 * scale_x - 0.5],
                          [0.0, scale_y, top - row + 0.5 * scale_y - 0.5]])
    return cv2.warpAffine(region, to_region, (size, size),
                          flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


class MultiCrop(grain.transforms.RandomMap):
    """DINO multi-crop (docs/paper.md §5): `num_global` + `num_local` crops, uint8, and their
    light ops for the device.

    Input: a record (see `record_image`). Output: {'global': uint8[G, S, S, 3], 'global_ops':
    float32[G, photometric.NUM_OPS], 'local': uint8[L, s, s, 3], 'local_ops' (both absent when
    L == 0), 'label': int32}. Per crop: RandomResizedCrop (bicubic) -> flip here, then colour
    jitter (p) -> grayscale (p) -> blur (p) -> solarize (p, global only) in the train step
    (`photometric.apply`). The paper's probabilities are the defaults: blur 0.2 global and
    0.5 local (DINO itself uses 1.0 / 0.1 on its two global crops; the paper's recipe has one).

    The host part runs on OpenCV, picked by measurement (bench/RESULTS.md): with PIL, as
    torchvision, all nine crops took about 10 ms per ImageNet-size image on this CPU.

    A JPEG is decoded once for all its crops, at the largest DCT scale-down that every crop
    box allows (`reduction_factor`): the boxes are drawn first, from the size in its header,
    with the same random draws as from the decoded image. One decode rather than one per crop
    size: the entropy decoding, which no scaling skips, keeps a reduced decode of a photo at
    40-60% of a full one (4000 x 3000: 31 ms at 1/8, 46 ms at 1/2, 79 ms in full), more than
    the local crops would save from a smaller image (eight of them: 33 ms from 1/2, 6 ms
    from 1/4). Large images reach 1/8 for every crop (from a square side of about 8,300 px
    for 224 + 96 at the paper's scales); ImageNet-size images stay at full scale.
    """

    def __init__(self, global_size: int = 224, local_size: int = 96, num_global: int = 1,
                 num_local: int = 8, global_scale: tuple[float, float] = (0.25, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.25),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5,
                 jitter_p: float = 0.8, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.2, hue: float = 0.1, grayscale_p: float = 0.2,
                 global_blur_p: float = 0.2, local_blur_p: float = 0.5,
                 blur_radius: tuple[float, float] = (0.1, 2.0), global_solarize_p: float = 0.2,
                 local_solarize_p: float = 0.0):
        if num_global < 1 or num_local < 0:
            raise ValueError(f'Need num_global >= 1 and num_local >= 0, got {num_global}, '
                             f'{num_local}')
        self.global_size, self.local_size = int(global_size), int(local_size)
        self.num_global, self.num_local = int(num_global), int(num_local)
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.ratio = tuple(ratio)
        self.flip_p = flip_p
        ops = dict(jitter_p=jitter_p, brightness=brightness, contrast=contrast,
                   saturation=saturation, hue=hue, grayscale_p=grayscale_p,
                   blur_radius=tuple(blur_radius))
        self.global_ops = dict(ops, blur_p=global_blur_p, solarize_p=global_solarize_p)
        self.local_ops = dict(ops, blur_p=local_blur_p, solarize_p=local_solarize_p)
        photometric.sample(np.random.default_rng(0), **self.global_ops)  # checks the args

    def draw(self, height: int, width: int, rng: np.random.Generator, *,
             scale: tuple[float, float], ops: dict[str, Any]
             ) -> tuple[tuple[int, int, int, int], bool, np.ndarray]:
        """One crop's randomness, in torchvision's order: its box in a height x width image,
        whether it is flipped, its light ops."""
        box = random_resized_crop_box(height, width, scale, self.ratio, rng)
        return box, bool(rng.random() < self.flip_p), photometric.sample(rng, **ops)

    def crop(self, image: np.ndarray, box: tuple[int, int, int, int], flip: bool, size: int,
             factor: int = 1) -> np.ndarray:
        """One crop, uint8 [size, size, 3], of an RGB uint8 image decoded at 1/factor scale."""
        out = resized_crop(image, box, size, factor)
        return cv2.flip(out, 1) if flip else out

    def random_map(self, element: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Crops one record."""
        stored, label, name = _record_source(element)
        image, size = None, _scalable_size(stored)
        if size is None:
            image = _array(stored, name)
            size = image.shape[:2]
        kinds = [('global', self.num_global, self.global_size, self.global_scale,
                  self.global_ops)]
        if self.num_local:
            kinds.append(('local', self.num_local, self.local_size, self.local_scale,
                          self.local_ops))
        draws = {kind: [self.draw(*size, rng, scale=scale, ops=ops) for _ in range(count)]
                 for kind, count, _, scale, ops in kinds}
        factor = 1
        if image is None:
            factor = reduction_factor((box[2], box[3], side)
                                      for kind, _, side, _, _ in kinds
                                      for box, _, _ in draws[kind])
            image = decode_jpeg(stored, size, factor, name)
        out = {}
        for kind, _, side, _, _ in kinds:
            out[kind] = np.stack([self.crop(image, box, flip, side, factor)
                                  for box, flip, _ in draws[kind]])
            out[f'{kind}_ops'] = np.stack([ops for _, _, ops in draws[kind]])
        out['label'] = np.int32(label)
        return out


def _shorter_to(w: int, h: int, size: int) -> tuple[int, int]:
    """torchvision Resize(int)'s output (width, height) for a w x h image."""
    return (size, int(size * h / w)) if w <= h else (int(size * w / h), size)


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """torchvision Resize(int): shorter side to `size`, longer side truncated, bilinear."""
    w, h = image.size
    new_w, new_h = _shorter_to(w, h, size)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), _BILINEAR)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision CenterCrop(int), zero-padding images smaller than `size`."""
    w, h = image.size
    if w < size or h < size:
        padded = Image.new('RGB', (max(w, size), max(h, size)))
        padded.paste(image, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
        image, (w, h) = padded, padded.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


class EvalTransform(grain.transforms.Map):
    """Shorter side to `resize` (bilinear), centre crop `crop`: {'image': uint8, 'label'}.

    A JPEG whose shorter side is at least 4 x `resize` is decoded at the largest DCT
    scale-down that keeps it at least `_MIN_ROOM` x `resize` (`reduction_factor`), then
    resized from there to the size the full image gets, over the same area: the full image's
    exact extent in the reduced one, whose last row and column may stand for fewer than
    `factor` pixels.
    """

    def __init__(self, resize: int = 256, crop: int = 224):
        self.resize, self.crop = int(resize), int(crop)

    def map(self, element: Any) -> dict[str, np.ndarray]:
        """Transforms one record."""
        stored, label, name = _record_source(element)
        size = _scalable_size(stored)
        factor = reduction_factor([(*size, self.resize)]) if size else 1
        if factor > 1:
            height, width = size
            image = Image.fromarray(decode_jpeg(stored, size, factor, name)).resize(
                _shorter_to(width, height, self.resize), _BILINEAR,
                box=(0, 0, width / factor, height / factor))
        else:
            image = resize_shorter(_pil(stored, name), self.resize)
        image = center_crop(image, self.crop)
        return {'image': np.asarray(image, dtype=np.uint8), 'label': np.int32(label)}


def multicrop_from_config(aug: Mapping[str, Any] | Any) -> MultiCrop:
    """Builds a `MultiCrop` from a dict-like (dict or ConfigDict) of its constructor args."""
    kwargs = {k: aug[k] for k in aug.keys()}
    for key in ('global_scale', 'local_scale', 'ratio', 'blur_radius'):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    try:
        return MultiCrop(**kwargs)
    except TypeError as e:
        raise TypeError(f'Bad augmentation config {sorted(kwargs)}: {e}') from e
