"""Independent oracles (DESIGN §6): EDM's preconditioning (Karras et al. 2022, Table 1), every
prediction kind's regression target, and the Gaussian optimum, each written out here from the
papers' formulas with the path derivatives in closed form, never through
`parameterization.target`, `edm_coefficients` or `analytic` helpers. The library's outputs are
compared against them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import analytic
from diffusion_jax import parameterization as param
from diffusion_jax import processes

SD = 0.5          # sigma_data
MU = np.array([1.5, -0.5, 0.0])
S2 = np.array([0.04, 0.5, 2.0])
T = np.array([0.02, 0.1, 0.35, 0.6, 0.9])


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def closed_form_path(name, t):
  """alpha, sigma, alpha', sigma' in closed form (numpy float64)."""
  if name == 'linear':          # rectified flow: alpha = 1 - t, sigma = t
    return 1.0 - t, t, -np.ones_like(t), np.ones_like(t)
  if name == 'vp_linear':       # Song et al. 2021: log alpha = -t² (b1 - b0) / 4 - t b0 / 2
    b0, b1 = 0.1, 20.0
    alpha = np.exp(-0.25 * t**2 * (b1 - b0) - 0.5 * t * b0)
    d_alpha = alpha * (-0.5 * t * (b1 - b0) - 0.5 * b0)
    sigma = np.sqrt(1.0 - alpha**2)
    return alpha, sigma, d_alpha, -alpha * d_alpha / sigma
  if name == 'edm':             # alpha = 1, sigma = 80 t
    return np.ones_like(t), 80.0 * t, np.zeros_like(t), 80.0 * np.ones_like(t)
  raise ValueError(name)


def table1(s, sd=SD):
  """Karras et al. 2022, Table 1 ("Ours") at noise level s = sigma / alpha."""
  return (sd**2 / (s**2 + sd**2), s * sd / np.sqrt(s**2 + sd**2), 1.0 / np.sqrt(s**2 + sd**2),
          0.25 * np.log(s))


def target_coefficients(kind, name, t, sd=SD):
  """(A, B) with target = A x0 + B eps, from the papers: eps; x0; v = alpha eps - sigma x0
  (Salimans & Ho); score = -eps / sigma; velocity = alpha' x0 + sigma' eps; edm: F = (x0 -
  c_skip (x0 + s eps)) / c_out (Karras et al. Eq. 7-8)."""
  a, s, da, ds = closed_form_path(name, t)
  one, zero = np.ones_like(t), np.zeros_like(t)
  if kind == 'eps':
    return zero, one
  if kind == 'x0':
    return one, zero
  if kind == 'v':
    return -s, a
  if kind == 'score':
    return zero, -1.0 / s
  if kind == 'velocity':
    return da, ds
  c_skip, c_out, _, _ = table1(s / a, sd)
  return (1.0 - c_skip) / c_out, -c_skip * (s / a) / c_out


@pytest.mark.parametrize('name', ['edm', 'vp_linear', 'linear'])
@pytest.mark.parametrize('sd', [0.5, 1.0])
def test_edm_coefficients_are_table_1(name, sd):
  proc = processes.make_process(name)
  a, s, _, _ = closed_form_path(name, T)
  got = param.edm_coefficients(proc, jnp.asarray(T), sd)
  for g, want in zip(got, table1(s / a, sd), strict=True):
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-12, atol=0)
  # The network sees (c_in x_t / alpha, c_noise).
  x = np.random.default_rng(0).normal(size=(T.size, 3))
  x_in, t_in = param.network_input('edm', jnp.asarray(x), jnp.asarray(T), proc, sd)
  _, _, c_in, c_noise = table1(s / a, sd)
  np.testing.assert_allclose(np.asarray(x_in), (c_in / a)[:, None] * x, rtol=1e-12)
  np.testing.assert_allclose(np.asarray(t_in), c_noise, rtol=1e-12)


@pytest.mark.parametrize('kind', param.KINDS)
@pytest.mark.parametrize('name', ['linear', 'vp_linear', 'edm'])
def test_every_target_is_the_papers_formula(kind, name):
  proc = processes.make_process(name)
  rng = np.random.default_rng(1)
  x0, eps = rng.normal(size=(2, T.size, 3))
  A, B = target_coefficients(kind, name, T)
  want = A[:, None] * x0 + B[:, None] * eps
  got = param.target(kind, jnp.asarray(x0), jnp.asarray(eps), proc, jnp.asarray(T))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-12)
  # And the network output equal to the hand target converts back to (x0, eps).
  a, s, _, _ = closed_form_path(name, T)
  x_t = a[:, None] * x0 + s[:, None] * eps
  x0_hat, eps_hat = param.to_x0_eps(kind, jnp.asarray(want), jnp.asarray(x_t), proc,
                                    jnp.asarray(T))
  np.testing.assert_allclose(np.asarray(x0_hat), x0, rtol=1e-9, atol=1e-9)
  np.testing.assert_allclose(np.asarray(eps_hat), eps, rtol=1e-9, atol=1e-9)


def posterior(x_t, a, s):
  """E[x0 | x_t], E[eps | x_t] for x0 ~ N(MU, diag(S2)) (Gaussian conditioning)."""
  a, s = a[:, None], s[:, None]
  x0 = MU + a * S2 / (a**2 * S2 + s**2) * (x_t - a * MU)
  return x0, (x_t - a * x0) / s


@pytest.mark.parametrize('name', ['vp_linear', 'linear', 'edm'])
def test_gaussian_denoiser_and_optimal_models_are_the_posterior_mean(name):
  proc = processes.make_process(name)
  a, s, _, _ = closed_form_path(name, T)
  x_t = np.random.default_rng(2).normal(size=(T.size, 3)) * 3.0
  x0, eps = posterior(x_t, a, s)
  got = analytic.gaussian_denoiser(jnp.asarray(MU), jnp.asarray(S2), proc)(jnp.asarray(x_t),
                                                                           jnp.asarray(T))
  np.testing.assert_allclose(np.asarray(got[0]), x0, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(np.asarray(got[1]), eps, rtol=1e-10, atol=1e-12)
  for kind in param.KINDS:
    A, B = target_coefficients(kind, name, T)
    model = analytic.gaussian_optimal_model(kind, jnp.asarray(MU), jnp.asarray(S2), proc, SD)
    x_in, t_in = param.network_input(kind, jnp.asarray(x_t), jnp.asarray(T), proc, SD)
    np.testing.assert_allclose(np.asarray(model(x_in, t_in)), A[:, None] * x0 + B[:, None] * eps,
                               rtol=1e-8, atol=1e-10, err_msg=kind)


@pytest.mark.parametrize('name', ['vp_linear', 'linear'])
def test_gaussian_minimum_mse_is_the_conditional_variance(name):
  """min E mean_d (f - A x0 - B eps)² = mean_d Var[A x0 + B eps | x_t] with x0, eps, x_t
  jointly Gaussian: A² s² + B² - (A s² alpha + B sigma)² / (alpha² s² + sigma²)."""
  proc = processes.make_process(name)
  a, s, _, _ = closed_form_path(name, T)
  a2, s2_ = a[:, None], s[:, None]
  eps_min = np.mean(a2**2 * S2 / (a2**2 * S2 + s2_**2), axis=-1)
  np.testing.assert_allclose(np.asarray(analytic.gaussian_eps_mse_minimum(
      jnp.asarray(S2), proc, jnp.asarray(T))), eps_min, rtol=1e-10)
  for kind in param.KINDS:
    A, B = (c[:, None] for c in target_coefficients(kind, name, T))
    var = A**2 * S2 + B**2 - (A * S2 * a2 + B * s2_) ** 2 / (a2**2 * S2 + s2_**2)
    got = analytic.gaussian_target_min_mse(kind, jnp.asarray(S2), proc, jnp.asarray(T), SD)
    np.testing.assert_allclose(np.asarray(got), np.mean(var, -1), rtol=1e-8, err_msg=kind)
