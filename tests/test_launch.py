"""The launchers in launch/: --dry_run prints the commands they would run, for every worker."""
import pathlib
import subprocess

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
