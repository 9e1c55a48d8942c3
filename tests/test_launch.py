"""launch/tpu_pod.sh --dry_run prints the commands it would run, for every worker."""
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
