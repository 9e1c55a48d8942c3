"""The augmentation pipelines of the paper's Table 1, as grain transforms selected by name.

Table 1 trains ResNet-50 on real (R) or synthetic (S) ImageNet-100 without multi-crop, once per
pipeline. Every pipeline below except `multicrop` maps a record to {'global': uint8[1, S, S, 3],
'label': int32}: the keys of `multicrop.MultiCrop` with one global crop and no local ones, less
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
- `multicrop`: `multicrop.MultiCrop` (DINO, docs/paper.md §5), the project's default.

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

from collections.abc import Mapping
from typing import Any

import grain
import numpy as np
from PIL import Image

from sdtl_jax import config_lib
from sdtl_jax.data import records
from sdtl_jax.data.augment import eval_view, multicrop, pixmix, policies

_BILINEAR = Image.Resampling.BILINEAR


# --- Geometry (torchvision's PIL backend) -----------------------------------------------------


def random_resized_crop_flip(image: Image.Image, size: int,
                             rng: np.random.Generator) -> Image.Image:
    """RandomResizedCrop(size) with torchvision's defaults, then RandomHorizontalFlip()."""
    top, left, h, w = multicrop.random_resized_crop_box(image.height, image.width, (0.08, 1.0),
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


# --- torchvision's op set (transforms/autoaugment.py, `_apply_op`) ------------------------------


# --- PixMix (github.com/andyzoujm/pixmix, pixmix_utils.py and imagenet.py) ---------------------


# --- grain transforms ------------------------------------------------------------------------

class _SingleCrop(grain.transforms.RandomMap):
    """A record -> {'global': uint8[1, S, S, 3], 'label': int32}; subclasses define `augment`."""

    def __init__(self, size: int = 224):
        self.size = int(size)

    def augment(self, image: Image.Image, rng: np.random.Generator) -> Any:
        raise NotImplementedError

    def random_map(self, element: Any, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Augments one record."""
        image, label = records.record_image(element)
        out = np.array(self.augment(image, rng), dtype=np.uint8)  # a writable copy
        return {'global': out[None], 'label': np.int32(label)}


class NoAugment(_SingleCrop):
    """`none`: the eval view."""

    def augment(self, image: Image.Image, rng: np.random.Generator) -> Any:
        return eval_view.eval_view(image, self.size)


class PytorchExample(_SingleCrop):
    """`pytorch`: RandomResizedCrop + horizontal flip."""

    def augment(self, image: Image.Image, rng: np.random.Generator) -> Any:
        return random_resized_crop_flip(image, self.size, rng)


class AutoAugment(_SingleCrop):
    """`autoaugment`: the eval view, then AutoAugment(IMAGENET)."""

    def augment(self, image: Image.Image, rng: np.random.Generator) -> Any:
        return policies.auto_augment(eval_view.eval_view(image, self.size), rng)


class AugMix(_SingleCrop):
    """`augmix`: RandomResizedCrop + flip, then AugMix with torchvision's defaults."""

    def augment(self, image: Image.Image, rng: np.random.Generator) -> Any:
        return policies.augmix(random_resized_crop_flip(image, self.size, rng), rng)


class PixMix(_SingleCrop):
    """`pixmix`: RandomResizedCrop + flip, then PixMix with a picture of `mixing`."""

    def __init__(self, size: int, mixing: pixmix.FolderMixingSet | pixmix.ArrayMixingSet):
        super().__init__(size)
        self.mixing = mixing

    def augment(self, image: Image.Image, rng: np.random.Generator) -> Any:
        orig = random_resized_crop_flip(image, self.size, rng)
        picture = self.mixing[int(rng.integers(len(self.mixing)))]
        picture = random_crop(eval_view.resize_shorter(picture, eval_view.resize_side(self.size)),
                              self.size, rng)
        return pixmix.pixmix(orig, picture, rng)


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
        return multicrop.multicrop_from_config(
            {k: aug[k] for k in aug.keys() if k != 'name' and not k.startswith('pixmix_')})
    size = int(_get(aug, 'global_size', 224))
    if name == 'pixmix':
        return PixMix(size, pixmix.mixing_set(_get(aug, 'pixmix_dir', ''),
                                       _get(aug, 'pixmix_cache_dir', ''), size,
                                       int(_get(aug, 'pixmix_num_fractals',
                                                pixmix.DEFAULT_NUM_FRACTALS))))
    return {'none': NoAugment, 'pytorch': PytorchExample, 'autoaugment': AutoAugment,
            'augmix': AugMix}[name](size)
