"""Embedded demo data, made on first use and cached; nothing is downloaded.

  python -m sdtl_jax.datasets.digits [--data_dir=DIR]    # makes both, prints the linear-probe gap

- `digits_real`: `sklearn.datasets.load_digits()` (1,797 handwritten digits, 8x8, values 0..16),
  split 80/20 into train/val, stratified, seed 0.
- `digits_synth`: digits rendered from the TrueType fonts that matplotlib ships, with random
  affine jitter and stroke width, brought to the real data's form: a 32x32 binary bitmap whose
  4x4 blocks are counted (0..16), as the UCI optdigits preprocessing did for the real ones.

Both are stored as 8x8 grayscale PNG with values round(v * 255 / 16). Fonts are too regular to
stand in for handwriting: a linear probe trained on synthetic digits is clearly worse on real
ones than one trained on real digits (`linear_probe_gap`), which makes this a small version of
the paper's synthetic-to-real gap.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw, ImageFont

from sdtl_jax import cli
from sdtl_jax.data import layout, records
from sdtl_jax.datasets import shards
from sdtl_jax.datasets.generate import generator as generator_lib

REAL_NAME, SYNTH_NAME = 'digits_real', 'digits_synth'
# The labels 0..9 and the words the synthetic digits' prompts use; the registry (`sources`)
# takes its class list from here.
CLASSES = tuple(str(d) for d in range(10))
DIGIT_NAMES = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
VAL_FRACTION = 0.2
SPLIT_SEED = 0
SYNTH_PER_CLASS = {'train': 200, 'val': 50}
SYNTH_SEEDS = {'train': 0, 'val': 1}  # distinct base seeds: val images never repeat train ones
# Fonts without digit glyphs (symbols, size variants, fallback boxes). `usable_fonts` also checks
# that the ten digits render, differ and are not the missing-glyph box.
SKIP_FONTS = ('cmsy10', 'cmex10', 'STIXSiz', 'STIXNonUni', 'Display', 'LastResort')
_CANVAS, _FONT_PX, _BITMAP = 128, 72, 32


def font_dir() -> str:
    """matplotlib's bundled TrueType fonts."""
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), 'fonts', 'ttf')


def _draw(font: ImageFont.FreeTypeFont, text: str, stroke: int = 0) -> np.ndarray:
    image = Image.new('L', (_CANVAS, _CANVAS))
    ImageDraw.Draw(image).text((_CANVAS / 2, _CANVAS / 2), text, fill=255, font=font,
                               anchor='mm', stroke_width=stroke, stroke_fill=255)
    return np.asarray(image)


@functools.cache
def usable_fonts() -> tuple[str, ...]:
    """Font files (basenames) whose ten digit glyphs render, differ and are real glyphs."""
    usable = []
    for name in sorted(os.listdir(font_dir())):
        if not name.endswith('.ttf') or any(s in name for s in SKIP_FONTS):
            continue
        font = ImageFont.truetype(os.path.join(font_dir(), name), _FONT_PX)
        glyphs = [_draw(font, str(d)) > 127 for d in range(10)]
        missing = _draw(font, '\uffff') > 127  # a code point no font here maps: .notdef box
        if (all(g.sum() > 0 for g in glyphs) and len({g.tobytes() for g in glyphs}) == 10
                and not any(np.array_equal(g, missing) for g in glyphs)):
            usable.append(name)
    if not usable:
        raise RuntimeError(f'No font in {font_dir()} renders digits')
    return tuple(usable)


@functools.cache
def _font(name: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(os.path.join(font_dir(), name), _FONT_PX)


def to_optdigits(bitmap: np.ndarray) -> np.ndarray:
    """Binary 32x32 -> 8x8 counts of set pixels per 4x4 block (0..16), as UCI optdigits."""
    return bitmap.reshape(8, 4, 8, 4).sum(axis=(1, 3)).astype(np.uint8)


def to_png_levels(counts: np.ndarray) -> np.ndarray:
    """0..16 counts -> uint8 grey levels round(v * 255 / 16)."""
    return np.rint(np.asarray(counts, np.float64) * 255 / 16).astype(np.uint8)


def from_png_levels(image: np.ndarray) -> np.ndarray:
    """Inverse of `to_png_levels` (exact: the 17 levels are distinct)."""
    return np.rint(np.asarray(image, np.float64) * 16 / 255).astype(np.uint8)


class FontDigitGenerator:
    """Renders digits from matplotlib's fonts with affine jitter (the demo's `Generator`).

    Per image, from the request's seed: a font, a stroke width, rotation, shear, x/y scale and a
    translation. The glyph is drawn large, transformed, fitted into a 32x32 box as the optdigits
    preprocessing fitted the scanned digits, binarised and counted in 4x4 blocks: uint8 8x8
    with values round(v * 255 / 16), the real data's form.
    """

    name = 'font_digits'

    def __init__(self, *, max_rotation: float = 12.0, max_shear: float = 0.25,
                 scale_range: tuple[float, float] = (0.75, 1.15), max_shift: float = 2.0,
                 stroke_range: tuple[int, int] = (0, 4), fonts: Sequence[str] | None = None):
        self.max_rotation = max_rotation
        self.max_shear = max_shear
        self.scale_range = tuple(scale_range)
        self.max_shift = max_shift
        self.stroke_range = tuple(stroke_range)
        self.fonts = tuple(fonts) if fonts else usable_fonts()

    def settings(self) -> dict[str, Any]:
        """The jitter ranges, recorded in every image's provenance."""
        return {'max_rotation': self.max_rotation, 'max_shear': self.max_shear,
                'scale_range': list(self.scale_range), 'max_shift': self.max_shift,
                'stroke_range': list(self.stroke_range)}

    def render(self, digit: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
        """(uint8 8x8 image, provenance) for one digit."""
        rng = np.random.default_rng(seed)
        font = self.fonts[rng.integers(len(self.fonts))]
        params = {
            'font': font,
            'stroke_width': int(rng.integers(self.stroke_range[0], self.stroke_range[1] + 1)),
            'rotation': float(rng.uniform(-self.max_rotation, self.max_rotation)),
            'shear': float(rng.uniform(-self.max_shear, self.max_shear)),
            'scale_x': float(rng.uniform(*self.scale_range)),
            'scale_y': float(rng.uniform(*self.scale_range)),
            'shift_x': float(rng.uniform(-self.max_shift, self.max_shift)),
            'shift_y': float(rng.uniform(-self.max_shift, self.max_shift)),
        }
        glyph = Image.fromarray(_draw(_font(font), str(digit), params['stroke_width']))
        # Inverse affine map (output -> input), about the canvas centre: rotation, shear, scale.
        t = math.radians(params['rotation'])
        forward = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]) @ (
            np.array([[1.0, params['shear']], [0.0, 1.0]])) @ np.diag(
            [params['scale_x'], params['scale_y']])
        inv = np.linalg.inv(forward)
        c = _CANVAS / 2
        offset = np.array([c, c]) - inv @ np.array([c, c])
        glyph = glyph.transform(glyph.size, Image.Transform.AFFINE,
                                (inv[0, 0], inv[0, 1], offset[0], inv[1, 0], inv[1, 1], offset[1]),
                                resample=Image.Resampling.BILINEAR)
        bitmap = self._fit(np.asarray(glyph), params)
        return to_png_levels(to_optdigits(bitmap)), params

    def _fit(self, glyph: np.ndarray, params: dict[str, Any]) -> np.ndarray:
        """Fits the ink's bounding box into 32x32 (keeping its aspect ratio), shifts, binarises."""
        rows, cols = np.nonzero(glyph > 127)
        if rows.size == 0:
            return np.zeros((_BITMAP, _BITMAP), np.uint8)
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        h, w = bottom - top, right - left
        # The longer side spans the box (optdigits normalised size), unless both scale factors
        # shrink the glyph: then it is drawn smaller, a variation the real scans rarely have.
        size = _BITMAP * min(1.0, max(params['scale_x'], params['scale_y']))
        factor = size / max(h, w)
        new_h, new_w = max(1, round(h * factor)), max(1, round(w * factor))
        crop = Image.fromarray(glyph[top:bottom, left:right]).resize(
            (new_w, new_h), Image.Resampling.BILINEAR)
        canvas = Image.new('L', (_BITMAP, _BITMAP))
        x = round((_BITMAP - new_w) / 2 + params['shift_x'])
        y = round((_BITMAP - new_h) / 2 + params['shift_y'])
        canvas.paste(crop, (min(max(x, 0), _BITMAP - new_w), min(max(y, 0), _BITMAP - new_h)))
        return (np.asarray(canvas) > 127).astype(np.uint8)

    def generate(self, requests: Sequence[generator_lib.GenerationRequest]
                 ) -> list[generator_lib.GeneratedImage]:
        """One 8x8 image per request (class index = digit)."""
        out = []
        for request in requests:
            image, params = self.render(request.class_index, request.seed)
            out.append(generator_lib.GeneratedImage(
                image=image, provenance={**params, **self.settings()}))
        return out


def _real_split_indices() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    labels = load_digits().target
    train, val = train_test_split(np.arange(len(labels)), test_size=VAL_FRACTION,
                                  random_state=SPLIT_SEED, stratify=labels)
    return {'train': np.sort(train), 'val': np.sort(val)}


def _write_real(dataset_dir: str) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    classes = list(CLASSES)
    for split, indices in _real_split_indices().items():
        with shards.ShardWriter(dataset_dir, split, num_classes=10) as writer:
            for i in indices:
                writer.write(records.encode_png(to_png_levels(digits.images[i])),
                             int(digits.target[i]), f'{REAL_NAME}/{split}/{i:04d}',
                             {'sklearn_index': int(i)})
        layout.add_split(dataset_dir, name=REAL_NAME, domain='real', classes=classes,
                          split=split, info=writer.close())


def _write_synth(dataset_dir: str) -> None:
    classes = list(CLASSES)
    prompts = list(DIGIT_NAMES)
    gen = FontDigitGenerator()
    for split, per_class in SYNTH_PER_CLASS.items():
        generator_lib.write_generated_dataset(
            gen, classes=classes, prompts=prompts, images_per_class=per_class,
            out_dir=dataset_dir, name=SYNTH_NAME, seed=SYNTH_SEEDS[split], split=split)


def _built(dataset_dir: str) -> bool:
    return os.path.isfile(os.path.join(dataset_dir, layout.META_FILE))


def ensure_demo_data(data_dir: str | os.PathLike | None = None) -> str:
    """Builds `digits_real` and `digits_synth` under `data_dir` unless they exist; returns it.

    Safe under concurrent first use: builders take a file lock, and each dataset is written to a
    temporary directory that is renamed into place only when complete.
    """
    data_dir = os.fspath(data_dir) if data_dir else layout.default_data_dir()
    wanted = {REAL_NAME: _write_real, SYNTH_NAME: _write_synth}
    if all(_built(os.path.join(data_dir, n)) for n in wanted):
        return data_dir
    os.makedirs(data_dir, exist_ok=True)
    with generator_lib.file_lock(os.path.join(data_dir, '.digits_demo.lock')):
        for name, write in wanted.items():
            final = os.path.join(data_dir, name)
            if _built(final):  # another process finished it while we waited for the lock
                continue
            tmp = tempfile.mkdtemp(prefix=f'.{name}.', dir=data_dir)
            try:
                write(tmp)
                os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
                if os.path.exists(final):  # a partial directory left by a killed old version
                    shutil.rmtree(final)
                os.rename(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return data_dir


def load_arrays(split) -> tuple[np.ndarray, np.ndarray]:
    """All images of a digits split (a `sources.DatasetSplit`, or anything with its shard
    `files`) as 64-d vectors of 0..16 counts, and their labels."""
    from array_record.python import array_record_data_source


    xs, ys = [], []
    with array_record_data_source.ArrayRecordDataSource(split.files) as source:
        for i in range(len(source)):
            record = records.decode_record(source[i])
            image = records.decode_image(record['image'], record['id'])[..., 0]
            xs.append(from_png_levels(image).reshape(-1))
            ys.append(record['label'])
    return np.stack(xs).astype(np.float64), np.asarray(ys)


class _Split:
    """The shard files of a split this module wrote (the registry's checks are for datasets
    made elsewhere; this module is what `sources` builds the demo with, so it does not read
    through it)."""

    def __init__(self, data_dir: str, name: str, split: str):
        folder = os.path.join(data_dir, name)
        self.files = [os.path.join(folder, f)
                      for f in layout.read_meta(folder)['splits'][split]['files']]


def linear_probe_gap(data_dir: str | os.PathLike | None = None) -> dict[str, float]:
    """Logistic regression on the 64 pixels: real val accuracy when trained on synth vs real.

    Returns {'synth_to_real': acc, 'real_to_real': acc, 'gap': difference} (accuracies in %).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data_dir = ensure_demo_data(data_dir)
    x_real, y_real = load_arrays(_Split(data_dir, REAL_NAME, 'train'))
    x_synth, y_synth = load_arrays(_Split(data_dir, SYNTH_NAME, 'train'))
    x_val, y_val = load_arrays(_Split(data_dir, REAL_NAME, 'val'))

    def accuracy(x, y):
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        return 100.0 * float((probe.fit(x, y).predict(x_val) == y_val).mean())

    synth, real = accuracy(x_synth, y_synth), accuracy(x_real, y_real)
    return {'synth_to_real': synth, 'real_to_real': real, 'gap': real - synth}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    flags.DEFINE_string('data_dir', None, 'Where the demo datasets go (default: '
                        '$SDTL_DATA_DIR, else ~/.cache/sdtl_jax/data).', flag_values=flag_values)


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    print(linear_probe_gap(flag_values.data_dir))


if __name__ == '__main__':
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
