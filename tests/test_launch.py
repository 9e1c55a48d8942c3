"""The launchers in launch/: --dry_run prints the commands they would run, for every worker.

Where a launcher's real path is cheap to exercise (the TPU VM's deletion after a failed run, the
SLURM tasks' environment, the sweep's failure report), fake gcloud/sbatch/srun/ssh programs on
PATH stand in for the cluster; nothing trains.
"""
import importlib.util
import os
import pathlib
import re
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
    assert len(out) == 5
    assert out[0].startswith('git -C ') and ' archive ' in out[0]
    assert out[1].startswith('gcloud compute tpus tpu-vm scp --worker=all --zone=us-central2-b')
    prepare, start, follow = (shlex.split(line) for line in out[2:])
    ssh = ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'my-pod', '--zone=us-central2-b']
    # Every worker takes the worker script out of the shipped checkout and sets up its .venv...
    assert prepare[:8] == ssh + ['--worker=all'] and len(prepare) == 9
    assert shlex.split(prepare[8].removeprefix('--command=')) == [
        'tar', '-xzOf', '~/sdtl_jax.tar.gz', 'launch/tpu_worker.sh', '>', '~/sdtl_worker.sh',
        '&&', 'bash', '~/sdtl_worker.sh', 'prepare', '~/sdtl_jax.tar.gz']
    # ... then starts the run detached, with the user's arguments intact ...
    assert start[:8] == ssh + ['--worker=all'] and len(start) == 9
    assert shlex.split(start[8].removeprefix('--command=')) == [
        'bash', '~/sdtl_worker.sh', 'start', 'configs/synth_to_real.py:num_frozen=16',
        'gs://bucket/s2r_16', '--config.seed=1']
    # ... and the launcher follows worker 0's log into a local file.
    assert follow == ssh + ['--worker=0', '--command=bash ~/sdtl_worker.sh follow', '|', 'tee',
                            str(ROOT / 'runs' / 'tpu_logs' / 'my-pod.log')]


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


# The launchers' Python: the repository's .venv (scripts/setup.sh), else python3 from PATH.
VENV_PYTHON = (str(ROOT / '.venv' / 'bin' / 'python')
               if os.access(ROOT / '.venv' / 'bin' / 'python', os.X_OK) else 'python3')


def _gpu_dry_run(script, *args, visible=None, env=None):
    """A dry run with CUDA_VISIBLE_DEVICES=`visible`, or unset (whatever this machine's is)."""
    base = {k: v for k, v in os.environ.items() if k != 'CUDA_VISIBLE_DEVICES'}
    if visible is not None:
        base['CUDA_VISIBLE_DEVICES'] = visible
    result = subprocess.run(['bash', str(ROOT / 'launch' / script), '--dry_run', *args],
                            capture_output=True, text=True, env={**base, **(env or {})})
    return result.returncode, result.stdout.splitlines(), result.stderr


def test_generate_multi_gpu_dry_run_on_the_second_of_two_hosts():
    code, out, err = _gpu_dry_run(
        'generate_multi_gpu.sh', '--gpus=2', 'configs/generate/imagenet100_sd14.py',
        '/data/synth', '--config.batch_size=32', env={'SDTL_NUM_HOSTS': '2',
                                                      'SDTL_HOST_INDEX': '1'})
    assert code == 0, err
    assert out[0] == 'mkdir -p /data/synth/logs' and out[-1] == 'wait'
    workers = out[1:-1]
    assert len(workers) == 2
    for gpu, line in enumerate(workers):
        index = 2 + gpu       # host 1 of 2, 2 GPUs each: workers 2 and 3 of 4
        assert line.startswith(f'CUDA_VISIBLE_DEVICES={gpu} {VENV_PYTHON} -m '
                               f'sdtl_jax.datasets.generate '
                               f'--config=configs/generate/imagenet100_sd14.py '
                               f'--outdir=/data/synth --num_workers=4 --worker_index={index} '
                               f'--config.batch_size=32 > /data/synth/logs/worker-00{index}.log')
        assert line.endswith('&')


def test_generate_multi_gpu_takes_its_gpus_from_cuda_visible_devices():
    # --gpus=N: the first N of CUDA_VISIBLE_DEVICES; without --gpus, all of them.
    for args, gpus in ((['--gpus=2'], ['5', '7']), ([], ['5', '7', '9'])):
        code, out, err = _gpu_dry_run('generate_multi_gpu.sh', *args, 'cfg', '/o',
                                      visible='5,7,9')
        assert code == 0, err
        assert [line.split()[0] for line in out[1:-1]] == [f'CUDA_VISIBLE_DEVICES={g}'
                                                           for g in gpus]
        assert all(f'--num_workers={len(gpus)} ' in line for line in out[1:-1])
    code, out, err = _gpu_dry_run('generate_multi_gpu.sh', '--gpus=4', 'cfg', '/o',
                                  visible='5,7,9')
    assert code == 2 and 'offers 3 GPU' in err and not out


def test_multi_gpu_launchers_count_the_gpus_nvidia_smi_lists(tmp_path, fake_programs):
    smi = 'printf "GPU 0: H100 (UUID: GPU-a)\\nGPU 1: H100 (UUID: GPU-b)\\n"\n'
    path = {'PATH': f'{fake_programs(**{"nvidia-smi": smi})}:{os.environ["PATH"]}'}
    code, out, err = _gpu_dry_run('generate_multi_gpu.sh', 'cfg', '/o', env=path)
    assert code == 0, err
    assert [line.split()[0] for line in out[1:-1]] == ['CUDA_VISIBLE_DEVICES=0',
                                                       'CUDA_VISIBLE_DEVICES=1']
    code, out, err = _gpu_dry_run('train_multi_gpu.sh', '--gpus=3', 'cfg', 'runs/x', env=path)
    assert code == 2 and 'offers 2 GPU' in err and not out


def test_generate_slurm_dry_run_for_two_hosts():
    out = _dry_run('generate_slurm.sh', '--nodes=2', '--gpus=8', 'configs/generate/pets_sdxl.py',
                   '/shared/pets_synth', '--config.seed=1',
                   env={'SBATCH_ARGS': '--partition=gpu'})
    assert out[0] == 'mkdir -p /shared/pets_synth/logs'
    assert out[1] == "sbatch --partition=gpu <<'SCRIPT'" and out[-1] == 'SCRIPT'
    for line in ('#SBATCH --nodes=2', '#SBATCH --ntasks-per-node=8',
                 '#SBATCH --gpus-per-task=1'):
        assert line in out
    srun = [line for line in out if line.startswith('srun ')]
    assert len(srun) == 1 and srun[0].endswith(
        f'{VENV_PYTHON} -m sdtl_jax.datasets.generate --config=configs/generate/pets_sdxl.py '
        '--outdir=/shared/pets_synth --config.seed=1')


def test_generate_launchers_print_usage_without_arguments():
    for script in ('generate_multi_gpu.sh', 'generate_slurm.sh'):
        result = subprocess.run(['bash', str(ROOT / 'launch' / script)], capture_output=True,
                                text=True)
        assert result.returncode == 2 and 'CONFIG OUTDIR' in result.stderr


# --- launch/tpu_pod.sh: --create / --delete -------------------------------------------------

def test_tpu_pod_creates_the_vm_first_and_deletes_it_last():
    out = _dry_run('tpu_pod.sh', '--create=v4-32', '--spot', '--delete', 'my-pod',
                   'us-central2-b', 'configs/synth_to_real.py', 'gs://bucket/run')
    assert len(out) == 7
    assert out[0].split() == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'my-pod',
                              '--zone=us-central2-b', '--accelerator-type=v4-32',
                              '--version=tpu-ubuntu2204-base', '--spot']
    assert ' archive ' in out[1] and ' tpu-vm scp ' in out[2]
    assert all(' tpu-vm ssh my-pod ' in line for line in out[3:6])
    assert 'sdtl_worker.sh follow' in out[5]        # deleted only after following the run
    assert out[6].split() == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', 'my-pod',
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


def test_tpu_pod_deletes_the_vm_when_the_run_fails(tmp_path, fake_programs):
    log = tmp_path / 'gcloud.log'
    gcloud = f'echo "$4" >> {log}\n[ "$4" != ssh ]\n'    # every call logs its verb; ssh fails
    env = {'PATH': f'{fake_programs(gcloud=gcloud)}:{os.environ["PATH"]}',
           'TMPDIR': str(tmp_path)}
    result = subprocess.run(['bash', SCRIPT, '--create=v4-8', '--delete', 'pod', 'zone', 'cfg',
                             'gs://b/r'], capture_output=True, text=True,
                            env={**os.environ, **env})
    assert result.returncode != 0     # the run's failure, not the deletion's success
    assert log.read_text().split() == ['create', 'scp', 'ssh', 'delete']


def test_tpu_pod_keeps_a_vm_it_could_not_create(tmp_path, fake_programs):
    log = tmp_path / 'gcloud.log'
    gcloud = f'echo "$4" >> {log}\n[ "$4" != create ]\n'   # e.g. the name is taken
    env = {'PATH': f'{fake_programs(gcloud=gcloud)}:{os.environ["PATH"]}'}
    result = subprocess.run(['bash', SCRIPT, '--create=v4-8', '--delete', 'pod', 'zone', 'cfg',
                             'gs://b/r'], capture_output=True, text=True,
                            env={**os.environ, **env})
    assert result.returncode != 0 and log.read_text().split() == ['create']


def test_tpu_pod_rejects_spot_without_create_and_unknown_options():
    for args in (['--spot'], ['--version=x'], ['--zone=z'], ['--queued'], ['--poll=soon'],
                 ['--detach', '--delete'], ['--project=']):
        result = subprocess.run(['bash', SCRIPT, '--dry_run', *args, 'pod', 'z', 'c', 'gs://b/r'],
                                capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr and not result.stdout, args
    for args in (['--logs', '--create=v4-8', 'pod', 'z'], ['--logs', 'pod'],
                 ['--logs', 'pod', 'z', 'cfg']):
        result = subprocess.run(['bash', SCRIPT, '--dry_run', *args], capture_output=True,
                                text=True)
        assert result.returncode == 2 and result.stderr and not result.stdout, args


def test_tpu_pod_help_prints_the_usage():
    for flag in ('--help', '-h'):
        result = subprocess.run(['bash', SCRIPT, flag], capture_output=True, text=True)
        assert result.returncode == 0 and not result.stderr
        assert result.stdout.startswith('Runs one sdtl_jax experiment')
        for option in ('--project=ID', '--queued', '--spot', '--delete', '--detach', '--logs',
                       '--log_file=PATH', '--dry_run'):
            assert f'\n  {option}' in result.stdout, option


def test_tpu_pod_queued_spot_with_a_project_dry_run():
    out = _dry_run('tpu_pod.sh', '--project=my-proj', '--queued', '--spot', '--create=v6e-8',
                   '--delete', 'pod', 'us-east5-b', 'configs/synth_to_real.py', 'gs://b/run')
    calls = [shlex.split(line) for line in out if not line.startswith('#')]
    assert calls[0] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'pod',
                        '--node-id=pod', '--zone=us-east5-b', '--accelerator-type=v6e-8',
                        '--runtime-version=v2-alpha-tpuv6e', '--spot', '--project=my-proj']
    assert calls[1] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', 'pod',
                        '--zone=us-east5-b', '--format=value(state.state)',
                        '--project=my-proj']
    assert [call[4] for call in calls[3:]] == ['scp', 'ssh', 'ssh', 'ssh', 'delete']
    assert calls[-1] == ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'pod',
                         '--zone=us-east5-b', '--force', '--quiet', '--project=my-proj']
    gcloud = [call for call in calls if call[0] == 'gcloud']
    assert len(gcloud) == 7 and all('--project=my-proj' in call for call in gcloud)
    # --detach starts the run and stops there; --logs only follows (and deletes when asked).
    detached = _dry_run('tpu_pod.sh', '--detach', 'pod', 'z', 'cfg', 'gs://b/r')
    assert 'sdtl_worker.sh start' in detached[-1]
    logs = [shlex.split(line) for line in _dry_run(
        'tpu_pod.sh', '--project=p', '--queued', '--delete', '--log_file=/tmp/x.log', '--logs',
        'pod', 'z')]
    assert logs == [
        ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod', '--zone=z', '--worker=0',
         '--command=bash ~/sdtl_worker.sh follow', '--project=p', '|', 'tee', '/tmp/x.log'],
        ['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', 'pod', '--zone=z',
         '--force', '--quiet', '--project=p']]


# A fake gcloud: logs each call's arguments (one line each) to calls.log. `queued-resources
# describe` answers the next line of states.txt (the last one again once one is left);
# `tpu-vm describe` answers vm_state.txt; `ssh ... follow` runs follow-<n>.sh for its n-th call
# (what worker 0 would print), and other ssh calls succeed.
FAKE_GCLOUD = r'''
here=$(dirname "$0")/..
echo "$*" >> "$here/calls.log"
case "$3 $4" in
  "queued-resources describe")
    head -n 1 "$here/states.txt"
    [ "$(wc -l < "$here/states.txt")" -gt 1 ] && sed -i 1d "$here/states.txt"
    exit 0 ;;
  "tpu-vm describe") cat "$here/vm_state.txt"; exit 0 ;;
  "tpu-vm ssh")
    case "$*" in
      *sdtl_worker.sh\ follow*)
        n=$(($(grep -c 'sdtl_worker.sh follow' "$here/calls.log")))
        exec bash "$here/follow-$n.sh" ;;
    esac ;;
esac
exit 0
'''


def _tpu_pod(tmp_path, fake_programs, *args, states=(), vm_state='READY', follow=()):
    """Runs tpu_pod.sh against FAKE_GCLOUD; returns (result, [call argv, ...])."""
    (tmp_path / 'states.txt').write_text(''.join(f'{s}\n' for s in states))
    (tmp_path / 'vm_state.txt').write_text(vm_state + '\n')
    for n, script in enumerate(follow, 1):
        (tmp_path / f'follow-{n}.sh').write_text(script)
    env = {**os.environ, 'PATH': f'{fake_programs(gcloud=FAKE_GCLOUD)}:{os.environ["PATH"]}',
           'TMPDIR': str(tmp_path)}
    result = subprocess.run(['bash', SCRIPT, '--poll=0', f'--log_file={tmp_path / "w0.log"}',
                             *args], capture_output=True, text=True, env=env, timeout=60)
    calls = (tmp_path / 'calls.log').read_text().splitlines()
    return result, [call.split() for call in calls]


def _verbs(calls):
    return [' '.join(call[2:4]) for call in calls]


ENDED_OK = 'echo "epoch 1"; echo "sdtl_worker: run ended, exit status 0"\n'


def test_tpu_pod_queued_waits_until_active_then_runs(tmp_path, fake_programs):
    result, calls = _tpu_pod(
        tmp_path, fake_programs, '--project=p', '--queued', '--spot', '--create=v5litepod-16',
        '--delete', 'pod', 'z', 'cfg', 'gs://b/r',
        states=['PROVISIONING', 'PROVISIONING', 'ACTIVE'], follow=[ENDED_OK])
    assert result.returncode == 0, result.stderr
    assert _verbs(calls) == ['queued-resources create'] + ['queued-resources describe'] * 3 + [
        'tpu-vm scp', 'tpu-vm ssh', 'tpu-vm ssh', 'tpu-vm ssh', 'queued-resources delete']
    assert all(call[-1] == '--project=p' for call in calls)
    assert '--spot' in calls[0] and '--force' in calls[-1]
    # Without a terminal, one line per poll.
    waits = [line for line in result.stderr.splitlines() if line.startswith('queued resource')]
    assert [line.split(',')[0] for line in waits] == [
        'queued resource pod: PROVISIONING', 'queued resource pod: PROVISIONING',
        'queued resource pod: ACTIVE']
    assert all(', waited 0m0' in line for line in waits)
    assert (tmp_path / 'w0.log').read_text() == (
        'epoch 1\nsdtl_worker: run ended, exit status 0\n')


@pytest.mark.parametrize('end', ['FAILED', 'SUSPENDED'])
def test_tpu_pod_queued_stops_at_a_failed_request(tmp_path, end, fake_programs):
    result, calls = _tpu_pod(tmp_path, fake_programs, '--queued', '--create=v4-8', '--delete',
                             'pod', 'z', 'cfg', 'gs://b/r', states=['WAITING_FOR_RESOURCES', end])
    assert result.returncode == 1
    assert _verbs(calls) == ['queued-resources create', 'queued-resources describe',
                             'queued-resources describe', 'queued-resources delete']
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f'queued resource pod: {end}, waited ')
    assert last.endswith('see why: gcloud compute tpus queued-resources describe pod --zone=z')


def test_tpu_pod_logs_follows_the_run_to_its_end_then_deletes(tmp_path, fake_programs):
    failed = 'echo "step 7: loss nan"; echo "sdtl_worker: run ended, exit status 3"\n'
    result, calls = _tpu_pod(tmp_path, fake_programs, '--queued', '--delete', '--logs', 'pod', 'z',
                             follow=[failed])
    assert result.returncode == 3                     # the run's exit status
    assert _verbs(calls) == ['tpu-vm ssh', 'queued-resources delete']
    assert calls[0][6:] == ['--worker=0', '--command=bash', '~/sdtl_worker.sh', 'follow', '1']
    assert 'step 7: loss nan' in result.stdout and 'exit status 3' in result.stderr
    assert (tmp_path / 'w0.log').read_text().startswith('step 7: loss nan\n')


def test_tpu_pod_reconnects_after_a_dropped_connection(tmp_path, fake_programs):
    dropped = 'echo "epoch 1"; echo "epoch 2"; exit 255\n'
    result, calls = _tpu_pod(tmp_path, fake_programs, '--delete', 'pod', 'z', 'cfg', 'gs://b/r',
                             follow=[dropped, ENDED_OK])
    assert result.returncode == 0, result.stderr
    assert _verbs(calls) == ['tpu-vm scp', 'tpu-vm ssh', 'tpu-vm ssh', 'tpu-vm ssh',
                             'tpu-vm describe', 'tpu-vm ssh', 'tpu-vm delete']
    assert calls[5][-1] == '3'                          # the log from its third line on
    assert (tmp_path / 'w0.log').read_text().splitlines() == [
        'epoch 1', 'epoch 2', 'epoch 1', 'sdtl_worker: run ended, exit status 0']


def test_tpu_pod_never_deletes_a_vm_whose_run_may_be_going(tmp_path, fake_programs):
    dropped = 'echo "epoch 1"; exit 255\n'
    result, calls = _tpu_pod(tmp_path, fake_programs, '--delete', 'pod', 'z', 'cfg', 'gs://b/r',
                             follow=[dropped] * 6)
    assert result.returncode == 1
    assert _verbs(calls).count('tpu-vm ssh') == 2 + 6 and 'tpu-vm delete' not in _verbs(calls)
    assert f'follow it: {SCRIPT} --delete --logs pod z' in result.stderr
    # A preempted VM runs nothing any more: deleted, and the same command later resumes.
    result, calls = _tpu_pod(tmp_path, fake_programs, '--delete', 'pod', 'z', 'cfg', 'gs://b/r',
                             vm_state='PREEMPTED', follow=[dropped] * 6)
    assert result.returncode == 1 and 'PREEMPTED' in result.stderr
    assert _verbs(calls)[-2:] == ['tpu-vm describe', 'tpu-vm delete']


def test_tpu_pod_keeps_a_vm_where_another_run_is_going(tmp_path, fake_programs):
    busy = fake_programs(gcloud=f'echo "$4" >> {tmp_path}/calls.log\n'
                                      'if [[ "$*" == *prepare* ]]; then\n'
                                      '  echo "sdtl_worker: a run is already going on w0" >&2\n'
                                      '  exit 3\nfi\n')
    result = subprocess.run(['bash', SCRIPT, '--delete', 'pod', 'z', 'cfg', 'gs://b/r'],
                            capture_output=True, text=True, env={
                                **os.environ, 'PATH': f'{busy}:{os.environ["PATH"]}',
                                'TMPDIR': str(tmp_path)})
    assert result.returncode == 1 and 'not deleting TPU VM pod' in result.stderr
    assert (tmp_path / 'calls.log').read_text().split() == ['scp', 'ssh']


# --- launch/train_multi_gpu.sh --------------------------------------------------------------

def test_train_multi_gpu_runs_main_once_on_the_chosen_gpus():
    python = VENV_PYTHON
    code, out, err = _gpu_dry_run('train_multi_gpu.sh', '--gpus=4',
                                  'configs/study/layers.py:data=pets', '/data/runs/layers',
                                  '--config.seed=1')
    assert code == 0, err
    assert out == [f'CUDA_VISIBLE_DEVICES=0,1,2,3 {python} -m sdtl_jax.main '
                   '--config=configs/study/layers.py:data=pets --workdir=/data/runs/layers '
                   '--config.seed=1']
    # Without --gpus the process sees every GPU; CUDA_VISIBLE_DEVICES picks which ones.
    assert _gpu_dry_run('train_multi_gpu.sh', 'cfg', 'runs/x')[1] == [
        f'{python} -m sdtl_jax.main --config=cfg --workdir=runs/x']
    assert _gpu_dry_run('train_multi_gpu.sh', '--gpus=2', 'cfg', 'runs/x',
                        visible='4,5,6')[1] == [
        f'CUDA_VISIBLE_DEVICES=4,5 {python} -m sdtl_jax.main --config=cfg --workdir=runs/x']
    # --gpus is a count in every launcher: indices, a word or too many GPUs are refused.
    for gpus, message in (('0,1', 'CUDA_VISIBLE_DEVICES=0,1'), ('two', '--gpus=two'),
                          ('4', 'offers 3 GPU')):
        code, out, err = _gpu_dry_run('train_multi_gpu.sh', f'--gpus={gpus}', 'cfg', 'runs/x',
                                      visible='4,5,6')
        assert code == 2 and message in err and not out, gpus


def test_launchers_fall_back_to_python3_without_a_venv(tmp_path):
    (tmp_path / 'launch').mkdir()
    for name in ('train_multi_gpu.sh', 'common.bash'):
        (tmp_path / 'launch' / name).write_text((ROOT / 'launch' / name).read_text())
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHON', 'CUDA_VISIBLE_DEVICES')}
    result = subprocess.run(['bash', str(tmp_path / 'launch' / 'train_multi_gpu.sh'),
                             '--dry_run', 'cfg', 'runs/x'], capture_output=True, text=True,
                            env=env, check=True)
    assert result.stdout == 'python3 -m sdtl_jax.main --config=cfg --workdir=runs/x\n'
    assert 'no ' + str(tmp_path / '.venv') in result.stderr and 'setup.sh' in result.stderr


# --- docs/launch.md: the paper's study on Cloud TPU, one queued VM per run ------------------

def test_docs_tpu_study_script_runs_the_baselines_then_the_transfers_then_the_report(
        tmp_path, fake_programs):
    """The script as docs/launch.md prints it, against a stand-in tpu_pod.sh (a run finishes
    unless its name is in fail.txt) and gcloud (`storage ls` finds the finished runs)."""
    script = re.search(r'```bash\n(study=gs://.*?)```', (ROOT / 'docs/launch.md').read_text(),
                       re.S)[1]
    (tmp_path / 'launch').mkdir()
    (tmp_path / '.venv/bin').mkdir(parents=True)
    (tmp_path / 'fail.txt').touch()
    for path, body in (
            ('launch/tpu_pod.sh', 'run=${@: -2:1}; run=${run#--config.study.only=}\n'
                                  'echo "launch $run" >> calls.txt\n'
                                  'workdir=${@: -4:1}\n'
                                  'grep -qx "$run" fail.txt || echo "$workdir/$run/results.json" '
                                  '>> finished.txt\n'),
            ('.venv/bin/python', 'echo "report $*" >> calls.txt\n')):
        (tmp_path / path).write_text('#!/usr/bin/env bash\n' + body)
        (tmp_path / path).chmod(0o755)
    gcloud = fake_programs(gcloud='[ "$1 $2" = "storage ls" ] && grep -qx "$3" finished.txt\n')
    env = {**os.environ, 'BUCKET': 'b', 'PATH': f'{gcloud}:{os.environ["PATH"]}'}

    def run_script():
        (tmp_path / 'calls.txt').write_text('')
        done = subprocess.run(['bash', '-c', script], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=60)
        return done, (tmp_path / 'calls.txt').read_text().splitlines()

    (tmp_path / 'fail.txt').write_text('R\n')              # a baseline fails: no transfer starts
    done, calls = run_script()
    assert done.returncode == 1 and 'run this again' in done.stdout
    assert sorted(calls) == ['launch R', 'launch S']
    (tmp_path / 'fail.txt').write_text('')                 # again: only R, then the 34 transfers
    done, calls = run_script()
    assert done.returncode == 0, done.stderr
    transfers = [f'launch {d}_N{n:02d}' for n in range(1, 18) for d in ('SDTL', 'RDTL')]
    assert calls[0] == 'launch R' and sorted(calls[1:-1]) == sorted(transfers)
    assert calls[-1] == 'report -m sdtl_jax.report --workdir=gs://b/sdtl/layers'
    assert run_script()[1] == ['report -m sdtl_jax.report --workdir=gs://b/sdtl/layers']


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
    out = _dry_run('train_slurm.sh', '--nodelist=node[01-02]', '--nodes=2', '--gpus=8',
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
        assert argv == [VENV_PYTHON, '-m', 'sdtl_jax.main', '--config=configs/study/layers.py',
                        '--workdir=/shared/layers', '--config.seed=1']
    other = _tasks(_dry_run('train_slurm.sh', '--nodelist=gpu-b,gpu-a', '--port=1234',
                            '--nodes=2', '--gpus=4', 'cfg', 'gs://b/run'))
    assert {env['JAX_COORDINATOR_ADDRESS'] for env, _ in other.values()} == {'gpu-b:1234'}


def test_train_slurm_refuses_a_node_list_of_the_wrong_size_or_a_local_workdir():
    script = str(ROOT / 'launch' / 'train_slurm.sh')
    for args in (['--dry_run', '--nodelist=a,b,c', '--nodes=2', '--gpus=8', 'cfg', '/shared/x'],
                 ['--dry_run', '--nodes=2', '--gpus=8', 'cfg', 'runs/x'],
                 ['--dry_run', '--nodes=0', '--gpus=8', 'cfg', '/x'],
                 ['--dry_run', '--nodes=2', 'cfg', '/x'],                # --gpus is required
                 ['--dry_run', '--gpus=0,1', 'cfg', '/x']):              # a count, not indices
        result = subprocess.run(['bash', script, *args], capture_output=True, text=True)
        assert result.returncode == 2 and result.stderr, args


def test_train_slurm_job_gives_each_task_its_process_id(tmp_path, fake_programs):
    """The submitted script itself, under fake sbatch/scontrol/srun: what each task receives."""
    bin_dir = fake_programs(
        sbatch='SLURM_JOB_ID=7 SLURM_JOB_NODELIST="n[3-4]" SLURM_NTASKS=2 exec bash -s\n',
        scontrol='printf "n3\\nn4\\n"\n',
        srun='while [[ $1 == --* ]]; do shift; done\n'
             'for id in 0 1; do SLURM_PROCID=$id "$@"; done\n',
        python='echo "$JAX_COORDINATOR_ADDRESS $SDTL_MULTIHOST $SDTL_NUM_PROCESSES '
               '$SDTL_PROCESS_ID $*"\n')
    result = subprocess.run(
        ['bash', str(ROOT / 'launch' / 'train_slurm.sh'), '--nodes=2', '--gpus=4', 'cfg',
         'gs://b/run'],
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


def test_sweep_stops_at_a_failed_host_and_names_it(tmp_path, capsys, fake_programs):
    calls = tmp_path / 'calls.log'
    ssh = fake_programs(ssh=f'echo "$1" >> {calls}\necho "training on $1"\n'
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


# --- launch/tpu_worker.sh: what tpu_pod.sh runs on each worker --------------------------------

WORKER = str(ROOT / 'launch' / 'tpu_worker.sh')


def test_tpu_worker_runs_detached_and_keeps_the_exit_status(tmp_path, fake_programs):
    """start, follow and prepare for real on this machine, with a fake main.py and gcloud."""
    venv = tmp_path / 'repo' / '.venv' / 'bin'
    venv.mkdir(parents=True)
    (venv / 'python').write_text(
        '#!/usr/bin/env bash\necho "main.py $* MULTIHOST=$SDTL_MULTIHOST"\n'
        'for i in $(seq 200); do [ -f "$HOME/go" ] && break; sleep 0.05; done\n'
        'echo "done"; exit 3\n')
    (venv / 'python').chmod(0o755)
    bin_dir = fake_programs(gcloud=f'echo "$*" >> {tmp_path}/gcloud.log\n')
    env = {**os.environ, 'HOME': str(tmp_path), 'SDTL_CHECKOUT': str(tmp_path / 'repo'),
           'SDTL_WORKER_ID': '2', 'SDTL_LOG_SYNC_S': '3600',
           'PATH': f'{bin_dir}:{os.environ["PATH"]}'}

    def worker(*args):
        return subprocess.run(['bash', WORKER, *args], capture_output=True, text=True, env=env,
                              timeout=30)

    started = worker('start', 'cfg', 'gs://b/r', '--config.seed=1')
    assert started.returncode == 0 and 'started' in started.stdout
    pid = int((tmp_path / 'sdtl_run' / 'pid').read_text())
    assert os.getsid(pid) == pid != os.getsid(0)       # a session of its own: outlives SSH
    # A second launch on the same worker is refused while the run goes on.
    refused = worker('prepare')
    assert refused.returncode == 3 and 'a run is already going' in refused.stderr
    (tmp_path / 'go').touch()
    followed = worker('follow')
    assert followed.returncode == 3
    lines = followed.stdout.splitlines()
    assert 'main.py -m sdtl_jax.main --config=cfg --workdir=gs://b/r --config.seed=1 ' \
           'MULTIHOST=1' in lines
    assert lines[-2].endswith('main.py exited with status 3')
    assert lines[-1] == 'sdtl_worker: run ended, exit status 3'
    assert (tmp_path / 'gcloud.log').read_text().splitlines() == [
        f'storage cp {tmp_path}/sdtl_run/log gs://b/r/logs/worker-2.log',
        f'storage cp {tmp_path}/sdtl_run/exit_status gs://b/r/logs/worker-2.exit_status']
    # Re-attaching later prints the same log from the line asked for.
    again = worker('follow', '3')
    assert again.returncode == 3 and again.stdout.splitlines() == lines[2:]


def _no_python_path(tmp_path):
    """A PATH with this machine's programs but no python*, pip* or uv: links in tmp/sys."""
    sys_bin = tmp_path / 'sys'
    sys_bin.mkdir()
    for folder in ('/usr/local/bin', '/usr/bin', '/bin', '/usr/sbin', '/sbin'):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if name.startswith(('python', 'pip', 'uv')) or os.path.lexists(sys_bin / name):
                continue
            (sys_bin / name).symlink_to(os.path.join(folder, name))
    return str(sys_bin)


def test_tpu_worker_sets_up_a_new_python_on_a_tpu_image(tmp_path, fake_programs):
    """A TPU VM image's python3 is 3.10: the worker's setup (setup.sh's dry run) gets a newer
    one through uv, with the tpu extra, no torch and apt allowed for python3-venv."""
    repo = tmp_path / 'repo'
    (repo / 'scripts').mkdir(parents=True)
    for name in ('scripts/setup.sh', 'requirements-lock.txt', 'setup.py'):
        (repo / name).write_bytes((ROOT / name).read_bytes())
    fake = {
        # Python 3.10 to whatever asks (--version, or code run with -c); nothing else works.
        'python3': (
            'if [[ "$1" == --version || "$1" == -V ]]; then echo "Python 3.10.12"; exit 0; fi\n'
            'args=()\nwhile [ $# -gt 0 ]; do\n'
            '  if [ "$1" = -c ]; then\n'
            '    args+=(-c "import sys, collections; sys.version_info = collections.namedtuple('
            '\'v\', \'major minor micro releaselevel serial\')(3, 10, 12, \'final\', 0); '
            'sys.version = \'3.10.12 (main) [GCC 11.4.0]\'\n$2"); shift 2\n'
            f'  else args+=("$1"); shift; fi\ndone\nexec {sys.executable} "${{args[@]}}"\n')}
    bin_dir = fake_programs(**fake)
    env = {'HOME': str(tmp_path), 'SDTL_CHECKOUT': str(repo), 'SDTL_DRY_RUN': '1',
           'PATH': f'{bin_dir}:{_no_python_path(tmp_path)}'}

    def prepare():
        return subprocess.run(['bash', WORKER, 'prepare'], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=60)

    def uv_python(out):     # `.../uv python install 3.X` with X >= 11, and the venv from it
        lines = [shlex.split(line) for line in out.splitlines()]
        installs = [w for w in lines if w[1:3] == ['python', 'install'] and w[0].endswith('/uv')]
        assert len(installs) == 1 and int(installs[0][3].split('.')[1]) >= 11, out
        assert [installs[0][0], 'venv'] in [w[:2] for w in lines], out
        assert not any(w[0].endswith('python3') and 'venv' in w for w in lines), out
        assert "'jax[tpu]==" in out and 'torch' not in out, out

    no_uv = prepare()
    assert no_uv.stdout.startswith(
        'SDTL_APT=1 SDTL_TORCH=none SDTL_EXTRAS=tpu bash scripts/setup.sh\n')
    # No Python >= 3.11 and no uv: setup.sh fetches uv (with a python3's pip or curl), or says
    # in one line what to install.
    if no_uv.returncode == 0:
        uv_python(no_uv.stdout)
    else:
        [line] = no_uv.stderr.strip().splitlines()
        assert 'Python >= 3.11' in line and 'python3 is 3.10.12' in line, line
    fake_programs(uv='[ "$1" = --version ] && echo "uv 0.9.0"\n')
    with_uv = prepare()
    assert with_uv.returncode == 0, with_uv.stderr
    uv_python(with_uv.stdout)
    assert f'{bin_dir}/uv python install' in with_uv.stdout     # the uv on PATH
