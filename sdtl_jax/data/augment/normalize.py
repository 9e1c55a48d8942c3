"""Normalisation on the device: pipelines ship uint8 images, the jitted step scales them.

Keeping uint8 until the device quarters host-to-device traffic and host work (docs/paper.md §5
normalises with the ImageNet statistics).
"""

import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images, dtype=jnp.float32):
    """uint8 [..., 3] in 0..255 -> (x / 255 - mean) / std in `dtype`."""
    x = images.astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
    return x.astype(dtype)
