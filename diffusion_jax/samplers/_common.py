"""Pieces every sampler shares: NFE accounting, grid coefficients, the scan driver, the final
step to data. Samplers are pure functions of `(denoiser, process, x_T, key)`; nothing here holds
state.

NFE: a `parameterization.Denoiser` says how many network evaluations one call costs in
`evals_per_call` (classifier-free guidance costs 2: conditional and unconditional); plain
callables cost 1. `info['nfe'] = calls * evals_per_call` and `info['denoiser_calls']`.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import parameterization
from diffusion_jax.samplers import grids as grids_lib


def evals_per_call(denoiser) -> int:
  return int(parameterization.as_denoiser(denoiser).evals_per_call)


def make_info(denoiser, calls: int, trajectory=None, **extra) -> dict:
  info = {'nfe': int(calls) * evals_per_call(denoiser), 'denoiser_calls': int(calls)}
  if trajectory is not None:
    info['trajectory'] = trajectory
  info.update(extra)
  return info


# Kinds whose conversion to x0 divides by alpha (to_x0_eps): undefined where alpha = 0.
DIVIDE_BY_ALPHA = ('eps', 'score', 'edm', 'consistency')


def check_terminal_snr(denoiser, alpha_first, who: str):
  """Refuses eps-type predictions where alpha = 0 (zero terminal SNR): there `x0 = (x - sigma
  eps) / alpha` is 0/0, and the sampler would return inf/NaN (Lin et al. 2024, §3.2)."""
  kind = parameterization.as_denoiser(denoiser).kind
  if kind in DIVIDE_BY_ALPHA and float(alpha_first) == 0.0:
    raise ValueError(f'{who}: the first step is at alpha = 0 (zero terminal SNR), where a '
                     f"{kind!r}-prediction model cannot give x0; use a 'v' or 'x0' model, a "
                     "clipped grid ('log_snr', 'karras') or t_max < 1")


def require_finite_log_snr(grid: grids_lib.Grid, who: str):
  if not np.all(np.isfinite(grid.log_snr)):
    raise ValueError(f'{who} steps in log-SNR / sigma-over-alpha, infinite at t = '
                     f'{grid.t[0]:.4g} (alpha = 0); use a clipped grid (log_snr, karras) or '
                     't_max < 1')


def make_grid(process, steps, x_T, grid, t_min, t_max, rho, final, log_snr_clip=20.0):
  check_x_T(x_T, 'sampler')
  g = grids_lib.time_grid(process, steps, grid, t_min=t_min, t_max=t_max, rho=rho,
                          final=final, log_snr_clip=log_snr_clip, dtype=x_T.dtype)
  warn_if_short_of_data(g, process, t_min)
  return g


def warn_if_short_of_data(g: grids_lib.Grid, process, t_min=None):
  """Warns when a grid with `final='t_min'` stops above the smallest time asked for (the
  process's `t_min` unless given): the sampler then returns a state still carrying noise, which
  a caller expecting data would not notice (e.g. the integer 'trailing' spacing with 10 steps
  stops at t = 0.1, where sigma / alpha is ~0.35 on DDPM's linear schedule)."""
  if g.to_data:
    return
  lo = float(process.t_min if t_min is None else t_min)
  if float(g.t[-1]) > lo + 1e-6 * max(lo, 1e-3):
    warnings.warn(f"final='t_min': the grid stops at t = {float(g.t[-1]):.4g} (sigma / alpha = "
                  f'{float(g.s[-1]):.3g}), above t_min = {lo:.4g}, so the sampler returns a '
                  f"state that still carries noise; use final='data' to end at the data",
                  UserWarning, stacklevel=4)


def as_arrays(grid: grids_lib.Grid, dtype):
  """`(t, alpha, sigma, log_snr)` as jnp arrays of `dtype`."""
  return tuple(jnp.asarray(a, dtype) for a in (grid.t, grid.alpha, grid.sigma, grid.log_snr))


def scan(step_fn, carry, xs, return_trajectory: bool, x_of=lambda c: c):
  """`lax.scan` of `step_fn(carry, x_slice) -> carry`; the trajectory stacks `x_of(carry)`."""
  def body(c, inputs):
    c = step_fn(c, inputs)
    return c, (x_of(c) if return_trajectory else None)
  return jax.lax.scan(body, carry, xs)


def trajectory(x_T, traj, x_last=None):
  """`[x_T, x_1, ..., x_last]` stacked on a new leading axis."""
  parts = [x_T[None]] + ([traj] if traj is not None and traj.shape[0] else [])
  if x_last is not None:
    parts.append(x_last[None])
  return jnp.concatenate(parts, axis=0)


def to_data(denoiser, x, t_last, cond):
  """The final step from the last grid time to sigma = 0: `x0_hat` there (1 call)."""
  x0, _ = denoiser(x, t_last, cond)
  return x0


def finish(denoiser, x, t_last, cond, grid: grids_lib.Grid, traj, return_trajectory: bool,
           calls: int, x_T, **extra):
  """The final step to data (`x0_hat` at `t_last`, 1 call) if the grid has one, and `info`
  (`traj` is the scan's stacked states, or None)."""
  x_out = to_data(denoiser, x, t_last, cond) if grid.to_data else x
  calls += int(grid.to_data)
  traj_out = None
  if return_trajectory:
    traj_out = trajectory(x_T, traj, x_out if grid.to_data else None)
  return x_out, make_info(denoiser, calls, traj_out, **extra)


def check_x_T(x_T, who: str):
  """The prior draw must be a floating array: an integer one would be carried through the loop
  as integers (or fail deep inside `lax.scan`)."""
  if not jnp.issubdtype(jnp.result_type(x_T), jnp.floating):
    raise ValueError(f'{who}: x_T must be a floating array (the prior draw), got dtype '
                     f'{jnp.result_type(x_T)}')


def need_key(key, who: str, why: str):
  if key is None:
    raise ValueError(f'{who}: {why}, so a PRNG key is required (key=jax.random.key(...))')


def preset(fn, name: str, **fixed):
  """`fn` with keyword options fixed (e.g. `order=2`), to list in `SAMPLERS` as `name`.

  A `functools.partial`, so `inspect.signature` still shows every option of `fn` (the training
  loop checks a config's sampler options against it); a caller may still override `fixed`.
  """
  sampler = functools.partial(fn, **fixed)
  sampler.__name__ = name
  options = ', '.join(f'{k}={v!r}' for k, v in fixed.items())
  sampler.__doc__ = f'`{fn.__name__}(..., {options})`.'
  return sampler

