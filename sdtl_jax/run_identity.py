"""A run's identity: the config keys that decide its results. A workdir holds one experiment;
reusing a finished run or resuming an unfinished one under another identity would report old
results as new, or mix two recipes in one run.

Everything in the config is identity except `NOT_IDENTITY`, settings that change how a run
goes but not what it computes (resume is exact, evaluation is deterministic).
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Iterable

from sdtl_jax import fileio, metrics_io
from sdtl_jax.errors import UserError

CONFIG_FILE = 'config.json'
# The flag that moves a changed run aside instead of stopping.
MOVE_ASIDE_FLAG = '--config.if_config_changed=move_aside'
NOT_IDENTITY = (
    'checkpoint.every_epochs', 'checkpoint.keep',   # when and how many to keep
    'data.data_dir',            # where the same datasets lie (a moved or mounted cache)
    'data.num_threads', 'data.num_workers',         # loader speed; batches are the same
    'data.skip_corrupt',        # fails or skips; skipped records are counted in results.json
    'eval.every_epochs',        # extra evaluations; results use the last ones, always run
    'eval.global_batch',        # inference: the batch size does not change the predictions
    'log_every_steps',
    'if_config_changed',
    # A location, not an experiment: a study moved to another disk still resumes. What the
    # source was trained on is identity (transfer.source_data), and init_from accepts only a
    # finished run.
    'transfer.init_from',
)
# Where a run's files go when `if_config_changed=move_aside` replaces it: a sub-folder of its
# workdir, so nothing leaves the place the user looks for it.
REPLACED_DIR = 'replaced'
# Entries of a workdir that are not the run's own files: a transfer's source run, the lock.
NOT_RUN_FILES = ('source', 'lock.json', REPLACED_DIR)


class ChangedRunError(UserError):
    """The workdir holds a run of another experiment."""


def identity(config: dict) -> dict[str, Any]:
    return {k: v for k, v in metrics_io.flatten_config(config).items() if k not in NOT_IDENTITY}


def differences(stored: dict, config: dict) -> list[str]:
    """'key: stored -> new' for every identity key whose value differs. Keys the stored config
    lacks are not compared: they were added to sdtl_jax after the run started, with defaults
    that keep the old behaviour."""
    old, new = identity(stored), identity(config)
    return [f'{key}: {old[key]!r} -> {new.get(key)!r}' for key in sorted(old.keys() | new.keys())
            if key in old and old[key] != new.get(key)]


def stored_config(workdir: str) -> dict | None:
    path = os.path.join(workdir, CONFIG_FILE)
    return metrics_io.read_json(path) if fileio.exists(path) else None


def changes(workdir: str, config) -> list[str]:
    """How `config` differs from the run stored in `workdir` (empty: same experiment, or no
    run there yet)."""
    stored = stored_config(workdir)
    return [] if stored is None else differences(stored, config.to_dict())


def refusal(workdirs_and_changes: Iterable[tuple[str, list[str]]]) -> str:
    """The one line that stops a run or a study: each workdir with its changed keys, and the
    two ways out."""
    parts = [f'{workdir} holds a run of another experiment ({"; ".join(diff)})'
             for workdir, diff in workdirs_and_changes]
    return ('; '.join(parts) + '. Use another --workdir, or add ' + MOVE_ASIDE_FLAG
            + f' to move the old run into <workdir>/{REPLACED_DIR}/ (nothing is deleted)')


def check(workdir: str, config, *, move_aside: bool) -> None:
    """Raises ChangedRunError if `workdir` holds a run of another experiment, or moves that run
    aside with `move_aside`. Reads config.json only: called before any data or checkpoint."""
    diff = changes(workdir, config)
    if not diff:
        return
    if not move_aside:
        raise ChangedRunError(refusal([(workdir, diff)]))
    metrics_io.say(f'{workdir}: moved the run of another experiment to '
                   f'{move_run_aside(workdir)} ({"; ".join(diff)})')


def move_run_aside(workdir: str) -> str:
    """Moves the run's own files into <workdir>/replaced/<UTC time>/ (one rename each, never a
    copy or a delete); returns that folder. Local workdirs only: a bucket has no rename."""
    if fileio.is_remote(workdir):
        raise ChangedRunError(
            f'{workdir} holds a run of another experiment and a bucket cannot move it aside; '
            'use another --workdir')
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%dT%H%M%S.%fZ')
    target = os.path.join(workdir, REPLACED_DIR, stamp)
    os.makedirs(target)
    for name in sorted(os.listdir(workdir)):
        if name not in NOT_RUN_FILES:
            os.rename(os.path.join(workdir, name), os.path.join(target, name))
    return target
