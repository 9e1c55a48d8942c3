r"""Train-step throughput: our jitted multi-crop step against the PyTorch reference.

Goals (issue 7), at the paper's size on one H100 (bf16): ResNet-50 multi-crop training at
least 2,000 samples/s (each sample 1 x 224 + 8 x 96 crops, batch 64), and our step at least as
fast as the PyTorch reference (`bench/torch_step.py`) on the same GPU. Issue 2's check is the
ratio to N = 0: a frozen prefix must cost no backward pass (`bench/freeze_speed.py`).

  python -m bench.train_step_speed                         # reduced CPU size, both models
  python -m bench.train_step_speed --full_size --append    # the paper's size (on a GPU)
  python -m bench.train_step_speed --models=resnet50 --num_frozen=0,16 --notorch

Ours is the training step itself: `train.train_step` with `optim.make`'s SGD and frozen prefix,
jitted with the state donated as `train.train_and_evaluate` does, multi-crop's light ops
included (`--nolight_ops` leaves them out; PyTorch's loader does them on the host). The batch
is put on the device once: the loader has its own benchmark. Every (framework, model, N) runs in
a fresh process (`step_common.measure_isolated`). Prints samples/s (a sample is one image with
all its crops) from the median step time after warm-up, the ratio to N = 0, peak memory (device
peak on a GPU, max RSS on a CPU) and ours / PyTorch; `--append` adds it to bench/RESULTS.md.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags

import sdtl_jax
from bench import results, step_common
from sdtl_jax import cli, config_lib, models, optim, train

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


def define_step_flags(flag_values: flags.FlagValues = flags.FLAGS, **defaults) -> None:
    """The step's flags (shared with `bench.all` and `bench.freeze_speed`, whose `defaults`
    replace some of their defaults)."""
    def default(name, value):
        return defaults.pop(name, value)

    flags.DEFINE_bool('full_size', default('full_size', False), "The paper's batch and crops "
                      '(1 x 224 + 8 x 96), dtype auto (bf16 on a GPU); default: the reduced CPU '
                      'size.', flag_values=flag_values)
    flags.DEFINE_bool('small', default('small', False), "The models' small variants "
                      '(config_lib.SMALL_MODELS, same 18 layers): a quick check of the code, not '
                      'a speed figure.', flag_values=flag_values)
    flags.DEFINE_list('models', default('models', list(step_common.MODELS)),
                      f'Models, of {", ".join(step_common.MODELS)}.', flag_values=flag_values)
    flags.DEFINE_list('num_frozen', default('num_frozen', ['0', '8', '16', '17']),
                      'Frozen prefixes N, each in [0, 18].', flag_values=flag_values)
    for name in ('batch', 'num_global', 'global_size', 'num_local', 'local_size', 'warmup',
                 'repeats'):
        flags.DEFINE_integer(name, default(name, None), 'Overrides the size preset.',
                             lower_bound=0 if name in ('num_local', 'warmup') else 1,
                             flag_values=flag_values)
    flags.DEFINE_string('dtype', default('dtype', None), 'Overrides the size preset: float32, '
                        'bfloat16 or auto.', flag_values=flag_values)
    flags.DEFINE_bool('light_ops', default('light_ops', True), "Multi-crop's light ops in our "
                      'step (--nolight_ops leaves them out).', flag_values=flag_values)
    flags.DEFINE_bool('torch', default('torch', True), 'Also time the PyTorch reference '
                      '(--notorch skips it).', flag_values=flag_values)
    if defaults:
        raise TypeError(f'not step flags: {sorted(defaults)}')
    flags.register_validator('models', lambda v: set(v) <= set(step_common.MODELS),
                             f'models are {", ".join(step_common.MODELS)}',
                             flag_values=flag_values)
    flags.register_validator('num_frozen', lambda v: all(n.isdigit() and int(n) <= 18 for n in v),
                             'each N is an integer in [0, 18]', flag_values=flag_values)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, **defaults) -> None:
    define_step_flags(flag_values, **defaults)
    flags.DEFINE_bool('append', False, 'Append to bench/RESULTS.md.', flag_values=flag_values)


def specs(args) -> dict[str, list[step_common.StepSpec]]:
    """{model: [its spec for each N]} from the flags of `define_step_flags`."""
    overrides = {k: getattr(args, k) for k in ('batch', 'num_global', 'global_size', 'num_local',
                                               'local_size', 'repeats', 'warmup', 'dtype')
                 if getattr(args, k) is not None}
    return {model: [step_common.paper_spec(
                        model, full_size=args.full_size, num_frozen=int(n),
                        light_ops=args.light_ops,
                        model_kwargs=config_lib.SMALL_MODELS[model] if args.small else {},
                        **overrides)
                    for n in args.num_frozen]
            for model in args.models}


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


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS, *,
         name: str = 'train_step_speed') -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    lines = run(flag_values)
    if flag_values.append:
        results.append(name, lines, flag_values)


if __name__ == '__main__':
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
