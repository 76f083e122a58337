"""Samplers compiled whole: `x0, info = sample(denoiser, process, x_T, key, steps=..., cond=...)`.

The prior draw `x_T` is an argument, so comparisons, inversion and interpolation start from
identical noise. The time grid is separate from the update rule, and the whole loop is one
`lax.scan`: wrapping a sampler in `jax.jit` traces the denoiser once, not once per step
(DESIGN §4). `info['nfe']` is the exact number of denoiser (network) evaluations.

This module holds the discrete samplers that run on DDPM's integer grid with the exact
`alphas_cumprod` (DESIGN §1): DDPM ancestral sampling (fixed or learned variance, the latter
from a `Denoiser` with `with_variance`) and DDIM, with DDIM inversion (`ddim_invert`) and its
continuous counterpart (`euler_invert`, the inverse of `euler_sample`).
"""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import parameterization
from diffusion_jax.parameterization import expand_like
from diffusion_jax.samplers import _common
from diffusion_jax.samplers.grids import SPACINGS
from diffusion_jax.samplers.grids import discrete_timesteps
from diffusion_jax.samplers.grids import start_step

VARIANCES = ('small', 'large', 'learned')


def _explicit_steps(times, num_train_steps: int, top: int, steps, who) -> np.ndarray:
  """The integer steps `n = t T` of an explicit grid of times (decreasing, each `n / T` to
  1e-6, inside `1..top`); `steps`, when given, must be their number."""
  T = num_train_steps
  t = np.asarray(times, np.float64)
  if t.ndim != 1 or t.size == 0 or not np.all(np.isfinite(t)):
    raise ValueError(f'{who}: grid must be a 1-D sequence of finite times, got {times!r}')
  n = np.round(t * T)
  off = np.abs(t - n / T) > 1e-6
  if np.any(off):
    raise ValueError(f'{who}: grid time {float(t[off][0])!r} is not an integer step n / T '
                     f'(T = {T}) to 1e-6; a discrete sampler visits only the training steps')
  if np.any(np.diff(n) >= 0):
    raise ValueError(f'{who}: grid times must be strictly decreasing steps, got '
                     f'{(n / T).tolist()}')
  if n[-1] < 1 or n[0] > top:
    raise ValueError(f'{who}: grid runs from step {int(n[0])} to {int(n[-1])}, outside '
                     f'1..{top} (t in [1/T, t_max], T = {T})')
  if steps is not None and steps != n.size:
    raise ValueError(f'{who}: steps={steps} but the grid holds {n.size} times')
  return n.astype(np.int64)


def _steps(process, steps, spacing, denoiser, who, t_max=1.0, grid=None) -> np.ndarray:
  """The integer steps `n` visited (decreasing, numpy), after checking the process and model:
  `steps` of the `spacing` over `1..N`, `N = t_max T` (`grids.start_step`; T when t_max = 1),
  or those of an explicit `grid` of times `n / T` (a spacing's name is taken as `spacing`)."""
  if not hasattr(process, 'num_steps'):
    raise ValueError(f'{who} runs on the integer steps of a DiscreteVP process; got '
                     f"{type(process).__name__} (use 'euler', 'dpm_solver_pp' or another "
                     'continuous-time sampler)')
  top = start_step(process.num_steps, t_max)
  if isinstance(grid, str):
    if grid not in SPACINGS:
      raise ValueError(f'{who}: grid={grid!r}; a discrete sampler takes a spacing {SPACINGS} '
                       'or an explicit sequence of times n / T')
    spacing, grid = grid, None
  if grid is None:
    n = discrete_timesteps(top, top if steps is None else steps, spacing)
  else:
    n = _explicit_steps(grid, process.num_steps, top, steps, who)
  _common.check_terminal_snr(denoiser, process.alphas_cumprod[n[0] - 1], who)
  return n


def _pairs(process, steps, spacing, denoiser, who, t_max, grid, dtype):
  """Each update goes from step `n` to `m < n` (the grid, then 0): returns the times `n / T`
  in `dtype` (what the denoiser sees) and `abar_n`, `abar_m` (float64 numpy, exact)."""
  n = _steps(process, steps, spacing, denoiser, who, t_max, grid)
  m = np.concatenate([n[1:], [0]])
  abar = np.concatenate([[1.0], process.alphas_cumprod])
  dtype = np.dtype(dtype)
  # float division in dtype, as `process.t_of_step` computes it.
  t = n.astype(dtype) / dtype.type(process.num_steps)
  return t, abar[n], abar[m], m


def _scan(step_fn, x_T, xs, return_trajectory, denoiser):
  x0, traj = _common.scan(lambda x, inputs: step_fn(x, *inputs), x_T, xs, return_trajectory)
  trajectory = _common.trajectory(x_T, traj) if return_trajectory else None   # [S + 1, B, ...]
  return x0, _common.make_info(denoiser, xs[0].shape[0], trajectory)


def ddim_sample(denoiser, process, x_T, key=None, *, steps: int | None = None,
                eta: float = 0.0, cond=None, spacing: str = 'trailing', grid=None,
                t_max: float = 1.0, return_trajectory: bool = False):
  """DDIM (Song, Meng & Ermon 2021, Eq. 12) from `x_T` at step T down to clean data.

  `x_m = sqrt(abar_m) x0_hat + sqrt(1 - abar_m - s²) eps_hat + s z`, with
  `s = eta sqrt((1 - abar_m) / (1 - abar_n)) sqrt(1 - abar_n / abar_m)` (Eq. 16).
  `eta = 0` is deterministic (the probability-flow ODE's first-order solver); `eta = 1` has
  the DDPM posterior variance. `key` is needed only when `eta > 0`. `t_max < 1` starts at step
  `N = t_max T` instead of T (`x_T` lies there; SDEdit, partial inversion): the `steps` of the
  spacing over `1..N` (`steps=None`: all N).

  `grid` (instead of `spacing`): an explicit decreasing sequence of times, each an integer step
  `n / T` (e.g. `grids.diffusers_timesteps` of another library's timesteps); `steps` may be
  omitted or must equal its length. Every coefficient is computed once in float64 from the
  exact `alphas_cumprod`; the scan only calls the denoiser and combines.
  """
  if eta < 0:
    raise ValueError(f'eta={eta} must be >= 0')
  if eta > 0:
    _common.need_key(key, 'ddim_sample', 'eta > 0 draws noise')
  _common.check_x_T(x_T, 'ddim_sample')
  t, abar_n, abar_m, _ = _pairs(process, steps, spacing, denoiser, 'ddim_sample', t_max, grid,
                                x_T.dtype)
  keys = jax.random.split(key, t.shape[0]) if key is not None else jnp.zeros((t.shape[0], 2))
  s = eta * np.sqrt((1 - abar_m) / (1 - abar_n) * (1 - abar_n / abar_m))
  c_eps = np.sqrt(np.maximum(1 - abar_m - s**2, 0.0))
  coefs = tuple(jnp.asarray(c, x_T.dtype) for c in (np.sqrt(abar_m), c_eps, s))

  def step(x, t_n, coefs, k):
    c_x0, c_eps, s = coefs
    x0, eps = denoiser(x, t_n, cond)
    x_m = c_x0 * x0 + c_eps * eps
    if eta > 0:
      x_m = x_m + s * jax.random.normal(k, x.shape, x.dtype)
    return x_m

  return _scan(step, x_T, (jnp.asarray(t), coefs, keys), return_trajectory, denoiser)


def ddpm_sample(denoiser, process, x_T, key, *, steps: int | None = None, cond=None,
                variance: str = 'small', spacing: str = 'trailing', grid=None,
                t_max: float = 1.0, return_trajectory: bool = False):
  """DDPM ancestral sampling (Ho et al. 2020, Alg. 2), on all T steps or a respaced subset.

  Each update draws from `q(x_m | x_n, x0 = x0_hat)`, the Gaussian posterior (Eqs. 6–7) with
  `beta = 1 - abar_n / abar_m` (the respacing of Nichol & Dhariwal 2021, §4): mean
  `sqrt(abar_m) beta / (1 - abar_n) x0_hat + sqrt(1 - beta) (1 - abar_m) / (1 - abar_n) x_n`,
  variance `beta~ = (1 - abar_m) / (1 - abar_n) beta` ('small', the posterior's), `beta`
  ('large'), or 'learned': `exp(v log beta + (1 - v) log beta~)` per dimension (Nichol &
  Dhariwal 2021, Eq. 15) on the respaced betas, with `v` from the `Denoiser`'s
  `with_variance` (`make_denoiser` of a learned-variance objective; same single call per
  step). All three form the noise scale as `exp(log_var / 2)`, so `v = 1` is 'large' and
  `v = 0` is 'small' bit for bit. The last update (to m = 0) adds no noise and returns `x0_hat`.
  `t_max < 1` starts at step `N = t_max T` (as in `ddim_sample`); `steps=None` is all N steps.
  `grid`: an explicit sequence of times `n / T` instead of `spacing`, as in `ddim_sample`.
  """
  if variance not in VARIANCES:
    raise ValueError(f'variance={variance!r}; choose from {VARIANCES}')
  _common.need_key(key, 'ddpm_sample', 'it draws fresh noise at every step')
  _common.check_x_T(x_T, 'ddpm_sample')
  learned = variance == 'learned'
  with_variance = parameterization.as_denoiser(denoiser).with_variance
  if learned and with_variance is None:
    raise ValueError("ddpm_sample(variance='learned') needs a Denoiser with `with_variance` "
                     '(make_denoiser of a learned-variance objective, or learned_variance=True)')
  t, abar_n, abar_m, m = _pairs(process, steps, spacing, denoiser, 'ddpm_sample', t_max, grid,
                                x_T.dtype)
  keys = jax.random.split(key, t.shape[0])
  beta = 1 - abar_n / abar_m
  c_x0 = np.sqrt(abar_m) * beta / (1 - abar_n)
  c_x = np.sqrt(1 - beta) * (1 - abar_m) / (1 - abar_n)
  # beta~ = 0 on the last update (m = 0), which adds no noise: any finite log keeps it clean.
  log_tilde = np.log(np.where(m > 0, beta * (1 - abar_m) / (1 - abar_n), beta))
  coefs = tuple(jnp.asarray(c, x_T.dtype) for c in (c_x0, c_x, np.log(beta), log_tilde))

  def step(x, t_n, last, coefs, k):
    c_x0, c_x, log_beta, log_tilde = coefs
    if learned:
      x0, _, v = with_variance(x, t_n, cond)
    else:
      (x0, _), v = denoiser(x, t_n, cond), (0.0 if variance == 'small' else 1.0)
    mean = c_x0 * x0 + c_x * x
    log_var = v * log_beta + (1 - v) * log_tilde
    std = jnp.where(last, 0.0, jnp.exp(0.5 * log_var))
    return mean + std * jax.random.normal(k, x.shape, x.dtype)

  return _scan(step, x_T, (jnp.asarray(t), jnp.asarray(m == 0), coefs, keys), return_trajectory,
               denoiser)


# --- inversion: data -> noise along the deterministic sampler's path --------------------------


def _invert(denoiser, x, t, alpha, s, cond, iterations, return_trajectory):
  """Runs the deterministic sampler's steps backwards, from level 0 up to level K - 1.

  Level arrays `t, alpha, s = sigma / alpha` (`[K]`, increasing noise; `s[0]` is the
  input's level, 0 for clean data). The forward step from level `j + 1` to `j` is
  `x_j / alpha_j = x_{j+1} / alpha_{j+1} + (s_j - s_{j+1}) eps_hat(x_{j+1}, t_{j+1})`; its
  inverse is implicit in `x_{j+1}`, solved by `iterations` fixed-point sweeps from
  `x_{j+1} = alpha_{j+1} x_j / alpha_j`. Returns `(x, calls, trajectory)`.
  """
  def step(y, inputs):
    t_n, a_n, s_n, s_m = inputs                       # target level n, from level m < n
    y_n = y
    for _ in range(iterations):
      _, eps = denoiser(a_n * y_n, t_n, cond)
      y_n = y + (s_n - s_m) * eps
    return y_n

  xs = (t[1:], alpha[1:], s[1:], s[:-1])
  y, traj = _common.scan(step, x / alpha[0], xs, return_trajectory)
  x_out = alpha[-1] * y
  trajectory = None
  if return_trajectory:
    trajectory = _common.trajectory(x, expand_like(alpha[1:], traj) * traj)
  return x_out, iterations * (t.shape[0] - 1), trajectory


def _check_iterations(iterations, who):
  if int(iterations) != iterations or iterations < 1:
    raise ValueError(f'{who}: iterations={iterations} must be an integer >= 1')
  return int(iterations)


def ddim_invert(denoiser, process, x0, *, steps: int | None = None, cond=None,
                spacing: str = 'trailing', grid=None, t_max: float = 1.0, iterations: int = 1,
                return_trajectory: bool = False):
  """DDIM inversion: encodes data `x0` into `x_T` along the path `ddim_sample(eta=0)` decodes.

  Walks `ddim_sample`'s steps backwards, `0 -> n_{S-1} -> ... -> n_0 = T` (the same `steps`
  and `spacing`). Each DDIM step `n -> m` is `x_m / sqrt(abar_m) = x_n / sqrt(abar_n) + (s_m -
  s_n) eps_hat(x_n, n)` with `s = sqrt((1 - abar) / abar)`, implicit when solved for `x_n`:
  `iterations` fixed-point sweeps `x_n <- sqrt(abar_n) (x_m / sqrt(abar_m) + (s_n - s_m)
  eps_hat(x_n, n))`, started from `x_n = sqrt(abar_n) x_m / sqrt(abar_m)`. With
  `iterations = 1` (the usual DDIM inversion, one call per step, but with `eps_hat` at the
  target step's time) the round trip `ddim_sample(ddim_invert(x0))` returns `x0` up to an error
  that shrinks as 1 / steps; each further sweep shrinks it by the contraction factor
  `(s_n - s_m) |d eps_hat / d (x / sqrt(abar))|` (< 1 for Gaussian data). Deterministic.
  Calls: `steps * iterations`. Returns `(x_T, info)`; the trajectory runs from `x0` to `x_T`.
  `t_max < 1` inverts only up to step `N = t_max T` (what `ddim_sample(t_max=...)` decodes);
  `grid` as in `ddim_sample`.
  """
  who = 'ddim_invert'
  iterations = _check_iterations(iterations, who)
  n = _steps(process, steps, spacing, denoiser, who, t_max, grid)
  if process.zero_terminal_snr and int(n[0]) == process.num_steps:
    raise ValueError(f'{who}: step T has alpha = 0 (zero terminal SNR), where x_T = sigma eps '
                     'forgets x0 and nothing can be inverted; use a process without it')
  levels = np.concatenate([[0], n[::-1]])                                 # increasing noise
  dtype = x0.dtype
  abar = np.concatenate([[1.0], process.alphas_cumprod])[levels]
  alpha, s = np.sqrt(abar), np.sqrt((1.0 - abar) / abar)
  t = jnp.asarray(levels / process.num_steps, dtype)
  x_T, calls, trajectory = _invert(denoiser, x0, t, jnp.asarray(alpha, dtype),
                                   jnp.asarray(s, dtype), cond, iterations, return_trajectory)
  return x_T, _common.make_info(denoiser, calls, trajectory)


def euler_invert(denoiser, process, x0, *, steps: int, cond=None, grid: str = 'auto',
                 t_min=None, t_max: float = 1.0, rho: float = 7.0, final: str = 'data',
                 iterations: int = 1, return_trajectory: bool = False):
  """The inverse of `samplers.euler_sample` with the same grid arguments: encodes `x0` into the
  noise `x_T` at the grid's first time, for any continuous process.

  `euler_sample` is DDIM in `s = sigma / alpha`; this is `ddim_invert` on its grid: `x0` is
  clean data with `final='data'` (the sampler's last step returns `x0_hat`), else a point at
  `t_min`. Each step from level `m` up to `n` solves `x_m / alpha_m = x_n / alpha_n + (s_m -
  s_n) eps_hat(x_n, t_n)` for `x_n` by `iterations` fixed-point sweeps. Calls:
  `steps * iterations`. The grid must have finite log-SNR (alpha > 0) at every point.
  """
  who = 'euler_invert'
  iterations = _check_iterations(iterations, who)
  g = _common.make_grid(process, steps, x0, grid, t_min, t_max, rho, final)
  _common.require_finite_log_snr(g, who)
  dtype = x0.dtype
  t, alpha, sigma = (np.asarray(c, np.float64)[::-1] for c in (g.t, g.alpha, g.sigma))
  if g.to_data:   # clean data: s = 0; its alpha only rescales y = x / alpha, so take 1
    t, alpha, sigma = (np.concatenate([[v], c]) for v, c in ((0.0, t), (1.0, alpha),
                                                            (0.0, sigma)))
  t_j, alpha_j, s_j = (jnp.asarray(c, dtype) for c in (t, alpha, sigma / alpha))
  x_T, calls, trajectory = _invert(denoiser, x0, t_j, alpha_j, s_j, cond, iterations,
                                   return_trajectory)
  return x_T, _common.make_info(denoiser, calls, trajectory)
