"""Consistency models' one- and multistep sampling (Song et al. 2023, Alg. 1) on the denoiser
interface, for any process, compiled whole as one `lax.scan`.

A consistency model enters as `parameterization.make_denoiser(model_fn, process, 'consistency')`,
whose `x0_hat` is the consistency function `f(x, sigma)`; `diffusion_jax.consistency` trains it.
"""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import parameterization
from diffusion_jax.samplers import _common
from diffusion_jax.samplers import grids as grids_lib


def consistency_times(process, steps: int, grid: str = 'karras', *, t_min=None,
                      t_max: float = 1.0, rho: float = 7.0, dtype=None) -> np.ndarray:
  """The `steps` decreasing times a multistep consistency sampler evaluates at by default: the
  grid of `steps + 1` times from `t_max` to `t_min` without its last (`t_min`, where a
  consistency model is the identity, so evaluating there would change nothing)."""
  g = grids_lib.time_grid(process, steps, grid, t_min=t_min, t_max=t_max, rho=rho,
                          final='t_min', dtype=dtype)
  return g.t[:-1]


def _consistency_sigma_min(denoiser, process, sigma_min):
  if sigma_min is not None:
    return float(sigma_min)
  denoiser = parameterization.as_denoiser(denoiser)
  if denoiser.sigma_min is not None:
    return float(denoiser.sigma_min)
  if denoiser.kind == 'consistency':
    return parameterization.consistency_sigma_min(process)
  return 0.0


def consistency_multistep_sample(denoiser, process, x_T, key=None, *, steps: int | None = None,
                                 times=None, cond=None, grid: str = 'karras', t_min=None,
                                 t_max: float = 1.0, rho: float = 7.0, sigma_min=None,
                                 return_trajectory: bool = False):
  """Consistency models' sampling (Song et al. 2023, Alg. 1) for any process.

  `x0 <- x0_hat(x_T, t_0)`; then for each later time `t_i`: `x <- alpha_i (x0 + sqrt(s_i² -
  s_min²) z)` with `s = sigma / alpha` and `x0 <- x0_hat(x, t_i)`. A consistency model's output
  is a sample at noise level `s_min` (it is the identity there), which is why the fresh noise
  tops the level up from `s_min` (CM Alg. 1, line 5: `x + sqrt(tau² - eps²) z`); for any other
  denoiser `s_min = 0` and this is `x <- alpha_i x0_hat + sigma_i z`. `steps = 1` is one-step
  sampling.

  `times`: the decreasing times `t_0 > t_1 > ...` (x_T lies at `t_0`), else `consistency_times`
  (the `grid` of `steps + 1` times without `t_min`). `sigma_min` (`s_min`): by default the
  `Denoiser`'s `sigma_min`, else `consistency_sigma_min(process)` for a denoiser of kind
  'consistency' (what `make_denoiser` uses), else 0. Noise `z_i` is `normal(split(key, M)[i])`.
  Calls: `M = len(times)`; `key` needed for `M > 1`.
  The trajectory stacks `x_T`, the re-noised inputs and the output (`[M + 1, B, ...]`).
  """
  who = 'consistency_multistep_sample'
  dtype = x_T.dtype
  if times is None:
    if steps is None:
      raise ValueError(f'{who}: give steps or times')
    times = consistency_times(process, steps, grid, t_min=t_min, t_max=t_max, rho=rho,
                              dtype=dtype)
  times = np.asarray(times, dtype)
  if times.ndim != 1 or times.size == 0:
    raise ValueError(f'{who}: times must be a non-empty 1-D sequence, got shape {times.shape}')
  if steps is not None and steps != times.size:
    raise ValueError(f'{who}: steps={steps} but {times.size} times were given')
  if np.any(np.diff(times) >= 0) or not (0.0 < times[-1] and times[0] <= 1.0):
    raise ValueError(f'{who}: times must be strictly decreasing in (0, 1], got {times}')
  num = times.size
  if num > 1:
    _common.need_key(key, who, 'multistep sampling adds fresh noise')
  with jax.ensure_compile_time_eval():
    tt = jnp.asarray(times)
    alpha, sigma = np.float64(process.alpha(tt)), np.float64(process.sigma(tt))
  _common.check_terminal_snr(denoiser, alpha[0], who)
  s_min = _consistency_sigma_min(denoiser, process, sigma_min)
  with np.errstate(divide='ignore'):
    s = sigma / alpha                                  # inf at alpha = 0 (only t_0 may have it)
  if np.any(s[1:] < s_min):
    raise ValueError(f'{who}: a time after the first has noise level sigma / alpha below '
                     f'sigma_min = {s_min} (s = {s[1:]})')
  top_up = np.sqrt(np.maximum(s**2 - s_min**2, 0.0))
  t_j, alpha_j, std_j = (jnp.asarray(c, dtype) for c in (times, alpha, top_up))
  x0, _ = denoiser(x_T, t_j[0], cond)
  traj = None
  if num > 1:
    keys = jax.random.split(key, num)[1:]

    def step(carry, inputs):
      _, x0 = carry
      t_i, a_i, std_i, k = inputs
      x = a_i * (x0 + std_i * jax.random.normal(k, x0.shape, x0.dtype))
      return x, denoiser(x, t_i, cond)[0]

    (_, x0), traj = _common.scan(step, (x_T, x0), (t_j[1:], alpha_j[1:], std_j[1:], keys),
                                 return_trajectory, x_of=lambda c: c[0])
  trajectory = _common.trajectory(x_T, traj, x0) if return_trajectory else None
  return x0, _common.make_info(denoiser, num, trajectory, times=times)
