"""The light ops of DINO multi-crop, run on the accelerator inside the jitted train step.

The host draws every random decision of a crop (`sample`, into one float32 vector, so the
iterator state and seeds keep the augmentation reproducible) and does the data-dependent
geometry (crop, resize, flip); the device applies colour jitter, grayscale, blur and solarize
to the whole batch at once (`apply`). On a 2-core CPU the host part is then about 3x cheaper
(bench/RESULTS.md), and on a GPU the light ops cost next to nothing.

The ops follow torchvision's PIL backend (docs/paper.md §5), as the paper's recipe (DINO,
t-ReX) ran them: ColorJitter's four adjustments in a random order, each a blend with a
degenerate image as PIL's ImageEnhance does; ITU-R 601 grayscale; Gaussian blur (PIL's
GaussianBlur(radius) is a Gaussian of std `radius`, edges repeating the border); solarize.
Values are truncated (blends) or rounded and clipped to 0..255 after every op, as PIL's uint8
images are, so the results agree with PIL's to about one grey level (tests/test_photometric.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

# Layout of a crop's op vector.
JITTER, BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3, 4
ORDER = slice(5, 9)       # the jitter ops, in the order they are applied
GRAYSCALE, BLUR_SIGMA, SOLARIZE = 9, 10, 11
NUM_OPS = 12
MAX_BLUR_SIGMA = 2.0      # the kernel covers +-3 sigma of the largest blur
SOLARIZE_THRESHOLD = 128  # values >= this are inverted (PIL ImageOps.solarize)
_LUMA = (0.299, 0.587, 0.114)


def sample(rng: np.random.Generator, *, jitter_p: float, brightness: float, contrast: float,
           saturation: float, hue: float, grayscale_p: float, blur_p: float,
           blur_radius: tuple[float, float], solarize_p: float) -> np.ndarray:
    """One crop's random light ops (torchvision's draws, in DINO's order), float32[NUM_OPS]."""
    if blur_radius[1] > MAX_BLUR_SIGMA:
        raise ValueError(f'blur radius up to {MAX_BLUR_SIGMA} is supported, got {blur_radius}')
    ops = np.zeros(NUM_OPS, np.float32)
    ops[BRIGHTNESS:HUE + 1] = (1.0, 1.0, 1.0, 0.0)
    ops[ORDER] = np.arange(4)
    if rng.random() < jitter_p:
        ops[JITTER] = 1.0
        ops[BRIGHTNESS] = rng.uniform(max(0.0, 1 - brightness), 1 + brightness)
        ops[CONTRAST] = rng.uniform(max(0.0, 1 - contrast), 1 + contrast)
        ops[SATURATION] = rng.uniform(max(0.0, 1 - saturation), 1 + saturation)
        ops[HUE] = rng.uniform(-hue, hue)
        ops[ORDER] = rng.permutation(4)
    ops[GRAYSCALE] = rng.random() < grayscale_p
    if rng.random() < blur_p:
        ops[BLUR_SIGMA] = rng.uniform(*blur_radius)
    ops[SOLARIZE] = rng.random() < solarize_p
    return ops


def _quantize(x):
    return jnp.clip(jnp.round(x), 0.0, 255.0)


def _blend(degenerate, x, factor):
    """PIL's Image.blend(degenerate, x, factor), which ImageEnhance uses: truncated to uint8."""
    return jnp.clip(jnp.floor(degenerate + _per_image(factor) * (x - degenerate)), 0.0, 255.0)


def _gray(x):
    """Luma [..., 1] of RGB in 0..255, rounded as PIL's convert('L')."""
    return jnp.round(x @ jnp.asarray(_LUMA, x.dtype))[..., None]


def _per_image(v):
    return v[:, None, None, None]


def _adjust_hue(x, shift_turns):
    """Rotates the hue by `shift_turns` of a turn (HSV hexcone, as PIL's HSV mode)."""
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    maxc = jnp.maximum(jnp.maximum(r, g), b)
    minc = jnp.minimum(jnp.minimum(r, g), b)
    delta = maxc - minc
    safe = jnp.where(delta > 0, delta, 1.0)
    h = jnp.where(maxc == r, (g - b) / safe,
                  jnp.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = jnp.where(delta > 0, h / 6.0, 0.0)
    h = jnp.mod(h + shift_turns[:, None, None], 1.0)
    s = jnp.where(maxc > 0, delta / jnp.where(maxc > 0, maxc, 1.0), 0.0)
    v = maxc
    i = jnp.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.astype(jnp.int32) % 6
    choose = lambda *c: jnp.select([i == k for k in range(6)], c)  # noqa: E731
    return jnp.stack([choose(v, q, p, p, t, v), choose(t, v, v, q, p, p),
                      choose(p, p, t, v, v, q)], axis=-1)


def _blur(x, sigma):
    """Separable Gaussian of per-image std `sigma` (0 = identity), border pixels repeated."""
    radius = math.ceil(3 * MAX_BLUR_SIGMA)
    taps = jnp.arange(-radius, radius + 1, dtype=x.dtype)
    safe = jnp.where(sigma > 0, sigma, 1.0)[:, None]
    weights = jnp.exp(-0.5 * (taps[None, :] / safe) ** 2)
    weights = jnp.where(sigma[:, None] > 0, weights, (taps == 0).astype(x.dtype)[None, :])
    weights = weights / weights.sum(axis=1, keepdims=True)
    for axis in (1, 2):
        size = x.shape[axis]
        padded = jnp.pad(x, [(0, 0)] + [(radius, radius) if a == axis else (0, 0)
                                         for a in (1, 2)] + [(0, 0)], mode='edge')
        out = 0.0
        for k in range(2 * radius + 1):
            window = jax.lax.slice_in_dim(padded, k, k + size, axis=axis)
            out = out + window * _per_image(weights[:, k])
        x = out
    return x


def apply(images, ops):
    """Applies each crop's light ops: uint8 [N, H, W, 3] + float32 [N, NUM_OPS] -> float32
    [N, H, W, 3] in 0..255 (integer-valued), ready for `normalize.normalize`."""
    x = images.astype(jnp.float32)
    order = ops[:, ORDER].astype(jnp.int32)
    for position in range(4):
        op = order[:, position]
        # Every op runs on every crop and `where` keeps the one this crop applies now: the
        # batch stays one vectorised computation, which is cheap next to the network.
        x = jnp.where(_per_image(op == 0), _blend(0.0, x, ops[:, BRIGHTNESS]), x)
        mean = _per_image(jnp.round(jnp.mean(_gray(x), axis=(1, 2, 3))))
        x = jnp.where(_per_image(op == 1), _blend(mean, x, ops[:, CONTRAST]), x)
        x = jnp.where(_per_image(op == 2), _blend(_gray(x), x, ops[:, SATURATION]), x)
        # torchvision shifts PIL's 8-bit hue by int(hue * 255) of 256 steps per turn.
        shift = jnp.trunc(ops[:, HUE] * 255.0) / 256.0
        hue_on = (op == 3) & (ops[:, JITTER] > 0) & (shift != 0)
        x = jnp.where(_per_image(hue_on), _quantize(_adjust_hue(x, shift)), x)
    x = jnp.where(_per_image(ops[:, GRAYSCALE] > 0), jnp.broadcast_to(_gray(x), x.shape), x)
    x = jnp.where(_per_image(ops[:, BLUR_SIGMA] > 0), _quantize(_blur(x, ops[:, BLUR_SIGMA])), x)
    return jnp.where(_per_image(ops[:, SOLARIZE] > 0) & (x >= SOLARIZE_THRESHOLD), 255.0 - x, x)
