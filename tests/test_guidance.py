"""Guidance, inpainting and interpolation (diffusion_jax.guidance) against closed forms.

Classifier-free guidance is checked on a 2-class Gaussian problem whose class-conditional and
unconditional denoisers are exact (`analytic.gaussian_denoiser` per class, `gmm_denoiser` for
the 50/50 mixture); inpainting on Gaussian data, diagonal (replacement is exact there) and
correlated (replacement is biased, RePaint's resampling reduces the bias).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import analytic
from diffusion_jax import guidance
from diffusion_jax import parameterization
from diffusion_jax import processes
from diffusion_jax import samplers
from tests.sampler_testing import counting

PROC = processes.DiscreteVP.from_name('linear', 1000)
MEANS = np.array([[1.0, -1.0, 0.5], [-1.0, 2.0, 0.0]])   # class 0, class 1
S2 = np.array([0.3, 0.5, 0.2])
NULL = 2                                                  # the "null" label


def class_denoisers():
  """`(den0, den1, den_u)`: exact denoisers of each class and of the 50/50 mixture."""
  den0, den1 = (analytic.gaussian_denoiser(MEANS[k], S2, PROC) for k in range(2))
  den_u = analytic.gmm_denoiser(np.array([0.5, 0.5]), MEANS, np.stack([S2, S2]), PROC)
  return den0, den1, den_u


def labelled_denoiser(seen=None):
  """One denoiser for all labels: 0, 1 (conditional) and NULL (unconditional)."""
  den0, den1, den_u = class_denoisers()

  def den(x, t, cond):
    if seen is not None:
      seen.append((x.shape, jnp.shape(t), jax.tree.map(jnp.shape, cond)))
    label = cond['label'] if isinstance(cond, dict) else cond
    outs = [d(x, t) for d in (den0, den1, den_u)]
    pick = lambda i: jnp.where(label[:, None] == 0, outs[0][i],
                               jnp.where(label[:, None] == 1, outs[1][i], outs[2][i]))
    return pick(0), pick(1)

  return parameterization.Denoiser(den, kind='eps')


def batch(b=16, seed=0):
  kx, kt, kc = jax.random.split(jax.random.key(seed), 3)
  x = 1.5 * jax.random.normal(kx, (b, 3))
  t = jax.random.uniform(kt, (b,), minval=0.05, maxval=0.95)
  labels = jax.random.randint(kc, (b,), 0, 2)
  return x, t, labels


def conditional(x, t, labels):
  den0, den1, _ = class_denoisers()
  (a0, e0), (a1, e1) = den0(x, t), den1(x, t)
  c = labels[:, None] == 0
  return jnp.where(c, a0, a1), jnp.where(c, e0, e1)


# --- classifier-free guidance ----------------------------------------------------------------


def test_cfg_scale_one_is_conditional_and_zero_unconditional_exactly():
  x, t, labels = batch()
  den = labelled_denoiser()
  x0_c, eps_c = conditional(x, t, labels)
  x0_u, eps_u = class_denoisers()[2](x, t)
  for scale, (x0_ref, eps_ref) in ((1.0, (x0_c, eps_c)), (0.0, (x0_u, eps_u))):
    x0, eps = guidance.classifier_free_guidance(den, scale, NULL)(x, t, labels)
    np.testing.assert_array_equal(x0, x0_ref)
    np.testing.assert_array_equal(eps, eps_ref)


@pytest.mark.parametrize('scale', [0.5, 2.0, 4.0])
def test_cfg_matches_independent_combination(scale):
  x, t, labels = batch(seed=1)
  guided = guidance.classifier_free_guidance(labelled_denoiser(), scale, NULL)
  x0, eps = guided(x, t, labels)
  x0_c, eps_c = conditional(x, t, labels)
  x0_u, eps_u = class_denoisers()[2](x, t)
  np.testing.assert_allclose(eps, eps_u + scale * (eps_c - eps_u), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(x0, x0_u + scale * (x0_c - x0_u), rtol=1e-5, atol=1e-5)
  alpha, sigma = PROC.alpha(t)[:, None], PROC.sigma(t)[:, None]
  np.testing.assert_allclose(alpha * x0 + sigma * eps, x, rtol=1e-5, atol=1e-5)
  # Per-example scales [B] and a scalar t work too.
  scales = jnp.linspace(0.0, 3.0, x.shape[0])
  x0_b, _ = guidance.classifier_free_guidance(labelled_denoiser(), scales, NULL)(x, 0.4, labels)
  x0_c, _ = conditional(x, jnp.full_like(t, 0.4), labels)
  x0_u, _ = class_denoisers()[2](x, jnp.full_like(t, 0.4))
  np.testing.assert_allclose(x0_b, x0_u + scales[:, None] * (x0_c - x0_u), rtol=1e-5, atol=1e-5)


def test_cfg_one_batched_call_with_pytree_cond():
  x, t, labels = batch(b=5)
  seen = []
  cond = {'label': labels, 'emb': jnp.ones((5, 4))}
  null = {'label': NULL, 'emb': jnp.zeros(4)}
  guided = guidance.classifier_free_guidance(labelled_denoiser(seen), 3.0, null)
  x0, _ = guided(x, t, cond)
  assert seen == [((10, 3), (10,), {'emb': (10, 4), 'label': (5 * 2,)})]
  ref, _ = guidance.classifier_free_guidance(labelled_denoiser(), 3.0, NULL)(x, t, labels)
  np.testing.assert_array_equal(x0, ref)
  # One array for every leaf, and the batch really holds cond then null_cond.
  got = []
  def spy(x, t, cond):
    got.append(cond)
    return x, jnp.zeros_like(x)
  guidance.classifier_free_guidance(spy, 2.0, 7)(x, t, {'a': labels, 'b': labels + 10})
  np.testing.assert_array_equal(got[0]['a'], np.concatenate([labels, np.full(5, 7)]))
  np.testing.assert_array_equal(got[0]['b'], np.concatenate([labels + 10, np.full(5, 7)]))
  with pytest.raises(ValueError, match='needs cond'):
    guided(x, t, None)
  with pytest.raises(ValueError, match='need'):
    guidance.classifier_free_guidance(spy, 2.0, 7, rescale=0.7)


def test_cfg_attributes():
  den = labelled_denoiser()
  guided = guidance.classifier_free_guidance(den, 2.0, NULL)
  assert guided.evals_per_call == 2 and guided.kind == 'eps'
  den = dataclasses.replace(den, evals_per_call=3)   # e.g. an inner ensemble of 3
  assert guidance.classifier_free_guidance(den, 2.0, NULL).evals_per_call == 6


def test_guidance_rescale():
  x, t, labels = batch(seed=2)
  den = labelled_denoiser()
  x0_c, _ = conditional(x, t, labels)
  plain = guidance.classifier_free_guidance(den, 5.0, NULL)
  x0_g, _ = plain(x, t, labels)
  std = lambda a: jnp.std(a, axis=1)
  assert np.mean(std(x0_g) / std(x0_c)) > 2         # guidance inflates the std here
  alpha, sigma = PROC.alpha(t)[:, None], PROC.sigma(t)[:, None]
  for phi in (1.0, 0.7):
    x0, eps = guidance.classifier_free_guidance(den, 5.0, NULL, rescale=phi, process=PROC)(
        x, t, labels)
    factor = phi * std(x0_c) / std(x0_g) + (1 - phi)
    np.testing.assert_allclose(x0, x0_g * factor[:, None], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alpha * x0 + sigma * eps, x, rtol=1e-5, atol=1e-5)
    if phi == 1.0:
      np.testing.assert_allclose(std(x0), std(x0_c), rtol=1e-5)


def test_guidance_interval():
  x, t, labels = batch(b=32, seed=3)
  den = labelled_denoiser()
  x0_c, eps_c = conditional(x, t, labels)
  x0_g, eps_g = guidance.classifier_free_guidance(den, 3.0, NULL)(x, t, labels)
  lo, hi = 0.3, 0.7
  x0, eps = guidance.classifier_free_guidance(den, 3.0, NULL, interval=(lo, hi))(x, t, labels)
  inside = np.asarray((t >= lo) & (t <= hi))
  assert 0 < inside.sum() < inside.size
  np.testing.assert_array_equal(x0[~inside], x0_c[~inside])
  np.testing.assert_array_equal(eps[~inside], eps_c[~inside])
  np.testing.assert_array_equal(x0[inside], x0_g[inside])
  np.testing.assert_array_equal(eps[inside], eps_g[inside])
  # In EDM's sigma / alpha: the same set of examples for the matching interval.
  s_of = lambda tt: float(PROC.sigma(jnp.asarray(tt)) / PROC.alpha(jnp.asarray(tt)))
  guided_s = guidance.classifier_free_guidance(den, 3.0, NULL, interval=(s_of(lo), s_of(hi)),
                                               interval_in='sigma', process=PROC)
  x0_s, _ = guided_s(x, t, labels)
  np.testing.assert_array_equal(x0_s, x0)
  assert guided_s.evals_per_call == 2     # both halves are computed even outside the interval


def test_cfg_nfe_is_counted_honestly():
  b = 8
  x_T = jax.random.normal(jax.random.key(4), (b, 3))
  labels = jnp.arange(b) % 2
  for name, steps, calls in (('euler', 6, 6), ('ddpm', 10, 10), ('heun', 4, 7)):
    seen = []
    inner, count = counting(labelled_denoiser(seen))
    guided = guidance.classifier_free_guidance(inner, 2.5, NULL, interval=(0.1, 0.9))
    x, info = samplers.SAMPLERS[name](guided, PROC, x_T, jax.random.key(5), steps=steps,
                                      cond=labels)
    jax.effects_barrier()
    assert count() == calls, name
    assert info['nfe'] == 2 * calls and info['denoiser_calls'] == calls, (name, info)
    assert {s[0][0] for s in seen} == {2 * b}, name
    assert np.all(np.isfinite(x))


# --- inpainting -------------------------------------------------------------------------------

MU4 = np.array([1.5, -0.5, 2.0, -1.0])
S2_4 = np.array([0.04, 0.5, 2.0, 0.25])
MASK4 = np.array([True, True, False, False])
KNOWN4 = np.array([3.0, 1.0, 0.0, 0.0])    # far from the mean on purpose: dims are independent


def test_inpaint_wrapper_is_consistent_and_passes_attributes():
  den = analytic.gaussian_denoiser(MU4, S2_4, PROC)
  wrapped = guidance.inpaint(den, PROC, KNOWN4, MASK4)
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
  both = guidance.inpaint(guided, PROC, jnp.zeros(3), jnp.array([1, 0, 0]))
  assert both.evals_per_call == 2 and both.kind == 'eps'


@pytest.mark.parametrize('name,steps', [('ddpm', 1000), ('ddim', 200), ('euler', 300),
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
      guidance.inpaint_sample(sampler, den, PROC, x, k, KNOWN4, MASK4, steps=steps)[0],
      sampler(guidance.inpaint(den, PROC, KNOWN4, MASK4), PROC, x, k, steps=steps)[0],
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
  wrapped = guidance.inpaint(den, PROC, KNOWN4, MASK4)
  _, info = samplers.ddim_sample(wrapped, PROC, x_T, steps=8, return_trajectory=True)
  n = samplers.discrete_timesteps(1000, 8, 'trailing')
  abar = PROC.alphas_cumprod[n - 1][:, None, None]
  z_ddim = (info['trajectory'][:8, :, :2] - np.sqrt(abar) * KNOWN4[:2]) / np.sqrt(1 - abar)
  _, info = samplers.euler_sample(wrapped, PROC, x_T, steps=8, return_trajectory=True)
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
    x, info = jax.jit(lambda x, k: guidance.inpaint_sample(
        samplers.SAMPLERS[name], den, PROC, x, k, known, mask, steps=steps))(
            x_T, jax.random.key(12))
    assert int(info['nfe']) == steps
    errors[f'replace_{name}_{steps}'] = abs(float(jnp.mean(x[:, 1])) - exact)
  x, info = jax.jit(lambda x, k: guidance.repaint_sample(
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
  start, level = guidance.repaint_schedule(12, jump_length=5, resample=3)
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
  s1, l1 = guidance.repaint_schedule(7, jump_length=3, resample=1)
  np.testing.assert_array_equal(l1, np.arange(7))
  np.testing.assert_array_equal(s1, np.arange(7))


def test_repaint_nfe_and_known_region():
  x_T = jax.random.normal(jax.random.key(13), (6, 3))
  inner, count = counting(labelled_denoiser())
  guided = guidance.classifier_free_guidance(inner, 2.0, NULL)
  known, mask = jnp.array([1.0, -1.0, 0.25]), jnp.array([1, 0, 1])
  x, info = guidance.repaint_sample(guided, PROC, x_T, jax.random.key(14), known, mask,
                                    steps=10, jump_length=4, resample=3,
                                    cond=jnp.arange(6) % 2)
  jax.effects_barrier()
  assert count() == 30 and info['denoiser_calls'] == 30 and info['nfe'] == 60
  assert info['jumps'] == 3 * 2
  np.testing.assert_array_equal(x[:, 0], np.full(6, 1.0, np.float32))
  np.testing.assert_array_equal(x[:, 2], np.full(6, 0.25, np.float32))
  assert np.all(np.isfinite(x))
  with pytest.raises(ValueError, match='DiscreteVP'):
    guidance.repaint_sample(guided, processes.VPLinear(), x_T, jax.random.key(0), known, mask,
                            steps=10)


# --- interpolation ---------------------------------------------------------------------------


def test_slerp():
  k0, k1 = jax.random.split(jax.random.key(15))
  x0 = jax.random.normal(k0, (5, 8, 8))
  x1 = 1.3 * jax.random.normal(k1, (5, 8, 8))
  a = jnp.array([0.0, 0.25, 0.5, 0.9, 1.0])
  out = guidance.slerp(x0, x1, a)
  np.testing.assert_array_equal(out[0], x0[0])
  np.testing.assert_array_equal(out[-1], x1[-1])
  np.testing.assert_array_equal(guidance.slerp(x0, x1, 0.0), x0)
  np.testing.assert_array_equal(guidance.slerp(x0, x1, 1.0), x1)
  norm = lambda v: jnp.sqrt(jnp.sum(v**2, axis=(1, 2)))
  np.testing.assert_allclose(norm(out), (1 - a) * norm(x0) + a * norm(x1), rtol=1e-5)
  # Constant angular speed along the great circle.
  cos = lambda u, v: jnp.sum(u * v, axis=(1, 2)) / (norm(u) * norm(v))
  theta = jnp.arccos(cos(x0, x1))
  np.testing.assert_allclose(jnp.arccos(jnp.clip(cos(x0, out), -1, 1)), a * theta, atol=2e-3)
  # Unit-norm inputs stay unit norm.
  u0, u1 = x0 / norm(x0)[:, None, None], x1 / norm(x1)[:, None, None]
  for s in (0.1, 0.5, 0.77):
    np.testing.assert_allclose(norm(guidance.slerp(u0, u1, s)), 1.0, rtol=1e-5)
  # Degenerate cases: parallel (same direction), identical, exactly opposite: finite.
  par = guidance.slerp(x0, 2.0 * x0, 0.5)
  np.testing.assert_allclose(par, 1.5 * x0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(guidance.slerp(x0, x0, 0.3), x0, rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(guidance.slerp(x0, -x0, 0.3)))
  # High-dimensional Gaussian draws keep their norm; linear interpolation shrinks it by ~sqrt 2.
  g0, g1 = (jax.random.normal(k, (1, 4096)) for k in (k0, k1))
  assert abs(float(norm(guidance.slerp(g0, g1, 0.5)[:, :, None])[0]) / 64 - 1) < 0.05
  assert abs(float(norm((0.5 * (g0 + g1))[:, :, None])[0]) / 64 - 2**-0.5) < 0.05


def test_interpolation_batch_feeds_a_sampler():
  k0, k1 = jax.random.split(jax.random.key(16))
  xa, xb = jax.random.normal(k0, (4, 4)), jax.random.normal(k1, (4, 4))
  xs, alphas = guidance.interpolation_batch(xa, xb, 7)
  assert xs.shape == (7, 4, 4) and alphas.shape == (7,)
  np.testing.assert_array_equal(xs[0], xa)
  np.testing.assert_array_equal(xs[-1], xb)
  lin, _ = guidance.interpolation_batch(xa, xb, 7, method='linear')
  np.testing.assert_allclose(lin[3], 0.5 * (xa + xb), rtol=1e-6)
  den = analytic.gaussian_denoiser(jnp.zeros((4, 4)), jnp.ones((4, 4)), PROC)
  out, info = samplers.ddim_sample(den, PROC, xs, steps=5)
  assert out.shape == xs.shape and info['nfe'] == 5
