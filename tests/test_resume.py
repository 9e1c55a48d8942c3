"""Exact resume: a run interrupted anywhere (SIGKILL during a step, a checkpoint save or an
evaluation; SIGTERM, a preemption notice) and restarted with the same command ends with params
and BatchNorm statistics bit-identical to an uninterrupted run (data order and RNG come back
from the checkpoint). On one machine: XLA's CPU rounding may differ between machines.
"""
import os
import pathlib
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from sdtl_jax import checkpointing

ROOT = pathlib.Path(__file__).parent.parent
# 6 epochs of 3 steps, evaluated and checkpointed every epoch.
FLAGS = ['--config=configs/baseline.py:smoke', '--config.num_epochs=6',
         '--config.warmup_epochs=1']
TIMEOUT = 900     # catches a hang; slow machines compile slowly


def _run(data_dir, workdir, *prefix):
    cmd = [*prefix, *FLAGS, f'--workdir={workdir}', f'--config.data.data_dir={data_dir}']
    return subprocess.run(cmd, cwd=ROOT, env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
                          capture_output=True, text=True, timeout=TIMEOUT)


def _main(data_dir, workdir):
    return _run(data_dir, workdir, sys.executable, '-m', 'sdtl_jax.main')


def _final_variables(workdir):
    params, batch_stats, step = checkpointing.load_variables(str(workdir))
    assert step == 18
    return params, batch_stats


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp('data'))


@pytest.fixture(scope='module')
def uninterrupted(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp('uninterrupted')
    result = _main(data_dir, workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    return _final_variables(workdir)


def test_run_interrupted_four_times_ends_bit_identical(data_dir, uninterrupted, tmp_path):
    """One run, interrupted at each kind of point in turn, each restart counting from where it
    resumed. A SIGKILL loses the saves still being written (Orbax saves in the background), so
    a restart resumes from the last finished checkpoint, if any: an epoch end (every 3 steps)
    or the step a SIGTERM saved."""
    workdir = tmp_path / 'run'
    resumed_at = 0
    for point, k in [('step', 8),        # killed in epoch 3 (the 8th step)
                     ('save', 2),        # killed while its 2nd checkpoint is written
                     ('eval', 2),        # killed in its 2nd evaluation, before that checkpoint
                     ('sigterm', 2)]:    # preempted before its 2nd step: saves that step
        killed = _run(data_dir, workdir, sys.executable, 'tests/interrupt_run.py', point, str(k))
        if point != 'step':                      # the first run starts from scratch
            resumed = _resumed_step(killed.stderr, workdir)
            assert resumed >= resumed_at, (point, killed.stderr[-3000:])
            resumed_at = resumed
        if point == 'sigterm':
            assert killed.returncode == 128 + signal.SIGTERM, killed.stderr[-3000:]
            saved = int(re.search(r'preempted \(SIGTERM\) at step (\d+)', killed.stderr)[1])
            assert saved == resumed_at + k
        else:
            assert killed.returncode == -signal.SIGKILL, (point, killed.stderr[-3000:])
        assert not (workdir / 'results.json').exists()

    final = _main(data_dir, workdir)
    assert final.returncode == 0, final.stderr[-3000:]
    assert _resumed_step(final.stderr, workdir) == saved
    ours, reference = _final_variables(workdir), uninterrupted
    leaves = jax.tree.leaves_with_path(ours)
    assert len(leaves) == len(jax.tree.leaves(reference))
    for (path, a), b in zip(leaves, jax.tree.leaves(reference)):
        assert np.array_equal(a, b), f'{jax.tree_util.keystr(path)} differs after resuming'


def _resumed_step(stderr, workdir):
    """The step a run resumed from; 0 if it started over (no checkpoint had finished)."""
    resumed = re.search(rf'Resumed {re.escape(str(workdir))} at step (\d+)', stderr)
    return int(resumed[1]) if resumed else 0
