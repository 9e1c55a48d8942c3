"""Every notebook's code runs top to bottom against the package (smoke-sized), as in Colab."""
import json
import pathlib

import matplotlib
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / 'notebooks').glob('*.ipynb'))
# What each notebook leaves in its workdir.
OUTPUTS = {
    'demo_transfer': ['results.json', 'accuracy.png', 'source/results.json'],
    'demo_study': ['study.json', 'report.md', 'figure2_layers.png', 'SDTL_N16/results.json'],
    'explore_data': ['real_vs_synth.png'],
    'analyze_checkpoints': ['analysis.json', 'cka.png', 'probe.png', 'confusion.png'],
}


def test_every_notebook_is_checked():
    assert sorted(OUTPUTS) == [p.stem for p in NOTEBOOKS]


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
    for output in OUTPUTS[path.stem]:
        assert (tmp_path / 'run' / output).stat().st_size > 0, output
