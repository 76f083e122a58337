"""Closed forms for Gaussian data `x0 ~ N(mu, diag(s²))`: the truth that tests and benchmarks use.

For Gaussian data every quantity a diffusion model learns is known exactly (DESIGN §6):
  x_t ~ N(alpha mu, diag(alpha² s² + sigma²)),
  E[x0 | x_t] = mu + alpha s² / (alpha² s² + sigma²) (x_t - alpha mu),
and the probability-flow ODE moves every point along `x_t = alpha mu + r(t) z` with
`r(t) = sqrt(alpha² s² + sigma²)` and `z` fixed.
"""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import parameterization
from diffusion_jax.parameterization import expand_like


def _r2(process, t, s2, x):
  alpha, sigma = expand_like(process.alpha(t), x), expand_like(process.sigma(t), x)
  return alpha, sigma, alpha**2 * s2 + sigma**2


def _check_variance(where, s2):
  """Refuses a negative variance where `s2` is concrete (a traced one is not checked)."""
  try:
    bad = bool(np.any(np.asarray(s2) < 0))
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return
  if bad:
    raise ValueError(f'{where}: s2 holds variances and must be >= 0, got {np.asarray(s2)}')


def gaussian_denoiser(mu, s2, process):
  """The optimal denoiser `(x_t, t, cond) -> (E[x0|x_t], E[eps|x_t])` for N(mu, diag(s2)) data."""
  mu, s2 = jnp.asarray(mu), jnp.asarray(s2)
  _check_variance('gaussian_denoiser', s2)

  def denoiser(x_t, t, cond=None):
    del cond
    t = jnp.broadcast_to(jnp.asarray(t, x_t.dtype), x_t.shape[:1])
    alpha, sigma, r2 = _r2(process, t, s2, x_t)
    resid = x_t - alpha * mu
    x0 = mu + alpha * s2 / r2 * resid
    eps = sigma / r2 * resid     # = (x_t - alpha x0) / sigma, without dividing by sigma
    return x0, eps

  return denoiser


def gaussian_eps_mse_minimum(s2, process, t):
  """Per-example `min E||eps - eps_hat(x_t)||²` / d at `t [B]`: `mean_d alpha² s² / r²`."""
  s2 = jnp.asarray(s2)
  alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
  flat = s2.reshape(1, -1)
  return jnp.mean(alpha**2 * flat / (alpha**2 * flat + sigma**2), axis=-1)


def gaussian_pf_ode_solution(x_start, t_start, t_end, mu, s2, process):
  """Maps `x_start` at `t_start` along the probability-flow ODE to `t_end` (exact)."""
  t0 = jnp.broadcast_to(jnp.asarray(t_start, x_start.dtype), x_start.shape[:1])
  t1 = jnp.broadcast_to(jnp.asarray(t_end, x_start.dtype), x_start.shape[:1])
  a0, _, r2_0 = _r2(process, t0, s2, x_start)
  a1, _, r2_1 = _r2(process, t1, s2, x_start)
  z = (x_start - a0 * mu) / jnp.sqrt(r2_0)
  return a1 * mu + jnp.sqrt(r2_1) * z


def _target_coefficients(kind, process, t, sigma_data):
  """`(A, B)` with `target_kind(x0, eps) = A x0 + B eps` (every kind's target is linear)."""
  one, zero = jnp.ones((t.shape[0], 1), t.dtype), jnp.zeros((t.shape[0], 1), t.dtype)
  a = parameterization.target(kind, one, zero, process, t, sigma_data)[:, 0]
  b = parameterization.target(kind, zero, one, process, t, sigma_data)[:, 0]
  return a, b


def gaussian_target_min_mse(kind, s2, process, t, sigma_data=0.5):
  """Per-example `min E mean_d (f(x_t) - target_kind)²` at `t [B]`: `mean_d Var[target | x_t]`.

  For `target = A x0 + B eps` with `x0 ~ N(mu, s²)`, `eps ~ N(0, 1)` and `x_t = alpha x0 +
  sigma eps` jointly Gaussian: `Var = A² s² + B² - (A s² alpha + B sigma)² / (alpha² s² +
  sigma²)`. Derived from the joint law alone, independent of the eps-MSE equivalences.
  """
  s2 = jnp.asarray(s2).reshape(1, -1)
  a, b = (c[:, None] for c in _target_coefficients(kind, process, t, sigma_data))
  alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
  var = a**2 * s2 + b**2 - (a * s2 * alpha + b * sigma) ** 2 / (alpha**2 * s2 + sigma**2)
  return jnp.mean(var, axis=-1)


def gaussian_optimal_model(kind, mu, s2, process, sigma_data=0.5):
  """The optimal network `(x_in, t_in, cond) -> E[target_kind | x_t]` for N(mu, diag(s2)) data."""
  return optimal_model(kind, gaussian_denoiser(mu, s2, process), process, sigma_data)


def gmm_posterior(x_t, t, weights, means, s2, process):
  """`(E[x0 | x_t], Var[x0_d | x_t])` for a mixture of diagonal Gaussians, `t [B]`.

  Components `k`: weight `w_k`, mean `means[k]`, variances `s2[k]` (`[K, D]`). Per component
  the posterior is Gaussian (as in `gaussian_denoiser`); responsibilities are
  `r_k ∝ w_k N(x_t; alpha m_k, alpha² s_k² + sigma²)`, and the mixture's per-dimension variance
  is `sum_k r_k (v_k + m_k²) - m²`.
  """
  weights, means, s2 = jnp.asarray(weights), jnp.asarray(means), jnp.asarray(s2)
  t = jnp.broadcast_to(jnp.asarray(t, x_t.dtype), x_t.shape[:1])
  alpha, sigma = process.alpha(t)[:, None, None], process.sigma(t)[:, None, None]  # [B, 1, 1]
  x = x_t[:, None, :]                                                             # [B, 1, D]
  r2 = alpha**2 * s2[None] + sigma**2                                             # [B, K, D]
  log_lik = -0.5 * jnp.sum((x - alpha * means[None]) ** 2 / r2 + jnp.log(2 * jnp.pi * r2), -1)
  resp = jax.nn.softmax(jnp.log(weights)[None] + log_lik, axis=-1)[..., None]    # [B, K, 1]
  mean_k = means[None] + alpha * s2[None] / r2 * (x - alpha * means[None])
  var_k = s2[None] * sigma**2 / r2
  mean = jnp.sum(resp * mean_k, axis=1)
  var = jnp.sum(resp * (var_k + mean_k**2), axis=1) - mean**2
  return mean, jnp.maximum(var, 0.0)


def gmm_denoiser(weights, means, s2, process):
  """The optimal denoiser `(x_t, t, cond) -> (E[x0|x_t], E[eps|x_t])` for a diagonal GMM."""
  def denoiser(x_t, t, cond=None):
    del cond
    t = jnp.broadcast_to(jnp.asarray(t, x_t.dtype), x_t.shape[:1])
    x0, _ = gmm_posterior(x_t, t, weights, means, s2, process)
    alpha, sigma = expand_like(process.alpha(t), x_t), expand_like(process.sigma(t), x_t)
    return x0, (x_t - alpha * x0) / sigma
  return denoiser


def optimal_model(kind, denoiser, process, sigma_data=0.5):
  """The network whose output is `E[target_kind | x_t]`, given the exact `denoiser`.

  Every target is linear in `(x0, eps)`, so its conditional mean is the target of the
  denoiser's `(E[x0|x_t], E[eps|x_t])`. Takes what `network_input` gives the network (for
  'edm', `(c_in x_t / alpha, c_noise)`, inverted here).
  """
  def model_fn(x_in, t_in, cond=None):
    if kind == 'edm':
      t = process.t_of_log_snr(-8.0 * t_in)             # c_noise = ln(sigma~) / 4
      _, _, c_in, _ = parameterization.edm_coefficients(process, t, sigma_data)
      x_t = x_in * expand_like(process.alpha(t) / c_in, x_in)
    else:
      x_t, t = x_in, t_in
    x0, eps = denoiser(x_t, t, cond)
    return parameterization.target(kind, x0, eps, process, t, sigma_data)
  return model_fn
