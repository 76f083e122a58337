"""Prediction kinds: conversions round-trip, and the Gaussian optimum is consistent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import analytic
from diffusion_jax import parameterization as param
from diffusion_jax import processes


@pytest.mark.parametrize('kind', param.ALL_KINDS)
@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_target_and_inverse_round_trip(kind, schedule):
  proc = processes.DiscreteVP.from_name(schedule, 1000)
  with jax.enable_x64(True):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.normal(k1, (64, 4, 4, 1), jnp.float64)
    eps = jax.random.normal(k2, x0.shape, jnp.float64)
    # Off-grid times too: the piecewise-linear embedding must be consistent everywhere.
    t = jax.random.uniform(k3, (64,), jnp.float64, 1e-3, 1.0)
    x_t = proc.marginal(x0, eps, t)
    if kind not in param.KINDS:   # only 'consistency': no regression target to round-trip
      assert kind == 'consistency'
      with pytest.raises(ValueError, match='no fixed regression target'):
        param.target(kind, x0, eps, proc, t)
      pytest.skip('consistency has no target; its to_x0_eps is tested below')
    out = param.target(kind, x0, eps, proc, t)
    x0_hat, eps_hat = param.to_x0_eps(kind, out, x_t, proc, t)
    np.testing.assert_allclose(x0_hat, x0, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(eps_hat, eps, rtol=1e-9, atol=1e-9)


def test_v_is_salimans_ho():
  proc = processes.DiscreteVP.from_name('cosine', 1000)
  x0, eps, t = jnp.ones((1, 3)), 2 * jnp.ones((1, 3)), jnp.array([0.5])
  a, s = proc.alpha(t), proc.sigma(t)
  np.testing.assert_allclose(param.target('v', x0, eps, proc, t), a * eps - s * x0, rtol=1e-6)


def test_velocity_is_time_derivative_of_path():
  """`velocity` must equal d/dt (alpha(t) x0 + sigma(t) eps), checked by finite differences."""
  proc = processes.DiscreteVP.from_name('linear', 1000)
  with jax.enable_x64(True):
    x0, eps = jnp.full((1, 2), 0.3, jnp.float64), jnp.full((1, 2), -1.2, jnp.float64)
    t, h = jnp.array([0.4003]), 1e-6  # inside a grid cell, where the path is smooth
    fd = (proc.marginal(x0, eps, t + h) - proc.marginal(x0, eps, t - h)) / (2 * h)
    np.testing.assert_allclose(param.target('velocity', x0, eps, proc, t), fd, rtol=1e-6)


def test_denoiser_from_optimal_eps_model_is_the_posterior_mean():
  """Wrapping the exact E[eps|x_t] as an eps-model must give back exactly E[x0|x_t]."""
  proc = processes.DiscreteVP.from_name('linear', 1000)
  mu, s2 = jnp.array([0.5, -0.3]), jnp.array([0.2, 1.5])
  truth = analytic.gaussian_denoiser(mu, s2, proc)
  model_fn = lambda x, t, c: truth(x, t)[1]
  den = param.make_denoiser(model_fn, proc, 'eps')
  x = jax.random.normal(jax.random.key(1), (16, 2))
  t = jnp.linspace(0.05, 1.0, 16)
  np.testing.assert_allclose(den(x, t)[0], truth(x, t)[0], rtol=2e-5, atol=2e-5)


def test_clip_keeps_pair_consistent():
  proc = processes.DiscreteVP.from_name('linear', 1000)
  den = param.make_denoiser(lambda x, t, c: 5.0 * x, proc, 'x0', clip_x0=1.0)
  x = jax.random.normal(jax.random.key(2), (8, 3))
  t = jnp.full((8,), 0.3)
  x0, eps = den(x, t)
  assert float(jnp.max(jnp.abs(x0))) <= 1.0
  np.testing.assert_allclose(proc.marginal(x0, eps, t), x, rtol=1e-5, atol=1e-5)


def test_unknown_kind():
  with pytest.raises(ValueError, match='unknown prediction kind'):
    param.target('noise', 0, 0, None, 0)


def test_consistency_kind_is_skip_scaled_and_the_identity_at_sigma_min():
  """Kind 'consistency' (Song et al. 2023, App. C): x0_hat = c_skip x + c_out F with
  c_skip = sd² / ((sigma - sigma_min)² + sd²), c_out = sd (sigma - sigma_min) / sqrt(sd² + sigma²);
  the network sees EDM's (c_in x, c_noise); the pair stays consistent with x_t; at sigma_min
  x0_hat = x_t whatever F is."""
  proc = processes.make_process('edm')
  with jax.enable_x64(True):
    x = 5.0 * jax.random.normal(jax.random.key(3), (32, 3), jnp.float64)
    out = 1e3 * jax.random.normal(jax.random.key(4), (32, 3), jnp.float64)
    t = jnp.linspace(0.01, 1.0, 32, dtype=jnp.float64)
    sigma, sd, smin = 80.0 * t[:, None], 0.5, 0.002
    x0, eps = param.to_x0_eps('consistency', out, x, proc, t)
    c_skip = sd**2 / ((sigma - smin) ** 2 + sd**2)
    c_out = sd * (sigma - smin) / jnp.sqrt(sd**2 + sigma**2)
    np.testing.assert_allclose(x0, c_skip * x + c_out * out, rtol=1e-12)
    np.testing.assert_allclose(proc.marginal(x0, eps, t), x, rtol=1e-12, atol=1e-12)
    for a, b in zip(param.network_input('consistency', x, t, proc),
                    param.network_input('edm', x, t, proc), strict=True):
      np.testing.assert_array_equal(a, b)
    # At sigma_min: exact when sigma(t) is sigma_min bitwise, to rounding through t otherwise.
    t_min = jnp.full((32,), proc.t_min, jnp.float64)
    exact, _ = param.to_x0_eps('consistency', out, x, proc, t_min,
                               sigma_min=float(proc.sigma(t_min)[0]))
    np.testing.assert_array_equal(exact, x)
    np.testing.assert_allclose(param.to_x0_eps('consistency', out, x, proc, t_min)[0], x,
                               rtol=1e-12, atol=1e-12)
    den = param.make_denoiser(lambda x_in, c, cond: jnp.zeros_like(x_in), proc, 'consistency',
                              sigma_min=0.5)
    np.testing.assert_allclose(den(x, jnp.full((32,), 0.5 / 80.0))[0], x, rtol=1e-12)


# Endpoint conventions (documented in `to_x0_eps`): a conversion divides by alpha (eps, score,
# edm, consistency -> x0) or by sigma (x0 -> eps), so it is exact on the open interval and
# conditioned like 1/alpha or 1/sigma near the ends. Samplers and objectives therefore stay in
# [t_min, t_max]: t_min > 0 where sigma(0) = 0, and t < 1 where alpha(1) = 0 (the linear
# interpolant, zero-terminal-SNR). Here: 1e-4 inside each end, in float64.
_ALL_PROCESSES = [(n, {}) for n in processes.PROCESSES if n != 'vp_discrete'] + [
    ('vp_discrete', {'schedule': s}) for s in ('linear', 'cosine', 'scaled_linear', 'sigmoid')]


@pytest.mark.parametrize('kind', param.KINDS)
@pytest.mark.parametrize('name, kwargs', _ALL_PROCESSES,
                         ids=[f'{n}-{"-".join(k.values())}' for n, k in _ALL_PROCESSES])
def test_round_trip_near_both_endpoints_on_every_process(kind, name, kwargs):
  proc = processes.make_process(name, **kwargs)
  with jax.enable_x64(True):
    lo = max(float(proc.t_min), 1e-4)
    t = jnp.concatenate([jnp.asarray([lo, lo * 2, 0.5, 1 - 1e-3, 1 - 1e-4], jnp.float64),
                         jnp.linspace(lo, 1 - 1e-4, 27, dtype=jnp.float64)])
    k1, k2 = jax.random.split(jax.random.key(5))
    x0 = jax.random.normal(k1, (t.shape[0], 3), jnp.float64)
    eps = jax.random.normal(k2, x0.shape, jnp.float64)
    x_t = proc.marginal(x0, eps, t)
    out = param.target(kind, x0, eps, proc, t)
    x0_hat, eps_hat = param.to_x0_eps(kind, out, x_t, proc, t)
    assert bool(jnp.all(jnp.isfinite(x0_hat)) & jnp.all(jnp.isfinite(eps_hat)))
    # Relative to the conditioning: errors scale with max(1, 1/alpha, 1/sigma) x rounding.
    cond = jnp.maximum(1.0, jnp.maximum(1 / proc.alpha(t), 1 / proc.sigma(t)))[:, None]
    scale = cond * (1.0 + jnp.abs(x_t) + jnp.abs(out))
    assert float(jnp.max(jnp.abs(x0_hat - x0) / scale)) < 1e-9
    assert float(jnp.max(jnp.abs(eps_hat - eps) / scale)) < 1e-9
