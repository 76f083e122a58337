"""Fixed-step solvers of the probability-flow ODE, each compiled whole as one `lax.scan`.

Two coordinate systems, both exact rewrites of the same ODE for any process
(`x_t = alpha x0 + sigma eps`):

* EDM's (Karras et al. 2022, §3 and Eq. 4): with `y = x / alpha` and `s = sigma / alpha`,
  `dy/ds = eps_hat(x, t)`. `euler_sample` and `heun_sample` step in `s`; Euler there is DDIM
  (`x_next = alpha' x0_hat + sigma' eps_hat`), and for processes with alpha = 1 (VE, EDM)
  Heun is EDM's Algorithm 2, stochastic churn included.
* Flow matching's: `dx/dt = v(x, t) = alpha'(t) x0_hat + sigma'(t) eps_hat`, the velocity
  a flow-matching model predicts (Lipman et al. 2023; Liu et al. 2023). The `flow_*` samplers
  step in `t` with Euler, midpoint, Heun or classical RK4.

Every sampler ends with `final='data'` by returning `x0_hat` at the last grid time (the exact
Euler / DDIM step to sigma = 0: no zero-length or duplicated last step), or stops at `t_min`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.parameterization import expand_like
from diffusion_jax.samplers import _common
from diffusion_jax.samplers import defaults


def euler_step(denoiser, x, t, alpha_next, sigma_next, cond=None):
  """One Euler step of `dy/ds = eps_hat` (`y = x / alpha`, `s = sigma / alpha`) from time `t` to
  the level `(alpha_next, sigma_next)`: `x_next = alpha_next x0_hat + sigma_next eps_hat`, which
  is DDIM's step and, with alpha = 1, Karras et al. (2022, Alg. 1, line 4). 1 call.

  `t` is a scalar or `[B]`; the coefficients are scalars or broadcast against `x [B, ...]`.
  """
  x0, eps = denoiser(x, t, cond)
  return alpha_next * x0 + sigma_next * eps


def heun_step(denoiser, x, t, alpha, s, t_next, alpha_next, s_next, cond=None, euler=None):
  """One Heun step of `dy/ds = eps_hat` from `(t, alpha, s)` to `(t_next, alpha_next, s_next)`,
  `s = sigma / alpha > 0` at both (Karras et al. 2022, Alg. 2, lines 5-8): an Euler step to
  `s_next` corrected with the slope there (trapezoid). 2 calls.

  `t`, `t_next` are scalars or `[B]`; the coefficients are scalars or broadcast against `x`.
  `euler` (a boolean scalar, traced or not; None: never) returns the Euler step uncorrected
  where true, with 1 call (`lax.cond` skips the corrector's).
  """
  _, d1 = denoiser(x, t, cond)
  y_euler = x / alpha + (s_next - s) * d1

  def corrected(_):
    _, d2 = denoiser(alpha_next * y_euler, t_next, cond)
    return alpha_next * (x / alpha + (s_next - s) * 0.5 * (d1 + d2))
  if euler is None:
    return corrected(None)
  return jax.lax.cond(euler, lambda _: alpha_next * y_euler, corrected, None)


def euler_sample(denoiser, process, x_T, key=None, *, steps: int, cond=None,
                 grid: str = 'auto', t_min=None, t_max: float = 1.0, rho: float = 7.0,
                 final: str = 'data', return_trajectory: bool = False):
  """Euler in `s = sigma / alpha` (= DDIM with eta = 0 = DPM-Solver-1): `steps` calls.

  Default grid 'auto' (`samplers.defaults`; below 20 steps a first step straight to log-SNR -4,
  exact for DDIM where x0_hat does not move, then uniform log-SNR).

  `x_next = alpha_next x0_hat + sigma_next eps_hat` between grid times. Deterministic; `key`
  is unused.
  """
  del key
  g = _common.make_grid(process, steps, x_T, grid, t_min, t_max, rho, final)
  _common.check_terminal_snr(denoiser, g.alpha[0], 'euler_sample')
  t, alpha, sigma, _ = _common.as_arrays(g, x_T.dtype)

  def step(x, inputs):
    t_i, a_next, s_next = inputs
    return euler_step(denoiser, x, t_i, a_next, s_next, cond)

  x, traj = _common.scan(step, x_T, (t[:-1], alpha[1:], sigma[1:]), return_trajectory)
  return _common.finish(denoiser, x, t[-1], cond, g, traj, return_trajectory, t.shape[0] - 1, x_T)


def _churn_gammas(s: np.ndarray, steps: int, s_churn, s_tmin, s_tmax):
  gamma = min(s_churn / steps, math.sqrt(2.0) - 1.0) if s_churn > 0 else 0.0
  return np.where((s >= s_tmin) & (s <= s_tmax), gamma, 0.0)


def heun_sample(denoiser, process, x_T, key=None, *, steps: int, cond=None,
                grid: str = 'auto', t_min=None, t_max: float = 1.0, rho: float = 7.0,
                final: str = 'data', s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = float('inf'), s_noise: float = 1.0,
                return_trajectory: bool = False):
  """Heun's second-order method in `s = sigma / alpha` (Karras et al. 2022, Alg. 2).

  At each grid level `s_i` within `[s_tmin, s_tmax]`, churn first raises the noise to
  `s_hat = s_i (1 + gamma)`, `gamma = min(s_churn / steps, sqrt 2 - 1)`, by adding
  `sqrt(s_hat² - s_i²) s_noise` fresh noise (in `x / alpha`); then an Euler step to
  `s_{i+1}` is corrected with the slope there (trapezoid). The step to data (sigma = 0) is
  Euler (Alg. 2, line 8). Calls: `2 steps - 1` with `final='data'`, `2 steps` otherwise, one
  fewer on the few-step 'auto' grid. `s_churn = 0` (the default) is deterministic and needs no
  key.

  Default grid 'auto' (`samplers.defaults`, rule 'heun'): below 20 steps with `final='data'`,
  the first step goes from `t_max` straight down to log-SNR -3 (-4 from 15 steps on) as one
  Euler step, then Heun steps on a uniform log-SNR grid up to `steps - 2`: `2 steps - 2` calls.
  At that noise level `x0_hat` hardly moves, so Euler is exact up to its change (Heun's
  trapezoid over so long a step is not: it weights the slope at the low end by half), and the
  long first step saves the steps a grid from the prior's noise level spends there. On the
  benchmark mixture: 0.21 / 0.062 at 4 / 10 calls, against 4.3 / 1.8 at 5 / 9 on the Karras
  grid. Otherwise (20 steps or more, or `final='t_min'`, the convergence setting) 'auto' is
  'karras'. Any other grid is Heun throughout.
  """
  if s_churn < 0 or s_noise < 0:
    raise ValueError(f's_churn={s_churn} and s_noise={s_noise} must be >= 0')
  first_euler = False
  if isinstance(grid, str) and grid == 'auto':
    first_euler = defaults.auto_jumps(process, steps, t_min=t_min, t_max=t_max, final=final,
                                      rule='heun')
    grid = (tuple(defaults.auto_times(process, steps, t_min=t_min, t_max=t_max, rule='heun'))
            if final == 'data' and steps < defaults.AUTO_MAX_STEPS else 'karras')
  g = _common.make_grid(process, steps, x_T, grid, t_min, t_max, rho, final)
  _common.require_finite_log_snr(g, 'heun_sample')
  stochastic = s_churn > 0
  if stochastic:
    _common.need_key(key, 'heun_sample', 's_churn > 0 adds noise')
  gam = _churn_gammas(g.s, steps, s_churn, s_tmin, s_tmax)
  dtype = x_T.dtype
  t, alpha, sigma, _ = _common.as_arrays(g, dtype)
  s = sigma / alpha
  gam = jnp.asarray(gam, dtype)
  n = t.shape[0]
  keys = jax.random.split(key, n) if stochastic else jnp.zeros((n, 2), jnp.uint32)

  def churn(x, t_i, a_i, s_i, gamma, k):
    """Returns `(x_hat, t_hat, alpha_hat, s_hat)`; the identity where gamma = 0."""
    if not stochastic:
      return x, t_i, a_i, s_i
    t_hat = jnp.where(gamma > 0, process.t_of_log_snr(-2.0 * jnp.log(s_i * (1 + gamma))), t_i)
    a_hat = process.alpha(t_hat)
    s_hat = process.sigma(t_hat) / a_hat     # the level t_hat really has (t may be clamped)
    z = jax.random.normal(k, x.shape, x.dtype)
    add = jnp.sqrt(jnp.maximum(s_hat**2 - s_i**2, 0.0)) * s_noise
    # Outside [s_tmin, s_tmax] (gamma = 0) Alg. 2 adds nothing: keep the level exactly, since
    # s_hat recomputed from t differs from s_i by rounding, whose square root is not small.
    churned = gamma > 0
    return (jnp.where(churned, a_hat * (x / a_i + add * z), x), jnp.where(churned, t_hat, t_i),
            jnp.where(churned, a_hat, a_i), jnp.where(churned, s_hat, s_i))

  def step(x, inputs):
    t_i, a_i, s_i, t_n, a_n, s_n, gamma, k, euler = inputs
    x_hat, t_hat, a_hat, s_hat = churn(x, t_i, a_i, s_i, gamma, k)
    return heun_step(denoiser, x_hat, t_hat, a_hat, s_hat, t_n, a_n, s_n, cond,
                     euler if first_euler else None)

  euler = np.arange(n - 1) < int(first_euler)        # the jump, if any, is one Euler step
  xs = (t[:-1], alpha[:-1], s[:-1], t[1:], alpha[1:], s[1:], gam[:-1], keys[:-1], euler)
  x, traj = _common.scan(step, x_T, xs, return_trajectory)
  calls = 2 * (n - 1) - int(first_euler)
  if g.to_data:
    x, t_last, _, _ = churn(x, t[-1], alpha[-1], s[-1], gam[-1], keys[-1])
  else:
    t_last = t[-1]
  return _common.finish(denoiser, x, t_last, cond, g, traj, return_trajectory, calls, x_T)


# --- flow-matching ODE in t ----------------------------------------------------------------


def velocity(denoiser, process, x, t, cond):
  """`dx/dt = alpha'(t) x0_hat + sigma'(t) eps_hat`, the PF-ODE's velocity (1 call)."""
  x0, eps = denoiser(x, t, cond)
  tb = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
  d_alpha = jax.jvp(process.alpha, (tb,), (jnp.ones_like(tb),))[1]
  d_sigma = jax.jvp(process.sigma, (tb,), (jnp.ones_like(tb),))[1]
  return expand_like(d_alpha, x) * x0 + expand_like(d_sigma, x) * eps


# Explicit Runge-Kutta tableaux (c, a, b): stage i is at t + c_i h from x + h sum_j a_ij k_j.
_TABLEAUX = {
    'euler': ((0.0,), ((),), (1.0,)),
    'midpoint': ((0.0, 0.5), ((), (0.5,)), (0.0, 1.0)),
    'heun': ((0.0, 1.0), ((), (1.0,)), (0.5, 0.5)),
    'rk4': ((0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
            (1 / 6, 1 / 3, 1 / 3, 1 / 6)),
}
FLOW_METHODS = tuple(_TABLEAUX)


def flow_sample(denoiser, process, x_T, key=None, *, steps: int, method: str = 'euler',
                cond=None, grid: str = 't', t_min=None, t_max: float = 1.0, rho: float = 7.0,
                final: str = 'data', return_trajectory: bool = False):
  """The PF-ODE in `t`, `dx/dt = v(x, t)`, with an explicit Runge-Kutta `method`.

  'euler' (order 1, 1 call per step), 'midpoint' and 'heun' (order 2, 2 calls), 'rk4' (order 4,
  4 calls). Stages lie in `[t_next, t]`, grid times with sigma > 0, so the velocity is never
  evaluated at sigma = 0. Deterministic; `key` is unused.

  Refused on a `DiscreteVP`: its continuous-time embedding has log alpha piecewise linear in t,
  so `alpha'(t)`, `sigma'(t)` jump at each of the T integer steps and no Runge-Kutta method
  keeps its order (measured with RK4 on DDPM's linear schedule: errors 8.1e-3, 8.4e-3, 8.6e-3 at
  25, 50, 100 steps, against order ~4 on the smooth continuous VP). The noise-level solvers
  (euler, heun, DPM-Solver, UniPC, iPNDM) follow the same ODE in `s` or log-SNR, where its
  right-hand side is smooth.
  """
  del key
  if method not in _TABLEAUX:
    raise ValueError(f'unknown flow ODE method {method!r}; choose from {FLOW_METHODS}')
  if hasattr(process, 'num_steps'):
    raise ValueError(f'flow_sample({method}) integrates dx/dt in t, whose right-hand side jumps '
                     f'at every integer step of a {type(process).__name__} (log alpha is '
                     'piecewise linear in t), so it would converge at first order whatever the '
                     'method; use a continuous process, or euler / heun / dpm_solver_pp / unipc '
                     '/ ipndm, which step in the noise level')
  c, a, b = _TABLEAUX[method]
  g = _common.make_grid(process, steps, x_T, grid, t_min, t_max, rho, final)
  _common.check_terminal_snr(denoiser, g.alpha[0], f'flow_sample({method})')
  t, _, _, _ = _common.as_arrays(g, x_T.dtype)

  def step(x, inputs):
    t_i, t_n = inputs
    h = t_n - t_i
    ks = []
    for ci, ai in zip(c, a, strict=True):
      xi = x + h * sum((aij * kj for aij, kj in zip(ai, ks, strict=True) if aij), jnp.zeros_like(x))
      ks.append(velocity(denoiser, process, xi, t_i + ci * h, cond))
    return x + h * sum((bi * ki for bi, ki in zip(b, ks, strict=True) if bi), jnp.zeros_like(x))

  x, traj = _common.scan(step, x_T, (t[:-1], t[1:]), return_trajectory)
  calls = len(c) * (t.shape[0] - 1)
  return _common.finish(denoiser, x, t[-1], cond, g, traj, return_trajectory, calls, x_T)


flow_euler_sample = _common.preset(flow_sample, 'flow_euler_sample', method='euler')
flow_midpoint_sample = _common.preset(flow_sample, 'flow_midpoint_sample', method='midpoint')
flow_heun_sample = _common.preset(flow_sample, 'flow_heun_sample', method='heun')
flow_rk4_sample = _common.preset(flow_sample, 'flow_rk4_sample', method='rk4')
