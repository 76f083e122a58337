r"""One benchmark table for this machine: training per reference config, sampling per sampler.

  python -m experiments.benchmark [--models=digits,ddpm_cifar10,dit:S/2] [--batch=2]
      [--samplers=ddim,euler,heun,dpm_solver_pp_2m] [--nfe=20] [--sample_batch=256]
      [--output=docs/benchmark.md]

Part 1, per reference config (`benchmark_models.benchmark`): parameters, compile time of the
jitted `training.make_train_step` (cold: no persistent cache), steady-state training
images/s at --batch, and the peak device memory of the step as XLA accounts it (arguments +
outputs + temporaries, less donated buffers).
Part 2, per sampler on the quick-start digits U-Net (random weights: speed does not depend on
them) at a fixed NFE: images/s of the whole sampler compiled as one `lax.scan` against the same
update stepped from Python (every sampler's step function, jitted once and dispatched per step
with a host sync: `_common.scan` replaced for the measurement), and the first-call time of each
(compile included). Both paths are checked to give the same samples.
On a GPU machine the same command gives the GPU numbers (add --dtype=bfloat16 there).
"""

import statistics
import time
from unittest import mock

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from configs import digits as digits_config
from diffusion_jax import generation
from diffusion_jax import samplers
from diffusion_jax import run_config
from diffusion_jax.samplers import _common
from experiments import benchmark_models

# Part 1 takes benchmark_models' flags: --models (every reference config by default), --batch,
# --steps and --dtype.
FLAGS = flags.FLAGS
_SAMPLERS = flags.DEFINE_list('samplers', ['ddpm', 'ddim', 'euler', 'heun', 'dpm_solver_pp_2m',
                                           'unipc_bh2', 'euler_maruyama'], 'Samplers of part 2.')
_NFE = flags.DEFINE_integer('nfe', 20, 'NFE of every sampler in part 2 (steps chosen to fit).')
_SAMPLE_BATCH = flags.DEFINE_integer('sample_batch', 256, 'Images per sampler call.')
_OUTPUT = flags.DEFINE_string('output', 'docs/benchmark.md', 'Markdown output ("" = none).')


_STEPPED_SECONDS = []   # the stepped loop's own time per call (benchmark bookkeeping)


def _python_scan(step_fn, carry, xs, return_trajectory, x_of=lambda c: c):
  """`_common.scan` as a Python loop over one jitted step, synchronising after each step. The
  step is compiled on a throw-away first call, so the recorded time is the loop's alone."""
  del return_trajectory, x_of
  step = jax.jit(step_fn)
  n = jax.tree.leaves(xs)[0].shape[0]
  jax.block_until_ready(step(carry, jax.tree.map(lambda a: a[0], xs)))   # compile
  t0 = time.perf_counter()
  for i in range(n):
    carry = jax.block_until_ready(step(carry, jax.tree.map(lambda a, i=i: a[i], xs)))
  _STEPPED_SECONDS.append(time.perf_counter() - t0)
  return carry, None


def _time(fn, repeats=3):
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn())
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return out, first, statistics.median(times)


def sampler_rows(names, nfe: int, batch: int):
  config = digits_config.get_config()
  setup = run_config.build(config)
  params = jax.jit(setup.model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 1)),
                                      jnp.zeros((1,)))['params']
  # A zero-initialised output layer would make every sampler trivial: perturb all weights.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys, strict=True)])

  den = generation.make_model_denoiser(setup, params, clip_x0=1.0)
  x_T = jax.random.normal(jax.random.key(2), (batch, 8, 8, 1))
  key = jax.random.key(3)
  from experiments import ablation_lib  # pylint: disable=g-import-not-at-top
  rows = []
  for name in names:
    steps, exact = ablation_lib.steps_for_nfe(name, setup, nfe)
    if not steps:
      print(f'  {name}: no step count fits NFE {nfe}; skipped', flush=True)
      continue
    fn = samplers.SAMPLERS[name]
    whole = jax.jit(lambda x, k, fn=fn, steps=steps: fn(den, setup.process, x, k, steps=steps)[0])
    out_w, first_w, run_w = _time(lambda: whole(x_T, key))
    with mock.patch.object(_common, 'scan', _python_scan):
      stepped = lambda fn=fn, steps=steps: fn(den, setup.process, x_T, key, steps=steps)[0]
      _STEPPED_SECONDS.clear()
      out_s, first_s, _ = _time(stepped)
      # A fresh closure per call means a fresh compile of the step: time the loops alone.
      run_s = statistics.median(_STEPPED_SECONDS[1:])
    diff = float(jnp.max(jnp.abs(out_w - out_s)))
    rows.append(dict(sampler=name, steps=steps, nfe=exact, whole_first=first_w, whole_s=run_w,
                     step_first=first_s, step_s=run_s, diff=diff, batch=batch))
    print(f'  {name:18s} NFE {exact:3d}: whole {batch / run_w:8.0f} img/s, stepped '
          f'{batch / run_s:8.0f} img/s ({run_s / run_w:.2f}x), max diff {diff:.1e}', flush=True)
  return rows


def sampler_table(rows) -> str:
  lines = ['| sampler | steps | NFE | whole loop: first call s | whole loop images/s | '
           'Python-stepped: first call s | Python-stepped images/s | speed-up | max diff |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {r['whole_first']:.2f} | "
                 f"{r['batch'] / r['whole_s']:.0f} | {r['step_first']:.2f} | "
                 f"{r['batch'] / r['step_s']:.0f} | {r['step_s'] / r['whole_s']:.2f}x | "
                 f"{r['diff']:.1e} |")
  return '\n'.join(lines)


def train_table(rows) -> str:
  lines = ['| config | input | params (M) | compile (s) | step (s) | images/s | '
           'peak memory (GiB, XLA) |', '|---|---|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(f"| {r['model']} | {r['shape']} | {r['params_m']:.3g} | {r['compile_s']:.1f} | "
                 f"{r['step_s']:.3f} | {r['images_per_s']:.2f} | {r['memory_gib']:.3f} |")
  return '\n'.join(lines)


def main(argv):
  del argv
  machine = benchmark_models.machine()
  print(f'Machine: {machine}\nPart 1: training, batch {FLAGS.batch}', flush=True)
  train_rows = []
  for spec in FLAGS.models:
    train_rows.append(benchmark_models.benchmark(spec, FLAGS.batch, FLAGS.steps, FLAGS.dtype))
    r = train_rows[-1]
    print(f"  {spec}: {r['images_per_s']:.2f} images/s, compile {r['compile_s']:.1f} s, "
          f"peak {r['memory_gib']:.3f} GiB", flush=True)
  print(f'Part 2: samplers at NFE {_NFE.value}, batch {_SAMPLE_BATCH.value}', flush=True)
  s_rows = sampler_rows(_SAMPLERS.value, _NFE.value, _SAMPLE_BATCH.value)
  text = (f'# Benchmark\n\nMachine: {machine}. Written by `python -m experiments.benchmark` '
          f'(defaults); timings vary about 2x between runs on shared machines.\n\n'
          f'## Training (batch {FLAGS.batch}, {FLAGS.dtype}, `training.make_train_step` with the '
          f'config\'s objective, optimizer and EMA)\n\n'
          f'{train_table(train_rows)}\n\n'
          f'## Sampling: the whole sampler compiled vs stepped from Python\n\n'
          f'Quick-start digits U-Net (0.18 M parameters, perturbed random weights), '
          f'{_SAMPLE_BATCH.value} images per call, NFE {_NFE.value} (steps chosen to fit), '
          f'float32; the median of 3 calls after the first. "Python-stepped" runs each '
          f'sampler\'s own step function, jitted once per call, from a Python loop with a host '
          f'sync per step; its images/s count the loop alone (the step\'s compile excluded), '
          f'its first call includes everything.\n\n{sampler_table(s_rows)}\n')
  print(text)
  if _OUTPUT.value:
    with open(_OUTPUT.value, 'w', encoding='utf-8') as f:
      f.write(text)


if __name__ == '__main__':
  app.run(main)
