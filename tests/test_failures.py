"""Failures a long run must survive or refuse early: a diverged loss, an unwritable or full
workdir, a second run in the same workdir, a workdir holding another model's checkpoints."""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train import smoke

from sdtl_jax import checkpointing, experiment, train, workdir_guard


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp('data'))


def test_unwritable_workdir_is_reported_before_anything_is_read(tmp_path):
    blocker = tmp_path / 'a_file'
    blocker.write_text('')
    workdir = blocker / 'run'                  # a folder cannot be made inside a file
    config = smoke('baseline', 'domain=real', str(tmp_path / 'data'))
    with pytest.raises(workdir_guard.WorkdirError, match=f'{workdir} is not writable'):
        experiment.stage(config, str(workdir))
    assert not (tmp_path / 'data').exists()


def test_full_disk_is_reported_before_training(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_guard.shutil, 'disk_usage',
                        lambda path: type('Usage', (), {'free': 10_000_000})())
    with pytest.raises(workdir_guard.WorkdirError,
                       match=r'has 10.0 MB free; this run needs about 1\d\.\d MB for 3 '
                             r'checkpoints of \d\.\d\d MB'):
        experiment.run(smoke('baseline', 'domain=real', data_dir), str(tmp_path))
    assert not (tmp_path / 'metrics.jsonl').exists()
    assert checkpointing.Checkpointer(str(tmp_path / 'checkpoints')).latest_step() is None
    assert not (tmp_path / workdir_guard.LOCK_FILE).exists()     # released on the way out


def test_second_run_in_a_workdir_refuses_naming_the_first(tmp_path):
    first = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        (tmp_path / workdir_guard.LOCK_FILE).write_text(json.dumps({
            'host': socket.gethostname(), 'pid': first.pid, 'command': 'sdtl_jax.main (first)',
            'started': time.time(), 'heartbeat': time.time()}))
        config = smoke('baseline', 'domain=real', str(tmp_path / 'data'))
        with pytest.raises(workdir_guard.WorkdirError,
                           match=rf'in use by another run: pid {first.pid} on '
                                 rf'{socket.gethostname()}.*sdtl_jax.main \(first\)'):
            experiment.stage(config, str(tmp_path))
        assert not (tmp_path / 'data').exists()
    finally:
        first.kill()
        first.wait()


def _write_lock(workdir, **holder):
    (workdir / workdir_guard.LOCK_FILE).write_text(json.dumps(holder))


def test_lock_of_a_dead_run_is_taken_over(tmp_path):
    gone = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                          capture_output=True, text=True)
    now = time.time()
    _write_lock(tmp_path, host=socket.gethostname(), pid=int(gone.stdout), heartbeat=now)
    lock = workdir_guard.RunLock(str(tmp_path))
    assert 'Took over the lock of a run that is gone' in lock.acquire()
    assert json.loads((tmp_path / workdir_guard.LOCK_FILE).read_text())['pid'] == os.getpid()
    lock.release()
    assert not (tmp_path / workdir_guard.LOCK_FILE).exists()


def test_lock_of_another_host_expires_without_heartbeat(tmp_path):
    _write_lock(tmp_path, host='other-vm', pid=1, heartbeat=time.time() - 60)
    with pytest.raises(workdir_guard.WorkdirError, match='pid 1 on other-vm'):
        workdir_guard.RunLock(str(tmp_path)).acquire()
    # Preempted: its heartbeat stopped long ago, so a restart elsewhere may go on.
    _write_lock(tmp_path, host='other-vm', pid=1,
                heartbeat=time.time() - workdir_guard.STALE_SECONDS - 1)
    assert workdir_guard.RunLock(str(tmp_path)).acquire().startswith('Took over')


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
        data_dir, tmp_path, monkeypatch):
    train_step = train.train_step

    def diverging_step(state, batch, **kwargs):     # the loss turns NaN from step 5 on
        state, metrics = train_step(state, batch, **kwargs)
        return state, {**metrics, 'loss': jnp.where(state.step >= 5, jnp.nan, metrics['loss'])}

    monkeypatch.setattr(train, 'train_step', diverging_step)
    config = smoke('baseline', 'domain=real', data_dir)
    config.num_epochs = 3
    config.log_every_steps = 100           # found at the epoch's end, before its checkpoint
    with pytest.raises(FloatingPointError, match=r'Loss is nan at step 5 of .*last good '
                                                 r'checkpoint is kept'):
        experiment.run(config, str(tmp_path))
    assert checkpointing.Checkpointer(str(tmp_path / 'checkpoints')).latest_step() == 3
    params, _, _ = checkpointing.load_variables(str(tmp_path))
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


def test_workdir_of_another_model_is_refused_naming_the_keys(data_dir, tmp_path):
    experiment.run(smoke('baseline', 'domain=real', data_dir), str(tmp_path))     # 3 steps
    config = smoke('baseline', 'domain=real', data_dir)
    config.model.width = 16
    config.num_epochs = 2                  # not finished: it would resume from step 3
    # Without config.json (lost, or a workdir from before run identities), the checkpoint's
    # own shapes still catch it.
    (tmp_path / 'config.json').unlink()
    with pytest.raises(ValueError, match=r'holds another model than this config builds'
                                         r'(.|\n)*params/stem/\S+: resumed shape'):
        experiment.run(config, str(tmp_path))


def _take_lock(workdir, barrier, done, results):
    barrier.wait()
    try:
        workdir_guard.RunLock(workdir).acquire()
        results.put('got it')
    except workdir_guard.WorkdirError:
        results.put('refused')
    # The holder stays alive until all have decided: a lock whose process has ended is stale,
    # and a slow taker would rightly take it over.
    done.wait(30)


@pytest.mark.parametrize('stale', [False, True])
def test_two_runs_started_at_once_never_both_get_the_lock(tmp_path, stale):
    """The lock is created exclusively (and a stale one moved aside by one rename): of runs
    started at the same instant exactly one holds it. Checking, then writing, let 2 of 20
    such pairs both in."""
    import multiprocessing

    context = multiprocessing.get_context('fork')
    for trial in range(20):
        workdir = tmp_path / str(trial)
        workdir.mkdir()
        if stale:
            _write_lock(workdir, host='other-vm', pid=1, heartbeat=time.time() - 3600)
        barrier, done, results = context.Barrier(3), context.Barrier(3), context.Queue()
        runs = [context.Process(target=_take_lock, args=(str(workdir), barrier, done, results))
                for _ in range(3)]
        for run in runs:
            run.start()
        for run in runs:
            run.join(30)
        outcomes = sorted(results.get(timeout=5) for _ in runs)
        assert outcomes == ['got it', 'refused', 'refused'], (trial, outcomes)
        holder = json.loads((workdir / 'lock.json').read_text())
        assert holder['host'] == socket.gethostname() and holder['pid'] in {r.pid for r in runs}
        assert sorted(p.name for p in workdir.iterdir()) == ['lock.json']   # no temporary files


def test_a_damaged_lock_file_is_taken_over(tmp_path):
    (tmp_path / 'lock.json').write_text('{"host": "vm", "pi')   # a crash while writing
    old = time.time() - 60
    os.utime(tmp_path / 'lock.json', (old, old))
    lock = workdir_guard.RunLock(str(tmp_path))
    assert lock.acquire().startswith('Took over the lock of a run that is gone')
    assert json.loads((tmp_path / 'lock.json').read_text())['pid'] == os.getpid()
