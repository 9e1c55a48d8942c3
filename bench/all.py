r"""The benchmark suite (issue 7): train step (ours and PyTorch's), loader, generator.

  python -m bench.all                          # reduced size, for a CPU (see the wall time below)
  python -m bench.all --full_size --append     # the paper's size, bf16, on a GPU host

Runs `bench.train_step_speed` (every model and N, ours and the PyTorch reference, samples/s,
peak memory, ours / PyTorch), `bench.loader_speed` (decode + multi-crop samples/s per core) and,
where CUDA is available, `bench.generator_speed` (Stable Diffusion images/s against the naive
diffusers loop). The train-step flags apply (`--models`, `--num_frozen`, `--batch`, `--notorch`,
...). Prints a summary; `--append` adds it to bench/RESULTS.md as one dated section that names
the device, the library versions, the commit, the command, the load average at the start and
the end, and the wall time: on a shared machine a figure means little without how busy the
machine was (on a 2-core CPU under a load of 4-6 the reduced size took 15-17 minutes).
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time

from absl import app, flags

from bench import results, step_common, train_step_speed
from sdtl_jax import cli

NO_GPU = 'no GPU'
PARTS = ('train_step', 'loader', 'generator')
LIBRARIES = ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'torchvision', 'timm', 'grain',
             'diffusers')
# loader_speed's flags: the reduced size times fewer, smaller repeats of the same pipeline.
LOADER_ARGS = {False: ['--num_images=256', '--num_batches=4', '--repeats=3'], True: []}
# generator_speed's flags (a GPU only): fewer images at the reduced size.
GENERATOR_ARGS = {False: ['--images=16', '--naive_images=4', '--batch_size=8'], True: []}


def header() -> list[str]:
    """Where and with what the figures were measured."""
    versions = ', '.join(f'{name} {results.version(name)}' for name in LIBRARIES)
    return [f'device: {_gpus()}; {len(os.sched_getaffinity(0))} CPU cores, '
            f'{platform.machine()}, Python {platform.python_version()}',
            f'load average at start: {results.load_average()}',
            f'versions: {versions}',
            f'commit: {_commit()}']


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    train_step_speed.define_step_flags(flag_values)
    flags.adopt_module_key_flags(train_step_speed, flag_values=flag_values)
    flags.DEFINE_list('skip', [], f'Parts left out, of {", ".join(PARTS)}.',
                      flag_values=flag_values)
    flags.DEFINE_string('generator_model', 'CompVis/stable-diffusion-v1-4', 'Hub id or local '
                        'diffusers folder (GPU only).', flag_values=flag_values)
    flags.DEFINE_bool('append', False, 'Append to bench/RESULTS.md.', flag_values=flag_values)
    flags.register_validator('skip', lambda v: set(v) <= set(PARTS),
                             f'parts are {", ".join(PARTS)}', flag_values=flag_values)


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    run(flag_values)


def run(args: flags.FlagValues) -> list[str]:
    """Runs the parts; prints the summary, returns its lines and (--append) records them."""
    skip = set(args.skip)
    start = time.perf_counter()
    command = results.command('all', args)
    print(f'{datetime.date.today()}: {command}', flush=True)
    lines = header()
    print('\n'.join(lines), flush=True)
    if 'train_step' not in skip:
        lines += train_step_speed.run(args)
    if 'loader' not in skip:
        from bench import loader_speed
        lines += loader_speed.run(cli.parse(loader_speed, LOADER_ARGS[args.full_size]))
    if 'generator' not in skip:
        lines += generator_lines(args)
    lines.append(f'load average at end: {results.load_average()}; wall time '
                 f'{(time.perf_counter() - start) / 60:.1f} min')

    print(f'\nsummary, {datetime.date.today()}: {command}\n' + '\n'.join(lines))
    if args.append:
        results.append('all', lines, args)
    return lines


def generator_lines(args) -> list[str]:
    """generator_speed's lines on an NVIDIA GPU, else why it did not run."""
    if _gpus() == NO_GPU:
        line = ('generator: not run, needs a CUDA GPU (Stable Diffusion 1.4 at 512 x 384); on a '
                'GPU host: python -m bench.all --full_size, or python -m bench.generator_speed')
        print(line, flush=True)
        return [line]
    from bench import generator_speed
    try:
        return generator_speed.run(cli.parse(generator_speed, [
            f'--model={args.generator_model}', *GENERATOR_ARGS[args.full_size]]))
    except Exception as e:   # e.g. no weights, or no CUDA build of torch: the rest still counts
        line = f'generator: failed: {type(e).__name__}: {e}'
        print(line, flush=True)
        return [line]


def _gpus() -> str:
    """GPU names from nvidia-smi (without starting JAX or CUDA in this process)."""
    try:
        names = subprocess.run(['nvidia-smi', '--query-gpu=name', '--format=csv,noheader'],
                               capture_output=True, text=True, timeout=30).stdout.split('\n')
    except (OSError, subprocess.TimeoutExpired):
        names = []
    names = [n.strip() for n in names if n.strip()]
    return f'{len(names)} x {names[0]}' if names else NO_GPU


def _commit() -> str:
    def git(*args):
        return subprocess.run(['git', *args], cwd=step_common.ROOT, capture_output=True,
                              text=True).stdout.strip()
    commit = git('rev-parse', '--short', 'HEAD') or 'unknown'
    return commit + (' with uncommitted changes' if git('status', '--porcelain') else '')


if __name__ == '__main__':
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)   # grain's workers need the flags parsed
