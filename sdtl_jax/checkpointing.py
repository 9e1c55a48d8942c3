"""Orbax checkpoints of the train state and the grain iterator; loading layers for transfer.

Layout: `<workdir>/checkpoints/<step>/{state,data}`. `state` is the whole `TrainState`
(params, batch_stats, optimizer state, step, RNG); `data` is the grain iterator's position, so
a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import flax
import grain
import orbax.checkpoint as ocp
from etils import epath

from sdtl_jax import fileio, freeze


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

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_iterator) -> None:
        """Saves asynchronously; the iterator position is captured now, before training goes on."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator)))

    def restore(self, abstract_state: Any, data_iterator) -> Any:
        """Restores the latest step into `abstract_state`'s shapes and shardings (in place for
        the iterator); returns the state.

        Raises a ValueError naming every differing key when the checkpoint holds another model
        or class count (a workdir reused with another config).
        """
        step = self._manager.latest_step()
        # The handler reads shapes only; the manager's own item_metadata knows no handler yet.
        saved = ocp.StandardCheckpointHandler().metadata(
            epath.Path(self.directory) / str(step) / 'state')
        ours = flax.serialization.to_state_dict(abstract_state)
        problems = [p for key in ('params', 'batch_stats')
                    for p in freeze.differences(ours.get(key, {}), saved.get(key, {}), key,
                                                'resumed')]
        if problems:
            raise ValueError(
                f'The checkpoint {self.directory}/{step} holds another model than this config '
                'builds (a workdir of another run?); use a new --workdir, or the config that '
                'wrote it:\n  ' + '\n  '.join(problems))
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
        return restored.state

    def reached_preemption(self, step: int) -> bool:
        """True once every process of a multi-host run has passed a preemption notice."""
        return self._manager.reached_preemption(step)

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


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
    manager = ocp.CheckpointManager(directory, item_names=('state', 'data'),
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f'No finished checkpoint in {directory!r}')
    # Restored raw (no target): the source may be of another shape, which `graft` reports by
    # key. Never `strict=False` with a target: it silently truncates heads (TRAPS.md).
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    state = state.state
    return state['params'], state.get('batch_stats', {}), step


def load_for_transfer(params: dict, batch_stats: dict, path: str,
                      layers: Sequence[str]) -> tuple[dict, dict]:
    """Returns `params` and `batch_stats` with `layers` taken from the checkpoint at `path`.

    Raises a ValueError naming every key that is missing, unexpected or of another shape.
    """
    source_params, source_stats, _ = load_variables(path)
    params = freeze.graft(params, source_params, layers, 'params')
    batch_stats = freeze.graft(batch_stats, source_stats, layers, 'batch_stats')
    return params, batch_stats
