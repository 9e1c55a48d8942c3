"""The launchers in launch/: --dry_run prints the commands they would run, for every worker.

Where a launcher's real path is cheap to exercise (the TPU VM's deletion after a failed run, the
SLURM tasks' environment, the sweep's failure report), fake gcloud/sbatch/srun/ssh programs on
PATH stand in for the cluster; nothing trains.
"""
import importlib.util
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
SCRIPT = str(ROOT / 'launch' / 'tpu_pod.sh')


def test_tpu_pod_dry_run_prints_the_commands():
    out = subprocess.run(
        ['bash', SCRIPT, '--dry_run', 'my-pod', 'us-central2-b',
         'configs/synth_to_real.py:num_frozen=16', 'gs://bucket/s2r_16', '--config.seed=1'],
        capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 3
    assert out[0].startswith('git -C ') and ' archive ' in out[0]
    assert out[1].startswith('gcloud compute tpus tpu-vm scp --worker=all --zone=us-central2-b')
    ssh = out[2]
    assert ssh.startswith('gcloud compute tpus tpu-vm ssh my-pod --zone=us-central2-b '
                          '--worker=all --command=')
    for part in ('SDTL_EXTRAS=tpu', 'SDTL_MULTIHOST=1', 'sdtl_jax.main',
                 'configs/synth_to_real.py:num_frozen=16', 'gs://bucket/s2r_16',
                 '--config.seed=1'):
        assert part in ssh, part


def test_tpu_pod_refuses_a_local_workdir():
    result = subprocess.run(['bash', SCRIPT, '--dry_run', 'pod', 'zone', 'cfg', '/tmp/run'],
                            capture_output=True, text=True)
    assert result.returncode == 2 and 'gs://' in result.stderr


def _dry_run(script, *args, env=None):
    import os
    result = subprocess.run(['bash', str(ROOT / 'launch' / script), '--dry_run', *args],
                            capture_output=True, text=True, check=True,
                            env={**os.environ, **(env or {})})
    return result.stdout.splitlines()


def test_generate_multi_gpu_dry_run_on_the_second_of_two_hosts():
    out = _dry_run('generate_multi_gpu.sh', '--gpus=2', 'configs/generate/imagenet100_sd14.py',
                   '/data/synth', '--config.batch_size=32',
                   env={'SDTL_NUM_HOSTS': '2', 'SDTL_HOST_INDEX': '1'})
    assert out[0] == 'mkdir -p /data/synth/logs' and out[-1] == 'wait'
    workers = out[1:-1]
    assert len(workers) == 2
    for gpu, line in enumerate(workers):
        index = 2 + gpu       # host 1 of 2, 2 GPUs each: workers 2 and 3 of 4
        assert line.startswith(f'CUDA_VISIBLE_DEVICES={gpu} python -m sdtl_jax.generate '
                               f'--config=configs/generate/imagenet100_sd14.py '
                               f'--outdir=/data/synth --num_workers=4 --worker_index={index} '
                               f'--config.batch_size=32 > /data/synth/logs/worker-00{index}.log')
        assert line.endswith('&')


def test_generate_slurm_dry_run_for_two_hosts():
    out = _dry_run('generate_slurm.sh', '2', '8', 'configs/generate/pets_sdxl.py',
                   '/shared/pets_synth', '--config.seed=1',
                   env={'SBATCH_ARGS': '--partition=gpu'})
    assert out[0] == 'mkdir -p /shared/pets_synth/logs'
    assert out[1] == "sbatch --partition=gpu <<'SCRIPT'" and out[-1] == 'SCRIPT'
    for line in ('#SBATCH --nodes=2', '#SBATCH --ntasks-per-node=8',
                 '#SBATCH --gpus-per-task=1'):
        assert line in out
    srun = [line for line in out if line.startswith('srun ')]
    assert len(srun) == 1 and srun[0].endswith(
        '-m sdtl_jax.generate --config=configs/generate/pets_sdxl.py '
        '--outdir=/shared/pets_synth --config.seed=1')


def test_generate_launchers_print_usage_without_arguments():
    for script in ('generate_multi_gpu.sh', 'generate_slurm.sh'):
        result = subprocess.run(['bash', str(ROOT / 'launch' / script)], capture_output=True,
                                text=True)
        assert result.returncode == 2 and 'CONFIG OUTDIR' in result.stderr


def _fake_bin(tmp_path, **programs):
    """Writes executable shell scripts `name` -> body into tmp_path/bin; returns that folder."""
    folder = tmp_path / 'bin'
    folder.mkdir(exist_ok=True)
    for name, body in programs.items():
        (folder / name).write_text('#!/usr/bin/env bash\n' + body)
        (folder / name).chmod(0o755)
    return folder


# --- launch/tpu_pod.sh: --create / --delete -------------------------------------------------

def test_tpu_pod_creates_the_vm_first_and_deletes_it_last():
    out = _dry_run('tpu_pod.sh', '--create=v4-32', '--spot', '--delete', 'my-pod',
                   'us-central2-b', 'configs/synth_to_real.py', 'gs://bucket/run')
    assert len(out) == 5
    assert out[0].split() == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'my-pod',
                              '--zone=us-central2-b', '--accelerator-type=v4-32',
                              '--version=tpu-ubuntu2204-base', '--spot']
    assert ' archive ' in out[1] and ' tpu-vm scp ' in out[2] and ' tpu-vm ssh my-pod ' in out[3]
    assert out[4].split() == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'my-pod',
                              '--zone=us-central2-b', '--quiet']


def test_tpu_pod_picks_the_runtime_for_the_generation_unless_told():
    def create(*args):
        return _dry_run('tpu_pod.sh', *args, 'pod', 'zone', 'cfg', 'gs://b/r')[0].split()
    assert '--version=v2-alpha-tpuv5-lite' in create('--create=v5litepod-16')
    assert '--version=v2-alpha-tpuv6e' in create('--create=v6e-8')
    assert '--version=my-runtime' in create('--create=v4-8', '--version=my-runtime')
    assert '--spot' not in create('--create=v4-8')
    without = _dry_run('tpu_pod.sh', 'pod', 'zone', 'cfg', 'gs://b/r')
    assert not any(' create ' in line or ' delete ' in line for line in without)


def test_tpu_pod_deletes_the_vm_when_the_run_fails(tmp_path):
    log = tmp_path / 'gcloud.log'
    gcloud = f'echo "$4" >> {log}\n[ "$4" != ssh ]\n'    # every call logs its verb; ssh fails
    env = {'PATH': f'{_fake_bin(tmp_path, gcloud=gcloud)}:{os.environ["PATH"]}',
           'TMPDIR': str(tmp_path)}
    result = subprocess.run(['bash', SCRIPT, '--create=v4-8', '--delete', 'pod', 'zone', 'cfg',
                             'gs://b/r'], capture_output=True, text=True,
                            env={**os.environ, **env})
    assert result.returncode != 0     # the run's failure, not the deletion's success
    assert log.read_text().split() == ['create', 'scp', 'ssh', 'delete']


def test_tpu_pod_keeps_a_vm_it_could_not_create(tmp_path):
    log = tmp_path / 'gcloud.log'
    gcloud = f'echo "$4" >> {log}\n[ "$4" != create ]\n'   # e.g. the name is taken
    env = {'PATH': f'{_fake_bin(tmp_path, gcloud=gcloud)}:{os.environ["PATH"]}'}
    result = subprocess.run(['bash', SCRIPT, '--create=v4-8', '--delete', 'pod', 'zone', 'cfg',
                             'gs://b/r'], capture_output=True, text=True,
                            env={**os.environ, **env})
    assert result.returncode != 0 and log.read_text().split() == ['create']


def test_tpu_pod_rejects_spot_without_create_and_unknown_options():
    for args in (['--spot'], ['--version=x'], ['--zone=z']):
        result = subprocess.run(['bash', SCRIPT, '--dry_run', *args, 'pod', 'z', 'c', 'gs://b/r'],
                                capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr, args


# --- launch/train_multi_gpu.sh --------------------------------------------------------------

def test_train_multi_gpu_runs_main_once_on_the_chosen_gpus():
    python = str(ROOT / '.venv' / 'bin' / 'python')
    out = _dry_run('train_multi_gpu.sh', '--gpus=0,1,2,3', 'configs/study/layers.py:data=pets',
                   '/data/runs/layers', '--config.seed=1')
    assert out == [f'CUDA_VISIBLE_DEVICES=0,1,2,3 {python} -m sdtl_jax.main '
                   '--config=configs/study/layers.py:data=pets --workdir=/data/runs/layers '
                   '--config.seed=1']
    # Without --gpus the process sees every GPU.
    assert _dry_run('train_multi_gpu.sh', 'cfg', 'runs/x') == [
        f'{python} -m sdtl_jax.main --config=cfg --workdir=runs/x']
    bad = subprocess.run(['bash', str(ROOT / 'launch' / 'train_multi_gpu.sh'), '--gpus=two',
                          'cfg', 'runs/x'], capture_output=True, text=True)
    assert bad.returncode == 2 and '--gpus' in bad.stderr


# --- launch/train_slurm.sh ------------------------------------------------------------------

def _tasks(out):
    """{task id: (env assignments, main.py argv)} from a train_slurm.sh dry run."""
    tasks = {}
    for line in out:
        if line.startswith('JAX_COORDINATOR_ADDRESS='):
            words = shlex.split(line)
            env = dict(w.split('=', 1) for w in words[:4])
            tasks[int(env['SDTL_PROCESS_ID'])] = (env, words[4:])
    return tasks


def test_train_slurm_dry_run_for_two_nodes():
    out = _dry_run('train_slurm.sh', '--nodelist=node[01-02]', '2', '8',
                   'configs/study/layers.py', '/shared/layers', '--config.seed=1',
                   env={'SBATCH_ARGS': '--partition=gpu', 'SLURM_JOB_ID': '4097'})
    assert out[0] == 'mkdir -p /shared/layers/logs'
    assert out[1] == "sbatch --partition=gpu <<'SCRIPT'"
    script = out[2:out.index('SCRIPT')]
    for line in ('#SBATCH --nodes=2', '#SBATCH --ntasks-per-node=1', '#SBATCH --gpus-per-node=8',
                 '#SBATCH --output=/shared/layers/logs/slurm-%j.log'):
        assert line in script
    assert any('(scontrol show hostnames "$SLURM_JOB_NODELIST")' in line for line in script)
    tasks = _tasks(out)
    assert sorted(tasks) == [0, 1]
    for env, argv in tasks.values():
        # The first node coordinates, on the port JAX's SLURM detection derives from the job id.
        assert env['JAX_COORDINATOR_ADDRESS'] == 'node01:61441'
        assert env['SDTL_MULTIHOST'] == '1' and env['SDTL_NUM_PROCESSES'] == '2'
        assert argv[1:] == ['-m', 'sdtl_jax.main', '--config=configs/study/layers.py',
                            '--workdir=/shared/layers', '--config.seed=1']
    other = _tasks(_dry_run('train_slurm.sh', '--nodelist=gpu-b,gpu-a', '--port=1234', '2', '4',
                            'cfg', 'gs://b/run'))
    assert {env['JAX_COORDINATOR_ADDRESS'] for env, _ in other.values()} == {'gpu-b:1234'}


def test_train_slurm_refuses_a_node_list_of_the_wrong_size_or_a_local_workdir():
    script = str(ROOT / 'launch' / 'train_slurm.sh')
    for args in (['--dry_run', '--nodelist=a,b,c', '2', '8', 'cfg', '/shared/x'],
                 ['--dry_run', '2', '8', 'cfg', 'runs/x'], ['--dry_run', '0', '8', 'cfg', '/x']):
        result = subprocess.run(['bash', script, *args], capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr, args


def test_train_slurm_job_gives_each_task_its_process_id(tmp_path):
    """The submitted script itself, under fake sbatch/scontrol/srun: what each task receives."""
    bin_dir = _fake_bin(
        tmp_path,
        sbatch='SLURM_JOB_ID=7 SLURM_JOB_NODELIST="n[3-4]" SLURM_NTASKS=2 exec bash -s\n',
        scontrol='printf "n3\\nn4\\n"\n',
        srun='while [[ $1 == --* ]]; do shift; done\n'
             'for id in 0 1; do SLURM_PROCID=$id "$@"; done\n',
        python='echo "$JAX_COORDINATOR_ADDRESS $SDTL_MULTIHOST $SDTL_NUM_PROCESSES '
               '$SDTL_PROCESS_ID $*"\n')
    result = subprocess.run(
        ['bash', str(ROOT / 'launch' / 'train_slurm.sh'), '2', '4', 'cfg', 'gs://b/run'],
        capture_output=True, text=True, check=True,
        env={**os.environ, 'PATH': f'{bin_dir}:{os.environ["PATH"]}',
             'PYTHON': str(bin_dir / 'python')})
    assert result.stdout.splitlines() == [
        f'n3:{61440 + 7} 1 2 {task} -m sdtl_jax.main --config=cfg --workdir=gs://b/run'
        for task in (0, 1)]


def test_train_launchers_print_usage_without_arguments():
    for script in ('train_multi_gpu.sh', 'train_slurm.sh'):
        result = subprocess.run(['bash', str(ROOT / 'launch' / script)], capture_output=True,
                                text=True)
        assert result.returncode == 2 and 'CONFIG WORKDIR' in result.stderr, script


# --- launch/sweep.py ------------------------------------------------------------------------

def _sweep_module():
    spec = importlib.util.spec_from_file_location('sweep', ROOT / 'launch' / 'sweep.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMOKE = f'--config={ROOT / "configs" / "study" / "layers.py"}:smoke'   # absolute: made relative


def _sweep(capsys, *args):
    code = _sweep_module().main(['sweep.py', *args])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def _stages(lines):
    """[[(host, remote argv), ...] per stage] from a sweep dry run over ssh."""
    stages = []
    for line in lines:
        if line.startswith('# stage '):
            stages.append([])
        elif line.endswith(' &'):
            ssh, host, command = shlex.split(line[:-2])
            assert ssh == 'ssh'
            stages[-1].append((host, shlex.split(command)))
    return stages


def _only(argv):
    [value] = [a.split('=', 1)[1] for a in argv if a.startswith('--config.study.only=')]
    return value.split(',')


def test_sweep_dry_run_runs_the_sources_first_then_the_transfers(capsys):
    code, out, _ = _sweep(capsys, SMOKE, '--workdir=gs://bucket/layers', '--hosts=h1,h2',
                          '--dry_run', '--config.seed=3')
    assert code == 0
    assert out[0] == '# stage 1/2: 2 runs on 2 hosts'
    stages = _stages(out)
    assert len(stages) == 2
    first = {host: _only(argv) for host, argv in stages[0]}
    assert first == {'h1': ['S'], 'h2': ['R']}         # the baselines, on different hosts
    second = {host: _only(argv) for host, argv in stages[1]}
    assert sorted(sum(second.values(), [])) == ['RDTL_N16', 'SDTL_N16']
    swept = [name for stage in stages for _, argv in stage for name in _only(argv)]
    assert sorted(swept) == ['R', 'RDTL_N16', 'S', 'SDTL_N16']     # each run exactly once
    for stage in stages:
        for _, argv in stage:
            assert argv[:3] == ['cd', '~/sdtl_jax', '&&']
            assert argv[3:8] == ['.venv/bin/python', '-m', 'sdtl_jax.main',
                                 '--config=configs/study/layers.py:smoke',
                                 '--workdir=gs://bucket/layers']
            assert '--config.study.report=False' in argv and argv[-1] == '--config.seed=3'
    assert out[-1].endswith('-m sdtl_jax.report --workdir=gs://bucket/layers')
    assert not any(line.endswith(' &') for line in out[out.index('wait', len(out) - 3):])


def test_sweep_leaves_idle_hosts_out_and_honours_the_users_only(capsys):
    code, out, _ = _sweep(capsys, SMOKE, '--workdir=/shared/layers', '--hosts=a,b,c',
                          '--dry_run', '--config.study.only=S,SDTL_N16',
                          '--noconfig.study.report', '--config.seed', '5')
    assert code == 0
    stages = _stages(out)
    assert [[(h, _only(argv)) for h, argv in s] for s in stages] == [
        [('a', ['S'])], [('a', ['SDTL_N16'])]]
    assert out[0] == '# stage 1/2: 1 run on 1 host'
    argv = stages[0][0][1]
    # The user's study.only / study.report chose the runs and skipped the report; only the
    # sweep's own values reach the hosts.
    assert [a for a in argv if a.startswith('--config.study.')] == [
        '--config.study.only=S', '--config.study.report=False']
    assert argv[-1] == '--config.seed=5'
    assert not any('sdtl_jax.report' in line for line in out)


def test_sweep_over_tpu_vms_runs_on_every_worker(capsys):
    code, out, _ = _sweep(capsys, SMOKE, '--workdir=gs://b/layers', '--tpu_names=v4-a,v4-b',
                          '--zone=us-central2-b', '--repo=/opt/sdtl jax', '--dry_run')
    assert code == 0
    calls = [shlex.split(line[:-2]) for line in out if line.endswith(' &')]
    assert len(calls) == 4
    for call in calls:
        assert call[:8] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', call[5],
                            '--zone=us-central2-b', '--worker=all']
        command = call[8].removeprefix('--command=')
        assert shlex.split(command)[:4] == ['cd', '/opt/sdtl jax', '&&', 'SDTL_MULTIHOST=1']


def test_sweep_stops_at_a_failed_host_and_names_it(tmp_path, capsys):
    calls = tmp_path / 'calls.log'
    ssh = _fake_bin(tmp_path, ssh=f'echo "$1" >> {calls}\necho "training on $1"\n'
                                  '[ "$1" != bad ]\n') / 'ssh'
    code, out, err = _sweep(capsys, SMOKE, '--workdir=/shared/layers', '--hosts=good,bad',
                            f'--ssh={ssh}')
    assert code == 1
    assert 'failed on bad' in err and 'running R' in err and 'good' not in err
    assert sorted(calls.read_text().split()) == ['bad', 'good']      # stage 2 never started
    assert {'[good] training on good', '[bad] training on bad'} <= set(out)


@pytest.mark.parametrize('args, message', [
    ([SMOKE, '--workdir=/shared/x'], '--hosts'),
    ([SMOKE, '--workdir=/shared/x', '--hosts=a,a'], 'twice'),
    ([SMOKE, '--workdir=/shared/x', '--tpu_names=t'], '--zone'),
    ([SMOKE, '--workdir=runs/x', '--hosts=a'], 'every host sees'),
    ([SMOKE, '--workdir=/shared/x', '--hosts=a', '--config.study.only=Q'], 'unknown runs'),
    ([SMOKE, '--workdir=/shared/x', '--hosts=a', '--config.sed=1'], 'seed'),
    ([f'{SMOKE.removesuffix(":smoke")}:smok', '--workdir=/x', '--hosts=a'], 'smok'),
    ([f'--config={ROOT / "configs" / "baseline.py"}:smoke', '--workdir=/x', '--hosts=a'],
     'not a study config'),
])
def test_sweep_rejects_bad_input(capsys, args, message):
    code, out, err = _sweep(capsys, *args, '--dry_run')
    assert code == 2 and message in err and not out


def test_sweep_script_rejects_an_unknown_config_path():
    result = subprocess.run([sys.executable, str(ROOT / 'launch' / 'sweep.py'),
                             '--config=configs/study/no_such_study.py', '--workdir=/shared/x',
                             '--hosts=a', '--dry_run'], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and not result.stdout
    assert result.stderr.startswith('sweep: --config=configs/study/no_such_study.py: cannot load')
