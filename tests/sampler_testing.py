"""Shared checks for sampler tests: convergence order on Gaussian data against the closed-form
probability-flow ODE solution (DESIGN §6), and call counting for exact NFE."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import analytic
from diffusion_jax import parameterization
from diffusion_jax import samplers

MU = np.array([1.5, -0.5, 0.0])
S2 = np.array([0.04, 0.5, 2.0])


def endpoint_errors(sample_fn, process, steps_list, grid='log_snr', t_min=None, batch=64,
                    seed=0, **kwargs):
  """Max |x(t_min) - exact| for each step count, in float64, stopping at t_min (final='t_min').

  `sample_fn(denoiser, process, x_T, key, steps=..., grid=..., t_min=..., final='t_min',
  **kwargs)`. The exact endpoint is the Gaussian PF-ODE solution from the grid's first time
  (t_max, or the clipped log-SNR start) to its last.
  """
  errors = []
  with jax.enable_x64(True):
    mu, s2 = jnp.asarray(MU), jnp.asarray(S2)
    den = analytic.gaussian_denoiser(mu, s2, process)
    x_T = process.prior_sample(jax.random.key(seed), (batch, MU.size), jnp.float64)
    for steps in steps_list:
      g = samplers.time_grid(process, steps, grid, t_min=t_min, final='t_min',
                             dtype=jnp.float64)
      exact = analytic.gaussian_pf_ode_solution(x_T, float(g.t[0]), float(g.t[-1]), mu, s2,
                                                process)
      x, _ = jax.jit(lambda x: sample_fn(den, process, x, None, steps=steps, grid=grid,
                                         t_min=t_min, final='t_min', **kwargs))(x_T)
      errors.append(float(jnp.max(jnp.abs(x - exact))))
  return np.asarray(errors)


def fitted_order(steps_list, errors):
  """Slope of -log(error) against log(steps): the measured convergence order."""
  return -np.polyfit(np.log(np.asarray(steps_list, float)), np.log(errors), 1)[0]


def counting(denoiser):
  """`(wrapped, count)`: `count()` is how many times the wrapped denoiser really ran (a host
  callback per execution, so calls inside a compiled scan are counted once per iteration)."""
  calls = []

  def wrapped(x, t, cond=None):
    jax.debug.callback(lambda: calls.append(1), ordered=False)
    return denoiser(x, t, cond)

  # The same Denoiser record (kind, evals_per_call, sigma_min) around the counting call.
  counted = dataclasses.replace(parameterization.as_denoiser(denoiser), fn=wrapped,
                                with_variance=None)
  return counted, lambda: len(calls)
