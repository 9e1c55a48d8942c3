r"""The study report: report.md and figures, rebuilt at any time from a study workdir.

  python -m sdtl_jax.report --workdir=DIR

reads DIR/study.json (written by `study.py`) and each finished run's DIR/<run>/results.json.
A run without results.json is pending, so the report can be rewritten while a study is still
running: 'pending' in the tables, left out of the fits, and in the figures a hollow marker on the
x axis at the run's x position (it has no top-1 yet; a pending baseline of Figure 2, which has
no x, appears in the legend only). Each table gives the number of images a run trained on
(results.json's `train_examples`), so fractions that end up with the same images show. Where
the study is the paper's own setting, the paper's numbers (reference/paper_tables.json) stand
beside ours:

- layers on (imagenet100, resnet50): Tables 2-3 and Figure 2; on (pets, tinyvit_5m): Tables 4-5;
- data_reduction on (imagenet100, resnet50): Tables 6a-6b and Figure 3's fit;
- augmentations on (imagenet100, resnet50): Table 1.
"""

from __future__ import annotations

import os
from typing import Any

from absl import app, flags

from sdtl_jax import cli, fileio, metrics_io, report_figures, report_tables
from sdtl_jax.data import sources

MANIFEST = 'study.json'
REPORT = 'report.md'
FIGURES = {'layers': 'figure2_layers.png', 'data_reduction': 'figure3_data_reduction.png',
           'augmentations': 'figure_augmentations.png'}
# (study, dataset, model) -> {series: key in paper_tables.json}.
PAPER_TABLES = {
    ('layers', 'imagenet100', 'resnet50'): {
        'synth_to_real': 'table2_synth_to_real_imagenet100_resnet50',
        'real_to_synth': 'table3_real_to_synth_imagenet100_resnet50'},
    ('layers', 'pets', 'tinyvit_5m'): {
        'synth_to_real': 'table4_synth_to_real_pets_tinyvit5m',
        'real_to_synth': 'table5_real_to_synth_pets_tinyvit5m'},
    ('data_reduction', 'imagenet100', 'resnet50'): {
        'synth_to_real': 'table6a_data_reduction_sdtl_16_frozen',
        'real': 'table6b_data_reduction_real_only'},
    ('augmentations', 'imagenet100', 'resnet50'): {
        'augmentations': 'table1_augmentations_imagenet100_resnet50'},
}


class NotAStudyError(FileNotFoundError):
    """The workdir has no study.json: the CLI turns this into a usage error, not a traceback."""


def load_study(workdir: str) -> tuple[dict[str, Any], dict[str, dict[str, Any] | None]]:
    """study.json, and each run's results.json by run name (None while the run is pending)."""
    path = os.path.join(workdir, MANIFEST)
    if not fileio.exists(path):
        raise NotAStudyError(
            f'{workdir} is not a study workdir: no {MANIFEST}; run `python -m sdtl_jax.main '
            f'--config=configs/study/layers.py:demo --workdir={workdir}` first')
    study = metrics_io.read_json(path)
    results = {}
    for run in study['runs']:
        run_results = os.path.join(workdir, run['name'], 'results.json')
        results[run['name']] = (metrics_io.read_json(run_results)
                                if fileio.exists(run_results) else None)
    return study, results


def paper_tables(study: dict[str, Any]) -> dict[str, Any]:
    """The paper's tables for this study's setting; {} where the paper has none."""
    keys = PAPER_TABLES.get((study['study'], study['dataset'], study['model']), {})
    if not keys:
        return {}
    tables = sources.load_reference('paper_tables.json')
    return {series: tables[key] for series, key in keys.items()}


def write_report(workdir: str) -> dict[str, Any]:
    """Writes <workdir>/report.md and the study's figure from what has finished so far.

    Returns {'report': path, 'figures': [paths], 'fits': {series: (a, b)}}; fits are the
    data-reduction study's (series 'synth_to_real' and 'real'), {} for other studies.
    """
    study, results = load_study(workdir)
    paper = paper_tables(study)
    kind = study['study']
    if kind not in FIGURES:
        raise ValueError(f'{workdir}/{MANIFEST} has study {kind!r}; allowed: {list(FIGURES)}')
    figure_path = os.path.join(workdir, FIGURES[kind])
    fits = {}
    if kind == 'layers':
        sections = report_tables.layers_tables(study['runs'], results, paper)
        report_figures.plot_layers(study, results, paper, figure_path)
    elif kind == 'data_reduction':
        sections, fits = report_tables.data_reduction_tables(study['runs'], results, paper)
        report_figures.plot_data_reduction(study, results, paper, fits, figure_path)
    else:
        sections = report_tables.augmentations_table(study['runs'], results, paper)
        report_figures.plot_augmentations(study, results, paper, figure_path)
    lines = report_tables.header(study, results, bool(paper)) + sections
    lines += ['', f'![{kind}]({FIGURES[kind]})', '']
    report_path = os.path.join(workdir, REPORT)
    fileio.write_text(report_path, '\n'.join(lines))
    # print, not metrics_io.say: say initializes JAX's backend, which would grab the
    # accelerator of a host where the study is still training.
    for series, (a, b) in fits.items():
        print(f'{series} fit: top-1 = {a:.3f} * log2(divisor) + {b:.3f}')
    print(f'Wrote {report_path} and {figure_path}')
    return {'report': report_path, 'figures': [figure_path], 'fits': fits}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    try:
        write_report(flags.FLAGS.workdir)
    except NotAStudyError as err:
        raise app.UsageError(str(err)) from err


if __name__ == '__main__':
    # Defined here, not at import: main.py defines --workdir too, and study.py imports this
    # module inside main.py's process.
    flags.DEFINE_string('workdir', None, 'The study workdir (holds study.json).', required=True)
    app.run(main, flags_parser=cli.parse_flags)
