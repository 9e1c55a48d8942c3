"""The augmentation pipelines of the paper's Table 1, as grain transforms selected by name.

Table 1 trains ResNet-50 on real (R) or synthetic (S) ImageNet-100 without multi-crop, once per
pipeline. Every pipeline below except `multicrop` maps a record to {'global': uint8[1, S, S, 3],
'label': int32}: the keys of `transforms.MultiCrop` with one global crop and no local ones, less
its light-op vector 'global_ops', which the train step applies only where present; so the train
step is the same for all six. S is `global_size` (224; the demo uses 32), and "resize 256"
scales with it: R = round(S * 256 / 224).

- `none`: resize the shorter side to R (bilinear), centre crop S: the eval view (docs/paper.md §6).
- `pytorch`: the PyTorch ImageNet example: RandomResizedCrop(S) with torchvision's defaults
  (scale (0.08, 1), ratio (3/4, 4/3), bilinear, PIL's antialiased resize of the cropped region),
  horizontal flip p 0.5.
- `autoaugment`: torchvision `AutoAugment(AutoAugmentPolicy.IMAGENET)` with its PIL backend: one
  of the 25 sub-policies uniformly, each of its two ops applied with its probability, magnitudes
  from 10 bins (torch's float32 linspace values), signed ones negated with p 0.5, nearest
  interpolation and fill 0 for the geometric ops. Base geometry: resize R + centre crop S, NOT
  RandomResizedCrop: Table 1's final train loss with AutoAugment (0.033) is near that of `none`
  (0.007) and far below the PyTorch example's (0.308), which a model trained on random-resized
  crops would not reach, so the paper applied AutoAugment to the plain eval view.
- `augmix`: RandomResizedCrop(S) + flip as in `pytorch`, then torchvision `AugMix()` defaults:
  severity 3, mixture_width 3, chain_depth -1 (1 to 3 ops per chain), alpha 1, all_ops (its 13
  ops, bilinear, fill 0). The chains are mixed in float32 with Dirichlet/Beta weights and cast
  back to uint8 by truncation, as torchvision's `.to(torch.uint8)` does. Its train loss (0.318)
  is close to the PyTorch example's, hence the RandomResizedCrop base. torchvision runs AugMix's
  ops on the uint8 tensor it converts a PIL image to; here they run through PIL, the backend
  `autoaugment` uses. The two backends agree to one grey level, except along the edge of the
  area a rotation or shear fills with 0 (~1% of the pixels), where their bilinear samplers treat
  the outside differently.
- `pixmix`: RandomResizedCrop(S) + flip, then PixMix (Hendrycks et al., CVPR 2022) as in the
  official code (github.com/andyzoujm/pixmix, imagenet.py with its defaults): k 4 (0 to 4 mixing
  rounds), beta 4, aug_severity 1, the 9 AugMix-paper ops (no --all-ops), the `add` and
  `multiply` mixings in float32 exactly as `pixmix_utils.py` writes them. The mixing picture
  is a random picture of the mixing set, resized to R and randomly cropped to S, the official
  ImageNet mixing-set transform (Resize(256) + RandomCrop(224); no flip, not RandomResizedCrop).
  The float result is rounded to uint8 (the only departure: the official code feeds the float
  tensor to the network). The mixing set is the image folder `pixmix_dir` (searched
  recursively, torchvision's image extensions); when `pixmix_dir` is '', it is
  `pixmix_num_fractals` (default 256) procedurally drawn IFS fractals of side R
  (`fractals.py`, the stand-in for PixMix's downloaded fractal set), cached in
  `pixmix_cache_dir`. The fractal set always uses seed 0: it is a data set, not run randomness.
- `multicrop`: `transforms.MultiCrop` (DINO, docs/paper.md §5), the project's default.

All randomness comes from the `np.random.Generator` grain passes to `random_map`, so a fixed
pipeline seed gives the same images whatever the number of threads. torch's random streams
cannot be reproduced; the distributions and the order of decisions are torchvision's and PixMix's.

Checked once against the references, fed the same random draws (torchvision 0.28 from a scratch
directory; it is no dependency): every AutoAugment/AugMix op at every magnitude bin on a PIL
image, AutoAugment over 300 draws, RandomResizedCrop + flip and Resize + CenterCrop are
bit-identical; AugMix (tensor backend there) differs by 0.1 grey levels on average; PixMix
against the official `pixmix()` (torch tensors) differs by one level in 54 of 45M values
(float32 `pow` of two libraries).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from sdtl_jax import config_lib
from sdtl_jax.data import fractals, transforms

DEFAULT_NUM_FRACTALS = 256  # 50 MB at 256 px; drawn in ~8 s once, then read from the cache
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')

_NEAREST = Image.Resampling.NEAREST
_BILINEAR = Image.Resampling.BILINEAR


def resize_side(size: int) -> int:
    """The "resize 256" side for crop `size` (256 for 224)."""
    return int(round(size * 256 / 224))


# --- Geometry (torchvision's PIL backend) -----------------------------------------------------

def eval_view(image: Image.Image, size: int) -> Image.Image:
    """Resize(R) + CenterCrop(size)."""
    return transforms.center_crop(transforms.resize_shorter(image, resize_side(size)), size)


def random_resized_crop_flip(image: Image.Image, size: int,
                             rng: np.random.Generator) -> Image.Image:
    """RandomResizedCrop(size) with torchvision's defaults, then RandomHorizontalFlip()."""
    top, left, h, w = transforms.random_resized_crop_box(image.height, image.width, (0.08, 1.0),
                                                         (3 / 4, 4 / 3), rng)
    # Crop, then resize, as torchvision's resized_crop does: `resize(box=...)` would let the
    # antialiasing filter read pixels outside the crop.
    out = image.crop((left, top, left + w, top + h)).resize((size, size), _BILINEAR)
    if rng.random() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def random_crop(image: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """torchvision RandomCrop(size) of an image at least `size` on each side."""
    top = int(rng.integers(0, image.height - size + 1))
    left = int(rng.integers(0, image.width - size + 1))
    return image.crop((left, top, left + size, top + size))


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


# --- torchvision's op set (transforms/autoaugment.py, `_apply_op`) ------------------------------

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


# --- PixMix (github.com/andyzoujm/pixmix, pixmix_utils.py and imagenet.py) ---------------------

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
            return transforms.decode_pil(f.read(), path)

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
    """The folder `pixmix_dir`; if '', fractals of side resize_side(size) cached in cache_dir."""
    if pixmix_dir:
        return FolderMixingSet(os.path.expanduser(pixmix_dir))
    return ArrayMixingSet(fractals.load_or_generate(cache_dir, num_fractals, resize_side(size),
                                                    seed=0))


# --- grain transforms ------------------------------------------------------------------------

class _SingleCrop(grain.transforms.RandomMap):
    """A record -> {'global': uint8[1, S, S, 3], 'label': int32}; subclasses define `augment`."""

    def __init__(self, size: int = 224):
        self.size = int(size)

    def augment(self, image: Image.Image, rng: np.random.Generator) -> Any:
        raise NotImplementedError

    def random_map(self, element: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Augments one record."""
        image, label = transforms.record_image(element)
        out = np.array(self.augment(image, rng), dtype=np.uint8)  # a writable copy
        return {'global': out[None], 'label': np.int32(label)}


class NoAugment(_SingleCrop):
    """`none`: the eval view."""

    def augment(self, image: Image.Image, rng: np.random.Generator) -> Any:
        return eval_view(image, self.size)


class PytorchExample(_SingleCrop):
    """`pytorch`: RandomResizedCrop + horizontal flip."""

    def augment(self, image: Image.Image, rng: np.random.Generator) -> Any:
        return random_resized_crop_flip(image, self.size, rng)


class AutoAugment(_SingleCrop):
    """`autoaugment`: the eval view, then AutoAugment(IMAGENET)."""

    def augment(self, image: Image.Image, rng: np.random.Generator) -> Any:
        return auto_augment(eval_view(image, self.size), rng)


class AugMix(_SingleCrop):
    """`augmix`: RandomResizedCrop + flip, then AugMix with torchvision's defaults."""

    def augment(self, image: Image.Image, rng: np.random.Generator) -> Any:
        return augmix(random_resized_crop_flip(image, self.size, rng), rng)


class PixMix(_SingleCrop):
    """`pixmix`: RandomResizedCrop + flip, then PixMix with a picture of `mixing`."""

    def __init__(self, size: int, mixing: FolderMixingSet | ArrayMixingSet):
        super().__init__(size)
        self.mixing = mixing

    def augment(self, image: Image.Image, rng: np.random.Generator) -> Any:
        orig = random_resized_crop_flip(image, self.size, rng)
        picture = self.mixing[int(rng.integers(len(self.mixing)))]
        picture = random_crop(transforms.resize_shorter(picture, resize_side(self.size)),
                              self.size, rng)
        return pixmix(orig, picture, rng)


def _get(aug: Mapping[str, Any] | Any, key: str, default: Any) -> Any:
    return aug[key] if key in aug else default


def build(aug: Mapping[str, Any] | Any) -> grain.transforms.RandomMap:
    """The pipeline `aug['name']` (one of config_lib.AUGMENTATIONS), from a dict or ConfigDict.

    Keys: `global_size` (default 224), `pixmix_dir`, `pixmix_cache_dir`, `pixmix_num_fractals`
    (pixmix), and MultiCrop's arguments (multicrop gets every key but `name` and `pixmix_*`).
    Keys a pipeline does not use are ignored.
    """
    name = _get(aug, 'name', None)
    if name not in config_lib.AUGMENTATIONS:
        raise ValueError(f'Unknown augmentation {name!r}: choose one of '
                         f'{config_lib.AUGMENTATIONS}')
    if name == 'multicrop':
        return transforms.multicrop_from_config(
            {k: aug[k] for k in aug.keys() if k != 'name' and not k.startswith('pixmix_')})
    size = int(_get(aug, 'global_size', 224))
    if name == 'pixmix':
        return PixMix(size, mixing_set(_get(aug, 'pixmix_dir', ''),
                                       _get(aug, 'pixmix_cache_dir', ''), size,
                                       int(_get(aug, 'pixmix_num_fractals',
                                                DEFAULT_NUM_FRACTALS))))
    return {'none': NoAugment, 'pytorch': PytorchExample, 'autoaugment': AutoAugment,
            'augmix': AugMix}[name](size)
