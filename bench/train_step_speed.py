r"""Train-step throughput: our jitted multi-crop step against the PyTorch reference.

Goals (issue 7), at the paper's size on one H100 (bf16): ResNet-50 multi-crop training at
least 2,000 samples/s (each sample 1 x 224 + 8 x 96 crops, batch 64), and our step at least as
fast as the PyTorch reference (`bench/torch_step.py`) on the same GPU. Issue 2's check is the
ratio to N = 0: a frozen prefix must cost no backward pass (`bench/freeze_speed.py`).

  python -m bench.train_step_speed                         # reduced CPU size, both models
  python -m bench.train_step_speed --full_size --append    # the paper's size (on a GPU)
  python -m bench.train_step_speed --models=resnet50 --num_frozen=0,16 --no_torch

Ours is the training step itself: `train.train_step` with `optim.make`'s SGD and frozen prefix,
jitted with the state donated as `train.train_and_evaluate` does, multi-crop's light ops
included (`--no_light_ops` leaves them out; PyTorch's loader does them on the host). The batch
is put on the device once: the loader has its own benchmark. Every (framework, model, N) runs in
a fresh process (`step_common.measure_isolated`). Prints samples/s (a sample is one image with
all its crops) from the median step time after warm-up, the ratio to N = 0, peak memory (device
peak on a GPU, max RSS on a CPU) and ours / PyTorch; `--append` adds it to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
from typing import Any

import jax
import jax.numpy as jnp

import sdtl_jax
from bench import results, step_common
from sdtl_jax import config_lib, models, optim, train

GIB = 2 ** 30


def build(spec: step_common.StepSpec):
    """Our jitted train step for `spec`: returns (step, initial state, batch on the device)."""
    dtype = jnp.dtype(step_common.resolve_dtype(spec, jax.devices()[0].platform))
    model = models.build({'name': spec.model, **spec.model_kwargs},
                         num_classes=spec.num_classes, num_frozen=spec.num_frozen, dtype=dtype)
    # unsafe_rbg compiles several times faster than threefry (models.init); the values of the
    # random weights do not change the step's cost.
    variables = models.init(model, jax.random.key(0, impl='unsafe_rbg'),
                            image_size=spec.global_size)
    # No warm-up in the schedule: its first step has LR 0, and every timed step should update.
    tx, lr_fn = optim.make(step_common.recipe(spec), variables['params'], model.layer_names(),
                           warmup_steps=0, total_steps=1000)
    state = train.initial_state(variables['params'], variables['batch_stats'], tx,
                                jax.random.PRNGKey(1))
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, lr_fn=lr_fn,
                                     dtype=dtype), donate_argnums=0)
    return step, state, jax.device_put(step_common.synthetic_batch(spec))


def measure(spec: step_common.StepSpec) -> dict[str, Any]:
    """Times our step in this process: samples/s, s/step, first step, peak memory, device."""
    sdtl_jax.use_compilation_cache()   # as the training entry points: a re-run compiles less
    return time_step(spec, *build(spec))


def time_step(spec: step_common.StepSpec, step, state, batch) -> dict[str, Any]:
    """`measure` on a step from `build` (its first call is the compilation)."""
    metrics = None

    def run():
        nonlocal state, metrics
        state, metrics = step(state, batch)
        return state, metrics

    timing = step_common.time_steps(run, jax.block_until_ready, warmup=spec.warmup,
                                    repeats=spec.repeats)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}   # None on the CPU backend
    peak = stats.get('peak_bytes_in_use')
    return {**timing, 'samples_per_s': spec.batch / timing['step_s'],
            'peak_bytes': peak or step_common.max_rss_bytes(),
            'memory': 'device peak' if peak else 'max RSS', 'device': device.device_kind,
            'dtype': step_common.resolve_dtype(spec, device.platform),
            'loss': float(metrics['loss'])}


def add_arguments(parser: argparse.ArgumentParser, **defaults) -> None:
    """The step's flags (shared with `bench.all` and `bench.freeze_speed`)."""
    parser.add_argument('--full_size', action='store_true',
                        help="the paper's batch and crops (1 x 224 + 8 x 96), dtype auto "
                             '(bf16 on a GPU); default: the reduced CPU size')
    parser.add_argument('--models', default=','.join(step_common.MODELS))
    parser.add_argument('--num_frozen', default='0,8,16,17', help='comma-separated N')
    for flag, kind in (('batch', int), ('num_global', int), ('global_size', int),
                       ('num_local', int), ('local_size', int), ('repeats', int),
                       ('warmup', int), ('dtype', str)):
        parser.add_argument(f'--{flag}', type=kind, help='overrides the size preset')
    parser.add_argument('--small', action='store_true',
                        help="the models' small variants (config_lib.SMALL_MODELS, same 18 "
                             'layers): a quick check of the code, not a speed figure')
    parser.add_argument('--no_light_ops', dest='light_ops', action='store_false',
                        help="leave multi-crop's light ops out of our step")
    parser.add_argument('--no_torch', dest='torch', action='store_false',
                        help='skip the PyTorch reference')
    parser.set_defaults(**defaults)


def specs(args) -> dict[str, list[step_common.StepSpec]]:
    """{model: [its spec for each N]} from the flags of `add_arguments`."""
    overrides = {k: getattr(args, k) for k in ('batch', 'num_global', 'global_size', 'num_local',
                                               'local_size', 'repeats', 'warmup', 'dtype')
                 if getattr(args, k) is not None}
    return {model: [step_common.paper_spec(
                        model, full_size=args.full_size, num_frozen=int(n),
                        light_ops=args.light_ops,
                        model_kwargs=config_lib.SMALL_MODELS[model] if args.small else {},
                        **overrides)
                    for n in args.num_frozen.split(',')]
            for model in args.models.split(',')}


def run(args) -> list[str]:
    """Measures every (model, N), ours and (with `args.torch`) PyTorch's; prints and returns
    the lines."""
    lines = []

    def say(line):
        print(line, flush=True)
        lines.append(line)

    say('train step, median of the timed steps after warm-up, each model and N in a fresh '
        'process; a sample is one image with all its crops; ours: JAX, jitted'
        + ', light ops on the device' * args.light_ops
        + '; PyTorch: the eager reference, bench/torch_step.py' * args.torch)
    for model, model_specs in specs(args).items():
        spec = model_specs[0]
        local = f' + {spec.num_local} x {spec.local_size}' if spec.num_local else ''
        say(f'  {model}: batch {spec.batch}, {spec.num_global} x {spec.global_size}{local} '
            f'crops, {spec.num_classes} classes, {spec.warmup} warm-up + {spec.repeats} timed '
            'steps')
        reference = args.torch
        if reference and not step_common.reference_matches(spec):
            say(f'    PyTorch reference not run: no small variant of {model} in PyTorch')
            reference = False
        base, devices = None, set()
        for spec in model_specs:
            ours = step_common.measure_isolated('jax', spec)
            ref = step_common.measure_isolated('torch', spec) if reference else {}
            if 'missing' in ref:   # e.g. no timm: say so once, run the rest
                say(f'    PyTorch reference not run: {ref.pop("missing")}')
                reference = False
            if spec.num_frozen == 0 and 'step_s' in ours:
                base = ours['step_s']
            say(_line(spec, ours, ref, base))
            devices |= {f'    {name}: {r["dtype"]} on {r["device"]}, peak = {r["memory"]}'
                        for name, r in (('ours', ours), ('PyTorch', ref)) if 'device' in r}
        for device in sorted(devices, reverse=True):   # ours first
            say(device)
    return lines


def _line(spec, ours: dict[str, Any], ref: dict[str, Any], base: float | None) -> str:
    line = f'    N={spec.num_frozen:2d}: ours {_figures(ours, base)}'
    if ref:
        line += f' | PyTorch {_figures(ref)}'
    if 'samples_per_s' in ours and 'samples_per_s' in ref:
        line += f' | ours/PyTorch {ours["samples_per_s"] / ref["samples_per_s"]:.2f}'
    return line


def _figures(result: dict[str, Any], base: float | None = None) -> str:
    if 'error' in result:
        return f'failed: {result["error"]}'
    ratio = f', x{result["step_s"] / base:.2f} of N=0' if base else ''
    return (f'{result["samples_per_s"]:8.2f} samples/s ({result["step_s"]:.3f} s/step{ratio}, '
            f'peak {result["peak_bytes"] / GIB:.2f} GiB)')


def main(argv=None, *, name: str = 'train_step_speed', **defaults) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_arguments(parser, **defaults)
    parser.add_argument('--append', action='store_true', help='append to bench/RESULTS.md')
    args = parser.parse_args(argv)
    lines = run(args)
    if args.append:
        results.append(name, lines, argv)
    return lines


if __name__ == '__main__':
    main()
