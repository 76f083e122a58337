r"""What the library's sampling loop costs beyond the network (issue 24, item 4).

  python experiments/benchmark_overhead.py [--trees=/work/base,/work/main] [--repeats=3]

For each source tree (a checkout holding `diffusion_jax/`; the first is "before", the last
"after"), fresh Python processes with that tree first on the path measure:

* runtime: a 10-step DDIM (`ddim_sample`, 'trailing') and a 10-step DPM-Solver++(2M)
  (`dpm_solver_pp_2m_sample`, 'log_snr' grid, final step to data) on DDPM's linear
  `DiscreteVP` (T = 1000), with an almost free eps-network (`eps_hat = 0.1 x`) and with a small
  MLP (32 -> 256 -> 32, tanh, time as an input feature), at batch 256 and 4096 (`x [B, 32]`,
  float32), against a hand-written `lax.scan` of the same update with its coefficients
  precomputed in numpy (the library's own grid times). Each is `jax.jit`ed, warmed up, then
  timed call by call (`block_until_ready`); the table shows the median in microseconds, the
  minimum over `--repeats` rounds. The hand-written result is checked against the library's.
* first call: seconds from the first call of `jax.jit(sampler)` to its result (trace, lower,
  compile, run), for the same two samplers with the free network at batch 256, one fresh
  process per measurement (the minimum over `--repeats`), the persistent compilation cache
  off, the backend initialised beforehand by an unrelated op; wall clock and process CPU time.

Prints Markdown tables (docs/benchmark_overhead.md holds a run).
"""

import inspect
import json
import os
import platform
import subprocess
import sys
import time

from absl import app
from absl import flags

_TREES = flags.DEFINE_list('trees', ['/work/base', os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))], 'Source trees to compare (before first, after last).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Runtime rounds per tree (the minimum median).')
_BATCHES = flags.DEFINE_list('batches', ['256', '4096'], 'Batch sizes.')
_CHILD = flags.DEFINE_string('child', '', 'Internal: runtime | first_call:<sampler>.')

DIM, HIDDEN, STEPS = 32, 256, 10
SAMPLERS = ('ddim', 'dpm_pp_2m')
NETWORKS = ('free', 'mlp')


# --- the child side: runs with one tree's diffusion_jax ----------------------------------------


def _networks():
  import jax
  import jax.numpy as jnp
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  w1 = jax.random.normal(k1, (DIM, HIDDEN)) / DIM**0.5
  wt = jax.random.normal(k2, (HIDDEN,))
  w2 = jax.random.normal(k3, (HIDDEN, DIM)) / HIDDEN**0.5

  def free(x, t, cond=None):
    del t, cond
    return 0.1 * x

  def mlp(x, t, cond=None):
    del cond
    return jnp.tanh(x @ w1 + t[:, None] * wt) @ w2

  return {'free': free, 'mlp': mlp}


def _library(name, model_fn, process):
  from diffusion_jax import parameterization
  from diffusion_jax import samplers
  denoiser = parameterization.make_denoiser(model_fn, process, 'eps')
  if name == 'ddim':
    return lambda x: samplers.ddim_sample(denoiser, process, x, steps=STEPS,
                                          spacing='trailing')[0]
  # Pinned, so that changed defaults do not change what is measured (older trees have no
  # lower_order_final: their steps keep their order to the end).
  pinned = dict(grid='log_snr', t_min=process.t_min)
  if 'lower_order_final' in inspect.signature(samplers.dpm_solver_pp_sample).parameters:
    pinned['lower_order_final'] = False
  return lambda x: samplers.dpm_solver_pp_2m_sample(denoiser, process, x, steps=STEPS,
                                                    **pinned)[0]


def _hand(name, model_fn, process):
  """The same update as the library's, written out: `lax.scan` over precomputed coefficients,
  the network called at the grid time broadcast to [B]."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from diffusion_jax.samplers import grids
  if name == 'ddim':
    n = grids.discrete_timesteps(process.num_steps, STEPS, 'trailing')
    abar = np.concatenate([[1.0], process.alphas_cumprod])
    a_n, s_n = np.sqrt(abar[n]), np.sqrt(1.0 - abar[n])
    m = np.concatenate([n[1:], [0]])
    a_m, s_m = np.sqrt(abar[m]), np.sqrt(1.0 - abar[m])
    # x_m = a_m x0 + s_m eps with x0 = (x - s_n eps) / a_n.
    xs = tuple(jnp.asarray(c, jnp.float32) for c in (n / process.num_steps, a_m / a_n,
                                                     s_m - a_m * s_n / a_n))

    def run(x):
      def step(x, inputs):
        t, a, b = inputs
        eps = model_fn(x, jnp.broadcast_to(t, x.shape[:1]))
        return a * x + b * eps, None
      return jax.lax.scan(step, x, xs)[0]
    return run
  g = grids.time_grid(process, STEPS, 'log_snr', dtype=jnp.float32)
  t, alpha, sigma = (np.asarray(c, np.float64) for c in (g.t, g.alpha, g.sigma))
  lh = 0.5 * np.log(alpha**2 / sigma**2)
  h = np.diff(lh)
  # DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2): x' = (s'/s) x + a' (1 - e^-h) D, with
  # D = (1 + 1/(2r)) m - 1/(2r) m_prev (first step: D = m), m = (x - sigma eps) / alpha.
  r = np.concatenate([[np.inf], h[:-1] / h[1:]])
  base = alpha[1:] * -np.expm1(-h)
  w0, w1 = base * (1.0 + 0.5 / r), -base * 0.5 / r
  xs = tuple(jnp.asarray(c, jnp.float32) for c in (t[:-1], 1.0 / alpha[:-1], sigma[:-1],
                                                   sigma[1:] / sigma[:-1], w0, w1))

  def run(x):
    def x0_hat(x, t, inv_a, s):
      return inv_a * (x - s * model_fn(x, jnp.broadcast_to(t, x.shape[:1])))

    def step(carry, inputs):
      x, prev = carry
      t_i, inv_a, s, ratio, c0, c1 = inputs
      m = x0_hat(x, t_i, inv_a, s)
      return (ratio * x + c0 * m + c1 * prev, m), None
    (x, _), _ = jax.lax.scan(step, (x, jnp.zeros_like(x)), xs)
    return x0_hat(x, t[-1], 1.0 / alpha[-1], sigma[-1])
  return run


def _median_us(fn, x, min_seconds=0.3, max_calls=300):
  fn(x).block_until_ready()
  times, start = [], time.perf_counter()
  while len(times) < 5 or (time.perf_counter() - start < min_seconds and len(times) < max_calls):
    t0 = time.perf_counter()
    fn(x).block_until_ready()
    times.append(time.perf_counter() - t0)
  times.sort()
  return 1e6 * times[len(times) // 2]


def _child_runtime():
  import jax
  import numpy as np
  from diffusion_jax import processes
  process = processes.DiscreteVP.from_name('linear')
  rows = []
  for net_name, model_fn in _networks().items():
    for name in SAMPLERS:
      lib, hand = jax.jit(_library(name, model_fn, process)), jax.jit(_hand(name, model_fn,
                                                                           process))
      for batch in (int(b) for b in _BATCHES.value):
        x = jax.random.normal(jax.random.key(1), (batch, DIM))
        diff = float(np.max(np.abs(np.asarray(lib(x)) - np.asarray(hand(x)))))
        scale = float(np.max(np.abs(np.asarray(lib(x)))))
        rows.append(dict(net=net_name, sampler=name, batch=batch, lib=_median_us(lib, x),
                         hand=_median_us(hand, x), rel_diff=diff / scale))
        print(f'  {net_name} {name} B={batch}: {rows[-1]}', file=sys.stderr, flush=True)
  return rows


def _child_first_call(name):
  import jax
  from diffusion_jax import processes
  jax.config.update('jax_enable_compilation_cache', False)
  process = processes.DiscreteVP.from_name('linear')
  x = jax.random.normal(jax.random.key(1), (256, DIM))
  (x + 1.0).block_until_ready()              # backend and the PRNG initialised beforehand
  fn = jax.jit(_library(name, _networks()['free'], process))
  c0, t0 = time.process_time(), time.perf_counter()
  lowered = fn.lower(x)
  c1, t1 = time.process_time(), time.perf_counter()
  compiled = lowered.compile()
  c2, t2 = time.process_time(), time.perf_counter()
  compiled(x).block_until_ready()
  c3, t3 = time.process_time(), time.perf_counter()
  return dict(sampler=name, trace=t1 - t0, compile=t2 - t1, total=t3 - t0, trace_cpu=c1 - c0,
              compile_cpu=c2 - c1, total_cpu=c3 - c0)


# --- the parent side -------------------------------------------------------------------------


def _run_child(tree, child):
  env = dict(os.environ, PYTHONPATH=tree, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'))
  out = subprocess.run([sys.executable, os.path.abspath(__file__), f'--child={child}',
                        f'--batches={",".join(_BATCHES.value)}'], cwd=tree, env=env,
                       capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f'child {child} in {tree} failed:\n{out.stderr[-3000:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if _CHILD.value:
    import diffusion_jax
    print(f'  diffusion_jax from {diffusion_jax.__file__}', file=sys.stderr)
    kind, _, arg = _CHILD.value.partition(':')
    result = _child_runtime() if kind == 'runtime' else _child_first_call(arg)
    print(json.dumps(result))
    return
  import jax
  trees = _TREES.value
  print(f'# sampling overhead: {platform.processor() or platform.machine()}, '
        f'{os.cpu_count()} CPUs, jax {jax.__version__}, trees {trees}', flush=True)
  runtime = {}
  for _ in range(_REPEATS.value):
    for tree in trees:   # alternate the trees, so load on a shared machine hits both alike
      for row in _run_child(tree, 'runtime'):
        key = (tree, row['net'], row['sampler'], row['batch'])
        best = runtime.get(key)
        runtime[key] = row if best is None else dict(row, lib=min(best['lib'], row['lib']),
                                                     hand=min(best['hand'], row['hand']))
  print('\n## Runtime: 10 steps, microseconds per call (median; min over rounds)\n')
  names = [os.path.basename(t.rstrip('/')) for t in trees]
  print('| network | sampler | B | hand-written scan | '
        + ' | '.join(f'library ({n}) | ratio ({n})' for n in names) + ' | max rel. diff |')
  print('|---|---|---:|---:|' + '---:|---:|' * len(trees) + '---:|')
  for net in NETWORKS:
    for name in SAMPLERS:
      for batch in (int(b) for b in _BATCHES.value):
        rows = [runtime[(t, net, name, batch)] for t in trees]
        hand = min(r['hand'] for r in rows)
        cells = ' | '.join(f'{r["lib"]:.0f} | {r["lib"] / hand:.2f}x' for r in rows)
        diff = max(r['rel_diff'] for r in rows)
        print(f'| {net} | {name} | {batch} | {hand:.0f} | {cells} | {diff:.1e} |', flush=True)
  print('\n## First call of a 10-step sampler (free network, B 256), seconds\n')
  print('Wall clock and, in brackets, CPU time of the process (all threads; what a shared, '
        'loaded machine distorts least). Minimum over `--repeats` fresh processes.\n')
  print('| sampler | ' + ' | '.join(f'{n}: trace + compile (+ run) = first call'
                                    for n in names) + ' |')
  print('|---|' + '---|' * len(trees))
  for name in SAMPLERS:
    cells = []
    for tree in trees:
      runs = [_run_child(tree, f'first_call:{name}') for _ in range(_REPEATS.value)]
      r = {k: min(run[k] for run in runs) for k in runs[0] if k != 'sampler'}
      cells.append(f'{r["trace"]:.2f} + {r["compile"]:.2f} = {r["total"]:.2f} '
                   f'[{r["trace_cpu"]:.2f} + {r["compile_cpu"]:.2f} = {r["total_cpu"]:.2f}]')
    print(f'| {name} | ' + ' | '.join(cells) + ' |', flush=True)


if __name__ == '__main__':
  app.run(main)
