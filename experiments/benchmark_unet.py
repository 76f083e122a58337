r"""Sizes the DDPM U-Net for 8x8x1 digits on this machine: params, compile and step times.

  python -m experiments.benchmark_unet [--configs=c32_r1,c64_r1] [--steps=10] \
      [--batches=64,128] [--sample_batch=1000] [--dtype=bfloat16] [--train_opt_level=0]

For each config: parameter count; `init` compile+run time; compile time of one jitted train
step (`training.make_train_step` with the digits config's objective, optimizer and EMA, the
train state donated); steady-state seconds per step (median over --steps after two warm-up
steps); forward images/s at --sample_batch, i.e. the cost of one network evaluation when
sampling. The persistent compilation cache is deliberately not enabled: the times are cold
compiles. XLA_FLAGS from the environment apply (set them on the command line to compare).
"""

import math
import os
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from configs import digits as digits_config
from diffusion_jax import run_config
from diffusion_jax import training
from diffusion_jax.models.unet import UNet

_D = dict(ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
CONFIGS = {
    'c16_r1': dict(_D, ch=16),
    'c16_r2': dict(_D, ch=16, num_res_blocks=2),
    'c16_m14_r1': dict(_D, ch=16, ch_mult=(1, 4)),  # wide only at 4x4, where convs are cheap
    'c24_r1': dict(_D, ch=24),
    'c32_r1': dict(_D, ch=32),
    'c32_r1_midattn': dict(_D, ch=32, attn_resolutions=()),  # attention only in the middle
    'c32_r2': dict(_D, ch=32, num_res_blocks=2),
    'c48_r1': dict(_D, ch=48),
    'c64_r1': dict(_D, ch=64),
    'c64_r2': dict(_D, ch=64, num_res_blocks=2),
    'c32_m122_r1': dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(2,)),
}
IMAGE_SHAPE = (8, 8, 1)  # [H, W, C]

_CONFIGS = flags.DEFINE_list('configs', list(CONFIGS), f'Subset of {list(CONFIGS)}.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed train steps per batch size.')
_BATCHES = flags.DEFINE_list('batches', ['64', '128'], 'Train batch sizes.')
_SAMPLE_BATCH = flags.DEFINE_integer('sample_batch', 1000, 'Batch of the forward-only timing.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
_TRAIN_OPT_LEVEL = flags.DEFINE_integer(
    'train_opt_level', None, 'xla_backend_optimization_level for the train step (default: XLA).')
_BUDGET_S = flags.DEFINE_float('budget_s', 300.0, 'Wall-clock budget for the steps/budget column.')


def train_pieces():
  """`(objective, optimizer, ema_fn)` of the quick-start digits run (configs/digits.py), as the
  training loop builds them; only the network differs between the configs measured here."""
  setup = run_config.build(digits_config.get_config(), image_shape=IMAGE_SHAPE)
  optimizer = training.make_optimizer(setup.optim, setup.train.num_steps)
  return setup.objective, optimizer, training.ema(setup.train.ema_decay)


def _flops(compiled) -> float:
  """XLA's own FLOP estimate for a compiled program (nan when the backend gives none)."""
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get('flops', math.nan))
  except Exception:  # pylint: disable=broad-except
    return math.nan


def _times(fn, n: int) -> list[float]:
  times = []
  for _ in range(n):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def benchmark(name: str, kwargs: dict, key: jax.Array) -> dict:
  """Measures one config; returns a row of the table."""
  dtype = jnp.bfloat16 if _DTYPE.value == 'bfloat16' else jnp.float32
  model = UNet(**kwargs, dtype=dtype)
  k_init, k_data, k_step = jax.random.split(key, 3)
  row = {'name': name, 'kwargs': kwargs}

  x1, t1 = jnp.zeros((1, *IMAGE_SHAPE)), jnp.zeros((1,))
  shapes = jax.eval_shape(model.init, k_init, x1, t1)
  row['params'] = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))

  # init runs once, so its compile is built at optimisation level 0 (much faster to compile).
  start = time.perf_counter()
  init = jax.jit(model.init, compiler_options={'xla_backend_optimization_level': 0})
  params0 = jax.device_get(init(k_init, x1, t1))
  row['init_s'] = time.perf_counter() - start

  objective, optimizer, ema_fn = train_pieces()
  step_opts = (None if _TRAIN_OPT_LEVEL.value is None
               else {'xla_backend_optimization_level': _TRAIN_OPT_LEVEL.value})
  train_step = jax.jit(training.make_train_step(objective, model.apply, optimizer, ema_fn),
                       donate_argnums=(0,), compiler_options=step_opts)
  init_state = jax.jit(lambda p: training.init_train_state(p, optimizer, ema_fn, k_step))
  for batch in (int(b) for b in _BATCHES.value):
    # Digit-like data in [-1, 1]; values do not change the cost of dense float math.
    data = {'image': jax.random.uniform(k_data, (batch, *IMAGE_SHAPE), minval=-1.0, maxval=1.0)}
    state = init_state(params0['params'])  # fresh buffers: the step donates them
    start, cpu_start = time.perf_counter(), time.process_time()
    compiled = train_step.lower(state, data).compile()
    row[f'compile_s_{batch}'] = time.perf_counter() - start
    # CPU seconds barely depend on other processes sharing the cores; wall seconds do.
    row[f'compile_cpu_s_{batch}'] = time.process_time() - cpu_start
    row[f'gflop_{batch}'] = _flops(compiled) / 1e9

    state = [state]

    def one_step(compiled=compiled, state=state, data=data):
      state[0], metrics = compiled(state[0], data)
      return metrics['loss']

    _times(one_step, 2)  # warm-up: first-call allocations
    times = _times(one_step, _STEPS.value)
    row[f'step_s_{batch}'] = statistics.median(times)
    row[f'step_min_s_{batch}'] = min(times)  # the least disturbed by other processes
    assert np.isfinite(float(one_step())), f'{name}: loss is not finite'

  # Sampling cost: one network evaluation on a large batch, as a sampler's scan body does.
  xs = jax.random.normal(k_data, (_SAMPLE_BATCH.value, *IMAGE_SHAPE))
  ts = jnp.full((_SAMPLE_BATCH.value,), 0.5)
  params = jax.device_put(params0)
  start = time.perf_counter()
  forward = jax.jit(model.apply).lower(params, xs, ts).compile()
  row['fwd_compile_s'] = time.perf_counter() - start
  jax.block_until_ready(forward(params, xs, ts))
  times = _times(lambda: forward(params, xs, ts), 5)
  row['fwd_s'], row['fwd_min_s'] = statistics.median(times), min(times)
  return row


def _table(rows: list[dict]) -> str:
  batches = [int(b) for b in _BATCHES.value]
  big = max(batches)
  head = (['config', 'params', 'init s']
          + [f'compile s (b{b})' for b in batches]
          + [f's/step b{b}' for b in batches]
          + [f'GFLOP/s b{big}', f'steps in {_BUDGET_S.value:.0f} s (b{big})',
             f'fwd img/s (b{_SAMPLE_BATCH.value})', '1000 img x 100 NFE (s)'])
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    overhead = r['init_s'] + r[f'compile_s_{big}']
    steps = max(0.0, _BUDGET_S.value - overhead) / r[f'step_s_{big}']
    ips = _SAMPLE_BATCH.value / r['fwd_s']
    cells = ([r['name'], f"{r['params']:,}", f"{r['init_s']:.1f}"]
             + [f"{r[f'compile_s_{b}']:.1f}" for b in batches]
             + [f"{r[f'step_s_{b}']:.3f}" for b in batches]
             + [f"{r[f'gflop_{big}'] / r[f'step_s_{big}']:.0f}", f'{steps:,.0f}',
                f'{ips:,.0f}', f'{100 * 1000 / ips:.1f}'])
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  unknown = [c for c in _CONFIGS.value if c not in CONFIGS]
  if unknown:
    raise app.UsageError(f'unknown configs {unknown}; choose from {list(CONFIGS)}')
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}, dtype={_DTYPE.value}, '
        f'train_opt_level={_TRAIN_OPT_LEVEL.value}, load avg {os.getloadavg()[0]:.1f}',
        flush=True)
  rows = []
  key = jax.random.key(0)
  for name in _CONFIGS.value:
    row = benchmark(name, CONFIGS[name], jax.random.fold_in(key, len(rows)))
    rows.append(row)
    print(f"{name}: {row['params']:,} params, "
          + ', '.join(f'{k}={v:.3f}' for k, v in row.items() if isinstance(v, float))
          + f', load avg {os.getloadavg()[0]:.1f}', flush=True)
  print()
  print(_table(rows))


if __name__ == '__main__':
  app.run(main)
