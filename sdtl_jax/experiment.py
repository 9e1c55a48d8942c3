"""One experiment: the source stage if the transfer needs one, then the configured stage.

`run` is what `main.py` (and a notebook) calls: for a transfer config it first trains (or
reuses) the source model in `<workdir>/source`, then trains the target stage in `<workdir>`
with layers [0, N) taken over from the source and frozen (docs/paper.md §1 and 7). Each stage
runs in a workdir that was checked and locked here; `train.py` only trains.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

from sdtl_jax import (
    config_check,
    config_lib,
    fileio,
    metrics_io,
    run_identity,
    train,
    workdir_guard,
)
from sdtl_jax.models import layers


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Validates `config`, then runs the experiment (`run_validated`). Returns the configured
    stage's results.json dict."""
    # Before the source stage trains: its config is the target's with valid stand-ins.
    config_check.validate(config, num_devices=jax.device_count(),
                          num_processes=jax.process_count())
    return run_validated(config, workdir)


def run_validated(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """`run` for a config validated already (a study's runs are, all before the first)."""
    source = config.transfer.init_from
    # With N = 0 and re-initialisation nothing is taken over: the source stage would be wasted.
    takes_layers = config_lib.transferred_layers(config, range(layers.NUM_LAYERS))
    if config.transfer.source_data and not source and takes_layers:
        source = os.path.join(workdir, 'source')
        stage(config_lib.source_stage(config), source)
    return stage(config, workdir, source=source)


def stage(config: ml_collections.ConfigDict, workdir: str, *, source: str = '') -> dict[str, Any]:
    """Trains one stage per `config` (validated) into `workdir` (`train.train_and_evaluate`).

    Before anything is read or compiled: the workdir is writable, not in use by another run
    (process 0 holds its lock until the stage ends), and holds no run of another experiment
    (`run_identity`).
    """
    fileio.check_supported(workdir)
    move_aside = config.if_config_changed == 'move_aside'
    if jax.process_index() != 0:
        if not move_aside:
            run_identity.check(workdir, config, move_aside=False)   # refuses as process 0 does
        _all_processes_reach('workdir checked')     # process 0 may be moving a run aside
        return train.train_and_evaluate(config, workdir, source=source, heartbeat=lambda: None)
    workdir_guard.check_writable(workdir)
    lock = workdir_guard.RunLock(workdir)
    note = lock.acquire()
    if note:
        metrics_io.say(f'{workdir}: {note}')
    try:
        run_identity.check(workdir, config, move_aside=move_aside)
        _all_processes_reach('workdir checked')
        return train.train_and_evaluate(config, workdir, source=source, heartbeat=lock.heartbeat)
    finally:
        lock.release()


def _all_processes_reach(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
