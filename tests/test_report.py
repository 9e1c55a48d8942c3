"""The study report: tables beside the paper's numbers, pending runs, figures, Figure 3's fit.

Every study folder here is a test fixture: a study.json and results.json files holding numbers
the test chooses, no training. The figures are read back as matplotlib objects, as drawn.
"""
import math
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
from matplotlib import colors

from sdtl_jax import analyze_outputs, fileio, report, report_figures, report_tables
from sdtl_jax.data import sources


def _run(name, kind='baseline', domain='real', num_frozen=0, fraction=1.0, aug='multicrop',
         direction='', source=''):
    return {'name': name, 'kind': kind, 'domain': domain, 'num_frozen': num_frozen,
            'train_fraction': fraction, 'aug': aug, 'direction': direction, 'source': source}


def _transfer(direction, num_frozen, fraction=1.0, name=None):
    prefix, domain, source = (('SDTL', 'real', 'S') if direction == 'synth_to_real'
                              else ('RDTL', 'synth', 'R'))
    return _run(name or f'{prefix}_N{num_frozen:02d}', 'transfer', domain, num_frozen, fraction,
                direction=direction, source=source)


def _results(top1, top5, train_loss=0.7, std=0.1, images=1200):
    return {'top1_mean': top1, 'top1_std': std, 'top5_mean': top5, 'top5_std': 0.1,
            'train_loss_mean': train_loss, 'train_loss_std': 0.003, 'wall_seconds': 1800.0,
            'train_examples': images}


def _write_study(workdir, study, dataset, model, runs, results):
    """study.json with `runs`; results.json for the runs named in `results` (others pending)."""
    os.makedirs(workdir, exist_ok=True)
    fileio.write_json(os.path.join(workdir, 'study.json'),
                      {'study': study, 'dataset': dataset, 'model': model, 'runs': runs})
    for run in runs:
        if run['name'] in results:
            os.makedirs(os.path.join(workdir, run['name']))
            fileio.write_json(os.path.join(workdir, run['name'], 'results.json'),
                              {'num_frozen': run['num_frozen'],
                               'train_fraction': run['train_fraction'],
                               **results[run['name']]})


def _lines(path):
    with open(path) as f:
        return f.read().splitlines()


@pytest.fixture
def drawn(monkeypatch):
    """{file name: matplotlib Figure} of every figure saved while the test runs."""
    figures = {}
    save = fileio.save_figure

    def keep(figure, path, **kwargs):
        figures[os.path.basename(path)] = figure
        save(figure, path, **kwargs)

    monkeypatch.setattr(fileio, 'save_figure', keep)
    return figures


def _line(ax, label):
    return next(line for line in ax.get_lines() if line.get_label() == label)


def _is_pending_marker(line, ax):
    """A hollow marker on the x axis: x in data units, y at the axis (axes units)."""
    return (line.get_markerfacecolor() == 'none' and line.get_linestyle() == 'None'
            and line.get_transform() == ax.get_xaxis_transform()
            and np.all(np.asarray(line.get_ydata()) == 0))


def _same_color(a, b):
    return colors.to_rgba(a) == colors.to_rgba(b)


def _assert_png(path, min_pixels=(400, 300)):
    with PIL.Image.open(path) as image:
        assert image.format == 'PNG'
        assert image.size[0] >= min_pixels[0] and image.size[1] >= min_pixels[1]


def test_fit_log2_on_table_6a_gives_figure_3():
    rows = sources.load_reference('paper_tables.json')['table6a_data_reduction_sdtl_16_frozen']
    a, b = report_tables.fit_log2([r['divisor'] for r in rows], [r['top1'][0] for r in rows])
    # The exact least-squares fit is -2.225 and 85.600; Figure 3 prints -2.23 and 85.61.
    assert round(a, 2) == -2.23 and a == pytest.approx(-2.225, abs=1e-9)
    assert b == pytest.approx(85.60, abs=1e-9) and b == pytest.approx(85.61, abs=0.011)


def test_layers_report_puts_the_paper_beside_ours(tmp_path):
    workdir = str(tmp_path / 'layers')
    runs = [_run('S', domain='synth'), _run('R'), _transfer('synth_to_real', 1),
            _transfer('synth_to_real', 16), _transfer('real_to_synth', 1)]
    _write_study(workdir, 'layers', 'imagenet100', 'resnet50', runs, {
        'S': _results(65.0, 87.0), 'R': _results(88.0, 97.0, std=0.2),
        'SDTL_N01': _results(89.0, 97.5), 'SDTL_N16': _results(84.0, 96.0, train_loss=None)})
    out = report.write_report(workdir)

    assert out['report'] == os.path.join(workdir, 'report.md') and out['fits'] == {}
    lines = _lines(out['report'])
    sdtl = lines.index('## SDTL: pre-trained on S, layers >= N trained on R')
    rdtl = lines.index('## RDTL: pre-trained on R, layers >= N trained on S')
    assert sdtl < rdtl
    assert 'paper top-1' in lines[sdtl + 2] and 'Δ top-1' in lines[sdtl + 2]
    # Table 2's N = 1 row is 88.5 ± 0.2 / 97.4 ± 0.1: Δ top-1 = 89.0 - 88.5.
    assert ('| N = 1 | 1,200 | 89.0 ± 0.1 | 97.5 ± 0.1 | 0.700 ± 0.003 | 88.5 ± 0.2 | 97.4 ± 0.1 '
            '| +0.5 |') in lines[sdtl:rdtl]
    assert ('| S only | 1,200 | 65.0 ± 0.1 | 87.0 ± 0.1 | 0.700 ± 0.003 | 64.8 ± 0.1 | 87.6 ± 0.1 '
            '| +0.2 |') in lines[sdtl:rdtl]
    assert '| N = 16 | 1,200 | 84.0 ± 0.1 | 96.0 ± 0.1 | – | 84.3 ± 0.2 | 96.0 ± 0.1 | -0.3 |' \
        in lines[sdtl:rdtl]
    # RDTL N = 1 has no results.json yet: pending, with Table 3's numbers and no Δ.
    assert ('| N = 1 | pending | pending | pending | pending | 65.4 ± 0.3 | 87.4 ± 0.2 | – |'
            in lines[rdtl:])
    assert any('4 of 5 runs finished' in line and 'RDTL_N01' in line for line in lines)
    assert out['figures'] == [os.path.join(workdir, 'figure2_layers.png')]
    _assert_png(out['figures'][0])


def test_digits_report_has_no_paper_columns(tmp_path):
    workdir = str(tmp_path / 'digits')
    runs = [_run('S', domain='synth'), _run('R'), _transfer('synth_to_real', 2),
            _transfer('real_to_synth', 2)]
    _write_study(workdir, 'layers', 'digits', 'resnet50', runs, {'S': _results(40.0, 80.0)})
    out = report.write_report(workdir)
    lines = _lines(out['report'])
    text = '\n'.join(lines)
    assert 'No paper columns: digits is the offline demo dataset' in text
    table_lines = [line for line in lines if line.startswith('|')]
    assert table_lines and not any('paper' in line for line in table_lines)
    assert '| layers frozen | training images | top-1 | top-5 | train loss |' in lines
    assert '| N = 2 | pending | pending | pending | pending |' in text
    _assert_png(out['figures'][0])


def test_data_reduction_fits_top1_against_log2_divisor(tmp_path, drawn):
    workdir = str(tmp_path / 'reduction')
    divisors = (1, 2, 4, 8, 16)
    runs = [_run('S', domain='synth')]
    for d in divisors:
        runs += [_run(f'R_1of{d}', fraction=1 / d),
                 _transfer('synth_to_real', 16, 1 / d, name=f'SDTL_N16_1of{d}')]
    # Chosen so the fits are exact: SDTL -3·log2(d) + 90, R only -10·log2(d) + 80; 1/16 pending.
    results = {}
    for d in divisors[:-1]:
        results[f'SDTL_N16_1of{d}'] = _results(90 - 3 * math.log2(d), 97.0, images=1280 // d)
        results[f'R_1of{d}'] = _results(80 - 10 * math.log2(d), 95.0, images=1280 // d)
    _write_study(workdir, 'data_reduction', 'imagenet100', 'resnet50', runs, results)
    out = report.write_report(workdir)

    assert out['fits']['synth_to_real'] == pytest.approx((-3.0, 90.0))
    assert out['fits']['real'] == pytest.approx((-10.0, 80.0))
    text = '\n'.join(_lines(out['report']))
    assert '- Fit, ours (4 points): top-1 = -3.00·log2(divisor) + 90.00' in text
    assert '- Fit, ours (4 points): top-1 = -10.00·log2(divisor) + 80.00' in text
    assert '- Fit, paper (of its table): top-1 = -2.23·log2(divisor) + 85.60' in text
    # Table 6a's 1/2 row is 83.0 ± 0.2; ours is 87.0.
    assert ('| 1/2 | 640 | 87.0 ± 0.1 | 97.0 ± 0.1 | 0.700 ± 0.003 | 83.0 ± 0.1 | 96.2 ± 0.1 '
            '| +4.0 |') in text
    assert '| 1/16 | pending | pending | pending | pending |' in text
    assert 'Source model S (all synthetic data, no transfer): top-1 pending' in text
    assert 'the same' not in text       # every fraction trained on fewer images
    assert out['figures'] == [os.path.join(workdir, 'figure3_data_reduction.png')]
    _assert_png(out['figures'][0])

    # The drawn curves are the fits, a·log2(divisor) + b, on both axes (x: fraction, divisor).
    by_fraction, by_divisor = drawn['figure3_data_reduction.png'].axes
    for ax, divisor_of in ((by_fraction, lambda x: 1 / x), (by_divisor, lambda x: x)):
        for label, (a, b) in (('SDTL', (-3.0, 90.0)), ('R only', (-10.0, 80.0))):
            curve = [line for line in ax.get_lines() if line.get_label().startswith(f'{label} fit')]
            assert len(curve) == 1
            x, y = (np.asarray(v, float) for v in curve[0].get_data())
            assert len(x) > 2 and np.allclose(y, a * np.log2(divisor_of(x)) + b)
    # 1/16 is pending in both series: hollow markers on the x axis at 16.
    pending = [line for line in by_divisor.get_lines() if _is_pending_marker(line, by_divisor)]
    assert sorted(line.get_label() for line in pending) == ['R only, pending', 'SDTL, pending']
    assert all(list(line.get_xdata()) == [16] for line in pending)


def test_augmentations_report_follows_table_1(tmp_path):
    workdir = str(tmp_path / 'augmentations')
    # Listed out of order: the report sorts R before S, then by Table 1's pipeline order.
    runs = [_run('S_autoaugment', domain='synth', aug='autoaugment'),
            _run('R_multicrop', aug='multicrop'), _run('S_none', domain='synth', aug='none'),
            _run('R_none', aug='none')]
    _write_study(workdir, 'augmentations', 'imagenet100', 'resnet50', runs, {
        'R_none': _results(70.0, 88.0), 'R_multicrop': _results(88.0, 97.0),
        'S_none': _results(47.0, 72.0)})
    out = report.write_report(workdir)

    rows = [line for line in _lines(out['report']) if line.startswith('| ')][1:]
    assert [row.split(' | ')[0] for row in rows] == [
        '| Real Data Only (R)', '| R + DINO', '| Synth. Data Only (S)', '| S + AutoAugment']
    assert rows[1] == ('| R + DINO | 1,200 | 88.0 ± 0.1 | 97.0 ± 0.1 | 0.700 ± 0.003 | '
                       '87.8 ± 0.1 | 97.1 ± 0.1 | +0.2 |')
    assert rows[3].startswith('| S + AutoAugment | pending | pending | pending | pending | '
                              '56.2 ± 0.2 |')
    _assert_png(out['figures'][0])


def test_cli_names_a_folder_without_study_json(tmp_path):
    result = subprocess.run([sys.executable, '-m', 'sdtl_jax.report', f'--workdir={tmp_path}'],
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert f'{tmp_path} is not a study workdir: no study.json' in result.stderr
    assert 'python -m sdtl_jax.main --config=configs/study/layers.py:demo' in result.stderr


def test_data_reduction_notes_fractions_with_the_same_training_images(tmp_path):
    """A cap reached by two fractions (the smoke study's max_train_examples did this) makes
    their rows differ by noise only: the table's images column shows it, and a note says so."""
    workdir = str(tmp_path / 'capped')
    runs = [_run('S', domain='synth'), _run('R_1of1'), _run('R_1of2', fraction=0.5),
            _run('R_1of4', fraction=0.25)]
    _write_study(workdir, 'data_reduction', 'digits', 'resnet50', runs, {
        'R_1of1': _results(80.0, 95.0, images=24), 'R_1of2': _results(80.0, 95.0, images=24),
        'R_1of4': _results(70.0, 90.0, images=12)})
    text = '\n'.join(_lines(report.write_report(workdir)['report']))
    assert '| real fraction | training images | top-1 | top-5 | train loss |' in text
    assert '| 1/2 | 24 | 80.0 ± 0.1 |' in text and '| 1/4 | 12 | 70.0 ± 0.1 |' in text
    assert '- 1/2 trained on the same 24 images as 1/1: the fractions do not differ in data.' \
        in text
    assert '1/4 trained on the same' not in text


def test_layers_figure_marks_pending_runs_and_ticks_each_n(tmp_path, drawn):
    workdir = str(tmp_path / 'one_n')
    runs = [_run('S', domain='synth'), _run('R'), _transfer('synth_to_real', 16),
            _transfer('real_to_synth', 16)]
    _write_study(workdir, 'layers', 'digits', 'resnet50', runs, {
        'S': _results(40.0, 80.0), 'SDTL_N16': _results(70.0, 95.0)})
    report.write_report(workdir)
    ax, = drawn['figure2_layers.png'].axes

    # One N: one tick, at that N (a locator put fractional ticks around it).
    assert list(ax.get_xticks()) == [16]
    pending = {line.get_label(): line for line in ax.get_lines() if _is_pending_marker(line, ax)}
    assert set(pending) == {'RDTL, pending', 'R only, pending'}
    assert list(pending['RDTL, pending'].get_xdata()) == [16]
    assert _same_color(pending['RDTL, pending'].get_markeredgecolor(),
                       report_figures.DIRECTION_COLORS['real_to_synth'])
    # A pending baseline has no x: in the legend only, in R's colour.
    assert len(pending['R only, pending'].get_xdata()) == 0
    assert _same_color(pending['R only, pending'].get_markeredgecolor(),
                       report_figures.DOMAIN_COLORS['real'])
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert 'RDTL, pending' in legend and 'R only, pending' in legend


def test_augmentations_figure_marks_pending_runs(tmp_path, drawn):
    workdir = str(tmp_path / 'augmentations')
    runs = [_run('R_none', aug='none'), _run('S_none', domain='synth', aug='none')]
    _write_study(workdir, 'augmentations', 'digits', 'resnet50', runs,
                 {'R_none': _results(70.0, 88.0)})
    report.write_report(workdir)
    ax, = drawn['figure_augmentations.png'].axes
    pending, = [line for line in ax.get_lines() if _is_pending_marker(line, ax)]
    assert pending.get_label() == 'S only, pending'
    assert _same_color(pending.get_markeredgecolor(), report_figures.DOMAIN_COLORS['synth'])


def _analysis_result(train_a, train_b):
    """analysis.json's fields as analyze_outputs.write_outputs reads them, two layers."""
    def run(label, train_data):
        return {'label': label, 'workdir': f'/runs/{label}', 'model': 'resnet50',
                'train_data': train_data, 'top1_mean': 50.0}
    layers = [{'index': i, 'name': name, 'dim_a': 8, 'dim_b': 8, 'cka': 0.5,
               'probe_top1_a': 40.0, 'probe_top1_b': 60.0} for i, name in enumerate(('a', 'b'))]
    return {'a': run('S', train_a), 'b': run('R', train_b), 'eval_data': 'digits_real:val',
            'num_images': 100, 'num_classes': 10, 'resize': 32, 'crop': 32, 'seed': 0,
            'probe': {'kind': 'ridge', 'train_data': 'digits_real:train',
                      'num_train_images': 200, 'unconverged': []},
            'layers': layers}


def test_s_and_r_keep_their_colours_in_the_report_and_the_analysis(tmp_path, drawn):
    workdir = str(tmp_path / 'layers')
    runs = [_run('S', domain='synth'), _run('R'), _transfer('synth_to_real', 4)]
    _write_study(workdir, 'layers', 'digits', 'resnet50', runs,
                 {'S': _results(40.0, 80.0), 'R': _results(80.0, 95.0)})
    report.write_report(workdir)
    figure2, = drawn['figure2_layers.png'].axes
    analyze_outputs.write_outputs(_analysis_result('digits_synth', 'digits_real'),
                                  str(tmp_path / 'an'))
    probe, = drawn['probe.png'].axes
    for domain, label in (('synth', 'S'), ('real', 'R')):
        color = report_figures.DOMAIN_COLORS[domain]
        assert _same_color(_line(figure2, f'{label} only').get_color(), color)
        assert _same_color(_line(probe, f'{label} (digits_{domain})').get_color(), color)
    # CKA compares the two: it takes neither domain's colour.
    cka, = drawn['cka.png'].axes[0].get_lines()[:1]
    assert not any(_same_color(cka.get_color(), c) for c in report_figures.DOMAIN_COLORS.values())


def test_analysis_tells_apart_two_runs_of_one_domain(tmp_path, drawn):
    analyze_outputs.write_outputs(_analysis_result('digits_real', 'digits_real'), str(tmp_path))
    a, b = drawn['probe.png'].axes[0].get_lines()[:2]
    assert _same_color(a.get_color(), b.get_color())
    assert (a.get_linestyle(), a.get_marker()) != (b.get_linestyle(), b.get_marker())
