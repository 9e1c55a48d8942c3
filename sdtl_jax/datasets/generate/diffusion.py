"""Stable Diffusion (1.x, XL) through diffusers: loading, speed settings, and a `Generator`.

`load_pipeline` takes a hub id (`CompVis/stable-diffusion-v1-4`) or a local directory in
diffusers' layout (model_index.json + component folders) and fails with instructions when the
weights cannot be reached. `optimize` applies the speed settings (SDPA attention,
channels_last, torch.compile, VAE slicing, which also switches itself on when a batch runs out
of GPU memory). `DiffusionGenerator` generates batches of requests,
each with its own CPU `torch.Generator` seeded from the request (the same starting noise on any
device), and re-samples any image the safety checker blanked with the request's next derived seed.
Batched kernels round differently for different batch sizes (measured on CPU, tiny pipeline:
2 of 6 images made in one batch differed from the same images made alone, by 1 level in 1 of
9,216 values), so each record also carries its batch (prompts, seeds, position): `regenerate`
runs that batch again, pixel-exact with the same speed settings, device and library versions.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sdtl_jax.datasets.generate import generator as generator_lib

DTYPES = ('auto', 'float32', 'float16', 'bfloat16')
ATTENTION = ('sdpa', 'default')
# Importing diffusers' pipelines reaches for CLIP's image processor (the safety checker's
# feature extractor) and SigLIP's; without torchvision, transformers 5 falls back to their PIL
# versions and says so on every run: a warning with nothing in it for the user to act on.
TORCHVISION_FALLBACK_LOGGER = 'transformers.utils.import_utils'
TORCHVISION_FALLBACK_WARNING = 'requires torchvision (not installed); falling back to'


class ModelNotFoundError(RuntimeError):
    """The pipeline's weights could not be loaded (no network, wrong id or path)."""


def _not_torchvision_fallback(record: logging.LogRecord) -> bool:
    return TORCHVISION_FALLBACK_WARNING not in record.getMessage()


def quiet_torchvision_fallback() -> None:
    """Drops transformers' warning that an image processor falls back to PIL for want of
    torchvision; its other messages stay."""
    logging.getLogger(TORCHVISION_FALLBACK_LOGGER).addFilter(_not_torchvision_fallback)


def library_versions() -> dict[str, str]:
    """Versions of what shapes the pixels: torch, diffusers, transformers, sdtl_jax."""
    import diffusers
    import torch
    import transformers

    import sdtl_jax
    return {'torch': torch.__version__, 'diffusers': diffusers.__version__,
            'transformers': transformers.__version__, 'sdtl_jax': sdtl_jax.__version__}


def resolve_device(device: str) -> str:
    """'auto' -> this process's GPU when there is one (by LOCAL_RANK or SLURM_LOCALID where a
    launcher shows every GPU of the host to every process), else 'cpu'."""
    import torch
    if device != 'auto':
        return device
    if torch.cuda.is_available():
        local = int(os.environ.get('LOCAL_RANK', os.environ.get('SLURM_LOCALID', 0)))
        return f'cuda:{local % torch.cuda.device_count()}'
    return 'cpu'


def resolve_dtype(dtype: str, device: str):
    """'auto' -> float16 on a GPU, float32 on a CPU (where half precision is much slower)."""
    import torch
    if dtype not in DTYPES:
        raise ValueError(f'dtype must be one of {DTYPES}, got {dtype!r}')
    if dtype == 'auto':
        dtype = 'float32' if device == 'cpu' else 'float16'
    return getattr(torch, dtype)


def _offline_message(model: str, error: Exception) -> str:
    return (f'Could not load the diffusion pipeline {model!r}: {type(error).__name__}: '
            f'{str(error).splitlines()[0] if str(error) else ""}\n'
            f'If this machine has no network, download the weights where there is one:\n'
            f'  hf download {model} --local-dir DIR   (or huggingface-cli download)\n'
            f'copy DIR here, and point the generator at it: --config.model=DIR (a directory '
            f'in diffusers\' layout, with model_index.json). With the weights in the Hugging '
            f'Face cache already, set HF_HUB_OFFLINE=1 or --config.local_files_only=True.')


def _snapshot_commit(model: str, revision: str) -> str:
    """The hub commit of a cached model ('' for a local directory or when unknown)."""
    if os.path.isdir(model):
        return ''
    try:
        import huggingface_hub
        path = huggingface_hub.snapshot_download(model, revision=revision or None,
                                                 local_files_only=True)
    except Exception:  # provenance only: an unknown commit is recorded as ''
        return ''
    return os.path.basename(os.path.normpath(path))


def load_pipeline(model: str, *, revision: str = '', local_files_only: bool = False,
                  dtype: str = 'auto', device: str = 'auto', safety_checker: bool = True,
                  scheduler: str = ''):
    """Loads a text-to-image pipeline onto `device`; returns (pipeline, info).

    `info` holds what provenance needs: model, revision, model_commit, pipeline and scheduler
    class, dtype, device, safety_checker.
    """
    quiet_torchvision_fallback()
    import diffusers
    import torch

    looks_local = model.startswith(('/', '.', '~')) or model.count('/') > 1
    if looks_local and not os.path.isdir(os.path.expanduser(model)):
        raise ModelNotFoundError(f'model directory {model} does not exist: give a directory in '
                                 f'diffusers\' layout (with model_index.json) or a hub id such '
                                 f'as CompVis/stable-diffusion-v1-4')
    model = os.path.expanduser(model)
    is_dir = os.path.isdir(model)
    if is_dir and not os.path.isfile(os.path.join(model, 'model_index.json')):
        raise ModelNotFoundError(f'{model} has no model_index.json: not a diffusers pipeline '
                                 f'directory (save one with pipeline.save_pretrained(DIR))')
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(
            model, revision=revision or None, dtype=torch_dtype,
            local_files_only=local_files_only or is_dir)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(_offline_message(model, e)) from e
    has_checker = getattr(pipe, 'safety_checker', None) is not None
    if not safety_checker and has_checker:
        print('warning: the safety checker is disabled (research use): images it would have '
              'blanked are stored as generated', file=sys.stderr, flush=True)
        pipe.safety_checker = None
    if scheduler:
        cls = getattr(diffusers, scheduler, None)
        if cls is None or not hasattr(cls, 'from_config'):
            raise ValueError(f'scheduler {scheduler!r} is not a diffusers scheduler class '
                             f'(e.g. DPMSolverMultistepScheduler, or "" for the pipeline\'s)')
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    info = {'model': model, 'revision': revision, 'model_commit': _snapshot_commit(model, revision),
            'pipeline': type(pipe).__name__, 'scheduler': type(pipe.scheduler).__name__,
            'dtype': str(torch_dtype).removeprefix('torch.'), 'device': device,
            'device_name': (torch.cuda.get_device_name(device) if device.startswith('cuda')
                            else 'cpu'),
            'safety_checker': getattr(pipe, 'safety_checker', None) is not None}
    return pipe, info


def optimize(pipe, *, attention: str = 'sdpa', channels_last: bool = True,
             compile_mode: str = '', vae_slicing: bool = False) -> dict[str, Any]:
    """Speed settings; none changes what is computed beyond floating-point rounding.

    Returns the settings, for provenance (they decide that rounding).
    """
    import torch
    from diffusers.models.attention_processor import AttnProcessor2_0

    if attention not in ATTENTION:
        raise ValueError(f'attention must be one of {ATTENTION}, got {attention!r}')
    if attention == 'sdpa':   # fused scaled-dot-product attention (flash / memory-efficient)
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        pipe.vae.set_attn_processor(AttnProcessor2_0())
    if channels_last:   # convolutions in NHWC: faster on tensor cores
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if vae_slicing:     # decode one image at a time: big batches fit in memory
        pipe.vae.enable_slicing()
    if compile_mode:
        pipe.unet = torch.compile(pipe.unet, mode=compile_mode, fullgraph=True)
    return {'attention': attention, 'channels_last': channels_last, 'compile': compile_mode,
            'vae_slicing': vae_slicing}


@dataclasses.dataclass
class DiffusionGenerator:
    """A `Generator` over a loaded diffusers pipeline.

    Attributes:
      pipe: the pipeline (`load_pipeline`).
      info: `load_pipeline`'s info (model, scheduler, dtype, ...), copied into provenance.
      steps, guidance, width, height, negative_prompt: the sampling settings.
      max_resamples: how often one image may be re-sampled before the run stops.
      speed: `optimize`'s settings, copied into provenance.
    """
    pipe: Any
    info: Mapping[str, Any]
    steps: int = 50
    guidance: float = 2.0
    width: int = 512
    height: int = 384
    negative_prompt: str = ''
    max_resamples: int = 10
    speed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    name: str = 'diffusers'

    def settings(self) -> dict[str, Any]:
        """What shapes the images (the plan's settings; device and versions excluded)."""
        keep = ('model', 'revision', 'pipeline', 'scheduler', 'dtype', 'safety_checker')
        return {**{k: self.info[k] for k in keep}, 'steps': self.steps,
                'guidance': self.guidance, 'width': self.width, 'height': self.height,
                'negative_prompt': self.negative_prompt}

    def provenance(self) -> dict[str, Any]:
        """Everything a record carries besides prompt, class and seed."""
        return {**self.settings(), 'model_commit': self.info['model_commit'],
                'device': self.info['device_name'], 'speed': dict(self.speed),
                'versions': library_versions()}

    def _call(self, prompts: Sequence[str], seeds: Sequence[int]):
        import torch

        generators = [torch.Generator('cpu').manual_seed(int(s)) for s in seeds]
        # '' = the pipeline's default: SD 1.x encodes "", SDXL uses zeros.
        negative = [self.negative_prompt] * len(prompts) if self.negative_prompt else None
        with torch.inference_mode():
            return self.pipe(prompt=list(prompts), negative_prompt=negative,
                             num_inference_steps=self.steps, guidance_scale=self.guidance,
                             width=self.width, height=self.height, generator=generators,
                             output_type='np')

    def run(self, prompts: Sequence[str], seeds: Sequence[int]) -> tuple[np.ndarray, list[bool]]:
        """uint8 [B, height, width, 3] images and, per image, whether the checker flagged it.

        When a batch runs out of GPU memory (the VAE decode of a big batch is the usual peak),
        the VAE decodes one image at a time from then on and the batch is made again.
        """
        import torch

        try:
            out = self._call(prompts, seeds)
        except torch.OutOfMemoryError:
            if self.speed.get('vae_slicing'):
                raise RuntimeError(f'out of GPU memory with a batch of {len(prompts)} even with '
                                   f'VAE slicing: lower --config.batch_size') from None
            print(f'warning: out of GPU memory with a batch of {len(prompts)}; the VAE decodes '
                  f'one image at a time from now on', file=sys.stderr, flush=True)
            torch.cuda.empty_cache()
            self.pipe.vae.enable_slicing()
            self.speed = {**self.speed, 'vae_slicing': True}
            out = self._call(prompts, seeds)
        # diffusers' own numpy -> PIL conversion: round(x * 255).
        images = (np.clip(out.images, 0.0, 1.0) * 255).round().astype(np.uint8)
        flagged = getattr(out, 'nsfw_content_detected', None) or [False] * len(prompts)
        return images, [bool(f) for f in flagged]

    def generate(self, requests: Sequence[generator_lib.GenerationRequest]
                 ) -> list[generator_lib.GeneratedImage]:
        """One image per request; flagged ones are re-sampled with their next derived seed."""
        base = self.provenance()
        results: list[generator_lib.GeneratedImage | None] = [None] * len(requests)
        attempts = [0] * len(requests)
        todo = list(range(len(requests)))
        while todo:
            seeds = [requests[i].seed_for(attempts[i]) for i in todo]
            prompts = [requests[i].prompt for i in todo]
            images, flagged = self.run(prompts, seeds)
            again = []
            for j, i in enumerate(todo):
                if not flagged[j]:
                    results[i] = generator_lib.GeneratedImage(images[j], {
                        **base, 'seed': seeds[j], 'resamples': attempts[i],
                        'batch_prompts': prompts, 'batch_seeds': seeds, 'batch_position': j})
                    continue
                attempts[i] += 1
                if attempts[i] > self.max_resamples:
                    r = requests[i]
                    raise RuntimeError(
                        f'the safety checker flagged all {attempts[i]} samples of class '
                        f'{r.class_name!r} index {r.index} (prompt {r.prompt!r}); raise '
                        f'--config.max_resamples or change the prompt')
                again.append(i)
            todo = again
        return results


def regenerate(gen: DiffusionGenerator, provenance: Mapping[str, Any]) -> np.ndarray:
    """The image of a stored record, made again with `gen`'s pipeline: its whole batch when the
    record has one (exact), else the image alone (equal up to batched kernels' rounding).

    Raises ValueError when `gen`'s settings differ from the record's.
    """
    differ = {k: (provenance.get(k), v) for k, v in gen.settings().items()
              if provenance.get(k) != v}
    if differ:
        raise ValueError(f'the record was generated with other settings (record, this '
                         f'generator): {differ}')
    if 'batch_seeds' in provenance:
        images, _ = gen.run(provenance['batch_prompts'], provenance['batch_seeds'])
        return images[provenance['batch_position']]
    images, _ = gen.run([provenance['prompt']], [provenance['seed']])
    return images[0]
