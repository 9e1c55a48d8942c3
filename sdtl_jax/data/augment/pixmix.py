"""PixMix (Hendrycks et al., CVPR 2022) as its official code does it, and its mixing sets: an
image folder, or procedurally drawn fractals (`fractals.py`).

What Table 1 makes of it, and how it was checked against the official code, is in
`pipelines.py`'s docstring.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from sdtl_jax.data import records
from sdtl_jax.data.augment import eval_view, fractals

_BILINEAR = Image.Resampling.BILINEAR

DEFAULT_NUM_FRACTALS = 256  # 50 MB at 256 px; drawn in ~8 s once, then read from the cache


IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


def _pixmix_op(image: Image.Image, name: str, severity: float,
               rng: np.random.Generator) -> Image.Image:
    """One of PixMix's base ops (the AugMix paper's), level ~ U(0.1, severity) of 10."""
    if name == 'autocontrast':  # these two draw no level
        return ImageOps.autocontrast(image)
    if name == 'equalize':
        return ImageOps.equalize(image)
    level = rng.uniform(0.1, severity)  # sample_level; int_parameter / float_parameter below
    size = image.width  # the official IMAGE_SIZE: the (square) crop size
    if name == 'posterize':
        return ImageOps.posterize(image, 4 - int(level * 4 / 10))
    if name == 'rotate':
        degrees = int(level * 30 / 10)
        return image.rotate(-degrees if rng.uniform() > 0.5 else degrees, resample=_BILINEAR)
    if name == 'solarize':
        return ImageOps.solarize(image, 256 - int(level * 256 / 10))
    if name in ('shear_x', 'shear_y'):
        shear = float(level) * 0.3 / 10.
        shear = -shear if rng.uniform() > 0.5 else shear
        matrix = (1, shear, 0, 0, 1, 0) if name == 'shear_x' else (1, 0, 0, shear, 1, 0)
        return image.transform((size, size), Image.Transform.AFFINE, matrix, resample=_BILINEAR)
    if name in ('translate_x', 'translate_y'):
        shift = int(level * (size / 3) / 10)
        shift = -shift if rng.random() > 0.5 else shift
        matrix = (1, 0, shift, 0, 1, 0) if name == 'translate_x' else (1, 0, 0, 0, 1, shift)
        return image.transform((size, size), Image.Transform.AFFINE, matrix, resample=_BILINEAR)
    enhance = {'color': ImageEnhance.Color, 'contrast': ImageEnhance.Contrast,
               'brightness': ImageEnhance.Brightness, 'sharpness': ImageEnhance.Sharpness}
    return enhance[name](image).enhance(float(level) * 1.8 / 10. + 0.1)


PIXMIX_OPS = ('autocontrast', 'equalize', 'posterize', 'rotate', 'solarize', 'shear_x',
              'shear_y', 'translate_x', 'translate_y')


PIXMIX_ALL_OPS = PIXMIX_OPS + ('color', 'contrast', 'brightness', 'sharpness')


def _get_ab(beta: float, rng: np.random.Generator) -> tuple[np.float32, np.float32]:
    if rng.random() < 0.5:
        return np.float32(rng.beta(beta, 1)), np.float32(rng.beta(1, beta))
    return np.float32(1) + np.float32(rng.beta(1, beta)), -np.float32(rng.beta(1, beta))


def _add(img1: np.ndarray, img2: np.ndarray, beta: float, rng: np.random.Generator) -> np.ndarray:
    a, b = _get_ab(beta, rng)
    return (a * (img1 * 2 - 1) + b * (img2 * 2 - 1) + 1) / 2


def _multiply(img1: np.ndarray, img2: np.ndarray, beta: float,
              rng: np.random.Generator) -> np.ndarray:
    a, b = _get_ab(beta, rng)
    # b >= -1, so a black pixel of img2 gives at most 1e37: no float32 overflow; clipped later.
    return (img1 * 2) ** a * np.maximum(img2 * 2, np.float32(1e-37)) ** b / 2


def pixmix(orig: Image.Image, mixing_pic: Image.Image, rng: np.random.Generator, *, k: int = 4,
           beta: float = 4, aug_severity: float = 1, all_ops: bool = False) -> np.ndarray:
    """The official `pixmix(orig, mixing_pic, preprocess)`, rounded to uint8 [H, W, 3]."""
    ops = PIXMIX_ALL_OPS if all_ops else PIXMIX_OPS

    def augment_input(image: Image.Image) -> np.ndarray:
        image = _pixmix_op(image, ops[int(rng.integers(len(ops)))], aug_severity, rng)
        return np.asarray(image, np.float32) / 255  # ToTensor

    if rng.random() < 0.5:
        mixed = augment_input(orig)
    else:
        mixed = np.asarray(orig, np.float32) / 255
    for _ in range(int(rng.integers(k + 1))):
        if rng.random() < 0.5:
            other = augment_input(orig)
        else:
            other = np.asarray(mixing_pic, np.float32) / 255
        mixing = (_add, _multiply)[int(rng.integers(2))]
        mixed = np.clip(mixing(mixed, other, beta, rng), 0, 1)
    return np.rint(mixed * 255).astype(np.uint8)


class FolderMixingSet:
    """The pictures under a folder (recursive, sorted), decoded when drawn."""

    def __init__(self, directory: str):
        if not os.path.isdir(directory):
            raise ValueError(f'PixMix mixing set: {directory!r} is not a directory')
        paths = sorted(os.path.join(root, f) for root, _, files in os.walk(directory)
                       for f in files if f.lower().endswith(IMAGE_EXTENSIONS))
        # Open files until one decodes (not all: a set may hold 10^4 pictures); a bad one drawn
        # later raises with its path.
        for path in paths:
            try:
                self._read(path)
                break
            except (OSError, ValueError):
                continue
        else:
            raise ValueError(f'PixMix mixing set {directory!r} has no readable image '
                             f'({len(paths)} files with an image extension {IMAGE_EXTENSIONS})')
        self.directory, self.paths = directory, tuple(paths)

    @staticmethod
    def _read(path: str) -> Image.Image:
        with open(path, 'rb') as f:
            return records.decode_pil(f.read(), path)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Image.Image:
        return self._read(self.paths[index])


class ArrayMixingSet:
    """Pictures held in a uint8 [N, H, W, 3] array (the generated fractals)."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])


def mixing_set(pixmix_dir: str, cache_dir: str | None, size: int,
               num_fractals: int = DEFAULT_NUM_FRACTALS) -> FolderMixingSet | ArrayMixingSet:
    """The folder `pixmix_dir`; if '', fractals of side `eval_view.resize_side(size)` cached in
    `cache_dir`."""
    if pixmix_dir:
        return FolderMixingSet(os.path.expanduser(pixmix_dir))
    return ArrayMixingSet(fractals.load_or_generate(cache_dir, num_fractals,
                                                    eval_view.resize_side(size), seed=0))
