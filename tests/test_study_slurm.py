"""launch/study_slurm.py against a real SLURM: a one-node cluster on this machine
(tests/slurm_cluster.sh: munged, slurmctld, slurmd; 2 CPUs as 2 task slots).

- The smoke layer study (4 runs) through study_slurm: each run ran once, the transfers started
  after the baselines ended, and every run's results equal those of a local `study.run` of the
  same study (same programs on the same CPU, one device: bit-identical, so compared exactly).
- A preemption: a running task gets SIGTERM on its batch shell, as --signal=B:TERM@GRACE sends
  before a time limit; it saves a checkpoint, requeues itself and ends with the results of the
  same run left alone.

The cluster has no accounting database (no sacct data): job start and end times come from its
job-completion file. Fails, never skips, when SLURM cannot be installed or started.
"""
import importlib.util
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import pytest

from sdtl_jax import study

ROOT = pathlib.Path(__file__).parent.parent
CLUSTER = ROOT / 'tests' / 'slurm_cluster.sh'
STUDY_CONFIG = 'configs/study/layers.py:smoke'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


@pytest.fixture(scope='module')
def cluster(tmp_path_factory):
    """SLURM_CONF of a running one-node cluster; its daemons are stopped at the end."""
    directory = tmp_path_factory.mktemp('slurm')
    start = subprocess.run(['bash', str(CLUSTER), 'start', str(directory), str(_free_port()),
                            str(_free_port())], capture_output=True, text=True, timeout=600)
    try:
        if start.returncode:
            pytest.fail(f'could not start a SLURM cluster (tests/slurm_cluster.sh):\n'
                        f'{start.stderr[-3000:]}', pytrace=False)
        yield {**os.environ, 'SLURM_CONF': str(directory / 'slurm.conf')}, directory
    finally:
        subprocess.run(['bash', str(CLUSTER), 'stop', str(directory)], timeout=120)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp('data'))


def load_config(arg):
    spec = importlib.util.spec_from_file_location('layers', ROOT / 'configs/study/layers.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def study_slurm(env, *args) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, 'launch/study_slurm.py', *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def wait_until_idle(env, timeout_s=240):
    """Waits until the cluster has no job queued or running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        queue = subprocess.run(['squeue', '-h', '-o', '%i %T'], env=env, capture_output=True,
                               text=True, check=True).stdout
        if not queue.strip():
            return
        time.sleep(1)
    pytest.fail(f'jobs still queued after {timeout_s} s:\n{queue}')


def finished_jobs(directory) -> list[dict[str, str]]:
    """The job-completion file's records (one per job end, a requeue included)."""
    text = (directory / 'jobcomp.txt').read_text()
    return [dict(re.findall(r'(\w+)=(\S*)', line)) for line in text.splitlines()]


def top1(workdir, run) -> dict[str, float]:
    results = json.loads((workdir / run / 'results.json').read_text())
    return {k: v for k, v in results.items() if k.startswith(('top1', 'top5', 'train_loss'))}


def test_smoke_study_runs_in_stage_order_with_the_results_of_a_local_run(
        cluster, data_dir, tmp_path):
    env, directory = cluster
    # The local reference first: it also fills the compilation cache the tasks then use.
    config = load_config('smoke')
    config.data.data_dir = data_dir
    config.study.report = False
    local = tmp_path / 'local'
    study.run(config, str(local))

    workdir = tmp_path / 'slurm'
    args = [f'--config={STUDY_CONFIG}', f'--workdir={workdir}',
            f'--config.data.data_dir={data_dir}']
    dry = study_slurm(env, *args, '--dry_run').stdout
    assert '--dependency=afterok:$stage1' in dry and 'runs=(S R)' in dry
    assert not workdir.exists()              # a dry run submits and writes nothing
    submitted = study_slurm(env, *args, '--max_parallel=2').stdout
    assert 'stage 2/2' in submitted and 'report: job' in submitted
    wait_until_idle(env)

    runs = ['S', 'R', 'SDTL_N16', 'RDTL_N16']
    assert all(top1(workdir, r) == top1(local, r) for r in runs)
    assert 'N = 16' in (workdir / 'report.md').read_text()
    logs = ''.join(p.read_text() for p in (workdir / 'logs').glob('slurm-*_*.log'))
    for run in runs:                         # each run once, never restarted
        assert len(re.findall(rf'study_slurm: run {run}, .* start 1\n', logs)) == 1, logs
    assert 'start 2' not in logs
    jobs = [j for j in finished_jobs(directory) if j['Name'].startswith('sdtl-layers')]
    assert all(j['JobState'] == 'COMPLETED' for j in jobs), jobs
    by_stage = {name: [j for j in jobs if j['Name'] == f'sdtl-layers-{name}']
                for name in ('stage1', 'stage2', 'report')}
    assert [len(v) for v in by_stage.values()] == [2, 2, 1]
    # ISO times compare as strings; one-second resolution, so equal counts as in order.
    assert max(j['EndTime'] for j in by_stage['stage1']) <= min(
        j['StartTime'] for j in by_stage['stage2'])
    assert max(j['EndTime'] for j in by_stage['stage2']) <= by_stage['report'][0]['StartTime']

    # The same command again submits no run: only the report.
    again = study_slurm(env, *args).stdout
    assert 'job array' not in again and 'report: job' in again
    status = study_slurm(env, *args, '--status').stdout
    assert status.count('finished') == 4, status
    wait_until_idle(env)


def test_a_preempted_task_requeues_and_resumes_to_the_same_results(cluster, data_dir, tmp_path):
    """Two copies of one longer run side by side; one gets SIGTERM on its batch shell."""
    env, _ = cluster
    longer = [f'--config={STUDY_CONFIG}', f'--config.data.data_dir={data_dir}',
              '--config.study.only=R', '--config.study.report=False', '--config.num_epochs=8']
    left_alone, preempted = tmp_path / 'left_alone', tmp_path / 'preempted'
    for workdir in (left_alone, preempted):
        study_slurm(env, f'--workdir={workdir}', *longer)
    task = json.loads((preempted / 'slurm_jobs.json').read_text())['R']
    log = next_log(preempted)
    deadline = time.monotonic() + 120
    while not re.search(r'epoch [2-7]/8', log.read_text() if log.exists() else ''):
        assert time.monotonic() < deadline, 'the task never reached epoch 2'
        time.sleep(0.2)
    subprocess.run(['scancel', '--batch', '--signal=TERM', task], env=env, check=True)
    start_when_requeued(env, task)
    wait_until_idle(env)

    text = log.read_text()
    assert 'requeueing' in text and 'start 2' in text, text[-3000:]
    assert re.search(rf'Resumed {re.escape(str(preempted / "R"))} at step [1-9]', text), text
    assert top1(preempted, 'R') == top1(left_alone, 'R')


def start_when_requeued(env, task, timeout_s=60):
    """SLURM holds a requeued job for a while (BeginTime about 2 minutes on): a cluster
    waits, a test need not."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = subprocess.run(['squeue', '-h', '-j', task, '-o', '%T'], env=env,
                               capture_output=True, text=True).stdout.strip()
        if state == 'PENDING':
            subprocess.run(['scontrol', 'update', f'JobId={task}', 'StartTime=now'], env=env,
                           check=True)
            return
        time.sleep(0.2)
    pytest.fail(f'task {task} was not requeued within {timeout_s} s (state {state!r})')


def next_log(workdir) -> pathlib.Path:
    task = json.loads((workdir / 'slurm_jobs.json').read_text())['R']
    return workdir / 'logs' / f'slurm-{task}.log'
