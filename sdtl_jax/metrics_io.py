"""What a run writes into its workdir: config.json, metrics.jsonl, TensorBoard, results.json.

Only process 0 writes (as in big_vision); every other process gets a writer that does
nothing, so the training loop has no `if process_index == 0` branches. The workdir may be a
local folder or a gs:// URL (`fileio`).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from typing import Any, Sequence

import tqdm

from sdtl_jax import fileio


class Writer:
    """Appends one JSON line per evaluation to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.workdir = workdir
        self.enabled = enabled
        self._tb = None
        if enabled:
            fileio.makedirs(workdir)
            # Imported here: tensorboardX pulls in protobuf, only process 0 needs it. It
            # writes gs:// itself (google-cloud-storage), re-uploading its file at each flush.
            import tensorboardX
            self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, 'tensorboard'))

    def write_config(self, config) -> None:
        if self.enabled:
            write_json(os.path.join(self.workdir, 'config.json'), config.to_dict())

    def scalars(self, step: int, values: dict[str, float], *, jsonl: bool = False) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)
        if jsonl:
            fileio.append_text(os.path.join(self.workdir, 'metrics.jsonl'),
                               json.dumps({'step': step, **values}) + '\n')

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """Evaluation records of metrics.jsonl, one per epoch; a resumed run's repeats keep the last."""
    path = os.path.join(workdir, 'metrics.jsonl')
    if not fileio.exists(path):
        return []
    by_epoch = {}
    for line in fileio.read_text(path).splitlines():
        if line.strip():
            record = json.loads(line)
            by_epoch[record['epoch']] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def summarize(records: Sequence[dict[str, Any]], last_epochs: int) -> dict[str, float]:
    """Mean and std over the last `last_epochs` evaluations, as the paper reports them."""
    last = list(records)[-last_epochs:]
    if not last:
        raise ValueError('No evaluation was recorded in metrics.jsonl')
    out = {}
    for key in ('top1', 'top5', 'train_loss'):
        values = [r[key] for r in last if r[key] is not None]   # None: no training (N = 18)
        out[f'{key}_mean'] = statistics.fmean(values) if values else None
        out[f'{key}_std'] = statistics.pstdev(values) if values else None
    out['num_evals'] = len(last)
    return out


def read_json(path: str) -> Any:
    return json.loads(fileio.read_text(path))


def write_json(path: str, value: Any) -> None:
    """Writes atomically, so a reader never sees half a file."""
    fileio.write_text(path, json.dumps(value, indent=2, sort_keys=True) + '\n')


def progress(total: int, initial: int, desc: str, *, enabled: bool):
    """A progress bar with rate and ETA on process 0."""
    return tqdm.tqdm(total=total, initial=initial, desc=desc, disable=not enabled,
                     unit='step', dynamic_ncols=True, mininterval=2.0)


def say(message: str) -> None:
    """A status line on stderr from process 0, printed above the progress bar."""
    import jax
    if jax.process_index() == 0:
        tqdm.tqdm.write(message, file=sys.stderr)
