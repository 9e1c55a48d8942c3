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
import textwrap
from typing import Any, Sequence

import tqdm

from sdtl_jax import fileio

# metrics.jsonl keeps its flat keys (reports and tests read them); TensorBoard groups them. An
# evaluation record's other keys (top1, top5, num_images) are eval/*. Its `lr` is left out:
# train/lr is logged at every log step, one more curve of it would only repeat it.
_RECORD_TAGS = {'epoch': 'train/epoch', 'train_loss': 'train/epoch_loss',
                'step_s': 'train/epoch_step_s', 'wall_s': 'train/wall_s', 'lr': None}
# The hparams dashboard compares runs by these (tags written by `scalars`).
_HPARAM_METRICS = ('eval/top1', 'eval/top5', 'train/epoch_loss')


class Writer:
    """Appends one JSON line per evaluation to metrics.jsonl and mirrors scalars to TensorBoard.

    TensorBoard reads `<workdir>/tensorboard`: scalars in the train/ and eval/ groups, the
    config as text and as hparams, all in that one folder (one run, one logdir).
    """

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
        if not self.enabled:
            return
        values = config.to_dict()
        fileio.write_json(os.path.join(self.workdir, 'config.json'), values)
        text = json.dumps(values, indent=2, sort_keys=True)
        # An indented block: TensorBoard's text dashboard renders markdown.
        self._tb.add_text('config', textwrap.indent(text, '    '), 0)
        self._write_hparams(values)

    def _write_hparams(self, config_values: dict[str, Any]) -> None:
        """The flattened config for the hparams dashboard. Not `add_hparams`: it writes into a
        sub-folder of its own, which TensorBoard shows as a second run."""
        from tensorboardX import summary
        metrics = dict.fromkeys(_HPARAM_METRICS, 0.0)   # only the names are written
        experiment, session_start, _ = summary.hparams(_hparams(config_values), metrics)
        # The session-end summary (status: success) is left out: training has not started.
        for proto in (experiment, session_start):
            self._tb.file_writer.add_summary(proto)

    def scalars(self, step: int, values: dict[str, float], *, jsonl: bool = False) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            tag = _tensorboard_tag(key)
            if tag and isinstance(value, (int, float)):
                self._tb.add_scalar(tag, value, step)
        if jsonl:
            fileio.append_text(os.path.join(self.workdir, 'metrics.jsonl'),
                               json.dumps({'step': step, **values}) + '\n')

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _tensorboard_tag(key: str) -> str | None:
    """The TensorBoard tag of a `Writer.scalars` key; None: not written to TensorBoard."""
    if '/' in key:          # the training loop's own tags, e.g. train/loss
        return key
    return _RECORD_TAGS.get(key, f'eval/{key}')


def flatten_config(config_values: dict[str, Any], prefix: str = '') -> dict[str, Any]:
    """Nested config values as {'optim.base_lr': 0.1, ...}, tuples as lists (as config.json
    stores them)."""
    flat = {}
    for key, value in config_values.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = json.loads(json.dumps(value))
    return flat


def _hparams(config_values: dict[str, Any]) -> dict[str, Any]:
    """The flattened config with lists as JSON text (hparams hold numbers, strings and
    booleans only) and None values left out."""
    return {name: json.dumps(value) if isinstance(value, list) else value
            for name, value in flatten_config(config_values).items() if value is not None}


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


def cut_metrics(workdir: str, step: int) -> None:
    """Drops metrics.jsonl's records after `step`, where a resumed run starts again: they
    would be written a second time (an epoch after the last checkpoint, or after a damaged one
    that was moved aside). Rewritten whole and atomically."""
    path = os.path.join(workdir, 'metrics.jsonl')
    if not fileio.exists(path):
        return
    lines = fileio.read_text(path).splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)['step'] <= step]
    if len(kept) != len(lines):
        fileio.write_text(path, ''.join(kept))


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


def progress(total: int, initial: int, desc: str, *, enabled: bool) -> Progress:
    """A progress bar with rate and ETA on process 0."""
    return Progress(total=total, initial=initial, desc=desc, disable=not enabled, unit='step',
                    dynamic_ncols=True, mininterval=2.0)


class Progress(tqdm.tqdm):
    """tqdm whose rate and ETA count training only, and that logs plain lines off a terminal.

    - The first update of a process is counted but not timed: it holds compilation and the
      loader's start (a minute of compilation made the first ETA of a one-minute stage 1.5 h).
      `unpause()` leaves out the time since the last update (evaluation, checkpoints).
    - When the output is no terminal (SLURM, `gcloud ... ssh` without a TTY, a redirect), a
      redrawn bar would write a carriage return per refresh into the log. There it prints one
      line every `line_fraction` of the total or every `line_seconds`, whichever comes first,
      and one at the end: `desc: 500/1000 step (50%), 4.21step/s, 01:59 left`.

    Same arguments and methods as tqdm.
    """

    def __init__(self, *args, line_fraction: float = 0.1, line_seconds: float = 60.0, **kwargs):
        self._timed = False
        self._last_update_t = None
        self._plain = not _redraws_in_place(kwargs.get('file') or sys.stderr)
        self._line_fraction, self._line_seconds = line_fraction, line_seconds
        self._next_line_n, self._next_line_t = 0, float('-inf')   # tqdm's __init__ displays
        self._line_n = None
        if self._plain:
            kwargs['leave'] = False     # `close` prints the last line itself
        super().__init__(*args, **kwargs)

    def update(self, n=1):
        if self.disable:
            return None
        self._last_update_t = self._time()
        if self._timed:
            return super().update(n)
        self._timed = True
        self.n += n
        self._restart_clock()
        return self.refresh()

    def _restart_clock(self) -> None:
        """Rate and ETA count from now on: the updates so far and their time are left out."""
        self.initial = self.last_print_n = self.n
        self.start_t = self.last_print_t = self._time()

    def unpause(self) -> None:
        """Leaves the time since the last update out of rate and ETA (tqdm's own leaves out the
        time since the last refresh, dropping up to `mininterval` of steps with it)."""
        if self.disable or self._last_update_t is None:
            return
        paused = self._time() - self._last_update_t
        self.start_t += paused
        self.last_print_t += paused
        self._last_update_t += paused

    def display(self, msg=None, pos=None):
        if not self._plain:
            return super().display(msg, pos)
        if msg is None and self._line_due():
            self._print_line()
        return False        # nothing drawn that a later `clear` would have to erase

    def clear(self, nolock=False):
        if not self._plain:
            super().clear(nolock)

    def close(self):
        if self._plain and not self.disable and self._line_n != self.n:
            self._ema_dt = lambda: None     # as tqdm does: the last line gives the mean rate
            self._print_line()
        super().close()

    def _line_due(self) -> bool:
        return self.n >= self._next_line_n or self._time() >= self._next_line_t

    def _print_line(self) -> None:
        stats = {**self.format_dict, 'bar_format': _LINE if self.total else _LINE_NO_TOTAL}
        line = ' '.join(self.format_meter(**stats).split())     # rate_fmt pads with spaces
        self.fp.write(f'{self.desc}: {line}\n' if self.desc else f'{line}\n')
        self.fp.flush()
        self._line_n = self.n
        self._next_line_t = self._time() + self._line_seconds
        if self.total:
            every = max(1, round(self.total * self._line_fraction))
            self._next_line_n = (self.n // every + 1) * every


_LINE = '{n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {rate_fmt}, {remaining} left{postfix}'
_LINE_NO_TOTAL = '{n_fmt} {unit}, {rate_fmt}{postfix}'


def _redraws_in_place(file) -> bool:
    """A terminal, or a Jupyter cell (ipykernel's stream is no TTY but renders '\\r' in place)."""
    isatty = getattr(file, 'isatty', None)
    return bool(isatty and isatty()) or type(file).__module__.startswith('ipykernel')


def say(message: str) -> None:
    """A status line on stderr from process 0, printed above the progress bar."""
    import jax
    if jax.process_index() == 0:
        tqdm.tqdm.write(message, file=sys.stderr)
