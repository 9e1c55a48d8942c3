"""The study report's markdown: a header and each study's tables, ours beside the paper's.

The helpers that read the runs (stat, divisor, reduction_series, finished_points, fit_line,
aug_label, aug_order) serve `report_figures.py` too: a figure shows what its table says.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

DIRECTION_TITLES = {'synth_to_real': 'SDTL: pre-trained on S, layers >= N trained on R',
                    'real_to_synth': 'RDTL: pre-trained on R, layers >= N trained on S'}


BASELINE_LABELS = {'synth': 'S only', 'real': 'R only'}


# Table 1's row names, in its order; an augmentation the paper lacks goes last, by its name.
AUG_NAMES = {'none': '', 'autoaugment': 'AutoAugment', 'pytorch': 'PyTorch Example',
             'augmix': 'AugMix', 'pixmix': 'PixMix', 'multicrop': 'DINO'}


PENDING = 'pending'


NOT_RECORDED = '–'


def fit_log2(divisors: Sequence[float], top1: Sequence[float]) -> tuple[float, float]:
    """Figure 3's fit: least squares, top-1 = a * log2(divisor) + b. Returns (a, b), rounded
    to 9 decimals: the solver's last bits differ between CPUs (BLAS kernels), and on Table 6a the
    exact slope is -2.225, so unrounded it printed -2.23 on one machine and -2.22 on another."""
    a, b = np.polyfit(np.log2(np.asarray(divisors, dtype=float)), np.asarray(top1, float), 1)
    return round(float(a), 9), round(float(b), 9)


def header(study, results, has_paper: bool) -> list[str]:
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


def stat(results: dict[str, Any] | None, key: str) -> tuple[float, float] | None:
    """(mean, std) of `key` in a run's results.json; None while pending or not recorded."""
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
        cells = [_train_images(results), _pm(stat(results, 'top1'), 1),
                 _pm(stat(results, 'top5'), 1), _pm(stat(results, 'train_loss'), 3)]
    if with_paper:
        if paper_row is None:
            cells += [NOT_RECORDED] * 3
        else:
            ours = stat(results, 'top1')
            delta = NOT_RECORDED if ours is None else f'{ours[0] - paper_row["top1"][0]:+.1f}'
            cells += [_pm(paper_row['top1'], 1), _pm(paper_row['top5'], 1), delta]
    return '| ' + ' | '.join([label] + cells) + ' |'


def _table_head(first: str, with_paper: bool) -> list[str]:
    columns = [first, 'training images', 'top-1', 'top-5', 'train loss']
    if with_paper:
        columns += ['paper top-1', 'paper top-5', 'Δ top-1 (ours − paper)']
    return ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]


def layers_tables(runs, results, paper) -> list[str]:
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


def run_divisor(run: dict[str, Any]) -> int:
    """divisor() of a study.json run's train_fraction."""
    return divisor(run['train_fraction'])


def reduction_series(runs) -> dict[str, list[dict[str, Any]]]:
    """Table 6's two series, by divisor: SDTL (transfers) and R only (real baselines)."""
    series = {'synth_to_real': [r for r in runs if r['kind'] == 'transfer'],
              'real': [r for r in runs if r['kind'] == 'baseline' and r['domain'] == 'real']}
    return {k: sorted(v, key=run_divisor) for k, v in series.items()}


def finished_points(runs, results) -> tuple[list[int], list[float], list[float]]:
    """(divisors, top-1 means, top-1 stds) of the finished runs: what figures and fits use."""
    done = [(run_divisor(r), stat(results[r['name']], 'top1')) for r in runs]
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
            notes.append(f'- 1/{run_divisor(r)} trained on the same {count:,} images as '
                         f'1/{seen[count]}: the fractions do not differ in data.')
        seen.setdefault(count, run_divisor(r))
    return notes


def fit_line(a: float, b: float) -> str:
    """A fit_log2 fit as the tables and the figure's legend print it."""
    return f'top-1 = {a:.2f}·log2(divisor) {"+" if b >= 0 else "−"} {abs(b):.2f}'


def data_reduction_tables(runs, results, paper):
    """Table 6a (SDTL), 6b (R only) and Figure 3's fit per series. Returns (lines, fits)."""
    titles = {'synth_to_real': 'SDTL: pre-trained on S, layers >= {n} trained on reduced R',
              'real': 'R only, reduced real data (no transfer)'}
    # The model every SDTL run takes its first N layers from, for reference.
    lines = [''] + [f'Source model {r["name"]} (all synthetic data, no transfer): top-1 '
                    + (_pm(stat(results[r['name']], 'top1'), 1) if results[r['name']]
                       else PENDING)
                    for r in runs if r['kind'] == 'baseline' and r['domain'] == 'synth']
    fits = {}
    for name, series in reduction_series(runs).items():
        if not series:
            continue
        table = paper.get(name)
        paper_rows = {row['divisor']: row for row in table} if table else {}
        lines += ['', f'## {titles[name].format(n=series[0]["num_frozen"])}', '']
        lines += _table_head('real fraction', bool(table))
        lines += [_row(f'1/{run_divisor(r)}', results[r['name']],
                       paper_rows.get(run_divisor(r)), bool(table)) for r in series]
        divisors, top1, _ = finished_points(series, results)
        lines.append('')
        lines += _repeated_train_images(series, results)
        if len(set(divisors)) >= 2:
            fits[name] = fit_log2(divisors, top1)
            lines.append(f'- Fit, ours ({len(divisors)} points): {fit_line(*fits[name])}')
        else:
            lines.append('- Fit, ours: needs two finished fractions.')
        if table:
            paper_fit = fit_log2([row['divisor'] for row in table],
                                 [row['top1'][0] for row in table])
            lines.append(f'- Fit, paper (of its table): {fit_line(*paper_fit)}'
                         + ('; Figure 3 prints -2.23·log(x) + 85.61' if name == 'synth_to_real'
                            else ''))
    return lines, fits


def aug_label(domain: str, aug: str) -> str:
    """A run's row name in Table 1 (the paper's, where it has the row)."""
    if aug == 'none':
        return 'Real Data Only (R)' if domain == 'real' else 'Synth. Data Only (S)'
    return f'{"R" if domain == "real" else "S"} + {AUG_NAMES.get(aug, aug)}'


def aug_order(run: dict[str, Any]) -> tuple[bool, int]:
    """Sort key of Table 1: R before S, then the paper's pipeline order."""
    known = list(AUG_NAMES)
    return run['domain'] != 'real', known.index(run['aug']) if run['aug'] in known else len(known)


def augmentations_table(runs, results, paper) -> list[str]:
    """Table 1: the R rows, then the S rows, each in the paper's pipeline order."""
    table = paper.get('augmentations')
    paper_rows = {row['label']: row for row in table} if table else {}
    lines = ['', '## Augmentations (no transfer)', '']
    lines += _table_head('training data + augmentation', bool(table))
    for r in sorted(runs, key=aug_order):
        label = aug_label(r['domain'], r['aug'])
        lines.append(_row(label, results[r['name']], paper_rows.get(label), bool(table)))
    return lines
