r"""Train-step time of ResNet-50 with the first N layers frozen against full training.

The frozen prefix must cost no backward pass (SPEC.md section 7): on a 2-core CPU, N = 16
should take at most 0.4x the time of N = 0 (TRAPS.md measured 0.68 s vs 2.77 s).

  python -m bench.freeze_speed                       # full size: batch 8, 224 px, 1 global crop
  python -m bench.freeze_speed --width=8 --image_size=32 --num_frozen=0,8,16,17   # quick

Prints one line per N and the ratio of each to N = 0; `--append` adds them to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import results
from sdtl_jax import config_lib, models, optim, train


def time_step(*, num_frozen: int, width: int, image_size: int, batch: int, num_classes: int,
              repeats: int, dtype) -> float:
    """Median seconds of one jitted train step (after compilation)."""
    config = config_lib.base(data='imagenet100')
    config.transfer.num_frozen = num_frozen
    model = models.build({'name': 'resnet50', 'width': width}, num_classes=num_classes,
                         num_frozen=num_frozen, dtype=dtype)
    variables = jax.jit(functools.partial(models.init, model, image_size=image_size))(
        jax.random.PRNGKey(0))
    tx, lr_fn = optim.make(config, variables['params'], model.layer_names(), warmup_steps=10,
                           total_steps=1000)
    state = train.initial_state(variables['params'], variables['batch_stats'], tx,
                                jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    data = {'global': rng.integers(0, 256, (batch, 1, image_size, image_size, 3), np.uint8),
            'label': rng.integers(0, num_classes, (batch,), np.int32)}
    step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, lr_fn=lr_fn,
                                     dtype=dtype), donate_argnums=0)
    state, metrics = step(state, data)          # compile
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = step(state, data)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--num_frozen', default='0,16')
    parser.add_argument('--width', type=int, default=64)
    parser.add_argument('--image_size', type=int, default=224)
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
    parser.add_argument('--append', action='store_true', help='append to bench/RESULTS.md')
    args = parser.parse_args()
    dtype = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[args.dtype]
    device = (f'{jax.device_count()} x {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores, '
              f'{platform.machine()}')
    seconds_per_step = {}
    for n in [int(x) for x in args.num_frozen.split(',')]:
        seconds_per_step[n] = time_step(num_frozen=n, width=args.width, image_size=args.image_size,
                               batch=args.batch, num_classes=100, repeats=args.repeats,
                               dtype=dtype)
    base = seconds_per_step.get(0)
    lines = [f'ResNet-50 width {args.width}, batch {args.batch}, {args.image_size} px, '
             f'1 global crop, {args.dtype}, {device}, jax {jax.__version__}']
    for n, seconds in seconds_per_step.items():
        ratio = f', ratio to N=0: {seconds / base:.3f}' if base else ''
        lines.append(f'  N={n:2d}: {seconds:.3f} s/step{ratio}')
    print('\n'.join(lines))
    if args.append:
        results.append('freeze_speed', lines)


if __name__ == '__main__':
    main()
