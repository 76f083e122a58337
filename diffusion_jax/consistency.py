"""Consistency models: training and distillation as pure functions (DESIGN §3).

Song et al. 2023, "Consistency Models" (CM), and Song & Dhariwal 2023, "Improved Techniques for
Training Consistency Models" (iCT), in EDM's sigma parameterisation on processes with
`alpha = 1` (EDM, VE): `x_sigma = x0 + sigma z`, and the probability-flow ODE is
`dx / dsigma = (x - D(x; sigma)) / sigma` (Karras et al. 2022, Eq. 3 with `sigma(t) = t`). The
library's time of a noise level is `t = process.t_of_log_snr(-2 ln sigma)`.

A consistency model is `f(x, sigma) = c_skip x + c_out F(c_in x, c_noise)` with the scalings of
`parameterization.consistency_coefficients` (`f(x, sigma_min) = x`). The network is called as
`model_fn(c_in x, c_noise, cond) -> F`, exactly as for kind 'consistency' in
`parameterization`, so a trained model also works through
`make_denoiser(model_fn, process, 'consistency')`, which is how it is sampled (CM Alg. 1:
`samplers.consistency_multistep_sample`). Everything here stays in sigma, never round-tripping
through `t`, so the boundary condition holds bitwise at the grid's first point.

Metrics are per example over the whole sample (`||.||_2` over all non-batch dimensions), as in
the papers; `objectives` averages over dimensions instead (a constant factor `d` for L2).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erf

from diffusion_jax import parameterization as param
from diffusion_jax.parameterization import SIGMA_DATA
from diffusion_jax.parameterization import expand_like
from diffusion_jax.samplers import grids
from diffusion_jax.samplers import ode

# --- the process and the model ---------------------------------------------------------------


def _require_unit_alpha(process, who):
  # ensure_compile_time_eval: the check reads only the process's constants, so it also runs
  # when the caller is being traced by jit.
  with jax.ensure_compile_time_eval():
    alpha = np.asarray(process.alpha(jnp.asarray([1e-3, 0.1, 0.5, 1.0], jnp.float32)), float)
  if not np.allclose(alpha, 1.0, rtol=0.0, atol=1e-6):
    raise ValueError(f'{who}: consistency models need a process with alpha(t) = 1 (EDM, VE); '
                     f'{type(process).__name__} has alpha = {np.round(alpha, 4).tolist()}')


def sigma_range(process) -> tuple[float, float]:
  """`(sigma_min, sigma_max)` of an `alpha = 1` process: its fields, else sigma at t_min and 1."""
  sigma_max = getattr(process, 'sigma_max', None)
  if sigma_max is None:
    with jax.ensure_compile_time_eval():
      sigma_max = process.sigma(jnp.asarray(process.t_max, jnp.float32))
  return param.consistency_sigma_min(process), float(sigma_max)


def consistency_fn(model_fn, x, sigma, cond=None, *, sigma_min: float,
                   sigma_data: float = SIGMA_DATA):
  """`f(x, sigma) = c_skip x + c_out F(c_in x, c_noise)` (CM Eq. 5, App. C); `x [B, ...]`.

  `sigma` is `[B]` or a scalar. At `sigma == sigma_min`, `c_skip = 1` and `c_out = 0` exactly.
  """
  sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), x.shape[:1])
  c_skip, c_out, c_in, c_noise = param.consistency_coefficients(sigma, sigma_min, sigma_data)
  out = model_fn(expand_like(c_in, x) * x, c_noise, cond)
  return expand_like(c_skip, x) * x + expand_like(c_out, x) * out


# --- the discretization and its curriculum --------------------------------------------------
# The grid is EDM's (`samplers.grids.karras_sigmas`, ends exact), reversed: CM indexes it
# increasing, sigma_0 = sigma_min.


def num_timesteps(step, total_steps: int, s0: int = 10, s1: int = 1280):
  """iCT's doubling curriculum (Song & Dhariwal 2023, §3.4): N(k) = min(s0 2^floor(k/K'), s1) + 1.

  `K' = floor(K / (log2 floor(s1 / s0) + 1))`, `K = total_steps`, `k = step` (may be traced).
  Returns int32.
  """
  k_prime = max(math.floor(total_steps / (math.log2(s1 // s0) + 1)), 1)
  # Capping the exponent keeps s0 2^m in int32 range; past the cap min(., s1) = s1 anyway.
  doublings = jnp.clip(jnp.asarray(step) // k_prime, 0, math.ceil(math.log2(s1 / s0)))
  return jnp.minimum(jnp.left_shift(s0, doublings.astype(jnp.int32)), s1) + 1


def cm_num_timesteps(step, total_steps: int, s0: int = 2, s1: int = 150):
  """CM's curriculum (Song et al. 2023, App. C): N(k) = ceil(sqrt(k/K((s1+1)² - s0²) + s0²) - 1) + 1

  Runs from `N(0) = s0` to `N(K) = s1 + 1`; `step` may be traced; returns int32.
  """
  frac = jnp.minimum(jnp.asarray(step, jnp.float32) / total_steps, 1.0)
  n = jnp.ceil(jnp.sqrt(frac * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1.0) + 1.0
  return n.astype(jnp.int32)


def cm_ema_decay(n, s0: int = 2, mu0: float = 0.9):
  """CM's target-network EMA decay for consistency training (App. C): `exp(s0 ln mu0 / N(k))`."""
  return jnp.exp(s0 * math.log(mu0) / jnp.asarray(n, jnp.float32))


CURRICULA = {'ict': num_timesteps, 'cm': cm_num_timesteps}

# --- which interval --------------------------------------------------------------------------


def _valid_intervals(sigmas, n):
  return jnp.arange(sigmas.shape[0] - 1) < n - 1   # [S - 1]: intervals (i, i+1) of the grid


def lognormal_step_probs(sigmas, n, p_mean: float = -1.1, p_std: float = 2.0):
  """iCT's step law (Song & Dhariwal 2023, §3.5) over the `n - 1` intervals of `sigmas [S]`.

  `p(sigma_i) ∝ erf((ln sigma_{i+1} - P_mean) / (√2 P_std)) - erf((ln sigma_i - P_mean) /
  (√2 P_std))`: the mass of `ln sigma ~ N(P_mean, P_std²)` on each interval. Returns `[S - 1]`,
  zero past interval `n - 2`.
  """
  cdf = erf((jnp.log(sigmas) - p_mean) / (math.sqrt(2.0) * p_std))
  mass = jnp.where(_valid_intervals(sigmas, n), cdf[1:] - cdf[:-1], 0.0)
  return mass / jnp.sum(mass)


def uniform_step_probs(sigmas, n):
  """CM's `i ~ U{1, ..., N - 1}` (Song et al. 2023, Algs. 2 and 3) over the `n - 1` intervals."""
  valid = _valid_intervals(sigmas, n)
  return valid.astype(sigmas.dtype) / jnp.sum(valid).astype(sigmas.dtype)


def _draw_intervals(key, probs, batch_size):
  """`i ~ probs` by inverting the CDF: O(B log S), where Gumbel-max would draw B x S numbers."""
  cdf = jnp.cumsum(probs)                                          # [S - 1], flat past n - 2
  u = jax.random.uniform(key, (batch_size,), cdf.dtype) * cdf[-1]
  # side='right' never lands on a zero-mass interval; the clip guards u rounding up to cdf[-1].
  i = jnp.searchsorted(cdf, u, side='right')
  return jnp.minimum(i, jnp.argmax(cdf >= cdf[-1]))              # [B]


# --- how samples are compared and weighted ---------------------------------------------------


def pseudo_huber_c(dim: int) -> float:
  """iCT's `c = 0.00054 sqrt(d)` for data of `d` dimensions (Song & Dhariwal 2023, §3.3)."""
  return 0.00054 * math.sqrt(dim)


def _squared_norm(x, y):
  return jnp.sum(jnp.square(x - y).reshape(x.shape[0], -1), axis=-1)   # [B]


def squared_l2(x, y):
  """CM's `d(x, y) = ||x - y||²_2` per example (Song et al. 2023, §4), summed over dimensions."""
  return _squared_norm(x, y)


def pseudo_huber(x, y, c: float | None = None):
  """iCT's `d(x, y) = sqrt(||x - y||²_2 + c²) - c` per example (Song & Dhariwal 2023, §3.3).

  The norm is over the whole sample (all non-batch dimensions), `c` defaults to
  `pseudo_huber_c(d)`.
  """
  c = pseudo_huber_c(math.prod(x.shape[1:])) if c is None else c
  sq = _squared_norm(x, y)
  # Same value as sqrt(sq + c²) - c, without the cancellation that loses it when sq << c².
  return sq / (jnp.sqrt(sq + c**2) + c)


METRICS = {'pseudo_huber': pseudo_huber, 'l2': squared_l2}


def ict_weighting(sigma_i, sigma_next):
  """iCT's `lambda(sigma_i) = 1 / (sigma_{i+1} - sigma_i)` (Song & Dhariwal 2023, §3.1)."""
  return 1.0 / (sigma_next - sigma_i)


def uniform_weighting(sigma_i, sigma_next):
  """CM's `lambda = 1`, used in all of its experiments (Song et al. 2023, §6)."""
  del sigma_next
  return jnp.ones_like(sigma_i)


WEIGHTINGS = {'ict': ict_weighting, 'uniform': uniform_weighting}


def _lookup(table, name, what):
  if name not in table:
    raise ValueError(f'{what}={name!r}; choose from {sorted(table)}')
  return table[name]


def _aux(process, per_example, sigma_next, n):
  log_snr = -2.0 * jnp.log(sigma_next)                        # alpha = 1
  return {'loss_per_example': per_example, 't': process.t_of_log_snr(log_snr),
          'log_snr': log_snr, 'sigma': sigma_next, 'num_timesteps': n}


# --- consistency training ---------------------------------------------------------------------


def consistency_training(process, total_steps: int, s0: int = 10, s1: int = 1280,
                         p_mean: float = -1.1, p_std: float = 2.0, sigma_data: float = SIGMA_DATA,
                         loss: str = 'pseudo_huber', *, rho: float = 7.0, curriculum: str = 'ict',
                         step_sampling: str = 'lognormal', weighting: str = 'ict'):
  """Consistency training (CM Alg. 3) with iCT's choices (Song & Dhariwal 2023, §3.1–3.5).

  `E lambda(sigma_i) d(f(x0 + sigma_{i+1} z, sigma_{i+1}), sg f(x0 + sigma_i z, sigma_i))`, one
  `z` for both points; by default the target is the online model under stop_gradient (iCT
  §3.2: no EMA teacher), pseudo-Huber `d`, `lambda = 1 / (sigma_{i+1} - sigma_i)`, log-normal
  `i` and the doubling curriculum. CM's original CT is `curriculum='cm', s0=2, s1=150,
  step_sampling='uniform', weighting='uniform', loss='l2'` with an EMA `target_model_fn`
  (decay `cm_ema_decay`).

  The objective is `objective(model_fn, x0, key, cond=None, *, step=0, target_model_fn=None)`:
  `step` (the training step, may be traced) sets `N(step)`; the grid is padded to `s1 + 1`
  points so one compiled function serves every `N`.
  """
  _require_unit_alpha(process, 'consistency_training')
  if total_steps < 1:
    raise ValueError(f'consistency_training: total_steps must be >= 1, got {total_steps}')
  curriculum_fn = _lookup(CURRICULA, curriculum, 'curriculum')
  step_probs = _lookup({'lognormal': functools.partial(lognormal_step_probs, p_mean=p_mean,
                                                       p_std=p_std),
                        'uniform': uniform_step_probs}, step_sampling, 'step_sampling')
  weight_fn = _lookup(WEIGHTINGS, weighting, 'weighting')
  metric = _lookup(METRICS, loss, 'loss')
  sigma_min, sigma_max = sigma_range(process)
  f = functools.partial(consistency_fn, sigma_min=sigma_min, sigma_data=sigma_data)

  def objective(model_fn, x0, key, cond=None, *, step=0, target_model_fn=None):
    n = curriculum_fn(step, total_steps, s0, s1)
    sigmas = grids.karras_sigmas(n, sigma_min, sigma_max, rho, size=s1 + 1,
                                 dtype=x0.dtype)[::-1]                                # [s1+1]
    key_i, key_z = jax.random.split(key)
    i = _draw_intervals(key_i, step_probs(sigmas, n), x0.shape[0])                    # [B]
    sigma_i, sigma_next = sigmas[i], sigmas[i + 1]
    z = jax.random.normal(key_z, x0.shape, x0.dtype)
    target_fn = model_fn if target_model_fn is None else target_model_fn
    online = f(model_fn, x0 + expand_like(sigma_next, x0) * z, sigma_next, cond)
    target = jax.lax.stop_gradient(f(target_fn, x0 + expand_like(sigma_i, x0) * z, sigma_i, cond))
    per_example = weight_fn(sigma_i, sigma_next) * metric(online, target)
    return jnp.mean(per_example), _aux(process, per_example, sigma_next, n)

  return objective


# --- consistency distillation -----------------------------------------------------------------


def _sigma_to_t(process, sigma):
  return process.t_of_log_snr(-2.0 * jnp.log(sigma))


def _teacher_euler(teacher_denoiser, process, x, sigma, sigma_to, cond):
  """`samplers.ode.euler_step` of the teacher's PF ODE in sigma (alpha = 1); `sigma [B]`."""
  return ode.euler_step(teacher_denoiser, x, _sigma_to_t(process, sigma), 1.0,
                        expand_like(sigma_to, x), cond)


def _teacher_heun(teacher_denoiser, process, x, sigma, sigma_to, cond):
  """`samplers.ode.heun_step` of the teacher's PF ODE in sigma (alpha = 1); `sigma_to > 0`."""
  return ode.heun_step(teacher_denoiser, x, _sigma_to_t(process, sigma), 1.0,
                       expand_like(sigma, x), _sigma_to_t(process, sigma_to), 1.0,
                       expand_like(sigma_to, x), cond)


ODE_SOLVERS = {'euler': _teacher_euler, 'heun': _teacher_heun}


def consistency_distillation(process, teacher_denoiser, num_timesteps: int = 18,
                             ode_solver: str = 'heun', loss: str = 'l2',
                             sigma_data: float = SIGMA_DATA, *, rho: float = 7.0):
  """Consistency distillation (CM Alg. 2, Eq. 7): E d(f(x_{n+1}, sigma_{n+1}), sg f(x^_n, sigma_n)).

  `x_{n+1} = x0 + sigma_{n+1} z`, `x^_n` is one `ode_solver` step of the teacher's PF ODE from
  `sigma_{n+1}` to `sigma_n`, `n ~ U{0..N-2}` on the Karras grid of `num_timesteps` points,
  `lambda = 1` (as in all of CM's experiments). `teacher_denoiser(x_t, t, cond) -> (x0_hat,
  eps_hat)` is the library's denoiser interface. The objective is `objective(model_fn, x0, key,
  cond=None, *, step=0, target_model_fn=None)`; `target_model_fn` is CM's EMA target network
  (default: the online model under stop_gradient); `step` is accepted for a uniform interface
  and unused.
  """
  _require_unit_alpha(process, 'consistency_distillation')
  solve = _lookup(ODE_SOLVERS, ode_solver, 'ode_solver')
  metric = _lookup(METRICS, loss, 'loss')
  sigma_min, sigma_max = sigma_range(process)
  f = functools.partial(consistency_fn, sigma_min=sigma_min, sigma_data=sigma_data)
  n_points = int(num_timesteps)
  if n_points < 2:
    raise ValueError(f'consistency_distillation: num_timesteps={num_timesteps} must be >= 2 '
                     '(the Karras grid needs both end points)')

  def objective(model_fn, x0, key, cond=None, *, step=0, target_model_fn=None):
    del step
    sigmas = grids.karras_sigmas(n_points, sigma_min, sigma_max, rho, dtype=x0.dtype)[::-1]  # [N]
    key_n, key_z = jax.random.split(key)
    n = _draw_intervals(key_n, uniform_step_probs(sigmas, n_points), x0.shape[0])  # [B]
    sigma_n, sigma_next = sigmas[n], sigmas[n + 1]
    x_next = x0 + expand_like(sigma_next, x0) * jax.random.normal(key_z, x0.shape, x0.dtype)
    x_hat = jax.lax.stop_gradient(solve(teacher_denoiser, process, x_next, sigma_next, sigma_n,
                                        cond))
    online = f(model_fn, x_next, sigma_next, cond)
    target_fn = model_fn if target_model_fn is None else target_model_fn
    target = jax.lax.stop_gradient(f(target_fn, x_hat, sigma_n, cond))
    per_example = metric(online, target)
    return jnp.mean(per_example), _aux(process, per_example, sigma_next, n_points)

  return objective
