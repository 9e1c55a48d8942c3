"""Runs before any test imports jax: one CPU device, a shared compilation cache, absl flags.

Most tests compile the same few small models; compiling dominates the suite's time. So:
- one CPU device by default: an 8-device mesh compiles (SPMD partitioning) and runs slower, and
  its programs would differ from those of the subprocesses the end-to-end tests start. A test
  that needs 8 devices says `@pytest.mark.devices(8)` and runs in its own pytest process;
- a persistent compilation cache, passed to subprocesses through the environment, so each
  distinct program compiles once per session;
- XLA's CPU backend without its expensive LLVM passes: the programs run a few steps on tiny
  images, where compiling them costs far more than running them.
"""
import os
import subprocess
import sys
import tempfile

DEVICE_FLAG = '--xla_force_host_platform_device_count'
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
if DEVICE_FLAG not in os.environ.get('XLA_FLAGS', ''):   # a child of `devices(n)` keeps its n
    os.environ['XLA_FLAGS'] = (f'{DEVICE_FLAG}=1 --xla_backend_optimization_level=0 '
                               '--xla_llvm_disable_expensive_passes=true')
# JAX reads these at import; subprocesses inherit them.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='sdtl_jax_cache_'))
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'

from absl import flags  # noqa: E402

# grain and Orbax read absl flags; outside absl.app.run they raise UnparsedFlagAccessError.
flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line('markers', 'devices(n): runs the test in a pytest process that '
                                       'simulates n CPU devices')


def pytest_pyfunc_call(pyfuncitem):
    """Runs a `devices(n)` test in a child pytest with n simulated devices, unless this
    process already has them (then the test runs here, as usual)."""
    marker = pyfuncitem.get_closest_marker('devices')
    if marker is None or jax.device_count() == marker.args[0]:
        return None
    flags = os.environ['XLA_FLAGS'].replace(f'{DEVICE_FLAG}=1', f'{DEVICE_FLAG}={marker.args[0]}')
    child = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-n', '0', '-p', 'no:cacheprovider',
         pyfuncitem.nodeid],
        cwd=pyfuncitem.config.rootpath, env={**os.environ, 'XLA_FLAGS': flags},
        capture_output=True, text=True)
    if child.returncode != 0:
        pytest.fail(f'in a child pytest with {marker.args[0]} devices:\n'
                    f'{child.stdout[-6000:]}\n{child.stderr[-2000:]}', pytrace=False)
    return True


@pytest.fixture
def fake_programs(tmp_path):
    """fake_programs(name=body, ...) writes each as an executable shell script into
    tmp_path/bin and returns that folder, to put first on a subprocess's PATH."""
    folder = tmp_path / 'bin'

    def write(**programs):
        folder.mkdir(exist_ok=True)
        for name, body in programs.items():
            (folder / name).write_text('#!/usr/bin/env bash\n' + body)
            (folder / name).chmod(0o755)
        return folder
    return write
