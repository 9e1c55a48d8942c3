"""Every notebook's code runs top to bottom against the package (smoke-sized)."""
import json
import os
import pathlib

import matplotlib
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / 'notebooks').glob('*.ipynb'))


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path, monkeypatch):
    matplotlib.use('Agg')
    monkeypatch.setenv('SDTL_NOTEBOOK_VARIANT', 'smoke')
    monkeypatch.setenv('SDTL_NOTEBOOK_WORKDIR', str(tmp_path / 'run'))
    monkeypatch.setenv('SDTL_DATA_DIR', str(tmp_path / 'data'))
    monkeypatch.chdir(path.parent)
    namespace = {}
    for cell in json.loads(path.read_text())['cells']:
        if cell['cell_type'] == 'code':
            exec(compile(''.join(cell['source']), f'{path.name}', 'exec'), namespace)
    assert (tmp_path / 'run' / 'results.json').exists()
    assert (tmp_path / 'run' / 'accuracy.png').stat().st_size > 0
    assert os.path.exists(tmp_path / 'run' / 'source' / 'results.json')
