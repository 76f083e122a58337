"""Time grids, kept separate from the update rules that walk them (DESIGN §4).

A grid is the decreasing sequence of times at which a sampler evaluates the denoiser. Every
continuous-time sampler takes `grid=` by name:

  't'         uniform in t (flow matching's usual choice); where sigma(t_min) = 0 the step to
              data is one of the uniform steps, so t = 1, 1 - 1/N, ..., 1/N, then 0;
  'log_snr'   uniform in log-SNR lambda (DPM-Solver's default, Lu et al. 2022, §3.4);
  'karras'    Karras et al. (2022, Eq. 5) with exponent `rho` (7 by default) in the noise level
              `s = sigma / alpha = exp(-lambda / 2)` — EDM's sigma for every process, since
              `x / alpha = x0 + s eps`;
  'edm'       the 'karras' grid between EDM's published end points s = 80 and s = 0.002;
  'leading', 'trailing', 'linspace'
              the integer DDPM spacings of `discrete_timesteps` (DiscreteVP only), t = n / T,
              over the steps `1..t_max T` (`start_step`);
  'auto'      the few-step default of the multistep solvers and Euler (`samplers.defaults`):
              below 20 steps, one step from t_max straight down to log-SNR -4, then uniform
              log-SNR up to 1.5 + 0.4 * steps (or the given t_min); otherwise 'log_snr'.

A path ending in '.json' is a schedule stored by `optimized_grids.save_schedule` (searched for
a denoiser and a step count): `load_schedule` refuses one made for another process or step
count, or with times out of order or range, and its times are then used as an explicit grid —
so `--config.sample.options.grid=<workdir>/schedules/<file>.json` samples a run with it.

An explicit grid (any sequence of times instead of a name: a schedule found by search, such as
WaveGrad's few-iteration noise schedules, `audio.schedules`, or another library's timesteps
divided by T) is used as given: it must be strictly decreasing, inside `[t_min, t_max]` (the
process's training range by default), and hold exactly the `steps` (final='data') or
`steps + 1` (final='t_min') positive noise levels the sampler visits.

`final='data'` (the default) ends the grid with one more step from the last grid time to clean
data (sigma = 0): every sampler makes that step by returning the denoiser's `x0_hat` there,
which is what every exponential integrator, DDIM and Euler give when sigma_next = 0 (EDM Alg. 2,
line 8's branch). So `steps` update steps visit `steps` positive noise levels and cost at least
`steps` evaluations. `final='t_min'` stops at the last grid time instead (`steps + 1` grid
times, no step to data), which is what convergence tests against a closed-form ODE solution use.

Grids whose log-SNR end point is infinite (zero terminal SNR, the linear interpolant at t = 1)
start at `lambda = -log_snr_clip` for 'log_snr', 'karras' and 'edm', since an infinite noise level
cannot be a grid point; 't' and the integer spacings start at `t_max` itself.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SPACINGS = ('leading', 'trailing', 'linspace')
GRIDS = ('auto', 't', 'log_snr', 'karras', 'edm') + SPACINGS
FINALS = ('data', 't_min')
EDM_SIGMA_MIN, EDM_SIGMA_MAX = 0.002, 80.0


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


def diffusers_timesteps(timesteps, num_train_steps: int) -> np.ndarray:
  """Our times `t = (k + 1) / T` of diffusers' 0-based integer timesteps `k` (float64 numpy).

  diffusers indexes the T training steps from 0: its timestep `k` has `alphas_cumprod[k]`,
  which is our step `n = k + 1` (1-based; 0 is clean data), at `t = n / T`. So
  `[999, 899, ..., 99]` with T = 1000 (a 10-step 'trailing' schedule) becomes
  `[1.0, 0.9, ..., 0.1]`, an explicit grid for every sampler (`ddim_sample(grid=...)`,
  `time_grid`). Each `k` must be an integer in `[0, T - 1]`.
  """
  k = np.asarray(timesteps)
  T = int(num_train_steps)
  if k.ndim != 1 or k.size == 0:
    raise ValueError(f'diffusers_timesteps: expected a 1-D sequence of timesteps, got '
                     f'{timesteps!r}')
  kf = k.astype(np.float64)
  bad = (kf != np.round(kf)) | (kf < 0) | (kf > T - 1)
  if np.any(bad):
    raise ValueError(f'diffusers_timesteps: timestep {k[bad][0].item()!r} is not an integer in '
                     f'[0, {T - 1}] (0-based, T = {T})')
  return (kf + 1.0) / T


def start_step(num_train_steps: int, t_max: float = 1.0) -> int:
  """The integer step `N = t_max T` a discrete grid starts from (`T` at `t_max = 1`).

  The integer spacings are those of `discrete_timesteps(N, steps, spacing)`: a run started
  mid-way (SDEdit, partial DDIM inversion) visits steps `1..N` only. A start between two steps
  would have the sampler treat its input as lying at another noise level, so `t_max T` must be
  an integer (to 1e-4, float rounding) in `[1, T]`.
  """
  T = int(num_train_steps)
  n = float(t_max) * T
  N = int(round(n))
  if abs(n - N) > 1e-4 or not 1 <= N <= T:
    raise ValueError(f't_max={t_max}: a discrete grid starts at an integer step, so t_max * T '
                     f'(T = {T}) must be an integer in [1, {T}]; got {n:.6g}')
  return N


class Grid(NamedTuple):
  """Decreasing grid times with positive noise, their coefficients, and whether a final step
  to clean data follows. All arrays are concrete `[K]` (numpy), `K = steps` when `to_data`,
  else `steps + 1`."""
  t: np.ndarray
  alpha: np.ndarray
  sigma: np.ndarray
  log_snr: np.ndarray
  to_data: bool

  @property
  def s(self) -> np.ndarray:
    """`sigma / alpha`, EDM's noise level (inf where alpha = 0)."""
    with np.errstate(divide='ignore'):
      return self.sigma / self.alpha

  @property
  def steps(self) -> int:
    return self.t.shape[0] - 1 + int(self.to_data)


def _concrete(value) -> float | None:
  """`value` as a float, or None when it is traced (checked only where it is known)."""
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def karras_sigmas(n, sigma_min, sigma_max, rho: float = 7.0, *, size: int | None = None,
                  dtype=None, exact_ends: bool = True):
  """Karras et al. (2022, Eq. 5): `n` noise levels decreasing from `sigma_max` to `sigma_min`,

  `sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`,
  `i = 0..n-1` (`n = 1`: `sigma_max` alone). `exact_ends` sets `sigma_0 = sigma_max` and
  `sigma_{n-1} = sigma_min` bitwise (the formula's own ends may differ in the last bit), which a
  consistency model's boundary condition at `sigma_min` needs; `time_grid` keeps the formula's.

  A concrete `n` without `size` gives numpy float64, or a jax array of `dtype` if one is given.
  With `size`, `n` may be traced (iCT's curriculum under jit): a jax array of `size` entries in
  `dtype`, the first `size - n` equal to `sigma_max`, so that reversed into the increasing order
  consistency models index (CM §4) the padding comes last.
  """
  ends = _concrete(sigma_min), _concrete(sigma_max)
  if None not in ends and not 0 < ends[0] <= ends[1]:
    raise ValueError(f'karras_sigmas: need 0 < sigma_min <= sigma_max, got sigma_min={ends[0]}, '
                     f'sigma_max={ends[1]}')
  lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  if size is None:
    if int(n) < 1:
      raise ValueError(f'karras_sigmas: need n >= 1 points, got {n}')
    ramp = np.linspace(0.0, 1.0, int(n))                       # [n], i / (n - 1)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    if exact_ends:
      sigmas[-1] = sigma_min
      sigmas[0] = sigma_max
    return sigmas if dtype is None else jnp.asarray(sigmas, dtype)
  dtype = dtype or jnp.result_type(float)
  k = jnp.arange(size) - (size - n)                            # [size], i; <= 0 in the padding
  ramp = jnp.maximum(k, 0).astype(dtype) / jnp.asarray(n - 1, dtype)
  sigmas = (hi + ramp * (lo - hi)) ** rho
  if exact_ends:
    sigmas = jnp.where(k <= 0, sigma_max, jnp.where(k >= n - 1, sigma_min, sigmas))
  return sigmas.astype(dtype)


def time_grid(process, steps: int, grid: str = 'log_snr', *, t_min: float | None = None,
              t_max: float = 1.0, rho: float = 7.0, final: str = 'data',
              log_snr_clip: float = 20.0, dtype=None) -> Grid:
  """The grid of `steps` update steps for `process` (see the module docstring).

  `grid` is a name in `GRIDS` or an explicit sequence of times (`explicit_times`). `t_min`
  defaults to the process's `t_min` (the smallest time it was trained on). Computed in numpy
  from the process's float64 twins (`alpha_np`, ...; no jax op, so nothing to trace or compile,
  also inside `jit`), the times then rounded to `dtype` (float32, or float64 under
  `jax.enable_x64`) and alpha, sigma, log-SNR evaluated at the rounded times.
  """
  if isinstance(grid, str) and grid.endswith('.json'):   # a stored schedule, checked on load
    if final != 'data':
      raise ValueError(f"grid {grid!r}: a stored schedule's times end with the step to data; "
                       f"final={final!r} is not supported with it")
    from diffusion_jax.samplers import optimized_grids   # pylint: disable=g-import-not-at-top
    grid = optimized_grids.load_schedule(grid, process=process, steps=steps, t_min=t_min,
                                         t_max=t_max).times
  if isinstance(grid, str) and grid == 'auto':    # the few-step default (samplers.defaults)
    from diffusion_jax.samplers import defaults   # pylint: disable=g-import-not-at-top
    grid = defaults.auto_times(process, steps, t_min=t_min, t_max=t_max, final=final,
                               log_snr_clip=log_snr_clip)
  if not isinstance(grid, str):
    return explicit_times(process, steps, grid, t_min=t_min, t_max=t_max, final=final,
                          dtype=dtype)
  if grid not in GRIDS:
    raise ValueError(f'unknown time grid {grid!r}; choose from {GRIDS}')
  if final not in FINALS:
    raise ValueError(f'final={final!r}; choose from {FINALS}')
  if int(steps) != steps or steps < 1:
    raise ValueError(f'steps={steps} must be an integer >= 1')
  dtype = np.dtype(dtype or jnp.result_type(float))
  n = steps if final == 'data' else steps + 1           # grid times with positive noise
  # numpy throughout (the processes' float64 twins): nothing here is traced or compiled.
  if grid in SPACINGS:
    T = getattr(process, 'num_steps', None)
    if T is None:
      raise ValueError(f'grid {grid!r} is an integer DDPM spacing and needs a DiscreteVP '
                       f'process; got {type(process).__name__} (use t, log_snr or karras)')
    t = discrete_timesteps(start_step(T, t_max), n, grid) / T
  else:
    t_min = float(process.t_min if t_min is None else t_min)
    if not 0.0 <= t_min < t_max <= 1.0:
      raise ValueError(f'need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}')
    if grid == 't':
      # If t_min is clean data itself (sigma = 0, e.g. the linear interpolant), the final step
      # to data lands on it: the n grid times are the first n of n + 1 uniform ones.
      at_data = final == 'data' and float(process.sigma_np(t_min)) == 0.0
      t = np.linspace(t_max, t_min, n + 1)[:-1] if at_data else np.linspace(t_max, t_min, n)
    else:
      lam_raw = process.log_snr_np(np.array([t_max, t_min]))
      lam_ends = np.clip(lam_raw, -log_snr_clip, log_snr_clip)
      if grid == 'log_snr':
        lam = np.linspace(lam_ends[0], lam_ends[1], n)
      else:
        s_max, s_min = np.exp(-0.5 * lam_ends)
        if grid == 'edm':
          # 1e-9: the process's own end points, rounded in float64 (EDM's are 0.002, 80).
          if not s_min * (1 - 1e-9) <= EDM_SIGMA_MIN < EDM_SIGMA_MAX <= s_max * (1 + 1e-9):
            raise ValueError(f"grid 'edm' spans sigma/alpha in [{EDM_SIGMA_MIN}, "
                             f'{EDM_SIGMA_MAX}], outside this process range [{s_min:.4g}, '
                             f"{s_max:.4g}]; use grid='karras'")
          s_max, s_min = EDM_SIGMA_MAX, EDM_SIGMA_MIN
        lam = -2.0 * np.log(karras_sigmas(n, s_min, s_max, rho, exact_ends=False))
      t = process.t_of_log_snr_np(lam)
      if grid != 'edm':   # unclipped end points exactly, not through the inverse
        if abs(lam_raw[0]) <= log_snr_clip:
          t[0] = t_max
        if abs(lam_raw[1]) <= log_snr_clip and n > 1:
          t[-1] = t_min
  out = _grid_at(process, t, dtype, final)
  if np.any(np.diff(out.t) >= 0):
    raise ValueError(f'grid {grid!r} with steps={steps} is not strictly decreasing in t '
                     f'(t = {out.t}); use fewer steps or another grid')
  if np.any(out.sigma <= 0) or np.any(~np.isfinite(out.t)):
    raise ValueError(f'grid {grid!r} has a point with sigma <= 0 or non-finite t (sigma = '
                     f"{out.sigma}); use final='data' (it ends at sigma = 0) or raise t_min")
  return out


def _grid_at(process, t, dtype, final) -> Grid:
  """The `Grid` at the times `t` rounded to `dtype` (what the denoiser is called with); alpha,
  sigma and log-SNR from the process's float64 numpy twins at those times, then in `dtype`."""
  t = np.asarray(t, np.float64).astype(dtype)
  t64 = t.astype(np.float64)
  return Grid(t, *(np.asarray(f(t64)).astype(dtype) for f in (
      process.alpha_np, process.sigma_np, process.log_snr_np)), to_data=final == 'data')


def explicit_times(process, steps: int, times, *, t_min: float | None = None,
                   t_max: float = 1.0, final: str = 'data', dtype=None) -> Grid:
  """The `Grid` of an explicit sequence of `times` (decreasing, one per positive noise level
  visited: `steps` of them with `final='data'`, `steps + 1` with `final='t_min'`), each inside
  `[t_min, t_max]` (`t_min`: the process's). One-line errors name what is wrong."""
  if final not in FINALS:
    raise ValueError(f'final={final!r}; choose from {FINALS}')
  t = np.asarray(times, np.float64)
  if t.ndim != 1 or t.size == 0 or not np.all(np.isfinite(t)):
    raise ValueError(f'explicit grid: expected a 1-D sequence of finite times, got {times!r}')
  n = steps if final == 'data' else steps + 1
  if t.size != n:
    raise ValueError(f'explicit grid of {t.size} times: steps={steps} with final={final!r} '
                     f'visits {n} noise levels')
  if np.any(np.diff(t) >= 0):
    raise ValueError(f'explicit grid: times must be strictly decreasing, got {t.tolist()}')
  lo = float(process.t_min if t_min is None else t_min)
  if t[-1] < lo - 1e-9 or t[0] > t_max + 1e-9:
    raise ValueError(f'explicit grid: times run from {t[0]:.6g} to {t[-1]:.6g}, outside '
                     f'[t_min, t_max] = [{lo:.6g}, {t_max:.6g}] of this process')
  dtype = np.dtype(dtype or jnp.result_type(float))
  out = _grid_at(process, t, dtype, final)
  if np.any(np.diff(out.t) >= 0):
    raise ValueError(f'explicit grid: times collide in {np.dtype(dtype).name} '
                     f'(t = {out.t.tolist()})')
  if np.any(out.sigma <= 0):
    raise ValueError(f'explicit grid: a time with sigma <= 0 (t = {out.t.tolist()}); '
                     f"use final='data' (it ends at sigma = 0)")
  return out
