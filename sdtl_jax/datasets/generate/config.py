"""Generation configs: defaults (docs/paper.md §8) and validation, for configs/generate/*.py."""

from __future__ import annotations

import ml_collections

from sdtl_jax.datasets.generate import diffusion, prompts
from sdtl_jax.datasets.generate import generator as generator_lib

FAMILIES = {'imagenet100': 'imagenet100_synth', 'pets': 'pets_synth'}


def base(family: str) -> ml_collections.ConfigDict:
    """Every setting of `python -m sdtl_jax.datasets.generate`, with SD 1.4 / ImageNet-100
    defaults."""
    c = ml_collections.ConfigDict()
    # What to generate.
    c.family = family                  # class list and label order: 'imagenet100' | 'pets'
    c.name = FAMILIES[family]          # dataset name in meta.json (what training configs read)
    c.split = 'train'
    c.classes = ''                     # '' = all; else comma-separated class ids or labels
    c.images_per_class = 1300
    c.seed = 0                         # image i of class c: derive_seed(seed, c, i[, attempt])
    c.prompt = 'c_d'                   # template name (c, c_d, c_h, clip_pet) or free template
    c.class_names = 'lemma'            # imagenet100: lemma | clip; pets: clip | torchvision
    c.negative_prompt = ''
    # The model.
    c.model = 'CompVis/stable-diffusion-v1-4'   # hub id or local diffusers directory
    c.revision = ''                    # hub branch, tag or commit; '' = main
    c.local_files_only = False         # True: never touch the network (the HF cache or a dir)
    c.scheduler = ''                   # '' = the pipeline's (PNDM for SD 1.4); else a class name
    c.steps = 50
    c.guidance = 2.0
    c.width = 512
    c.height = 384
    c.safety_checker = True            # False: research use, flagged images are kept
    c.max_resamples = 10               # per image, when the safety checker fires
    # Speed: none changes the images beyond rounding (compare with bench/generator_speed.py).
    c.device = 'auto'                  # auto = this process's GPU, else cpu
    c.dtype = 'auto'                   # auto = float16 on GPU, float32 on CPU
    c.batch_size = 16
    c.attention = 'sdpa'
    c.channels_last = True
    c.compile = ''                     # '' = off; a torch.compile mode, e.g. 'max-autotune'
    c.vae_slicing = False              # decode images one at a time (saves memory)
    # Storage.
    c.image_format = 'jpeg'            # jpeg (quality below) | png (lossless, ~5x larger)
    c.jpeg_quality = 95
    c.records_per_shard = 1024         # ~80 MB of 512x384 JPEGs per shard
    c.encode_threads = 2               # JPEG encoding + shard writing, overlapped with the GPU
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    """Rejects bad values before any model is loaded, naming the key and what is allowed."""
    if c.family not in FAMILIES:
        raise ValueError(f'config.family={c.family!r}; allowed: {sorted(FAMILIES)}')
    positive = ('images_per_class', 'steps', 'width', 'height', 'batch_size',
                'records_per_shard', 'encode_threads')
    for key in positive:
        if c[key] < 1:
            raise ValueError(f'config.{key}={c[key]} must be >= 1')
    if c.width % 8 or c.height % 8:
        raise ValueError(f'config.width={c.width} and height={c.height} must be multiples of 8 '
                         f'(the VAE downsamples by 8)')
    if c.max_resamples < 0:
        raise ValueError(f'config.max_resamples={c.max_resamples} must be >= 0')
    if c.image_format not in generator_lib.IMAGE_FORMATS:
        raise ValueError(f'config.image_format={c.image_format!r}; allowed: '
                         f'{generator_lib.IMAGE_FORMATS}')
    if not 1 <= c.jpeg_quality <= 100:
        raise ValueError(f'config.jpeg_quality={c.jpeg_quality} must be in [1, 100]')
    if c.dtype not in diffusion.DTYPES:
        raise ValueError(f'config.dtype={c.dtype!r}; allowed: {diffusion.DTYPES}')
    if c.attention not in diffusion.ATTENTION:
        raise ValueError(f'config.attention={c.attention!r}; allowed: {diffusion.ATTENTION}')
    prompts.class_prompts(c.family, c.prompt, c.class_names)   # raises on a bad template/name
    prompts.select_classes(c.family, c.classes)
