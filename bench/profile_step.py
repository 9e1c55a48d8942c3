r"""Where the train step's time goes: per operation kind and per layer, forward and backward,
ours (XLA's profile of the jitted step) beside the PyTorch reference (torch.profiler).

  python -m bench.profile_step --models=resnet50 --num_frozen=0
  python -m bench.profile_step --models=tinyvit_5m --notorch --top=40
  python -m bench.profile_step --full_size          # the paper's size (on a GPU)

The step and its sizes are `bench.train_step_speed`'s (the same flags). Ours: the compiled
step's operations, timed by XLA's profiler over the timed steps (on a CPU the step is compiled
with `xla_cpu_enable_xprof_traceme`, which adds a trace event per operation) and attributed by
the HLO's metadata to a layer and to the forward or backward pass (`transpose(jvp(...))` is
the backward); operations outside the model are the loss, the light ops and the optimizer.
Kinds are convolution, matmul, reduction, elementwise and data movement; a fusion takes the kind
of the costliest operation inside it. PyTorch: its operators from torch.profiler, and per layer
the time between module hooks (forward) and between the gradients of a layer's output and
input (backward). Operations that run side by side count twice in the sum of operation times,
so the per-op totals can exceed the step's wall time.
"""

from __future__ import annotations

import collections
import glob
import multiprocessing
import re
import statistics
import tempfile
import time
from concurrent import futures
from typing import Any

import jax
from absl import app, flags

from bench import step_common, train_step_speed
from sdtl_jax import cli, models

# HLO opcodes by kind, costliest first: a fusion is the first kind any of its operations has.
KINDS = (
    ('convolution', ('convolution',)),
    ('matmul', ('dot', 'custom-call')),   # a GPU's cuBLAS call; its cuDNN convolutions below
    ('reduction', ('reduce', 'reduce-window', 'select-and-scatter', 'scatter')),
    ('elementwise', ()),   # anything that computes, not listed elsewhere
    ('data movement', ('copy', 'transpose', 'pad', 'slice', 'dynamic-slice', 'concatenate',
                       'dynamic-update-slice', 'broadcast', 'reverse', 'gather', 'bitcast',
                       'reshape', 'iota', 'constant', 'parameter', 'tuple',
                       'get-tuple-element')),
)
_MOVEMENT = dict(KINDS)['data movement']
_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.-]+) = .*? ([a-z][\w-]*)\(')
_CALLS = re.compile(r'calls=%?([\w.-]+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')


def hlo_operations(hlo_text: str) -> dict[str, tuple[str, str]]:
    """{instruction of the entry computation: (kind, op_name metadata)} from optimised HLO."""
    computations, current, entry = collections.defaultdict(list), None, None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith('{'):
            words = line.split()
            current = words[1] if words[0] == 'ENTRY' else words[0]
            current = current.lstrip('%')
            entry = current if words[0] == 'ENTRY' else entry
        elif current and (match := _INSTRUCTION.match(line)):
            calls, op_name, target = (r.search(line) for r in (_CALLS, _OP_NAME, _TARGET))
            opcode = match[2]
            if opcode == 'custom-call' and target and 'conv' in target[1].lower():
                opcode = 'convolution'
            computations[current].append((match[1], opcode, calls and calls[1],
                                          op_name[1] if op_name else ''))

    def opcodes(computation, seen=()):
        for _, opcode, calls, _ in computations.get(computation, ()):
            yield opcode
            if calls and calls not in seen:
                yield from opcodes(calls, (*seen, calls))

    def kind(opcode, calls):
        inside = {opcode} | (set(opcodes(calls)) if calls else set())
        for name, codes in KINDS[:3]:
            if inside & set(codes):
                return name
        return 'elementwise' if inside - set(_MOVEMENT) - {'fusion'} else 'data movement'

    return {name: (kind(opcode, calls), op_name)
            for name, opcode, calls, op_name in computations.get(entry, ())}


def where(op_name: str, layer_names: tuple[str, ...]) -> tuple[str, str]:
    """(layer or '(outside the model)', 'forward' / 'backward') of an op_name path."""
    parts = op_name.split('/')
    direction = 'backward' if any(p.startswith('transpose(') for p in parts) else 'forward'
    model = [i for i, p in enumerate(parts) if 'jvp(' in p and p.rstrip(')').split('(')[-1]]
    for part in parts[model[0] + 1:] if model else ():
        if part in layer_names:
            return part, direction
    return '(outside the model)', direction


def profile_ours(spec: step_common.StepSpec) -> dict[str, Any]:
    """Traces `spec.repeats` steps of ours after warm-up; per-operation seconds per step."""
    step, state, batch = train_step_speed.build(spec)
    cpu = jax.devices()[0].platform == 'cpu'
    # XLA:CPU emits no event per operation unless the program is compiled to (GPUs always do).
    options = {'xla_cpu_enable_xprof_traceme': True} if cpu else {}
    compiled = step.lower(state, batch).compile(compiler_options=options)
    operations = hlo_operations(compiled.as_text())
    for _ in range(max(spec.warmup, 1)):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    walls = []
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(spec.repeats):
            start = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)
            walls.append(time.perf_counter() - start)
        jax.profiler.stop_trace()
        path, = glob.glob(f'{trace_dir}/plugins/profile/*/*.xplane.pb')
        data = jax.profiler.ProfileData.from_file(path)
    seconds = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                name = dict(event.stats).get('hlo_op') or event.name
                if name in operations:
                    seconds[name] += event.duration_ns * 1e-9 / spec.repeats
    layer_names = _layer_names(spec)
    rows = [(name, *operations[name], *where(operations[name][1], layer_names), s)
            for name, s in seconds.items()]
    return {'step_s': statistics.median(walls), 'rows': rows}


def profile_torch(spec: step_common.StepSpec) -> dict[str, Any]:
    """The reference step's operators and per-layer forward/backward seconds per step."""
    import torch
    from torch import profiler

    from bench import torch_step

    step, model, named, _ = torch_step.build(spec)
    cuda = next(model.parameters()).is_cuda
    layer_names = _layer_names(spec)
    timing = collections.Counter()
    marks = {}

    def now():
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def hook_layer(name, first, last):
        def pre(module, args):
            marks[name, 'forward'] = now()
            if args and torch.is_tensor(args[0]) and args[0].requires_grad:
                args[0].register_hook(lambda g: timing.update(
                    {(name, 'backward'): now() - marks.pop((name, 'backward'), now())}))

        def post(module, args, output):
            timing[name, 'forward'] += now() - marks.pop((name, 'forward'))
            if torch.is_tensor(output) and output.requires_grad:
                output.register_hook(lambda g: marks.__setitem__((name, 'backward'), now()))
        first.register_forward_pre_hook(pre)
        last.register_forward_hook(post)

    for name, modules in zip(layer_names, named):
        hook_layer(name, modules[0], modules[-1])
    for _ in range(max(spec.warmup, 1)):
        step()
    timing.clear()
    walls = []
    with profiler.profile(activities=[profiler.ProfilerActivity.CPU]
                          + [profiler.ProfilerActivity.CUDA] * cuda) as prof:
        for _ in range(spec.repeats):
            start = now()
            step()
            walls.append(now() - start)
    ops = [(e.key, (e.self_device_time_total if cuda else e.self_cpu_time_total) * 1e-6
            / spec.repeats) for e in prof.key_averages()]
    layers = {key: s / spec.repeats for key, s in timing.items()}
    return {'step_s': statistics.median(walls), 'ops': ops, 'layers': layers,
            'names': layer_names}


def _layer_names(spec: step_common.StepSpec) -> tuple[str, ...]:
    return models.build({'name': spec.model, **spec.model_kwargs},
                        num_classes=spec.num_classes).layer_names()


def report(spec: step_common.StepSpec, ours: dict[str, Any], ref: dict[str, Any] | None,
           top: int) -> list[str]:
    """The tables, as lines."""
    lines = [f'{spec.model}, N={spec.num_frozen}: batch {spec.batch}, {spec.num_global} x '
             f'{spec.global_size} + {spec.num_local} x {spec.local_size}, {jax.devices()[0]}; '
             f'ours {ours["step_s"]:.3f} s/step (sum of op times '
             f'{sum(r[-1] for r in ours["rows"]):.3f} s)'
             + (f', PyTorch {ref["step_s"]:.3f} s/step' if ref else '')]
    by_kind = collections.Counter()
    for _, kind, _, _, direction, s in ours['rows']:
        by_kind[direction, kind] += s
    lines.append('  ours by kind (s/step):')
    lines += [f'    {d:8s} {k:14s} {s:8.3f}' for (d, k), s in sorted(by_kind.items(),
                                                                   key=lambda x: -x[1])]
    by_layer = collections.Counter()
    for _, _, _, layer, direction, s in ours['rows']:
        by_layer[layer, direction] += s
    lines.append('  per layer (s/step): ours fwd / bwd' + ' | PyTorch fwd / bwd' * bool(ref))
    for layer in (*_layer_names(spec), '(outside the model)'):
        line = (f'    {layer:20s} {by_layer[layer, "forward"]:7.3f} '
                f'{by_layer[layer, "backward"]:7.3f}')
        if ref and layer in ref['names']:
            line += (f' | {ref["layers"].get((layer, "forward"), 0):7.3f} '
                     f'{ref["layers"].get((layer, "backward"), 0):7.3f}')
        lines.append(line)
    lines.append(f'  ours, top {top} operations (s/step, kind, layer, pass, HLO op_name):')
    for name, kind, op_name, layer, direction, s in sorted(ours['rows'],
                                                           key=lambda r: -r[-1])[:top]:
        lines.append(f'    {s:7.4f} {kind:13s} {layer:12s} {direction:8s} {name} '
                     f'{op_name.split("/", 1)[-1]}')
    if ref:
        lines.append(f'  PyTorch, top {top} operators (self time, s/step):')
        lines += [f'    {s:7.4f} {name}'
                  for name, s in sorted(ref['ops'], key=lambda x: -x[1])[:top]]
    return lines


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    train_step_speed.define_step_flags(flag_values, num_frozen=['0'])
    flags.DEFINE_integer('top', 25, 'Operations listed, costliest first.', lower_bound=0,
                         flag_values=flag_values)


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    for model, model_specs in train_step_speed.specs(flag_values).items():
        for spec in model_specs:
            ref = None
            if flag_values.torch and step_common.reference_matches(spec):
                # A process of its own: PyTorch's and XLA's thread pools slow each other down.
                with futures.ProcessPoolExecutor(1, multiprocessing.get_context('spawn')) as pool:
                    ref = pool.submit(profile_torch, spec).result()
            for line in report(spec, profile_ours(spec), ref, flag_values.top):
                print(line, flush=True)


if __name__ == '__main__':
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
