"""scripts/setup.sh on each kind of machine, in print-only mode (SDTL_DRY_RUN=1).

Each test runs the script from a copy of the repository's install files, with PATH holding only
the tools it needs and fake interpreters, so what it decides depends on nothing on this machine
(its pyenv shims, pip's config, .venv). Nothing is installed or downloaded.
"""
import os
import pathlib
import platform
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
JAX = re.search(r'^jax==(\S+)$', (ROOT / 'requirements-lock.txt').read_text(), re.M)[1]
TORCH = '2.13.0'
CPU_INDEX = 'https://download.pytorch.org/whl/cpu'
# What setup.sh runs besides Python and uv; taken from the system directories only.
TOOLS = ['bash', 'dirname', 'grep', 'sed', 'head', 'uname', 'id', 'rm', 'mkdir']
# A real interpreter >= 3.11 (the one running the tests, outside its venv).
REAL_PYTHON = getattr(sys, '_base_executable', sys.executable)
PY_TAG = f'cp{sys.version_info.major}{sys.version_info.minor}'


def fake_python(version, venv=True, pip=False):
    """A python3 that only answers setup.sh's probes: its version, venv support, pip."""
    return '\n'.join([
        '#!/bin/sh',
        f'case "$*" in *version_info*) echo {version}; exit 0;; esac',
        f'case "$*" in *ensurepip*) exit {0 if venv else 1};; esac',
        f'case "$*" in "-m pip --version") exit {0 if pip else 1};; esac',
        'exit 1', ''])


FAKE_UV = '#!/bin/sh\necho "uv 0.13.9"\n'


def run_setup(tmp_path, bins, **env):
    """Runs a copy of setup.sh with SDTL_DRY_RUN=1; bins: name -> script text, or a path to link.

    Returns (returncode, commands as argument lists, stderr).
    """
    repo, bindir, home = tmp_path / 'repo', tmp_path / 'bin', tmp_path / 'home'
    for d in (repo / 'scripts', bindir, home):
        d.mkdir(parents=True, exist_ok=True)
    for name in ('scripts/setup.sh', 'setup.py', 'requirements-lock.txt'):
        shutil.copy(ROOT / name, repo / name)
    for tool in TOOLS:
        (bindir / tool).symlink_to(shutil.which(tool, path='/usr/bin:/bin'))
    for name, what in bins.items():
        if isinstance(what, pathlib.Path):
            (bindir / name).symlink_to(what)
        else:
            (bindir / name).write_text(what)
            (bindir / name).chmod(0o755)
    full_env = {'PATH': str(bindir), 'HOME': str(home), 'SDTL_DRY_RUN': '1', **env}
    proc = subprocess.run(['bash', str(repo / 'scripts' / 'setup.sh')], env=full_env,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, [shlex.split(line) for line in proc.stdout.splitlines()], proc.stderr


def installs_of(commands, package):
    """The commands that install `package` (by requirement or wheel file)."""
    return [c for c in commands if 'install' in c
            and any(re.match(rf'(.*/)?{package}(\[[^]]*\])?(==|-\d)', a) for a in c)]


def index_of(command, flag):
    return command[command.index(flag) + 1] if flag in command else None


REAL = {'python3': pathlib.Path(REAL_PYTHON)}


def test_cpu_without_local_wheel_takes_torch_from_pytorch_cpu_index(tmp_path):
    rc, commands, err = run_setup(tmp_path, REAL)
    assert rc == 0, err
    assert commands[0] == [str(tmp_path / 'bin' / 'python3'), '-m', 'venv', '.venv']
    torch, = installs_of(commands, 'torch')
    assert f'torch=={TORCH}' in torch and '--no-deps' in torch
    assert index_of(torch, '--index-url') == CPU_INDEX
    assert '--extra-index-url' not in torch and '--index' not in torch
    assert not any('cu1' in a for c in commands for a in c)
    assert [c[-3:] for c in commands[-2:]] == [['--no-deps', '-r', 'requirements-lock.txt'],
                                               ['--no-deps', '-e', '.']]


def test_local_cpu_wheel_in_pip_find_links_is_installed(tmp_path):
    wheels = tmp_path / 'wheels'
    wheels.mkdir()
    wheel = wheels / f'torch-{TORCH}+cpu-{PY_TAG}-{PY_TAG}-manylinux_2_28_{platform.machine()}.whl'
    wheel.write_bytes(b'')
    rc, commands, err = run_setup(tmp_path, REAL, PIP_FIND_LINKS=str(wheels))
    assert rc == 0, err
    torch, = installs_of(commands, 'torch')
    assert torch[-2:] == ['--no-deps', str(wheel)]
    assert not any('download.pytorch.org' in a for c in commands for a in c)


@pytest.mark.parametrize('cuda, tag', [('13', 'cu130'), ('12', 'cu128')])
def test_cuda_installs_torch_and_jax_plugin_in_one_command(tmp_path, cuda, tag):
    rc, commands, err = run_setup(tmp_path, REAL, SDTL_TORCH='cuda', SDTL_CUDA=cuda)
    assert rc == 0, err
    torch, = installs_of(commands, 'torch')
    assert f'torch=={TORCH}+{tag}' in torch and f'jax[cuda{cuda}]=={JAX}' in torch
    assert index_of(torch, '--extra-index-url') == f'https://download.pytorch.org/whl/{tag}'
    assert index_of(torch, '-c') == 'requirements-lock.txt' and '--no-deps' not in torch
    assert installs_of(commands, 'jax') == [torch]


def test_tpu_without_torch_pins_jax_tpu_to_the_lock(tmp_path):
    rc, commands, err = run_setup(tmp_path, REAL, SDTL_TORCH='none', SDTL_EXTRAS='tpu')
    assert rc == 0, err
    assert not installs_of(commands, 'torch')
    extras, = installs_of(commands, 'jax')
    assert f'jax[tpu]=={JAX}' in extras and '.[tpu]' in extras
    assert index_of(extras, '-c') == 'requirements-lock.txt'


def test_reference_takes_cpu_torchvision_from_pytorch_cpu_index(tmp_path):
    rc, commands, err = run_setup(tmp_path, REAL, SDTL_EXTRAS='reference')
    assert rc == 0, err
    torchvision, = installs_of(commands, 'torchvision')
    assert index_of(torchvision, '--index-url') == CPU_INDEX and '--no-deps' in torchvision
    extras = commands[-1]
    assert '.[reference]' in extras and index_of(extras, '-c') == 'requirements-lock.txt'
    assert commands.index(torchvision) < commands.index(extras)   # installed before timm's needs


def test_reference_with_cuda_torch_takes_the_cuda_torchvision(tmp_path):
    rc, commands, err = run_setup(tmp_path, REAL, SDTL_TORCH='cuda', SDTL_EXTRAS='reference')
    assert rc == 0, err
    torchvision, = installs_of(commands, 'torchvision')
    assert 'torchvision==0.28.0+cu130' in torchvision and f'torch=={TORCH}+cu130' in torchvision


def test_python_310_alone_is_one_line_naming_what_to_install(tmp_path):
    rc, commands, err = run_setup(tmp_path, {'python3': fake_python('3.10.12')})
    assert rc != 0 and not commands
    line, = err.strip().splitlines()
    assert 'Python >= 3.11' in line and 'python3 is 3.10.12' in line
    assert 'apt-get install python3.11' in line and 'uv' in line and 'Traceback' not in err


def test_newer_python3_x_is_chosen_over_python3(tmp_path):
    rc, commands, err = run_setup(
        tmp_path, {'python3': fake_python('3.10.12'), 'python3.11': pathlib.Path(REAL_PYTHON)})
    assert rc == 0, err
    assert commands[0] == [str(tmp_path / 'bin' / 'python3.11'), '-m', 'venv', '.venv']


def test_python_below_floor_in_PYTHON_is_refused(tmp_path):
    rc, commands, err = run_setup(tmp_path, {**REAL, 'old': fake_python('3.10.12')},
                                  PYTHON='old')
    assert rc != 0 and not commands
    line, = err.strip().splitlines()
    assert 'PYTHON=old is 3.10.12' in line


def test_uv_on_path_installs_python_and_makes_the_venv(tmp_path):
    rc, commands, err = run_setup(
        tmp_path, {'python3': fake_python('3.10.12'), 'uv': FAKE_UV})
    assert rc == 0, err
    uv = str(tmp_path / 'bin' / 'uv')
    assert commands[0] == [uv, 'python', 'install', '3.11']
    assert commands[1][0] == uv and commands[1][1] == 'venv' and commands[1][-1] == '.venv'
    assert commands[2][:3] == [uv, 'pip', 'install'] and 'uv==0.13.9' in commands[2]
    assert installs_of(commands, 'torch')   # then as on any machine


def test_tpu_vm_python_310_with_pip_fetches_uv(tmp_path):
    """Cloud TPU VM images: python3 3.10 with pip, no python3-venv, no uv."""
    rc, commands, err = run_setup(
        tmp_path, {'python3': fake_python('3.10.12', venv=False, pip=True)},
        SDTL_TORCH='none', SDTL_EXTRAS='tpu')
    assert rc == 0, err
    uv_dir = str(tmp_path / 'home' / '.cache' / 'sdtl_jax' / 'uv')
    assert commands[0][1:] == ['-m', 'pip', 'install', '-q', '--upgrade', '--target', uv_dir,
                               'uv==0.13.9']
    assert commands[1] == [uv_dir + '/bin/uv', 'python', 'install', '3.11']


def test_python_without_venv_module_uses_uv_or_apt(tmp_path):
    py312 = fake_python('3.12.3', venv=False)
    rc, commands, err = run_setup(tmp_path, {'python3': py312, 'uv': FAKE_UV})
    assert rc == 0, err
    assert commands[0] == [str(tmp_path / 'bin' / 'uv'), 'venv', '-q', '--python',
                           str(tmp_path / 'bin' / 'python3'), '.venv']
    rc, commands, err = run_setup(tmp_path / 'apt', {'python3': py312}, SDTL_APT='1')
    assert rc == 0, err
    sudo = [] if os.geteuid() == 0 else ['sudo']
    assert commands[1] == [*sudo, 'apt-get', 'install', '-y', '-q', 'python3.12-venv']
    assert commands[2][1:] == ['-m', 'venv', '.venv']


@pytest.mark.parametrize('value, says', [('0', 'SDTL_TORCH=none'), ('gpu', 'cpu (default)')])
def test_invalid_torch_choice_is_one_line(tmp_path, value, says):
    rc, commands, err = run_setup(tmp_path, REAL, SDTL_TORCH=value)
    assert rc != 0 and not commands
    line, = err.strip().splitlines()
    assert says in line
