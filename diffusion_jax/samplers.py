"""Samplers compiled whole: `x0, info = sample(denoiser, process, x_T, key, steps=..., cond=...)`.

The prior draw `x_T` is an argument, so comparisons, inversion and interpolation start from
identical noise. The time grid is separate from the update rule, and the whole loop is one
`lax.scan`: wrapping a sampler in `jax.jit` traces the denoiser once, not once per step
(DESIGN §4). `info['nfe']` is the exact number of denoiser (network) evaluations.

This module holds the discrete samplers that run on DDPM's integer grid with the exact
`alphas_cumprod`: DDPM ancestral sampling and DDIM.
"""

import jax
import jax.numpy as jnp
import numpy as np

SPACINGS = ('leading', 'trailing', 'linspace')


def discrete_timesteps(num_train_steps: int, steps: int, spacing: str = 'trailing') -> np.ndarray:
  """Integer steps `n` (1..T, DDPM's indexing; 0 is clean data) visited, in decreasing order.

  Spacings follow the common definitions, written here in 0-based indices `k = n - 1`
  (Lin et al. 2024, Table 2): 'linspace' `round(linspace(0, T-1, S))`; 'leading'
  `arange(S) * (T // S)`; 'trailing' `round(arange(T, 0, -T/S)) - 1`. With S = T all are 1..T.
  """
  if spacing not in SPACINGS:
    raise ValueError(f'unknown timestep spacing {spacing!r}; choose from {SPACINGS}')
  if not 1 <= steps <= num_train_steps:
    raise ValueError(f'steps={steps} must lie in [1, {num_train_steps}] (the training steps T)')
  T, S = num_train_steps, steps
  if spacing == 'linspace':
    k = np.round(np.linspace(0, T - 1, S))
  elif spacing == 'leading':
    k = np.arange(S) * (T // S)
  else:
    k = np.round(np.arange(T, 0, -T / S)) - 1
  n = np.unique(k.astype(np.int64) + 1)[::-1]
  if n.size != S:  # rounding collided; cannot happen for S <= T with these rules, but check.
    raise ValueError(f'spacing {spacing!r} gives {n.size} distinct steps for steps={S}')
  return n


def _pairs(process, steps, spacing):
  """`(n, m)` step pairs from the grid down to 0: each update goes from `n` to `m < n`."""
  n = discrete_timesteps(process.num_steps, steps, spacing)
  m = np.concatenate([n[1:], [0]])
  return jnp.asarray(n, jnp.int32), jnp.asarray(m, jnp.int32)


def _scan(step_fn, x_T, xs, return_trajectory):
  def body(x, inputs):
    x_next = step_fn(x, *inputs)
    return x_next, (x_next if return_trajectory else None)
  x0, traj = jax.lax.scan(body, x_T, xs)
  info = {'nfe': int(xs[0].shape[0])}
  if return_trajectory:
    info['trajectory'] = jnp.concatenate([x_T[None], traj], axis=0)  # [S + 1, B, ...]
  return x0, info


def ddim_sample(denoiser, process, x_T, key=None, *, steps: int, eta: float = 0.0, cond=None,
                spacing: str = 'trailing', return_trajectory: bool = False):
  """DDIM (Song, Meng & Ermon 2021, Eq. 12) from `x_T` at step T down to clean data.

  `x_m = sqrt(abar_m) x0_hat + sqrt(1 - abar_m - s²) eps_hat + s z`, with
  `s = eta sqrt((1 - abar_m) / (1 - abar_n)) sqrt(1 - abar_n / abar_m)` (Eq. 16).
  `eta = 0` is deterministic (the probability-flow ODE's first-order solver); `eta = 1` has
  the DDPM posterior variance. `key` is needed only when `eta > 0`.
  """
  if eta < 0:
    raise ValueError(f'eta={eta} must be >= 0')
  if eta > 0 and key is None:
    raise ValueError('ddim_sample: eta > 0 draws noise, so a PRNG key is required')
  n, m = _pairs(process, steps, spacing)
  keys = jax.random.split(key, n.shape[0]) if key is not None else jnp.zeros((n.shape[0], 2))

  def step(x, n, m, k):
    abar_n = process.alpha_bar_of_step(n, x.dtype)
    abar_m = process.alpha_bar_of_step(m, x.dtype)
    x0, eps = denoiser(x, process.t_of_step(n, x.dtype), cond)
    s = eta * jnp.sqrt((1 - abar_m) / (1 - abar_n) * (1 - abar_n / abar_m))
    x_m = jnp.sqrt(abar_m) * x0 + jnp.sqrt(jnp.maximum(1 - abar_m - s**2, 0.0)) * eps
    if eta > 0:
      x_m = x_m + s * jax.random.normal(k, x.shape, x.dtype)
    return x_m

  return _scan(step, x_T, (n, m, keys), return_trajectory)


def ddpm_sample(denoiser, process, x_T, key, *, steps: int | None = None, cond=None,
                variance: str = 'small', spacing: str = 'trailing',
                return_trajectory: bool = False):
  """DDPM ancestral sampling (Ho et al. 2020, Alg. 2), on all T steps or a respaced subset.

  Each update draws from `q(x_m | x_n, x0 = x0_hat)`, the Gaussian posterior (Eqs. 6–7) with
  `beta = 1 - abar_n / abar_m` (the respacing of Nichol & Dhariwal 2021, §4): mean
  `sqrt(abar_m) beta / (1 - abar_n) x0_hat + sqrt(1 - beta) (1 - abar_m) / (1 - abar_n) x_n`,
  variance `(1 - abar_m) / (1 - abar_n) beta` ('small', the posterior's) or `beta` ('large').
  The last update (to m = 0) adds no noise and returns `x0_hat`.
  """
  if variance not in ('small', 'large'):
    raise ValueError(f"variance={variance!r}; choose 'small' or 'large'")
  n, m = _pairs(process, steps or process.num_steps, spacing)
  keys = jax.random.split(key, n.shape[0])

  def step(x, n, m, k):
    abar_n = process.alpha_bar_of_step(n, x.dtype)
    abar_m = process.alpha_bar_of_step(m, x.dtype)
    beta = 1 - abar_n / abar_m
    x0, _ = denoiser(x, process.t_of_step(n, x.dtype), cond)
    mean = (jnp.sqrt(abar_m) * beta / (1 - abar_n)) * x0 \
        + (jnp.sqrt(1 - beta) * (1 - abar_m) / (1 - abar_n)) * x
    var = beta * (1 - abar_m) / (1 - abar_n) if variance == 'small' else beta
    noise = jnp.where(m > 0, jnp.sqrt(var), 0.0) * jax.random.normal(k, x.shape, x.dtype)
    return mean + noise

  return _scan(step, x_T, (n, m, keys), return_trajectory)


def continuous_time_grid(process, steps: int, t_min: float, t_max: float = 1.0,
                         grid: str = 'log_snr', log_snr_clip: float = 20.0):
  """`steps` decreasing times from `t_max` to `t_min`: uniform in `t` or in log-SNR.

  Uniform log-SNR (`grid='log_snr'`) is DPM-Solver's default (Lu et al. 2022, §3.4); infinite
  log-SNR at an end (e.g. t = 0 or 1 of the linear interpolant) is clipped to `±log_snr_clip`.
  """
  if grid == 't':
    return jnp.linspace(t_max, t_min, steps)
  if grid != 'log_snr':
    raise ValueError(f"grid={grid!r}; choose 'log_snr' or 't'")
  lam = jnp.clip(process.log_snr(jnp.asarray([t_max, t_min], jnp.float32)), -log_snr_clip,
                 log_snr_clip)
  return process.t_of_log_snr(jnp.linspace(lam[0], lam[1], steps))


def ddim_continuous_sample(denoiser, process, x_T, key=None, *, steps: int, t_min=None,
                           t_max: float = 1.0, grid: str = 'log_snr', cond=None,
                           return_trajectory: bool = False):
  """DDIM's deterministic update on a continuous time grid, for any process (Song et al. 2021a,
  Eq. 12).

  `x_s = alpha(s) x0_hat + sigma(s) eps_hat` from `t_max` down to `t_min` (the process's by
  default); the last of the `steps` evaluations returns `x0_hat` at `t_min`. This is the
  first-order DPM-Solver (Lu et al. 2022, §3.3) and works on VP, VE, EDM and the linear
  interpolant alike. `key` is unused (deterministic).
  """
  del key
  if steps < 1:
    raise ValueError(f'steps={steps} must be >= 1')
  t_min = float(getattr(process, 't_min', 0.0) if t_min is None else t_min)
  t = continuous_time_grid(process, steps, t_min, t_max, grid).astype(x_T.dtype)   # [S]
  s = jnp.concatenate([t[1:], t[-1:]])
  last = jnp.arange(steps) == steps - 1

  def step(x, t, s, last):
    x0, eps = denoiser(x, t, cond)
    x_s = process.alpha(s) * x0 + process.sigma(s) * eps
    return jnp.where(last, x0, x_s)

  return _scan(step, x_T, (t, s, last), return_trajectory)


# name -> sampler(denoiser, process, x_T, key, *, steps, cond, ...) -> (x0, info).
SAMPLERS = {
    'ddpm': ddpm_sample,
    'ddim': ddim_sample,
    'ddim_continuous': ddim_continuous_sample,
}
