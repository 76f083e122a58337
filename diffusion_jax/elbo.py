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


def prior_kl(process, x0, t_max: float = 1.0):
  """`KL(q(x_{t_max} | x0) || N(0, prior_std²))` summed over dims, per example."""
  t1 = jnp.full(x0.shape[:1], t_max, x0.dtype)
  a, s = param.expand_like(process.alpha(t1), x0), param.expand_like(process.sigma(t1), x0)
  p2 = process.prior_std**2
  return _sum_per_example(0.5 * ((s**2 + (a * x0) ** 2) / p2 - 1.0 - jnp.log(s**2 / p2)))


def gaussian_decoder_nll(process, t0, shape):
  """`E -log N(x0; x_t0 / alpha, (sigma / alpha)²)` at `t0` (exact in eps), summed, per example."""
  s_tilde2 = (process.sigma(t0) / process.alpha(t0)) ** 2
  d = math.prod(shape[1:])
  return jnp.full(shape[:1], 0.5 * d * (jnp.log(2 * math.pi * s_tilde2) + 1.0))


def vdm_t0(process, t_min=None) -> float:
  """VDM's lowest time `t0`: `t_min`, the process's by default, and at least 1e-6."""
  t0 = float(process.t_min if t_min is None else t_min)
  return max(t0, 1e-6)  # lambda(0) = inf for most processes: the decoder sits at finite SNR


def vdm_elbo(process, t_min=None, t_max: float = 1.0):
  """VDM continuous-time negative ELBO (Kingma et al. 2021, Eqs. 11, 17), eps-prediction.

  `-ELBO = KL(q(x_t1|x0) || prior) + E -log p(x0 | x_t0) + ½ E_{t~U(t0, t1)} (t1 - t0)
  (-lambda'(t)) ||eps - eps_hat(x_t, t)||²` with `lambda = log SNR` (their `gamma = -lambda`).
  `t0 = t_min` (the process's by default) bounds the SNR, as VDM's `gamma_max` does; `t1 =
  t_max`, where the prior KL is taken, so the three terms cover [t0, t1] and the sum bounds the
  NLL for any `t1 <= 1` (a smaller `t1` gives a looser bound, never a lower one).
  """
  t0 = vdm_t0(process, t_min)

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
    nll = (prior_kl(process, x0, t_max)
           + gaussian_decoder_nll(process, jnp.full((b,), t0), x0.shape) + diffusion)
    d = math.prod(x0.shape[1:])
    aux = {'loss_per_example': nll / d, 'nll_nats': nll, 'bits_per_dim': bits_per_dim(nll, d),
           't': t, 'log_snr': process.log_snr(t), 'eps_weight': weight}  # on the per-dim loss
    return jnp.mean(nll) / d, aux

  return objective


def _gaussian_kl(mean1, var1, mean2, var2):
  """Elementwise KL(N(mean1, var1) || N(mean2, var2))."""
  return 0.5 * (jnp.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1.0)


def _ddpm_vlb_terms(process, x0, key, eps_out_fn, variance, stop_mean_gradient=False):
  """Per-example `(T · L_{n-1} [nats], prior KL [nats], eps, eps_hat, t)` of one MC draw.

  With `stop_mean_gradient` the KL sees `stop_gradient(eps_hat)`, so it trains only the variance.
  """
  T = process.num_steps
  key_n, key_eps = jax.random.split(key)
  b = x0.shape[0]
  n = jax.random.randint(key_n, (b,), 1, T + 1)
  t = process.t_of_step(n)
  eps = jax.random.normal(key_eps, x0.shape, x0.dtype)
  ex = lambda a: param.expand_like(a, x0)
  abar_n = process.alpha_bar_of_step(n, x0.dtype)
  abar_m = process.alpha_bar_of_step(n - 1, x0.dtype)
  x_t = ex(jnp.sqrt(abar_n)) * x0 + ex(jnp.sqrt(1 - abar_n)) * eps
  eps_hat, v = eps_out_fn(x_t, t)
  eps_mean = jax.lax.stop_gradient(eps_hat) if stop_mean_gradient else eps_hat
  x0_hat = (x_t - ex(jnp.sqrt(1 - abar_n)) * eps_mean) / ex(jnp.sqrt(abar_n))
  beta = 1 - abar_n / abar_m
  c0 = jnp.sqrt(abar_m) * beta / (1 - abar_n)
  ct = jnp.sqrt(1 - beta) * (1 - abar_m) / (1 - abar_n)
  mean_q = ex(c0) * x0 + ex(ct) * x_t
  mean_p = ex(c0) * x0_hat + ex(ct) * x_t
  var_q = beta * (1 - abar_m) / (1 - abar_n)
  if variance == 'learned':
    # beta~_1 = 0: like Nichol & Dhariwal, clip its log to beta~_2's for the interpolation.
    abar_1, abar_2 = (process.alpha_bar_of_step(k, x0.dtype) for k in (1, 2))
    tilde_2 = (1 - abar_2 / abar_1) * (1 - abar_1) / (1 - abar_2)
    log_tilde = jnp.log(jnp.where(n == 1, tilde_2, var_q))
    var_p = jnp.exp(v * ex(jnp.log(beta)) + (1 - v) * ex(log_tilde))      # [B, ...]
    var_dec = var_p
  else:
    var_p = ex(jnp.where(n == 1, beta, var_q if variance == 'small' else beta))
    var_dec = ex(beta)  # n = 1: the posterior is a point; Ho et al.'s decoder variance beta_1
  kl = _sum_per_example(_gaussian_kl(mean_q, ex(jnp.maximum(var_q, 1e-30)), mean_p, var_p))
  decoder = _sum_per_example(0.5 * (jnp.log(2 * math.pi * var_dec)
                                    + (x0 - mean_p) ** 2 / var_dec))
  terms = T * jnp.where(n == 1, decoder, kl)
  prior = prior_kl(process, x0)  # alpha(1)² = abar_T exactly: t = 1 is a grid point
  return terms, prior, eps, eps_hat, t


def ddpm_vlb(process, variance: str = 'small'):
  """DDPM's `L_vlb = L_T + sum_{n>1} L_{n-1} + L_0` (Ho et al. 2020, Eq. 5), eps-prediction.

  One Monte-Carlo term per example: `n ~ U{1..T}` and `T · L_{n-1}` with `L_{n-1} =
  KL(q(x_{n-1} | x_n, x0) || p(x_{n-1} | x_n))` (Eqs. 6–7), `p`'s mean the posterior mean at
  `x0_hat`. Its variance is fixed, 'small' (posterior beta~) or 'large' (beta), or 'learned'
  (Nichol & Dhariwal 2021, Eq. 15: the network outputs `2C` channels, see
  `split_learned_variance`). For `n = 1` the term is the decoder `-log p(x0 | x_1)`, Gaussian
  (continuous data; Ho et al.'s discretised decoder is for 8-bit images).
  """
  if variance not in ('small', 'large', 'learned'):
    raise ValueError(f"ddpm_vlb: variance={variance!r}; choose 'small', 'large' or 'learned'")

  def objective(model_fn, x0, key, cond=None):
    def eps_out(x_t, t):
      out = model_fn(x_t, t, cond)
      return param.split_learned_variance(out) if variance == 'learned' else (out, None)
    terms, prior, _, _, t = _ddpm_vlb_terms(process, x0, key, eps_out, variance)
    nll = terms + prior
    d = math.prod(x0.shape[1:])
    aux = {'loss_per_example': nll / d, 'nll_nats': nll, 'bits_per_dim': bits_per_dim(nll, d),
           't': t, 'log_snr': process.log_snr(t)}
    return jnp.mean(nll) / d, aux

  return objective


def ddpm_hybrid(process, vlb_weight: float = 0.001):
  """`L_hybrid = L_simple + lambda L_vlb`, lambda = 0.001 (Nichol & Dhariwal 2021, Eq. 16).

  The network outputs `2C` channels (eps, v). `L_vlb` (here the per-example Monte-Carlo VLB in
  bits/dim) sees a stop-gradient on the mean, so it trains only the variance and `L_simple`
  only the mean, as in the paper.
  """
  def objective(model_fn, x0, key, cond=None):
    eps_out = lambda x_t, t: param.split_learned_variance(model_fn(x_t, t, cond))
    terms, _, eps, eps_hat, t = _ddpm_vlb_terms(process, x0, key, eps_out, 'learned',
                                                stop_mean_gradient=True)
    d = math.prod(x0.shape[1:])
    mse = jnp.mean(jnp.square(eps - eps_hat).reshape(x0.shape[0], -1), axis=-1)
    vlb_bpd = terms / (d * math.log(2.0))
    per_example = mse + vlb_weight * vlb_bpd
    aux = {'loss_per_example': per_example, 'mse': mse, 'vlb_bits_per_dim': vlb_bpd, 't': t,
           'log_snr': process.log_snr(t), 'eps_weight': jnp.ones_like(t)}
    return jnp.mean(per_example), aux

  return objective
