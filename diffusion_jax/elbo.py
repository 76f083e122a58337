"""Likelihood objectives: the continuous-time VDM ELBO and DDPM's discrete VLB.

Both return the negative ELBO (an upper bound on -log p(x0)) so likelihood-trained models are
compared on one number. For continuous data the decoder at the low-noise end is Gaussian,
`p(x0 | x_{t0}) = N(x_{t0} / alpha, (sigma / alpha)²)`, so the bound is on a density (nats);
`bits_per_dim` converts, including the change of variables of 8-bit data scaled to [-1, 1].

`loss` is the bound in nats per dimension (batch mean); `aux['nll_nats']` is the per-example
total in nats and `aux['bits_per_dim']` the per-example bound in bits/dim.
"""

import math

import jax
import jax.numpy as jnp

from diffusion_jax import parameterization as param

LOG_127_5 = math.log(127.5)  # density change of x / 127.5 - 1 (8-bit data mapped to [-1, 1])


def bits_per_dim(nll_nats, num_dims, log_scale: float = 0.0):
  """`(nll / d + log_scale) / ln 2`; `log_scale = LOG_127_5` for 8-bit data in [-1, 1].

  For discrete 8-bit data, add uniform dequantisation noise before the bound (Song et al. 2021,
  App. D.2 / Ho et al. 2020 use the discretised decoder instead); the result then bounds the
  discrete NLL in bits/dim of [0, 255] data.
  """
  return (nll_nats / num_dims + log_scale) / math.log(2.0)


def _sum_per_example(x):
  return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def prior_kl(process, x0):
  """`KL(q(x_1 | x0) || N(0, prior_std²))` summed over dims, per example."""
  one = jnp.ones(x0.shape[:1], x0.dtype)
  a, s = param.expand_like(process.alpha(one), x0), param.expand_like(process.sigma(one), x0)
  p2 = process.prior_std**2
  return _sum_per_example(0.5 * ((s**2 + (a * x0) ** 2) / p2 - 1.0 - jnp.log(s**2 / p2)))


def gaussian_decoder_nll(process, t0, shape):
  """`E -log N(x0; x_t0 / alpha, (sigma / alpha)²)` at `t0` (exact in eps), summed, per example."""
  s_tilde2 = (process.sigma(t0) / process.alpha(t0)) ** 2
  d = math.prod(shape[1:])
  return jnp.full(shape[:1], 0.5 * d * (jnp.log(2 * math.pi * s_tilde2) + 1.0))


def vdm_elbo(process, t_min=None, t_max: float = 1.0):
  """VDM continuous-time negative ELBO (Kingma et al. 2021, Eqs. 11, 17), eps-prediction.

  `-ELBO = KL(q(x_1|x0) || prior) + E -log p(x0 | x_t0) + ½ E_{t~U(t0, t1)} (t1 - t0)
  (-lambda'(t)) ||eps - eps_hat(x_t, t)||²` with `lambda = log SNR` (their `gamma = -lambda`).
  `t0 = t_min` (the process's by default) bounds the SNR, as VDM's `gamma_max` does.
  """
  t0 = float(getattr(process, 't_min', 1e-5) if t_min is None else t_min)
  t0 = max(t0, 1e-6)  # lambda(0) = inf for most processes: the decoder sits at finite SNR

  def objective(model_fn, x0, key, cond=None):
    key_t, key_eps = jax.random.split(key)
    b = x0.shape[0]
    # Antithetic-free plain uniform t; VDM's low-discrepancy sampler only reduces variance.
    t = jax.random.uniform(key_t, (b,), jnp.float32, t0, t_max)
    eps = jax.random.normal(key_eps, x0.shape, x0.dtype)
    x_t = process.marginal(x0, eps, t)
    _, d_lambda = jax.jvp(process.log_snr, (t,), (jnp.ones_like(t),))
    eps_hat = model_fn(x_t, t, cond)
    weight = 0.5 * (t_max - t0) * (-d_lambda)                 # [B], on the summed eps error
    diffusion = weight * _sum_per_example(jnp.square(eps - eps_hat))
    nll = (prior_kl(process, x0) + gaussian_decoder_nll(process, jnp.full((b,), t0), x0.shape)
           + diffusion)
    d = math.prod(x0.shape[1:])
    aux = {'loss_per_example': nll / d, 'nll_nats': nll, 'bits_per_dim': bits_per_dim(nll, d),
           't': t, 'log_snr': process.log_snr(t), 'eps_weight': weight}  # on the per-dim loss
    return jnp.mean(nll) / d, aux

  return objective


def _gaussian_kl(mean1, var1, mean2, var2):
  """Elementwise KL(N(mean1, var1) || N(mean2, var2))."""
  return 0.5 * (jnp.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1.0)


def ddpm_vlb(process, variance: str = 'small'):
  """DDPM's `L_vlb = L_T + sum_{n>1} L_{n-1} + L_0` (Ho et al. 2020, Eq. 5), eps-prediction.

  One Monte-Carlo term per example: `n ~ U{1..T}` and `T · L_{n-1}` with `L_{n-1} =
  KL(q(x_{n-1} | x_n, x0) || p(x_{n-1} | x_n))` (Eqs. 6–7), `p`'s mean the posterior mean at
  `x0_hat` and its variance fixed: 'small' (posterior beta~) or 'large' (beta). For `n = 1`
  the term is the decoder `-log p(x0 | x_1)`, Gaussian with the same mean and variance
  (continuous data; Ho et al.'s discretised decoder is for 8-bit images). Learned variances
  (Nichol & Dhariwal 2021) are not implemented yet.
  """
  if variance not in ('small', 'large'):
    raise ValueError(f"ddpm_vlb: variance={variance!r}; choose 'small' or 'large'")
  T = process.num_steps

  def objective(model_fn, x0, key, cond=None):
    key_n, key_eps = jax.random.split(key)
    b = x0.shape[0]
    n = jax.random.randint(key_n, (b,), 1, T + 1)
    t = process.t_of_step(n)
    eps = jax.random.normal(key_eps, x0.shape, x0.dtype)
    abar_n = process.alpha_bar_of_step(n, x0.dtype)
    abar_m = process.alpha_bar_of_step(n - 1, x0.dtype)
    x_t = param.expand_like(jnp.sqrt(abar_n), x0) * x0 + param.expand_like(
        jnp.sqrt(1 - abar_n), x0) * eps
    eps_hat = model_fn(x_t, t, cond)
    x0_hat = (x_t - param.expand_like(jnp.sqrt(1 - abar_n), x0) * eps_hat) / param.expand_like(
        jnp.sqrt(abar_n), x0)
    beta = 1 - abar_n / abar_m
    c0 = jnp.sqrt(abar_m) * beta / (1 - abar_n)
    ct = jnp.sqrt(1 - beta) * (1 - abar_m) / (1 - abar_n)
    mean_q = param.expand_like(c0, x0) * x0 + param.expand_like(ct, x0) * x_t
    mean_p = param.expand_like(c0, x0) * x0_hat + param.expand_like(ct, x0) * x_t
    var_q = beta * (1 - abar_m) / (1 - abar_n)
    var_p = var_q if variance == 'small' else beta
    var_p0 = beta  # n = 1: var_q = 0 (the posterior is a point), the decoder needs var > 0
    var_p = jnp.where(n == 1, var_p0, var_p)
    kl = _sum_per_example(_gaussian_kl(mean_q, param.expand_like(jnp.maximum(var_q, 1e-30), x0),
                                       mean_p, param.expand_like(var_p, x0)))
    decoder = _sum_per_example(0.5 * (jnp.log(2 * math.pi * param.expand_like(var_p0, x0))
                                      + (x0 - mean_p) ** 2 / param.expand_like(var_p0, x0)))
    terms = T * jnp.where(n == 1, decoder, kl)
    one = jnp.ones((b,), x0.dtype)
    prior = prior_kl(_Terminal(process, abar_T=process.alpha_bar_of_step(T * one.astype(
        jnp.int32), x0.dtype)), x0)
    nll = terms + prior
    d = math.prod(x0.shape[1:])
    aux = {'loss_per_example': nll / d, 'nll_nats': nll, 'bits_per_dim': bits_per_dim(nll, d),
           't': t, 'log_snr': process.log_snr(t)}
    return jnp.mean(nll) / d, aux

  return objective


class _Terminal:
  """The discrete process's exact marginal at step T, for `prior_kl` (prior N(0, I))."""
  prior_std = 1.0

  def __init__(self, process, abar_T):
    self._abar = abar_T

  def alpha(self, t):
    del t
    return jnp.sqrt(self._abar)

  def sigma(self, t):
    del t
    return jnp.sqrt(1 - self._abar)
