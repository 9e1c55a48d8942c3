"""AutoAugment and AugMix as torchvision runs them with its PIL backend: the ops, their
magnitude spaces, ImageNet's AutoAugment policy, and AugMix's mixing of op chains.

What Table 1 makes of them, and how they were checked against torchvision, is in
`pipelines.py`'s docstring.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

_NEAREST = Image.Resampling.NEAREST
_BILINEAR = Image.Resampling.BILINEAR


def _inverse_affine_matrix(center: Sequence[float], angle: float, translate: Sequence[float],
                           scale: float, shear: Sequence[float]) -> list[float]:
    """torchvision's `_get_inverse_affine_matrix`: output -> input pixel map for PIL."""
    rot = math.radians(angle)
    sx, sy = math.radians(shear[0]), math.radians(shear[1])
    (cx, cy), (tx, ty) = center, translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [x / scale for x in (d, -b, 0.0, -c, a, 0.0)]
    m[2] += m[0] * (-cx - tx) + m[1] * (-cy - ty) + cx
    m[5] += m[3] * (-cx - tx) + m[4] * (-cy - ty) + cy
    return m


def _affine(image: Image.Image, *, translate=(0, 0), shear=(0.0, 0.0), center=None,
            interpolation: Image.Resampling, fill: int) -> Image.Image:
    """torchvision F.affine (angle 0, scale 1) on a PIL image."""
    if center is None:
        center = (image.width * 0.5, image.height * 0.5)
    matrix = _inverse_affine_matrix(center, 0.0, translate, 1.0, shear)
    return image.transform(image.size, Image.Transform.AFFINE, matrix, interpolation,
                           fillcolor=(fill,) * len(image.getbands()))


def apply_op(image: Image.Image, name: str, magnitude: float, *,
             interpolation: Image.Resampling = _NEAREST, fill: int = 0) -> Image.Image:
    """torchvision's `_apply_op` with its PIL backend (F_pil: PIL's ImageOps, ImageEnhance)."""
    if name == 'ShearX':  # torchvision: shear atan(m) in degrees about the corner = (1, m, 0, ...)
        return _affine(image, shear=(math.degrees(math.atan(magnitude)), 0.0), center=(0, 0),
                       interpolation=interpolation, fill=fill)
    if name == 'ShearY':
        return _affine(image, shear=(0.0, math.degrees(math.atan(magnitude))), center=(0, 0),
                       interpolation=interpolation, fill=fill)
    if name == 'TranslateX':
        return _affine(image, translate=(int(magnitude), 0), interpolation=interpolation,
                       fill=fill)
    if name == 'TranslateY':
        return _affine(image, translate=(0, int(magnitude)), interpolation=interpolation,
                       fill=fill)
    if name == 'Rotate':
        return image.rotate(magnitude, interpolation, fillcolor=(fill,) * len(image.getbands()))
    if name == 'Brightness':
        return ImageEnhance.Brightness(image).enhance(1.0 + magnitude)
    if name == 'Color':
        return ImageEnhance.Color(image).enhance(1.0 + magnitude)
    if name == 'Contrast':
        return ImageEnhance.Contrast(image).enhance(1.0 + magnitude)
    if name == 'Sharpness':
        return ImageEnhance.Sharpness(image).enhance(1.0 + magnitude)
    if name == 'Posterize':
        return ImageOps.posterize(image, int(magnitude))
    if name == 'Solarize':
        return ImageOps.solarize(image, magnitude)
    if name == 'AutoContrast':
        return ImageOps.autocontrast(image)
    if name == 'Equalize':
        return ImageOps.equalize(image)
    if name == 'Invert':
        return ImageOps.invert(image)
    if name == 'Identity':
        return image
    raise ValueError(f'Unknown op {name!r}')


def _linspace32(start: float, end: float, num: int) -> np.ndarray:
    """torch.linspace in float32, to one ulp (torch's own last bit depends on the CPU's SIMD)."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float32((end32 - start32) / np.float32(num - 1))
    i = np.arange(num)
    return np.where(i < num // 2, start32 + step * i.astype(np.float32),
                    end32 - step * (num - 1 - i).astype(np.float32)).astype(np.float32)


def _posterize_bits(max_bits: int, num_bins: int) -> np.ndarray:
    # torch.round is half-to-even like np.round; no k / ((num_bins - 1) / 4) is a half anyway.
    return max_bits - np.round(np.arange(num_bins) / ((num_bins - 1) / 4)).astype(np.int64)


@functools.lru_cache(maxsize=64)
def autoaugment_space(num_bins: int, width: int, height: int) -> dict[str, tuple[Any, bool]]:
    """AutoAugment's `_augmentation_space`: op -> (magnitudes or None, signed)."""
    return {
        'ShearX': (_linspace32(0.0, 0.3, num_bins), True),
        'ShearY': (_linspace32(0.0, 0.3, num_bins), True),
        'TranslateX': (_linspace32(0.0, 150.0 / 331.0 * width, num_bins), True),
        'TranslateY': (_linspace32(0.0, 150.0 / 331.0 * height, num_bins), True),
        'Rotate': (_linspace32(0.0, 30.0, num_bins), True),
        'Brightness': (_linspace32(0.0, 0.9, num_bins), True),
        'Color': (_linspace32(0.0, 0.9, num_bins), True),
        'Contrast': (_linspace32(0.0, 0.9, num_bins), True),
        'Sharpness': (_linspace32(0.0, 0.9, num_bins), True),
        'Posterize': (_posterize_bits(8, num_bins), False),
        'Solarize': (_linspace32(255.0, 0.0, num_bins), False),
        'AutoContrast': (None, False),
        'Equalize': (None, False),
        'Invert': (None, False),
    }


# AutoAugmentPolicy.IMAGENET: 25 sub-policies of (op, probability, magnitude bin or None).
IMAGENET_POLICY = (
    (('Posterize', 0.4, 8), ('Rotate', 0.6, 9)),
    (('Solarize', 0.6, 5), ('AutoContrast', 0.6, None)),
    (('Equalize', 0.8, None), ('Equalize', 0.6, None)),
    (('Posterize', 0.6, 7), ('Posterize', 0.6, 6)),
    (('Equalize', 0.4, None), ('Solarize', 0.2, 4)),
    (('Equalize', 0.4, None), ('Rotate', 0.8, 8)),
    (('Solarize', 0.6, 3), ('Equalize', 0.6, None)),
    (('Posterize', 0.8, 5), ('Equalize', 1.0, None)),
    (('Rotate', 0.2, 3), ('Solarize', 0.6, 8)),
    (('Equalize', 0.6, None), ('Posterize', 0.4, 6)),
    (('Rotate', 0.8, 8), ('Color', 0.4, 0)),
    (('Rotate', 0.4, 9), ('Equalize', 0.6, None)),
    (('Equalize', 0.0, None), ('Equalize', 0.8, None)),
    (('Invert', 0.6, None), ('Equalize', 1.0, None)),
    (('Color', 0.6, 4), ('Contrast', 1.0, 8)),
    (('Rotate', 0.8, 8), ('Color', 1.0, 2)),
    (('Color', 0.8, 8), ('Solarize', 0.8, 7)),
    (('Sharpness', 0.4, 7), ('Invert', 0.6, None)),
    (('ShearX', 0.6, 5), ('Equalize', 1.0, None)),
    (('Color', 0.4, 0), ('Equalize', 0.6, None)),
    (('Equalize', 0.4, None), ('Solarize', 0.2, 4)),
    (('Solarize', 0.6, 5), ('AutoContrast', 0.6, None)),
    (('Invert', 0.6, None), ('Equalize', 1.0, None)),
    (('Color', 0.6, 4), ('Contrast', 1.0, 8)),
    (('Equalize', 0.8, None), ('Equalize', 0.6, None)),
)


def auto_augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """torchvision AutoAugment(IMAGENET).forward on a PIL image."""
    policy = IMAGENET_POLICY[int(rng.integers(len(IMAGENET_POLICY)))]
    probs, signs = rng.random(2), rng.integers(2, size=2)
    for i, (name, p, magnitude_id) in enumerate(policy):
        if probs[i] <= p:
            magnitudes, signed = autoaugment_space(10, image.width, image.height)[name]
            magnitude = float(magnitudes[magnitude_id]) if magnitude_id is not None else 0.0
            if signed and signs[i] == 0:
                magnitude *= -1.0
            image = apply_op(image, name, magnitude, interpolation=_NEAREST)
    return image


@functools.lru_cache(maxsize=64)
def augmix_space(num_bins: int, width: int, height: int,
                 all_ops: bool = True) -> dict[str, tuple[Any, bool]]:
    """AugMix's `_augmentation_space` (its key order is the order ops are drawn from)."""
    space = {
        'ShearX': (_linspace32(0.0, 0.3, num_bins), True),
        'ShearY': (_linspace32(0.0, 0.3, num_bins), True),
        'TranslateX': (_linspace32(0.0, width / 3.0, num_bins), True),
        'TranslateY': (_linspace32(0.0, height / 3.0, num_bins), True),
        'Rotate': (_linspace32(0.0, 30.0, num_bins), True),
        'Posterize': (_posterize_bits(4, num_bins), False),
        'Solarize': (_linspace32(255.0, 0.0, num_bins), False),
        'AutoContrast': (None, False),
        'Equalize': (None, False),
    }
    if all_ops:
        space.update({name: (_linspace32(0.0, 0.9, num_bins), True)
                      for name in ('Brightness', 'Color', 'Contrast', 'Sharpness')})
    return space


def augmix(image: Image.Image, rng: np.random.Generator, *, severity: int = 3,
           mixture_width: int = 3, chain_depth: int = -1, alpha: float = 1.0,
           all_ops: bool = True) -> np.ndarray:
    """torchvision AugMix.forward: uint8 [H, W, 3] mix of the image and augmentation chains."""
    space = augmix_space(10, image.width, image.height, all_ops)  # _PARAMETER_MAX = 10
    names = list(space)
    m = rng.dirichlet([alpha, alpha]).astype(np.float32)
    weights = rng.dirichlet([alpha] * mixture_width).astype(np.float32) * m[1]
    mix = m[0] * np.asarray(image, np.float32)
    for i in range(mixture_width):
        aug = image
        depth = chain_depth if chain_depth > 0 else int(rng.integers(1, 4))
        for _ in range(depth):
            name = names[int(rng.integers(len(names)))]
            magnitudes, signed = space[name]
            magnitude = float(magnitudes[rng.integers(severity)]) if magnitudes is not None else 0.0
            if signed and rng.integers(2):
                magnitude *= -1.0
            aug = apply_op(aug, name, magnitude, interpolation=_BILINEAR)
        mix += weights[i] * np.asarray(aug, np.float32)
    # `.to(torch.uint8)` truncates; the clip only guards float round-off above 255.
    return np.clip(mix, 0, 255).astype(np.uint8)
