"""Decoding and augmentation on the host: NumPy/PIL ops usable as grain transforms.

- `decode_image`: encoded bytes -> RGB uint8 HxWx3, whatever the file's mode.
- `MultiCrop`: DINO multi-crop (SPEC.md section 5) as a grain `RandomMapTransform`.
- `EvalTransform`: shorter side to 256 (bilinear), centre crop 224 (SPEC.md section 6).

Outputs stay uint8 and un-normalised: the jitted step normalises on the device, which keeps host
work and host-to-device transfer small. Randomness comes only from the `np.random.Generator` that
grain passes to `random_map` (seeded from the pipeline seed and the element's index), so a fixed
seed gives the same crops whatever the number of threads.

The ops follow torchvision's PIL backend, which the reference (DINO, t-ReX) used:
RandomResizedCrop's 10-attempt sampling, ColorJitter via `ImageEnhance` with a random order,
`convert('L')` grayscale, PIL GaussianBlur with radius U(0.1, 2), `ImageOps.solarize`.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np
from PIL import Image, ImageFilter, ImageOps

from sdtl_jax.data import records

_BICUBIC = Image.Resampling.BICUBIC
_BILINEAR = Image.Resampling.BILINEAR


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
        raise ValueError(f'Cannot decode the image of record {record_id!r}: '
                         f'{type(e).__name__}: {e}') from e


def decode_image(data: bytes, record_id: str = '?') -> np.ndarray:
    """Decodes image bytes to RGB uint8 [H, W, 3]."""
    return np.asarray(decode_pil(data, record_id))


def record_image(element: Any) -> tuple[Image.Image, int]:
    """(RGB PIL image, label) from raw record bytes or a `records.decode_record` dict."""
    if isinstance(element, (bytes, bytearray)):
        element = records.decode_record(element)
    image = element['image']
    if isinstance(image, (bytes, bytearray)):
        pil = decode_pil(image, element.get('id', '?'))
    else:
        pil = _to_rgb(Image.fromarray(np.asarray(image)))
    return pil, int(element['label'])


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


def color_jitter(image: Image.Image, rng: np.random.Generator, *, brightness: float,
                 contrast: float, saturation: float, hue: float) -> Image.Image:
    """torchvision ColorJitter (PIL backend): the four adjustments in a random order.

    Each of brightness, contrast and saturation blends the image with a degenerate one (black,
    its mean grey, its grayscale), exactly as PIL's ImageEnhance, which torchvision calls; the
    blends are written out to skip ImageEnhance's per-call overhead on small crops.
    """
    factors = (rng.uniform(max(0.0, 1 - brightness), 1 + brightness),
               rng.uniform(max(0.0, 1 - contrast), 1 + contrast),
               rng.uniform(max(0.0, 1 - saturation), 1 + saturation),
               rng.uniform(-hue, hue))
    for op in rng.permutation(4):
        if op == 0:
            image = Image.blend(Image.new('RGB', image.size, 0), image, factors[0])
        elif op == 1:
            mean = int(np.asarray(image.convert('L')).mean() + 0.5)
            image = Image.blend(Image.new('RGB', image.size, (mean,) * 3), image, factors[1])
        elif op == 2:
            image = Image.blend(image.convert('L').convert('RGB'), image, factors[2])
        else:
            image = adjust_hue(image, factors[3])
    return image


def adjust_hue(image: Image.Image, hue_factor: float) -> Image.Image:
    """Shifts the hue by `hue_factor` of a full turn (torchvision F_pil.adjust_hue)."""
    h, s, v = image.convert('HSV').split()
    # Hue is stored as 0..255 for one turn, so the shift wraps modulo 256; torchvision truncates
    # the shift towards zero (float -> uint8 cast).
    shift = int(hue_factor * 255) % 256
    h_arr = (np.asarray(h, dtype=np.uint16) + shift) % 256
    h = Image.fromarray(h_arr.astype(np.uint8), 'L')
    return Image.merge('HSV', (h, s, v)).convert('RGB')


class MultiCrop(grain.transforms.RandomMap):
    """DINO multi-crop (SPEC.md section 5): `num_global` + `num_local` augmented crops, uint8.

    Input: a raw record (bytes) or a decoded record dict. Output: {'global': uint8[G, S, S, 3],
    'local': uint8[L, s, s, 3] (absent when L == 0), 'label': int32}. Per crop:
    RandomResizedCrop (bicubic) -> flip -> color jitter (p) -> grayscale (p) -> blur (p) ->
    solarize (p, global only). The SPEC's probabilities are the defaults: blur 0.2 global and
    0.5 local (DINO itself uses 1.0 / 0.1 on its two global crops; the paper's recipe has one).
    """

    def __init__(self, global_size: int = 224, local_size: int = 96, num_global: int = 1,
                 num_local: int = 8, global_scale: tuple[float, float] = (0.25, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.25),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5,
                 jitter_p: float = 0.8, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.2, hue: float = 0.1, grayscale_p: float = 0.2,
                 global_blur_p: float = 0.2, local_blur_p: float = 0.5,
                 blur_radius: tuple[float, float] = (0.1, 2.0), global_solarize_p: float = 0.2,
                 local_solarize_p: float = 0.0, solarize_threshold: int = 128):
        if num_global < 1 or num_local < 0:
            raise ValueError(f'Need num_global >= 1 and num_local >= 0, got {num_global}, '
                             f'{num_local}')
        self.global_size, self.local_size = int(global_size), int(local_size)
        self.num_global, self.num_local = int(num_global), int(num_local)
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.ratio = tuple(ratio)
        self.flip_p, self.jitter_p, self.grayscale_p = flip_p, jitter_p, grayscale_p
        self.jitter = dict(brightness=brightness, contrast=contrast, saturation=saturation,
                           hue=hue)
        self.global_blur_p, self.local_blur_p = global_blur_p, local_blur_p
        self.blur_radius = tuple(blur_radius)
        self.global_solarize_p, self.local_solarize_p = global_solarize_p, local_solarize_p
        self.solarize_threshold = solarize_threshold

    def crop(self, image: Image.Image, rng: np.random.Generator, *, size: int,
             scale: tuple[float, float], blur_p: float, solarize_p: float) -> np.ndarray:
        """One augmented crop, uint8 [size, size, 3]."""
        top, left, h, w = random_resized_crop_box(image.height, image.width, scale, self.ratio,
                                                  rng)
        # Crop and resize in one call: PIL resamples only the box, never the whole image.
        out = image.resize((size, size), _BICUBIC, box=(left, top, left + w, top + h))
        if rng.random() < self.flip_p:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < self.jitter_p:
            out = color_jitter(out, rng, **self.jitter)
        if rng.random() < self.grayscale_p:
            out = out.convert('L').convert('RGB')
        if rng.random() < blur_p:
            out = out.filter(ImageFilter.GaussianBlur(rng.uniform(*self.blur_radius)))
        if rng.random() < solarize_p:
            out = ImageOps.solarize(out, self.solarize_threshold)
        return np.asarray(out, dtype=np.uint8)

    def random_map(self, element: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Augments one record."""
        image, label = record_image(element)
        out = {'global': np.stack([
            self.crop(image, rng, size=self.global_size, scale=self.global_scale,
                      blur_p=self.global_blur_p, solarize_p=self.global_solarize_p)
            for _ in range(self.num_global)])}
        if self.num_local:
            out['local'] = np.stack([
                self.crop(image, rng, size=self.local_size, scale=self.local_scale,
                          blur_p=self.local_blur_p, solarize_p=self.local_solarize_p)
                for _ in range(self.num_local)])
        out['label'] = np.int32(label)
        return out


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """torchvision Resize(int): shorter side to `size`, longer side truncated, bilinear."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
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
    """Shorter side to `resize` (bilinear), centre crop `crop`: {'image': uint8, 'label'}."""

    def __init__(self, resize: int = 256, crop: int = 224):
        self.resize, self.crop = int(resize), int(crop)

    def map(self, element: Any) -> dict[str, np.ndarray]:
        """Transforms one record."""
        image, label = record_image(element)
        image = center_crop(resize_shorter(image, self.resize), self.crop)
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
