"""Stable Diffusion 1.4's full architecture with random weights: no download, no hub.

  python -m sdtl_jax.datasets.generate.random_sd --out=/tmp/random_sd14 [--nosafety_checker]

The UNet (859.5 M parameters), VAE (83.7 M), CLIP ViT-L/14 text encoder (123.1 M), PNDM
scheduler and safety checker (a CLIP ViT-L/14 vision tower, 304.0 M) are built from the configs
CompVis/stable-diffusion-v1-4 publishes (below, as dicts), so a pipeline made here costs what
SD 1.4 costs: per step, per image, in GPU memory. The generator benchmark times it
(`python -m bench.generator_speed --random_sd14`) where the weights cannot be downloaded; its
images are noise, so it says nothing about what SD 1.4 draws.

The safety checker is built by default because SD 1.4 ships one and both sides of the benchmark
run it (diffusers' naive loop by default, `diffusion.load_pipeline` unless told otherwise): it
is part of the cost per image. Its concept embeddings and thresholds keep diffusers' initial
values (all ones), so it flags an image only if its embedding points exactly along the ones
vector: in practice never, as with the real checker on ImageNet prompts, so no image is
re-sampled and both sides make the same number of images.

The tokenizer is the byte-level one of `tiny.write_tokenizer` (514 ids, far below the text
encoder's 49,408): every prompt tokenizes, padded to 77 tokens as CLIP's tokenizer pads, so the
text encoder does the same work.

`write_sd14` saves the weights in float16 (2.7 GB with the checker, 2.1 GB without), as the
GPU runs them; `diffusion.load_pipeline` casts them to the dtype asked for. `build_sd14` makes
the pipeline in memory, for code that takes a pipeline object; on the 'meta' device it builds
only the shapes (instantly), which is how the tests count the parameters.
"""

from __future__ import annotations

import os
import tempfile

from absl import app, flags

from sdtl_jax import cli
from sdtl_jax.datasets.generate import diffusion

# The published configs (model_index.json's components), less the keys that only record
# provenance (_class_name, _diffusers_version, architectures, ...) and any the classes do not
# take.
UNET = {
    'act_fn': 'silu',
    'attention_head_dim': 8,
    'block_out_channels': [320, 640, 1280, 1280],
    'center_input_sample': False,
    'cross_attention_dim': 768,
    'down_block_types': ['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D',
                         'DownBlock2D'],
    'downsample_padding': 1,
    'flip_sin_to_cos': True,
    'freq_shift': 0,
    'in_channels': 4,
    'layers_per_block': 2,
    'mid_block_scale_factor': 1,
    'norm_eps': 1e-05,
    'norm_num_groups': 32,
    'out_channels': 4,
    'sample_size': 64,
    'up_block_types': ['UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D',
                       'CrossAttnUpBlock2D'],
}
VAE = {
    'act_fn': 'silu',
    'block_out_channels': [128, 256, 512, 512],
    'down_block_types': ['DownEncoderBlock2D'] * 4,
    'in_channels': 3,
    'latent_channels': 4,
    'layers_per_block': 2,
    'norm_num_groups': 32,
    'out_channels': 3,
    'sample_size': 512,
    'up_block_types': ['UpDecoderBlock2D'] * 4,
}
# openai/clip-vit-large-patch14's text tower. The published token ids (bos 0, eos 2, pad 1)
# are placeholders that match no CLIP vocabulary; TOKEN_IDS replaces them with our tokenizer's.
TEXT_ENCODER = {
    'attention_dropout': 0.0,
    'bos_token_id': 0,
    'dropout': 0.0,
    'eos_token_id': 2,
    'hidden_act': 'quick_gelu',
    'hidden_size': 768,
    'initializer_factor': 1.0,
    'initializer_range': 0.02,
    'intermediate_size': 3072,
    'layer_norm_eps': 1e-05,
    'max_position_embeddings': 77,
    'num_attention_heads': 12,
    'num_hidden_layers': 12,
    'pad_token_id': 1,
    'projection_dim': 768,
    'vocab_size': 49408,
}
TOKEN_IDS = {'bos_token_id': 0, 'eos_token_id': 1, 'pad_token_id': 1}   # tiny.write_tokenizer's
SCHEDULER = {
    'beta_end': 0.012,
    'beta_schedule': 'scaled_linear',
    'beta_start': 0.00085,
    'num_train_timesteps': 1000,
    'set_alpha_to_one': False,
    'skip_prk_steps': True,
    'steps_offset': 1,
    'trained_betas': None,
}
# The checker's CLIPConfig: only the vision tower and its projection are built.
SAFETY_CHECKER = {
    'projection_dim': 768,
    'vision_config': {'hidden_size': 1024, 'intermediate_size': 4096, 'num_attention_heads': 16,
                      'num_hidden_layers': 24, 'patch_size': 14, 'image_size': 224,
                      'hidden_act': 'quick_gelu', 'layer_norm_eps': 1e-05},
}
FEATURE_EXTRACTOR = {
    'crop_size': {'height': 224, 'width': 224},
    'do_center_crop': True,
    'do_convert_rgb': True,
    'do_normalize': True,
    'do_rescale': True,
    'do_resize': True,
    'image_mean': [0.48145466, 0.4578275, 0.40821073],
    'image_std': [0.26862954, 0.26130258, 0.27577711],
    'resample': 3,
    'rescale_factor': 1 / 255,
    'size': {'shortest_edge': 224},
}
DTYPES = ('float32', 'float16', 'bfloat16')


def build_sd14(*, seed: int = 0, safety_checker: bool = True, dtype: str = 'float32',
               device: str = 'cpu'):
    """SD 1.4's StableDiffusionPipeline with random weights, in memory, on `device`.

    The same `seed` and device give the same weights. A GPU draws them at once, where a 2-core
    CPU took half a minute; 'meta' builds only the shapes. Each model is cast to `dtype` as soon
    as it is built, so that float16 peaks at the UNet in float32 (3.4 GB) plus the rest in
    float16.
    """
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
    )

    from sdtl_jax.datasets.generate import tiny

    if dtype not in DTYPES:
        raise ValueError(f'dtype must be one of {DTYPES}, got {dtype!r}')
    torch_dtype = getattr(torch, dtype)
    with tempfile.TemporaryDirectory() as tmp:   # the tokenizer reads its files once
        tiny.write_tokenizer(tmp)
        tokenizer = CLIPTokenizer.from_pretrained(tmp)

    def cast(module):
        # torch's own `to`: diffusers' warns of modules to keep in float32 even when, as in
        # these models, there are none.
        return torch.nn.Module.to(module, torch_dtype).eval()

    torch.manual_seed(seed)   # seeds the CUDA generators too
    with torch.device(device):
        unet = cast(UNet2DConditionModel(**UNET))
        vae = cast(AutoencoderKL(**VAE))
        text_encoder = cast(CLIPTextModel(CLIPTextConfig(**{**TEXT_ENCODER, **TOKEN_IDS})))
        checker = extractor = None
        if safety_checker:
            checker = cast(StableDiffusionSafetyChecker(CLIPConfig(**SAFETY_CHECKER)))
            extractor = CLIPImageProcessor(**FEATURE_EXTRACTOR)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler(**SCHEDULER), safety_checker=checker,
        feature_extractor=extractor, requires_safety_checker=safety_checker)


def write_sd14(path: str, *, seed: int = 0, safety_checker: bool = True,
               dtype: str = 'float16', device: str = 'cpu') -> str:
    """`build_sd14`'s pipeline saved at `path` in diffusers' layout (model_index.json, one folder
    per component, safetensors), for `diffusion.load_pipeline(path)`; returns `path`."""
    build_sd14(seed=seed, safety_checker=safety_checker, dtype=dtype,
               device=device).save_pretrained(path, safe_serialization=True)
    return path


def parameter_counts(pipe) -> dict[str, int]:
    """{component: its parameter count} of the pipeline's torch models."""
    import torch
    return {name: sum(p.numel() for p in module.parameters())
            for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    flags.DEFINE_string('out', None, 'The pipeline directory to write.', required=True,
                        flag_values=flag_values)
    flags.DEFINE_integer('seed', 0, 'Seed of the random weights.', flag_values=flag_values)
    flags.DEFINE_bool('safety_checker', True, 'Include the safety checker, as SD 1.4 does.',
                      flag_values=flag_values)
    flags.DEFINE_enum('dtype', 'float16', DTYPES, 'dtype of the saved weights.',
                      flag_values=flag_values)
    flags.DEFINE_string('device', 'cpu', 'The torch device that draws the weights (cuda: '
                        'seconds faster).', flag_values=flag_values)


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    diffusion.quiet_torchvision_fallback()      # before diffusers is imported
    path = write_sd14(flag_values.out, seed=flag_values.seed,
                      safety_checker=flag_values.safety_checker, dtype=flag_values.dtype,
                      device=flag_values.device)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path)
               for f in files)
    print(f'wrote SD 1.4 with random weights ({flag_values.dtype}, {size / 2 ** 30:.1f} GiB) to '
          f'{path}')


if __name__ == '__main__':
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
