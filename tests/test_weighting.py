"""Implied eps-MSE weightings w(lambda) against Kingma & Gao (2023) closed forms and Monte Carlo."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax import objectives
from diffusion_jax import processes
from diffusion_jax import weighting

LAM = jnp.linspace(-8.0, 8.0, 161)


def _w(name, proc_name, **kwargs):
  return np.asarray(weighting.implied_weighting(name, processes.make_process(proc_name), LAM,
                                                **kwargs), np.float64)


def test_elbo_is_one():
  """VDM's eps weight ½ (t1 - t0) (-lambda'(t)) times its uniform-t density of lambda,
  |dt / d lambda| / (t1 - t0), times 2 is 1 (Kingma & Gao 2023, §3): float32 rounding of the
  two autodiff derivatives (and the bisection inverse of the cosine schedule) only."""
  np.testing.assert_allclose(_w('vdm_elbo', 'vp_cosine'), 1.0, rtol=1e-4)


def test_rectified_flow_is_exp_minus_half_lambda():
  """Flow matching, uniform t, linear interpolant: w = e^{-lambda/2} (K&G 2023, Table 1)."""
  np.testing.assert_allclose(_w('flow_matching', 'linear'), np.exp(-np.asarray(LAM) / 2),
                             rtol=1e-4)


def test_v_prediction_cosine_is_proportional_to_exp_minus_half_lambda():
  """v-MSE = 2 e^{-lambda/2} cosh(lambda/2) eps-MSE and cosine p(lambda) = sech(lambda/2)/(2 pi),
  so w = (2/pi) e^{-lambda/2}: the same shape as rectified flow (K&G 2023, §4)."""
  np.testing.assert_allclose(_w('v_prediction', 'vp_cosine'),
                             2 / np.pi * np.exp(-np.asarray(LAM) / 2), rtol=1e-3)


def test_l_simple_cosine_is_the_log_snr_density():
  """eps-MSE, uniform t on the cosine schedule: w = 2 p(lambda) = sech(lambda/2) / pi."""
  np.testing.assert_allclose(_w('ddpm_eps', 'vp_cosine'),
                             1 / (np.pi * np.cosh(np.asarray(LAM) / 2)), rtol=1e-3)


def test_edm():
  """EDM: p(lambda) = N(lambda; 2.4, 2.4²) from ln sigma ~ N(-1.2, 1.2²), times the eps weight
  (sigma² + sd²) / sd² = (e^{-lambda} + 0.25) / 0.25 (K&G 2023, Table 1), times our factor 2."""
  lam = np.asarray(LAM)
  expected = 2 * stats.norm.pdf(lam, 2.4, 2.4) * (np.exp(-lam) + 0.25) / 0.25
  np.testing.assert_allclose(_w('edm', 'edm'), expected, rtol=1e-4)


@pytest.mark.parametrize('name, proc_name, kwargs', [
    ('ddpm_x0', 'vp_discrete', {}), ('flow_matching', 'linear', {'t_sampling': 'logit_normal'}),
    ('dsm', 'vp_linear', {}), ('edm', 'vp_cosine', {}), ('v_prediction', 'vp_linear',
                                                          {'min_snr_gamma': 5.0})])
def test_density_and_weight_match_monte_carlo(name, proc_name, kwargs):
  """E_t[e(t) 1{lambda(t) in bin}] (Monte Carlo over the objective's own t-sampler and its aux
  eps_weight) equals ½ ∫_bin w(lambda) d lambda, for 8 bins, within 5 standard errors + 1%."""
  proc = processes.make_process(proc_name)
  objective = objectives.make_objective(name, proc, **kwargs)
  x0 = jnp.zeros((200_000, 1))
  _, aux = jax.jit(lambda k: objective(lambda x, t, c: jnp.zeros_like(x), x0, k))(
      jax.random.key(0))
  lam_mc = np.asarray(aux['log_snr'], np.float64)
  e = np.asarray(aux['eps_weight'], np.float64)
  edges = np.linspace(-6, 6, 9)
  fine = jnp.linspace(-6.0, 6.0, 12_001)
  w = np.asarray(weighting.implied_weighting(name, proc, fine, **kwargs), np.float64)
  for lo, hi in zip(edges[:-1], edges[1:], strict=True):
    inside = (lam_mc >= lo) & (lam_mc < hi)
    terms = e * inside
    mc, se = terms.mean(), terms.std() / np.sqrt(terms.size)
    sel = (np.asarray(fine) >= lo) & (np.asarray(fine) <= hi)
    integral = 0.5 * np.trapezoid(w[sel], np.asarray(fine)[sel])
    assert abs(mc - integral) < 5 * se + 0.01 * integral, (lo, hi, mc, integral, se)


def test_unweighted_objectives_are_refused():
  with pytest.raises(ValueError, match='not a weighted eps-MSE'):
    weighting.implied_weighting('ddpm_vlb', processes.make_process('vp_discrete'), LAM)
