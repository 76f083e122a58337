"""The few-step ablation's plan, runs, measurements and report (`experiments.ablate_few_step`).

A plan is a list of `Stage`s in the order they must run: the shared teacher first, then every
(method, seed) run, a progressive distillation's rounds in order. A stage is an ordinary
training run of its config in its own directory, plus the (sampler, NFE) cells to measure on
its final checkpoint; results are cached per cell, so a rerun skips what is done.
"""

import collections
import dataclasses
import json
import os
import time

import ml_collections
import numpy as np

from diffusion_jax import run_config
from diffusion_jax import samplers
from diffusion_jax import train_loop
from diffusion_jax.configuration import ConfigError
from diffusion_jax.distill import dmd
from diffusion_jax.distill import progressive
from diffusion_jax.distill import trigflow
from experiments import ablation_lib as alib

SPEC_KEYS = ('process', 'objective', 'model', 'sample', 'train', 'teacher', 'init', 'sampler',
             'rounds', 'start_steps', 'steps_key', 'nfes', 'times')
# `times`: how a method's sampling times depend on its steps ('scm': sCM's, `trigflow.
# sample_times`); a progressive round samples on its own grid (`progressive.student_times`).


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str                    # 'teacher', 'cd_s0', 'progressive_s0_r1'
  method: str                  # the key of `ablation.runs`, or 'teacher'
  seed: int
  config: ml_collections.ConfigDict
  run_dir: str
  cells: tuple                 # ((sampler, nfe budget, steps or None, options or None), ...)


def _copy(config) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(config.to_dict())


def _spec(ab, name: str) -> dict:
  definitions = ab.runs.to_dict() if hasattr(ab.runs, 'to_dict') else dict(ab.runs)
  if name not in definitions:
    raise ConfigError(f'config.ablation.methods: unknown method {name!r}; choose from '
                      f'{sorted(definitions)}')
  spec = dict(definitions[name])
  unknown = set(spec) - set(SPEC_KEYS)
  if unknown:
    raise ConfigError(f'config.ablation.runs.{name}: unknown keys {sorted(unknown)}; valid '
                      f'keys are {list(SPEC_KEYS)}')
  sampler = spec.get('sampler')
  if sampler not in samplers.SAMPLERS:
    raise ConfigError(f'config.ablation.runs.{name}.sampler={sampler!r}: not a sampler name')
  return spec


def _student_config(base, spec: dict, seed: int, num_steps: int, teacher_dir: str,
                    sample_steps: int):
  c = _copy(base)
  for section in ('process', 'objective'):
    if section in spec:
      c[section] = dict(spec[section])
  for section in ('model', 'sample', 'train'):
    if section in spec:
      c[section].update(spec[section])
  c.train.num_steps = int(num_steps)
  c.train.checkpoint_every = min(int(c.train.checkpoint_every), int(num_steps))
  if c.objective.name in ('consistency_training', 'scm_training') and \
      'total_steps' not in c.objective:
    c.objective.total_steps = int(num_steps)    # the curriculum spans the whole run
  c.seed = int(seed)
  if spec.get('teacher'):
    c.teacher = dict(workdir=teacher_dir)
  if spec.get('init'):
    c.base = dict(workdir=teacher_dir)
  c.sample.update(sampler=spec['sampler'], steps=int(sample_steps))  # the run's samples.png
  for k in list(c.sample.get('options', {})):
    c.sample.options[k] = None
  c.eval.enabled = False
  return c


def make_plan(config, workdir: str) -> list[Stage]:
  """The teacher and every (method, seed) run of `config.ablation`, in running order."""
  base, ab = alib.base_and_ablation(config)
  nfes = alib.split_list(ab.nfes, 'nfes', int)
  methods = alib.split_list(ab.methods, 'methods')
  seeds = alib.split_list(ab.seeds, 'seeds', int)
  runs_dir = os.path.join(workdir, 'runs')
  teacher_dir = os.path.join(runs_dir, 'teacher')
  t = _copy(base)
  t.seed = int(ab.teacher_seed)
  t.train.num_steps = int(ab.teacher_steps)
  t.eval.enabled = False
  if ab.teacher_sampler not in samplers.SAMPLERS:
    raise ConfigError(f'config.ablation.teacher_sampler={ab.teacher_sampler!r}: not a sampler')
  cells = tuple((ab.teacher_sampler, n, None, None) for n in nfes + (int(ab.teacher_nfe),))
  if t.sample.sampler != ab.teacher_sampler:
    cells += ((t.sample.sampler, int(ab.teacher_nfe), None, None),)
  plan = [Stage('teacher', 'teacher', int(ab.teacher_seed), t, teacher_dir, cells)]
  for name in methods:
    spec = _spec(ab, name)
    method_nfes = alib.split_list(spec.get('nfes', ab.nfes), f'runs.{name}.nfes', int)
    rounds = int(spec.get('rounds', 0))
    for seed in seeds:
      if not rounds:
        c = _student_config(base, spec, seed, ab.student_steps, teacher_dir,
                            max(method_nfes))
        plan.append(Stage(f'{name}_s{seed}', name, seed, c,
                          os.path.join(runs_dir, f'{name}_s{seed}'),
                          tuple(_cell(spec, n, run_config.build_process(c.process))
                                for n in method_nfes)))
        continue
      # Progressive distillation: round r halves the steps of round r - 1's student (the
      # teacher's `start_steps` before round 0); each round's student teaches the next.
      per_round = int(ab.student_steps) // rounds
      if per_round < 1:
        raise ConfigError(f'config.ablation.student_steps={ab.student_steps} is fewer than the '
                          f'{rounds} rounds of {name!r}')
      previous = teacher_dir
      steps = int(spec['start_steps'])
      for r in range(rounds):
        if steps % 2:
          raise ConfigError(f'config.ablation.runs.{name}: start_steps={spec["start_steps"]} '
                            f'cannot be halved {rounds} times')
        steps //= 2
        c = _student_config(base, spec, seed, per_round, previous, steps)
        c.objective[spec.get('steps_key', 'student_steps')] = steps
        # The student samples on exactly the grid it was distilled on.
        grid = progressive.student_times(run_config.build_process(c.process), steps,
                                         c.objective.get('grid', 'uniform'))
        options = {'grid': tuple(float(x) for x in grid)}
        c.sample.options.update(options)
        run_dir = os.path.join(runs_dir, f'{name}_s{seed}_r{r}')
        measured = tuple((spec['sampler'], n, steps, options) for n in method_nfes
                         if n == steps)
        plan.append(Stage(f'{name}_s{seed}_r{r}', name, seed, c, run_dir, measured))
        previous = run_dir
  return plan


def _cell(spec: dict, nfe: int, process) -> tuple:
  """`(sampler, nfe, steps, options)` of a method at an NFE budget (steps None: the most
  that fit, `ablation_lib.steps_for_nfe`)."""
  if spec.get('times') is None:
    return spec['sampler'], nfe, None, None
  if spec['times'] == 'scm':
    times = trigflow.sample_times(nfe)
  elif spec['times'] == 'dmd':
    times = dmd.generator_times(process, nfe)
  else:
    raise ConfigError(f"config.ablation.runs: times={spec['times']!r}; choose 'scm' or 'dmd'")
  return spec['sampler'], nfe, nfe, {'times': tuple(float(t) for t in times)}


def _train(stage: Stage) -> float:
  """Trains the stage's run unless it is finished; returns its training seconds (the sum over
  the calls that trained it, kept in `train_seconds.json`)."""
  path = os.path.join(stage.run_dir, 'train_seconds.json')
  spent = 0.0
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      spent = float(json.load(f)['seconds'])
  if not alib.is_trained(stage.run_dir, stage.config):
    t0 = time.time()
    train_loop.train_and_evaluate(stage.config, stage.run_dir)
    spent += time.time() - t0
    with open(path, 'w', encoding='utf-8') as f:
      json.dump({'seconds': spent}, f)
  return spent


def run_plan(plan: list[Stage], config, cache_dir: str, *, report_only: bool = False
             ) -> list[dict]:
  """Trains and measures every stage; returns one row per (stage, cell). `report_only`
  trains and measures nothing: the rows of the cells already measured."""
  if report_only:
    return _cached_rows(plan, config)
  _, ab = alib.base_and_ablation(config)
  num = int(ab.num_samples)
  total = sum(s.config.train.num_steps for s in plan)
  total += sum(alib.sample_units(n, num, s.config) for s in plan for _, n, *_ in s.cells)
  progress = alib.SweepProgress(total, f'few-step ablation ({len(plan)} runs)')
  metric = alib.metric_name(config)
  rows, spent = [], collections.defaultdict(float)
  try:
    for stage in plan:
      seconds = _train(stage)
      spent[(stage.method, stage.seed)] += seconds
      progress.done(stage.config.train.num_steps, f'{stage.name} trained')
      setup = run_config.build(stage.config)
      final = int(stage.config.train.num_steps)
      for sampler, nfe, steps, options in stage.cells:
        if steps is None:
          steps, _ = alib.steps_for_nfe(sampler, setup, nfe)
        if not steps:
          continue
        cfg = _copy(stage.config)
        if options:
          cfg.sample.options = dict(options)
          cfg.sample.steps = int(steps)
        result = alib.cached(
            os.path.join(stage.run_dir, f'eval_{sampler}_{steps}.json'), final,
            lambda: alib.measure(stage.run_dir, cfg, sampler, steps, num, cache_dir,
                                 keep_options=bool(options)))
        rows.append({'method': stage.method, 'seed': stage.seed, 'stage': stage.name,
                     'sampler': sampler, 'nfe_budget': nfe, **result,
                     'ratio': result[metric] / result[f'{metric}_floor']})
        progress.done(alib.sample_units(nfe, num, stage.config), f'{stage.name} {sampler}@{nfe}')
  finally:
    progress.close()
  for r in rows:
    r['train_seconds'] = spent[(r['method'], r['seed'])]
  return rows


def _cached_rows(plan: list[Stage], config) -> list[dict]:
  """The rows of the trained stages' measured cells (their cached `eval_*.json`)."""
  metric = alib.metric_name(config)
  rows, spent = [], collections.defaultdict(float)
  for stage in plan:
    seconds = os.path.join(stage.run_dir, 'train_seconds.json')
    if not (alib.is_trained(stage.run_dir, stage.config) and os.path.exists(seconds)):
      continue
    with open(seconds, encoding='utf-8') as f:
      spent[(stage.method, stage.seed)] += float(json.load(f)['seconds'])
    setup = None
    for sampler, nfe, steps, _ in stage.cells:
      if steps is None:
        setup = setup or run_config.build(stage.config)
        steps, _ = alib.steps_for_nfe(sampler, setup, nfe)
      path = os.path.join(stage.run_dir, f'eval_{sampler}_{steps}.json')
      if not steps or not os.path.exists(path):
        continue
      with open(path, encoding='utf-8') as f:
        result = json.load(f)
      rows.append({'method': stage.method, 'seed': stage.seed, 'stage': stage.name,
                   'sampler': sampler, 'nfe_budget': nfe, **result,
                   'ratio': result[metric] / result[f'{metric}_floor']})
  for r in rows:
    r['train_seconds'] = spent[(r['method'], r['seed'])]
  return rows


def results_table(rows: list[dict], config) -> str:
  """Markdown: method x NFE -> metric / floor (mean ± std over seeds), training seconds."""
  _, ab = alib.base_and_ablation(config)
  metric = alib.metric_name(config)
  nfes = sorted({int(r['nfe']) for r in rows if r['method'] != 'teacher'} |
                set(alib.split_list(ab.nfes, 'nfes', int)))
  by = collections.defaultdict(list)
  for r in rows:
    if r['method'] == 'teacher' and (r['sampler'] != ab.teacher_sampler
                                     or r['nfe_budget'] == int(ab.teacher_nfe)):
      continue
    by[(r['method'], int(r['nfe']))].append(r['ratio'])
  seeds = sorted({r['seed'] for r in rows if r['method'] != 'teacher'})
  best = _teacher_best(rows, ab)
  lines = [f'{metric.upper()} / floor (1.0 = real data), mean{" ± std" if len(seeds) > 1 else ""}'
           f' over seeds {seeds}; lower is better; NFE exact.', '',
           '| method | ' + ' | '.join(f'NFE {n}' for n in nfes) + ' | training s |',
           '|---|' + '---|' * (len(nfes) + 1)]
  for method in dict.fromkeys(r['method'] for r in rows):
    train = [r['train_seconds'] for r in rows if r['method'] == method]
    label = (f'teacher ({ab.teacher_sampler})' if method == 'teacher' else method)
    cells = [alib.mean_std(by[(method, n)]) if by[(method, n)] else '' for n in nfes]
    lines.append(f'| {label} | ' + ' | '.join(cells) + f' | {np.mean(train):.0f} |')
  for b in best:
    lines += ['', f'Teacher at NFE {b["nfe"]}: {b["sampler"]}: {metric.upper()} {b[metric]:.3g}, '
              f'{b["ratio"]:.3g}x the floor ({b[f"{metric}_floor"]:.3g}).']
  return '\n'.join(lines) + '\n'


def _teacher_best(rows: list[dict], ab) -> list[dict]:
  """The teacher's rows at `teacher_nfe`, best (lowest ratio) first."""
  return sorted((r for r in rows if r['method'] == 'teacher'
                 and r['nfe_budget'] == int(ab.teacher_nfe)), key=lambda r: r['ratio'])


def figure(rows: list[dict], config, path: str) -> None:
  _, ab = alib.base_and_ablation(config)
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5.2, 3.8))
  for method in dict.fromkeys(r['method'] for r in rows):
    pts = collections.defaultdict(list)
    for r in rows:
      if r['method'] == method and not (method == 'teacher' and (
          r['sampler'] != ab.teacher_sampler or r['nfe_budget'] == int(ab.teacher_nfe))):
        pts[int(r['nfe'])].append(r['ratio'])
    n = sorted(pts)
    ax.plot(n, [np.mean(pts[k]) for k in n], 'o-', label=method)
  best = _teacher_best(rows, ab)
  if best:
    ax.axhline(best[0]['ratio'], color='0.4', ls='--', lw=1,
               label=f'teacher, NFE {ab.teacher_nfe} ({best[0]["sampler"]})')
  ax.axhline(1.0, color='0.7', ls=':', lw=1, label='floor')
  ax.set(xscale='log', yscale='log', xlabel='NFE', ylabel=f'{alib.metric_name(config)} / floor')
  ax.set_xticks(sorted({int(r['nfe']) for r in rows if r['nfe_budget'] != int(ab.teacher_nfe)}))
  ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_report(workdir: str, rows: list[dict], config) -> None:
  alib.write_csv(os.path.join(workdir, 'results.csv'), rows)
  with open(os.path.join(workdir, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(results_table(rows, config))
  figure(rows, config, os.path.join(workdir, 'metric_vs_nfe.png'))
