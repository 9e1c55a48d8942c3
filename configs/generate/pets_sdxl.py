r"""Synthetic Oxford-IIIT Pet (docs/paper.md §8): Stable Diffusion XL base, 100 images per
breed, CLIP's pet template "a photo of a <breed>, a type of pet." (the paper's own prompts are
not published).

  python -m sdtl_jax.datasets.generate --config=configs/generate/pets_sdxl.py \
      --outdir=$SDTL_DATA_DIR/pets_synth

Where the paper is silent: 1024 x 1024 (SDXL's native size; it degrades far below it) and the
ImageNet-100 setting's 50 steps and guidance 2.0 (low guidance keeps the images diverse).
"""
from sdtl_jax.datasets.generate import config


def get_config():
    c = config.base('pets')
    c.model = 'stabilityai/stable-diffusion-xl-base-1.0'
    c.images_per_class = 100
    c.prompt = 'clip_pet'
    c.class_names = 'clip'
    c.width = 1024
    c.height = 1024
    c.batch_size = 8
    c.records_per_shard = 512
    return c
