"""bench/accelerator_check.py: on this CPU at --tiny, every part runs in a process of its own and
records its figures in one section, written under $OUT and appended to a copy of RESULTS.md;
the wheels it carries are installed only where missing; a part out of time is stopped."""
import datetime
import os
import re
import subprocess
import sys
import time
import zipfile

from bench import accelerator_check, results
from sdtl_jax import cli


def _part(lines, name):
    """The status line of part `name` and its figures (the indented lines after it)."""
    start = next(i for i, line in enumerate(lines) if line.startswith(f'{name}: '))
    figures = []
    for line in lines[start + 1:]:
        if not line.startswith('  '):
            break
        figures.append(line.strip())
    return lines[start], figures


def _number(line, before):
    """The number just before the words `before` in `line`."""
    return float(re.search(rf'([\d.]+)\s+{before}', line).group(1))


def test_tiny_check_records_every_part(tmp_path, monkeypatch):
    original = open(results.RESULTS).read()
    copy = tmp_path / 'RESULTS.md'
    copy.write_text(original)
    monkeypatch.setattr(results, 'RESULTS', str(copy))
    out = tmp_path / 'out'
    out.mkdir()
    monkeypatch.setenv('OUT', str(out))
    site = tmp_path / 'site'
    lines = accelerator_check.run(cli.parse(accelerator_check, [
        '--tiny', f'--site={site}', '--append']))

    text = copy.read_text()
    assert text.startswith(original)   # appended, nothing else touched
    section = text[len(original):]
    assert section == (out / 'accelerator_check.md').read_text()
    assert section.startswith(f'\n### accelerator_check, {datetime.date.today()}\n')
    assert f'`python -m bench.accelerator_check --tiny --site={site}`' in section
    assert '\n'.join(lines) in section
    for field in ('device: ', 'versions: jax ', 'commit: ', 'more versions: transformers ',
                  'wheels', 'load average at end: '):
        assert any(line.startswith(field) for line in lines), field
    assert not site.exists()   # every wheel of .whl/, if any, is installed here already

    for name in accelerator_check.PARTS:
        status, _ = _part(lines, name)
        assert status.startswith(f'{name}: ok, '), status
    assert re.fullmatch(r'\d+ passed in .*', _part(lines, 'tests')[1][-1])
    generator = _part(lines, 'generator')[1]
    assert generator[0].startswith('tiny random SD pipeline, 64 x 48, 2 steps')
    assert all(_number(line, 'images/s') > 0 for line in generator[1:3])
    loader = _part(lines, 'loader')[1]
    assert _number(loader[1], 'samples/s per core') > 0
    step = next(line for line in _part(lines, 'train_step')[1] if line.startswith('N=16: ours'))
    assert _number(step, 'samples/s') > 0

    log = (out / 'accelerator_check.log').read_text()
    assert '[generator] ' in log and log.rstrip().endswith(lines[-1])


def _wheel(directory, name, version):
    """A minimal pure-Python wheel of module `name`."""
    path = directory / f'{name}-{version}-py3-none-any.whl'
    info = f'{name}-{version}.dist-info'
    with zipfile.ZipFile(path, 'w') as whl:
        whl.writestr(f'{name}/__init__.py', f'VERSION = {version!r}\n')
        whl.writestr(f'{info}/METADATA', f'Metadata-Version: 2.1\nName: {name}\n'
                                         f'Version: {version}\n')
        whl.writestr(f'{info}/WHEEL', 'Wheel-Version: 1.0\nGenerator: test\n'
                                      'Root-Is-Purelib: true\nTag: py3-none-any\n')
        whl.writestr(f'{info}/RECORD', '')
    return path


def test_only_missing_wheels_are_installed(tmp_path, monkeypatch):
    wheels = tmp_path / 'whl'
    wheels.mkdir()
    _wheel(wheels, 'sdtl_check_fake', '0.1')
    # Installed here at this version: left alone (the file is never opened).
    (wheels / f'absl_py-{accelerator_check.metadata.version("absl-py")}-py3-none-any.whl'
     ).write_bytes(b'')
    monkeypatch.setattr(accelerator_check, 'WHEELS', str(wheels))
    site = tmp_path / 'site'
    log = accelerator_check.Log()

    path, line = accelerator_check.install_wheels(str(site), log)
    assert path == [str(site)] and line == f'wheels from .whl/ in {site}: sdtl-check-fake 0.1'
    assert sorted(os.listdir(site)) == ['sdtl_check_fake', 'sdtl_check_fake-0.1.dist-info']
    found = subprocess.run([sys.executable, '-c', 'import sdtl_check_fake as m; print(m.VERSION)'],
                           env={**os.environ, 'PYTHONPATH': str(site)}, capture_output=True,
                           text=True)
    assert found.stdout.strip() == '0.1'
    # A second run (a warm machine) finds it in the site and installs nothing.
    (site / 'sdtl_check_fake' / '__init__.py').write_text("VERSION = 'kept'\n")
    assert accelerator_check.install_wheels(str(site), log) == (path, line)
    assert (site / 'sdtl_check_fake' / '__init__.py').read_text() == "VERSION = 'kept'\n"


def test_a_part_out_of_time_is_stopped_with_its_children_and_output():
    start = time.perf_counter()
    status, out, err = accelerator_check.run_process(
        [sys.executable, '-c', 'import subprocess, sys, time; print("figure", flush=True); '
         'subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]); '
         'time.sleep(60)'], dict(os.environ), 2, accelerator_check.Log(), '')
    assert status == 'timed out after 2 s' and out == ['figure'] and err == []
    # Its child went too: else it would hold the output pipe open until the readers give up.
    assert time.perf_counter() - start < 8


def test_pytest_outcomes_are_read_from_a_finished_or_a_cut_run():
    finished = ['tests/test_a.py::test_x PASSED    [ 50%]', 'FAILED tests/test_a.py::test_y - E',
                '========= 1 failed, 1 passed, 2 warnings in 3.10s =========']
    assert accelerator_check._pytest_lines(finished) == [
        'FAILED tests/test_a.py::test_y - E', '1 failed, 1 passed, 2 warnings in 3.10s']
    cut = ['[gw0] [ 10%] PASSED tests/test_a.py::test_x', '[gw1] [ 20%] FAILED tests/test_b.py::t',
           '[gw0] [ 30%] PASSED tests/test_a.py::test_z[1]']
    assert accelerator_check._pytest_lines(cut) == [
        'FAILED tests/test_b.py::t', '2 passed, 1 failed by then']
