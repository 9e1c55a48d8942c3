"""The command-line convention (sdtl_jax/cli.py): every command `python -m sdtl_jax` lists, and
every launcher, answers --help with exit status 0, its usage (`python -m ...`) and a flag it
must have; importing the command modules defines no flag.

The helps run once, all at the same time, in subprocesses: each costs a Python start and its
imports (JAX for some), nothing more.
"""
import concurrent.futures
import importlib
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import types

import pytest
from absl import app, flags

from sdtl_jax import cli, moved

ROOT = pathlib.Path(__file__).parent.parent
# A flag each command's --help must show.
FLAG = {
    'python -m sdtl_jax.main': '--workdir',
    'python -m sdtl_jax.report': '--workdir',
    'python -m sdtl_jax.analyze': '--probe',
    'python -m sdtl_jax.models': '--model',
    'python -m sdtl_jax.convert': '--checkpoint',
    'python -m sdtl_jax.datasets.generate': '--outdir',
    'python -m sdtl_jax.datasets.generate.tiny': '--[no]sdxl',
    'python -m sdtl_jax.datasets.generate.random_sd': '--[no]safety_checker',
    'python -m sdtl_jax.datasets.imagenet100': '--train_tar',
    'python -m sdtl_jax.datasets.pets': '--annotations',
    'python -m sdtl_jax.datasets.tfds': '--tfds_data_dir',
    'python -m sdtl_jax.datasets.image_folder': '--domain',
    'python -m sdtl_jax.datasets.digits': '--data_dir',
    'python -m bench.all': '--skip',
    'python -m bench.train_step_speed': '--num_frozen',
    'python -m bench.freeze_speed': '--num_frozen',
    'python -m bench.profile_step': '--top',
    'python -m bench.loader_speed': '--settings',
    'python -m bench.generator_speed': '--naive_images',
    'python -m bench.accelerator_check': '--total_s',
    'python -m bench.rehearsal': '--[no]tiny',
    'launch/train_multi_gpu.sh': '--gpus=N',
    'launch/train_slurm.sh': '--gpus=N',
    'launch/generate_multi_gpu.sh': '--gpus=N',
    'launch/generate_slurm.sh': '--gpus=N',
    'launch/tpu_pod.sh': '--dry_run',
    'python launch/study_slurm.py': '--partition',
    'python launch/sweep.py': '--hosts',
}
# Not a command for users (not listed), but a CLI all the same: it needs the reference models
# (torchvision, timm), which CI does not install.
SCRIPTS = {'python scripts/make_fidelity_fixtures.py': '--full_size'}
# The command modules that are libraries too, or that tests import: not main.py and
# generate/__main__.py, programs only, which define their flags at import.
MODULES = ('bench.accelerator_check', 'bench.all', 'bench.freeze_speed', 'bench.generator_speed',
           'bench.loader_speed', 'bench.profile_step', 'bench.rehearsal', 'bench.train_step_speed',
           'sdtl_jax.analyze', 'sdtl_jax.convert', 'sdtl_jax.report',
           'sdtl_jax.datasets.generate.tiny', 'sdtl_jax.datasets.generate.random_sd',
           'sdtl_jax.datasets.digits', 'sdtl_jax.datasets.imagenet100', 'sdtl_jax.datasets.pets',
           'sdtl_jax.datasets.tfds', 'sdtl_jax.datasets.shards', 'sdtl_jax.datasets.image_folder',
           'sdtl_jax.models.__main__')


def _argv(command: str) -> list[str]:
    words = command.split()
    if words[0] == 'python':
        return [sys.executable, *words[1:]]
    return ['bash', *words]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def runs():
    """{command: its --help's CompletedProcess}, plus 'list' (python -m sdtl_jax), run side by
    side."""
    jobs = {'list': [sys.executable, '-m', 'sdtl_jax']}
    commands = dict(FLAG)
    if all(importlib.util.find_spec(m) for m in ('torchvision', 'timm')):
        commands.update(SCRIPTS)
    jobs.update({command: [*_argv(command), '--help'] for command in commands})
    jobs.update({f'moved {old}': [sys.executable, '-m', old, '--help'] for old in moved.MOVED})
    with concurrent.futures.ThreadPoolExecutor(max(4, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(_run, argv) for name, argv in jobs.items()}
        return {name: future.result() for name, future in futures.items()}


def test_python_m_sdtl_jax_lists_every_command(runs):
    result = runs['list']
    assert result.returncode == 0 and not result.stderr, result.stderr
    listed = [re.split(r'\s{2,}', line.strip())[0] for line in result.stdout.splitlines()
              if line.startswith('  ')]
    assert listed == list(FLAG)      # each exactly once; FLAG's keys get their --help checked
    assert all(len(line) <= 100 for line in result.stdout.splitlines())


@pytest.mark.parametrize('command', [*FLAG, *SCRIPTS])
def test_help_exits_0_with_the_usage_and_the_flags(runs, command):
    if command not in runs:
        pytest.skip('needs the reference models (torchvision, timm)')
    result = runs[command]
    assert result.returncode == 0, result.stderr[-3000:]
    usage = command.removeprefix('python ')
    # The usage comes first: the module docstring's (or the launcher's header's) first lines.
    head = result.stdout.splitlines()[:12]
    assert any(usage in line for line in head), result.stdout[:2000]
    flag = FLAG.get(command) or SCRIPTS[command]
    assert flag in result.stdout, result.stdout


@pytest.mark.parametrize('old', moved.MOVED)
def test_moved_commands_still_run_from_their_old_path(runs, old):
    new = moved.MOVED[old]
    result = runs[f'moved {old}']
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.splitlines()[0] == (f'note: python -m {old} is now python -m {new}; the '
                                             'old name goes in the next release.')
    assert result.stdout == runs[f'python -m {new}'].stdout     # the new command's own help


def test_importing_the_commands_defines_no_flag():
    for name in MODULES:
        importlib.import_module(name)
    assert not set(MODULES) & set(flags.FLAGS.flags_by_module_dict())


def test_python_m_sdtl_jax_takes_no_arguments():
    result = _run([sys.executable, '-m', 'sdtl_jax', 'main', '--config=x'])
    assert result.returncode == 2 and 'takes no arguments' in result.stderr
    assert 'python -m sdtl_jax.main' in result.stderr and not result.stdout


def _command(**defaults):
    """A command module: --out (required) and --n; main returns what it was given."""
    def define_flags(flag_values):
        flags.DEFINE_string('out', None, 'Where.', required=True, flag_values=flag_values)
        flags.DEFINE_integer('n', defaults.get('n', 1), 'How many.', flag_values=flag_values)

    def main(argv, flag_values):
        return argv, flag_values.out, flag_values.n
    return types.SimpleNamespace(__name__='fake', define_flags=define_flags, main=main)


def test_call_parses_flags_of_its_own():
    command = _command()
    assert cli.call(command, ['--out=x', '--n=3']) == (['fake'], 'x', 3)
    # The same flag names again: each call has its own FlagValues, absl's FLAGS is untouched.
    assert cli.call(_command(n=5), ['--out=y']) == (['fake'], 'y', 5)
    assert 'out' not in flags.FLAGS
    with pytest.raises(flags.IllegalFlagValueError, match='--out'):
        cli.call(command, [])
    with pytest.raises(flags.UnrecognizedFlagError):
        cli.call(command, ['--out=x', '--m=2'])
    with pytest.raises(app.UsageError, match='Unexpected arguments'):
        cli.call(command, ['--out=x', 'extra'])
    values = cli.parse(command, ['--n=2', '--out=x'])
    assert cli.given(values) == ['--out=x', '--n=2']          # in the order they are defined
    assert cli.given(values, leave_out=('out',)) == ['--n=2']


def test_asks_for_help():
    assert cli.asks_for_help(['prog', '--out=x', '--help'])
    assert cli.asks_for_help(['prog', '-?']) and cli.asks_for_help(['prog', '--helpfull'])
    assert not cli.asks_for_help(['prog', '--out=--help.txt', '--', '--help'])
