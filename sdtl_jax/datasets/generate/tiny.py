"""Tiny, randomly initialised Stable Diffusion pipelines, written to a local directory.

  python -m sdtl_jax.datasets.generate.tiny --out=/tmp/tiny_sd [--sdxl]

They have the real pipelines' classes and diffusers' directory layout (model_index.json, one
folder per component), so every code path of the generator runs on them offline and in seconds
on a CPU: tests, the generator benchmark's CPU smoke run, and users without the weights.
Their images are coloured noise.

The tokenizer is written here too (no hub): a byte-level CLIP BPE vocabulary with every byte
as a token, with and without the end-of-word mark, so any prompt tokenizes.
"""

from __future__ import annotations

import os

from absl import app, flags

from sdtl_jax import cli, fileio
from sdtl_jax.datasets.generate import diffusion


def _byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each of the 256 bytes (byte-level BPE, as CLIP uses)."""
    printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
                 *range(ord('®'), ord('ÿ') + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tokenizer(path: str) -> int:
    """Writes a CLIP tokenizer to `path`; returns its vocabulary size."""
    from transformers import CLIPTokenizer

    os.makedirs(path, exist_ok=True)
    vocab = {'<|startoftext|>': 0, '<|endoftext|>': 1}
    for char in _byte_chars():
        for token in (char, char + '</w>'):
            vocab.setdefault(token, len(vocab))
    fileio.write_json(os.path.join(path, 'vocab.json'), vocab)
    with open(os.path.join(path, 'merges.txt'), 'w') as f:
        f.write('#version: 0.2\n')
    # CLIPTokenizer(vocab_file=...) ignores the files in transformers 5: load the folder.
    CLIPTokenizer.from_pretrained(path, model_max_length=77).save_pretrained(path)
    return len(vocab)


def _text_config(vocab_size: int, **overrides):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                          intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=vocab_size, max_position_embeddings=77, **overrides)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3,
                         down_block_types=['DownEncoderBlock2D'] * 2,
                         up_block_types=['UpDecoderBlock2D'] * 2, latent_channels=4,
                         norm_num_groups=2)


def _safety_checker():
    from diffusers.pipelines.stable_diffusion.safety_checker import (
        StableDiffusionSafetyChecker,
    )
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=1, vocab_size=100, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                           num_hidden_layers=1, image_size=32, patch_size=8),
        projection_dim=32)
    extractor = CLIPImageProcessor(size={'shortest_edge': 32}, crop_size={'height': 32,
                                                                          'width': 32})
    return StableDiffusionSafetyChecker(config).eval(), extractor


def write_tiny_sd(path: str, *, seed: int = 0, safety_checker: bool = True) -> str:
    """A tiny StableDiffusionPipeline (PNDM scheduler, SD 1.x's default) saved at `path`."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    vocab_size = write_tokenizer(os.path.join(path, 'tokenizer'))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
        up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=2)
    # steps_offset=1 as in SD 1.4's scheduler config (else reloads differ).
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                              skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    checker, extractor = _safety_checker() if safety_checker else (None, None)
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config(vocab_size)),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(path, 'tokenizer')), unet=unet,
        scheduler=scheduler, safety_checker=checker, feature_extractor=extractor,
        requires_safety_checker=safety_checker)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def write_tiny_sdxl(path: str, *, seed: int = 0) -> str:
    """A tiny StableDiffusionXLPipeline (two text encoders, Euler scheduler) saved at `path`."""
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vocab_size = write_tokenizer(os.path.join(path, 'tokenizer'))
    write_tokenizer(os.path.join(path, 'tokenizer_2'))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=16, in_channels=4,
        out_channels=4, down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'),
        up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type='text_time', addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 size/crop ids + pooled text
        cross_attention_dim=64, norm_num_groups=2)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule='scaled_linear', timestep_spacing='leading')
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config(vocab_size, projection_dim=32)),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(vocab_size, projection_dim=32)),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(path, 'tokenizer')),
        tokenizer_2=CLIPTokenizer.from_pretrained(os.path.join(path, 'tokenizer_2')),
        unet=unet, scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    flags.DEFINE_string('out', None, 'The pipeline directory to write.', required=True,
                        flag_values=flag_values)
    flags.DEFINE_bool('sdxl', False, 'An SDXL pipeline (default: Stable Diffusion 1.x).',
                      flag_values=flag_values)


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    diffusion.quiet_torchvision_fallback()      # before diffusers is imported
    (write_tiny_sdxl if flag_values.sdxl else write_tiny_sd)(flag_values.out)
    print(f'wrote a tiny random {"SDXL" if flag_values.sdxl else "SD"} pipeline to '
          f'{flag_values.out}')


if __name__ == '__main__':
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
