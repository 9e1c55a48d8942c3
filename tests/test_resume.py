"""Resuming: a run killed mid-training finishes from its last checkpoint with the same command."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp('data'))


def test_sigkill_then_rerun_resumes(data_dir, tmp_path):
    """Killed mid-training, the same command resumes from the last checkpoint and finishes."""
    workdir = tmp_path / 'run'
    cmd = [sys.executable, '-m', 'sdtl_jax.main', '--config=configs/baseline.py:smoke',
           f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
           '--config.num_epochs=12', '--config.eval.every_epochs=100']
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    ckpt_dir = workdir / 'checkpoints'
    deadline = time.time() + 900    # catches a hang; slow machines compile slowly
    while time.time() < deadline and proc.poll() is None:
        # Finished checkpoints only: a save in flight is a '<step>.orbax-checkpoint-tmp' folder.
        steps = ([int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()]
                 if ckpt_dir.exists() else [])
        if steps and max(steps) >= 6:
            break
        time.sleep(0.2)
    assert proc.poll() is None, 'the run ended before it could be killed: ' + proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (workdir / 'results.json').exists()

    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = [line for line in rerun.stderr.splitlines() if 'Resumed' in line]
    assert resumed, rerun.stderr[-3000:]
    assert int(resumed[0].rsplit(' ', 1)[-1]) >= 6        # not started over
    results = json.loads((workdir / 'results.json').read_text())
    assert results['steps'] == 36
