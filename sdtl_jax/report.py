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
from typing import Any, Sequence

import numpy as np
from absl import app, flags
from matplotlib import figure

from sdtl_jax import cli, fileio, metrics_io
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
DIRECTION_TITLES = {'synth_to_real': 'SDTL: pre-trained on S, layers >= N trained on R',
                    'real_to_synth': 'RDTL: pre-trained on R, layers >= N trained on S'}
DIRECTION_NAMES = {'synth_to_real': 'SDTL', 'real_to_synth': 'RDTL'}
# The colours of every figure, here and in analyze.py: one per training domain (S, R), and two
# others for the transfer curves.
DOMAIN_COLORS = {'synth': 'tab:green', 'real': 'tab:purple'}
DIRECTION_COLORS = {'synth_to_real': 'tab:blue', 'real_to_synth': 'tab:red'}
BASELINE_LABELS = {'synth': 'S only', 'real': 'R only'}
# Table 1's row names, in its order; an augmentation the paper lacks goes last, by its name.
AUG_NAMES = {'none': '', 'autoaugment': 'AutoAugment', 'pytorch': 'PyTorch Example',
             'augmix': 'AugMix', 'pixmix': 'PixMix', 'multicrop': 'DINO'}
PENDING = 'pending'
NOT_RECORDED = '–'


class NotAStudyError(FileNotFoundError):
    """The workdir has no study.json: the CLI turns this into a usage error, not a traceback."""


def fit_log2(divisors: Sequence[float], top1: Sequence[float]) -> tuple[float, float]:
    """Figure 3's fit: least squares, top-1 = a * log2(divisor) + b. Returns (a, b), rounded
    to 9 decimals: the solver's last bits differ between CPUs (BLAS kernels), and on Table 6a the
    exact slope is -2.225, so unrounded it printed -2.23 on one machine and -2.22 on another."""
    a, b = np.polyfit(np.log2(np.asarray(divisors, dtype=float)), np.asarray(top1, float), 1)
    return round(float(a), 9), round(float(b), 9)


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
        sections = _layers_tables(study['runs'], results, paper)
        _plot_layers(study, results, paper, figure_path)
    elif kind == 'data_reduction':
        sections, fits = _data_reduction_tables(study['runs'], results, paper)
        _plot_data_reduction(study, results, paper, fits, figure_path)
    else:
        sections = _augmentations_table(study['runs'], results, paper)
        _plot_augmentations(study, results, paper, figure_path)
    lines = _header(study, results, bool(paper)) + sections
    lines += ['', f'![{kind}]({FIGURES[kind]})', '']
    report_path = os.path.join(workdir, REPORT)
    fileio.write_text(report_path, '\n'.join(lines))
    # print, not metrics_io.say: say initializes JAX's backend, which would grab the
    # accelerator of a host where the study is still training.
    for series, (a, b) in fits.items():
        print(f'{series} fit: top-1 = {a:.3f} * log2(divisor) + {b:.3f}')
    print(f'Wrote {report_path} and {figure_path}')
    return {'report': report_path, 'figures': [figure_path], 'fits': fits}


# --- Markdown ---------------------------------------------------------------------------------

def _header(study, results, has_paper: bool) -> list[str]:
    done = [name for name, r in results.items() if r is not None]
    pending = [name for name, r in results.items() if r is None]
    hours = sum(results[name].get('wall_seconds') or 0 for name in done) / 3600
    lines = [f"# Study '{study['study']}': {study['dataset']}, {study['model']}", '',
             f'{len(done)} of {len(results)} runs finished ({hours:.1f} h wall time)'
             + (f'; pending: {", ".join(pending)}.' if pending else '.'),
             'Accuracy in %, on real evaluation images; mean ± std over the last evaluations.']
    if study['dataset'] == 'digits':
        lines.append('No paper columns: digits is the offline demo dataset, which the paper '
                     'does not use.')
    elif not has_paper:
        lines.append(f"No paper columns: the paper has no '{study['study']}' study on "
                     f"({study['dataset']}, {study['model']}).")
    return lines


def _stat(results: dict[str, Any] | None, key: str) -> tuple[float, float] | None:
    if results is None or results.get(f'{key}_mean') is None:
        return None
    return results[f'{key}_mean'], results[f'{key}_std'] or 0.0


def _pm(stat: Sequence[float] | None, digits: int) -> str:
    return NOT_RECORDED if stat is None else f'{stat[0]:.{digits}f} ± {stat[1]:.{digits}f}'


def _train_images(results: dict[str, Any]) -> str:
    count = results.get('train_examples')
    return NOT_RECORDED if count is None else f'{count:,}'


def _row(label: str, results: dict[str, Any] | None, paper_row: dict[str, Any] | None,
         with_paper: bool) -> str:
    """One table row: ours (or 'pending'), then the paper's top-1/top-5 and Δ top-1."""
    if results is None:
        cells = [PENDING] * 4
    else:
        cells = [_train_images(results), _pm(_stat(results, 'top1'), 1),
                 _pm(_stat(results, 'top5'), 1), _pm(_stat(results, 'train_loss'), 3)]
    if with_paper:
        if paper_row is None:
            cells += [NOT_RECORDED] * 3
        else:
            ours = _stat(results, 'top1')
            delta = NOT_RECORDED if ours is None else f'{ours[0] - paper_row["top1"][0]:+.1f}'
            cells += [_pm(paper_row['top1'], 1), _pm(paper_row['top5'], 1), delta]
    return '| ' + ' | '.join([label] + cells) + ' |'


def _table_head(first: str, with_paper: bool) -> list[str]:
    columns = [first, 'training images', 'top-1', 'top-5', 'train loss']
    if with_paper:
        columns += ['paper top-1', 'paper top-5', 'Δ top-1 (ours − paper)']
    return ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]


def _layers_tables(runs, results, paper) -> list[str]:
    """Tables 2-5: one table per direction, the baselines first, then one row per N."""
    baselines = {r['domain']: r['name'] for r in runs if r['kind'] == 'baseline'}
    lines = []
    for direction in DIRECTION_TITLES:
        transfers = sorted((r for r in runs if r.get('direction') == direction),
                           key=lambda r: r['num_frozen'])
        if not transfers:
            continue
        table = paper.get(direction)
        paper_rows = {row['num_frozen']: row for row in table['frozen']} if table else {}
        paper_baselines = {'synth': table['baselines']['synth_only'],
                           'real': table['baselines']['real_only']} if table else {}
        lines += ['', f'## {DIRECTION_TITLES[direction]}', '']
        lines += _table_head('layers frozen', bool(table))
        for domain, name in sorted(baselines.items(), key=lambda kv: kv[0] != 'synth'):
            lines.append(_row(BASELINE_LABELS[domain], results[name],
                              paper_baselines.get(domain), bool(table)))
        for r in transfers:
            n = r['num_frozen']
            lines.append(_row(f'N = {n}', results[r['name']], paper_rows.get(n), bool(table)))
    return lines


def divisor(fraction: float) -> int:
    """D of a real fraction 1/D (Table 6's x-axis; the data-reduction runs' names)."""
    return round(1 / fraction)


def _divisor(run: dict[str, Any]) -> int:
    return divisor(run['train_fraction'])


def _reduction_series(runs) -> dict[str, list[dict[str, Any]]]:
    """Table 6's two series, by divisor: SDTL (transfers) and R only (real baselines)."""
    series = {'synth_to_real': [r for r in runs if r['kind'] == 'transfer'],
              'real': [r for r in runs if r['kind'] == 'baseline' and r['domain'] == 'real']}
    return {k: sorted(v, key=_divisor) for k, v in series.items()}


def _finished_points(runs, results) -> tuple[list[int], list[float], list[float]]:
    """(divisors, top-1 means, top-1 stds) of the finished runs: what figures and fits use."""
    done = [(_divisor(r), _stat(results[r['name']], 'top1')) for r in runs]
    done = [(d, s) for d, s in done if s is not None]
    return [d for d, _ in done], [s[0] for _, s in done], [s[1] for _, s in done]


def _repeated_train_images(runs, results) -> list[str]:
    """Notes for finished fractions that trained on as many images as a larger fraction (a cap
    such as data.max_train_examples reached by both): their difference is noise, not data."""
    notes, seen = [], {}
    for r in runs:
        count = (results[r['name']] or {}).get('train_examples')
        if count is None:
            continue
        if count in seen:
            notes.append(f'- 1/{_divisor(r)} trained on the same {count:,} images as '
                         f'1/{seen[count]}: the fractions do not differ in data.')
        seen.setdefault(count, _divisor(r))
    return notes


def _fit_line(a: float, b: float) -> str:
    return f'top-1 = {a:.2f}·log2(divisor) {"+" if b >= 0 else "−"} {abs(b):.2f}'


def _data_reduction_tables(runs, results, paper):
    """Table 6a (SDTL), 6b (R only) and Figure 3's fit per series. Returns (lines, fits)."""
    titles = {'synth_to_real': 'SDTL: pre-trained on S, layers >= {n} trained on reduced R',
              'real': 'R only, reduced real data (no transfer)'}
    # The model every SDTL run takes its first N layers from, for reference.
    lines = [''] + [f'Source model {r["name"]} (all synthetic data, no transfer): top-1 '
                    + (_pm(_stat(results[r['name']], 'top1'), 1) if results[r['name']]
                       else PENDING)
                    for r in runs if r['kind'] == 'baseline' and r['domain'] == 'synth']
    fits = {}
    for name, series in _reduction_series(runs).items():
        if not series:
            continue
        table = paper.get(name)
        paper_rows = {row['divisor']: row for row in table} if table else {}
        lines += ['', f'## {titles[name].format(n=series[0]["num_frozen"])}', '']
        lines += _table_head('real fraction', bool(table))
        lines += [_row(f'1/{_divisor(r)}', results[r['name']], paper_rows.get(_divisor(r)),
                       bool(table)) for r in series]
        divisors, top1, _ = _finished_points(series, results)
        lines.append('')
        lines += _repeated_train_images(series, results)
        if len(set(divisors)) >= 2:
            fits[name] = fit_log2(divisors, top1)
            lines.append(f'- Fit, ours ({len(divisors)} points): {_fit_line(*fits[name])}')
        else:
            lines.append('- Fit, ours: needs two finished fractions.')
        if table:
            paper_fit = fit_log2([row['divisor'] for row in table],
                                 [row['top1'][0] for row in table])
            lines.append(f'- Fit, paper (of its table): {_fit_line(*paper_fit)}'
                         + ('; Figure 3 prints -2.23·log(x) + 85.61' if name == 'synth_to_real'
                            else ''))
    return lines, fits


def _aug_label(domain: str, aug: str) -> str:
    if aug == 'none':
        return 'Real Data Only (R)' if domain == 'real' else 'Synth. Data Only (S)'
    return f'{"R" if domain == "real" else "S"} + {AUG_NAMES.get(aug, aug)}'


def _aug_order(run: dict[str, Any]) -> tuple[bool, int]:
    known = list(AUG_NAMES)
    return run['domain'] != 'real', known.index(run['aug']) if run['aug'] in known else len(known)


def _augmentations_table(runs, results, paper) -> list[str]:
    """Table 1: the R rows, then the S rows, each in the paper's pipeline order."""
    table = paper.get('augmentations')
    paper_rows = {row['label']: row for row in table} if table else {}
    lines = ['', '## Augmentations (no transfer)', '']
    lines += _table_head('training data + augmentation', bool(table))
    for r in sorted(runs, key=_aug_order):
        label = _aug_label(r['domain'], r['aug'])
        lines.append(_row(label, results[r['name']], paper_rows.get(label), bool(table)))
    return lines


# --- Figures ----------------------------------------------------------------------------------
# Drawn on matplotlib.figure.Figure, not pyplot: savefig renders PNGs with Agg, and importing
# this module switches no global backend (a notebook that imports it keeps inline plots).

def _finish(ax, title: str, xlabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel('top-1 accuracy (%)')
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize='small')


def _mark_pending(ax, xs: Sequence[float], color: str, label: str, size: float = 8) -> None:
    """Pending runs as hollow markers on the x axis (they have an x but no top-1 yet); with no
    xs, a legend entry only."""
    ax.plot(xs, np.zeros(len(xs)), transform=ax.get_xaxis_transform(), ls='none', marker='o',
            ms=size, mfc='none', mec=color, mew=1.5, clip_on=False, zorder=3, label=label)


def _pending(runs, results) -> list[dict[str, Any]]:
    return [r for r in runs if results[r['name']] is None]


def _suffix(study, paper) -> str:
    return f"{study['dataset']}, {study['model']}" + (' (dashed: paper)' if paper else '')


def _plot_layers(study, results, paper, path: str) -> None:
    """Figure 2: top-1 against N for both directions, the baselines as mean ± std bands."""
    fig = figure.Figure(figsize=(8, 5), layout='constrained')
    ax = fig.subplots()
    for r in study['runs']:
        if r['kind'] != 'baseline':
            continue
        stat = _stat(results[r['name']], 'top1')
        color, label = DOMAIN_COLORS[r['domain']], BASELINE_LABELS[r['domain']]
        if results[r['name']] is None:
            _mark_pending(ax, [], color, f'{label}, pending')
        elif stat is not None:
            ax.axhspan(stat[0] - stat[1], stat[0] + stat[1], color=color, alpha=0.2)
            ax.axhline(stat[0], color=color, lw=1, label=label)
    for i, (direction, color) in enumerate(DIRECTION_COLORS.items()):
        transfers = [r for r in study['runs'] if r.get('direction') == direction]
        points = [(r['num_frozen'], _stat(results[r['name']], 'top1')) for r in transfers]
        points = sorted((n, s) for n, s in points if s is not None)
        if points:
            ax.errorbar([n for n, _ in points], [s[0] for _, s in points],
                        yerr=[s[1] for _, s in points], color=color, marker='o', capsize=3,
                        label=f'{DIRECTION_NAMES[direction]} ({direction.replace("_", " ")})')
        pending = [r['num_frozen'] for r in _pending(transfers, results)]
        if pending:
            # Rings of two sizes: both directions pending at one N stay visible.
            _mark_pending(ax, pending, color, f'{DIRECTION_NAMES[direction]}, pending',
                          size=11 - 4 * i)
        if direction in paper:
            rows = paper[direction]['frozen']
            ax.plot([row['num_frozen'] for row in rows], [row['top1'][0] for row in rows],
                    color=color, ls='--', lw=1, label=f'paper, {DIRECTION_NAMES[direction]}')
    if paper:   # both of the paper's directions list the same baselines
        baselines = next(iter(paper.values()))['baselines']
        for domain, key in (('synth', 'synth_only'), ('real', 'real_only')):
            ax.axhline(baselines[key]['top1'][0], color=DOMAIN_COLORS[domain], ls='--', lw=1,
                       label=f'paper, {BASELINE_LABELS[domain]}')
    # A tick at each N of the study: N counts layers, and a locator puts fractional ticks around
    # a single N.
    ax.set_xticks(sorted({r['num_frozen'] for r in study['runs'] if r.get('direction')}))
    _finish(ax, f'Top-1 against layers frozen: {_suffix(study, paper)}',
            'N, layers frozen (layers 0 .. N-1 taken over from the source model)')
    fileio.save_figure(fig, path, dpi=120)


def _plot_data_reduction(study, results, paper, fits, path: str) -> None:
    """Figure 3: top-1 against the real fraction (linear) and its divisor (log2), with fits."""
    fig = figure.Figure(figsize=(12, 5), layout='constrained')
    axes = fig.subplots(1, 2)
    labels = {'synth_to_real': 'SDTL', 'real': 'R only'}
    colors = {'synth_to_real': DIRECTION_COLORS['synth_to_real'], 'real': DOMAIN_COLORS['real']}
    for ax, to_x in zip(axes, (lambda d: 1 / np.asarray(d, float), lambda d: d)):
        for name, series in _reduction_series(study['runs']).items():
            divisors, mean, std = _finished_points(series, results)
            if divisors:
                ax.errorbar(to_x(divisors), mean, yerr=std, color=colors[name], marker='o',
                            ls='none', capsize=3, label=labels[name])
            pending = [_divisor(r) for r in _pending(series, results)]
            if pending:
                _mark_pending(ax, to_x(pending), colors[name], f'{labels[name]}, pending')
            if name in fits:
                grid = np.geomspace(min(divisors), max(divisors), 100)
                ax.plot(to_x(grid), fits[name][0] * np.log2(grid) + fits[name][1],
                        color=colors[name], lw=1, label=f'{labels[name]} fit: '
                        + _fit_line(*fits[name]))
            if name in paper:
                rows = paper[name]
                ax.plot(to_x([row['divisor'] for row in rows]), [row['top1'][0] for row in rows],
                        color=colors[name], ls='--', lw=1, marker='x',
                        label=f'paper, {labels[name]}')
    axes[1].set_xscale('log', base=2)
    _finish(axes[0], 'Top-1 against the fraction of real data',
            'fraction of the real training data (linear)')
    _finish(axes[1], 'Top-1 against the real-data divisor',
            'divisor x: 1/x of the real training data (log2 axis)')
    fig.suptitle(f'Data reduction: {_suffix(study, paper)}')
    fileio.save_figure(fig, path, dpi=120)


def _plot_augmentations(study, results, paper, path: str) -> None:
    """Table 1 as grouped bars: top-1 per pipeline, R and S side by side."""
    runs = sorted(study['runs'], key=_aug_order)
    augs = list(dict.fromkeys(r['aug'] for r in runs))
    paper_rows = {row['label']: row for row in paper.get('augmentations', [])}
    fig = figure.Figure(figsize=(max(6, 1.4 * len(augs)), 5), layout='constrained')
    ax = fig.subplots()
    width = 0.38
    for offset, domain in ((-width / 2, 'real'), (width / 2, 'synth')):
        points = [(augs.index(r['aug']), _stat(results[r['name']], 'top1'), r) for r in runs
                  if r['domain'] == domain]
        done = [(i, s) for i, s, _ in points if s is not None]
        if done:
            ax.bar([i + offset for i, _ in done], [s[0] for _, s in done], width,
                   yerr=[s[1] for _, s in done], capsize=3, color=DOMAIN_COLORS[domain],
                   label=BASELINE_LABELS[domain])
        pending = [i + offset for i, _, r in points if results[r['name']] is None]
        if pending:
            _mark_pending(ax, pending, DOMAIN_COLORS[domain],
                          f'{BASELINE_LABELS[domain]}, pending')
        ours_paper = [(i, paper_rows[_aug_label(domain, r['aug'])]['top1'][0])
                      for i, _, r in points if _aug_label(domain, r['aug']) in paper_rows]
        if ours_paper:
            ax.plot([i + offset for i, _ in ours_paper], [v for _, v in ours_paper], ls='none',
                    marker='_', markersize=22, mew=2, color='black',
                    label='paper' if domain == 'real' else None)
    ax.set_xticks(range(len(augs)), [AUG_NAMES.get(a) or 'none' for a in augs])
    _finish(ax, f'Top-1 per augmentation pipeline: {study["dataset"]}, {study["model"]}',
            'augmentation pipeline (training data: R real, S synthetic)')
    fileio.save_figure(fig, path, dpi=120)


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
