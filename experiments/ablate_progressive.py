r"""Progressive (8x8 -> 16x16) vs fixed-resolution (16x16) training at equal compute.

  python -m experiments.ablate_progressive --workdir=runs/ablate_progressive [--seeds=0,1]
      [--variant=smoke] [--probe_only]

1. Costs: the train step of `configs/progressive_digits.py` compiled at 8x8 and at 16x16; its
   FLOPs as XLA counts them (`cost_analysis`) and its wall time (`--probe_steps` timed steps
   after compilation). The config's `STEP_FLOP_RATIO` must match the measured ratio (2 %), so
   that the two arms' training FLOPs are equal.
2. Arms, per seed: `fixed` (16x16 throughout) and `progressive` (8x8, then 16x16), each an
   ordinary run of `train_loop.train_and_evaluate` in `<workdir>/<arm>_s<seed>` (a finished run
   is reused). Both sample 1,000 images at 16x16 with the same sampler; FD in the digits
   classifier's feature space after mapping back to 8x8 (`digits.to_native`), against the
   real-data floor at the same n. `block_std`: the mean standard deviation inside the 2 x 2
   blocks of the grid's 100 samples (the real 16x16 digits have 0: every pixel repeated 2 x 2);
   the FD does not see it, since `to_native` averages each block.
Writes `progressive.md`, `progressive.csv` and `loss_vs_flops.png` (training loss of every
logging interval against the cumulative training FLOPs, the switch marked) in the work dir.
"""

import json
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from experiments import cli  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the arms run.')
_VARIANT = flags.DEFINE_string('variant', '', "Extra configs/progressive_digits.py variant "
                               "('smoke').")
_SEEDS = flags.DEFINE_string('seeds', '0', 'Comma-separated seeds; each runs both arms.')
_PROBE = flags.DEFINE_integer('probe_steps', 10, 'Timed train steps per resolution.')
_PROBE_ONLY = flags.DEFINE_bool('probe_only', False, 'Measure the step costs and stop.')
flags.mark_flags_as_required(['workdir'])

ARMS = ('fixed', 'progressive')


def arm_config(arm: str, variant: str, seed: int):
  from configs import progressive_digits  # pylint: disable=g-import-not-at-top
  names = [v for v in (variant, 'fixed' if arm == 'fixed' else '') if v]
  c = progressive_digits.get_config(','.join(names))
  c.seed = seed
  return c


def step_costs(config, steps: int) -> dict:
  """`{resolution: (flops, seconds)}` of one train step at each resolution of the progressive
  config (the loop's own step function; seconds: the mean of `steps` runs after compiling)."""
  # pylint: disable=g-import-not-at-top
  import jax
  from diffusion_jax import parallel
  from diffusion_jax import progressive
  from diffusion_jax import train_loop
  from diffusion_jax import training
  # pylint: enable=g-import-not-at-top
  setup = train_loop.build_setup(config)
  optimizer = training.make_optimizer(setup.optim, setup.train.num_steps)
  ema_fn = training.ema(setup.train.ema_decay)    # EMA costs a few FLOPs per parameter either way
  state = jax.jit(train_loop.init_state_fn(setup, optimizer, ema_fn))(jax.random.key(0))
  step = jax.jit(training.make_train_step(setup.objective, setup.model.apply, optimizer, ema_fn))
  full = setup.source.batch(0, 0, setup.train.batch_size)['image']   # [B, 16, 16, 1]
  out = {}
  for r in sorted({r for _, r in setup.train.resolution_schedule}):
    batch = {'image': progressive.pool(full, full.shape[1] // r)}
    compiled = step.lower(state, batch).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    s, m = compiled(state, batch)
    parallel.local_value(m)
    t0 = time.perf_counter()
    for _ in range(steps):
      s, m = compiled(s, batch)
    parallel.local_value(m)
    out[r] = (float(analysis['flops']), (time.perf_counter() - t0) / steps)
  return out


def read_metrics(run_dir: str) -> list[dict]:
  rows = []
  with open(os.path.join(run_dir, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      row = json.loads(line)
      if 'loss' in row and 'step' in row:
        rows.append(row)
  return rows


def block_std(run_dir: str) -> float:
  """Mean standard deviation of the samples inside their 2 x 2 blocks (0 for real digits)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  x = np.load(os.path.join(run_dir, 'samples.npy'))   # [N, 16, 16, 1]
  n, h, w, c = x.shape
  blocks = x.reshape(n, h // 2, 2, w // 2, 2, c)
  return float(blocks.std(axis=(2, 4)).mean())


def flops_at(schedule, costs: dict, final: int, step: int) -> float:
  """Training FLOPs of steps [0, step) under `schedule` (() = all at `final`)."""
  if not schedule:
    return step * costs[final][0]
  total = 0.0
  bounds = [s for s, _ in schedule[1:]] + [None]
  for (start, r), stop in zip(schedule, bounds, strict=True):
    hi = step if stop is None else min(step, stop)
    total += max(hi - start, 0) * costs[r][0]
  return total


def plot(path: str, curves: dict, switch_flops: float | None) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
  for name, (x, y) in curves.items():
    ax.plot(x, y, label=name, lw=1.2)
  if switch_flops is not None:
    ax.axvline(switch_flops, color='grey', ls=':', lw=1, label='progressive: 8x8 -> 16x16')
  ax.set_xlabel('training TFLOPs (XLA count)')
  ax.set_ylabel('training loss (eps-MSE, per interval)')
  ax.set_yscale('log')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv):
  workdir = cli.begin(argv, None, _WORKDIR)[1]
  # pylint: disable=g-import-not-at-top
  from diffusion_jax import train_loop
  from experiments import ablation_lib as lib
  # pylint: enable=g-import-not-at-top
  from configs import progressive_digits  # pylint: disable=g-import-not-at-top
  cache_dir = cli.default_cache_dir()
  with cli.user_errors():
    os.makedirs(workdir, exist_ok=True)
    seeds = lib.split_list(_SEEDS.value, 'seeds', int)
    prog = arm_config('progressive', _VARIANT.value, seeds[0])
    costs = step_costs(prog, _PROBE.value)
    final = max(costs)
    ratio = costs[final][0] / costs[min(costs)][0]
    for r, (f, s) in sorted(costs.items()):
      print(f'{r}x{r}: {f / 1e9:.3f} GFLOP/step, {s * 1e3:.1f} ms/step', flush=True)
    print(f'FLOP ratio 16/8: {ratio:.3f} (config STEP_FLOP_RATIO '
          f'{progressive_digits.STEP_FLOP_RATIO}); wall ratio '
          f'{costs[final][1] / costs[min(costs)][1]:.2f}', flush=True)
    if _PROBE_ONLY.value:
      return
    if abs(ratio / progressive_digits.STEP_FLOP_RATIO - 1) > 0.02:
      cli.fail(f'configs/progressive_digits.py: STEP_FLOP_RATIO='
               f'{progressive_digits.STEP_FLOP_RATIO} but the measured ratio is {ratio:.3f}: '
               f'set it, so that the arms have equal FLOPs')
    rows, curves, switch = [], {}, None
    for seed in seeds:
      for arm in ARMS:
        config = arm_config(arm, _VARIANT.value, seed)
        config.eval.cache_dir = cache_dir
        run_dir = os.path.join(workdir, f'{arm}_s{seed}')
        result = (json.load(open(os.path.join(run_dir, 'eval.json'), encoding='utf-8'))
                  if lib.is_trained(run_dir, config)
                  else train_loop.train_and_evaluate(config, run_dir))
        schedule = tuple(tuple(s) for s in config.train.resolution_schedule)
        n = config.train.num_steps
        metrics = read_metrics(run_dir)
        if seed == seeds[0]:
          curves[arm] = ([flops_at(schedule, costs, final, m['step']) / 1e12 for m in metrics],
                         [m['loss'] for m in metrics])
          if schedule:
            switch = flops_at(schedule, costs, final, schedule[-1][0]) / 1e12
        stages = ' + '.join(f'{(b or n) - a} at {r}x{r}' for (a, r), b in zip(
            schedule, [s for s, _ in schedule[1:]] + [None], strict=True)) if schedule \
            else f'{n} at {final}x{final}'
        rows.append({
            'arm': arm, 'seed': seed, 'steps': stages,
            'train_tflops': flops_at(schedule, costs, final, n) / 1e12,
            'train_s': result.get('train_seconds', float('nan')),
            'fd': result['fd'], 'fd_floor': result['fd_floor'], 'fd_ratio': result['fd_ratio'],
            'block_std': block_std(run_dir), 'sample_s': result['sample_seconds'],
        })
    s = prog.sample
    lines = [f'# Progressive vs fixed-resolution training, digits 16x16 ({s.sampler}, '
             f'{s.steps} steps, n={prog.eval.num_samples})', '',
             '| step | GFLOP | ms (probe) |', '|---|---|---|']
    lines += [f'| {r}x{r} | {f / 1e9:.3f} | {t * 1e3:.1f} |' for r, (f, t) in sorted(costs.items())]
    lines += ['', '| arm | seed | steps | train TFLOP | train s | FD | floor | FD/floor | '
              'block std | sample s |', '|' + '---|' * 10]
    for r in rows:
      lines.append(f'| {r["arm"]} | {r["seed"]} | {r["steps"]} | {r["train_tflops"]:.2f} | '
                   f'{r["train_s"]:.0f} | {r["fd"]:.3f} | {r["fd_floor"]:.3f} | '
                   f'{r["fd_ratio"]:.2f} | {r["block_std"]:.4f} | {r["sample_s"]:.0f} |')
    if len(seeds) > 1:
      lines += ['', '| arm | FD/floor (mean ± std over seeds) |', '|---|---|']
      for arm in ARMS:
        lines.append(f'| {arm} | {lib.mean_std(r["fd_ratio"] for r in rows if r["arm"] == arm)} |')
    text = '\n'.join(lines) + '\n'
    with open(os.path.join(workdir, 'progressive.md'), 'w', encoding='utf-8') as f:
      f.write(text)
    lib.write_csv(os.path.join(workdir, 'progressive.csv'), rows)
    plot(os.path.join(workdir, 'loss_vs_flops.png'), curves, switch)
    print(text, flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
  sys.exit(0)
