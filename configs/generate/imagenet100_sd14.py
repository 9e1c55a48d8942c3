r"""Synthetic ImageNet-100 as in the paper (docs/paper.md §8): Stable Diffusion 1.4, 50 steps
(PNDM, the pipeline's scheduler), guidance 2.0, 512 x 384, prompt "<class>, <definition>",
1,300 images per class.

  python -m sdtl_jax.datasets.generate --config=configs/generate/imagenet100_sd14.py \
      --outdir=$SDTL_DATA_DIR/imagenet100_synth

Any value can be overridden, e.g. --config.model=/weights/sd-v1-4 --config.batch_size=32.
"""
from sdtl_jax.datasets.generate import config


def get_config():
    return config.base('imagenet100')
