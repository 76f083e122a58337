"""Samplers compiled whole: `x0, info = sample(denoiser, process, x_T, key, steps=..., cond=...)`.

The prior draw `x_T` is an argument, so comparisons, inversion and interpolation start from
identical noise. The time grid is separate from the update rule, and the whole loop is one
`lax.scan`: wrapping a sampler in `jax.jit` traces the denoiser once, not once per step
(DESIGN §4). `info['nfe']` is the exact number of denoiser (network) evaluations.

This module holds the discrete samplers that run on DDPM's integer grid with the exact
`alphas_cumprod` (DESIGN §1): DDPM ancestral sampling and DDIM.
"""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers import _common
from diffusion_jax.samplers.grids import discrete_timesteps


def _pairs(process, steps, spacing, denoiser, who):
  """`(n, m)` step pairs from the grid down to 0: each update goes from `n` to `m < n`."""
  if not hasattr(process, 'num_steps'):
    raise ValueError(f'{who} runs on the integer steps of a DiscreteVP process; got '
                     f"{type(process).__name__} (use 'euler', 'dpm_solver_pp' or another "
                     'continuous-time sampler)')
  n = discrete_timesteps(process.num_steps, steps, spacing)
  _common.check_terminal_snr(denoiser, process.alphas_cumprod[n[0] - 1], who)
  m = np.concatenate([n[1:], [0]])
  return jnp.asarray(n, jnp.int32), jnp.asarray(m, jnp.int32)


def _scan(step_fn, x_T, xs, return_trajectory, denoiser):
  x0, traj = _common.scan(lambda x, inputs: step_fn(x, *inputs), x_T, xs, return_trajectory)
  trajectory = _common.trajectory(x_T, traj) if return_trajectory else None   # [S + 1, B, ...]
  return x0, _common.make_info(denoiser, xs[0].shape[0], trajectory)


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
  n, m = _pairs(process, steps, spacing, denoiser, 'ddim_sample')
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

  return _scan(step, x_T, (n, m, keys), return_trajectory, denoiser)


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
  n, m = _pairs(process, steps or getattr(process, 'num_steps', 1), spacing, denoiser,
                'ddpm_sample')
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

  return _scan(step, x_T, (n, m, keys), return_trajectory, denoiser)
