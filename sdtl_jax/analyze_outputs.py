"""`analyze.py`'s outputs from its result (analysis.json's dict): the per-layer Markdown table,
analysis.md, and the CKA and probe plots.

Files only: no JAX, no models; matplotlib is imported when a plot is drawn.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from sdtl_jax import fileio
from sdtl_jax.data import sources

FILES = ('analysis.json', 'analysis.md', 'cka.png', 'probe.png')


def _fmt(value: float | None, digits: int) -> str:
    return '-' if value is None else f'{value:.{digits}f}'


def table(result: dict[str, Any]) -> str:
    """The per-layer Markdown table (also what the CLI prints)."""
    a, b = result['a']['label'], result['b']['label']
    lines = [f'| # | layer | dim {a} / {b} | CKA({a}, {b}) | probe {a} top-1 (%) | '
             f'probe {b} top-1 (%) |', '|---:|---|---:|---:|---:|---:|']
    for layer in result['layers']:
        lines.append(f"| {layer['index']} | {layer['name']} | {layer['dim_a']} / "
                     f"{layer['dim_b']} | {_fmt(layer['cka'], 3)} | "
                     f"{_fmt(layer['probe_top1_a'], 1)} | {_fmt(layer['probe_top1_b'], 1)} |")
    return '\n'.join(lines)


def markdown(result: dict[str, Any]) -> str:
    a, b, probe = result['a'], result['b'], result['probe']

    def run_line(key, run):
        top1 = '' if run['top1_mean'] is None else f", its own top-1 {run['top1_mean']:.2f}%"
        return (f"- {key} = `{run['label']}`: {run['workdir']} ({run['model']} trained on "
                f"{run['train_data']}{top1})")

    lines = [f"# Layer by layer: {a['label']} against {b['label']}", '',
             run_line('A', a), run_line('B', b),
             f"- Images: {result['num_images']:,} of {result['eval_data']} (resize "
             f"{result['resize']}, centre crop {result['crop']}), the same for both models; "
             'each layer output averaged over its spatial axes.']
    if probe:
        lines.append(f"- Probes: {probe['kind']} on standardised features, fit on "
                     f"{probe['num_train_images']:,} images of {probe['train_data']}, top-1 "
                     f"on the images above (chance {100 / result['num_classes']:.1f}%).")
        if probe['unconverged']:
            lines.append(f"- Not converged (stopped at the iteration limit): "
                         f"{', '.join(probe['unconverged'])}.")
    else:
        lines.append('- Probes: skipped (--probe_train_images=0).')
    lines += ['', table(result), '']
    scored = [layer for layer in result['layers'] if layer['cka'] is not None]
    if scored:
        low = min(scored, key=lambda layer: layer['cka'])
        lines += [f"Lowest CKA: layer {low['index']} `{low['name']}` ({low['cka']:.3f}).", '']
    lines += ['![CKA per layer](cka.png)', '', '![Probe top-1 per layer](probe.png)', '']
    return '\n'.join(lines)


# Line style and marker of series A, then B: they tell the runs apart where both trained on one
# domain, and so have one colour.
_SERIES_STYLES = (('-', 'o'), ('--', 's'))


# Drawn on matplotlib.figure.Figure (Agg on savefig), as in report_figures.py: no global
# backend switch.
def _plot(result: dict[str, Any], path: str, series: Sequence[tuple[str, str, str]],
          ylabel: str, title: str, hline: tuple[float, str] | None = None,
          ylim: tuple[float, float] | None = None) -> None:
    from matplotlib import figure

    names = [layer['name'] for layer in result['layers']]
    fig = figure.Figure(figsize=(max(8, 0.5 * len(names)), 5), layout='constrained')
    ax = fig.subplots()
    for (key, label, color), (style, marker) in zip(series, _SERIES_STYLES):
        values = [np.nan if layer[key] is None else layer[key] for layer in result['layers']]
        ax.plot(range(len(names)), values, ls=style, marker=marker, color=color, label=label)
    if hline:
        ax.axhline(hline[0], color='gray', ls='--', lw=1, label=hline[1])
    ax.set_xticks(range(len(names)), [f'{i} {name}' for i, name in enumerate(names)],
                  rotation=60, ha='right', fontsize='small')
    ax.set_xlabel('layer (index and name, in forward order)')
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize='small')
    fileio.save_figure(fig, path, dpi=120)


def _domain_color(run: dict[str, Any]) -> str:
    """The colour of the run's training domain (S or R), the same as in the study report."""
    from sdtl_jax import report_figures  # imports matplotlib, which only the plots need

    return report_figures.DOMAIN_COLORS[sources.get(run['train_data']).domain]


def write_outputs(result: dict[str, Any], out: str) -> None:
    """analysis.json, analysis.md, cka.png, probe.png into `out`."""
    fileio.makedirs(out)
    fileio.write_json(os.path.join(out, 'analysis.json'), result)
    fileio.write_text(os.path.join(out, 'analysis.md'), markdown(result))
    a, b = result['a']['label'], result['b']['label']
    where = f"{result['a']['model']}, {result['num_images']:,} images of {result['eval_data']}"
    # Black: CKA belongs to neither domain.
    _plot(result, os.path.join(out, 'cka.png'), [('cka', f'CKA({a}, {b})', 'black')],
          'linear CKA (unitless, 0 to 1)',
          f'Linear CKA of {a} and {b} per layer (1 = same features up to rotation and '
          f'scale)\n{where}', ylim=(0, 1.05))
    probe = result['probe']
    kind = probe['kind'] if probe else 'no'
    _plot(result, os.path.join(out, 'probe.png'),
          [('probe_top1_a', f'{a} ({result["a"]["train_data"]})', _domain_color(result['a'])),
           ('probe_top1_b', f'{b} ({result["b"]["train_data"]})', _domain_color(result['b']))],
          'linear-probe top-1 on the real images (%)',
          f'{kind.capitalize()} probe per layer: {where}',
          hline=(100 / result['num_classes'], 'chance'), ylim=(0, 100))
