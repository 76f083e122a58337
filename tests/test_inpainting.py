"""Inpainting (diffusion_jax.inpainting) on Gaussian data: diagonal (replacement is exact there)
and correlated (replacement is biased, RePaint's resampling reduces the bias).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import analytic
from diffusion_jax import guidance
from diffusion_jax import inpainting
from diffusion_jax import processes
from diffusion_jax import samplers
from tests.guidance_testing import NULL
from tests.guidance_testing import PROC
from tests.guidance_testing import labelled_denoiser
from tests.sampler_testing import counting


# --- inpainting -------------------------------------------------------------------------------

MU4 = np.array([1.5, -0.5, 2.0, -1.0])
S2_4 = np.array([0.04, 0.5, 2.0, 0.25])
MASK4 = np.array([True, True, False, False])
KNOWN4 = np.array([3.0, 1.0, 0.0, 0.0])    # far from the mean on purpose: dims are independent


def test_inpaint_wrapper_is_consistent_and_passes_attributes():
  den = analytic.gaussian_denoiser(MU4, S2_4, PROC)
  wrapped = inpainting.inpaint(den, PROC, KNOWN4, MASK4)
  x = jax.random.normal(jax.random.key(6), (7, 4))
  t = jnp.linspace(0.1, 0.9, 7)
  x0, eps = wrapped(x, t, None)
  np.testing.assert_array_equal(x0[:, :2], np.broadcast_to(KNOWN4[:2], (7, 2)).astype(np.float32))
  ref_x0, ref_eps = den(x, t)
  np.testing.assert_array_equal(x0[:, 2:], ref_x0[:, 2:])
  np.testing.assert_array_equal(eps[:, 2:], ref_eps[:, 2:])
  alpha, sigma = PROC.alpha(t)[:, None], PROC.sigma(t)[:, None]
  np.testing.assert_allclose(alpha * x0 + sigma * eps, x, rtol=1e-5, atol=1e-5)
  guided = guidance.classifier_free_guidance(labelled_denoiser(), 2.0, NULL)
  both = inpainting.inpaint(guided, PROC, jnp.zeros(3), jnp.array([1, 0, 0]))
  assert both.evals_per_call == 2 and both.kind == 'eps'


@pytest.mark.parametrize('name,steps', [pytest.param('ddpm', 1000, marks=pytest.mark.slow),
                                        ('ddim', 200),
                                        pytest.param('euler', 300, marks=pytest.mark.slow),
                                        ('heun', 100)])
def test_inpainting_gaussian_keeps_known_and_samples_conditional(name, steps):
  """Diagonal covariance: the conditional of the unknown dims is their marginal N(mu, s2).

  The known region is kept bitwise (and, before the final paste, to 1e-5; trivially, since every
  sampler ends with x0_hat, whose known region is `known`). The unknown dims equal (to float32
  rounding) those of the same sampler run without inpainting from the same x_T and key (the
  exact denoiser is diagonal), and match N(mu, s2): n = 8192 samples, mean within 4 standard
  errors (4 sqrt(s2 / n)), variance within 4 sqrt(2 / n) = 6.25% relative plus 2% for the
  solvers' discretization error (step counts chosen so that it is below 2%; at 30-100 steps
  it is 5-16% for these samplers, with or without inpainting)."""
  n = 8192
  den = analytic.gaussian_denoiser(MU4, S2_4, PROC)
  x_T = jax.random.normal(jax.random.key(7), (n, 4))
  sampler = samplers.SAMPLERS[name]
  run = jax.jit(lambda x, k: (
      inpainting.inpaint_sample(sampler, den, PROC, x, k, KNOWN4, MASK4, steps=steps)[0],
      sampler(inpainting.inpaint(den, PROC, KNOWN4, MASK4), PROC, x, k, steps=steps)[0],
      sampler(den, PROC, x, k, steps=steps)[0]))
  x, raw, plain = (np.asarray(a) for a in run(x_T, jax.random.key(8)))
  known = np.broadcast_to(KNOWN4.astype(np.float32), (n, 4))
  np.testing.assert_array_equal(x[:, MASK4], known[:, MASK4])                  # bitwise
  np.testing.assert_allclose(raw[:, MASK4], known[:, MASK4], atol=1e-5)        # no paste
  np.testing.assert_array_equal(x[:, ~MASK4], raw[:, ~MASK4])
  np.testing.assert_allclose(x[:, ~MASK4], plain[:, ~MASK4], atol=1e-4)  # float32 rounding
  u = x.astype(np.float64)[:, ~MASK4]
  mu, s2 = MU4[~MASK4], S2_4[~MASK4]
  assert np.all(np.abs(u.mean(0) - mu) < 4 * np.sqrt(s2 / n)), (u.mean(0), mu)
  assert np.all(np.abs(u.var(0) / s2 - 1) < 4 * np.sqrt(2 / n) + 0.02), (u.var(0), s2)


def test_replacement_keeps_known_region_on_its_forward_path():
  """DDIM (eta = 0) and Euler move the known region along `alpha known + sigma z` with the
  SAME z at every grid time: the wrapper's eps there is z, and x0 is `known`."""
  den = analytic.gaussian_denoiser(MU4, S2_4, PROC)
  x_T = jax.random.normal(jax.random.key(17), (64, 4))
  wrapped = inpainting.inpaint(den, PROC, KNOWN4, MASK4)
  _, info = samplers.ddim_sample(wrapped, PROC, x_T, steps=8, return_trajectory=True)
  n = samplers.discrete_timesteps(1000, 8, 'trailing')
  abar = PROC.alphas_cumprod[n - 1][:, None, None]
  z_ddim = (info['trajectory'][:8, :, :2] - np.sqrt(abar) * KNOWN4[:2]) / np.sqrt(1 - abar)
  _, info = samplers.euler_sample(wrapped, PROC, x_T, steps=8, grid='karras',
                                  return_trajectory=True)
  g = samplers.time_grid(PROC, 8, 'karras')
  a, sg = g.alpha[:, None, None], g.sigma[:, None, None]
  z_euler = (info['trajectory'][:8, :, :2] - a * KNOWN4[:2]) / sg
  for z in (z_ddim, z_euler):
    np.testing.assert_allclose(z, np.broadcast_to(z[:1], z.shape), atol=2e-4)


RHO = 0.9
MU2 = np.array([0.5, -0.3])
SIGMA2 = np.array([[1.0, RHO], [RHO, 1.0]])


def full_covariance_denoiser(mu, cov, process):
  """Exact denoiser for N(mu, cov): x0_hat = mu + alpha cov (alpha² cov + sigma² I)^-1
  (x - alpha mu); eps_hat = sigma (alpha² cov + sigma² I)^-1 (x - alpha mu)."""
  mu, cov = jnp.asarray(mu, jnp.float32), jnp.asarray(cov, jnp.float32)

  def den(x, t, cond=None):
    del cond
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
    alpha, sigma = process.alpha(t)[:, None], process.sigma(t)[:, None]
    a = alpha[:, :, None] ** 2 * cov + sigma[:, :, None] ** 2 * jnp.eye(mu.shape[0])
    sol = jnp.linalg.solve(a, (x - alpha * mu)[..., None])[..., 0]
    return mu + alpha * sol @ cov.T, sigma * sol

  return den


def test_full_covariance_denoiser_is_the_posterior_mean():
  den = full_covariance_denoiser(MU2, SIGMA2, PROC)
  x0 = jax.random.multivariate_normal(jax.random.key(9), MU2, SIGMA2, (200000,))
  t = 0.3
  xt = PROC.alpha(t) * x0 + PROC.sigma(t) * jax.random.normal(jax.random.key(10), x0.shape)
  x0_hat, eps_hat = den(xt, t)
  # Regression check: the residual of the posterior mean is uncorrelated with x_t.
  resid = np.asarray(x0 - x0_hat, np.float64)
  cov = resid.T @ np.asarray(xt, np.float64) / resid.shape[0]
  assert np.max(np.abs(cov)) < 0.01, cov
  np.testing.assert_allclose(PROC.alpha(t) * x0_hat + PROC.sigma(t) * eps_hat, xt, atol=1e-4)


@pytest.mark.slow   # ~8-16 s; moved out of the default run (its 10-minute budget)
def test_repaint_reduces_replacement_bias_on_correlated_gaussian():
  """x ~ N(mu, [[1, .9], [.9, 1]]), dim 0 known = 2: exact p(x_1 | x_0 = 2) has mean
  mu_1 + 0.9 (2 - mu_0) = 1.05 and variance 0.19. Replacement (DDPM 50 and 500, DDIM 50) is
  biased towards the marginal; RePaint (50 steps, jump 5, resample 10: 500 NFE) much less.
  n = 4096, standard error of the mean <= sqrt(0.5 / n) = 0.011."""
  n = 4096
  den = full_covariance_denoiser(MU2, SIGMA2, PROC)
  known, mask = jnp.array([2.0, 0.0]), jnp.array([True, False])
  exact = MU2[1] + RHO * (2.0 - MU2[0])
  x_T = jax.random.normal(jax.random.key(11), (n, 2))
  errors = {}
  for name, steps in (('ddpm', 50), ('ddpm', 500), ('ddim', 50)):
    x, info = jax.jit(lambda x, k: inpainting.inpaint_sample(
        samplers.SAMPLERS[name], den, PROC, x, k, known, mask, steps=steps))(
            x_T, jax.random.key(12))
    assert int(info['nfe']) == steps
    errors[f'replace_{name}_{steps}'] = abs(float(jnp.mean(x[:, 1])) - exact)
  x, info = jax.jit(lambda x, k: inpainting.repaint_sample(
      den, PROC, x, k, known, mask, steps=50, jump_length=5, resample=10))(x_T, jax.random.key(12))
  assert int(info['nfe']) == 500
  np.testing.assert_array_equal(x[:, 0], np.full(n, 2.0, np.float32))
  errors['repaint'] = abs(float(jnp.mean(x[:, 1])) - exact)
  print('conditional-mean error |E[x_u] - exact|:', errors)
  replace = min(v for k, v in errors.items() if k.startswith('replace'))
  assert replace > 0.3, errors
  assert errors['repaint'] < 0.35 * replace, errors


# --- RePaint ---------------------------------------------------------------------------------


def test_repaint_schedule():
  start, level = inpainting.repaint_schedule(12, jump_length=5, resample=3)
  assert level.shape == (36,)                                   # resample * steps
  np.testing.assert_array_equal(np.bincount(level, minlength=12), np.full(12, 3))
  assert level[-1] == 11 and np.all(start >= level)
  jumps = np.flatnonzero(start != level)
  # Blocks [0, 2), [2, 7), [7, 12) (aligned to data), each jumped back to its top twice.
  np.testing.assert_array_equal(level[jumps], [0, 0, 2, 2, 7, 7])
  np.testing.assert_array_equal(start[jumps], [2, 2, 7, 7, 12, 12])
  # Between jumps the walk goes down one level per step.
  plain = np.flatnonzero(start == level)[1:]
  assert np.all((level[plain] == level[plain - 1] + 1) | np.isin(plain, jumps))
  s1, l1 = inpainting.repaint_schedule(7, jump_length=3, resample=1)
  np.testing.assert_array_equal(l1, np.arange(7))
  np.testing.assert_array_equal(s1, np.arange(7))


def test_repaint_nfe_and_known_region():
  x_T = jax.random.normal(jax.random.key(13), (6, 3))
  inner, count = counting(labelled_denoiser())
  guided = guidance.classifier_free_guidance(inner, 2.0, NULL)
  known, mask = jnp.array([1.0, -1.0, 0.25]), jnp.array([1, 0, 1])
  x, info = inpainting.repaint_sample(guided, PROC, x_T, jax.random.key(14), known, mask,
                                    steps=10, jump_length=4, resample=3,
                                    cond=jnp.arange(6) % 2)
  jax.effects_barrier()
  assert count() == 30 and info['denoiser_calls'] == 30 and info['nfe'] == 60
  assert info['jumps'] == 3 * 2
  np.testing.assert_array_equal(x[:, 0], np.full(6, 1.0, np.float32))
  np.testing.assert_array_equal(x[:, 2], np.full(6, 0.25, np.float32))
  assert np.all(np.isfinite(x))
  with pytest.raises(ValueError, match='DiscreteVP'):
    inpainting.repaint_sample(guided, processes.VPLinear(), x_T, jax.random.key(0), known, mask,
                            steps=10)
