"""Two processes on this machine, joined by jax.distributed as two hosts would be."""
import json
import os
import pathlib
import socket
import subprocess
import sys

ROOT = pathlib.Path(__file__).parent.parent


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_two_process_run_trains_evaluates_and_checkpoints(tmp_path):
    port = _free_port()
    workdir = tmp_path / 'run'
    procs = []
    for i in range(2):
        env = {**os.environ, 'SDTL_MULTIHOST': '1', 'JAX_PLATFORMS': 'cpu',
               'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}', 'SDTL_NUM_PROCESSES': '2',
               'SDTL_PROCESS_ID': str(i)}
        procs.append(subprocess.Popen(
            [sys.executable, '-m', 'sdtl_jax.main', '--config=configs/baseline.py:smoke',
             f'--workdir={workdir}', f'--config.data.data_dir={tmp_path / "data"}',
             '--config.aug.num_local=0'],     # one pass: half the compile time
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=1200) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert 'JAX 0.' in outputs[0][1] and '2 process(es)' in outputs[0][1]
    assert 'epoch 1/1' not in outputs[1][1]          # only process 0 reports
    results = json.loads((workdir / 'results.json').read_text())
    assert results['steps'] == 3
    metrics = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    assert [m['num_images'] for m in metrics] == [360]   # both halves of val, each image once
    # Each process saved its own data-iterator position.
    data = workdir / 'checkpoints' / '3' / 'data'
    assert {'process_0-of-2.json', 'process_1-of-2.json'} <= {p.name for p in data.iterdir()}
