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
_PARTS = flags.DEFINE_list('parts', ['accuracy', 'few_step', 'compiled'],
                           'which parts to run: accuracy, few_step, compiled')
_HANDPICKED = flags.DEFINE_bool('handpicked', False, 'few_step: also search the best of the '
                                'hand-picked options of the old defaults (grids x t_min), slow')

WEIGHTS = np.array([0.5, 0.3, 0.2])
MEANS = np.array([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.2]])
S2 = np.full((3, 2), 0.04)
# Samplers that need options beyond the common signature to be meaningful here.
OPTIONS = {'heun_churn': ('heun', {'s_churn': 10.0})}
ADAPTIVE_RTOLS = (1e-2, 1e-3, 1e-4)
NOTES = ('Notes: `consistency` here re-noises and denoises with the exact denoiser, which is not '
         'a consistency function, so it is not expected to converge with NFE; it is listed for '
         'its cost. Grids are each sampler\'s default (\'auto\' for DPM-Solver, '
         'DPM-Solver++, UniPC, iPNDM, Euler and heun (heun\'s own rule, below 20 steps: one '
         'Euler step to log-SNR -3, then Heun; Karras from 20), trailing for ddpm/ddim); '
         'the flow_* solvers refuse this DiscreteVP (—); on this schedule the Karras grid '
         'starts at sigma/alpha = 157, where Heun with 3-5 steps overshoots. `adaptive` '
         'pays for the kinks of the DiscreteVP alpha(t) with rejected steps.'
         ' `sw` is noisy at n = 2,048: exact-vs-exact draws give 0.016-0.095 over four seeds, '
         'and the converged ODE gives 0.053-0.086 over four x_T draws, so sw differences below '
         '~0.04 are noise and the deterministic samplers\' plateau near 0.085 is this x_T\'s '
         'draw, not a bias; `ode_err` is the precise column.\n')


FEW_NOTES = ('Notes: "default now" is each sampler with no options; for DPM-Solver (1-3), '
             'DPM-Solver++, UniPC, iPNDM (also variant fixed) and Euler that is '
             '`grid=\'auto\'` (`samplers.defaults`: one step from t = 1 straight to log-SNR '
             '-4, then uniform log-SNR up to 1.5 + 0.4 steps, below 20 steps); singlestep '
             'DPM-Solver-3 takes that first step as one DDIM step up to 3 grid times (5 calls). '
             'Heun\'s default is its own rule (`defaults`, rule \'heun\'): one Euler step from '
             't = 1 straight to log-SNR -3, then Heun on uniform log-SNR up to steps - 2, '
             '2 steps - 2 calls, below 20 steps. The DP schedule '
             'is searched (GITS cost, Euler steps) on 512 other prior draws (key 7) for the '
             'step count a named grid runs at that NFE. Hand-picked: every grid, t_min and '
             'Karras rho of the old options (`HAND_GRIDS`, `HAND_T_MINS`), best per NFE on '
             'these very draws, so it is an optimistic bar.\n')


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


# Part 1b: few steps. The defaults before the few-step rules (issue 24) written out, per sampler:
# the grid each took by default then (lower-order final steps did not exist).
OLD_DEFAULTS = {'dpm_solver_pp_2m': {'grid': 'log_snr'}, 'dpm_solver_pp_3m': {'grid': 'log_snr'},
                'unipc_bh1': {'grid': 'log_snr'}, 'unipc_bh2': {'grid': 'log_snr'},
                'euler': {'grid': 'karras'}, 'ipndm': {'grid': 'karras', 'variant': 'variable'},
                'ddim': {},
                'heun': {'grid': 'karras'}, 'dpm_solver_2': {'grid': 'log_snr'},
                'dpm_solver_3': {'grid': 'log_snr'}}
FEW_NFES = (4, 5, 6, 8, 10)
# The hand-picked options searched: every named grid (the integer spacings on this DiscreteVP),
# end times t_min, and Karras exponents; DDIM takes only its spacing.
HAND_GRIDS = ('t', 'log_snr', 'karras', 'leading', 'trailing', 'linspace')
HAND_T_MINS = (None, 2e-3, 5e-3, 1e-2, 2e-2, 4e-2, 8e-2)


def _handpicked(name):
  params = inspect.signature(samplers.SAMPLERS[name]).parameters
  if 'spacing' in params:
    return [{'spacing': sp} for sp in ('leading', 'trailing', 'linspace')]
  out = []
  for g in HAND_GRIDS:
    for tm in (HAND_T_MINS if g not in ('leading', 'trailing', 'linspace') else (None,)):
      base = {'grid': g, **({} if tm is None else {'t_min': tm})}
      out += [base] + ([{**base, 'rho': r} for r in (3.0, 5.0)] if g == 'karras' else [])
  return out


def few_step_table(names, batch, handpicked: bool):
  """Error against the exact ODE endpoint at NFE 4-10: the old defaults, the defaults now (no
  options), with lower-order final steps, the DP-optimised schedule (`optimized_grids`, searched
  on other prior draws), and the best hand-picked old options."""
  from diffusion_jax.samplers import optimized_grids  # pylint: disable=g-import-not-at-top
  proc = processes.DiscreteVP.from_name('linear', 1000)
  den = analytic.gmm_denoiser(WEIGHTS, MEANS, S2, proc)
  x_T = jax.random.normal(jax.random.key(0), (batch, 2), jnp.float64)
  reference, _ = jax.jit(lambda x: samplers.heun_sample(den, proc, x, steps=4000))(x_T)
  x_search = jax.random.normal(jax.random.key(7), (512, 2), jnp.float64)
  dp = {}

  def err(name, target, options):
    sampler = samplers.SAMPLERS[name]
    found = _steps_for(sampler, den, proc, x_T, target, options)
    if found is None:
      return None
    x, _ = jax.jit(functools.partial(sampler, den, proc, steps=found[0], **options))(
        x_T, jax.random.key(4))
    e = float(jnp.sqrt(jnp.mean(jnp.sum((x - reference) ** 2, -1))))
    return e if np.isfinite(e) else float('inf')

  def fmt(e):
    return '—' if e is None else f'{e:.3f}' if e < 10 else f'{e:.3g}'

  rows, ratios = [], []
  for name in names:
    params = inspect.signature(samplers.SAMPLERS[name]).parameters
    settings = [('old default', OLD_DEFAULTS.get(name, {})), ('**default now**', {})]
    if 'lower_order_final' in params:
      settings.append(('default + lower_order_final', {'lower_order_final': True}))
    got = {}
    for label, options in settings:
      got[label] = [err(name, n, options) for n in FEW_NFES]
    if 'grid' in params:           # the DP schedule of the steps a named grid runs at n
      errs = []                    # (the 'auto' jump of heun / DPM-Solver-3 saves calls)
      for n in FEW_NFES:
        steps = _steps_for(samplers.SAMPLERS[name], den, proc, x_T, n, {'grid': 'log_snr'})
        if steps is None:
          errs.append(None)
          continue
        if steps[0] not in dp:
          dp[steps[0]] = optimized_grids.dp_schedule(den, proc, x_search, steps=steps[0]).times
        errs.append(err(name, n, {'grid': dp[steps[0]]}))
      got['DP schedule (GITS)'] = errs
    if handpicked:
      best = [None] * len(FEW_NFES)
      for options in _handpicked(name):
        for i, n in enumerate(FEW_NFES):
          try:
            e = err(name, n, options)
          except ValueError:
            continue
          if e is not None and (best[i] is None or e < best[i][0]):
            best[i] = (e, options)
      got['best hand-picked (old options)'] = [None if b is None else b[0] for b in best]
      got['  which'] = [None if b is None else b[1] for b in best]
    for label, errs in got.items():
      cells = [str(e) if label == '  which' else fmt(e) for e in errs]
      rows.append((name if label == 'old default' else '', label, *cells))
      print(f'  {name:18s} {label:32s} ' + ' '.join(f'{c:>8s}' for c in cells), flush=True)
    old, new = got['old default'], got['**default now**']
    ratios.append((name, [None if o is None or m is None else m / o
                          for o, m in zip(old, new, strict=True)]))
  head = ('| sampler | setting | ' + ' | '.join(f'NFE {n}' for n in FEW_NFES) + ' |\n|---|---|'
          + '---:|' * len(FEW_NFES) + '\n')
  table = head + ''.join('| ' + ' | '.join(str(c) for c in r) + ' |\n' for r in rows
                         if r[1] != '  which')
  which = ''.join(f'- {name}: ' + '; '.join(
      f'NFE {n}: {c}' for n, c in zip(FEW_NFES, r[2:], strict=True)) + '\n'
      for name, r in zip(names, [r for r in rows if r[1] == '  which'], strict=False))
  ratio = ''.join(f'| {n} | ' + ' | '.join('—' if v is None else f'{v:.2f}' for v in r) + ' |\n'
                  for n, r in ratios)
  ratio_head = ('| sampler | ' + ' | '.join(f'NFE {n}' for n in FEW_NFES) + ' |\n|---|'
                + '---:|' * len(FEW_NFES) + '\n')
  return (table + '\nDefault now / old default:\n\n' + ratio_head + ratio
          + ('\nThe best hand-picked options:\n\n' + which if which else ''))


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
                              inspect.signature(samplers.SAMPLERS[n]).parameters
                              and n not in samplers.FLOW_MAP_SAMPLERS]
  names = names + [n for n in OPTIONS if _SAMPLERS.value is None]
  nfes = [int(n) for n in _NFES.value]
  machine = (f'{platform.processor() or platform.machine()}, {jax.devices()[0].platform} '
             f'({jax.device_count()} device(s)), jax {jax.__version__}')
  print(f'Machine: {machine}', flush=True)
  out = f'# Sampler benchmark\n\nMachine: {machine}\n\n'
  if 'accuracy' in _PARTS.value:
    print('Part 1: accuracy at fixed NFE (float64)', flush=True)
    with jax.enable_x64(True):
      part1 = accuracy_table(names, nfes, _BATCH.value)
    print(part1, flush=True)
    out += f'## Accuracy at fixed NFE\n\n{part1}\n{NOTES}\n'
  if 'few_step' in _PARTS.value:
    print('Part 1b: few steps, defaults against the old defaults (float64)', flush=True)
    few = [n for n in (_SAMPLERS.value or OLD_DEFAULTS) if n in OLD_DEFAULTS]
    with jax.enable_x64(True):
      part1b = few_step_table(few, _BATCH.value, _HANDPICKED.value)
    print(part1b, flush=True)
    out += (f'## Few steps: the defaults, the old defaults, optimised and hand-picked grids\n\n'
            f'RMS distance to the exact PF-ODE endpoint (same problem and x_T as above).\n\n'
            f'{part1b}\n{FEW_NOTES}\n')
  if 'compiled' in _PARTS.value:
    print('Part 2: compiled whole loop vs Python stepping (float32)', flush=True)
    part2 = ('| batch | loop | first call (compile + run) s | run ms | images/s | speed-up |\n'
             '|---:|---|---:|---:|---:|---:|\n')
    for batch in (8, 64, 256):
      part2 += compiled_vs_python(batch=batch)
    part2 += ('\nEuler/DDIM at NFE 50 with an MLP denoiser (64-D, width 256, depth 3, random '
              'weights), float32.\n')
    print(part2)
    out += f'## Compiled whole loop vs Python stepping\n\n{part2}'
  if _OUT.value:
    with open(_OUT.value, 'w', encoding='utf-8') as f:
      f.write(out)


if __name__ == '__main__':
  app.run(main)
