"""The eval view (docs/paper.md §6): shorter side to 256 (bilinear), centre crop 224.

`EvalTransform` is the eval pipeline's transform; `resize_shorter` and `center_crop` follow
torchvision's Resize(int) and CenterCrop(int), and `eval_view` scales them to any crop size,
the geometry of Table 1's `none` and `autoaugment` pipelines.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np
from PIL import Image

from sdtl_jax.data import records

_BILINEAR = Image.Resampling.BILINEAR

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
        stored, label, name = records.record_source(element)
        size = records.scalable_size(stored)
        factor = records.reduction_factor([(*size, self.resize)]) if size else 1
        if factor > 1:
            height, width = size
            image = Image.fromarray(records.decode_jpeg(stored, size, factor, name)).resize(
                _shorter_to(width, height, self.resize), _BILINEAR,
                box=(0, 0, width / factor, height / factor))
        else:
            image = resize_shorter(records.stored_pil(stored, name), self.resize)
        image = center_crop(image, self.crop)
        return {'image': np.asarray(image, dtype=np.uint8), 'label': np.int32(label)}


def resize_side(size: int) -> int:
    """The "resize 256" side for crop `size` (256 for 224)."""
    return int(round(size * 256 / 224))


def eval_view(image: Image.Image, size: int) -> Image.Image:
    """Resize(R) + CenterCrop(size)."""
    return center_crop(resize_shorter(image, resize_side(size)), size)
