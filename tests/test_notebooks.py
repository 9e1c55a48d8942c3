"""Every notebook runs top to bottom in a Jupyter kernel (nbclient), smoke-sized, twice:

- in the checkout: from notebooks/ with the test venv's Python, as Jupyter runs it there. The
  workdirs are laid out as the notebooks' defaults are, so analyze_checkpoints analyzes the study
  demo_study ran, as it does by default;
- as in Colab: from an empty folder, where the first cell clones the repository ($SDTL_REPO: a git
  repository of this working tree, committed or not) and pip-installs the clone into a throwaway
  venv that sees the test venv's packages through a .pth file: the install is the cell's own
  (offline: every dependency is there) and the test venv stays as it is. To keep it cheap, each
  notebook starts from a copy of its checkout run's workdir with its figures and reports deleted:
  it reuses the finished trainings and makes the rest again, with the clone's code.

All runs share the demo data and the session's compilation cache (tests/conftest.py).
"""
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import venv

import nbclient
import nbformat
import pytest
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager

import sdtl_jax

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / 'notebooks').glob('*.ipynb'))
# What each notebook leaves in its workdir, in the order they run (a study before its analysis);
# a results.json marks a finished training.
OUTPUTS = {
    'explore_data': ['real_vs_synth.png'],
    'demo_transfer': ['results.json', 'accuracy.png', 'source/results.json'],
    'demo_study': ['study.json', 'report.md', 'figure2_layers.png', 'SDTL_N16/results.json'],
    'analyze_checkpoints': ['analysis.json', 'cka.png', 'probe.png', 'confusion.png'],
}
# Each notebook's workdir unless $SDTL_NOTEBOOK_WORKDIR says otherwise: REPO / 'runs' / this.
DEFAULT_WORKDIRS = {
    'explore_data': 'explore_data',
    'demo_transfer': 'notebook_demo',
    'demo_study': 'notebook_layers',
    'analyze_checkpoints': 'notebook_layers',   # the study of demo_study, if there is one
}
IN_ORDER = sorted(NOTEBOOKS, key=lambda p: [*OUTPUTS, p.stem].index(p.stem))
# A last cell the tests add: where the kernel imported sdtl_jax from.
PROBE = ('import json, sys, sdtl_jax\n'
         "print(json.dumps({'module': sdtl_jax.__file__, 'repo': str(REPO), "
         "'python': sys.executable}))")
COLAB_LINK = 'https://colab.research.google.com/github/{path}/blob/main/notebooks/{name}.ipynb'


def first_code_cell(path):
    return next(c.source for c in nbformat.read(path, as_version=4).cells
                if c.cell_type == 'code')


def test_every_notebook_is_checked():
    assert sorted(OUTPUTS) == sorted(DEFAULT_WORKDIRS) == [p.stem for p in NOTEBOOKS]


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_no_cell_depends_on_the_working_directory(path):
    """Paths start from REPO (the runs below override the workdir, so say the default here)."""
    code = '\n'.join(c.source for c in nbformat.read(path, as_version=4).cells
                     if c.cell_type == 'code')
    assert f"REPO / 'runs' / '{DEFAULT_WORKDIRS[path.stem]}'" in code
    # No relative path: '..', '.', 'runs/...', 'configs/...' other than under REPO / ...
    assert not re.findall(r"""(?<!/ )['"](?:\.\.?|runs|configs)(?:/[^'"]*)?['"]""", code)


def test_first_cells_are_identical_and_carry_the_repository_url():
    cells = {p.stem: first_code_cell(p) for p in NOTEBOOKS}
    first = cells[NOTEBOOKS[0].stem]
    assert all(cell == first for cell in cells.values()), \
        f'the notebooks\' first code cells differ from {NOTEBOOKS[0].name}\'s: ' + ', '.join(
            name for name, cell in cells.items() if cell != first)
    assert re.findall(r"^URL = '(.*)'$", first, re.M) == [sdtl_jax.REPOSITORY_URL]


@pytest.mark.parametrize('runtime, extra', [
    ({}, ''),
    ({'nvidia-smi': '| NVIDIA-SMI 550.54.15   Driver Version: 550.54.15   CUDA Version: 12.4 |'},
     '[cuda12]'),
    ({'nvidia-smi': '| NVIDIA-SMI 580.65.06   Driver Version: 580.65.06   CUDA Version: 13.0 |'},
     '[cuda13]'),
    ({'TPU_ACCELERATOR_TYPE': 'v5litepod-1'}, '[tpu]'),
    ({'/dev/accel0': True}, '[tpu]'),
], ids=['cpu', 'cuda12', 'cuda13', 'tpu', 'tpu-vm'])
def test_first_cell_installs_jax_for_the_runtime(runtime, extra, monkeypatch):
    """The first cell, where sdtl_jax is not installed yet, pip-installs the checkout and JAX at
    the lock's version, built for the runtime's accelerator (faked here: nvidia-smi, pip, the
    TPU's device file)."""
    version = re.search(r'^jax==(\S+)', (ROOT / 'requirements-lock.txt').read_text(), re.M)[1]
    commands = []

    def run(command, **kwargs):
        commands.append(command)
        if command == 'nvidia-smi':
            found = 'nvidia-smi' in runtime
            return subprocess.CompletedProcess(command, 0 if found else 127,
                                               runtime.get('nvidia-smi', ''), '')
        return subprocess.CompletedProcess(command, 0)

    for name in ('TPU_ACCELERATOR_TYPE', 'COLAB_TPU_ADDR'):
        monkeypatch.delenv(name, raising=False)
    if 'TPU_ACCELERATOR_TYPE' in runtime:
        monkeypatch.setenv('TPU_ACCELERATOR_TYPE', runtime['TPU_ACCELERATOR_TYPE'])
    exists = os.path.exists
    monkeypatch.setattr(os.path, 'exists', lambda path: runtime.get(path, False)
                        if path == '/dev/accel0' else exists(path))
    monkeypatch.setattr(subprocess, 'run', run)
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
    monkeypatch.setattr(sys, 'path', list(sys.path))
    monkeypatch.chdir(ROOT / 'notebooks')
    namespace = {}
    exec(first_code_cell(NOTEBOOKS[0]), namespace)
    assert namespace['REPO'] == ROOT
    assert commands[-1] == [sys.executable, '-m', 'pip', 'install', '-q', '-e', str(ROOT),
                            f'jax{extra}=={version}']
    assert sys.path[0] == str(ROOT)


def test_readme_opens_every_notebook_in_colab():
    """README.md links each notebook, and only existing ones, at the repository's URL."""
    assert sdtl_jax.REPOSITORY_URL.startswith('https://github.com/')
    path = sdtl_jax.REPOSITORY_URL.removeprefix('https://github.com/')
    expected = {COLAB_LINK.format(path=path, name=p.stem) for p in NOTEBOOKS}
    linked = re.findall(r'https://colab\.research\.google\.com/github/[^)\]\s>]+',
                        (ROOT / 'README.md').read_text())
    assert set(linked) == expected


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    """The demo data, built by the first notebook that needs it, for all of them."""
    return tmp_path_factory.mktemp('data')


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """The checkout runs' workdirs, as REPO / 'runs' would hold them."""
    return tmp_path_factory.mktemp('runs')


@pytest.fixture(scope='module')
def source_repo(tmp_path_factory):
    """A git repository holding this working tree, as committed or not (in CI the same as a
    clone of the checkout): what the colab runs clone."""
    source = tmp_path_factory.mktemp('source')
    listed = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode()
    for name in filter(None, listed.split('\0')):
        if (ROOT / name).is_file():         # not a tracked file deleted in the working tree
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    git = ['git', '-c', 'user.name=test', '-c', 'user.email=test@localhost', '-C', str(source)]
    for command in (['init', '-q'], ['add', '-A'], ['commit', '-q', '-m', 'working tree']):
        subprocess.run(git + command, check=True)
    return source


def throwaway_venv(folder):
    """A venv whose Python also sees the test venv's packages (a .pth file naming its
    site-packages), so pip there installs the clone only. Not the .pth files in those
    site-packages: the test venv's editable sdtl_jax stays out of sight."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(folder)
    python = folder / 'bin' / 'python'
    purelib = subprocess.run(
        [python, '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'],
        capture_output=True, text=True, check=True).stdout.strip()
    parents = [p for p in sys.path if p.endswith('site-packages') and os.path.isdir(p)]
    pathlib.Path(purelib, 'test_venv.pth').write_text(''.join(p + '\n' for p in parents))
    return python, pathlib.Path(purelib)


def execute(path, cwd, python, env, tmp_path):
    """Runs the notebook and the probe cell in a kernel of `python` started in `cwd`; returns the
    probe's answer."""
    specs = tmp_path / 'kernels'
    (specs / 'notebook').mkdir(parents=True)
    (specs / 'notebook' / 'kernel.json').write_text(json.dumps({
        'argv': [str(python), '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
        'display_name': 'notebook test', 'language': 'python'}))
    manager = AsyncKernelManager(
        kernel_name='notebook', kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(specs)]))
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(PROBE))
    client = nbclient.NotebookClient(notebook, km=manager, timeout=900, startup_timeout=120,
                                     resources={'metadata': {'path': str(cwd)}})
    client.execute(env=env)
    output = notebook.cells[-1].outputs
    return json.loads(''.join(o.text for o in output if o.get('name') == 'stdout'))


def kernel_env(data_dir, **extra):
    """The test's environment (its compilation cache and XLA flags among it), smoke-sized."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('PYTHONPATH', 'SDTL_NOTEBOOK_WORKDIR', 'SDTL_REPO')}
    return {**env, 'SDTL_NOTEBOOK_VARIANT': 'smoke', 'SDTL_DATA_DIR': str(data_dir), **extra}


@pytest.mark.parametrize('path', IN_ORDER, ids=lambda p: p.stem)
def test_notebook_runs_in_the_checkout(path, tmp_path, data_dir, runs):
    workdir = runs / DEFAULT_WORKDIRS[path.stem]
    env = kernel_env(data_dir, SDTL_NOTEBOOK_WORKDIR=str(workdir))
    probe = execute(path, path.parent, sys.executable, env, tmp_path)
    assert pathlib.Path(probe['module']).resolve() == ROOT / 'sdtl_jax' / '__init__.py'
    assert pathlib.Path(probe['repo']) == ROOT
    for output in OUTPUTS[path.stem]:
        assert (workdir / output).stat().st_size > 0, output


@pytest.mark.parametrize('path', IN_ORDER, ids=lambda p: p.stem)
def test_notebook_runs_as_in_colab(path, tmp_path, data_dir, runs, source_repo):
    content = tmp_path / 'content'             # Colab's working directory: nothing in it
    content.mkdir()
    python, site_packages = throwaway_venv(tmp_path / 'venv')
    workdir = tmp_path / 'run'
    if (runs / DEFAULT_WORKDIRS[path.stem]).exists():     # not when this test runs alone
        shutil.copytree(runs / DEFAULT_WORKDIRS[path.stem], workdir)
    for output in OUTPUTS[path.stem]:
        if not output.endswith('results.json'):
            (workdir / output).unlink(missing_ok=True)
    # pip offline and without build isolation: every dependency, setuptools included, is in the
    # test venv; anything else to download would be an error.
    env = kernel_env(data_dir, SDTL_NOTEBOOK_WORKDIR=str(workdir), SDTL_REPO=str(source_repo),
                     PIP_NO_INDEX='1', PIP_NO_BUILD_ISOLATION='0')
    test_venv = importlib.metadata.distribution('sdtl_jax').read_text('direct_url.json')
    probe = execute(path, content, python, env, tmp_path)
    clone = (content / 'sdtl_jax').resolve()
    assert probe['repo'] == str(clone)
    assert probe['module'] == str(clone / 'sdtl_jax' / '__init__.py')
    assert probe['python'] == str(python)
    installed = [importlib.metadata.Distribution.at(p).read_text('direct_url.json')
                 for p in site_packages.glob('sdtl_jax-*.dist-info')]
    assert [json.loads(text)['url'] for text in installed] == [clone.as_uri()]
    assert importlib.metadata.distribution('sdtl_jax').read_text('direct_url.json') == test_venv
    for output in OUTPUTS[path.stem]:
        assert (workdir / output).stat().st_size > 0, output
