r"""Reference models on this machine: parameters, FLOPs, compile time, train-step speed.

  python -m experiments.benchmark_models [--models=ddpm_cifar10,dit:S/2] [--batch=2] \
      [--steps=3] [--dtype=bfloat16] [--out=docs/model_benchmark.md]

For each model (a reference config of `configs/`, optionally `:variant`): parameter count;
forward GFLOPs per image and forward+backward GFLOPs per train step, both from XLA's cost
analysis of the compiled programs (XLA counts a multiply-add as 2 FLOPs; papers such as DiT
count it once, so the table also gives forward GMACs = GFLOPs / 2 per image); compile time of
one jitted `training.make_train_step` (the config's objective, optimizer and EMA, as the
training loop builds them, on a random batch; state donated);
steady-state seconds per step (median of --steps after one warm-up) and images/s; achieved
FLOP/s against this machine's measured dense float32 matmul peak. The persistent compilation
cache is not enabled: compile times are cold. Writes a Markdown table with the machine
description to --out.
"""

import importlib
import os
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from diffusion_jax import run_config
from diffusion_jax import training
from experiments import cli

DEFAULT_MODELS = ('digits', 'digits:dit', 'ddpm_cifar10', 'ddpm_cifar10:ddpmpp',
                  'adm_imagenet64', 'dit:S/2', 'dit:B/2', 'dit:L/2', 'dit:XL/2')

_MODELS = flags.DEFINE_list('models', list(DEFAULT_MODELS), 'configs/<name>[:variant] list.')
_BATCH = flags.DEFINE_integer('batch', 2, 'Train batch size (small: this is a CPU).')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed train steps after one warm-up step.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
_OUT = flags.DEFINE_string('out', 'docs/model_benchmark.md', 'Markdown output ("" = none).')


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
  """Best-of-`repeats` float32 GFLOP/s of an n x n matmul (2 n^3 FLOPs)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best / 1e9


def load(spec: str):
  name, _, variant = spec.partition(':')
  module = importlib.import_module(f'configs.{name}')
  config = module.get_config(variant) if variant else module.get_config()
  shape = getattr(module, 'IMAGE_SHAPE', (8, 8, 1))
  return config, tuple(shape)


def _flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax returns one dict per device
    analysis = analysis[0]
  return float(analysis.get('flops', float('nan')))


def benchmark(spec: str, batch: int, steps: int, dtype: str) -> dict:
  config, shape = load(spec)
  config.model.dtype = dtype
  setup = run_config.build(config, image_shape=shape)  # validates; opens no data
  model = setup.model
  x = jnp.zeros((batch, *shape), jnp.float32)
  t = jnp.full((batch,), 0.5)
  labels = jnp.zeros((batch,), jnp.int32) if setup.conditional else None

  t0 = time.perf_counter()
  params = jax.jit(model.init)(jax.random.key(0), x[:1], t[:1],
                               None if labels is None else labels[:1])['params']
  jax.block_until_ready(params)
  init_s = time.perf_counter() - t0
  n_params = sum(p.size for p in jax.tree.leaves(params))

  fwd = jax.jit(lambda p, x, t, c: model.apply({'params': p}, x, t, c))
  fwd_compiled = fwd.lower(params, x[:1], t[:1], None if labels is None else labels[:1]).compile()
  fwd_flops = _flops(fwd_compiled)  # one image

  # The library's train step, as the training loop builds it: objective, optimizer, EMA.
  optimizer = training.make_optimizer(setup.optim, setup.train.num_steps)
  ema_fn = training.ema(setup.train.ema_decay)
  step_fn = training.make_train_step(setup.objective, model.apply, optimizer, ema_fn,
                                     conditional=setup.conditional)
  state = jax.jit(lambda p: training.init_train_state(p, optimizer, ema_fn,
                                                      jax.random.key(1)))(params)
  x0 = jax.random.uniform(jax.random.key(2), x.shape, minval=-1, maxval=1)
  data = {'image': x0} if labels is None else {'image': x0, 'label': labels}
  step = jax.jit(step_fn, donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  step_flops = _flops(compiled)
  memory_gib = peak_memory_bytes(compiled) / 2 ** 30

  times = []
  for _ in range(steps + 1):
    t0 = time.perf_counter()
    state, metrics = compiled(state, data)
    loss = jax.block_until_ready(metrics['loss'])
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times[1:])
  return dict(model=spec, shape='x'.join(map(str, shape)), params_m=n_params / 1e6,
              fwd_gflops=fwd_flops / 1e9, fwd_gmacs=fwd_flops / 2e9,
              step_gflops=step_flops / 1e9, init_s=init_s, compile_s=compile_s, step_s=step_s,
              images_per_s=batch / step_s, achieved_gflops=step_flops / step_s / 1e9,
              loss=float(loss), memory_gib=memory_gib)


def peak_memory_bytes(compiled) -> float:
  """XLA's own account of a compiled program's device memory: arguments + outputs + temporaries,
  less what donation aliases (`memory_analysis()`; nan where the backend gives none)."""
  m = compiled.memory_analysis()
  if m is None:
    return float('nan')
  return float(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def machine() -> str:
  dev = jax.devices()[0]
  return (f'{cli.cpu_name()}, {os.cpu_count()} cores, '
          f'jax {jax.__version__} on {dev.platform} ({dev.device_kind})')


def table(rows, peak: float) -> str:
  head = ('| model | input | params (M) | fwd GFLOPs / image | fwd GMACs / image | '
          'train-step GFLOPs | compile (s) | step (s) | images/s | achieved GFLOP/s | '
          '% of peak |')
  lines = [head, '|' + '---|' * 11]
  for r in rows:
    lines.append(
        f"| {r['model']} | {r['shape']} | {r['params_m']:.3g} | {r['fwd_gflops']:.3g} | "
        f"{r['fwd_gmacs']:.3g} | {r['step_gflops']:.3g} | {r['compile_s']:.1f} | "
        f"{r['step_s']:.3f} | {r['images_per_s']:.2f} | {r['achieved_gflops']:.1f} | "
        f"{100 * r['achieved_gflops'] / peak:.0f} |")
  return '\n'.join(lines)


def main(argv):
  del argv
  peak = matmul_peak_gflops()
  print(f'{machine()}; dense float32 matmul peak {peak:.0f} GFLOP/s', flush=True)
  rows = []
  for spec in _MODELS.value:
    t0 = time.perf_counter()
    row = benchmark(spec, _BATCH.value, _STEPS.value, _DTYPE.value)
    rows.append(row)
    print(f"{spec}: {row['params_m']:.3g} M params, {row['fwd_gmacs']:.3g} fwd GMACs/image, "
          f"compile {row['compile_s']:.1f} s, {row['step_s']:.3f} s/step, "
          f"{row['images_per_s']:.2f} images/s ({time.perf_counter() - t0:.0f} s)", flush=True)
  text = table(rows, peak)
  print(text)
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
    with open(_OUT.value, 'w', encoding='utf-8') as f:
      f.write('# Reference models: size and speed\n\n'
              f'Machine: {machine()}; measured dense float32 matmul peak {peak:.0f} GFLOP/s. '
              f'Batch {_BATCH.value}, compute dtype {_DTYPE.value}, median of {_STEPS.value} '
              f'train steps (`training.make_train_step` with the config\'s objective, optimizer '
              'and EMA) after one warm-up.\n'
              'FLOPs are from XLA\'s cost analysis (a multiply-add = 2 FLOPs); GMACs = '
              'GFLOPs / 2 is the convention of the DiT paper.\n\n'
              f'Command: `python -m experiments.benchmark_models '
              f'--models={",".join(_MODELS.value)} --batch={_BATCH.value} '
              f'--steps={_STEPS.value} --dtype={_DTYPE.value}`\n\n' + text + '\n')
    print(f'wrote {_OUT.value}')



if __name__ == '__main__':
  app.run(main)
