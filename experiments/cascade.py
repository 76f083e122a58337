r"""Sample an 8x8 -> 16x16 digits cascade end to end and measure it (docs/superres/results.md).

  python -m experiments.cascade --base=runs/digits --sr=aug=runs/sr_aug,noaug=runs/sr_noaug \
      [--levels=0,0.1,0.2,0.3] [--num_samples=1000] [--out=docs/superres] [--time_sizes=16,32]

`--base` is a finished 8x8 run (`configs/digits.py`), each `--sr` a finished super-resolution
run (`configs/sr_digits.py`, variants `''` and `noaug`). The base samples `--num_samples` digits
with its own config (and the key its training run evaluated with, so its FD is the run's own);
every SR run then samples one 16x16 image per base sample, conditioned on it, through the same
`generation.make_sample_fn` the training loop evaluates with (its `prepare_cond` corrupts the
condition at the sampling level). An SR run trained with augmentation is sampled at each of
`--levels`; every SR sampling starts from the same prior noise. As a reference, each SR run
also super-resolves the real low-resolution test digits (sample i: test digit i, cycled) at its
own sampling level and at the last of `--levels`.

Every row is measured as the training loop measures a run: digits FD at 8x8 (the 16x16 samples
mapped back by `digits.to_native`, 2 x 2 block means) against the 450 test digits, beside the
floor of as many real training digits, and `sr_consistency_l2`, the mean L2 distance between a
sample's block mean and the condition it was given. `--time_sizes` also times one SR train step
at those sizes (and the 8x8 base's), the cost that picked 16x16. Writes `results.md`,
`results.json` and `cascade.png` (rows: base sample, SR with and without augmentation) in --out.
"""

import dataclasses
import json
import math
import os
import statistics
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from experiments import cli  # noqa: E402

_BASE = flags.DEFINE_string('base', None, 'Work dir of the finished 8x8 base run.')
_SR = flags.DEFINE_list('sr', [], 'name=workdir of each finished super-resolution run.')
_LEVELS = flags.DEFINE_list('levels', ['0', '0.1', '0.2', '0.3'],
                            'Sampling augmentation levels of the runs trained with augmentation.')
_NUM = flags.DEFINE_integer('num_samples', 1000, 'Cascade samples per row.', lower_bound=1)
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the SR stage\'s prior noise and sampler.')
_OUT = flags.DEFINE_string('out', 'docs/superres', 'Where results.md / .json / cascade.png go.')
_GRID = flags.DEFINE_integer('grid', 12, 'Cascade samples shown in cascade.png.', lower_bound=1)
_TIME_SIZES = flags.DEFINE_list('time_sizes', [], 'Also time one SR train step at these image '
                                'sizes (16, 32) and the 8x8 base\'s.')
_TIME_STEPS = flags.DEFINE_integer('time_steps', 5, 'Timed train steps per size.', lower_bound=1)
flags.mark_flags_as_required(['base'])


def parse_runs(items) -> list[tuple[str, str]]:
  runs = []
  for item in items:
    name, sep, path = item.partition('=')
    if not sep or not name or not path:
      cli.fail(f'--sr={item!r}: expected name=workdir')
    runs.append((name, os.path.abspath(path)))
  return runs


def check_cascade(name: str, setup, base_shape) -> None:
  """The SR run must take the base's samples as its condition (one-line error otherwise)."""
  condition = getattr(setup, 'condition', None)
  if condition is None or not hasattr(setup.model, 'prepare_cond'):
    cli.fail(f'--sr={name}: not a super-resolution run (its config has no superres section)')
  want = condition.shape(setup.image_shape)
  if tuple(want) != tuple(base_shape):
    cli.fail(f'--sr={name}: its low-res condition is {tuple(want)} but the base samples are '
             f'{tuple(base_shape)}; the SR stage must upsample the base\'s resolution')


def time_train_steps(sizes, steps: int) -> list[dict]:
  """Seconds of one jitted train step (min and median of `steps`, after two warm-ups) and XLA's
  FLOP estimate, for the base U-Net at 8x8 and the SR config at each size."""
  # pylint: disable=g-import-not-at-top
  import jax
  from configs import digits as digits_config
  from configs import sr_digits
  from diffusion_jax import run_config
  from diffusion_jax import train_loop
  from diffusion_jax import training
  # pylint: enable=g-import-not-at-top
  rows = []
  for size in [8] + [int(s) for s in sizes]:
    if size == 8:
      c, what = digits_config.get_config(), 'base U-Net (configs/digits.py), 8x8'
    else:
      c = sr_digits.get_config()
      c.data.image_size = size
      c.superres.factor = size // 8
      c.superres.upsample = 'nearest' if size == 16 else 'bilinear'
      what = f'SR U-Net (configs/sr_digits.py), {size}x{size}'
    c.train.batch_size = 64
    setup = run_config.build(c)
    optimizer, ema_fn = train_loop._optimizer_and_ema(setup)  # pylint: disable=protected-access
    cond = run_config.example_cond(setup.model, 1, setup.condition, setup.image_shape)
    x1 = jax.numpy.zeros((1,) + setup.image_shape)
    params = jax.jit(setup.model.init)(jax.random.key(0), x1, jax.numpy.zeros(1), cond)['params']
    step = jax.jit(training.make_train_step(setup.objective, setup.model.apply, optimizer, ema_fn,
                                            cond_key=setup.cond_key))
    batch = setup.source.batch(0, 0, 64)
    state = training.init_train_state(params, optimizer, ema_fn, jax.random.key(1))
    compiled = step.lower(state, batch).compile()
    try:
      cost = compiled.cost_analysis()
      flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost).get('flops', math.nan))
    except Exception:  # pylint: disable=broad-except
      flops = math.nan
    times = []
    for i in range(steps + 2):
      start = time.perf_counter()
      state, metrics = compiled(state, batch)
      jax.block_until_ready(metrics['loss'])
      if i >= 2:
        times.append(time.perf_counter() - start)
    rows.append({'what': what, 'size': size, 'gflop': flops / 1e9, 'step_min_s': min(times),
                 'step_median_s': statistics.median(times)})
    print(f'{what}: {min(times):.3f} s/step (min of {steps}), {flops / 1e9:.2f} GFLOP', flush=True)
  return rows


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  cli.setup_runtime()
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from diffusion_jax import evaluation
  from diffusion_jax import generation
  from diffusion_jax import images as images_lib
  from diffusion_jax.metrics import digits_classifier
  # pylint: enable=g-import-not-at-top
  runs = parse_runs(_SR.value)
  if not runs:
    cli.fail('--sr: name at least one super-resolution run, e.g. --sr=aug=runs/sr_aug')
  try:
    levels = [float(v) for v in _LEVELS.value]
  except ValueError:
    cli.fail(f'--levels={",".join(_LEVELS.value)}: expected numbers in [0, 1]')
  if not levels or any(not 0.0 <= v <= 1.0 for v in levels):
    cli.fail(f'--levels={",".join(_LEVELS.value)}: expected numbers in [0, 1]')
  num = _NUM.value
  out_dir = os.path.abspath(_OUT.value)
  os.makedirs(out_dir, exist_ok=True)

  base_config, base_setup, base_params, base_step = cli.load_run(os.path.abspath(_BASE.value))
  if base_setup.data.name != 'digits':
    cli.fail(f'--base: data.name={base_setup.data.name!r}; the cascade is measured on the digits')
  srs = []
  for name, path in runs:
    _, setup, params, step = cli.load_run(path)
    check_cascade(name, setup, base_setup.image_shape)
    srs.append((name, path, setup, params, step))

  cls_params, cls_info = digits_classifier.load_or_train_digits_classifier(
      base_setup.eval.cache_dir or cli.default_cache_dir(), seed=0)
  rows = []

  def measure(row, samples, conds, condition):
    row.update(evaluation.digits_metrics(cls_params, cls_info, samples))
    if condition is not None:
      row.update(condition.metrics(samples, conds))
    row['fd_ratio'] = row['fd'] / row['fd_floor']
    rows.append(row)
    cons = (f' consistency_l2={row["sr_consistency_l2"]:.3f}' if 'sr_consistency_l2' in row
            else '')
    print(f'{row["stage"]} [{row["condition"]}, level {row.get("level", "-")}]: '
          f'FD={row["fd"]:.3f} floor={row["fd_floor"]:.3f} FD/floor={row["fd_ratio"]:.2f}{cons} '
          f'({row["sample_seconds"]:.0f} s)', flush=True)

  # 1. The base's samples, with the key its training run evaluated with.
  t0 = time.time()
  base_conds = generation.sample_conditions(base_setup, num)
  base_key = jax.random.split(jax.random.key(base_config.seed))[1]
  base_samples = generation.generate(
      generation.make_sample_fn(base_setup), base_params, base_key, num,
      base_setup.sample.batch_size, base_setup.image_shape, base_conds.cond)
  measure({'stage': 'base 8x8', 'condition': '-', 'sample_seconds': time.time() - t0,
           'step': base_step}, base_samples, None, None)

  # 2. Each SR run on the base samples and on the real low-res test digits, per level.
  sr_key = jax.random.key(_SEED.value)
  grid_rows = {'base (nearest x2)': np.repeat(np.repeat(base_samples[:_GRID.value], 2, 1), 2, 2)}
  for name, path, setup, params, step in srs:
    real = generation.sample_conditions(setup, num)
    run_levels = levels if setup.model.augment != 'none' else [0.0]
    for level in run_levels:
      at_level = dataclasses.replace(setup, model=setup.model.clone(sample_aug_level=level))
      sample_fn = generation.make_sample_fn(at_level)
      pairs = [('base samples', base_samples)]
      if level == run_levels[-1] or level == setup.model.sample_aug_level:
        pairs.append(('real test low-res', real.cond))   # the reference, at fewer levels
      for what, conds in pairs:
        t0 = time.time()
        samples = generation.generate(sample_fn, params, sr_key, num, setup.sample.batch_size,
                                      setup.image_shape, conds)
        measure({'stage': f'SR {name}', 'condition': what, 'level': level,
                 'augment': setup.model.augment, 'aug_max': setup.model.aug_max,
                 'workdir': os.path.relpath(path), 'step': step,
                 'sample_seconds': time.time() - t0}, samples, conds, setup.condition)
        shown = (setup.model.sample_aug_level if setup.model.sample_aug_level in run_levels
                 else run_levels[0])     # the grid: the run's own sampling level if swept
        if what == 'base samples' and level == shown:
          grid_rows[f'SR {name} (level {level:g})'] = samples[:_GRID.value]

  timings = time_train_steps(_TIME_SIZES.value, _TIME_STEPS.value) if _TIME_SIZES.value else []
  tiles = np.concatenate(list(grid_rows.values()))
  images_lib.save_png(os.path.join(out_dir, 'cascade.png'),
                      images_lib.make_grid(tiles, ncol=min(_GRID.value, num), upscale=4))
  info = {'base': os.path.relpath(os.path.abspath(_BASE.value)), 'base_step': base_step,
          'num_samples': num, 'levels': levels, 'seed': _SEED.value,
          'sampler': {name: f'{s.sample.sampler} {s.sample.steps}' for name, _, s, _, _ in srs},
          'grid_rows': list(grid_rows), 'devices': str(jax.devices()),
          'command': 'python -m experiments.cascade ' + ' '.join(sys.argv[1:])}
  with open(os.path.join(out_dir, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump({'info': info, 'rows': rows, 'timings': timings}, f, indent=1, default=float)
  with open(os.path.join(out_dir, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(report(info, rows, timings))
  print(f'Wrote {out_dir}/results.md, results.json, cascade.png', flush=True)


def report(info: dict, rows: list[dict], timings: list[dict]) -> str:
  lines = ['# 8x8 -> 16x16 digits cascade: measured', '',
           f'Base `{info["base"]}` (step {info["base_step"]}); {info["num_samples"]} samples '
           f'per row; SR samplers {info["sampler"]}; SR prior noise and sampler seed '
           f'{info["seed"]}. FD is measured at 8x8 (16x16 samples mapped back by 2 x 2 block '
           f'means) against the 450 test digits; the floor is {info["num_samples"]} real '
           f'training digits against the same test digits. `consistency L2` is the mean over '
           f'samples of `||blockmean(x) - c||_2` against the condition `c` the sample was given '
           f'(8x8, values in [-1, 1]).', '', f'`{info["command"]}`', '',
           '| stage | condition | sampling aug level | FD | floor | FD/floor | '
           'consistency L2 | sample s |',
           '|---|---|---|---|---|---|---|---|']
  for r in rows:
    level = '-' if 'level' not in r else (f'{r["level"]:g}' if r['augment'] != 'none'
                                         else 'none (not trained)')
    cons = f'{r["sr_consistency_l2"]:.3f}' if 'sr_consistency_l2' in r else '-'
    lines.append(f'| {r["stage"]} | {r["condition"]} | {level} | {r["fd"]:.2f} | '
                 f'{r["fd_floor"]:.2f} | {r["fd_ratio"]:.2f} | {cons} | '
                 f'{r["sample_seconds"]:.0f} |')
  lines += ['', f'`cascade.png`, rows top to bottom: {", ".join(info["grid_rows"])}.', '']
  if timings:
    lines += ['One train step at batch 64 (jitted, after two warm-up steps; XLA\'s FLOP '
              'estimate is independent of the machine\'s load):', '',
              '| network | min s/step | median s/step | GFLOP/step |', '|---|---|---|---|']
    lines += [f'| {t["what"]} | {t["step_min_s"]:.3f} | {t["step_median_s"]:.3f} | '
              f'{t["gflop"]:.2f} |' for t in timings]
    lines.append('')
  lines.append(f'Devices: {info["devices"]}.')
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
