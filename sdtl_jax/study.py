"""A study: the paper's tables as one command, run in dependency order, resumable.

A study config (`configs/study/*.py`) is an experiment config plus a `study` section. `expand`
turns it into runs, each a plain experiment config with its own sub-folder of the study workdir:

- layers (Tables 2-5): baselines `S` and `R`, then `SDTL_Nkk` (pre-trained on S, layers >= N
  re-trained on real) and `RDTL_Nkk` (the other way) for each N of `study.num_frozen`;
- data_reduction (Table 6): `S`, then `R_1ofD` and `SDTL_N16_1ofD` for real fractions 1/D;
- augmentations (Table 1): `R_<pipeline>` and `S_<pipeline>` for each pipeline.

The baselines double as the transfers' sources (one source model per direction, as in the
paper), so a transfer run starts from `<workdir>/S` or `<workdir>/R` through
`transfer.init_from` and never trains its own. Finished runs are reused (`experiment.run`), so
re-running the command resumes the study where it stopped and then rewrites the report.
`study.only` restricts an invocation to some runs: the sweep launcher hands each machine its
share, stage by stage (`stages`).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from typing import Any

import ml_collections

from sdtl_jax import (
    config_check,
    config_lib,
    fileio,
    metrics_io,
    report,
    report_tables,
    run_identity,
)
from sdtl_jax.config_lib import ConfigError
from sdtl_jax.errors import UserError
from sdtl_jax.report import MANIFEST

# The baselines' run names: S trains on synthetic data only, R on real data only.
BASELINE_RUNS = {'real': 'R', 'synth': 'S'}


@dataclasses.dataclass(frozen=True)
class Run:
    """One experiment of a study: its sub-folder name, config, and what it stands for."""
    name: str
    config: ml_collections.ConfigDict
    kind: str                   # 'baseline' or 'transfer'
    domain: str                 # what this run trains on: 'real' or 'synth'
    source: str = ''            # the run whose layers [0, N) it takes over
    direction: str = ''         # transfers: 'synth_to_real' or 'real_to_synth'

    def describe(self) -> dict[str, Any]:
        """The run's entry in study.json (what the report reads)."""
        c = self.config
        return {'name': self.name, 'kind': self.kind, 'domain': self.domain,
                'direction': self.direction, 'source': self.source,
                'num_frozen': c.transfer.num_frozen, 'train_fraction': c.data.train_fraction,
                'aug': c.aug.name}


def _run_config(config: ml_collections.ConfigDict, *, train: str, num_frozen: int = 0,
                fraction: float = 1.0, aug: str | None = None,
                source_domain: str = '') -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(config.to_dict())
    del c['study']
    c.data.train = config.data[train]
    c.data.train_fraction = float(fraction)
    c.transfer.num_frozen = num_frozen
    c.transfer.source_data = config.data[source_domain] if source_domain else ''
    if aug is not None:
        c.aug.name = aug
    return c


def _baseline(config, name, domain, **kw) -> Run:
    return Run(name, _run_config(config, train=domain, **kw), 'baseline', domain)


def _transfer(config, name, direction, source, num_frozen, **kw) -> Run:
    source_domain, target, _ = config_lib.DIRECTIONS[direction]
    c = _run_config(config, train=target, num_frozen=num_frozen, source_domain=source_domain,
                    **kw)
    return Run(name, c, 'transfer', target, source=source, direction=direction)


def expand(config: ml_collections.ConfigDict, *, num_devices: int = 1,
           num_processes: int = 1) -> list[Run]:
    """The study's runs, every source before the runs that start from it, each run's config
    validated for `num_devices` devices over `num_processes` processes."""
    s = config.study
    if s.name == 'layers':
        runs = [_baseline(config, 'S', 'synth'), _baseline(config, 'R', 'real')]
        for direction in s.directions:
            if direction not in config_lib.DIRECTIONS:
                raise ConfigError(f'config.study.directions has {direction!r}; allowed: '
                                  f'{list(config_lib.DIRECTIONS)}')
            source_domain, _, prefix = config_lib.DIRECTIONS[direction]
            runs += [_transfer(config, f'{prefix}_N{n:02d}', direction,
                               BASELINE_RUNS[source_domain], n) for n in s.num_frozen]
    elif s.name == 'data_reduction':
        runs = [_baseline(config, 'S', 'synth')]
        for f in s.fractions:
            d = report_tables.divisor(f)
            runs += [_baseline(config, f'R_1of{d}', 'real', fraction=f),
                     _transfer(config, f'SDTL_N{s.transfer_num_frozen:02d}_1of{d}',
                               'synth_to_real', 'S', s.transfer_num_frozen, fraction=f)]
    elif s.name == 'augmentations':
        for domain in s.domains:
            if domain not in BASELINE_RUNS:
                raise ConfigError(f'config.study.domains has {domain!r}; allowed: '
                                  f'{list(BASELINE_RUNS)}')
        runs = [_baseline(config, f'{BASELINE_RUNS[domain]}_{aug}', domain, aug=aug)
                for domain in s.domains for aug in s.pipelines]
    else:
        raise ConfigError(f'config.study.name={s.name!r}; allowed: {config_lib.STUDIES}')
    _check(config, runs, num_devices=num_devices, num_processes=num_processes)
    return runs


def _check(config: ml_collections.ConfigDict, runs: list[Run], *, num_devices: int,
           num_processes: int) -> None:
    """Every run's config is valid before the first one starts (no failure hours in)."""
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        repeated = sorted(n for n in names if names.count(n) > 1)
        raise ConfigError(f'The study repeats runs: {repeated} (config.study lists a value '
                          'twice)')
    for r in runs:
        probe = r.config.copy_and_resolve_references()
        probe.transfer.init_from = r.source     # validate() wants a source for num_frozen > 0
        config_check.validate(probe, num_devices=num_devices, num_processes=num_processes)
    unknown = _only(config) - set(names)
    if unknown:
        raise ConfigError(f'config.study.only names unknown runs {sorted(unknown)}; this '
                          f'study has {names}')


def _only(config: ml_collections.ConfigDict) -> set[str]:
    """The run names of `study.only` (empty: every run)."""
    return {n.strip() for n in config.study.only.split(',') if n.strip()}


def stages(runs: list[Run]) -> list[list[Run]]:
    """Runs grouped for sweeps: first every run that starts from scratch (the sources among
    them), then the transfers, which need their source finished."""
    groups = ([r for r in runs if not r.source], [r for r in runs if r.source])
    return [g for g in groups if g]


def write_manifest(config: ml_collections.ConfigDict, runs: list[Run], workdir: str) -> None:
    fileio.write_json(os.path.join(workdir, MANIFEST), {
        'study': config.study.name, 'dataset': config.study.dataset,
        'model': config.model.name, 'runs': [r.describe() for r in runs]})


def run(config: ml_collections.ConfigDict, workdir: str, *, train_fn=None) -> dict[str, Any]:
    """Runs the study's runs in order (skipping finished ones), then writes the report.

    Returns {run name: results} for the runs this invocation covered.
    """
    is_main, devices = True, {}
    if train_fn is None:
        import jax  # imported only when something trains

        from sdtl_jax import experiment
        # Validated by `expand` below, all before the first run trains.
        train_fn, is_main = experiment.run_validated, jax.process_index() == 0
        devices = dict(num_devices=jax.device_count(), num_processes=jax.process_count())
    runs = expand(config, **devices)
    only = _only(config)
    selected = [r for r in runs if not only or r.name in only]
    fileio.check_supported(workdir)
    _check_unchanged(selected, workdir, move_aside=config.if_config_changed == 'move_aside')
    if is_main:
        fileio.makedirs(workdir)
        write_manifest(config, runs, workdir)

    def done(name):
        return fileio.exists(os.path.join(workdir, name, 'results.json'))

    results, timings = {}, {}
    for i, r in enumerate(selected):
        c = r.config
        if r.source:
            source_dir = os.path.join(workdir, r.source)
            if not done(r.source):
                raise UserError(
                    f'Run {r.name} starts from {source_dir}, which has not finished; run '
                    f'{r.source} first (sweeps: the stage before this one)')
            c = c.copy_and_resolve_references()
            c.transfer.init_from = source_dir
        finished = done(r.name)
        eta = _eta(workdir, runs, selected[i:], timings)
        metrics_io.say(f'[{i + 1}/{len(selected)}] {config.study.name}: {r.name}'
                       f'{" (finished before)" if finished else ""}{eta}')
        results[r.name] = train_fn(c, os.path.join(workdir, r.name))
    if config.study.report and is_main:
        report.write_report(workdir)
    return results


def _check_unchanged(runs: list[Run], workdir: str, *, move_aside: bool) -> None:
    """Before the first run trains: every run already in `workdir` is of the same experiment,
    or else one line names each changed run and key (with `move_aside`, each run moves its old
    files aside when its turn comes)."""
    if move_aside:
        return
    changed = [(os.path.join(workdir, r.name), diff) for r in runs
               if (diff := run_identity.changes(os.path.join(workdir, r.name), r.config))]
    if changed:
        raise run_identity.ChangedRunError(run_identity.refusal(changed))


@dataclasses.dataclass(frozen=True)
class Timing:
    """What a finished run measured; the study's ETA is built from these."""
    run: Run
    steps: int
    step_s: float           # median seconds per training step (metrics.jsonl's step_s)
    wall_s: float           # the whole run: compilation, evaluations and checkpoints too


def _read_timing(workdir: str, run: Run) -> Timing | None:
    """A finished run's timing; None if it timed no step (N = 18 trains none)."""
    run_dir = os.path.join(workdir, run.name)
    results = metrics_io.read_json(os.path.join(run_dir, 'results.json'))
    step_times = [r['step_s'] for r in metrics_io.read_metrics(run_dir) if r.get('step_s')]
    if not step_times or 'steps' not in results:
        return None
    return Timing(run, results['steps'], statistics.median(step_times), results['wall_seconds'])


def seconds_left(pending: list[Run], timings: list[Timing]) -> float | None:
    """Estimated seconds for the `pending` runs, from the finished runs' measured step times.

    Each pending run takes steps x seconds per step + overhead:
    - steps: those of a finished run on the same training data, scaled by the ratio of train
      fractions (one study: the same epochs and batch size);
    - seconds per step: the mean of the finished runs most alike in cost, first by augmentation
      pipeline (the crops per image), then by the nearest number of frozen layers (frozen
      layers skip their backward pass: several times faster at N = 16 than at N = 0);
    - overhead (compilation, evaluation, checkpoints): the finished runs' mean of their wall
      time minus steps x seconds per step.
    Whole-run wall times alone overshot about 3x: they mix in compilation and other run sizes.
    None before any finished run has measured step times.
    """
    if not timings:
        return None
    overhead = statistics.fmean(max(0.0, t.wall_s - t.steps * t.step_s) for t in timings)
    return sum(_steps(r, timings) * _step_seconds(r, timings) + overhead for r in pending)


def _steps(run: Run, timings: list[Timing]) -> float:
    fraction = run.config.data.train_fraction
    like = min(timings, key=lambda t: (t.run.domain != run.domain,
                                       t.run.config.data.train_fraction != fraction))
    return like.steps * fraction / like.run.config.data.train_fraction


def _step_seconds(run: Run, timings: list[Timing]) -> float:
    def unlikeness(t: Timing) -> tuple[bool, int]:
        return (t.run.config.aug.name != run.config.aug.name,
                abs(t.run.config.transfer.num_frozen - run.config.transfer.num_frozen))
    nearest = min(map(unlikeness, timings))
    return statistics.fmean(t.step_s for t in timings if unlikeness(t) == nearest)


def _eta(workdir: str, runs: list[Run], remaining: list[Run], timings: dict) -> str:
    """', about N min left' for the unfinished runs of `remaining`; '' until one is measured.
    `timings` caches each finished run's (None: it measured no step time)."""
    for r in runs:
        if r.name not in timings and fileio.exists(os.path.join(workdir, r.name, 'results.json')):
            timings[r.name] = _read_timing(workdir, r)
    pending = [r for r in remaining if r.name not in timings]
    seconds = seconds_left(pending, [t for t in timings.values() if t])
    return f', about {_minutes(seconds)} left' if seconds else ''


def _minutes(seconds: float) -> str:
    return f'{seconds / 60:.0f} min' if seconds >= 90 else f'{seconds:.0f} s'
