"""Checks on a run's workdir before training starts: writable, room for its checkpoints, and
not in use by another run (a lock file naming its holder).

A failure here costs seconds; the same failure at the first checkpoint would cost an epoch, and
two runs writing one workdir would interleave their checkpoints and metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time

from sdtl_jax import fileio

LOCK_FILE = 'lock.json'
# A lock whose holder has not written for this long is a run that died without cleaning up
# (a preempted VM): it is taken over. Holders refresh it every HEARTBEAT_SECONDS.
STALE_SECONDS = 15 * 60
HEARTBEAT_SECONDS = 60


class WorkdirError(RuntimeError):
    """The workdir cannot be used: the message names it and what to do."""


def check_writable(workdir: str) -> None:
    """Creates `workdir` and writes and removes a probe file in it."""
    probe = os.path.join(workdir, f'.write_probe.{socket.gethostname()}.{os.getpid()}')
    try:
        fileio.makedirs(workdir)
        fileio.write_text(probe, 'probe')
        fileio.remove(probe)
    except OSError as e:
        raise WorkdirError(f'The workdir {workdir} is not writable ({type(e).__name__}: {e}); '
                           'choose another --workdir or fix its permissions') from e


def check_free_space(workdir: str, checkpoint_bytes: int, keep: int) -> None:
    """Raises unless a local workdir's disk has room for `keep` + 1 checkpoints of
    `checkpoint_bytes` (the kept ones and the one being written). Buckets are not checked."""
    if fileio.is_remote(workdir):
        return
    needed = checkpoint_bytes * (keep + 1)
    free = shutil.disk_usage(workdir).free
    if free < needed:
        raise WorkdirError(
            f'The disk of {workdir} has {free / 1e9:.2f} GB free; this run needs about '
            f'{needed / 1e9:.2f} GB for {keep} checkpoints of {checkpoint_bytes / 1e9:.2f} GB '
            'and one being written. Free space, choose another --workdir, or lower '
            '--config.checkpoint.keep')


class RunLock:
    """`<workdir>/lock.json` while a run trains there: host, pid, command, start, heartbeat.

    A second run in the same workdir refuses to start, naming the first. A lock is taken over
    when its holder is gone: a dead pid on this host, or no heartbeat for STALE_SECONDS from
    another host. Only process 0 of a multi-host run holds it.
    """

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.owner = {'host': socket.gethostname(), 'pid': os.getpid(),
                      'command': ' '.join(sys.argv), 'started': time.time()}
        self._last_beat = 0.0

    def acquire(self) -> str | None:
        """Takes the lock; returns a note when a stale lock was taken over."""
        note = None
        if fileio.exists(self.path):
            holder = json.loads(fileio.read_text(self.path))
            if holder.get('host') == self.owner['host'] and holder.get('pid') == os.getpid():
                pass                                # this process: a stage of the same run
            elif self._alive(holder):
                raise WorkdirError(
                    f'{os.path.dirname(self.path)} is in use by another run: pid '
                    f'{holder.get("pid")} on {holder.get("host")}, started '
                    f'{_when(holder.get("started"))}, last seen {_when(holder.get("heartbeat"))}'
                    f' ({holder.get("command")}). Wait for it, stop it, or use another '
                    f'--workdir; if it is dead, delete {self.path}')
            else:
                note = (f'Took over the lock of a run that is gone (pid {holder.get("pid")} on '
                        f'{holder.get("host")}, last seen {_when(holder.get("heartbeat"))})')
        self.heartbeat(force=True)
        return note

    def heartbeat(self, force: bool = False) -> None:
        """Refreshes the lock, at most every HEARTBEAT_SECONDS unless forced."""
        now = time.time()
        if force or now - self._last_beat >= HEARTBEAT_SECONDS:
            fileio.write_text(self.path, json.dumps({**self.owner, 'heartbeat': now}))
            self._last_beat = now

    def release(self) -> None:
        if fileio.exists(self.path):
            fileio.remove(self.path)

    def _alive(self, holder: dict) -> bool:
        if holder.get('host') == self.owner['host']:
            try:
                os.kill(int(holder.get('pid', 0)), 0)
            except (OSError, ValueError):
                return False
            return True
        return time.time() - float(holder.get('heartbeat', 0)) < STALE_SECONDS


def _when(timestamp) -> str:
    if not timestamp:
        return 'unknown'
    return time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(timestamp)))
