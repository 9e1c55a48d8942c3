"""Errors a researcher can fix end `python -m sdtl_jax.main` with one line, `FATAL <message>`
naming the file, key or folder at fault and what to do, exit status 1 and no traceback
(sdtl_jax/errors.py). Each case runs as a real command; they all run at once, as each costs
mostly its Python and JAX start-up."""
import concurrent.futures
import json
import logging
import logging.handlers
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from sdtl_jax.data import sources, subsets
from sdtl_jax.datasets import digits
from sdtl_jax.datasets.generate import diffusion

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """The demo data, built once here rather than by each command."""
    return digits.ensure_demo_data(str(tmp_path_factory.mktemp('data')))


def _changed_seed(workdir, data_dir):
    """A workdir whose training subset was drawn with seed 0, as the smoke config draws it."""
    split = sources.resolve('digits_real', data_dir, 'train')
    subsets.select(split, fraction=1.0, stratify=False, seed=0, max_examples=24,
                   workdir=str(workdir))
    return ['--config=configs/baseline.py:smoke', '--config.seed=1']


def _locked(workdir, data_dir):
    """A workdir locked by a live run: this test's own process."""
    (workdir / 'lock.json').write_text(json.dumps({
        'host': socket.gethostname(), 'pid': os.getpid(), 'command': 'sdtl_jax.main (first)',
        'started': time.time(), 'heartbeat': time.time()}))
    return ['--config=configs/baseline.py:smoke']


# name -> a function (workdir, data_dir) that prepares the workdir and returns the flags.
CASES = {
    # Never imported: the paper's data, not the demo's.
    'missing_dataset': lambda workdir, data_dir: [
        '--config=configs/baseline.py', f'--config.data.data_dir={workdir}/no_data'],
    # The demo data is built on first use; here it cannot be.
    'unwritable_data_dir': lambda workdir, data_dir: [
        '--config=configs/baseline.py:smoke', f'--config.data.data_dir={workdir}/a_file/data'],
    'changed_seed': _changed_seed,
    'misspelt_variant': lambda workdir, data_dir: ['--config=configs/baseline.py:dmeo'],
    'locked_workdir': _locked,
    'no_full_batch': lambda workdir, data_dir: [
        '--config=configs/baseline.py:demo', '--config.data.train_fraction=0.001'],
}


def _main(flags, workdir, data_dir):
    if not any(f.startswith('--config.data.data_dir=') for f in flags):
        flags = [*flags, f'--config.data.data_dir={data_dir}']
    return subprocess.run([sys.executable, '-m', 'sdtl_jax.main', f'--workdir={workdir}', *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def runs(data_dir, tmp_path_factory):
    """name -> (workdir, the finished command)."""
    workdirs = {name: tmp_path_factory.mktemp(name) for name in CASES}
    (workdirs['unwritable_data_dir'] / 'a_file').write_text('a file, not a folder')
    flags = {name: prepare(workdirs[name], data_dir) for name, prepare in CASES.items()}
    with concurrent.futures.ThreadPoolExecutor(len(CASES)) as pool:
        done = {name: pool.submit(_main, flags[name], workdirs[name], data_dir)
                for name in CASES}
    return {name: (workdirs[name], future.result()) for name, future in done.items()}


def _fatal_line(result, phrase):
    """The one FATAL line of a failed command, holding `phrase` once; its stderr has no other
    copy of `phrase` and no traceback."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    fatal = [line for line in result.stderr.splitlines() if line.startswith('FATAL')]
    assert len(fatal) == 1 and result.stderr.rstrip().endswith(fatal[0]), result.stderr[-3000:]
    assert result.stderr.count(phrase) == 1 and phrase in fatal[0], result.stderr[-3000:]
    return fatal[0]


def test_missing_dataset_names_its_folder_and_the_commands_that_make_it(runs):
    workdir, result = runs['missing_dataset']
    line = _fatal_line(result, 'sdtl_jax.datasets.image_folder')     # the way out, once
    assert line.startswith("FATAL Dataset 'imagenet100_real' (")
    assert f'{workdir}/no_data/imagenet100_real does not exist' in line
    assert 'python -m sdtl_jax.datasets.imagenet100 --src=<ImageNet-1k folder> ' in line
    assert '--config.data.data_dir' in line


def test_demo_data_that_cannot_be_built_names_the_folder(runs):
    workdir, result = runs['unwritable_data_dir']
    line = _fatal_line(result, 'NotADirectoryError')
    assert f'built on first use in {workdir}/a_file/data/digits_real' in line
    assert 'point --config.data.data_dir' in line


def test_changed_seed_names_the_subset_file_and_both_seeds(runs):
    workdir, result = runs['changed_seed']
    line = _fatal_line(result, 'config.seed=0 there, 1 here')
    assert line.startswith(f'FATAL {workdir}/{subsets.SUBSET_FILE} holds another training subset')
    assert line.endswith('or use a new --workdir')


def test_misspelt_variant_names_it_and_the_allowed_ones(runs):
    _, result = runs['misspelt_variant']
    line = _fatal_line(result, "'dmeo'")
    assert line == ("FATAL Flags parsing error: --config=configs/baseline.py:dmeo: Unknown config "
                    "argument 'dmeo'; did you mean 'demo'? allowed: data=..., demo, domain=..., "
                    'model=..., smoke')


def test_locked_workdir_names_the_run_that_holds_it(runs):
    workdir, result = runs['locked_workdir']
    line = _fatal_line(result, f'is in use by another run: pid {os.getpid()}')
    assert line.startswith(f'FATAL {workdir} is in use')
    assert f'delete {workdir}/lock.json' in line


def test_too_small_a_fraction_names_the_key(runs):
    _, result = runs['no_full_batch']
    line = _fatal_line(result, 'config.data.train_fraction=0.001')
    assert "1 training example(s) of 'digits_real'" in line
    assert 'no full batch of config.global_batch=64; raise data.train_fraction' in line


def test_torchvision_fallback_warning_of_transformers_is_dropped():
    logger = logging.getLogger(diffusion.TORCHVISION_FALLBACK_LOGGER)
    diffusion.quiet_torchvision_fallback()
    shown = logging.handlers.BufferingHandler(capacity=10)
    logger.addHandler(shown)
    try:
        logger.warning('`CLIPImageProcessor` requires torchvision (not installed); falling back '
                       'to `CLIPImageProcessorPil` for backward compatibility. Install '
                       'torchvision to use the default backend, or import '
                       '`CLIPImageProcessorPil` directly to silence this warning.')
        logger.warning('Another warning of transformers')
    finally:
        logger.removeHandler(shown)
    assert [r.getMessage() for r in shown.buffer] == ['Another warning of transformers']
