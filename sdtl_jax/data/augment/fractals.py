"""Procedural IFS fractals: the default PixMix mixing set when no picture folder is given.

PixMix (Hendrycks et al., 2022) mixes training images with "fractals and feature
visualisations", a set of ~14k pictures downloaded from the authors' site. Nothing may be
downloaded here, so `generate` draws a stand-in of the same kind: coloured iterated-function-system
fractals on a black background, as in Anderson & Farrell, "Improving Fractal Pre-training"
(WACV 2022), whose fractals the PixMix set builds on.

Per fractal:
- 2 to 4 affine maps w_i(x) = A_i x + b_i with A_i = R(theta) diag(s1, s2) R(phi) D (D a random
  reflection), b_i ~ U(-1, 1)^2. The singular values follow Anderson & Farrell's "sigma factor":
  sum_i (s1_i + 2 s2_i) ~ U((5 + N) / 2, (6 + N) / 2) for N maps, the range they found to give
  neither dust nor blobs.
- The chaos game, vectorised over 1,024 independent walkers (one Python step moves all of them, so
  a fractal takes milliseconds): each step applies map i with probability ~ |det A_i|. Each map
  has a colour, and a walker's colour moves half-way to the colour of the map it applies, which
  paints every part of the attractor by the maps that lead to it.
- The points are fitted into the image (aspect kept, 4% margin) and each pixel gets its mean
  colour times a log-density brightness. Fractals covering under 3% of the image (a rare
  near-degenerate draw) are redrawn.

Fractal i depends only on (seed, i, size): `generate(8, s, seed)[:4] == generate(4, s, seed)`.
`load_or_generate` caches the array as one .npy file, written atomically, so processes that start
together never read a partial file.
"""

from __future__ import annotations

import colorsys
import os

import numpy as np

from sdtl_jax import fileio

# Bump when the drawing changes, so stale caches are not reused.
_VERSION = 1
_NUM_WALKERS = 1024
_BURN_IN_STEPS = 20      # contraction <= 1 per step: the walkers reach the attractor long before
_POINTS_PER_PIXEL = 2.0  # enough points for a dense picture, few enough to stay fast
_MARGIN = 0.04
_MIN_COVERAGE = 0.03
_MAX_TRIES = 50


def _singular_values(num_maps: int, rng: np.random.Generator) -> np.ndarray:
    """[num_maps, 2] singular values, 1 >= s1 >= s2 >= 0, with sum(s1 + 2 s2) the sigma factor."""
    budget = rng.uniform((5 + num_maps) / 2, (6 + num_maps) / 2)
    out = np.zeros((num_maps, 2))
    for i in range(num_maps):
        left = num_maps - i - 1  # maps after this one; each can take at most 1 + 2 * 1 = 3
        lo, hi = max(0.0, budget - 3.0 * left), min(3.0, budget)
        c = budget if left == 0 else rng.uniform(lo, hi)
        s1 = rng.uniform(c / 3.0, min(1.0, c))
        out[i] = s1, (c - s1) / 2.0
        budget -= c
    return out


def _rotation(angle: np.ndarray) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def _sample_system(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A [N, 2, 2], b [N, 2], colours [N, 3] in [0, 1]) of one random IFS."""
    num_maps = int(rng.integers(2, 5))
    sv = _singular_values(num_maps, rng)
    theta, phi = rng.uniform(0, 2 * np.pi, (2, num_maps))
    reflect = rng.choice([-1.0, 1.0], size=(num_maps, 2))
    a = _rotation(theta) @ (sv[:, :, None] * _rotation(phi)) * reflect[:, None, :]
    b = rng.uniform(-1, 1, (num_maps, 2))
    colours = np.array([colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0.5, 1.0),
                                            rng.uniform(0.7, 1.0)) for _ in range(num_maps)])
    return a, b, colours


def _chaos_game(a: np.ndarray, b: np.ndarray, colours: np.ndarray, num_points: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Points [P, 2] and their colours [P, 3] on the attractor of the IFS (a, b)."""
    det = np.abs(np.linalg.det(a))
    cdf = np.cumsum(det + 1e-3 * det.sum() + 1e-12)  # no map is never used
    cdf /= cdf[-1]
    x = rng.uniform(-1, 1, (_NUM_WALKERS, 2))
    col = np.repeat(colours.mean(0, keepdims=True), _NUM_WALKERS, 0)
    num_steps = -(-num_points // _NUM_WALKERS)
    points = np.empty((num_steps, _NUM_WALKERS, 2))
    point_colours = np.empty((num_steps, _NUM_WALKERS, 3))
    for step in range(_BURN_IN_STEPS + num_steps):
        k = np.minimum(np.searchsorted(cdf, rng.random(_NUM_WALKERS)), len(cdf) - 1)
        x = np.einsum('pij,pj->pi', a[k], x) + b[k]
        col = 0.5 * (col + colours[k])
        if step >= _BURN_IN_STEPS:
            points[step - _BURN_IN_STEPS] = x
            point_colours[step - _BURN_IN_STEPS] = col
    return points.reshape(-1, 2), point_colours.reshape(-1, 3)


def _render(points: np.ndarray, colours: np.ndarray, size: int) -> np.ndarray:
    """uint8 [size, size, 3]: mean colour per pixel times log-density brightness."""
    lo, hi = points.min(0), points.max(0)
    extent = max(float((hi - lo).max()), 1e-9)
    scale = size * (1 - 2 * _MARGIN) / extent
    offset = (size - (hi - lo) * scale) / 2  # centre the attractor
    pix = np.clip(((points - lo) * scale + offset).astype(np.int64), 0, size - 1)
    flat = pix[:, 1] * size + pix[:, 0]
    counts = np.bincount(flat, minlength=size * size).astype(np.float64)
    sums = np.stack([np.bincount(flat, colours[:, c], size * size) for c in range(3)], -1)
    hit = counts > 0
    mean = np.zeros_like(sums)
    mean[hit] = sums[hit] / counts[hit, None]
    brightness = np.log1p(counts) / np.log1p(counts.max())
    image = mean * np.sqrt(brightness)[:, None]  # sqrt: sparse arms stay visible
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8).reshape(size, size, 3)


def fractal(size: int, seed: int, index: int) -> np.ndarray:
    """Fractal `index` of the set `seed`: uint8 [size, size, 3]."""
    rng = np.random.default_rng([int(seed), int(index)])
    num_points = int(_POINTS_PER_PIXEL * size * size)
    image = None
    for _ in range(_MAX_TRIES):
        a, b, colours = _sample_system(rng)
        image = _render(*_chaos_game(a, b, colours, num_points, rng), size)
        if (image.max(-1) > 0).mean() >= _MIN_COVERAGE:
            break
    return image


def generate(num: int, size: int, seed: int = 0) -> np.ndarray:
    """`num` deterministic IFS fractals: uint8 [num, size, size, 3]."""
    if num < 1 or size < 8:
        raise ValueError(f'Need num >= 1 and size >= 8, got num={num}, size={size}')
    return np.stack([fractal(size, seed, i) for i in range(num)])


def cache_path(cache_dir: str, num: int, size: int, seed: int) -> str:
    """Where `load_or_generate` keeps the set (num, size, seed)."""
    return os.path.join(cache_dir, f'fractals_v{_VERSION}_{num}x{size}px_seed{seed}.npy')


def load_or_generate(cache_dir: str | None, num: int, size: int, seed: int = 0) -> np.ndarray:
    """`generate(num, size, seed)`, read from / written to `cache_dir` (None or '': no cache)."""
    if not cache_dir:
        return generate(num, size, seed)
    path = cache_path(cache_dir, num, size, seed)
    if os.path.exists(path):
        try:
            images = np.load(path)
            if images.shape == (num, size, size, 3) and images.dtype == np.uint8:
                return images
        except (OSError, ValueError):
            pass  # A corrupt cache file is redrawn and replaced below.
    images = generate(num, size, seed)
    os.makedirs(cache_dir, exist_ok=True)
    # Readers (grain workers) see the old file or the whole new one.
    with fileio.atomic_path(path) as tmp, open(tmp, 'wb') as f:
        np.save(f, images)
    return images
