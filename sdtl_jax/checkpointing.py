"""Orbax checkpoints of the train state and the grain iterator; loading layers for transfer.

Layout: `<workdir>/checkpoints/<step>/{state,data}`. `state` is the whole `TrainState`
(params, batch_stats, optimizer state, step, RNG); `data` is the grain iterator's position, so
a resumed run sees exactly the batches it would have seen. `Preemption` turns a SIGTERM into a
checkpoint at the next step; `saves_completed` finishes background saves on every way out.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import sys
import threading
import time
from typing import Any, Sequence

import flax
import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from sdtl_jax import fileio, layer_trees, metrics_io, workdir_guard
from sdtl_jax.errors import UserError

# What `python -m sdtl_jax.convert` writes beside its checkpoint: a transfer source of one step.
CONVERTED = 'convert.json'
# Beside checkpoints/: checkpoints that did not restore, moved out of the manager's way.
DAMAGED_DIR = 'damaged_checkpoints'


class Checkpointer:
    """A CheckpointManager bound to one run's `checkpoints/` directory."""

    def __init__(self, directory: str, *, keep: int = 3):
        self.directory = fileio.absolute(directory)   # Orbax wants absolute paths or URLs
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True,
                # A save killed half-way leaves a temporary folder: drop it at the next start.
                cleanup_tmp_directories=True),
            item_names=('state', 'data'))
        self._quiet = _OneLineErrors()
        for name in _OneLineErrors.LOGGERS:
            logging.getLogger(name).addFilter(self._quiet)
        self._unraisable_hook = sys.unraisablehook
        sys.unraisablehook = functools.partial(_without_loop_closed, self._unraisable_hook)
        self._unverified = None         # (step, bytes) of a save not yet known to be complete

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_iterator) -> None:
        """Saves asynchronously; the iterator position is captured now, before training goes on.
        Raises a UserError if the previous save failed."""
        self.check_saved(wait=True)
        self._unverified = (step, sum(x.nbytes for x in jax.tree.leaves(state)))
        try:
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator)))
        except Exception as e:   # noqa: BLE001 - a full disk fails in many ways
            raise self._save_failed(_first_line(e)) from None

    def check_saved(self, wait: bool = False) -> None:
        """Raises a UserError (path, free space, size) if the latest save has failed. Without
        `wait`, returns at once while it is still being written: called at every log step, as
        Orbax only logs a failed background save and training would go on to the next one."""
        if self._unverified is None or (not wait and self._manager.is_saving_in_progress()):
            return
        try:
            self._manager.wait_until_finished()     # raises the background save's error
        except Exception as e:   # noqa: BLE001 - whatever stopped the write
            raise self._save_failed(_first_line(e)) from None
        step, _ = self._unverified
        if not fileio.exists(os.path.join(self.directory, str(step))):
            raise self._save_failed(self._quiet.first or 'it was not finalized')
        self._unverified = None

    def _save_failed(self, cause: str) -> UserError:
        step, nbytes = self._unverified
        size = workdir_guard.format_bytes
        room = ('' if fileio.is_remote(self.directory) else
                f'; the disk has {size(workdir_guard.free_bytes(self.directory))} free')
        return UserError(
            f'Saving checkpoint step {step} to {self.directory} failed ({cause})'
            f'{room}, a checkpoint needs about {size(nbytes)}. Free space '
            'or lower --config.checkpoint.keep, then rerun: the run resumes from the last '
            'checkpoint saved')

    def restore(self, abstract_state: Any, data_iterator) -> Any:
        """Restores the latest step that restores into `abstract_state`'s shapes and shardings
        (in place for the iterator); returns the state.

        A damaged checkpoint (a file truncated by a full disk or a killed copy) that is newer
        than one that restores is moved to `<workdir>/damaged_checkpoints/`, with one line
        each, so a rerun never trips on it again. If none restores, nothing is moved (all
        failing alike is as likely a bug as damage) and a UserError names each step and error.
        Raises a ValueError naming every differing key when the checkpoint holds another model
        or class count (a workdir reused with another config).
        """
        failures = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            self._check_same_model(abstract_state, step)
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=grain.checkpoint.CheckpointRestore(data_iterator)))
            except Exception as e:   # noqa: BLE001 - any failure to read it: tried older ones
                failures.append((step, _first_line(e)))
                continue
            for damaged, why in failures:
                self._move_damaged(damaged, why)
            return restored.state
        raise UserError(
            f'No checkpoint in {self.directory} restores: '
            + '; '.join(f'step {step}: {why}' for step, why in failures)
            + '. Move the damaged ones out of that folder (the run then starts over), or, if '
            'they look intact, report this as a bug')

    def _check_same_model(self, abstract_state: Any, step: int) -> None:
        try:    # the handler reads shapes only; the manager's item_metadata knows no handler yet
            saved = ocp.StandardCheckpointHandler().metadata(
                epath.Path(self.directory) / str(step) / 'state')
        except Exception:   # noqa: BLE001 - unreadable metadata: restore reports the damage
            return
        ours = flax.serialization.to_state_dict(abstract_state)
        problems = [p for key in ('params', 'batch_stats')
                    for p in layer_trees.differences(ours.get(key, {}), saved.get(key, {}), key,
                                                'resumed')]
        if problems:
            raise ValueError(
                f'The checkpoint {self.directory}/{step} holds another model than this config '
                'builds (a workdir of another run?); use a new --workdir, or the config that '
                'wrote it:\n  ' + '\n  '.join(problems))

    def _move_damaged(self, step: int, why: str) -> None:
        """Moves checkpoint `step` out of the manager's folder (a rename, never a delete)."""
        source = os.path.join(self.directory, str(step))
        if jax.process_index() == 0:
            if fileio.is_remote(source):
                raise UserError(f'The checkpoint {source} does not restore ({why}); delete or '
                                'move it, and rerun: the run resumes from the one before')
            target = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR, str(step))
            if os.path.exists(target):
                target += f'.{int(time.time())}'
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(source, target)
            metrics_io.say(f'Checkpoint {source} does not restore ({why}); moved it to {target}'
                           ' and resumed from the one before')
        self._manager.reload()

    def reached_preemption(self, step: int) -> bool:
        """True once every process of a multi-host run has passed a preemption notice."""
        return self._manager.reached_preemption(step)

    def wait_until_finished(self) -> None:
        """Blocks until the latest save is written; raises a UserError if it failed."""
        self.check_saved(wait=True)
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
        for name in _OneLineErrors.LOGGERS:
            logging.getLogger(name).removeFilter(self._quiet)
        sys.unraisablehook = self._unraisable_hook


class _OneLineErrors(logging.Filter):
    """Orbax logs a failed background save with its traceback, from every thread involved (a
    full disk: hundreds of TensorStore lines), and asyncio once more per write task it
    abandoned, while `check_saved` stops the run with one line. This keeps Orbax's error
    records as their first line (the first one's text for `check_saved`) and drops asyncio's
    about Orbax's tasks."""

    LOGGERS = ('absl', 'asyncio')

    def __init__(self):
        super().__init__()
        self.first: str | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.name == 'asyncio':
            return not (record.exc_info and _raised_in_orbax(record.exc_info[2]))
        if _ORBAX in record.pathname:
            message = record.getMessage()
            # Orbax's own prefix ('[process=0][thread=...] ... raised an exception: ') aside.
            self.first = self.first or _first_line_of(message.split('raised an exception: ')[-1])
            record.msg, record.args = _first_line_of(message), None
            record.exc_info = record.exc_text = None
        return True


_ORBAX = f'{os.sep}orbax{os.sep}'


def _raised_in_orbax(traceback) -> bool:
    while traceback is not None:
        if _ORBAX in traceback.tb_frame.f_code.co_filename:
            return True
        traceback = traceback.tb_next
    return False


def _without_loop_closed(hook, unraisable) -> None:
    """The writes still in flight when a save fails finish into a closed asyncio loop, each
    printing a RuntimeError traceback; those say nothing the failed save does not. Any other
    goes to `hook`."""
    if not (isinstance(unraisable.exc_value, RuntimeError)
            and str(unraisable.exc_value) == 'Event loop is closed'):
        hook(unraisable)


@contextlib.contextmanager
def _without_read_only_warnings():
    """Orbax warns that a manager opened read-only is read-only (and that it will not save or
    delete): asked for, so nothing to tell the user."""
    def not_read_only(record: logging.LogRecord) -> bool:
        return not re.search(r'read.only', record.getMessage())
    logger = logging.getLogger('absl')
    logger.addFilter(not_read_only)
    try:
        yield
    finally:
        logger.removeFilter(not_read_only)


def _first_line(error: BaseException) -> str:
    """An exception as one short line: TensorStore's messages run to dozens of lines."""
    return f'{type(error).__name__}: {_first_line_of(str(error))}'


def _first_line_of(text: str) -> str:
    """The first line, its middle cut when long: TensorStore ends with the cause."""
    lines = text.strip().splitlines()
    line = (lines[0] if lines else '').split(' See full TensorStore details')[0]
    return line if len(line) <= 300 else f'{line[:100]} ... {line[-180:]}'


def checkpoints_dir(path: str) -> str:
    """Accepts a run workdir or its `checkpoints/` folder (`transfer.init_from`)."""
    candidate = os.path.join(path, 'checkpoints')
    return candidate if fileio.isdir(candidate) else path


def load_variables(path: str) -> tuple[dict, dict, int]:
    """Reads params and batch_stats of the latest checkpoint under `path`, as NumPy trees."""
    directory = fileio.absolute(checkpoints_dir(path))
    if not fileio.isdir(directory):
        raise FileNotFoundError(
            f'No checkpoint directory at {path!r}: transfer.init_from must name a run workdir '
            'or its checkpoints/ folder')
    with _without_read_only_warnings():
        manager = ocp.CheckpointManager(directory, item_names=('state', 'data'),
                                        options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f'No finished checkpoint in {directory!r}')
    # Restored raw (no target): the source may be of another shape, which `graft` reports by
    # key. Never `strict=False` with a target: it silently truncates heads.
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    with _without_read_only_warnings():
        manager.close()
    state = state.state
    return state['params'], state.get('batch_stats', {}), step


def load_for_transfer(params: dict, batch_stats: dict, path: str,
                      layers: Sequence[str]) -> tuple[dict, dict, int]:
    """Returns `params` and `batch_stats` with `layers` taken from the checkpoint at `path`,
    and the step it was taken from.

    Raises a UserError unless `path` is a finished run (its final step) or a converted
    checkpoint, and a ValueError naming every key that is missing, unexpected or of another
    shape.
    """
    final = _final_step(path)
    source_params, source_stats, step = load_variables(path)
    if final is not None and step != final:
        raise UserError(
            f'transfer.init_from={path}: its latest checkpoint is step {step}, but the run '
            f'ended at step {final} (results.json); the final checkpoint is missing or was moved '
            'aside. Re-run that run\'s command to restore it, or point init_from at another run')
    params = layer_trees.graft(params, source_params, layers, 'params')
    batch_stats = layer_trees.graft(batch_stats, source_stats, layers, 'batch_stats')
    return params, batch_stats, step


def _final_step(path: str) -> int | None:
    """The last step of the run at `path` (a run workdir or its checkpoints/): the `steps` of
    its results.json; None for a converted checkpoint (convert.json, one step). Raises a
    UserError for a run that has not finished: a transfer from it would start from weights
    that its own results do not describe."""
    # `path` is the run itself when it holds checkpoints/, else that folder inside the run.
    run = path if checkpoints_dir(path) != path else os.path.dirname(path.rstrip('/'))
    results = os.path.join(run, 'results.json')
    if fileio.exists(results):
        return int(metrics_io.read_json(results)['steps'])
    if fileio.exists(os.path.join(run, CONVERTED)):
        return None
    raise UserError(
        f'transfer.init_from={path} is not a finished run: {results} is missing. Finish it '
        'first (re-run its command; it resumes), or point init_from at a finished run or at '
        'a checkpoint written by `python -m sdtl_jax.convert`')


@contextlib.contextmanager
def saves_completed(ckpt: Checkpointer):
    """Completes the checkpoints being written (in the background) on the way out, also when
    an exception (a diverged loss, Ctrl-C) ends training: the last good one must be kept."""
    try:
        yield
    finally:
        ckpt.wait_until_finished()


class Preemption:
    """SIGTERM (a preemption notice): the loop saves a checkpoint and exits.

    One process: a Python handler sets a flag. Several: JAX's coordination service already
    catches SIGTERM and makes all processes agree on a step (Orbax's `reached_preemption`);
    a Python handler would replace its own.
    """

    def __init__(self, ckpt: Checkpointer, process_count: int):
        self._ckpt, self._received = ckpt, False
        # Handlers can only be set from the main thread (not so in some notebook runners).
        self._own_handler = (process_count == 1
                             and threading.current_thread() is threading.main_thread())

    def __enter__(self) -> Preemption:
        if self._own_handler:
            self._previous = signal.signal(signal.SIGTERM, self._set)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._own_handler:
            signal.signal(signal.SIGTERM, self._previous)

    def _set(self, signum, frame) -> None:
        self._received = True

    def reached(self, step: int) -> bool:
        return self._received if self._own_handler else self._ckpt.reached_preemption(step)
