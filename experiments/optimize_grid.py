r"""Optimised few-step time grids (`samplers.optimized_grids`): search, save, compare.

A trained run (unconditional):

  python -m experiments.optimize_grid --workdir=runs/digits --steps=5,10 --method=dp \
      [--solver=dpm_solver_pp_2m] [--seed=0] [--draws=128]

draws `--draws` prior samples from `--seed`, solves the model's own probability-flow ODE finely
(Heun through `--candidates` log-SNR-uniform times, each refined `--substeps` times) as the
teacher, runs the search for every step count, writes
`<workdir>/schedules/<solver>_<method>_nfe<k>.json` and prints the criterion (RMS distance of the
solver's output to the teacher's endpoint, uniform log-SNR grid before, the schedule after).
Sample with a schedule: `--config.sample.options.grid=<its times>` (see docs/sampler_grids).

The Gaussian-mixture benchmark (`experiments.benchmark_samplers`: 2-D, three components, exact
denoiser, DDPM linear schedule, float64):

  python -m experiments.optimize_grid --problem=gmm [--out_dir=docs/sampler_grids]

searches dp and ld3 schedules on 512 prior draws (seed 1) for NFE 4, 5, 6, 8, 10 and the solvers
euler (= DDIM), dpm_solver_pp_2m, dpm_solver_pp_3m and unipc_bh2, writes them to
`<out>/schedules/`, and measures every library sampler on the benchmark's own held-out 2,048
draws (seed 0) against its converged ODE endpoint (Heun, 4,000 Karras steps): the default grid,
uniform log-SNR, dp and ld3. Writes `<out_dir>/results.md` and `<out_dir>/error_vs_nfe.png`.
"""

import os
import time

from absl import app
from absl import flags

from experiments import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'A finished training run (unconditional).')
_PROBLEM = flags.DEFINE_enum('problem', 'run', ['run', 'gmm'],
                             "'run': the model in --workdir; 'gmm': the benchmark mixture.")
_STEPS = flags.DEFINE_list('steps', ['4', '5', '6', '8', '10'], 'Step counts (= NFE).')
_METHOD = flags.DEFINE_enum('method', 'dp', ['dp', 'ld3'], 'The search (run mode).')
_SOLVER = flags.DEFINE_string('solver', 'dpm_solver_pp_2m', 'The sampler (run mode).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the prior draws searched on (run mode).')
_BATCH = flags.DEFINE_integer('draws', 128, 'Prior draws searched on (run mode).')
_CANDIDATES = flags.DEFINE_integer('candidates', 121, 'dp: candidate times.')
_SUBSTEPS = flags.DEFINE_integer('substeps', 4, 'Teacher sub-steps per candidate interval.')
_ITERS = flags.DEFINE_integer('iters', 200, 'ld3: Adam steps.')
_LR = flags.DEFINE_float('lr', 0.05, 'ld3: Adam learning rate.')
_OUT = flags.DEFINE_string('out_dir', 'docs/sampler_grids', 'gmm: where results go.')

GMM_SOLVERS = ('euler', 'dpm_solver_pp_2m', 'dpm_solver_pp_3m', 'unipc_bh2')
GMM_GRIDS = ('default', 'uniform', 'dp', 'ld3')


def _steps():
  try:
    steps = [int(s) for s in _STEPS.value]
  except ValueError:
    cli.fail(f'--steps={",".join(_STEPS.value)}: expected integers')
  if not steps or min(steps) < 1:
    cli.fail(f'--steps={",".join(_STEPS.value)}: expected integers >= 1')
  return steps


def _path(root, solver, method, k):
  return os.path.join(root, 'schedules', f'{solver}_{method}_nfe{k}.json')


def run_mode(steps):
  # pylint: disable=g-import-not-at-top
  import jax
  from diffusion_jax import generation
  from diffusion_jax.samplers import optimized_grids as og
  # pylint: enable=g-import-not-at-top
  if not (_WORKDIR.value or '').strip():
    cli.fail('--workdir is empty: name a finished training run')
  if _SOLVER.value not in og.SOLVERS:
    cli.fail(f'--solver={_SOLVER.value!r}: choose from {sorted(og.SOLVERS)}')
  workdir = os.path.abspath(_WORKDIR.value)
  _, setup, params, step = cli.load_run(workdir)
  if setup.conditional or setup.text is not None or setup.condition is not None:
    cli.fail(f'{workdir}: a conditional run; optimize_grid searches unconditional runs only')
  process = setup.process
  den = generation.make_model_denoiser(setup, params)
  x_T = process.prior_std * jax.random.normal(jax.random.key(_SEED.value),
                                              (_BATCH.value,) + tuple(setup.image_shape))
  t0 = time.time()
  cand = og.candidate_times(process, _CANDIDATES.value, dtype=x_T.dtype)
  teacher = og.teacher_trajectory(den, process, x_T, cand, substeps=_SUBSTEPS.value)
  print(f'{workdir} (step {step}): teacher ODE solve, {_CANDIDATES.value} candidates x '
        f'{_SUBSTEPS.value} Heun sub-steps, batch {_BATCH.value}: {time.time() - t0:.0f} s',
        flush=True)
  with cli.user_errors():
    if _METHOD.value == 'dp':
      found = og.dp_schedules(den, process, x_T, steps=steps, solver=_SOLVER.value,
                              candidates=_CANDIDATES.value, substeps=_SUBSTEPS.value,
                              teacher_out=teacher)
    else:
      found = []
      for k in steps:
        t1 = time.time()
        found.append(og.ld3_schedule(den, process, x_T, steps=k, key=jax.random.key(_SEED.value),
                                     solver=_SOLVER.value, iters=_ITERS.value, lr=_LR.value,
                                     x_ref=teacher[1]))
        print(f'  ld3 NFE {k}: {time.time() - t1:.0f} s', flush=True)
  print(f'\n| solver | method | NFE | {found[0].criterion}: uniform log-SNR | schedule | times |\n'
        '|---|---|---:|---:|---:|---|')
  for s in found:
    path = _path(workdir, _SOLVER.value, _METHOD.value, s.steps)
    og.save_schedule(path, s)
    times = ', '.join(f'{t:.4f}' for t in s.times)
    print(f'| {_SOLVER.value} | {_METHOD.value} | {s.steps} | {s.before:.4f} | {s.after:.4f} | '
          f'({times}) |')
  print(f'\nwrote {len(found)} schedules to {os.path.join(workdir, "schedules")}')


def gmm_mode(steps):
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from diffusion_jax import analytic
  from diffusion_jax import processes
  from diffusion_jax import samplers
  from diffusion_jax.samplers import optimized_grids as og
  from experiments import benchmark_samplers as bench
  # pylint: enable=g-import-not-at-top
  out = os.path.abspath(_OUT.value)
  jax.config.update('jax_enable_x64', True)
  proc = processes.DiscreteVP.from_name('linear', 1000)
  den = analytic.gmm_denoiser(bench.WEIGHTS, bench.MEANS, bench.S2, proc)
  x_opt = jax.random.normal(jax.random.key(1), (512, 2), jnp.float64)
  x_test = jax.random.normal(jax.random.key(0), (2048, 2), jnp.float64)   # the benchmark's
  t0 = time.time()
  ref, _ = jax.jit(lambda x: samplers.heun_sample(den, proc, x, steps=4000))(x_test)
  cand = og.candidate_times(proc, _CANDIDATES.value)
  teacher = og.teacher_trajectory(den, proc, x_opt, cand, substeps=_SUBSTEPS.value)
  print(f'reference and teacher: {time.time() - t0:.0f} s', flush=True)
  schedules = {}
  for solver in GMM_SOLVERS:
    t1 = time.time()
    for s in og.dp_schedules(den, proc, x_opt, steps=steps, solver=solver,
                             candidates=_CANDIDATES.value, substeps=_SUBSTEPS.value,
                             teacher_out=teacher):
      schedules[solver, 'dp', s.steps] = s
    for k in steps:
      schedules[solver, 'ld3', k] = og.ld3_schedule(
          den, proc, x_opt, steps=k, key=jax.random.key(0), solver=solver, iters=_ITERS.value,
          lr=_LR.value, x_ref=teacher[1])
      print(f'  {solver} ld3 NFE {k}: held-out {schedules[solver, "ld3", k].before:.3e} -> '
            f'{schedules[solver, "ld3", k].after:.3e}', flush=True)
    print(f'{solver}: schedules in {time.time() - t1:.0f} s', flush=True)
  for (solver, method, k), s in schedules.items():
    og.save_schedule(_path(out, solver, method, k), s)

  errors = {}
  for solver in GMM_SOLVERS:
    for k in steps:
      grids = {'default': None, 'uniform': 'log_snr',
               'dp': tuple(schedules[solver, 'dp', k].times),
               'ld3': tuple(schedules[solver, 'ld3', k].times)}
      for name, grid in grids.items():
        options = {} if grid is None else {'grid': grid}
        errors[solver, name, k] = _library_error(samplers, den, proc, x_test, solver, k,
                                                 options, ref, og)
      print(f'  {solver:18s} NFE {k:2d}: ' + '  '.join(
          f'{g} {errors[solver, g, k]:.3e}' for g in GMM_GRIDS), flush=True)
  table = _gmm_table(errors, steps, schedules)
  print(table)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(table)
  _figure(errors, steps, os.path.join(out, 'error_vs_nfe.png'))
  print(f'wrote {out}/results.md, {out}/error_vs_nfe.png and {len(schedules)} schedules '
        f'({time.time() - t0:.0f} s)')


def _library_error(samplers, den, proc, x_T, solver, steps, options, ref, og):
  """The library sampler's `ode_err` (benchmark_samplers' definition) on `x_T`."""
  import jax  # pylint: disable=g-import-not-at-top
  fn = samplers.SAMPLERS[solver]
  x, info = jax.jit(lambda x: fn(den, proc, x, steps=steps, **options))(x_T)
  assert int(info['nfe']) == steps, (solver, steps, info['nfe'])
  return og.rms_error(x, ref)


def _gmm_table(errors, steps, schedules):
  rows = []
  for solver in GMM_SOLVERS:
    for k in steps:
      e = [errors[solver, g, k] for g in GMM_GRIDS]
      best = min(e)
      cells = [f'**{v:.2e}**' if v == best else f'{v:.2e}' for v in e]
      rows.append(f'| {solver} | {k} | ' + ' | '.join(cells) +
                  f' | {e[2] / e[1]:.2f} | {e[3] / e[1]:.2f} |')
  head = ('| solver | NFE | default grid | uniform log-SNR | dp | ld3 | dp / uniform | '
          'ld3 / uniform |\n|---|---:|---:|---:|---:|---:|---:|---:|\n')
  return head + '\n'.join(rows) + '\n'


def _figure(errors, steps, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(GMM_SOLVERS), figsize=(4 * len(GMM_SOLVERS), 3.6),
                           sharey=True)
  for ax, solver in zip(axes, GMM_SOLVERS, strict=True):
    for g, style in zip(GMM_GRIDS, ('k--', 'C0-o', 'C1-s', 'C2-^'), strict=True):
      ax.plot(steps, [errors[solver, g, k] for k in steps], style, label=g, ms=4)
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xticks(steps)
    ax.set_xticklabels([str(k) for k in steps])
    ax.set_title(solver)
    ax.set_xlabel('NFE')
    ax.grid(True, which='both', alpha=0.3)
  axes[0].set_ylabel('RMS error vs exact ODE endpoint')
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  cli.setup_runtime()
  steps = _steps()
  if _PROBLEM.value == 'gmm':
    gmm_mode(steps)
  else:
    run_mode(steps)


if __name__ == '__main__':
  app.run(main)
