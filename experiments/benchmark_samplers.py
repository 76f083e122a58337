r"""Samplers at a fixed NFE: accuracy on a Gaussian mixture, wall time, and what compiling the
whole loop buys over stepping from Python.

  python -m experiments.benchmark_samplers [--samplers=euler,heun,...] [--nfes=5,10,20,50] \
      [--batch=2048] [--out=docs/sampler_benchmark.md]

Part 1 — accuracy. Data: a 2-D mixture of three Gaussians (weights 0.5/0.3/0.2) with its exact
denoiser (`analytic.gmm_denoiser`), the DDPM linear schedule (T = 1000), float64. Every sampler
starts from the same prior draw `x_T`. For each target NFE the sampler runs with the most steps
whose exact NFE is <= the target ('adaptive' runs at rtol = atol = 1e-2, 1e-3, 1e-4 and
reports the NFE it used; on this DiscreteVP its velocity has a kink at every integer step, which
costs it rejected steps). Columns:
  ode_err   RMS distance of each endpoint to the converged PF-ODE endpoint of the same x_T
            (Heun, 4000 Karras steps) — only for deterministic samplers (same output for two
            keys); stochastic samplers solve a different problem, so '—';
  sw        sliced Wasserstein-2 between the samples and as many exact mixture draws (the floor,
            exact draws against exact draws, is printed above the table);
  ms        median wall time of the compiled sampler over 3 runs (after compiling).
Part 2 — compiled whole vs stepping from Python, with a small MLP denoiser (64-D, 3 residual
blocks of width 256, random weights) on a batch of 256: the same Euler/DDIM update run as one
jitted `lax.scan`, and as a Python loop calling a jitted single step (one dispatch and one
host round-trip per step, as in loop-per-step libraries). Both compile times are reported.
"""

import functools
import inspect
import platform
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import analytic
from diffusion_jax import processes
from diffusion_jax import samplers
from diffusion_jax.metrics.sliced import sliced_wasserstein
from diffusion_jax.models.mlp import MLP

_SAMPLERS = flags.DEFINE_list('samplers', None, 'names from SAMPLERS (default: all)')
_NFES = flags.DEFINE_list('nfes', ['5', '10', '20', '50'], 'target numbers of evaluations')
_BATCH = flags.DEFINE_integer('batch', 2048, 'samples per run in part 1')
_OUT = flags.DEFINE_string('out', '', 'also write the tables to this Markdown file')

WEIGHTS = np.array([0.5, 0.3, 0.2])
MEANS = np.array([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.2]])
S2 = np.full((3, 2), 0.04)
# Samplers that need options beyond the common signature to be meaningful here.
OPTIONS = {'heun_churn': ('heun', {'s_churn': 10.0})}
ADAPTIVE_RTOLS = (1e-2, 1e-3, 1e-4)
NOTES = ('Notes: `consistency` here re-noises and denoises with the exact denoiser, which is not '
         'a consistency function, so it is not expected to converge with NFE; it is listed for '
         'its cost. Grids are each sampler\'s default (Karras for euler/heun, uniform t for '
         'flow_*, uniform log-SNR for DPM-Solver/UniPC, trailing for ddpm/ddim); on this '
         'schedule the Karras grid starts at sigma/alpha = 157, where Heun with 3-5 steps '
         'overshoots. `adaptive` pays for the kinks of the DiscreteVP alpha(t) with rejected '
         'steps.'
         ' `sw` is noisy at n = 2,048: exact-vs-exact draws give 0.016-0.095 over four seeds, '
         'and the converged ODE gives 0.053-0.086 over four x_T draws, so sw differences below '
         '~0.04 are noise and the deterministic samplers\' plateau near 0.085 is this x_T\'s '
         'draw, not a bias; `ode_err` is the precise column.\n')


def _timed(fn, *args, repeats=3):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _nfe(sampler, den, proc, x_T, steps, options):
  box = {}

  def run(x):
    y, info = sampler(den, proc, x, jax.random.key(0), steps=steps, **options)
    box['nfe'] = info['nfe']
    return y
  jax.eval_shape(run, x_T)
  return int(box['nfe'])


def _steps_for(sampler, den, proc, x_T, target, options):
  """The most steps whose NFE is <= target (NFE is non-decreasing in steps), or None."""
  best = None
  for steps in range(1, target + 1):
    try:
      nfe = _nfe(sampler, den, proc, x_T, steps, options)
    except ValueError:
      continue
    if nfe > target:
      break
    best = (steps, nfe)
  return best


def _mixture_samples(key, n):
  k_c, k_z = jax.random.split(key)
  comp = jax.random.choice(k_c, 3, (n,), p=jnp.asarray(WEIGHTS))
  return jnp.asarray(MEANS)[comp] + jnp.sqrt(jnp.asarray(S2))[comp] * jax.random.normal(
      k_z, (n, 2), jnp.float64)


def accuracy_table(names, nfes, batch):
  proc = processes.DiscreteVP.from_name('linear', 1000)
  den = analytic.gmm_denoiser(WEIGHTS, MEANS, S2, proc)
  x_T = jax.random.normal(jax.random.key(0), (batch, 2), jnp.float64)
  reference, _ = jax.jit(lambda x: samplers.heun_sample(den, proc, x, steps=4000))(x_T)
  data = _mixture_samples(jax.random.key(1), batch)
  sw = jax.jit(lambda a, b: sliced_wasserstein(jax.random.key(2), a, b))
  floor = float(sw(_mixture_samples(jax.random.key(3), batch), data))
  rows = []
  for name in names:
    base, options = OPTIONS.get(name, (name, {}))
    sampler = samplers.SAMPLERS[base]
    adaptive = base == 'adaptive'   # its NFE follows from the tolerance, not from steps
    for target in (ADAPTIVE_RTOLS if adaptive else nfes):
      if adaptive:
        steps, options = 1, {'rtol': target, 'atol': target}
      else:
        found = _steps_for(sampler, den, proc, x_T, target, options)
        if found is None:
          rows.append((name, target, '—', '—', '—', '—', '—'))
          continue
        steps, nfe = found
      run = jax.jit(functools.partial(sampler, den, proc, steps=steps, **options))
      x, info = run(x_T, jax.random.key(4))
      if adaptive:
        nfe, steps, target = int(info['nfe']), '—', f'rtol {target:g}'
      x_other, _ = run(x_T, jax.random.key(5))
      deterministic = bool(jnp.all(x == x_other))
      err = float(jnp.sqrt(jnp.mean(jnp.sum((x - reference) ** 2, -1)))) if deterministic \
          else None
      ms = 1e3 * _timed(lambda x, k: run(x, k)[0], x_T, jax.random.key(4))
      rows.append((name, target, steps, nfe, '—' if err is None else f'{err:.2e}',
                   f'{float(sw(x, data)):.4f}', f'{ms:.1f}'))
      print(f'  {name:22s} NFE {nfe:3d} (steps {steps!s:>3s})  ode_err '
            f'{rows[-1][4]:>9s}  sw {rows[-1][5]}  {rows[-1][6]} ms', flush=True)
  head = ('| sampler | target NFE | steps | NFE | ode_err | sw | ms |\n'
          '|---|---:|---:|---:|---:|---:|---:|\n')
  table = head + ''.join('| ' + ' | '.join(str(c) for c in r) + ' |\n' for r in rows)
  return f'sliced-W2 floor (exact vs exact, n = {batch}): {floor:.4f}\n\n' + table


def compiled_vs_python(nfe: int = 50, batch: int = 256, dim: int = 64):
  proc = processes.DiscreteVP.from_name('linear', 1000)
  model = MLP(hidden=256, depth=3)
  params = model.init(jax.random.key(0), jnp.zeros((1, dim)), jnp.zeros((1,)))['params']

  def den(x, t, cond=None):
    eps = model.apply({'params': params}, x, jnp.broadcast_to(t, x.shape[:1]))
    a, s = proc.alpha(t), proc.sigma(t)
    return (x - s * eps) / a, eps

  x_T = jax.random.normal(jax.random.key(1), (batch, dim))
  g = samplers.time_grid(proc, nfe, 'karras')
  t, alpha, sigma = (jnp.asarray(a) for a in (g.t, g.alpha, g.sigma))
  whole = jax.jit(lambda x: samplers.euler_sample(den, proc, x, steps=nfe)[0])

  @jax.jit
  def one_step(x, t_i, a_n, s_n):
    x0, eps = den(x, t_i)
    return a_n * x0 + s_n * eps

  final = jax.jit(lambda x, t_i: den(x, t_i)[0])

  def stepped(x):
    for i in range(nfe - 1):
      x = one_step(x, t[i], alpha[i + 1], sigma[i + 1])
    return final(x, t[-1])

  start = time.perf_counter()
  jax.block_until_ready(whole(x_T))
  compile_whole = time.perf_counter() - start
  start = time.perf_counter()
  jax.block_until_ready(stepped(x_T))
  compile_step = time.perf_counter() - start
  np.testing.assert_allclose(whole(x_T), stepped(x_T), rtol=1e-4, atol=1e-4)
  t_whole, t_step = _timed(whole, x_T, repeats=9), _timed(stepped, x_T, repeats=9)
  return (f'| {batch} | whole loop in one jit (lax.scan) | {compile_whole:.2f} | '
          f'{1e3 * t_whole:.1f} | {batch / t_whole:.0f} | {t_step / t_whole:.2f}x |\n'
          f'| {batch} | Python loop over a jitted step | {compile_step:.2f} | {1e3 * t_step:.1f} | '
          f'{batch / t_step:.0f} | |\n')


def main(argv):
  del argv
  names = _SAMPLERS.value or [n for n in samplers.SAMPLERS if 'sampler' not in
                              inspect.signature(samplers.SAMPLERS[n]).parameters]
  names = names + [n for n in OPTIONS if _SAMPLERS.value is None]
  nfes = [int(n) for n in _NFES.value]
  machine = (f'{platform.processor() or platform.machine()}, {jax.devices()[0].platform} '
             f'({jax.device_count()} device(s)), jax {jax.__version__}')
  print(f'Machine: {machine}\nPart 1: accuracy at fixed NFE (float64)', flush=True)
  with jax.enable_x64(True):
    part1 = accuracy_table(names, nfes, _BATCH.value)
  print(part1, flush=True)
  print('Part 2: compiled whole loop vs Python stepping (float32)', flush=True)
  part2 = ('| batch | loop | first call (compile + run) s | run ms | images/s | speed-up |\n'
           '|---:|---|---:|---:|---:|---:|\n')
  for batch in (8, 64, 256):
    part2 += compiled_vs_python(batch=batch)
  part2 += ('\nEuler/DDIM at NFE 50 with an MLP denoiser (64-D, width 256, depth 3, random '
            'weights), float32.\n')
  print(part2)
  if _OUT.value:
    with open(_OUT.value, 'w', encoding='utf-8') as f:
      f.write(f'# Sampler benchmark\n\nMachine: {machine}\n\n## Accuracy at fixed NFE\n\n'
              f'{part1}\n{NOTES}\n## Compiled whole loop vs Python stepping\n\n{part2}')


if __name__ == '__main__':
  app.run(main)
