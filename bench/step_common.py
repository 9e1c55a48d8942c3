"""What a benchmarked train step is, shared by our JAX step and the PyTorch reference.

A `StepSpec` fixes the model, the frozen prefix and the batch (crops, sizes, compute dtype).
`train_step_speed` (ours) and `torch_step` (PyTorch) build their step from it, feed it the same
`synthetic_batch`, time it the same way (`time_steps`) and report the same fields. Each
measurement runs in a process of its own (`measure_isolated`): peak memory (the device's peak on
a GPU, the process's max RSS on a CPU) is a high-water mark of the whole process, and JAX
(which pre-allocates most of a GPU) must not share one GPU with PyTorch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import numpy as np

from sdtl_jax import config_lib
from sdtl_jax.data import sources
from sdtl_jax.data.augment import multicrop, photometric, pipelines

# The paper pairs each model with one dataset (docs/paper.md §4): its global batch and classes.
PAPER_DATA = {'resnet50': 'imagenet100', 'tinyvit_5m': 'pets'}
MODELS = tuple(PAPER_DATA)
INSTALL_REFERENCE = "pip install -e '.[reference]' (torchvision 0.28.0 and timm, beside torch)"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_MARK = 'STEP_RESULT '   # marks the child's result line among anything else it prints


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """One benchmarked step. `model_kwargs` shrinks the model (tests); the benchmark runs the
    real widths, because torchvision's ResNet-50 has no width argument to match a smaller one."""
    model: str
    num_frozen: int = 0
    batch: int = 64
    num_global: int = 1
    global_size: int = 224
    num_local: int = 8
    local_size: int = 96
    dtype: str = 'auto'            # config.dtype: auto = bfloat16 on GPU/TPU, float32 on CPU
    light_ops: bool = True         # ours: multi-crop's light ops in the step, as in training
    warmup: int = 2                # untimed steps (compilation, cuDNN autotuning)
    repeats: int = 5               # timed steps; the median is reported
    model_kwargs: dict = dataclasses.field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(sources.class_list(PAPER_DATA[self.model]))

    @property
    def num_crops(self) -> int:
        return self.batch * (self.num_global + self.num_local)


def reference_matches(spec: StepSpec) -> bool:
    """Whether the PyTorch reference can run the same model: torchvision's ResNet-50 has no
    width argument, timm's TinyViT takes the same embed_dims and num_heads as ours."""
    return not (spec.model == 'resnet50' and spec.model_kwargs)


def paper_spec(model: str, *, full_size: bool, **overrides) -> StepSpec:
    """The paper's step for `model` (`full_size`: its global batch, 1 x 224 + 8 x 96 crops, 20
    timed steps) or the reduced one for a 2-core CPU, where the whole suite should take minutes:
    the same real-width model and crop counts on batch 4 at half the crop sizes (1 x 112 +
    8 x 48), 3 timed steps (each takes seconds; compiling the step takes most of the time)."""
    config = config_lib.base(data=PAPER_DATA[model])
    aug = config.aug
    size = dict(batch=config.global_batch, num_global=aug.num_global, num_local=aug.num_local,
                global_size=aug.global_size, local_size=aug.local_size, warmup=3, repeats=20)
    if not full_size:
        size.update(batch=4, global_size=aug.global_size // 2, local_size=aug.local_size // 2,
                    warmup=2, repeats=3)
    return StepSpec(model=model, **{**size, **overrides})


def recipe(spec: StepSpec):
    """The training config of the step: the paper's recipe (docs/paper.md §4) at this batch."""
    config = config_lib.base(data=PAPER_DATA[spec.model], model=spec.model)
    config.global_batch = spec.batch
    config.transfer.num_frozen = spec.num_frozen
    return config


def recipe_multicrop(spec: StepSpec) -> multicrop.MultiCrop:
    """The training augmentation of the step: config_lib's aug section, built as training builds
    it (not MultiCrop's defaults, which training never reads), at the spec's crop counts and
    sizes."""
    aug = recipe(spec).aug
    aug.update(num_global=spec.num_global, global_size=spec.global_size,
               num_local=spec.num_local, local_size=spec.local_size)
    return pipelines.build(aug)


def resolve_dtype(spec: StepSpec, platform: str) -> str:
    """'float32' or 'bfloat16', as training resolves `config.dtype` on this platform."""
    return config_lib.compute_dtype(spec.dtype, platform)


def synthetic_batch(spec: StepSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """A training batch as the multi-crop loader yields it (docs/architecture.md, "Data
    contract"): uint8 crops of random pixels (the step's cost does not depend on them), the
    light ops drawn with the recipe's probabilities (`recipe_multicrop`), and labels."""
    rng = np.random.default_rng(seed)
    multicrop = recipe_multicrop(spec)
    batch = {'label': rng.integers(0, spec.num_classes, (spec.batch,), np.int32)}
    for key, count, size, ops in (('global', multicrop.num_global, multicrop.global_size,
                                   multicrop.global_ops),
                                  ('local', multicrop.num_local, multicrop.local_size,
                                   multicrop.local_ops)):
        if not count:
            continue
        batch[key] = rng.integers(0, 256, (spec.batch, count, size, size, 3), np.uint8)
        if spec.light_ops:
            batch[f'{key}_ops'] = np.stack([photometric.sample(rng, **ops)
                                            for _ in range(spec.batch * count)]
                                           ).reshape(spec.batch, count, photometric.NUM_OPS)
    return batch


def time_steps(step: Callable[[], Any], sync: Callable[[Any], None], *, warmup: int,
               repeats: int) -> dict[str, float]:
    """Runs `step` `warmup` times untimed, then `repeats` times, each waited for with `sync`.

    Returns the median seconds per step and the first step's seconds (mostly compilation).
    """
    start = time.perf_counter()
    sync(step())
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        sync(step())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - start)
    return {'step_s': statistics.median(times), 'first_step_s': first}


def max_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_isolated(framework: str, spec: StepSpec, timeout: float = 900) -> dict[str, Any]:
    """Measures `spec` with `framework` ('jax' or 'torch') in a fresh Python process.

    Returns the measurement (see `train_step_speed.measure`), or {'missing': why} when the
    framework's packages are absent, or {'error': the last lines of its stderr}.
    """
    spec_json = json.dumps(dataclasses.asdict(spec))
    try:
        child = subprocess.run([sys.executable, '-m', 'bench.measure_step', framework, spec_json],
                               cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {'error': f'timed out after {timeout:.0f} s'}
    for line in reversed(child.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    tail = [line for line in child.stderr.strip().splitlines() if line.strip()][-3:]
    return {'error': ' / '.join(tail) or f'exit status {child.returncode}'}
