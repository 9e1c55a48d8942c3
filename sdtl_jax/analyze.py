r"""Where do two trained models' features part ways? Linear CKA and linear probes per layer.

  python -m sdtl_jax.analyze --workdir=runs/layers          # A = runs/layers/S, B = .../R
  python -m sdtl_jax.analyze --a=runs/synth_only --b=runs/real_only --out=runs/analysis

Both models see the same real images (the evaluation split of A's config, with its resize and
centre crop, at most `--max_images` of them, drawn at random with `--seed`). Each of the 18
layer outputs (docs/paper.md §2) is averaged over its spatial axes to one vector per image.
Per layer this reports:
- linear CKA between A's and B's vectors (Kornblith et al. 2019, "Similarity of Neural Network
  Representations Revisited"): 1 = the same features up to a rotation and a scale, near 0 =
  unrelated; it needs no training, and the two layers may have different widths;
- the top-1 of a linear probe per model: fit on the real training split (`--probe_train_images`
  of it), evaluated on the same images as CKA.

Writes analysis.json, analysis.md, cka.png and probe.png into `--out` (default: the study
workdir, else A's workdir) and prints the table. Bad input (a missing or unfinished run, runs of
different architectures) exits with code 2 and a message naming the path. See docs/analyze.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

import sdtl_jax
from sdtl_jax import (
    analyze_metrics,
    analyze_outputs,
    checkpointing,
    cli,
    fileio,
    metrics_io,
    models,
)
from sdtl_jax.analyze_metrics import AnalysisError
from sdtl_jax.data import input_pipeline, layout, sources
from sdtl_jax.data.augment import normalize

STUDY_RUNS = ('S', 'R')        # study.py's baselines: A = synthetic only, B = real only
# Tags that make the two image subsets' seeds independent.
_EVAL_SUBSET, _TRAIN_SUBSET = 0, 1


# --- Runs -------------------------------------------------------------------------------------

def resolve_runs(workdir: str | None, a: str | None, b: str | None,
                 out: str | None) -> tuple[str, str, str]:
    """(A, B, out) from the flags: `--workdir=STUDY` gives STUDY/S and STUDY/R (each
    replaceable by --a / --b) and writes into STUDY; else --a and --b, writing into A."""
    if workdir:
        a = a or os.path.join(workdir, STUDY_RUNS[0])
        b = b or os.path.join(workdir, STUDY_RUNS[1])
    if not (a and b):
        raise AnalysisError('Name the runs: --workdir=STUDY (a study workdir holding the '
                            'baselines S and R), or --a=RUN_DIR --b=RUN_DIR')
    return a, b, out or workdir or a


def check_run(workdir: str) -> dict[str, Any]:
    """Checks that `workdir` holds a finished run (config.json, results.json, checkpoints/);
    returns its results.json. Raises AnalysisError naming the path."""
    if not fileio.isdir(workdir):
        raise AnalysisError(f'Run {workdir} does not exist (expected a run workdir written by '
                            'python -m sdtl_jax.main)')
    for name, what in (('config.json', 'is not a run workdir'),
                       ('results.json', 'is unfinished (re-run its command to finish it)')):
        if not fileio.exists(os.path.join(workdir, name)):
            raise AnalysisError(f'Run {workdir} {what}: no {name} in it')
    if not fileio.isdir(os.path.join(workdir, 'checkpoints')):
        raise AnalysisError(f'Run {workdir} has no checkpoints/ folder')
    return metrics_io.read_json(os.path.join(workdir, 'results.json'))


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A finished run, ready to compute features: its config, model and weights."""
    workdir: str
    label: str
    config: ml_collections.ConfigDict
    results: dict[str, Any]
    model: Any
    variables: dict[str, Any]

    @property
    def layer_names(self) -> tuple[str, ...]:
        return tuple(self.model.layer_names())


def load_run(workdir: str, label: str) -> LoadedRun:
    """Loads a finished run's config.json and the weights of its last checkpoint.

    The model computes in float32 whatever dtype the run trained in: both models' features are
    compared to each other, and bfloat16 rounding would only add noise.
    """
    results = check_run(workdir)
    config = ml_collections.ConfigDict(
        metrics_io.read_json(os.path.join(workdir, 'config.json')))
    num_classes = len(sources.get(config.data.train).classes)
    model = models.build(config.model, num_classes=num_classes)
    try:
        params, batch_stats, step = checkpointing.load_variables(workdir)
    except FileNotFoundError as e:
        raise AnalysisError(f'Run {workdir} has no finished checkpoint ({e})') from None
    if 'steps' in results and step != results['steps']:
        raise AnalysisError(f'Run {workdir} is unfinished: its last checkpoint is step {step} '
                            f'of {results["steps"]}')
    variables = {'params': params}
    if batch_stats:
        variables['batch_stats'] = batch_stats
    return LoadedRun(workdir=workdir, label=label, config=config, results=results, model=model,
               variables=jax.device_put(variables))


def run_labels(a: str, b: str) -> tuple[str, str]:
    """Short names for the two runs: their folder names (S, R in a study), else A and B."""
    names = [os.path.basename(os.path.normpath(p)) for p in (a, b)]
    return (names[0], names[1]) if names[0] != names[1] else ('A', 'B')


# --- Features ---------------------------------------------------------------------------------

def pool(x: jax.Array) -> jax.Array:
    """[b, h, w, c] (or any [b, ..., c]) -> [b, c] by averaging the middle axes; [b, c] stays."""
    return x if x.ndim == 2 else jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))


@functools.partial(jax.jit, static_argnames='model')
def pooled_features(variables: dict[str, Any], images: jax.Array, *, model) -> tuple:
    """Every layer's pooled output, in forward order, in inference mode (one program per
    model config and batch shape: two runs of the same architecture share it)."""
    _, out = model.apply(variables, normalize.normalize(images, jnp.float32), train=False)
    # A tuple, not a dict: a dict would come back from jit with its keys sorted.
    return tuple(pool(v).astype(jnp.float32) for v in out.values())


def sample_indices(num_examples: int, max_examples: int, seed: int) -> np.ndarray:
    """At most `max_examples` indices of [0, num_examples), drawn uniformly without
    replacement (shards are often written class by class: the first N would miss classes),
    sorted so that reads stay sequential."""
    if max_examples >= num_examples:
        return np.arange(num_examples)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_examples, size=max_examples, replace=False))


def image_batches(split: sources.DatasetSplit, indices: np.ndarray, *, batch: int, resize: int,
                  crop: int) -> Iterator[dict[str, np.ndarray]]:
    """Records `indices` of `split`, evaluation-transformed (resize, centre crop), in batches
    of exactly `batch` (the last one padded, `mask` False): one compiled shape."""
    return input_pipeline.eval_batches(split, global_batch=batch, resize=resize, crop=crop,
                                       indices=indices)


def extract(runs: Sequence[LoadedRun], split: sources.DatasetSplit, indices: np.ndarray, *,
            batch: int, resize: int, crop: int,
            desc: str) -> tuple[list[list[np.ndarray]], np.ndarray]:
    """Feeds each batch through every run; returns ([run][layer] -> float32 [n, d], labels)."""
    features = [[[] for _ in run.layer_names] for run in runs]
    labels = []
    batches = image_batches(split, indices, batch=batch, resize=resize, crop=crop)
    for b in metrics_io.Progress(batches, total=math.ceil(len(indices) / batch), desc=desc,
                                 unit='batch', dynamic_ncols=True, mininterval=2.0):
        images = jax.device_put(b['image'])
        outs = [pooled_features(run.variables, images, model=run.model) for run in runs]
        for per_layer, out in zip(features, jax.device_get(outs)):
            for i, value in enumerate(out):
                per_layer[i].append(np.asarray(value)[b['mask']])
        labels.append(b['label'][b['mask']])
    return ([[np.concatenate(parts) for parts in per_layer] for per_layer in features],
            np.concatenate(labels))


# --- The analysis -----------------------------------------------------------------------------

def analyze(a: str, b: str, out: str, *, data_dir: str | None = None, max_images: int = 2000,
            probe_train_images: int = 5000, probe: str = 'logistic',
            global_batch: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Compares runs `a` and `b` layer by layer; writes analyze_outputs.FILES into `out`;
    returns analysis.json.

    Args:
      a, b: finished run workdirs of the same architecture (layer names).
      out: output folder (created).
      data_dir: overrides the data directory of A's config.
      max_images: images of A's evaluation split fed to both models (a seeded random subset).
      probe_train_images: images of the real training split the probes are fit on; 0 skips
        the probes.
      probe: one of analyze_metrics.PROBES.
      global_batch: images per forward pass (default: A's eval.global_batch).
      seed: draws the two image subsets.
    """
    if probe not in analyze_metrics.PROBES:
        raise AnalysisError(f'--probe={probe!r}; allowed: {", ".join(analyze_metrics.PROBES)}')
    if max_images < 2 or probe_train_images < 0:
        raise AnalysisError(f'--max_images={max_images} must be >= 2 (CKA needs several '
                            f'images) and --probe_train_images={probe_train_images} >= 0')
    label_a, label_b = run_labels(a, b)
    for path in (a, b):
        check_run(path)      # both, before the slow loading of either
    run_a, run_b = load_run(a, label_a), load_run(b, label_b)
    if run_a.layer_names != run_b.layer_names:
        raise AnalysisError(
            f'Runs {a} ({run_a.config.model.name}) and {b} ({run_b.config.model.name}) have '
            f'different layers: {list(run_a.layer_names)} vs {list(run_b.layer_names)}')
    names = run_a.layer_names
    config = run_a.config
    data_dir = data_dir or config.data.data_dir or layout.default_data_dir()
    eval_split = sources.resolve(config.data.eval, data_dir, config.data.eval_split)
    batch = global_batch or config.eval.global_batch
    read = dict(batch=batch, resize=config.eval.resize, crop=config.eval.crop)
    runs = (run_a, run_b)

    eval_indices = sample_indices(eval_split.num_examples, max_images, seed * 2 + _EVAL_SUBSET)
    metrics_io.say(f'Features of {len(eval_indices):,} images of {eval_split.name}:'
                   f'{eval_split.split} through {label_a} = {a} and {label_b} = {b}')
    features, labels = extract(runs, eval_split, eval_indices, desc='eval images', **read)
    layers = [{'index': i, 'name': name, 'dim_a': int(features[0][i].shape[1]),
               'dim_b': int(features[1][i].shape[1]),
               'cka': _finite(analyze_metrics.linear_cka(features[0][i], features[1][i]))}
              for i, name in enumerate(names)]

    probe_info = None
    if probe_train_images:
        train_split = sources.resolve(config.data.real, data_dir, config.data.train_split)
        train_indices = sample_indices(train_split.num_examples, probe_train_images,
                                       seed * 2 + _TRAIN_SUBSET)
        metrics_io.say(f'Probe training features: {len(train_indices):,} images of '
                       f'{train_split.name}:{train_split.split}')
        train_features, train_labels = extract(runs, train_split, train_indices,
                                               desc='probe train images', **read)
        unconverged = []
        bar = metrics_io.Progress(total=2 * len(names), desc=f'{probe} probes', unit='probe',
                                  dynamic_ncols=True, mininterval=2.0)
        for i, name in enumerate(names):
            for r, (run, key) in enumerate(zip(runs, ('probe_top1_a', 'probe_top1_b'))):
                top1, converged = analyze_metrics.probe_top1(
                    train_features[r][i], train_labels, features[r][i], labels, kind=probe)
                layers[i][key] = top1
                if not converged:
                    unconverged.append(f'{run.label}:{name}')
                bar.update(1)
        bar.close()
        probe_info = {'kind': probe, 'train_data': f'{train_split.name}:{train_split.split}',
                      'num_train_images': len(train_indices), 'unconverged': unconverged}
    else:
        for layer in layers:
            layer['probe_top1_a'] = layer['probe_top1_b'] = None

    def describe(run: LoadedRun) -> dict[str, Any]:
        return {'label': run.label, 'workdir': fileio.absolute(run.workdir),
                'model': run.config.model.name, 'train_data': run.config.data.train,
                'top1_mean': run.results.get('top1_mean')}

    result = {
        'a': describe(run_a), 'b': describe(run_b),
        'eval_data': f'{eval_split.name}:{eval_split.split}',
        'num_images': len(eval_indices), 'num_classes': len(eval_split.classes),
        'resize': config.eval.resize, 'crop': config.eval.crop, 'seed': seed,
        'probe': probe_info, 'layers': layers,
    }
    analyze_outputs.write_outputs(result, out)
    return result


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None     # JSON has no NaN


# --- CLI --------------------------------------------------------------------------------------

def define_flags() -> None:
    """The CLI's flags; defined only when run as a script (main.py defines --workdir too)."""
    flags.DEFINE_string('workdir', None, 'A study workdir: A = <workdir>/S, B = <workdir>/R; '
                        'the outputs go there unless --out is given.')
    flags.DEFINE_string('a', None, 'Run workdir A (default <workdir>/S).')
    flags.DEFINE_string('b', None, 'Run workdir B (default <workdir>/R).')
    flags.DEFINE_string('out', None, 'Output folder (default: --workdir, else --a).')
    flags.DEFINE_string('data_dir', None, "Data directory (default: A's config, "
                        '$SDTL_DATA_DIR or ~/.cache/sdtl_jax/data).')
    flags.DEFINE_integer('max_images', 2000, 'Evaluation images fed to both models (a seeded '
                         'random subset when the split is larger).')
    flags.DEFINE_integer('probe_train_images', 5000, 'Real training images the linear probes '
                         'are fit on (a seeded random subset); 0 skips the probes.')
    flags.DEFINE_enum('probe', 'logistic', analyze_metrics.PROBES, 'Linear probe: logistic '
                      'regression, or ridge (closed form, faster on wide layers).')
    flags.DEFINE_integer('global_batch', None, "Images per forward pass (default: A's "
                         'eval.global_batch).')
    flags.DEFINE_integer('seed', 0, 'Seed of the image subsets.')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}', exitcode=2)
    FLAGS = flags.FLAGS
    if not FLAGS['verbosity'].present:
        # Orbax warns on every read-only checkpoint it opens; status lines come from here.
        logging.set_verbosity(logging.ERROR)
    sdtl_jax.use_compilation_cache()
    try:
        a, b, out = resolve_runs(FLAGS.workdir, FLAGS.a, FLAGS.b, FLAGS.out)
        result = analyze(a, b, out, data_dir=FLAGS.data_dir, max_images=FLAGS.max_images,
                         probe_train_images=FLAGS.probe_train_images, probe=FLAGS.probe,
                         global_batch=FLAGS.global_batch, seed=FLAGS.seed)
    except (AnalysisError, FileNotFoundError) as e:   # FileNotFoundError: data not there
        print(f'analyze: error: {e}', file=sys.stderr)
        sys.exit(2)
    print(analyze_outputs.table(result))
    print(f'Wrote {", ".join(analyze_outputs.FILES)} to {out}')


if __name__ == '__main__':
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
