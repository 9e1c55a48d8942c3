"""launch/study_slurm.py against a real SLURM: a two-node cluster on this machine
(tests/slurm_cluster.sh: munged, MariaDB, slurmdbd, slurmctld, two slurmds of one CPU each).

- The smoke layer study (4 runs) through study_slurm: each run ran once, the transfers started
  after the baselines ended (from sacct), every run's results equal those of a local `study.run`
  of the same study (same programs on the same CPU, one device: bit-identical, so compared
  exactly), and --status reads each task's state from sacct, or from scontrol without it.
- A preemption: a running task gets SIGTERM on its batch shell, as --signal=B:TERM@GRACE sends
  before a time limit; it saves a checkpoint, requeues itself and ends with the results of the
  same run left alone. Re-running the command meanwhile waits for the task instead of
  submitting the run again.
- A two-node task: each node's process gets its process id and the first node as coordinator.

Fails, never skips, when SLURM cannot be installed or started. Without a cluster: the dry run's
scripts and the usage errors.
"""
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import pytest

from sdtl_jax import study

ROOT = pathlib.Path(__file__).parent.parent
CLUSTER = ROOT / 'tests' / 'slurm_cluster.sh'
STUDY_CONFIG = 'configs/study/layers.py:smoke'


@pytest.fixture(scope='module')
def cluster(tmp_path_factory):
    """The environment of a running cluster's clients; its daemons are stopped at the end."""
    directory = tmp_path_factory.mktemp('slurm')
    start = subprocess.run(['bash', str(CLUSTER), 'start', str(directory)], capture_output=True,
                           text=True, timeout=600)
    try:
        if start.returncode:
            pytest.fail(f'could not start a SLURM cluster (tests/slurm_cluster.sh):\n'
                        f'{start.stderr[-3000:]}', pytrace=False)
        yield {**os.environ, 'SLURM_CONF': str(directory / 'slurm.conf')}
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


def first_on_path(folder, env=os.environ) -> dict[str, str]:
    return {**env, 'PATH': f'{folder}:{env["PATH"]}'}


# --- without a cluster: in this process --------------------------------------------------------

def in_process(capsys, *args, returncode=0) -> tuple[str, str]:
    """study_slurm's main in this process (no interpreter to start): (stdout, stderr)."""
    module = sys.modules.get('study_slurm')
    if module is None:      # launch/ is not a package: load the script (dataclasses need it listed)
        spec = importlib.util.spec_from_file_location('study_slurm', ROOT / 'launch/study_slurm.py')
        module = sys.modules['study_slurm'] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    assert module.main(['study_slurm.py', f'--config={STUDY_CONFIG}', *args]) == returncode
    out, err = capsys.readouterr()
    return out, err


def test_dry_run_prints_one_array_per_stage_with_every_option(tmp_path, capsys):
    workdir = tmp_path / 'layers'
    out, _ = in_process(capsys, f'--workdir={workdir}', '--partition=gpu', '--account=lab',
                        '--gpus=8', '--nodes=2', '--time=24:00:00', '--max_parallel=4',
                        '--grace=600', '--sbatch_args=--qos=high --constraint=a100',
                        '--dry_run', '--config.seed=3')
    assert not workdir.exists()                  # nothing written, nothing submitted
    sbatch = 'sbatch --parsable --qos=high --constraint=a100'
    assert f"stage1=$({sbatch} <<'SCRIPT'" in out
    assert f"stage2=$({sbatch} --dependency=afterok:$stage1 <<'SCRIPT'" in out
    assert f"{sbatch} --dependency=afterok:$stage1:$stage2 <<'SCRIPT'" in out   # the report
    stage1 = out[out.index('stage1=$('):out.index('stage2=$(')]
    for header in ('--job-name=sdtl-layers-stage1', '--partition=gpu', '--account=lab',
                   '--array=0-1%4', '--nodes=2', '--ntasks-per-node=1', '--requeue',
                   '--signal=B:TERM@600', '--gpus-per-node=8', '--time=24:00:00',
                   f'--output={workdir}/logs/slurm-%A_%a.log'):
        assert f'#SBATCH {header}\n' in stage1, header
    assert 'runs=(S R)' in stage1 and "runs=(SDTL_N16 RDTL_N16)" in out
    # Two nodes: one process per node through srun, the first node coordinating.
    assert 'export SDTL_MULTIHOST=1 SDTL_NUM_PROCESSES=$SLURM_NTASKS' in stage1
    assert 'export SDTL_PROCESS_ID=$SLURM_PROCID' in stage1 and 'srun ' in stage1
    assert (f'--workdir={workdir} --config.study.only="$run" --config.study.report=False '
            '--config.seed=3') in stage1


def test_a_second_submission_submits_only_what_is_missing_and_waits_for_the_rest(
        tmp_path, fake_programs, monkeypatch, capsys):
    """S finished; R is still running in an earlier array's task: stage 2 and the report wait
    for that task, and nothing of stage 1 is submitted again."""
    workdir = tmp_path / 'layers'
    (workdir / 'S').mkdir(parents=True)
    (workdir / 'S' / 'results.json').write_text('{}')
    (workdir / 'slurm_jobs.json').write_text(json.dumps({'S': '12_0', 'R': '12_1'}))
    monkeypatch.setenv('PATH', first_on_path(fake_programs(
        sacct='case "$*" in *12_1*) echo RUNNING;; *) echo COMPLETED;; esac'))['PATH'])
    out, _ = in_process(capsys, f'--workdir={workdir}', '--dry_run')
    assert '# R: still queued or running in task 12_1' in out
    assert '# stage 1/2: nothing to submit' in out and 'stage1=$(' not in out
    assert "stage2=$(sbatch --parsable --dependency=afterok:12_1 <<'SCRIPT'" in out
    assert "sbatch --parsable --dependency=afterok:12_1:$stage2 <<'SCRIPT'" in out
    status, _ = in_process(capsys, f'--workdir={workdir}', '--status')
    assert re.search(r'S +finished +task 12_0 COMPLETED', status), status
    assert re.search(r'R +not started +task 12_1 RUNNING', status), status
    assert re.search(r'SDTL_N16 +not started +never submitted', status), status


@pytest.mark.parametrize('args, message', [
    (['--workdir=runs/layers'], 'must be storage every host sees'),
    ([], '--workdir is required'),
    (['--workdir=/x', '--nodes=0'], '--nodes must be >= 1'),
    (['--workdir=/x', '--config.study.nmae=x'], 'nmae'),
    (['--workdir=/x', '--bogus'], 'bogus'),
])
def test_usage_errors_name_the_flag(args, message, capsys):
    _, err = in_process(capsys, *args, returncode=2)
    assert err.startswith('study_slurm: ') and message in err, err


def test_without_sbatch_it_says_to_run_on_a_login_node(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('PATH', str(tmp_path))                     # no SLURM commands
    _, err = in_process(capsys, f'--workdir={tmp_path / "w"}', returncode=2)
    assert 'cannot run sbatch' in err and 'login node' in err, err


# --- against the cluster --------------------------------------------------------------------


def wait_until_idle(env, timeout_s=600):
    """Waits until the cluster has no job queued or running."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        queue = subprocess.run(['squeue', '-h', '-o', '%i %T'], env=env, capture_output=True,
                               text=True, check=True).stdout
        if not queue.strip():
            return
        time.sleep(1)
    pytest.fail(f'jobs still queued after {timeout_s} s:\n{queue}')


def sacct(env, *args) -> list[dict[str, str]]:
    """sacct's records of every job (-D: a requeued task's earlier runs too), oldest first."""
    fields = ['JobID', 'JobName', 'State', 'Start', 'End']
    out = subprocess.run(['sacct', '-a', '-n', '-P', '-X', '-S', '2020-01-01', '-o',
                          ','.join(fields), *args], env=env, capture_output=True, text=True,
                         check=True).stdout
    return [dict(zip(fields, line.split('|'))) for line in out.splitlines()]


def top1(workdir, run) -> dict[str, float]:
    results = json.loads((workdir / run / 'results.json').read_text())
    return {k: v for k, v in results.items() if k.startswith(('top1', 'top5', 'train_loss'))}


def test_smoke_study_runs_in_stage_order_with_the_results_of_a_local_run(
        cluster, data_dir, tmp_path, fake_programs):
    env = cluster
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
    jobs = [j for j in sacct(env) if j['JobName'].startswith('sdtl-slurm-')]   # the workdir's name
    assert all(j['State'] == 'COMPLETED' for j in jobs), jobs
    by_stage = {name: [j for j in jobs if j['JobName'] == f'sdtl-slurm-{name}']
                for name in ('stage1', 'stage2', 'report')}
    assert [len(v) for v in by_stage.values()] == [2, 2, 1]
    # ISO times compare as strings; one-second resolution, so equal counts as in order.
    assert max(j['End'] for j in by_stage['stage1']) <= min(
        j['Start'] for j in by_stage['stage2'])
    assert max(j['End'] for j in by_stage['stage2']) <= by_stage['report'][0]['Start']

    # The same command again submits no run: only the report.
    again = study_slurm(env, *args).stdout
    assert 'job array' not in again and 'report: job' in again
    wait_until_idle(env)
    status = study_slurm(env, *args, '--status').stdout
    assert len(re.findall(r'finished +task \d+_\d COMPLETED', status)) == 4, status
    # A cluster without accounting: sacct fails, scontrol still knows the recent tasks.
    no_sacct = fake_programs(sacct='echo "Slurm accounting storage is disabled" >&2; exit 1')
    status = study_slurm(first_on_path(no_sacct, env), *args, '--status').stdout
    assert len(re.findall(r'finished +task \d+_\d COMPLETED', status)) == 4, status


def test_a_preempted_task_requeues_and_resumes_to_the_same_results(cluster, data_dir, tmp_path):
    """Two copies of one longer run side by side; one gets SIGTERM on its batch shell."""
    env = cluster
    longer = [f'--config={STUDY_CONFIG}', f'--config.data.data_dir={data_dir}',
              '--config.study.only=R', '--config.study.report=False', '--config.num_epochs=8']
    left_alone, preempted = tmp_path / 'left_alone', tmp_path / 'preempted'
    for workdir in (left_alone, preempted):
        study_slurm(env, f'--workdir={workdir}', *longer)
    # While a run's task is queued or running, the same command waits for it, submits nothing.
    again = study_slurm(env, f'--workdir={left_alone}', *longer).stdout
    assert 'R: still queued or running in task' in again and 'job array' not in again, again
    task = json.loads((preempted / 'slurm_jobs.json').read_text())['R']
    log = next_log(preempted)
    deadline = time.monotonic() + 120
    while not re.search(r'epoch [2-7]/8', log.read_text() if log.exists() else ''):
        assert time.monotonic() < deadline, 'the task never reached epoch 2'
        time.sleep(0.2)
    subprocess.run(['scancel', '--batch', '--signal=TERM', task], env=env, check=True)
    wait_until_idle(env)      # the requeued task waits the cluster's cred_expire (10 s), then runs

    text = log.read_text()
    assert 'requeueing' in text and 'start 2' in text, text[-3000:]
    assert re.search(rf'Resumed {re.escape(str(preempted / "R"))} at step [1-9]', text), text
    assert top1(preempted, 'R') == top1(left_alone, 'R')
    assert [j['State'] for j in sacct(env, '-D', '-j', task)] == ['REQUEUED', 'COMPLETED']


def test_a_two_node_task_runs_one_process_per_node_joined_through_the_first(
        cluster, tmp_path, fake_programs):
    """The launcher's side of a multi-node run, on the real nodes; the program is a stand-in
    that prints what it got (tests/test_multihost.py trains with two processes)."""
    python = fake_programs(python='echo "process $SDTL_PROCESS_ID of $SDTL_NUM_PROCESSES on '
                           '$SLURMD_NODENAME: multihost=$SDTL_MULTIHOST $JAX_COORDINATOR_ADDRESS '
                           '$*"') / 'python'
    workdir = tmp_path / 'two_nodes'
    study_slurm({**cluster, 'PYTHON': str(python)}, f'--config={STUDY_CONFIG}',
                f'--workdir={workdir}', '--nodes=2', '--config.study.only=R',
                '--config.study.report=False')
    wait_until_idle(cluster)
    log = next_log(workdir).read_text()
    job_id = int(re.search(r'\(job (\d+)\)', log)[1])
    lines = sorted(re.findall(r'process .*', log))
    main = (f'-m sdtl_jax.main --config={STUDY_CONFIG} --workdir={workdir} '
            '--config.study.only=R --config.study.report=False')
    assert lines == [f'process {i} of 2 on n{i + 1}: multihost=1 n1:{61440 + job_id % 4096} '
                     f'{main}' for i in (0, 1)]


def next_log(workdir) -> pathlib.Path:
    task = json.loads((workdir / 'slurm_jobs.json').read_text())['R']
    return workdir / 'logs' / f'slurm-{task}.log'
