"""The discrete VP process against its closed forms (Ho et al. 2020; Nichol & Dhariwal 2021)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import processes


def test_linear_betas_are_ddpm_values():
  betas = processes.linear_betas(1000)
  assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
  # Ho et al. choose the schedule so that x_T is almost pure noise: abar_T ≈ 4.0e-5.
  abar_T = np.exp(np.sum(np.log1p(-betas)))
  assert abar_T == pytest.approx(4.0358e-5, rel=1e-3)


def test_cosine_alphas_cumprod_is_f_ratio():
  """Nichol & Dhariwal Eq. 17: abar_n = f(n)/f(0) wherever beta was not clipped at 0.999."""
  T, s = 1000, 0.008
  proc = processes.DiscreteVP.from_name('cosine', T)
  f = lambda n: math.cos((n / T + s) / (1 + s) * math.pi / 2) ** 2
  expected = np.array([f(n) / f(0) for n in range(1, T + 1)])
  unclipped = np.cumprod(proc.betas < 0.999).astype(bool)
  np.testing.assert_allclose(proc.alphas_cumprod[unclipped], expected[unclipped], rtol=1e-10)
  assert unclipped.sum() > 990


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_continuous_embedding_hits_grid_exactly(schedule):
  proc = processes.DiscreteVP.from_name(schedule, 1000)
  n = np.arange(0, 1001)
  with jax.enable_x64(True):
    t = jnp.asarray(n / 1000.0)
    alpha, sigma = np.asarray(proc.alpha(t)), np.asarray(proc.sigma(t))
    abar = np.concatenate([[1.0], proc.alphas_cumprod])
    np.testing.assert_allclose(alpha**2, abar, rtol=1e-12)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(proc.alpha_bar_of_step(n, jnp.float64)), abar)


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_log_snr_strictly_decreasing_and_invertible(schedule):
  proc = processes.DiscreteVP.from_name(schedule, 1000)
  with jax.enable_x64(True):
    t = jnp.linspace(1e-4, 1.0, 5001, dtype=jnp.float64)
    lam = proc.log_snr(t)
    assert np.all(np.diff(np.asarray(lam)) < 0)
    np.testing.assert_allclose(np.asarray(proc.t_of_log_snr(lam)), np.asarray(t), atol=1e-10)
  assert np.isinf(proc.log_snr(0.0))


def test_forward_chain_matches_closed_form_marginal():
  """Iterating q(x_n | x_{n-1}) = N(sqrt(1-beta_n) x_{n-1}, beta_n) from x0 gives
  N(sqrt(abar_n) x0, 1 - abar_n)."""
  T, num = 50, 200_000
  proc = processes.DiscreteVP.from_name('linear', T)
  x0 = 0.7
  key = jax.random.key(0)

  def step(x, inputs):
    beta, k = inputs
    x = jnp.sqrt(1 - beta) * x + jnp.sqrt(beta) * jax.random.normal(k, x.shape)
    return x, x
  betas = jnp.asarray(proc.betas, jnp.float32)
  _, xs = jax.lax.scan(step, jnp.full((num,), x0), (betas, jax.random.split(key, T)))
  xs = np.asarray(xs)  # [T, num]: x_1 .. x_T
  t = proc.t_of_step(jnp.arange(1, T + 1))
  mean, var = np.asarray(proc.alpha(t)) * x0, np.asarray(proc.sigma(t)) ** 2
  # 6 standard errors: for mean, sqrt(var/N); for the variance, var * sqrt(2/N).
  np.testing.assert_array_less(np.abs(xs.mean(1) - mean), 6 * np.sqrt(var / num))
  np.testing.assert_array_less(np.abs(xs.var(1) - var), 6 * var * np.sqrt(2 / num))

  # And `marginal` draws exactly alpha x0 + sigma eps.
  eps = jax.random.normal(key, (T,))
  np.testing.assert_allclose(proc.marginal(jnp.full((T,), x0), eps, t), mean + np.sqrt(var) * eps,
                             rtol=1e-6, atol=1e-6)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match='unknown beta schedule'):
    processes.DiscreteVP.from_name('quadratic')
  with pytest.raises(ValueError, match='in \\(0, 1\\)'):
    processes.DiscreteVP(np.array([0.1, 1.5]))
  with pytest.raises(ValueError, match='unknown process'):
    processes.make_process('ve_nope')
