"""Tables and figures of an ablation from its result rows (see `ablation_lib`)."""

import collections
import os

import numpy as np

from experiments import ablation_lib as lib

LABELS = {'fd': 'FD vs test digits', 'sw': 'sliced Wasserstein vs exact'}


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path):
  tmp = f'{path}.tmp'
  fig.savefig(tmp, format='png', dpi=110)
  os.replace(tmp, path)
  _plt().close(fig)


def results_table(rows: list[dict], metric: str) -> str:
  """Markdown: objective x (sampler, NFE) -> metric mean +- std over seeds, the best sampler
  per objective at each NFE budget, and the floor."""
  by = collections.defaultdict(list)
  for r in rows:
    by[(r['objective'], r['sampler'], r['nfe'])].append(r.get(metric))
  objectives = list(dict.fromkeys(r['objective'] for r in rows))
  cols = sorted({(r['sampler'], r['nfe']) for r in rows})
  seeds = sorted({r['seed'] for r in rows})
  lines = [f'{LABELS.get(metric, metric)}, {len(seeds)} seed(s) {seeds}: '
           f'mean{" ± std" if len(seeds) > 1 else ""} (lower is better; NFE exact)', '',
           '| objective | ' + ' | '.join(f'{s} {n}' for s, n in cols) + ' |',
           '|---|' + '---|' * len(cols)]
  for o in objectives:
    cells = [lib.mean_std(by[(o, s, n)]) if (o, s, n) in by else '' for s, n in cols]
    lines.append(f'| {o} | ' + ' | '.join(cells) + ' |')

  budgets = sorted({r['nfe_budget'] for r in rows})
  lines += ['', 'Best sampler per objective at each NFE budget (mean over seeds; a sampler '
            'non-finite on any seed is left out):', '',
            '| objective | ' + ' | '.join(f'NFE ≤ {b}' for b in budgets) + ' |',
            '|---|' + '---|' * len(budgets)]
  for o in objectives:
    cells = []
    for b in budgets:
      cands = collections.defaultdict(list)
      for r in rows:
        if r['objective'] == o and r['nfe_budget'] == b:
          v = r.get(metric)
          cands[r['sampler']].append(np.nan if v is None else v)
      # A sampler that diverged on any seed is not a candidate for the best.
      cands = {s: v for s, v in cands.items() if np.all(np.isfinite(v))}
      if cands:
        s, v = min(((s, float(np.mean(v))) for s, v in cands.items()), key=lambda sv: sv[1])
        cells.append(f'{v:.3g} ({s})')
      else:
        cells.append('')
    lines.append(f'| {o} | ' + ' | '.join(cells) + ' |')
  floors = [r[f'{metric}_floor'] for r in rows if f'{metric}_floor' in r]
  if floors:
    lines += ['', f'Floor (real data against the reference, same n): {np.mean(floors):.3g}.']
  return '\n'.join(lines) + '\n'


def pivot(rows, row_key, col_key, metric, title='', show=None) -> str:
  """A Markdown table of `metric` (mean +- std over repeats) by `row_key` x `col_key`; with
  `show`, each cell also gives that field (e.g. the exact NFE)."""
  by = collections.defaultdict(list)
  extra = {}
  for r in rows:
    by[(r[row_key], r[col_key])].append(r.get(metric))
    if show:
      extra[(r[row_key], r[col_key])] = r.get(show)
  row_names = list(dict.fromkeys(r[row_key] for r in rows))
  cols = sorted({r[col_key] for r in rows})
  lines = ([title, ''] if title else []) + [
      f'| {row_key} | ' + ' | '.join(f'{col_key} {c}' for c in cols) + ' |',
      '|---|' + '---|' * len(cols)]
  for name in row_names:
    cells = []
    for c in cols:
      if (name, c) not in by:
        cells.append('')
        continue
      cell = lib.mean_std(by[(name, c)])
      cells.append(f'{cell} ({extra[(name, c)]})' if show else cell)
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  floors = [r[f'{metric}_floor'] for r in rows if f'{metric}_floor' in r]
  if floors:
    lines += ['', f'Floor (real data against the reference, same n): {np.mean(floors):.3g}.']
  return '\n'.join(lines) + '\n'


def metric_vs_nfe(rows, metric, path):
  plt = _plt()
  samplers = list(dict.fromkeys(r['sampler'] for r in rows))
  fig, axes = plt.subplots(1, len(samplers), figsize=(3.4 * len(samplers), 3.2), squeeze=False)
  for ax, s in zip(axes[0], samplers, strict=True):
    by = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in rows:
      if r['sampler'] == s:
        by[r['objective']][r['nfe']].append(r[metric])
    for o, pts in by.items():
      n = sorted(pts)
      ax.plot(n, [np.mean(pts[k]) for k in n], 'o-', label=o)
    floors = [r[f'{metric}_floor'] for r in rows if f'{metric}_floor' in r]
    if floors:
      ax.axhline(np.mean(floors), color='0.5', ls='--', lw=1, label='floor')
    ax.set(xscale='log', yscale='log', xlabel='NFE', title=s)
    _integer_ticks(ax, sorted({r['nfe'] for r in rows if r['sampler'] == s}))
    ax.set_ylabel(LABELS.get(metric, metric))
    ax.legend(fontsize=7)
  fig.tight_layout()
  _save(fig, path)


def _integer_ticks(ax, values):
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  ax.xaxis.set_major_locator(ticker.FixedLocator(values))
  ax.xaxis.set_major_formatter(ticker.FixedFormatter([str(v) for v in values]))
  ax.xaxis.set_minor_locator(ticker.NullLocator())


def metric_vs_step(curve, metric, path):
  plt = _plt()
  fig, ax = plt.subplots(figsize=(4.5, 3.4))
  by = collections.defaultdict(lambda: collections.defaultdict(list))
  for r in curve:
    by[(r['objective'], r['sampler'], r['nfe'])][r['step']].append(r[metric])
  for (o, s, n), pts in by.items():
    steps = sorted(pts)
    ax.plot(steps, [np.mean(pts[k]) for k in steps], 'o-', label=f'{o} ({s}, {n} NFE)')
  ax.set(yscale='log', xlabel='training step', ylabel=LABELS.get(metric, metric))
  ax.legend(fontsize=7)
  fig.tight_layout()
  _save(fig, path)


def loss_vs_logsnr(losses, path):
  plt = _plt()
  fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.4))
  for name, c in losses.items():
    axes[0].plot(c['log_snr'], c['loss'], '-', label=name)
    if c.get('eps_mse') is not None:      # objectives without an eps-MSE weight are left out
      axes[1].plot(c['log_snr'], c['eps_mse'], '-', label=name)
  axes[0].set(yscale='log', xlabel='log-SNR λ', ylabel='objective per example',
              title='each objective\'s own loss')
  axes[1].set(yscale='log', xlabel='log-SNR λ', ylabel='implied eps-MSE',
              title='on one axis: loss / eps-weight')
  for ax in axes:
    ax.legend(fontsize=7)
  fig.tight_layout()
  _save(fig, path)


def guidance_figure(rows, path):
  """FD (left axis) and class accuracy, precision and recall (right axis, 0-1) vs the scale."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5.2, 3.6))
  scales = [r['scale'] for r in rows]
  ax.plot(scales, [r['fd'] for r in rows], 'o-', color='C0', label='FD')
  ax.axhline(rows[0]['fd_floor'], color='C0', ls='--', lw=1, label='FD floor')
  ax.set(xlabel='guidance scale', ylabel='FD vs test digits')
  ax2 = ax.twinx()
  ax2.plot(scales, [r['class_accuracy'] for r in rows], 'o-', color='C3',
           label='class accuracy')
  ax2.plot(scales, [r['precision'] for r in rows], 's:', color='C1', label='precision')
  ax2.plot(scales, [r['recall'] for r in rows], 's:', color='C2', label='recall (diversity)')
  ax2.set(ylim=(0, 1.05), ylabel='accuracy / precision / recall')
  h1, l1 = ax.get_legend_handles_labels()
  h2, l2 = ax2.get_legend_handles_labels()
  ax.legend(h1 + h2, l1 + l2, fontsize=7, loc='center right')
  fig.tight_layout()
  _save(fig, path)


def text_guidance_figure(rows, path):
  """A text-conditioned model against the guidance scale: FD with its floor (left), and the
  digits-CLIP score with its floor (real test digits and their captions), class accuracy and
  attribute accuracy on the prompts (right)."""
  plt = _plt()
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(9.0, 3.6))
  scales = [r['scale'] for r in rows]
  ax.plot(scales, [r['fd'] for r in rows], 'o-', color='C0', label='FD')
  ax.axhline(rows[0]['fd_floor'], color='C0', ls='--', lw=1, label='FD floor')
  ax.set(xlabel='guidance scale', ylabel='FD vs test digits', title='fidelity')
  ax.legend(fontsize=7)
  bx.plot(scales, [r['clip_score'] for r in rows], 'o-', color='C4', label='digits-CLIP score')
  bx.axhline(rows[0]['clip_score_real'], color='C4', ls='--', lw=1,
             label='CLIP score of real digits')
  bx.set(xlabel='guidance scale', ylabel='CLIP score (100 cos)', title='prompt following')
  bx2 = bx.twinx()
  bx2.plot(scales, [r['class_accuracy'] for r in rows], 's:', color='C3', label='class accuracy')
  bx2.plot(scales, [r['attribute_accuracy'] for r in rows], 's:', color='C2',
           label='attribute accuracy')
  bx2.set(ylim=(0, 1.05), ylabel='accuracy')
  h1, l1 = bx.get_legend_handles_labels()
  h2, l2 = bx2.get_legend_handles_labels()
  bx.legend(h1 + h2, l1 + l2, fontsize=7, loc='lower right')
  fig.tight_layout()
  _save(fig, path)


def sample_panels(workdir, runs, path):
  """Each run's samples.png side by side, titled."""
  plt = _plt()
  from PIL import Image  # pylint: disable=g-import-not-at-top
  shown = [r for r in runs if os.path.exists(os.path.join(lib.run_dir_of(workdir, r),
                                                          'samples.png'))]
  if not shown:
    return
  fig, axes = plt.subplots(1, len(shown), figsize=(2.6 * len(shown), 2.8), squeeze=False)
  for ax, r in zip(axes[0], shown, strict=True):
    ax.imshow(np.asarray(Image.open(os.path.join(lib.run_dir_of(workdir, r), 'samples.png'))),
              cmap='gray')
    ax.set_title(r.name, fontsize=9)
    ax.axis('off')
  fig.tight_layout()
  _save(fig, path)


def write_all(workdir, runs, rows, curve, losses, metric):
  lib.write_csv(os.path.join(workdir, 'results.csv'), rows)
  lib.write_csv(os.path.join(workdir, 'curve.csv'), curve)
  with open(os.path.join(workdir, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(results_table(rows, metric))
  metric_vs_nfe(rows, metric, os.path.join(workdir, 'metric_vs_nfe.png'))
  metric_vs_step(curve, metric, os.path.join(workdir, 'metric_vs_step.png'))
  loss_vs_logsnr(losses, os.path.join(workdir, 'loss_vs_logsnr.png'))
  sample_panels(workdir, runs, os.path.join(workdir, 'samples.png'))
