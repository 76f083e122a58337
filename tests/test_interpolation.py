"""Interpolation between prior draws (diffusion_jax.interpolation): slerp's closed-form
properties, and its batch fed to a sampler."""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import analytic
from diffusion_jax import interpolation
from diffusion_jax import processes
from diffusion_jax import samplers

PROC = processes.DiscreteVP.from_name('linear', 1000)


def test_slerp():
  k0, k1 = jax.random.split(jax.random.key(15))
  x0 = jax.random.normal(k0, (5, 8, 8))
  x1 = 1.3 * jax.random.normal(k1, (5, 8, 8))
  a = jnp.array([0.0, 0.25, 0.5, 0.9, 1.0])
  out = interpolation.slerp(x0, x1, a)
  np.testing.assert_array_equal(out[0], x0[0])
  np.testing.assert_array_equal(out[-1], x1[-1])
  np.testing.assert_array_equal(interpolation.slerp(x0, x1, 0.0), x0)
  np.testing.assert_array_equal(interpolation.slerp(x0, x1, 1.0), x1)
  norm = lambda v: jnp.sqrt(jnp.sum(v**2, axis=(1, 2)))
  np.testing.assert_allclose(norm(out), (1 - a) * norm(x0) + a * norm(x1), rtol=1e-5)
  # Constant angular speed along the great circle.
  cos = lambda u, v: jnp.sum(u * v, axis=(1, 2)) / (norm(u) * norm(v))
  theta = jnp.arccos(cos(x0, x1))
  np.testing.assert_allclose(jnp.arccos(jnp.clip(cos(x0, out), -1, 1)), a * theta, atol=2e-3)
  # Unit-norm inputs stay unit norm.
  u0, u1 = x0 / norm(x0)[:, None, None], x1 / norm(x1)[:, None, None]
  for s in (0.1, 0.5, 0.77):
    np.testing.assert_allclose(norm(interpolation.slerp(u0, u1, s)), 1.0, rtol=1e-5)
  # Degenerate cases: parallel (same direction), identical, exactly opposite: finite.
  par = interpolation.slerp(x0, 2.0 * x0, 0.5)
  np.testing.assert_allclose(par, 1.5 * x0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(interpolation.slerp(x0, x0, 0.3), x0, rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(interpolation.slerp(x0, -x0, 0.3)))
  # High-dimensional Gaussian draws keep their norm; linear interpolation shrinks it by ~sqrt 2.
  g0, g1 = (jax.random.normal(k, (1, 4096)) for k in (k0, k1))
  assert abs(float(norm(interpolation.slerp(g0, g1, 0.5)[:, :, None])[0]) / 64 - 1) < 0.05
  assert abs(float(norm((0.5 * (g0 + g1))[:, :, None])[0]) / 64 - 2**-0.5) < 0.05


def test_interpolation_batch_feeds_a_sampler():
  k0, k1 = jax.random.split(jax.random.key(16))
  xa, xb = jax.random.normal(k0, (4, 4)), jax.random.normal(k1, (4, 4))
  xs, alphas = interpolation.interpolation_batch(xa, xb, 7)
  assert xs.shape == (7, 4, 4) and alphas.shape == (7,)
  np.testing.assert_array_equal(xs[0], xa)
  np.testing.assert_array_equal(xs[-1], xb)
  lin, _ = interpolation.interpolation_batch(xa, xb, 7, method='linear')
  np.testing.assert_allclose(lin[3], 0.5 * (xa + xb), rtol=1e-6)
  den = analytic.gaussian_denoiser(jnp.zeros((4, 4)), jnp.ones((4, 4)), PROC)
  out, info = samplers.ddim_sample(den, PROC, xs, steps=5)
  assert out.shape == xs.shape and info['nfe'] == 5
