"""Objectives and the Langevin corrector pinned by value (DESIGN §6): each loss is recomputed
here by hand from the paper's formula, with the objective's own random draws reproduced from
its key (`key_a, key_b = jax.random.split(key)`, as every objective splits it) or read back
from `aux`.

* consistency training (Song et al. 2023, Alg. 3; Song & Dhariwal 2023): per example
  `lambda d(f(x0 + sigma_(i+1) z, sigma_(i+1)), f(x0 + sigma_i z, sigma_i))`, `lambda =
  1 / (sigma_(i+1) - sigma_i)`, pseudo-Huber `d`, and the gradient flows only through the
  noisier point;
* OT-CFM (Tong et al. 2023, Alg. 3): plain flow matching on noise paired to the data by a
  minimum-cost assignment (scipy's, here);
* L_hybrid (Nichol & Dhariwal 2021, Eq. 16): `L_simple + 0.001 T L_(n-1)` in bits/dim;
* the predictor-corrector sampler's Langevin step (Song et al. 2021, Alg. 5):
  `e = 2 alpha_i (snr ||z|| / ||g||)²`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from diffusion_jax import objectives
from diffusion_jax import processes
from diffusion_jax import samplers


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


# --- consistency training -----------------------------------------------------------------------


def _ct_setup():
  proc = processes.make_process('edm')                  # sigma in [0.002, 80]
  obj = objectives.make_objective('consistency_training', proc, total_steps=1000)
  x0 = jnp.asarray(np.random.default_rng(0).normal(size=(16, 2, 3)))
  return proc, obj, x0


def _cm_f(F, x, sigma, sigma_min=0.002, sd=0.5):
  """CM's f = c_skip x + c_out F(c_in x, ln(sigma) / 4) (Song et al. 2023, App. C)."""
  c_skip = sd**2 / ((sigma - sigma_min) ** 2 + sd**2)
  c_out = sd * (sigma - sigma_min) / np.sqrt(sd**2 + sigma**2)
  c_in = 1.0 / np.sqrt(sigma**2 + sd**2)
  e = lambda c: c[:, None, None]
  return e(c_skip) * x + e(c_out) * F(e(c_in) * x, 0.25 * np.log(sigma))


def test_consistency_training_loss_is_the_hand_computation():
  proc, obj, x0 = _ct_setup()
  F = lambda x, c_noise, cond=None: jnp.tanh(x) * (1.0 + c_noise[:, None, None]) + 0.1 * x**2
  step = 250
  key = jax.random.key(4)
  loss, aux = jax.jit(lambda x0, key: obj(F, x0, key, step=step))(x0, key)
  # The iCT curriculum at step 250 of 1000 (K' = 125): N = min(10 * 2^2, 1280) + 1 = 41 points.
  n = int(aux['num_timesteps'])
  assert n == 41
  rho, lo, hi = 7.0, 0.002 ** (1 / 7.0), 80.0 ** (1 / 7.0)
  sigmas = (lo + np.arange(n) / (n - 1) * (hi - lo)) ** rho             # EDM Eq. 5, increasing
  sigma_next = np.asarray(aux['sigma'])
  idx = np.array([np.argmin(np.abs(sigmas - s)) for s in sigma_next])
  np.testing.assert_allclose(sigmas[idx], sigma_next, rtol=1e-12)
  assert np.all(idx >= 1)
  sigma_i = sigmas[idx - 1]
  z = np.asarray(jax.random.normal(jax.random.split(key)[1], x0.shape, x0.dtype))
  x0n = np.asarray(x0)
  Fn = lambda x, c: np.tanh(x) * (1.0 + c[:, None, None]) + 0.1 * x**2
  online = _cm_f(Fn, x0n + sigma_next[:, None, None] * z, sigma_next)
  target = _cm_f(Fn, x0n + sigma_i[:, None, None] * z, sigma_i)
  c = 0.00054 * math.sqrt(6)                                   # iCT: 0.00054 sqrt(d)
  d = np.sqrt(np.sum((online - target) ** 2, axis=(1, 2)) + c**2) - c
  want = d / (sigma_next - sigma_i)
  np.testing.assert_allclose(np.asarray(aux['loss_per_example']), want, rtol=1e-9)
  np.testing.assert_allclose(float(loss), want.mean(), rtol=1e-9)


def test_consistency_training_gradient_flows_only_through_the_noisier_point():
  """A network with one parameter for inputs above a noise threshold and another below it,
  on a single example: the loss's gradient reaches only the parameter used at sigma_(i+1)."""
  proc, obj, x0 = _ct_setup()
  x0 = x0[:1]
  key = jax.random.key(11)
  _, aux = obj(lambda x, c, cond=None: x, x0, key, step=0)
  n = int(aux['num_timesteps'])
  rho, lo, hi = 7.0, 0.002 ** (1 / 7.0), 80.0 ** (1 / 7.0)
  sigmas = (lo + np.arange(n) / (n - 1) * (hi - lo)) ** rho
  s_next = float(aux['sigma'][0])
  s_i = sigmas[np.argmin(np.abs(sigmas - s_next)) - 1]
  threshold = 0.25 * math.log(math.sqrt(s_i * s_next))       # between the two c_noise values

  def loss(params):
    def F(x, c_noise, cond=None):
      hi_side = (c_noise > threshold)[:, None, None]
      return jnp.where(hi_side, params['noisy'], params['clean']) * jnp.sin(x)
    return obj(F, x0, key, step=0)[0]

  grads = jax.grad(loss)({'noisy': jnp.asarray(0.3), 'clean': jnp.asarray(-0.7)})
  assert abs(float(grads['noisy'])) > 1e-3, grads
  assert float(grads['clean']) == 0.0, grads


# --- OT-CFM -------------------------------------------------------------------------------------


def test_ot_flow_matching_is_flow_matching_on_assignment_paired_noise():
  proc = processes.make_process('linear')
  obj = objectives.make_objective('ot_flow_matching', proc)
  rng = np.random.default_rng(3)
  x0 = jnp.asarray(rng.normal(size=(12, 4)) + np.array([3.0, 0.0, -2.0, 1.0]))
  model = lambda x, t, cond=None: jnp.sin(x) * (1.0 + t[:, None]) - 0.3 * x
  key = jax.random.key(8)
  loss, aux = jax.jit(lambda x0, key: obj(model, x0, key))(x0, key)
  t = np.asarray(aux['t'], np.float64)
  eps = np.asarray(jax.random.normal(jax.random.split(key)[1], x0.shape, x0.dtype))
  x0n = np.asarray(x0)
  cost = np.sum((x0n[:, None, :] - eps[None, :, :]) ** 2, axis=-1)
  rows, cols = optimize.linear_sum_assignment(cost)
  assert np.any(cols != np.arange(12))                          # a real re-pairing
  paired = eps[cols[np.argsort(rows)]]
  x_t = (1.0 - t[:, None]) * x0n + t[:, None] * paired          # rectified flow path
  target = paired - x0n                                         # d x_t / dt
  out = np.sin(x_t) * (1.0 + t[:, None]) - 0.3 * x_t
  want = np.mean((out - target) ** 2, axis=-1)
  np.testing.assert_allclose(np.asarray(aux['loss_per_example']), want, rtol=1e-6)
  np.testing.assert_allclose(float(loss), want.mean(), rtol=1e-6)
  # Unpaired flow matching with the same key gives another value (the pairing matters).
  plain, _ = objectives.make_objective('flow_matching', proc)(model, x0, key)
  assert abs(float(plain) - want.mean()) > 0.1 * want.mean()


# --- L_hybrid -----------------------------------------------------------------------------------


def test_ddpm_hybrid_is_l_simple_plus_weighted_t_times_l_vlb_term():
  T = 50
  proc = processes.make_process('vp_discrete', num_steps=T)
  obj = objectives.make_objective('ddpm_hybrid', proc)
  x0 = jnp.asarray(np.random.default_rng(5).normal(size=(32, 3)))
  model = lambda x, t, cond=None: jnp.concatenate([0.5 * jnp.tanh(x), jnp.cos(x + t[:, None])],
                                                  axis=-1)
  key = jax.random.key(2)
  loss, aux = jax.jit(lambda x0, key: obj(model, x0, key))(x0, key)
  key_n, key_eps = jax.random.split(key)
  n = np.asarray(jax.random.randint(key_n, (32,), 1, T + 1))
  t = np.asarray(aux['t'], np.float64)
  np.testing.assert_allclose(t, n / T, rtol=1e-6)
  eps = np.asarray(jax.random.normal(key_eps, x0.shape, x0.dtype))
  abar = np.concatenate([[1.0], np.cumprod(1.0 - np.asarray(proc.betas))])
  ab_n, ab_m = abar[n][:, None], abar[n - 1][:, None]
  x0n = np.asarray(x0)
  x_t = np.sqrt(ab_n) * x0n + np.sqrt(1 - ab_n) * eps
  eps_hat = 0.5 * np.tanh(x_t)
  v = (np.cos(x_t + t[:, None]) + 1.0) / 2.0
  x0_hat = (x_t - np.sqrt(1 - ab_n) * eps_hat) / np.sqrt(ab_n)
  beta = 1 - ab_n / ab_m                                   # Ho et al. Eqs. 6-7
  c0, ct = np.sqrt(ab_m) * beta / (1 - ab_n), np.sqrt(1 - beta) * (1 - ab_m) / (1 - ab_n)
  mean_q, mean_p = c0 * x0n + ct * x_t, c0 * x0_hat + ct * x_t
  var_q = beta * (1 - ab_m) / (1 - ab_n)
  tilde2 = (1 - abar[2] / abar[1]) * (1 - abar[1]) / (1 - abar[2])
  log_tilde = np.log(np.where(n[:, None] == 1, tilde2, np.maximum(var_q, 1e-300)))
  var_p = np.exp(v * np.log(beta) + (1 - v) * log_tilde)   # Nichol & Dhariwal Eq. 15
  kl = 0.5 * np.sum(np.log(var_p / var_q) + (var_q + (mean_q - mean_p) ** 2) / var_p - 1, -1)
  dec = np.sum(0.5 * np.log(2 * np.pi * var_p) + (x0n - mean_p) ** 2 / (2 * var_p), -1)
  term = np.where(n == 1, dec, kl)
  mse = np.mean((eps - eps_hat) ** 2, -1)
  want = mse + 0.001 * T * term / (3 * math.log(2.0))
  np.testing.assert_allclose(np.asarray(aux['vlb_bits_per_dim']), T * term / (3 * math.log(2)),
                             rtol=1e-8)
  np.testing.assert_allclose(np.asarray(aux['loss_per_example']), want, rtol=1e-8)
  np.testing.assert_allclose(float(loss), want.mean(), rtol=1e-8)


# --- predictor-corrector: the Langevin step size ------------------------------------------------


@pytest.mark.parametrize('name', ['ve', 'vp_linear'])
@pytest.mark.parametrize('snr_norm', ['example', 'batch'])
def test_pc_langevin_step_is_song_2021_algorithm_5(name, snr_norm):
  """One corrector step then one reverse-diffusion predictor step between two levels:
  `e = 2 a (snr ||z|| / ||g||)²`, `x <- x + e g + sqrt(2 e) z` with `a = (alpha_0 / alpha_1)²`
  (1 for VE: Alg. 5's alpha_i), then `x <- (2 - r) x + G² g + G z'`, `r = alpha_0 / alpha_1`,
  `G² = sigma_0² - r² sigma_1²` (App. E)."""
  proc = processes.make_process(name)
  mu, s2 = np.array([1.0, -2.0, 0.5, 0.0]), np.array([0.3, 1.0, 2.0, 0.5])

  def den(x, t, cond=None):
    t = jnp.broadcast_to(t, x.shape[:1])
    a, s = proc.alpha(t)[:, None], proc.sigma(t)[:, None]
    x0 = mu + a * s2 / (a * a * s2 + s * s) * (x - a * mu)
    return x0, (x - a * x0) / s

  x_T = np.asarray(proc.prior_sample(jax.random.key(0), (5, 4), jnp.float64))
  key = jax.random.key(9)
  snr = 0.16
  x, _ = samplers.pc_sample(den, proc, jnp.asarray(x_T), key, steps=1, grid='t', t_min=0.3,
                            final='t_min', snr=snr, snr_norm=snr_norm)
  g = samplers.time_grid(proc, 1, 't', t_min=0.3, final='t_min', dtype=jnp.float64)
  (a0, a1), (s0, s1) = g.alpha, g.sigma
  keys = jax.random.split(key, (1, 2))                    # [update, corrector + predictor]
  z, z_pred = (np.asarray(jax.random.normal(keys[0, j], x_T.shape, jnp.float64)) for j in (0, 1))
  score = lambda y: -np.asarray(den(jnp.asarray(y), jnp.asarray(g.t[0]))[1]) / s0
  gs = score(x_T)
  zn, gn = np.linalg.norm(z, axis=-1), np.linalg.norm(gs, axis=-1)
  if snr_norm == 'batch':
    zn, gn = zn.mean(), gn.mean()
  e = np.broadcast_to(2.0 * (a0 / a1) ** 2 * (snr * zn / gn) ** 2, (5,))[:, None]
  y = x_T + e * gs + np.sqrt(2.0 * e) * z
  r = a0 / a1
  G2 = s0**2 - r**2 * s1**2
  want = (2.0 - r) * y + G2 * score(y) + np.sqrt(G2) * z_pred
  np.testing.assert_allclose(np.asarray(x), want, rtol=1e-10, atol=1e-10)
