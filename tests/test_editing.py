"""Editing (diffusion_jax.editing): SDEdit and DDIM-inversion editing against closed forms.

Truth: for Gaussian data the probability-flow ODE maps `x_t` to `mu + s z` with
`z = (x_t - alpha mu) / sqrt(alpha² s² + sigma²)` (DESIGN §6), and DDIM's steps with the exact
Gaussian denoiser are affine in `y = x / alpha`, so an edit through DDIM inversion has a
closed form too. Mixtures (`analytic.gmm_denoiser`) give the in-law checks: marginal
preservation (SDEdit from data returns data) and strength 1 = plain sampling.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import analytic
from diffusion_jax import editing
from diffusion_jax import guidance
from diffusion_jax import processes
from diffusion_jax import samplers
from tests.guidance_testing import MEANS as CLASS_MEANS
from tests.guidance_testing import NULL
from tests.guidance_testing import S2 as CLASS_S2
from tests.guidance_testing import labelled_denoiser

DVP = processes.DiscreteVP.from_name('linear', 1000)
VP = processes.VPLinear()

# A 2-D mixture with broad components (solvers converge fast on it): closed-form moments.
W = np.array([0.5, 0.5])
MEANS = np.array([[-1.5, 0.0], [1.5, 0.5]])
STD2 = 0.25
MIX_MEAN = W @ MEANS                                                          # [2]
MIX_COV = STD2 * np.eye(2) + (W[:, None, None] * MEANS[:, :, None] * MEANS[:, None, :]).sum(0) \
    - np.outer(MIX_MEAN, MIX_MEAN)                                            # [2, 2]


def _mixture_draw(seed, n):
  """`n` draws of the mixture (numpy: no compile), float32 `[n, 2]`."""
  rng = np.random.default_rng(seed)
  comp = rng.choice(2, size=n, p=W)
  return jnp.asarray(MEANS[comp] + np.sqrt(STD2) * rng.normal(size=(n, 2)), jnp.float32)


def _assert_mixture_moments(x, bias, what):
  """Sample mean and covariance of `x [n, 2]` match the mixture's: each entry within 4 Monte-
  Carlo standard errors (CLT: the standard deviation of `x_i` resp. of the centred products
  `(x_i - m_i)(x_j - m_j)`, estimated from the sample, over sqrt(n)) plus `bias`, the stated
  discretization error of the sampler."""
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  d = x - x.mean(0)
  prods = d[:, :, None] * d[:, None, :]                                         # [n, 2, 2]
  se_mean = x.std(0) / np.sqrt(n)
  se_cov = prods.std(0) / np.sqrt(n)
  err_mean = np.abs(x.mean(0) - MIX_MEAN)
  err_cov = np.abs(prods.mean(0) - MIX_COV)
  print(f'{what}: mean err {err_mean} (se {se_mean}), cov err {err_cov.ravel()} '
        f'(se {se_cov.ravel()})')
  assert np.all(err_mean < 4 * se_mean + bias), (what, x.mean(0), MIX_MEAN)
  assert np.all(err_cov < 4 * se_cov + bias), (what, prods.mean(0), MIX_COV)


# --- SDEdit --------------------------------------------------------------------------------------


def _never_called(x, t, cond=None):
  raise AssertionError('strength 0 must not call the denoiser')


@pytest.mark.parametrize('process', [DVP, VP], ids=['discrete_vp', 'vp_linear'])
def test_strength_zero_returns_the_input_for_every_sampler(process):
  x0 = jax.random.normal(jax.random.key(0), (5, 2))
  for name in samplers.SAMPLERS:
    if name in samplers.FLOW_MAP_SAMPLERS:   # a FlowMap's sampler: no editing from t_max
      continue
    x, info = editing.sdedit(name, _never_called, process, x0, jax.random.key(1), 0.0, steps=4)
    assert x is x0 and info['nfe'] == 0, name
  # On DiscreteVP a strength below half a step rounds to step 0: the input.
  x, _ = editing.sdedit('ddpm', _never_called, DVP, x0, jax.random.key(1), 4e-4, steps=4)
  assert x is x0


def _plain_from_same_draw(name, den, process, x0, key, t, **kwargs):
  """The oracle: `x_t = alpha(t) x0 + sigma(t) eps` with `eps` from the first half of
  `split(key)`, then the sampler itself from `t_max = t` with the second half."""
  k_noise, k_sample = jax.random.split(key)
  eps = jax.random.normal(k_noise, x0.shape, x0.dtype)
  tt = jnp.full(x0.shape[:1], t, x0.dtype)
  x_t = process.alpha(tt)[:, None] * x0 + process.sigma(tt)[:, None] * eps
  return samplers.SAMPLERS[name](den, process, x_t, k_sample, t_max=t, **kwargs)[0]


STRENGTH_ONE_DEFAULT = ('ddpm',)


@pytest.mark.parametrize('name', [n if n in STRENGTH_ONE_DEFAULT else
                                  pytest.param(n, marks=pytest.mark.slow)
                                  for n in samplers.SAMPLERS
                                  if n not in samplers.FLOW_MAP_SAMPLERS])
def test_strength_one_is_plain_sampling_from_the_same_draw(name):
  """Strength 1 on DiscreteVP: the same output as the sampler called on `alpha(1) x0 +
  sigma(1) eps` (same key halves), to float32 rounding of the two compiled programs."""
  den = analytic.gmm_denoiser(W, MEANS, np.full((2, 2), STD2), DVP)
  x0 = _mixture_draw(2, 16)
  run = jax.jit(lambda x, k: (editing.sdedit(name, den, DVP, x, k, 1.0, steps=6)[0],
                              _plain_from_same_draw(name, den, DVP, x, k, 1.0, steps=6)))
  edit, plain = run(x0, jax.random.key(3))
  np.testing.assert_allclose(np.asarray(edit), np.asarray(plain), rtol=1e-5, atol=1e-5)


def test_sdedit_ddim_equals_its_closed_form():
  """Gaussian data N(m, S2) (class 0 of the shared 2-class problem), strength 0.45 on DiscreteVP,
  DDIM with 10 steps, float64. With `x_t = alpha x0 + sigma eps` built here from the first key
  half, each DDIM step multiplies `y - m` (`y = x / alpha`) by `1 - c_j`
  (`_ddim_edit_closed_form`), so the output is `m + P (x_t / alpha - m)` over the trailing
  steps of 1..450, to float64 rounding (1e-9)."""
  t, S = 0.45, 10
  m = CLASS_MEANS[0]
  x0 = np.random.default_rng(0).normal(size=(32, 3)) * 2.0                   # off the data
  with jax.enable_x64(True):
    den = analytic.gaussian_denoiser(jnp.asarray(m), jnp.asarray(CLASS_S2), DVP)
    key = jax.random.key(4)
    x, info = jax.jit(lambda x, k: editing.sdedit('ddim', den, DVP, x, k, t, steps=S))(
        jnp.asarray(x0), key)
    eps = np.asarray(jax.random.normal(jax.random.split(key)[0], x0.shape, jnp.float64))
  abar = DVP.alphas_cumprod[449]                                # step 450 = t 0.45
  y_t = (np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps) / np.sqrt(abar)
  P, _ = _ddim_factors(450, S, 1)
  assert info['t_start'] == t and info['nfe'] == S
  np.testing.assert_allclose(np.asarray(x), m + P * (y_t - m), rtol=0, atol=1e-9)


def test_sdedit_ddpm_from_one_input_has_the_exact_gaussian_law():
  """SDEdit of one fixed input x0 by DDPM ancestral sampling (Ho et al. 2020, Eqs. 6-7; 'small'
  variance), strength 0.3, 8 trailing steps over 1..300, Gaussian data N(m, S2): every step is
  affine in x plus independent Gaussian noise, so the output is Gaussian with mean and variance
  from the recursion written here (start: `N(alpha_N x0, sigma_N²)`). n = 20000 draws: mean
  within 4 standard errors, variance within 4 sqrt(2 / n) relative (the sampler is exact in
  law here; only Monte-Carlo error remains)."""
  n, S, N = 20000, 8, 300
  m, x0 = CLASS_MEANS[0], np.array([-2.0, 3.0, 2.5])              # far from m on purpose
  den = analytic.gaussian_denoiser(m, CLASS_S2, DVP)
  x = jax.jit(lambda x, k: editing.sdedit('ddpm', den, DVP, x, k, N / 1000, steps=S)[0])(
      jnp.broadcast_to(jnp.asarray(x0, jnp.float32), (n, 3)), jax.random.key(11))
  abar = np.concatenate([[1.0], DVP.alphas_cumprod])
  steps = np.concatenate([_trailing_levels(N, S)[1:][::-1], [0]])     # N, ..., n_1, 0
  mean, var = np.sqrt(abar[N]) * x0, (1 - abar[N]) * np.ones(3)
  for k, j in zip(steps[:-1], steps[1:], strict=True):
    a_n, a_m = abar[k], abar[j]
    beta = 1 - a_n / a_m
    c_x0 = np.sqrt(a_m) * beta / (1 - a_n)                         # Eq. 7, posterior mean
    c_x = np.sqrt(1 - beta) * (1 - a_m) / (1 - a_n)
    gain = np.sqrt(a_n) * CLASS_S2 / (a_n * CLASS_S2 + 1 - a_n)    # x0_hat = m + gain (x - ..)
    slope = c_x0 * gain + c_x
    mean = slope * mean + c_x0 * (m - gain * np.sqrt(a_n) * m)
    var = slope**2 * var + (beta * (1 - a_m) / (1 - a_n) if j > 0 else 0.0)
  x = np.asarray(x, np.float64)
  print(f'ddpm sdedit law: mean {x.mean(0)} vs {mean}; var {x.var(0)} vs {var}')
  assert np.all(np.abs(x.mean(0) - mean) < 4 * np.sqrt(var / n)), (x.mean(0), mean)
  assert np.all(np.abs(x.var(0) / var - 1) < 4 * np.sqrt(2 / n)), (x.var(0), var)


@pytest.mark.slow
def test_sdedit_at_intermediate_strength_is_the_closed_form_pf_ode_map():
  """Gaussian data N(mu, s²), strength 0.45, Heun (order 2) on VP linear in float64. With
  `x_t = alpha x0 + sigma eps` built here from the same key half, the PF-ODE moves it along
  `alpha(u) mu + r(u) z`, `z = (x_t - alpha mu) / r(t)`, `r = sqrt(alpha² s² + sigma²)`
  (DESIGN §6) down to the grid's last time t_min, where the final step returns the exact
  posterior mean `mu + alpha s² (x - alpha mu) / r²` = `mu + alpha(t_min) s² z / r(t_min)`.
  Heun's error is the only difference: measured 1.35e-3, 3.3e-4, 1.2e-4 at 60, 120, 200 steps
  (order 2); tolerance 3e-4 at 200."""
  mu, s2, t = np.array([1.5, -0.5, 0.0]), np.array([0.04, 0.5, 2.0]), 0.45
  with jax.enable_x64(True):
    den = analytic.gaussian_denoiser(jnp.asarray(mu), jnp.asarray(s2), VP)
    x0 = jnp.asarray(np.random.default_rng(0).normal(size=(64, 3)) * 2.0)   # off the data
    key = jax.random.key(4)
    x, info = jax.jit(lambda x, k: editing.sdedit('heun', den, VP, x, k, t, steps=200))(x0, key)
    eps = np.asarray(jax.random.normal(jax.random.split(key)[0], x0.shape, x0.dtype))
    alpha, sigma, a_min, s_min = (float(f(jnp.float64(u))) for u in (t, VP.t_min)
                                  for f in (VP.alpha, VP.sigma))
  x_t = alpha * np.asarray(x0) + sigma * eps
  z = (x_t - alpha * mu) / np.sqrt(alpha**2 * s2 + sigma**2)
  expected = mu + a_min * s2 * z / np.sqrt(a_min**2 * s2 + s_min**2)
  assert info['t_start'] == t and info['nfe'] == 2 * 200 - 1
  print(f'sdedit heun 200 vs closed form: {np.max(np.abs(np.asarray(x) - expected)):.2e}')
  np.testing.assert_allclose(np.asarray(x), expected, rtol=0, atol=3e-4)


def test_sdedit_from_data_preserves_the_data_law():
  """Marginal preservation with the exact mixture denoiser (DESIGN §6): for x0 ~ data,
  `x_t = alpha x0 + sigma eps` has the true marginal q_t, so an exact PF-ODE solve from t
  returns data in law. Strength 0.5, DPM-Solver++(2M) with 20 steps, n = 20000: mixture mean
  and covariance within 4 Monte-Carlo standard errors + 0.02 (the solver's bias on this
  mixture at 20 steps: every entry within 0.005 of the truth with n = 40000, whose standard
  errors are ~0.005-0.01; DDIM at 20 steps is off by 0.05 in Var[x_2]). And the edits are not
  the inputs: mean |x - x0| is ~0.4 (an identity map would pass the moments too)."""
  n = 20000
  den = analytic.gmm_denoiser(W, MEANS, np.full((2, 2), STD2), DVP)
  x_data = _mixture_draw(5, n)
  mid = jax.jit(lambda a, k: editing.sdedit('dpm_solver_pp_2m', den, DVP, a, k, 0.5,
                                            steps=20)[0])(x_data, jax.random.key(7))
  _assert_mixture_moments(mid, 0.02, 'strength 0.5 from data (dpm_solver_pp_2m 20)')
  moved = float(np.mean(np.linalg.norm(np.asarray(mid) - np.asarray(x_data), axis=-1)))
  assert moved > 0.1, moved


@pytest.mark.slow
def test_sdedit_in_law_with_many_samples():
  """(a) Marginal preservation as above with the adaptive PF-ODE solver (tsit5, rtol 1e-5, the
  'exact' ODE) and n = 20000: bias allowance 0.01. (b) Strength 1 from inputs far off the data
  (N(0, 3² I)): DDPM ancestral on all 1000 steps gives the mixture again (the input's trace
  alpha(1) x0 = 0.0064 x0 is far below the noise); bias allowance 0.02 (at 100 respaced steps
  DDPM's 'small' variance under-disperses this mixture by 0.03 in Var[x_2], at 1000 by < 0.01)."""
  n = 20000
  den = analytic.gmm_denoiser(W, MEANS, np.full((2, 2), STD2), DVP)
  x_data = _mixture_draw(5, n)
  x_off = 3.0 * jax.random.normal(jax.random.key(6), (n, 2))
  run = jax.jit(lambda a, b, k1, k2: (
      editing.sdedit('adaptive', den, DVP, a, k1, 0.5)[0],
      editing.sdedit('ddpm', den, DVP, b, k2, 1.0, steps=None)[0]))
  mid, full = run(x_data, x_off, jax.random.key(7), jax.random.key(8))
  _assert_mixture_moments(mid, 0.01, 'strength 0.5 from data (adaptive)')
  _assert_mixture_moments(full, 0.02, 'strength 1 from N(0, 9 I) (ddpm 1000)')


def test_discrete_grids_start_at_the_step_of_t_max():
  """`t_max < 1` on the integer spacings: 'trailing' over steps 1..N, N = t_max T, written
  from its definition (Lin et al. 2024, Table 2) with T replaced by N."""
  N, S = 400, 8
  expected = np.round(np.arange(N, 0, -N / S)) / 1000          # n = k + 1, decreasing
  np.testing.assert_allclose(samplers.time_grid(DVP, S, 'trailing', t_max=0.4).t,
                             expected, rtol=1e-6)


# --- inversion editing --------------------------------------------------------------------------


def _trailing_levels(N, S):
  """DDIM's trailing steps over 1..N, increasing, with level 0 (data) first."""
  n = np.round(np.arange(N, 0, -N / S)).astype(int)          # = k + 1 of Lin et al. Table 2
  return np.concatenate([[0], np.unique(n)])


def _ddim_factors(N, S, iterations):
  """For Gaussian classes with variance CLASS_S2 and DDIM's trailing steps over 1..N: each DDIM
  step `y_m = y_n + (s_m - s_n) eps_hat` (`y = x / alpha`, `s = sigma / alpha`) with the exact
  `eps_hat = s_n (y_n - m) / (S2 + s_n²)` multiplies `y - m` by `1 - c_j`,
  `c_j = (s_n - s_m) s_n / (S2 + s_n²)`; inversion's `iterations` fixed-point sweeps solve it
  backwards as `1 + c_j + ... + c_j^k`. Returns `(P, Q) = (prod(1 - c_j), prod(1 + ... +
  c_j^k))`, each `[D]`."""
  levels = _trailing_levels(N, S)
  abar = np.concatenate([[1.0], DVP.alphas_cumprod])[levels]
  s = np.sqrt((1 - abar) / abar)[:, None]                        # [S + 1, 1], increasing
  c = (s[1:] - s[:-1]) * s[1:] / (CLASS_S2[None] + s[1:] ** 2)    # [S, D]
  return np.prod(1 - c, axis=0), np.prod(sum(c**k for k in range(iterations + 1)), axis=0)


def _ddim_edit_closed_form(x0, cls_a, cls_b, t_edit, S, iterations):
  """The DDIM edit class a -> b (`_ddim_factors`): latent `y = m_a + Q (x0 - m_a)` (y0 = x0 at
  data), edit `m_b + P (y - m_b)`. Returns `(edit, latent y)`."""
  P, Q = _ddim_factors(round(t_edit * 1000), S, iterations)
  m_a, m_b = CLASS_MEANS[cls_a], CLASS_MEANS[cls_b]
  y = m_a + Q * (x0 - m_a)
  return m_b + P * (y - m_b), y


def _class_draw(cls, n, seed):
  z = np.random.default_rng(seed).normal(size=(n, 3))
  return CLASS_MEANS[cls] + np.sqrt(CLASS_S2) * z


@pytest.mark.parametrize('t_edit,iterations', [(1.0, 1), (0.4, 2)])
def test_ddim_inversion_edit_equals_its_closed_form(t_edit, iterations):
  """Inversion editing by DDIM (50 steps) with the exact class denoisers, in float64: rows 0-15
  edit class 0 -> 1, rows 16-31 are round trips 1 -> 1. Edits, round trips and latents equal
  `_ddim_edit_closed_form` to float64 rounding (1e-9), at full and partial depth (the latent
  is `x = alpha(t_edit) y`). At full depth the edits land in class 1: each is closer in
  likelihood to class 1 than to class 0 (LDA error for these classes: 0.2%)."""
  S, half = 50, 16
  cls_a, cls_b = np.repeat([0, 1], half), np.ones(2 * half, int)
  x0 = np.concatenate([_class_draw(0, half, 1), _class_draw(1, half, 2)])
  with jax.enable_x64(True):
    den = labelled_denoiser()
    x, info = jax.jit(lambda x: editing.invert_and_edit(
        den, DVP, x, jnp.asarray(cls_a), jnp.asarray(cls_b), steps=S, t_edit=t_edit,
        iterations=iterations))(jnp.asarray(x0))
    alpha_edit = float(jnp.sqrt(DVP.alpha_bar_of_step(round(t_edit * 1000), jnp.float64)))
  edit, y = _ddim_edit_closed_form(x0, cls_a, cls_b, t_edit, S, iterations)
  x = np.asarray(x)
  np.testing.assert_allclose(np.asarray(info['latent']), alpha_edit * y, rtol=0, atol=1e-9)
  np.testing.assert_allclose(x, edit, rtol=0, atol=1e-9)
  assert info['nfe'] == S * iterations + S and info['t_edit'] == t_edit
  print(f't_edit={t_edit}, {iterations} sweeps: round-trip error '
        f'{np.max(np.abs(x[half:] - x0[half:])):.2e}')
  if t_edit == 1.0:
    log_lik = [-0.5 * np.sum((x[:half] - m) ** 2 / CLASS_S2, -1) for m in CLASS_MEANS]
    assert np.all(log_lik[1] > log_lik[0])


@pytest.mark.slow
def test_inversion_edit_converges_to_the_pf_ode_map_and_lands_in_the_target_class():
  """As steps grow the DDIM edit tends to the exact PF-ODE map. For Gaussian classes of equal
  variance the ODE moves every point as `x_t = alpha m + r z`, `r = sqrt(alpha² S2 + sigma²)`
  (DESIGN §6): inverting with class a to t_e gives `z = (x0 - m_a) / sqrt(S2)`; regenerating
  with class b, `x = m_b + sqrt(S2) (alpha m_a + r z - alpha m_b) / r`, i.e.
  `x0 + (1 - alpha sqrt(S2) / r) (m_b - m_a)` at t_e. Max errors at 100 and 800 steps (one
  sweep) fall at first order (measured 0.62, 0.10: fitted order 0.85, still pre-asymptotic
  from the large relative steps in s near T; bound [0.75, 1.25]), and the 800-step edits of
  class-0 inputs lie in class 1: >= 98% closer (in likelihood) to class 1 (LDA error for these
  classes: 0.2%)."""
  x0 = _class_draw(0, 256, 2)
  t_e = 1.0
  with jax.enable_x64(True):
    den = labelled_denoiser()
    src, tgt = jnp.zeros(256, jnp.int32), jnp.ones(256, jnp.int32)
    alpha, sigma = (float(f(jnp.float64(t_e))) for f in (DVP.alpha, DVP.sigma))
    edits = {S: np.asarray(jax.jit(lambda x: editing.invert_and_edit(
        den, DVP, x, src, tgt, steps=S, t_edit=t_e)[0])(jnp.asarray(x0))) for S in (100, 800)}
  r = np.sqrt(alpha**2 * CLASS_S2 + sigma**2)
  expected = x0 + (1 - alpha * np.sqrt(CLASS_S2) / r) * (CLASS_MEANS[1] - CLASS_MEANS[0])
  errors = [float(np.max(np.abs(edits[S] - expected))) for S in (100, 800)]
  order = np.log(errors[0] / errors[1]) / np.log(800 / 100)
  print(f'inversion edit vs PF-ODE map: max errors {errors}, order {order:.2f}')
  assert 0.75 < order < 1.25, (errors, order)
  log_lik = [-0.5 * np.sum((edits[800] - m) ** 2 / CLASS_S2, -1) for m in CLASS_MEANS]
  assert np.mean(log_lik[1] > log_lik[0]) >= 0.98


@pytest.mark.slow
def test_inversion_with_the_same_condition_reconstructs_a_mixture_input():
  """Source = target on the 2-D mixture (no closed form): the round trip error falls with the
  steps at order 1 (one sweep; fitted in [0.7, 1.3] between 100 and 400 steps), and 3 sweeps at
  400 steps reconstruct to < 1e-3 (the remaining error is the forward solver's own)."""
  den = analytic.gmm_denoiser(W, MEANS, np.full((2, 2), STD2), DVP)
  with jax.enable_x64(True):
    x0 = jnp.asarray(_mixture_draw(9, 128), jnp.float64)
    run = lambda S, k: jax.jit(lambda x: editing.invert_and_edit(
        den, DVP, x, None, None, steps=S, iterations=k)[0])(x0)
    errors = [float(jnp.max(jnp.abs(run(S, 1) - x0))) for S in (100, 400)]
    err3 = float(jnp.max(jnp.abs(run(400, 3) - x0)))
  order = np.log(errors[0] / errors[1]) / np.log(4)
  print(f'round trip errors {errors} (order {order:.2f}); 3 sweeps at 400: {err3:.2e}')
  assert 0.7 < order < 1.3 and err3 < 1e-3, (errors, order, err3)


def test_guidance_scales_reach_each_phase():
  """CFG with different scales for the two phases equals `ddim_invert` with the source-guided
  denoiser then `ddim_sample` with the target-guided one (bitwise-equal programs up to float32
  rounding), and the NFE counts 2 evaluations per guided call."""
  den = labelled_denoiser()
  x0 = jnp.asarray(_class_draw(0, 8, 3), jnp.float32)
  src, tgt = jnp.zeros(8, jnp.int32), jnp.ones(8, jnp.int32)
  S, t_e = 10, 0.6

  def oracle(x):
    g_src = guidance.classifier_free_guidance(den, 1.5, NULL)
    g_tgt = guidance.classifier_free_guidance(den, 3.0, NULL)
    lat, _ = samplers.ddim_invert(g_src, DVP, x, steps=S, cond=src, t_max=t_e)
    return samplers.ddim_sample(g_tgt, DVP, lat, steps=S, cond=tgt, t_max=t_e)[0]

  x, info = jax.jit(lambda x: editing.invert_and_edit(
      den, DVP, x, src, tgt, steps=S, t_edit=t_e, source_scale=1.5, target_scale=3.0,
      null_cond=NULL))(x0)
  np.testing.assert_allclose(np.asarray(x), np.asarray(jax.jit(oracle)(x0)), rtol=1e-5,
                             atol=1e-5)
  assert info['nfe'] == 2 * S + 2 * S


@pytest.mark.slow
@pytest.mark.parametrize('name', ['heun', 'dpm_solver_pp_2m', 'flow_rk4', 'unipc_bh2',
                                  'adaptive'])
def test_inversion_edit_with_other_ode_samplers(name):
  """Euler inversion on VP linear, regeneration by another deterministic ODE solver: the edit
  approaches the PF-ODE map of the Gaussian classes (as above) at t_edit = 0.7; 400 steps,
  3 sweeps: max error ~9e-3 for each solver (1.8e-2 at 200 steps: the first-order inversion's
  error ~ C / steps dominates), tolerance 2e-2."""
  x0 = _class_draw(0, 64, 4)
  t_e = 0.7
  with jax.enable_x64(True):
    den0, den1 = (analytic.gaussian_denoiser(CLASS_MEANS[k], CLASS_S2, VP) for k in range(2))
    den = lambda x, t, c: jax.tree.map(lambda p, q: jnp.where(c[:, None] == 0, p, q),
                                       den0(x, t), den1(x, t))
    x, _ = jax.jit(lambda x: editing.invert_and_edit(
        den, VP, x, jnp.zeros(64, jnp.int32), jnp.ones(64, jnp.int32), steps=400, t_edit=t_e,
        sampler=name, iterations=3))(jnp.asarray(x0))
    alpha, sigma = (float(f(jnp.float64(t_e))) for f in (VP.alpha, VP.sigma))
  r = np.sqrt(alpha**2 * CLASS_S2 + sigma**2)
  expected = x0 + (1 - alpha * np.sqrt(CLASS_S2) / r) * (CLASS_MEANS[1] - CLASS_MEANS[0])
  err = float(np.max(np.abs(np.asarray(x) - expected)))
  print(f'{name}: max |edit - PF-ODE map| = {err:.2e}')
  assert err < 2e-2


# --- errors --------------------------------------------------------------------------------------


def test_bad_inputs_are_refused_with_one_line_errors():
  den = labelled_denoiser()
  x0, key = jnp.zeros((4, 3)), jax.random.key(0)
  labels = jnp.zeros(4, jnp.int32)

  def no_start(denoiser, process, x_T, key=None, *, steps):
    return x_T, {}

  cases = [
      (lambda: editing.sdedit('nope', den, DVP, x0, key, 0.5, steps=4), 'unknown sampler'),
      (lambda: editing.sdedit(no_start, den, DVP, x0, key, 0.5, steps=4), 'takes no t_max'),
      (lambda: editing.sdedit('ddim', den, DVP, x0, key, 0.5, steps=4, t_max=0.3), 't_max='),
      (lambda: editing.sdedit('consistency', den, DVP, x0, key, 0.5, times=[0.5, 0.2]),
       'times='),
      (lambda: editing.sdedit('ddim', den, DVP, x0, key, 1.5, steps=4), r'strength=1.5'),
      (lambda: editing.sdedit('euler', den, VP, x0, key, 1e-4, steps=4), 'at or below'),
      (lambda: jax.jit(lambda s: editing.sdedit('ddim', den, DVP, x0, key, s, steps=4))(0.5),
       'concrete number'),
      (lambda: samplers.ddim_sample(den, DVP, x0, steps=4, t_max=0.3333), 'integer step'),
      (lambda: editing.invert_and_edit(den, VP, x0, labels, labels, steps=4, inversion='ddim'),
       'DiscreteVP'),
      (lambda: editing.invert_and_edit(den, DVP, x0, labels, labels, steps=4, inversion='x'),
       'inversion='),
      (lambda: editing.invert_and_edit(den, DVP, x0, labels, labels, steps=4,
                                       target_scale=2.0), 'needs null_cond'),
      (lambda: jax.eval_shape(lambda x: editing.invert_and_edit(
          den, DVP, x, labels, labels, steps=4, sampler='ddpm'), x0), 'stochastic'),
  ]
  for fn, match in cases:
    with pytest.raises(ValueError, match=match):
      fn()
