"""Checks on a run's workdir before training starts: writable, room for its checkpoints, and
not in use by another run (a lock file naming its holder).

A failure here costs seconds; the same failure at the first checkpoint would cost an epoch, and
two runs writing one workdir would interleave their checkpoints and metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import time

from sdtl_jax import fileio
from sdtl_jax.errors import UserError

LOCK_FILE = 'lock.json'
# A lock whose holder has not written for this long is a run that died without cleaning up
# (a preempted VM): it is taken over. Holders refresh it every HEARTBEAT_SECONDS.
STALE_SECONDS = 15 * 60
HEARTBEAT_SECONDS = 60
# A takeover guard older than this was left by a run that crashed while taking over a stale lock
# (holding it takes a read and a delete).
TAKEOVER_SECONDS = 10


class WorkdirError(UserError):
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
    free = free_bytes(workdir)
    if free < needed:
        raise WorkdirError(
            f'The disk of {workdir} has {format_bytes(free)} free; this run needs about '
            f'{format_bytes(needed)} for {keep} checkpoints of {format_bytes(checkpoint_bytes)}'
            ' and one being written. Free space, choose another --workdir, or lower '
            '--config.checkpoint.keep')


def free_bytes(path: str) -> int:
    return shutil.disk_usage(path).free


def format_bytes(n: float) -> str:
    """3 significant digits in the largest unit that fits: '950 B', '12.3 MB', '1.07 GB'."""
    if n < 999.5:
        return f'{n:.0f} B'
    for unit in ('kB', 'MB', 'GB', 'TB'):
        n /= 1000
        if n < 999.5 or unit == 'TB':
            break
    return f'{n:.{0 if n >= 99.95 else 1 if n >= 9.995 else 2}f} {unit}'


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
        """Takes the lock; returns a note when a stale lock was taken over.

        The lock file is created exclusively, so of two runs started at the same instant exactly
        one gets it: on a local disk complete, by a hard link; in a bucket with generation 0 as
        the write's precondition. A stale lock is removed by one taker only: on a disk under a
        takeover guard (`_move_aside`), in a bucket by a delete of that generation.
        """
        note = None
        remote = fileio.is_remote(self.path)
        while True:
            if not fileio.exists(self.path) and self._create():
                return note
            try:
                text, generation = (fileio.read_generation(self.path) if remote
                                    else (fileio.read_text(self.path), None))
                holder = json.loads(text)
            except FileNotFoundError:
                continue                        # moved aside by a run taking it over
            except json.JSONDecodeError:
                # Being written by a run that has just created it (no hard links), or damaged
                # by a crash long ago: then it is stale. (A bucket has no half-written object.)
                if not remote and time.time() - os.path.getmtime(self.path) < 5:
                    time.sleep(0.1)
                    continue
                holder = {}
            if holder.get('host') == self.owner['host'] and holder.get('pid') == os.getpid():
                self.heartbeat(force=True)      # this process: a stage of the same run
                return note
            if self._alive(holder):
                raise WorkdirError(
                    f'{os.path.dirname(self.path)} is in use by another run: pid '
                    f'{holder.get("pid")} on {holder.get("host")}, started '
                    f'{_when(holder.get("started"))}, last seen {_when(holder.get("heartbeat"))}'
                    f' ({holder.get("command")}). Wait for it, stop it, or use another '
                    f'--workdir; if it is dead, delete {self.path}')
            note = (f'Took over the lock of a run that is gone (pid {holder.get("pid")} on '
                    f'{holder.get("host")}, last seen {_when(holder.get("heartbeat"))})')
            if remote:
                fileio.remove_generation(self.path, generation)     # False: another took it
            else:
                self._move_aside(text)

    def _move_aside(self, stale: str) -> None:
        """Removes the stale lock (its text: `stale`), one taker at a time: under
        `<lock>.takeover` (created exclusively) the lock is read again and removed only if it
        is still the stale one, so a lock that another taker made meanwhile is never touched.
        (Renaming it aside and putting a new one back left a moment without a lock, in which a
        third run could take it too.)"""
        guard = f'{self.path}.takeover'
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - os.path.getmtime(guard) > TAKEOVER_SECONDS:
                    os.remove(guard)            # left by a taker that crashed holding it
            time.sleep(0.005)
            return                              # read the lock again
        os.close(fd)
        try:
            with contextlib.suppress(FileNotFoundError):
                if fileio.read_text(self.path) == stale:
                    os.remove(self.path)
        finally:
            os.remove(guard)

    def _create(self) -> bool:
        """Writes the lock if none exists (locally: atomically); False if another run has it."""
        if fileio.is_remote(self.path):
            created = fileio.create_new(self.path, json.dumps({**self.owner,
                                                               'heartbeat': time.time()}))
            self._last_beat = time.time()
            return created
        temp = f'{self.path}.new.{self.owner["host"]}.{os.getpid()}'
        with open(temp, 'w') as f:
            f.write(json.dumps({**self.owner, 'heartbeat': time.time()}))
        try:
            os.link(temp, self.path)            # fails if the lock exists: never half a file
        except FileExistsError:
            return False
        except OSError:                         # no hard links here (some FUSE mounts)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return False
            with os.fdopen(fd, 'w') as f:
                f.write(json.dumps({**self.owner, 'heartbeat': time.time()}))
        finally:
            os.remove(temp)
        self._last_beat = time.time()
        return True

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
