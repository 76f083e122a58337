"""The probability-flow ODE in `t` with an adaptive Runge-Kutta solver (diffrax) and a PID
step-size controller, compiled whole (one `diffeqsolve` while loop inside whatever `jit` wraps
it).

The ODE is flow matching's `dx/dt = v(x, t) = alpha'(t) x0_hat + sigma'(t) eps_hat`
(`ode.velocity`), exact for every process (Song et al. 2021, Eq. 13 written with `alpha, sigma`),
so `adaptive_sample` is both "the probability-flow ODE with an adaptive solver" (Song et al.
2021 use RK45 with rtol = atol = 1e-5) and "the flow-matching ODE, adaptive". Steps are chosen
by the error estimate of the solver's embedded pair: a step is accepted when
`rms(y_err / (atol + rtol max(|y0|, |y1|))) < 1`, and the next step size follows
`diffrax.PIDController` (`pcoeff = dcoeff = 0, icoeff = 1`, the default, is the classical
I-controller; e.g. `pcoeff=0.3, icoeff=0.4` a PI controller). One step size is shared by the
whole batch (the error norm runs over all of it), as when a batch is solved as one ODE.

NFE is exact and data dependent, so `info['nfe']` is an integer array (traced under `jit`),
derived from diffrax's statistics by `integrate`:

  calls = [1: v(t0, y0)] + [1: the starting-step heuristic, unless dt0 is given]
          + steps_tried * (stages - 1 if FSAL else stages) + [1: x0_hat at t_min, final='data']

where `steps_tried` counts accepted and rejected steps. The FSAL ("first same as last") stage
`v(t0, y0)` is computed once here and handed to diffrax as its solver state, so no step, not
even a rejected first one, re-evaluates it (diffrax would otherwise redo it on every rejected
first attempt, a count its statistics do not record).
"""

import diffrax
import jax
import jax.numpy as jnp

from diffusion_jax import parameterization
from diffusion_jax.samplers import _common
from diffusion_jax.samplers.ode import velocity

# Explicit Runge-Kutta pairs with an embedded error estimate (Euler has none).
SOLVERS = {
    'tsit5': diffrax.Tsit5,      # order 5, 7 stages, FSAL (Tsitouras 2011)
    'dopri5': diffrax.Dopri5,    # order 5, 7 stages, FSAL (Dormand & Prince 1980; RK45)
    'dopri8': diffrax.Dopri8,    # order 8, 14 stages, FSAL (Prince & Dormand 1981)
    'bosh3': diffrax.Bosh3,      # order 3, 4 stages, FSAL (Bogacki & Shampine 1989)
    'heun': diffrax.Heun,        # order 2, 2 stages (with an Euler error estimate)
    'midpoint': diffrax.Midpoint,
    'ralston': diffrax.Ralston,
}
ADAPTIVE_SOLVERS = tuple(SOLVERS)

# Kinds whose eps_hat is (x - alpha x0_hat) / sigma: undefined where sigma = 0.
DIVIDE_BY_SIGMA = ('x0', 'edm', 'consistency')


def make_solver(name: str):
  if name not in SOLVERS:
    raise ValueError(f'unknown adaptive solver {name!r}; choose from {ADAPTIVE_SOLVERS}')
  return SOLVERS[name]()


def stage_cost(solver) -> tuple[int, bool]:
  """`(stages, fsal)` of a diffrax explicit Runge-Kutta solver."""
  tableau = solver.tableau
  return int(tableau.num_stages), bool(tableau.fsal)


def _rms(tree):
  leaves = jax.tree_util.tree_leaves(tree)
  total = sum(jnp.sum(jnp.square(leaf)) for leaf in leaves)
  return jnp.sqrt(total / sum(leaf.size for leaf in leaves))


def _initial_step(fn, t0, y0, f0, direction, order, rtol, atol, span):
  """Starting step size (Hairer, Nørsett & Wanner, Solving ODEs I, §II.4): one evaluation."""
  tmap = jax.tree_util.tree_map
  scale = tmap(lambda y: atol + rtol * jnp.abs(y), y0)
  d0 = _rms(tmap(jnp.divide, y0, scale))
  d1 = _rms(tmap(jnp.divide, f0, scale))
  small = (d0 < 1e-5) | (d1 < 1e-5)
  h0 = jnp.where(small, 1e-6, 0.01 * d0 / jnp.where(small, 1.0, d1))
  h0 = jnp.minimum(h0, span)
  y1 = tmap(lambda y, f: y + direction * h0 * f, y0, f0)
  f1 = fn(t0 + direction * h0, y1)
  d2 = _rms(tmap(lambda a, b, s: (a - b) / s, f1, f0, scale)) / h0
  d = jnp.maximum(d1, d2)
  h1 = jnp.where(d <= 1e-15, jnp.maximum(1e-6, 1e-3 * h0),
                 (0.01 / jnp.where(d <= 1e-15, 1.0, d)) ** (1.0 / (order + 1)))
  return jnp.minimum(jnp.minimum(100.0 * h0, h1), span)


def integrate(fn, y0, t0: float, t1: float, *, solver: str = 'tsit5', rtol=1e-5, atol=1e-5,
              dt0=None, max_steps: int = 4096, pcoeff=0.0, icoeff=1.0, dcoeff=0.0,
              save_steps: bool = False, throw: bool = True):
  """Solves `dy/dt = fn(t, y)` (`y` a pytree) from `t0` to `t1` (either direction).

  Returns `(y1, stats)`; `stats['calls']` is the exact number of `fn` evaluations executed (see
  the module docstring), `stats['num_steps']` / `['num_rejected_steps']` the accepted /
  rejected steps. With `save_steps`, `stats['ts'] [max_steps]` and `stats['ys']` hold the
  accepted steps' end points, padded with inf. `dt0` (a magnitude) fixes the first step size
  instead of the heuristic. With `throw`, reaching `max_steps` raises at run time; otherwise
  `stats['success']` is False and `y1` is where the solve stopped.
  """
  slv = make_solver(solver)
  stages, fsal = stage_cost(slv)
  t0, t1 = float(t0), float(t1)
  if t0 == t1:
    raise ValueError(f'integrate: empty interval t0 = t1 = {t0}')
  direction = 1.0 if t1 > t0 else -1.0
  dtype = jnp.result_type(*jax.tree_util.tree_leaves(y0))
  span = jnp.asarray(abs(t1 - t0), dtype)
  calls = 0
  f0 = None
  if fsal or dt0 is None:
    f0 = fn(jnp.asarray(t0, dtype), y0)
    calls += 1
  if dt0 is None:
    order = slv.order(diffrax.ODETerm(lambda t, y, args: y))
    h = _initial_step(fn, jnp.asarray(t0, dtype), y0, f0, direction, order, rtol, atol, span)
    calls += 1
  else:
    h = jnp.minimum(jnp.abs(jnp.asarray(dt0, dtype)), span)
  # FSAL solver state (diffrax's explicit RK: `(first_step, f0)`): f0 is known, so no step
  # evaluates the first stage again.
  solver_state = (jnp.asarray(False), f0) if fsal else None
  saveat = diffrax.SaveAt(steps=True) if save_steps else diffrax.SaveAt(t1=True)
  controller = diffrax.PIDController(rtol=rtol, atol=atol, pcoeff=pcoeff, icoeff=icoeff,
                                     dcoeff=dcoeff)
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(lambda t, y, args: fn(t, y)), slv, t0, t1, direction * h, y0,
      saveat=saveat, stepsize_controller=controller, max_steps=max_steps, throw=throw,
      solver_state=solver_state)
  tried = sol.stats['num_steps']
  calls = calls + tried * (stages - 1 if fsal else stages)
  stats = {'calls': calls, 'num_steps': sol.stats['num_accepted_steps'],
           'num_rejected_steps': sol.stats['num_rejected_steps'],
           'success': sol.result == diffrax.RESULTS.successful}
  if save_steps:
    last = jnp.maximum(stats['num_steps'] - 1, 0)
    y1 = jax.tree_util.tree_map(lambda ys: ys[last], sol.ys)
    stats['ts'], stats['ys'] = sol.ts, sol.ys
  else:
    y1 = jax.tree_util.tree_map(lambda ys: ys[0], sol.ys)
  return y1, stats


def check_sigma_endpoint(denoiser, process, t, who: str) -> bool:
  """True where `sigma(t) = 0`; refuses a denoiser whose eps_hat divides by sigma there."""
  with jax.ensure_compile_time_eval():
    at_data = float(process.sigma(jnp.asarray(t, jnp.float32))) == 0.0
  kind = parameterization.as_denoiser(denoiser).kind
  if at_data and kind in DIVIDE_BY_SIGMA:
    raise ValueError(f'{who}: sigma(t={t}) = 0, where the velocity of a {kind!r}-prediction '
                     'model divides by sigma; pass t_min > 0')
  return at_data


def check_interval(process, t_min, t_max, who: str) -> float:
  t_min = float(process.t_min if t_min is None else t_min)
  if not 0.0 <= t_min < t_max <= 1.0:
    raise ValueError(f'{who}: need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}')
  return t_min


def adaptive_sample(denoiser, process, x_T, key=None, *, steps=None, solver: str = 'tsit5',
                    rtol=1e-5, atol=1e-5, cond=None, t_min=None, t_max: float = 1.0,
                    final: str = 'data', dt0=None, max_steps: int = 4096, pcoeff=0.0,
                    icoeff=1.0, dcoeff=0.0, throw: bool = True,
                    return_trajectory: bool = False):
  """Integrates `dx/dt = v(x, t)` from `t_max` down to `t_min` with an adaptive `solver`.

  `solver` is one of `ADAPTIVE_SOLVERS` ('tsit5' by default; 'dopri5' is RK45). `t_min`
  defaults to the process's. The velocity is evaluated at `t_min` itself (the last stage of
  the last step): where `sigma(t_min) = 0` (the linear interpolant's t = 0) it needs a model
  finite there (eps, v, score, velocity kinds); x0 / edm kinds are refused. `final='data'` adds
  one call, `x0_hat` at `t_min` (the exact step to sigma = 0), unless `sigma(t_min) = 0`, where
  the ODE already ends on data; `final='t_min'` returns the ODE state at `t_min`.

  `steps` is accepted and ignored (the step count is the solver's choice) so that the common
  sampler signature works; `key` is unused (deterministic). `rtol` / `atol` may be traced.

  `info`: `nfe` (exact, an integer array, times the denoiser's `evals_per_call`),
  `denoiser_calls`, `num_steps` (accepted), `num_rejected_steps`, `success`. With
  `return_trajectory`, `trajectory [max_steps + 1 (+ 1), ...]` holds `x_T`, the accepted
  steps' states (and `x0_hat` with final='data') in its first `trajectory_length` rows and inf
  after them; `trajectory_t [max_steps + 1]` their times (the x0_hat row has none).
  """
  del key, steps
  if final not in ('data', 't_min'):
    raise ValueError(f"final={final!r}; choose from ('data', 't_min')")
  t_min = check_interval(process, t_min, t_max, 'adaptive_sample')
  with jax.ensure_compile_time_eval():
    alpha_first = process.alpha(jnp.asarray(t_max, jnp.float32))
  _common.check_terminal_snr(denoiser, alpha_first, 'adaptive_sample')
  at_data = check_sigma_endpoint(denoiser, process, t_min, 'adaptive_sample')
  to_data = final == 'data' and not at_data

  fn = lambda t, x: velocity(denoiser, process, x, t, cond)
  x, stats = integrate(fn, x_T, t_max, t_min, solver=solver, rtol=rtol, atol=atol, dt0=dt0,
                       max_steps=max_steps, pcoeff=pcoeff, icoeff=icoeff, dcoeff=dcoeff,
                       save_steps=return_trajectory, throw=throw)
  calls = stats['calls']
  if to_data:
    x = _common.to_data(denoiser, x, jnp.asarray(t_min, x_T.dtype), cond)
    calls = calls + 1
  info = {'nfe': calls * _common.evals_per_call(denoiser), 'denoiser_calls': calls,
          'num_steps': stats['num_steps'], 'num_rejected_steps': stats['num_rejected_steps'],
          'success': stats['success']}
  if return_trajectory:
    n = stats['num_steps']
    rows = [x_T[None], stats['ys']]
    if to_data:
      rows.append(jnp.full_like(x_T, jnp.inf)[None])
    traj = jnp.concatenate(rows, axis=0)
    if to_data:
      traj = jax.lax.dynamic_update_index_in_dim(traj, x, n + 1, axis=0)
    info['trajectory'] = traj
    info['trajectory_t'] = jnp.concatenate([jnp.asarray([t_max], stats['ts'].dtype),
                                            stats['ts']])
    info['trajectory_length'] = n + 1 + int(to_data)
  return x, info

