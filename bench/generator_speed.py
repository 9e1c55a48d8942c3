r"""Generator speed: images/s of `python -m sdtl_jax.generate` against the naive diffusers loop.

  python -m bench.generator_speed --model=CompVis/stable-diffusion-v1-4 --append   # on a GPU
  python -m bench.generator_speed --tiny --width=64 --height=48 --steps=2          # CPU smoke

Both sides generate SD 1.4 images at 512 x 384 with 50 steps and guidance 2.0 (docs/paper.md
§8) from the same prompts and seeds, on the same device:
- naive: one prompt per pipeline call, diffusers' defaults (the paper took 73 GPU-hours for
  130,000 images, ~0.49 images/s), each image saved as a PNG file;
- ours: the generator of sdtl_jax.generate (batches, fp16, SDPA attention, channels_last,
  optional torch.compile, encoding and shard writing overlapped with the GPU), into shards.
Each side runs one warm-up batch first (compilation, cuDNN autotuning), not timed.
`--tiny` uses a tiny random pipeline (sdtl_jax.generate.tiny): it checks the code paths, and its
figures say nothing about a real model.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from bench import results
from sdtl_jax.data import generator as generator_lib
from sdtl_jax.data import sources
from sdtl_jax.generate import diffusion, prompts


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


def main(argv=None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default='CompVis/stable-diffusion-v1-4')
    parser.add_argument('--tiny', action='store_true',
                        help='a tiny random pipeline instead of --model (CPU smoke run)')
    parser.add_argument('--width', type=int, default=512)
    parser.add_argument('--height', type=int, default=384)
    parser.add_argument('--steps', type=int, default=50)
    parser.add_argument('--guidance', type=float, default=2.0)
    parser.add_argument('--images', type=int, default=64, help='images timed, ours')
    parser.add_argument('--naive_images', type=int, default=8, help='images timed, naive')
    parser.add_argument('--batch_size', type=int, default=16)
    parser.add_argument('--dtype', default='auto', choices=diffusion.DTYPES)
    parser.add_argument('--device', default='auto')
    parser.add_argument('--compile', default='', help="a torch.compile mode; '' = off")
    parser.add_argument('--vae_slicing', action='store_true')
    parser.add_argument('--append', action='store_true', help='append to bench/RESULTS.md')
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            from sdtl_jax.generate import tiny
            args.model = tiny.write_tiny_sd(os.path.join(tmp, 'tiny_sd'))
        requests = _requests(max(args.images, args.naive_images, args.batch_size))
        os.makedirs(os.path.join(tmp, 'naive'))
        naive_rate = naive(args, requests[:args.naive_images], os.path.join(tmp, 'naive'))
        our_rate, info = ours(args, requests[:args.images], os.path.join(tmp, 'ours'))
    model = 'tiny random SD pipeline' if args.tiny else args.model
    versions = diffusion.library_versions()
    lines = [f'{model}, {args.width} x {args.height}, {args.steps} steps, guidance '
             f'{args.guidance}, {info["device_name"]} ({info["dtype"]}), '
             f'{os.cpu_count()} CPU cores, {platform.machine()}, torch {versions["torch"]}, '
             f'diffusers {versions["diffusers"]}',
             f'  naive loop (1 prompt per call, PNG files): {naive_rate:7.3f} images/s '
             f'({args.naive_images} images)',
             f'  sdtl_jax.generate (batch {args.batch_size}, SDPA, channels_last'
             f'{", compile " + args.compile if args.compile else ""}, JPEG shards): '
             f'{our_rate:7.3f} images/s ({args.images} images), {our_rate / naive_rate:.2f}x']
    print('\n'.join(lines))
    if args.append:
        results.append('generator_speed', lines, argv)
    return lines


if __name__ == '__main__':
    main()
