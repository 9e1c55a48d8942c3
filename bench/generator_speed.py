r"""Generator speed: images/s of `python -m sdtl_jax.datasets.generate` against the naive
diffusers loop.

  python -m bench.generator_speed --model=CompVis/stable-diffusion-v1-4 --append   # on a GPU
  python -m bench.generator_speed --random_sd14 --append        # on a GPU, without the weights
  python -m bench.generator_speed --tiny --width=64 --height=48 --steps=2          # CPU smoke

Both sides generate SD 1.4 images at 512 x 384 with 50 steps and guidance 2.0 (docs/paper.md
§8) from the same prompts and seeds, on the same device:
- naive: one prompt per pipeline call, diffusers' defaults (the paper took 73 GPU-hours for
  130,000 images, ~0.49 images/s), each image saved as a PNG file;
- ours: the generator of sdtl_jax.datasets.generate (batches, fp16, SDPA attention,
  channels_last, optional torch.compile, encoding and shard writing overlapped with the GPU),
  into shards.
Each side runs one warm-up batch first (compilation, cuDNN autotuning), not timed.
`--random_sd14` times SD 1.4's full architecture with random weights
(sdtl_jax.datasets.generate.random_sd, drawn on --device and saved in float16 to a temporary
folder first): the same cost per image as the real weights, where they cannot be downloaded.
`--tiny` uses a tiny random pipeline (sdtl_jax.datasets.generate.tiny): it checks the code
paths, and its figures say nothing about a real model.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time

from absl import app, flags

from bench import results
from sdtl_jax import cli
from sdtl_jax.data import sources
from sdtl_jax.datasets.generate import diffusion, prompts
from sdtl_jax.datasets.generate import generator as generator_lib


def _requests(num: int, seed: int = 0) -> list[generator_lib.GenerationRequest]:
    """`num` requests spread over the ImageNet-100 classes (`prompt_c_d`)."""
    classes = sources.class_list('imagenet100')
    all_prompts = prompts.class_prompts('imagenet100', 'c_d', 'lemma')
    per_class = -(-num // len(classes))
    requests = generator_lib.requests_for(classes, all_prompts, per_class, seed)
    return [requests[i * per_class + j] for j in range(per_class) for i in range(len(classes))
            ][:num]


def naive(args, requests, out_dir: str) -> float:
    """images/s of the one-prompt-at-a-time loop (diffusers defaults, PNG files)."""
    import torch
    pipe, _ = diffusion.load_pipeline(args.model, dtype=args.dtype, device=args.device)
    run = _naive_call(pipe, args)
    run(requests[0], os.path.join(out_dir, 'warmup.png'))
    start = time.perf_counter()
    for i, request in enumerate(requests):
        run(request, os.path.join(out_dir, f'{i:05d}.png'))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return len(requests) / (time.perf_counter() - start)


def _naive_call(pipe, args):
    import torch

    def run(request, path):
        image = pipe(request.prompt, num_inference_steps=args.steps,
                     guidance_scale=args.guidance, width=args.width, height=args.height,
                     generator=torch.Generator('cpu').manual_seed(request.seed)).images[0]
        image.save(path)
    return run


def ours(args, requests, out_dir: str) -> tuple[float, dict]:
    """(images/s, pipeline info) of sdtl_jax's generator writing shards, after a warm-up batch."""
    pipe, info = diffusion.load_pipeline(args.model, dtype=args.dtype, device=args.device)
    speed = diffusion.optimize(pipe, attention='sdpa', channels_last=True,
                               compile_mode=args.compile, vae_slicing=args.vae_slicing)
    gen = diffusion.DiffusionGenerator(pipe, info, steps=args.steps, guidance=args.guidance,
                                       width=args.width, height=args.height, speed=speed)
    gen.generate(requests[:args.batch_size])   # warm-up
    classes = sources.class_list('imagenet100')
    start = time.perf_counter()
    generator_lib.write_generated_split(
        gen, requests, out_dir=out_dir, name='bench', classes=classes,
        settings=gen.settings(), requests_per_shard=len(requests), batch_size=args.batch_size,
        image_format='jpeg', verbose=False)
    return len(requests) / (time.perf_counter() - start), info


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    flags.DEFINE_string('model', 'CompVis/stable-diffusion-v1-4', 'Hub id or local diffusers '
                        'folder.', flag_values=flag_values)
    flags.DEFINE_bool('tiny', False, 'A tiny random pipeline instead of --model (CPU smoke '
                      'run).', flag_values=flag_values)
    flags.DEFINE_bool('random_sd14', False, "SD 1.4's architecture with random weights instead "
                      'of --model (no download).', flag_values=flag_values)
    for name, value, what in (('width', 512, 'Image width.'), ('height', 384, 'Image height.'),
                              ('steps', 50, 'Denoising steps.'),
                              ('images', 64, 'Images timed, ours.'),
                              ('naive_images', 8, 'Images timed, naive.'),
                              ('batch_size', 16, 'Batch size, ours.')):
        flags.DEFINE_integer(name, value, what, lower_bound=1, flag_values=flag_values)
    flags.DEFINE_float('guidance', 2.0, 'Classifier-free guidance scale.',
                       flag_values=flag_values)
    flags.DEFINE_enum('dtype', 'auto', diffusion.DTYPES, 'Weights and compute dtype.',
                      flag_values=flag_values)
    flags.DEFINE_string('device', 'auto', 'A torch device.', flag_values=flag_values)
    flags.DEFINE_string('compile', '', "A torch.compile mode; '' = off.", flag_values=flag_values)
    flags.DEFINE_bool('vae_slicing', False, 'Decode the batch one image at a time.',
                      flag_values=flag_values)
    flags.DEFINE_bool('append', False, 'Append to bench/RESULTS.md.', flag_values=flag_values)
    flags.mark_bool_flags_as_mutual_exclusive(['tiny', 'random_sd14'], flag_values=flag_values)


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    run(flag_values)


def run(args: flags.FlagValues) -> list[str]:
    """Times both sides; prints the lines, returns them and (--append) records them."""
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from sdtl_jax.datasets.generate import tiny
            args.model = tiny.write_tiny_sd(os.path.join(tmp, 'tiny_sd'))
        elif args.random_sd14:
            from sdtl_jax.datasets.generate import random_sd
            args.model = random_sd.write_sd14(os.path.join(tmp, 'random_sd14'),
                                              device=diffusion.resolve_device(args.device))
        requests = _requests(max(args.images, args.naive_images, args.batch_size))
        os.makedirs(os.path.join(tmp, 'naive'))
        naive_rate = naive(args, requests[:args.naive_images], os.path.join(tmp, 'naive'))
        our_rate, info = ours(args, requests[:args.images], os.path.join(tmp, 'ours'))
    model = ('tiny random SD pipeline' if args.tiny else
             "SD 1.4's architecture with random weights" if args.random_sd14 else args.model)
    versions = diffusion.library_versions()
    lines = [f'{model}, {args.width} x {args.height}, {args.steps} steps, guidance '
             f'{args.guidance}, {info["device_name"]} ({info["dtype"]}), '
             f'{os.cpu_count()} CPU cores, {platform.machine()}, torch {versions["torch"]}, '
             f'diffusers {versions["diffusers"]}',
             f'  naive loop (1 prompt per call, PNG files): {naive_rate:7.3f} images/s '
             f'({args.naive_images} images)',
             f'  sdtl_jax.datasets.generate (batch {args.batch_size}, SDPA, channels_last'
             f'{", compile " + args.compile if args.compile else ""}, JPEG shards): '
             f'{our_rate:7.3f} images/s ({args.images} images), {our_rate / naive_rate:.2f}x']
    print('\n'.join(lines))
    if args.append:
        results.append('generator_speed', lines, args)
    return lines


if __name__ == '__main__':
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
