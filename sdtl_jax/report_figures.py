"""The study report's figures: Figure 2 (layers), Figure 3 (data reduction), Table 1 as bars.

`report.write_report` draws its study's figure with one of these. A figure reads the runs through
report_tables.py's helpers (stat, reduction_series, fit_line, aug_label, ...): it shows what its
table lists. A pending run is a hollow marker on the x axis at its x (it has no top-1 yet); a
pending baseline of Figure 2, which has no x, appears in the legend only.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from matplotlib import figure

from sdtl_jax import fileio
from sdtl_jax import report_tables as tables

# The colours of every figure, here and in analyze_outputs.py: one per training domain (S, R),
# and two others for the transfer curves.
DOMAIN_COLORS = {'synth': 'tab:green', 'real': 'tab:purple'}
DIRECTION_COLORS = {'synth_to_real': 'tab:blue', 'real_to_synth': 'tab:red'}
DIRECTION_NAMES = {'synth_to_real': 'SDTL', 'real_to_synth': 'RDTL'}


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


def plot_layers(study, results, paper, path: str) -> None:
    """Figure 2: top-1 against N for both directions, the baselines as mean ± std bands."""
    fig = figure.Figure(figsize=(8, 5), layout='constrained')
    ax = fig.subplots()
    for r in study['runs']:
        if r['kind'] != 'baseline':
            continue
        stat = tables.stat(results[r['name']], 'top1')
        color, label = DOMAIN_COLORS[r['domain']], tables.BASELINE_LABELS[r['domain']]
        if results[r['name']] is None:
            _mark_pending(ax, [], color, f'{label}, pending')
        elif stat is not None:
            ax.axhspan(stat[0] - stat[1], stat[0] + stat[1], color=color, alpha=0.2)
            ax.axhline(stat[0], color=color, lw=1, label=label)
    for i, (direction, color) in enumerate(DIRECTION_COLORS.items()):
        transfers = [r for r in study['runs'] if r.get('direction') == direction]
        points = [(r['num_frozen'], tables.stat(results[r['name']], 'top1')) for r in transfers]
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
                       label=f'paper, {tables.BASELINE_LABELS[domain]}')
    # A tick at each N of the study: N counts layers, and a locator puts fractional ticks around
    # a single N.
    ax.set_xticks(sorted({r['num_frozen'] for r in study['runs'] if r.get('direction')}))
    _finish(ax, f'Top-1 against layers frozen: {_suffix(study, paper)}',
            'N, layers frozen (layers 0 .. N-1 taken over from the source model)')
    fileio.save_figure(fig, path, dpi=120)


def plot_data_reduction(study, results, paper, fits, path: str) -> None:
    """Figure 3: top-1 against the real fraction (linear) and its divisor (log2), with fits."""
    fig = figure.Figure(figsize=(12, 5), layout='constrained')
    axes = fig.subplots(1, 2)
    labels = {'synth_to_real': 'SDTL', 'real': 'R only'}
    colors = {'synth_to_real': DIRECTION_COLORS['synth_to_real'], 'real': DOMAIN_COLORS['real']}
    for ax, to_x in zip(axes, (lambda d: 1 / np.asarray(d, float), lambda d: d)):
        for name, series in tables.reduction_series(study['runs']).items():
            divisors, mean, std = tables.finished_points(series, results)
            if divisors:
                ax.errorbar(to_x(divisors), mean, yerr=std, color=colors[name], marker='o',
                            ls='none', capsize=3, label=labels[name])
            pending = [tables.run_divisor(r) for r in _pending(series, results)]
            if pending:
                _mark_pending(ax, to_x(pending), colors[name], f'{labels[name]}, pending')
            if name in fits:
                grid = np.geomspace(min(divisors), max(divisors), 100)
                ax.plot(to_x(grid), fits[name][0] * np.log2(grid) + fits[name][1],
                        color=colors[name], lw=1, label=f'{labels[name]} fit: '
                        + tables.fit_line(*fits[name]))
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


def plot_augmentations(study, results, paper, path: str) -> None:
    """Table 1 as grouped bars: top-1 per pipeline, R and S side by side."""
    runs = sorted(study['runs'], key=tables.aug_order)
    augs = list(dict.fromkeys(r['aug'] for r in runs))
    paper_rows = {row['label']: row for row in paper.get('augmentations', [])}
    fig = figure.Figure(figsize=(max(6, 1.4 * len(augs)), 5), layout='constrained')
    ax = fig.subplots()
    width = 0.38
    for offset, domain in ((-width / 2, 'real'), (width / 2, 'synth')):
        points = [(augs.index(r['aug']), tables.stat(results[r['name']], 'top1'), r) for r in runs
                  if r['domain'] == domain]
        done = [(i, s) for i, s, _ in points if s is not None]
        if done:
            ax.bar([i + offset for i, _ in done], [s[0] for _, s in done], width,
                   yerr=[s[1] for _, s in done], capsize=3, color=DOMAIN_COLORS[domain],
                   label=tables.BASELINE_LABELS[domain])
        pending = [i + offset for i, _, r in points if results[r['name']] is None]
        if pending:
            _mark_pending(ax, pending, DOMAIN_COLORS[domain],
                          f'{tables.BASELINE_LABELS[domain]}, pending')
        ours_paper = [(i, paper_rows[tables.aug_label(domain, r['aug'])]['top1'][0])
                      for i, _, r in points if tables.aug_label(domain, r['aug']) in paper_rows]
        if ours_paper:
            ax.plot([i + offset for i, _ in ours_paper], [v for _, v in ours_paper], ls='none',
                    marker='_', markersize=22, mew=2, color='black',
                    label='paper' if domain == 'real' else None)
    ax.set_xticks(range(len(augs)), [tables.AUG_NAMES.get(a) or 'none' for a in augs])
    _finish(ax, f'Top-1 per augmentation pipeline: {study["dataset"]}, {study["model"]}',
            'augmentation pipeline (training data: R real, S synthetic)')
    fileio.save_figure(fig, path, dpi=120)
