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

import math
from collections.abc import Mapping
from typing import Any

import cv2
import grain
import numpy as np
from PIL import Image

from sdtl_jax.data import records
from sdtl_jax.data.augment import photometric

_BICUBIC = Image.Resampling.BICUBIC
_BILINEAR = Image.Resampling.BILINEAR


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
        stored, label, name = records.record_source(element)
        image, size = None, records.scalable_size(stored)
        if size is None:
            image = records.stored_array(stored, name)
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
            factor = records.reduction_factor((box[2], box[3], side)
                                      for kind, _, side, _, _ in kinds
                                      for box, _, _ in draws[kind])
            image = records.decode_jpeg(stored, size, factor, name)
        out = {}
        for kind, _, side, _, _ in kinds:
            out[kind] = np.stack([self.crop(image, box, flip, side, factor)
                                  for box, flip, _ in draws[kind]])
            out[f'{kind}_ops'] = np.stack([ops for _, _, ops in draws[kind]])
        out['label'] = np.int32(label)
        return out


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
