"""Consistency models against closed forms on Gaussian data and the papers' constants (DESIGN §6).

For data `N(mu, diag(s²))` on an `alpha = 1` process the PF ODE moves `x_sigma = mu +
sqrt(s² + sigma²) z` with `z` fixed, so the exact consistency function (the map from `(x, sigma)`
to the trajectory's point at `sigma_min`) is
  f*(x, sigma) = mu + sqrt((s² + sigma_min²) / (s² + sigma²)) (x - mu).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax import analytic
from diffusion_jax import consistency as cm
from diffusion_jax import parameterization as param
from diffusion_jax import processes
from diffusion_jax import samplers
from diffusion_jax.parameterization import expand_like

MU = jnp.array([0.8, -0.4, 0.3])
S2 = jnp.array([0.05, 0.3, 1.5])
SD = 0.5
EDM = processes.make_process('edm')
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0


def increasing_grid(n, size=None, dtype=jnp.float32):
  """The Karras grid between SIGMA_MIN and SIGMA_MAX, increasing as CM indexes it."""
  return samplers.grids.karras_sigmas(n, SIGMA_MIN, SIGMA_MAX, size=size, dtype=dtype)[::-1]


def _data(key, n, dtype=jnp.float32):
  return (MU + jnp.sqrt(S2) * jax.random.normal(key, (n, 3))).astype(dtype)


def exact_f(x, sigma, sigma_min=SIGMA_MIN):
  """f*(x, sigma): the PF-ODE solution at `sigma_min` through `x` at `sigma`."""
  sigma = expand_like(sigma, x)
  return MU + jnp.sqrt((S2 + sigma_min**2) / (S2 + sigma**2)) * (x - MU)


def exact_network(sigma_min=SIGMA_MIN, sigma_data=SD):
  """The raw network F* with f = c_skip x + c_out F* = f*: the scalings inverted.

  Recovers `sigma = exp(4 c_noise)` and `x = x_in / c_in`; where `c_out = 0` (sigma_min) any F
  gives f = x = f*, so it returns 0 there.
  """
  def model_fn(x_in, c_noise, cond=None):
    del cond
    sigma = jnp.exp(4.0 * c_noise)
    c_skip, c_out, c_in, _ = (expand_like(c, x_in) for c in
                              param.consistency_coefficients(sigma, sigma_min, sigma_data))
    x = x_in / c_in
    safe = jnp.where(c_out == 0, 1.0, c_out)
    return jnp.where(c_out == 0, 0.0, (exact_f(x, sigma, sigma_min) - c_skip * x) / safe)
  return model_fn


def _tiny(p):
  return lambda x, c, cond: x @ p['w'] + p['b'] + jnp.tanh(c)[:, None] * p['c']


def _tiny_params(dtype=jnp.float64):
  return {'w': 0.1 * jax.random.normal(jax.random.key(3), (3, 3), dtype),
          'b': jnp.zeros((3,), dtype), 'c': jnp.ones((3,), dtype)}


# --- (a) the boundary condition ---------------------------------------------------------------


def test_boundary_condition_is_exact_for_any_network():
  x = jax.random.normal(jax.random.key(0), (16, 4, 4, 3))
  wild = lambda x_in, c, cond: 1e6 * jax.random.normal(jax.random.key(1), x_in.shape)
  np.testing.assert_array_equal(cm.consistency_fn(wild, x, SIGMA_MIN, sigma_min=SIGMA_MIN), x)
  # The grid's first point is sigma_min bitwise, so CT / CD targets there are exact too.
  sigmas = increasing_grid(18)
  np.testing.assert_array_equal(cm.consistency_fn(wild, x, sigmas[0], sigma_min=SIGMA_MIN), x)
  assert not np.allclose(cm.consistency_fn(wild, x, sigmas[1], sigma_min=SIGMA_MIN), x)
  np.testing.assert_allclose(exact_f(x, SIGMA_MIN), x, rtol=1e-6, atol=1e-6)   # f* too


def test_consistency_fn_is_parameterization_kind_consistency():
  """The module's f and `make_denoiser(..., 'consistency')` are one function of (x, t)."""
  model = _tiny(_tiny_params(jnp.float32))
  x = 3.0 * jax.random.normal(jax.random.key(2), (32, 3))
  t = jnp.linspace(0.001, 1.0, 32)
  x0, eps = param.make_denoiser(model, EDM, 'consistency')(x, t)
  np.testing.assert_allclose(x0, cm.consistency_fn(model, x, EDM.sigma(t), sigma_min=SIGMA_MIN),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(EDM.marginal(x0, eps, t), x, rtol=1e-5, atol=1e-5)


# --- (b) sampling with the exact consistency function -----------------------------------------


def _assert_moments(x, mean, var, n_se=5.0):
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  se_mean = np.sqrt(np.asarray(var) / n)
  se_var = np.asarray(var) * np.sqrt(2.0 / (n - 1))
  np.testing.assert_array_less(np.abs(x.mean(0) - mean), n_se * se_mean)
  np.testing.assert_array_less(np.abs(x.var(0, ddof=1) - var), n_se * se_var)


def _sample(model, x_T, key, sigmas):
  """CM Alg. 1 at the noise levels `sigmas` on EDM (`sigma(t) = sigma_max t`), by the sampler."""
  denoiser = param.make_denoiser(model, EDM, 'consistency')
  times = np.asarray(sigmas, np.float64) / EDM.sigma_max
  return samplers.consistency_multistep_sample(denoiser, EDM, x_T, key, times=times)


def test_one_and_two_step_sampling_with_exact_model_reproduce_the_data():
  n = 100_000
  model = exact_network()
  sample = jax.jit(lambda x_T, key, sigmas: _sample(model, x_T, key, sigmas),
                   static_argnums=2)
  z = jax.random.normal(jax.random.key(4), (n, 3))
  mu, s2, smin2 = np.asarray(MU), np.asarray(S2), SIGMA_MIN**2

  # From the exact marginal at sigma_max, one step lands on N(mu, s² + sigma_min²).
  x_exact = MU + jnp.sqrt(S2 + SIGMA_MAX**2) * z
  out, info = sample(x_exact, None, (SIGMA_MAX,))
  assert int(info['nfe']) == 1
  _assert_moments(out, mu, s2 + smin2)

  # From the prior N(0, sigma_max²): f* is linear, so mean mu + k (0 - mu), var k² sigma_max².
  k1 = np.sqrt((s2 + smin2) / (s2 + SIGMA_MAX**2))
  one, _ = sample(SIGMA_MAX * z, None, (SIGMA_MAX,))
  m1, v1 = mu * (1 - k1), k1**2 * SIGMA_MAX**2
  _assert_moments(one, m1, v1)
  np.testing.assert_allclose(v1, s2, rtol=3e-4)   # the prior mismatch is O(s² / sigma_max²)

  # Two steps (CM Alg. 1): x^ = x + sqrt(tau² - sigma_min²) z', then f*(x^, tau).
  tau = 0.8
  two, info = sample(SIGMA_MAX * z, jax.random.key(5), (SIGMA_MAX, tau))
  assert int(info['nfe']) == 2
  k2 = np.sqrt((s2 + smin2) / (s2 + tau**2))
  _assert_moments(two, mu + k2 * (m1 - mu), k2**2 * (v1 + tau**2 - smin2))


def test_sampling_arguments():
  model = exact_network()
  x_T = SIGMA_MAX * jax.random.normal(jax.random.key(6), (4, 3))
  with pytest.raises(ValueError, match='key is required'):
    _sample(model, x_T, None, (SIGMA_MAX, 1.0))
  # One step needs no key and is one call of f at t = 1 (CM Alg. 1 with N = 1), on any
  # alpha = 1 process: on VE (sigma in [0.01, 50]) it is f*(x_T, 50) with sigma_min = 0.01.
  ve = processes.make_process('ve')
  s_min, s_max = float(ve.sigma_min), float(ve.sigma_max)
  x = x_T / SIGMA_MAX * s_max
  out, info = samplers.consistency_multistep_sample(
      param.make_denoiser(exact_network(sigma_min=s_min), ve, 'consistency'), ve, x, steps=1)
  assert info['nfe'] == 1
  # float32: f* = mu + r (x - mu) with r ~ 2e-3 and |x| ~ 50; the scalings cancel to ~1e-6.
  np.testing.assert_allclose(out, MU + np.sqrt((S2 + s_min**2) / (S2 + s_max**2)) * (x - MU),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name, kwargs', [('vp_linear', {}), ('linear', {}),
                                          ('vp_discrete', {'schedule': 'linear'})])
def test_processes_with_alpha_not_one_are_rejected(name, kwargs):
  proc = processes.make_process(name, **kwargs)
  teacher = analytic.gaussian_denoiser(MU, S2, proc)
  with pytest.raises(ValueError, match='alpha'):
    cm.consistency_training(proc, 100)
  with pytest.raises(ValueError, match='alpha'):
    cm.consistency_distillation(proc, teacher)


# --- (c) consistency distillation at the exact teacher --------------------------------------------


@pytest.mark.parametrize('solver, order', [('euler', 1), ('heun', 2)])
def test_cd_loss_at_exact_model_shrinks_at_the_solvers_local_order(solver, order):
  """With the exact teacher and f*, the CD loss is the squared local ODE error mapped by f*:
  O(Delta^(2 (order + 1))), i.e. slope -2 (order + 1) against N - 1 on the Karras grid."""
  with jax.enable_x64(True):
    x0 = _data(jax.random.key(7), 20_000, jnp.float64)
    teacher = analytic.gaussian_denoiser(MU, S2, EDM)
    model = exact_network()
    perturbed = lambda x, c, cond: model(x, c, cond) + 0.1
    ns = np.array([17, 33, 65, 129])
    sweep = [cm.consistency_distillation(EDM, teacher, int(n), solver, 'l2') for n in ns]
    at_18 = cm.consistency_distillation(EDM, teacher, 18, solver, 'l2')

    @jax.jit   # one compilation for the whole sweep
    def run(x, key):
      losses = jnp.stack([objective(model, x, key)[0] for objective in sweep])
      return (losses, at_18(model, x, key)[1]['loss_per_example'],
              at_18(perturbed, x, key)[1]['loss_per_example'])

    losses, exact, moved = (np.asarray(a) for a in run(x0, jax.random.key(8)))
    slope = np.polyfit(np.log(ns - 1), np.log(losses), 1)[0]
    assert abs(slope + 2 * (order + 1)) < 0.3, (slope, losses)
    # A perturbed network output moves f off the ODE's invariant: strictly larger, paired.
    gap = moved - exact
    assert moved.mean() > exact.mean() and gap.mean() > 5 * gap.std() / np.sqrt(gap.size)


# --- (d) curricula ----------------------------------------------------------------------------


def test_ict_curriculum_doubles_every_k_prime_steps():
  total = 400_000   # K' = floor(400000 / (log2(128) + 1)) = 50,000
  assert int(cm.num_timesteps(0, total)) == 11
  assert int(cm.num_timesteps(total, total)) == 1281
  for m in range(8):
    assert int(cm.num_timesteps(50_000 * m, total)) == min(10 * 2**m, 1280) + 1
  for m in range(1, 8):   # the step before each doubling still has the previous N
    assert int(cm.num_timesteps(50_000 * m - 1, total)) == 10 * 2 ** (m - 1) + 1
  assert int(cm.num_timesteps(10**9, total)) == 1281
  steps = jnp.arange(0, total + 1, 997)
  n = jax.jit(cm.num_timesteps, static_argnums=1)(steps, total)
  assert bool(jnp.all(jnp.diff(n) >= 0)) and set(np.unique(n)) == {
      11, 21, 41, 81, 161, 321, 641, 1281}


def test_cm_curriculum_end_points():
  assert int(cm.cm_num_timesteps(0, 1000)) == 2
  assert int(cm.cm_num_timesteps(1000, 1000)) == 151
  n = cm.cm_num_timesteps(jnp.arange(1001), 1000)
  assert bool(jnp.all(jnp.diff(n) >= 0))
  np.testing.assert_allclose(cm.cm_ema_decay(2), 0.9, rtol=1e-6)   # mu(k) = mu0 at N = s0


# --- (e) the grid and iCT's step law -------------------------------------------------------------


def test_karras_grid_is_edm_eq5_increasing_and_padding_keeps_it():
  with jax.enable_x64(True):
    n = 21
    i = np.arange(n)
    lo, hi = SIGMA_MIN ** (1 / 7), SIGMA_MAX ** (1 / 7)
    expected = (lo + i / (n - 1) * (hi - lo)) ** 7
    grid = increasing_grid(n, dtype=jnp.float64)
    np.testing.assert_allclose(grid, expected, rtol=1e-12)
    assert float(grid[0]) == SIGMA_MIN and float(grid[-1]) == SIGMA_MAX
    padded = jax.jit(lambda m: increasing_grid(m, size=41, dtype=jnp.float64))(n)
    np.testing.assert_allclose(padded[:n], grid, rtol=1e-14)
    np.testing.assert_array_equal(padded[n:], SIGMA_MAX)


def test_lognormal_step_probabilities_are_the_erf_formula():
  with jax.enable_x64(True):
    n, size = 21, 41
    grid = increasing_grid(n, size=size, dtype=jnp.float64)
    probs = np.asarray(cm.lognormal_step_probs(grid, n, -1.1, 2.0))
  cdf = np.array([math.erf((math.log(s) + 1.1) / (math.sqrt(2) * 2.0)) for s in np.asarray(grid)])
  mass = cdf[1:n] - cdf[:n - 1]
  assert probs.shape == (size - 1,) and abs(probs.sum() - 1.0) < 1e-12
  np.testing.assert_allclose(probs[:n - 1], mass / mass.sum(), rtol=1e-10)
  np.testing.assert_array_equal(probs[n - 1:], 0.0)


def test_ct_draws_intervals_from_the_lognormal_law():
  """At step 0 (N = 11) the noisier point of each pair follows the erf law (chi-square)."""
  objective = cm.consistency_training(EDM, 1000)
  x0 = _data(jax.random.key(10), 20_000)
  _, aux = jax.jit(lambda x, k: objective(lambda x, c, cond: 0 * x, x, k))(x0, jax.random.key(11))
  assert int(aux['num_timesteps']) == 11
  grid = np.asarray(increasing_grid(11))
  idx = np.argmin(np.abs(np.asarray(aux['sigma'])[:, None] - grid[None, :]), axis=1) - 1
  # float32: the grid is sigma^(1/rho) interpolated then raised to rho = 7, which multiplies
  # the relative rounding of the base by rho (7 x a few eps32 ~ 2e-6, jit fusion decides which).
  np.testing.assert_allclose(np.asarray(aux['sigma']), grid[idx + 1], rtol=1e-5)
  probs = np.asarray(cm.lognormal_step_probs(jnp.asarray(grid), 11), np.float64)
  counts = np.bincount(idx, minlength=10)
  assert stats.chisquare(counts, probs / probs.sum() * counts.sum()).pvalue > 1e-4
  np.testing.assert_allclose(aux['t'], aux['sigma'] / SIGMA_MAX, rtol=1e-5)
  np.testing.assert_allclose(aux['log_snr'], -2 * np.log(aux['sigma']), rtol=1e-6)


# --- (f) the metrics -----------------------------------------------------------------------------


def test_pseudo_huber_is_per_sample_on_the_whole_norm():
  assert cm.pseudo_huber_c(3 * 32 * 32) == pytest.approx(0.00054 * math.sqrt(3072), rel=1e-12)
  x = jax.random.normal(jax.random.key(12), (4, 32, 32, 3))
  y = x + 0.01 * jax.random.normal(jax.random.key(13), x.shape)
  got = np.asarray(cm.pseudo_huber(x, y), np.float64)
  diff = np.asarray(x - y, np.float64).reshape(4, -1)
  c = 0.00054 * math.sqrt(3072)
  np.testing.assert_allclose(got, np.sqrt((diff**2).sum(1) + c**2) - c, rtol=1e-5)
  np.testing.assert_allclose(cm.pseudo_huber(x[1:2], y[1:2]), got[1:2], rtol=1e-6)
  per_element = np.mean(np.sqrt(diff**2 + c**2) - c, axis=1)
  assert not np.allclose(got, per_element, rtol=0.1)
  np.testing.assert_allclose(cm.squared_l2(x, y), (diff**2).sum(1), rtol=1e-5)


# --- (g) gradients --------------------------------------------------------------------------------


def _ct(_):
  return cm.consistency_training(EDM, 100), {'step': 60}


def _cd(_):
  teacher = analytic.gaussian_denoiser(MU, S2, EDM)
  return cm.consistency_distillation(EDM, teacher, 18, 'heun', 'pseudo_huber'), {}


@pytest.mark.parametrize('make', [_ct, _cd], ids=['ct', 'cd'])
def test_gradients_are_finite_and_match_finite_differences(make):
  """The target is under stop_gradient, so finite differences are taken with the target network
  frozen at the evaluation point; that gradient must equal the stop_gradient one (float64)."""
  with jax.enable_x64(True):
    objective, kwargs = make(None)
    x0 = _data(jax.random.key(14), 16, jnp.float64)
    p0 = _tiny_params()
    key = jax.random.key(15)

    def frozen(p):
      return objective(_tiny(p), x0, key, target_model_fn=_tiny(p0), **kwargs)[0]

    def online(p):
      return objective(_tiny(p), x0, key, **kwargs)[0]

    grads, grads_frozen = jax.jit(lambda p: (jax.grad(online)(p), jax.grad(frozen)(p)))(p0)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    jax.tree.map(lambda g, h: np.testing.assert_allclose(g, h, rtol=1e-12, atol=1e-12),
                 grads, grads_frozen)
    # Central differences along random directions, h small against pseudo-Huber's c (9e-4
    # for d = 3), which sets the scale of its curvature.
    loss_at = jax.jit(lambda p, v, h: frozen(jax.tree.map(lambda a, b: a + h * b, p, v)))
    for seed in range(3):
      leaves, tree = jax.tree.flatten(p0)
      keys = jax.random.split(jax.random.key(100 + seed), len(leaves))
      v = jax.tree.unflatten(tree, [jax.random.normal(k, a.shape, a.dtype)
                                    for k, a in zip(keys, leaves, strict=True)])
      h = 1e-6
      fd = (loss_at(p0, v, h) - loss_at(p0, v, -h)) / (2 * h)
      ad = sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(v),
                                              strict=True))
      np.testing.assert_allclose(fd, ad, rtol=1e-5, atol=1e-7)


# --- (h) jit with a traced step -------------------------------------------------------------------


def test_ct_objective_compiles_once_for_every_step():
  total = 1000
  objective = cm.consistency_training(EDM, total)
  model = _tiny(_tiny_params(jnp.float32))
  x0 = _data(jax.random.key(16), 64)
  traces = []

  def run(step):
    traces.append(step)
    return objective(model, x0, jax.random.key(17), step=step)

  jitted = jax.jit(run)
  for step, n in ((0, 11), (124, 11), (125, 21), (500, 161), (874, 641), (875, 1281)):
    loss, aux = jitted(step)   # K' = floor(1000 / 8) = 125
    assert int(aux['num_timesteps']) == n
    assert bool(jnp.isfinite(loss)) and aux['loss_per_example'].shape == (64,)
    # Every drawn pair lies on the N-point grid (EDM Eq. 5), never in the padding.
    lo, hi = SIGMA_MIN ** (1 / 7), SIGMA_MAX ** (1 / 7)
    grid = (lo + np.arange(1, n) / (n - 1) * (hi - lo)) ** 7
    assert np.all(np.min(np.abs(np.asarray(aux['sigma'])[:, None] / grid - 1), 1) < 1e-5)
  assert len(traces) == 1


def test_bad_option_names():
  with pytest.raises(ValueError, match='curriculum'):
    cm.consistency_training(EDM, 10, curriculum='linear')
  with pytest.raises(ValueError, match='loss'):
    cm.consistency_training(EDM, 10, loss='lpips')
  with pytest.raises(ValueError, match='ode_solver'):
    cm.consistency_distillation(EDM, analytic.gaussian_denoiser(MU, S2, EDM), ode_solver='rk4')


def test_distillation_needs_two_grid_points():
  edm = processes.make_process('edm')
  with pytest.raises(ValueError, match='num_timesteps=1 must be >= 2'):
    cm.consistency_distillation(edm, analytic.gaussian_denoiser(MU, S2, edm), num_timesteps=1)
