"""Every process against its closed forms: the discrete VP (Ho et al. 2020; Nichol & Dhariwal
2021), the continuous families and the SDE view derived from them (Song et al. 2021)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax import objectives
from diffusion_jax import parameterization as param
from diffusion_jax import processes


def test_linear_betas_are_ddpm_values():
  betas = processes.linear_betas(1000)
  assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
  # Ho et al. choose the schedule so that x_T is almost pure noise: abar_T ≈ 4.0e-5.
  abar_T = np.exp(np.sum(np.log1p(-betas)))
  assert abar_T == pytest.approx(4.0358e-5, rel=1e-3)
  # Nichol & Dhariwal (2021), improved-diffusion's get_named_beta_schedule: for T != 1000 the
  # end points scale by 1000 / T, so T = 100 runs from 1e-3 to 0.2 and T = 4000 from 2.5e-5.
  short, long = processes.linear_betas(100), processes.linear_betas(4000)
  assert short[0] == pytest.approx(1e-3) and short[-1] == pytest.approx(0.2)
  assert long[0] == pytest.approx(2.5e-5) and long[-1] == pytest.approx(5e-3)


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


# --- every process in PROCESSES: the convention of DESIGN §1 --------------------------------

INF = math.inf
CASES = [(name, {}) for name in processes.PROCESSES] + [
    ('vp_discrete', {'schedule': 'cosine'}),
    ('vp_discrete', {'schedule': 'scaled_linear'}),
    ('vp_discrete', {'schedule': 'sigmoid', 'num_steps': 500}),
    ('vp_discrete', {'schedule': 'scaled_linear', 'zero_terminal_snr': True}),
    ('vp_linear', {'t_min': 1e-5, 'beta_max': 10.0}),
    ('subvp', {'t_min': 1e-5, 'beta_min': 0.5, 'beta_max': 5.0}),
    ('subvp', {'beta_min': 2.0, 'beta_max': 2.0}),   # constant beta: the inverse's linear case
    ('vp_cosine', {'shift': -2.0}),
    ('vp_cosine', {'logsnr_min': -INF, 'logsnr_max': INF}),
    ('vp_cosine_interpolated', {'resolution': 1024}),
    ('ve', {'sigma_min': 0.002, 'sigma_max': 80.0}),
    ('edm', {'sigma_max': 100.0}),
]
VP = ('vp_discrete', 'vp_linear', 'vp_cosine', 'vp_cosine_shifted', 'vp_cosine_interpolated')


def _id(case):
  name, kwargs = case
  return '-'.join([name] + [f'{k}={v}' for k, v in kwargs.items()])


def _make(case):
  name, kwargs = case
  return processes.make_process(name, **kwargs)


def _grid(proc, n=4001):
  return jnp.linspace(proc.t_min, 1.0, n, dtype=jnp.float64)


@pytest.mark.parametrize('case', CASES, ids=_id)
def test_log_snr_decreasing_invertible_and_consistent(case):
  proc = _make(case)
  with jax.enable_x64(True):
    t = _grid(proc)
    lam = proc.log_snr(t)
    assert np.all(np.diff(np.asarray(lam)) < 0)
    np.testing.assert_allclose(proc.t_of_log_snr(lam), t, rtol=0, atol=1e-10)
    finite = np.isfinite(lam)
    log_ratio = 2 * jnp.log(proc.alpha(t)) - 2 * jnp.log(proc.sigma(t))
    np.testing.assert_allclose(log_ratio[finite], lam[finite], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('case', CASES, ids=_id)
def test_alpha_sigma_and_marginal(case):
  proc = _make(case)
  with jax.enable_x64(True):
    t = _grid(proc, 1001)
    alpha, sigma = np.asarray(proc.alpha(t)), np.asarray(proc.sigma(t))
    assert np.all(alpha >= 0) and np.all(sigma >= 0)
    if case[0] in VP:
      np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-12)
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(k1, (t.shape[0], 3, 2), jnp.float64)
    eps = jax.random.normal(k2, x0.shape, jnp.float64)
    np.testing.assert_allclose(proc.marginal(x0, eps, t),
                               alpha[:, None, None] * x0 + sigma[:, None, None] * eps, rtol=1e-14)
    # A scalar t broadcasts over the whole batch.
    np.testing.assert_allclose(proc.marginal(x0, eps, 0.5), proc.marginal(x0, eps, jnp.full(
        t.shape, 0.5)), rtol=1e-14)


@pytest.mark.parametrize('case', CASES, ids=_id)
def test_prior_sample_scale(case):
  """Sample mean and variance within 6 standard errors of N(0, prior_std²)."""
  proc, n = _make(case), 200_000
  x = np.asarray(proc.prior_sample(jax.random.key(1), (n,)), np.float64)
  std = proc.prior_std
  assert abs(x.mean()) < 6 * std / np.sqrt(n)
  assert abs(x.var() / std**2 - 1) < 6 * np.sqrt(2 / n)
  if case[0] in ('ve', 'edm'):
    assert float(proc.sigma(1.0)) == pytest.approx(std)   # x_1 = x0 + sigma_max eps


@pytest.mark.parametrize('case', CASES, ids=_id)
def test_endpoints_have_no_nan(case):
  """At t = 0 and 1: alpha, sigma, marginal finite; log_snr = +inf exactly where sigma = 0 and
  -inf exactly where alpha = 0 (linear interpolant, EDM at 0, zero terminal SNR at 1)."""
  proc = _make(case)
  t = jnp.array([0.0, 1.0])
  alpha, sigma, lam = (np.asarray(f(t)) for f in (proc.alpha, proc.sigma, proc.log_snr))
  assert np.all(np.isfinite(alpha)) and np.all(np.isfinite(sigma)) and not np.any(np.isnan(lam))
  assert np.all(np.isfinite(proc.marginal(jnp.ones((2, 4)), jnp.ones((2, 4)), t)))
  np.testing.assert_array_equal(lam == INF, sigma == 0)
  np.testing.assert_array_equal(lam == -INF, alpha == 0)


# --- the SDE view, derived once from alpha and sigma ----------------------------------------

SDE_T = np.array([0.0137, 0.2537, 0.5037, 0.7537, 0.9737])   # off the discrete grids' knots


@pytest.mark.parametrize('case', CASES, ids=_id)
def test_sde_reproduces_the_marginal_moments(case):
  """dx = f x dt + g dW has dE[x_t|x0]/dt = f E and dVar/dt = 2 f Var + g² (Song et al. 2021,
  Eq. 5): checked against central differences of alpha and sigma², not against autodiff. Also
  g² = -sigma² dlambda/dt (Kingma et al. 2021), and on VP g² = beta(t) = -2 f."""
  proc, h = _make(case), 1e-6
  with jax.enable_x64(True):
    t = jnp.asarray(SDE_T)
    f, g2 = proc.drift_coefficient(t), proc.diffusion_squared(t)
    d = lambda fn: (fn(t + h) - fn(t - h)) / (2 * h)
    var = lambda s: proc.sigma(s) ** 2
    np.testing.assert_allclose(d(proc.alpha), f * proc.alpha(t), rtol=1e-6)
    np.testing.assert_allclose(d(var), 2 * f * var(t) + g2, rtol=1e-6)
    np.testing.assert_allclose(g2, -var(t) * d(proc.log_snr), rtol=1e-6)
    if case[0] in VP:
      np.testing.assert_allclose(g2, -2 * f, rtol=1e-9)


def test_sde_closed_forms():
  """Published coefficients. VP linear: f = -beta/2, g² = beta (Song et al. 2021, Eq. 11). VE:
  f = 0, g² = d sigma²/dt = 2 sigma² log(sigma_max / sigma_min) (Eq. 9). EDM: f = 0,
  g² = 2 sigma sigma' = 2 sigma_max² t. Linear interpolant: f = d log(1 - t)/dt = -1/(1 - t),
  g² = d t²/dt - 2 f t² = 2t + 2t²/(1 - t) (= 2t / (1 - t)). Full-range cosine, alpha =
  cos(pi t / 2): f = -(pi/2) tan(pi t / 2), g² = pi tan(pi t / 2). Discrete VP on segment n:
  f = (T/2) log(1 - beta_n), the continuous beta(t) = -T log(1 - beta_n) ≈ T beta_n."""
  with jax.enable_x64(True):
    t = jnp.asarray(SDE_T)

    def check(proc, f, g2):
      np.testing.assert_allclose(proc.drift_coefficient(t), f, rtol=1e-12)
      np.testing.assert_allclose(proc.diffusion_squared(t), g2, rtol=1e-10)

    beta = 0.1 + t * (20.0 - 0.1)
    check(processes.make_process('vp_linear'), -0.5 * beta, beta)
    ve = processes.make_process('ve')
    check(ve, 0.0, 2 * ve.sigma(t) ** 2 * math.log(50.0 / 0.01))
    check(processes.make_process('edm'), 0.0, 2 * 80.0**2 * t)
    check(processes.make_process('linear'), -1 / (1 - t), 2 * t + 2 * t**2 / (1 - t))
    tan = jnp.tan(math.pi * t / 2)
    check(processes.make_process('vp_cosine', logsnr_min=-INF, logsnr_max=INF),
          -math.pi / 2 * tan, math.pi * tan)
    disc = processes.DiscreteVP.from_name('linear', 1000)
    log1m_beta = np.log1p(-disc.betas[np.floor(SDE_T * 1000).astype(int)])
    check(disc, 500 * log1m_beta, -1000 * log1m_beta)


# --- published constants ------------------------------------------------------------------

def test_vp_linear_terminal_alpha():
  """Song et al. 2021 VP SDE: alpha(1) = exp(-(beta_max - beta_min)/4 - beta_min/2) ≈ 6.57e-3."""
  proc = processes.make_process('vp_linear')
  with jax.enable_x64(True):
    assert float(proc.alpha(1.0)) == pytest.approx(math.exp(-(20 - 0.1) / 4 - 0.05), rel=1e-14)
  assert float(proc.alpha(1.0)) == pytest.approx(6.5716e-3, rel=1e-4)
  assert proc.t_min == 1e-3


def test_scaled_linear_terminal_snr_is_lin_et_al():
  """Lin et al. 2024, §3.1: Stable Diffusion's schedule ends at sqrt(abar_T) = 0.068265,
  SNR = 0.004682 (T = 1000, betas from 0.00085 to 0.012)."""
  proc = processes.DiscreteVP.from_name('scaled_linear', 1000)
  assert proc.betas[0] == pytest.approx(0.00085) and proc.betas[-1] == pytest.approx(0.012)
  abar_T = proc.alphas_cumprod[-1]
  assert math.sqrt(abar_T) == pytest.approx(0.068265, abs=1e-6)
  assert abar_T / (1 - abar_T) == pytest.approx(0.004682, abs=1e-6)


def test_sigmoid_betas_end_points():
  """GeoDiff: sigmoid(linspace(-6, 6, T)) (0.02 - 1e-4) + 1e-4, so the ends are 1e-4 +
  0.0199 sigmoid(∓6), and beta_k + beta_{T-1-k} = 2e-4 + 0.0199 (sigmoid(x) + sigmoid(-x) = 1)."""
  betas = processes.sigmoid_betas(1000)
  sig6 = 1 / (1 + math.exp(-6))
  assert betas[0] == pytest.approx(1e-4 + 0.0199 * (1 - sig6), rel=1e-12)   # 1.492e-4
  assert betas[-1] == pytest.approx(1e-4 + 0.0199 * sig6, rel=1e-12)        # 0.019951
  np.testing.assert_allclose(betas + betas[::-1], 0.0201, rtol=1e-12)
  assert np.all(np.diff(betas) > 0)


@pytest.mark.parametrize('schedule', ['linear', 'cosine', 'scaled_linear', 'sigmoid'])
def test_zero_terminal_snr_rescale(schedule):
  """Lin et al. 2024, Alg. 1: sqrt(abar) is shifted and scaled so sqrt(abar_T) = 0 exactly and
  abar_1 is unchanged; the rescaled sqrt(abar) is an affine map of the original."""
  base = processes.DiscreteVP.from_name(schedule, 1000)
  proc = processes.DiscreteVP.from_name(schedule, 1000, zero_terminal_snr=True)
  old, new = np.sqrt(base.alphas_cumprod), np.sqrt(proc.alphas_cumprod)
  assert proc.alphas_cumprod[-1] == 0.0 and proc.betas[-1] == 1.0 and proc.zero_terminal_snr
  assert proc.alphas_cumprod[0] == pytest.approx(base.alphas_cumprod[0], rel=1e-12)
  np.testing.assert_allclose(new, (old - old[-1]) * old[0] / (old[0] - old[-1]),
                             rtol=1e-9, atol=1e-12)
  with jax.enable_x64(True):
    n = np.arange(0, 1000)   # grid points before the last are exact
    np.testing.assert_allclose(proc.alpha(jnp.asarray(n / 1000)) ** 2,
                               np.concatenate([[1.0], proc.alphas_cumprod[:-1]]), rtol=1e-11)


def test_zero_terminal_snr_at_t_equal_1():
  """Documented behaviour at t = 1: alpha = 0, sigma = 1, log_snr = -inf, log_alpha = the grid's
  floor log(1e-20) / 2 (finite), SDE coefficients finite on the last segment; v-prediction
  converts to x0 (= -v); eps-prediction cannot (x0 = (x - sigma eps) / alpha divides by 0)."""
  proc = processes.DiscreteVP.from_name('scaled_linear', 1000, zero_terminal_snr=True)
  one = jnp.ones((2,))
  assert np.all(proc.alpha(one) == 0) and np.all(proc.sigma(one) == 1)
  assert np.all(proc.log_snr(one) == -INF)
  np.testing.assert_allclose(proc.log_alpha(one), 0.5 * math.log(1e-20), rtol=1e-6)
  assert float(proc.t_of_log_snr(-INF)) == 1.0
  t_last = jnp.linspace(0.999, 1.0, 11)
  for fn in (proc.log_alpha, proc.drift_coefficient, proc.diffusion_squared, proc.sigma):
    assert np.all(np.isfinite(fn(t_last))), fn.__name__
  assert np.all(np.diff(np.asarray(proc.log_snr(t_last))) < 0)
  x, out = jnp.ones((2, 3)), jnp.full((2, 3), 0.5)
  x0, eps = param.to_x0_eps('v', out, x, proc, one)
  np.testing.assert_allclose(x0, -out)
  np.testing.assert_allclose(eps, x)
  x0, _ = param.to_x0_eps('eps', out, x, proc, one)
  assert not np.any(np.isfinite(x0))


def test_cosine_log_snr_schedules():
  """Hoogeboom et al. 2023, §3.1: clipped lambda runs from 15 to -15; the full range is
  alpha = cos(pi t / 2) (Nichol & Dhariwal with s -> 0); shifted = cosine + 2 log(64 / 256);
  interpolated = t lambda_shifted(32) + (1 - t) lambda_shifted(256)."""
  with jax.enable_x64(True):
    t = jnp.linspace(0.0, 1.0, 101, dtype=jnp.float64)
    plain = processes.make_process('vp_cosine')
    np.testing.assert_allclose(plain.log_snr(jnp.array([0.0, 1.0])), [15.0, -15.0], rtol=1e-12)
    full = processes.make_process('vp_cosine', logsnr_min=-INF, logsnr_max=INF)
    np.testing.assert_allclose(full.alpha(t), jnp.cos(math.pi * t / 2), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(full.sigma(t), jnp.sin(math.pi * t / 2), rtol=1e-12, atol=1e-15)
    shifted = processes.make_process('vp_cosine_shifted', resolution=256, base_resolution=64)
    np.testing.assert_allclose(shifted.log_snr(t), plain.log_snr(t) + 2 * math.log(64 / 256),
                               rtol=1e-12)
    low, high = (processes.VPCosine.shifted(512, base) for base in (32, 256))
    interp = processes.make_process('vp_cosine_interpolated', resolution=512,
                                    base_resolution_low=32, base_resolution_high=256)
    np.testing.assert_allclose(interp.log_snr(t), t * low.log_snr(t) + (1 - t) * high.log_snr(t),
                               rtol=1e-12, atol=1e-12)


def test_ve_and_edm_constants():
  """VE: sigma from 0.01 to 50 (Song et al. 2021, CIFAR-10); EDM: sigma in [0.002, 80]
  (Karras et al. 2022, Table 1), t_min = sigma_min / sigma_max."""
  ve, edm = processes.make_process('ve'), processes.make_process('edm')
  np.testing.assert_allclose(ve.sigma(jnp.array([0.0, 1.0])), [0.01, 50.0], rtol=1e-6)
  assert ve.prior_std == 50.0 and float(ve.alpha(0.3)) == 1.0
  assert edm.t_min == pytest.approx(2.5e-5) and edm.prior_std == 80.0
  np.testing.assert_allclose(edm.sigma(jnp.array([edm.t_min, 1.0])), [0.002, 80.0], rtol=1e-6)


def test_edm_training_t_is_log_normal():
  """EDM's training law lives in the objective (`objectives.log_normal_t`): on EDM's process,
  ln sigma ~ N(P_mean = -1.2, P_std = 1.2) (Karras et al. 2022, Table 1) with t = sigma / 80."""
  t = objectives.log_normal_t(processes.make_process('edm'), jax.random.key(3), 50_000)
  assert t.dtype == jnp.float32 and t.shape == (50_000,) and np.all(np.asarray(t) > 0)
  log_sigma = np.log(80.0 * np.asarray(t, np.float64))
  assert stats.kstest(log_sigma, stats.norm(-1.2, 1.2).cdf).pvalue > 1e-4


# --- sub-VP SDE (Song et al. 2021, §3.4, Eq. 12; kernel App. B, Eq. 29) ----------------------
# Expected values are written from the paper in numpy float64: B(t) = int_0^t beta, the mean
# factor e^{-B/2} and the standard deviation 1 - e^{-B} (no square root). 1 - exp(-B) in numpy
# loses ~eps / B relative, <= 2e-12 at the smallest t here (B = 1.1e-4), hence rtol 1e-10.

SUBVP_BETAS = [(0.1, 20.0), (0.5, 5.0), (2.0, 2.0)]
SUBVP_T = np.array([1e-3, 0.01, 0.0537, 0.25, 0.5, 0.7537, 0.99, 1.0])


def _paper_subvp(t, beta_min, beta_max):
  """(B, beta, alpha, sigma) of the sub-VP SDE with the VP's linear beta (Song et al. App. C)."""
  beta = beta_min + t * (beta_max - beta_min)
  big_b = beta_min * t + 0.5 * (beta_max - beta_min) * t**2
  return big_b, beta, np.exp(-0.5 * big_b), 1.0 - np.exp(-big_b)


@pytest.mark.parametrize('betas', SUBVP_BETAS, ids=str)
def test_subvp_closed_forms(betas):
  proc = processes.make_process('subvp', beta_min=betas[0], beta_max=betas[1])
  big_b, _, alpha, sigma = _paper_subvp(SUBVP_T, *betas)
  with jax.enable_x64(True):
    t = jnp.asarray(SUBVP_T)
    np.testing.assert_allclose(proc.alpha(t), alpha, rtol=1e-13)
    np.testing.assert_allclose(proc.log_alpha(t), -0.5 * big_b, rtol=1e-13)
    np.testing.assert_allclose(proc.sigma(t), sigma, rtol=1e-10)
    np.testing.assert_allclose(proc.sigma_squared(t), sigma**2, rtol=1e-10)
    # log(alpha² / sigma²): sigma's 2e-12 relative error is 4e-12 absolute in the log.
    np.testing.assert_allclose(proc.log_snr(t), np.log(alpha**2 / sigma**2), rtol=0, atol=1e-10)


@pytest.mark.parametrize('betas', SUBVP_BETAS, ids=str)
def test_subvp_derived_sde_is_the_papers(betas):
  """The base class's f and g² are the paper's sub-VP SDE, dx = -beta/2 x dt +
  sqrt(beta (1 - e^{-2B})) dW (Eq. 12): f = -beta/2, g² = beta (1 - e^{-2B}). Integrating the
  moment ODEs dm/dt = f m, dSigma/dt = 2 f Sigma + g² (Song et al. App. B; Eq. 5 in `Process`) from
  m(0) = 1, Sigma(0) = 0 with RK4 on the derived coefficients lands on the paper's kernel
  m = e^{-B/2}, Sigma = (1 - e^{-B})² (Eq. 29)."""
  proc = processes.make_process('subvp', beta_min=betas[0], beta_max=betas[1])
  big_b, beta, _, _ = _paper_subvp(SUBVP_T, *betas)
  with jax.enable_x64(True):
    t = jnp.asarray(SUBVP_T)
    # f is an exact derivative of a quadratic; g² rtol as the module's comment (1 - exp(-2B)).
    np.testing.assert_allclose(proc.drift_coefficient(t), -0.5 * beta, rtol=1e-13)
    np.testing.assert_allclose(proc.diffusion_squared(t), beta * (1 - np.exp(-2 * big_b)),
                               rtol=1e-10)
    n = 2000                                 # RK4 steps on [0, 1]
    grid = jnp.linspace(0.0, 1.0, 2 * n + 1, dtype=jnp.float64)   # knots and midpoints
    f, g2 = np.asarray(proc.drift_coefficient(grid)), np.asarray(proc.diffusion_squared(grid))
  h, m, var, m_path, var_path = 1.0 / n, 1.0, 0.0, [1.0], [0.0]
  for i in range(n):
    f0, fh, f1 = f[2 * i], f[2 * i + 1], f[2 * i + 2]
    g0, gh, g1 = g2[2 * i], g2[2 * i + 1], g2[2 * i + 2]
    dv = lambda fi, gi, v: 2 * fi * v + gi
    k1m, k1v = f0 * m, dv(f0, g0, var)
    k2m, k2v = fh * (m + h / 2 * k1m), dv(fh, gh, var + h / 2 * k1v)
    k3m, k3v = fh * (m + h / 2 * k2m), dv(fh, gh, var + h / 2 * k2v)
    k4m, k4v = f1 * (m + h * k3m), dv(f1, g1, var + h * k3v)
    m += h / 6 * (k1m + 2 * k2m + 2 * k3m + k4m)
    var += h / 6 * (k1v + 2 * k2v + 2 * k3v + k4v)
    m_path.append(m)
    var_path.append(var)
  s = np.linspace(0.0, 1.0, n + 1)
  b_s, _, alpha_s, sigma_s = _paper_subvp(s, *betas)
  # RK4's global error is O(h⁴ max|f|⁴) ~ (5e-4 · 10)⁴ ~ 6e-10 at most; measured relative
  # errors are <= 9e-12 (mean) and 1.4e-11 (variance) over the three schedules.
  np.testing.assert_allclose(m_path, alpha_s, rtol=1e-9)
  np.testing.assert_allclose(var_path, sigma_s**2, rtol=1e-9, atol=1e-14)
  # And the VP's variance 1 - e^{-B} is not a solution: the test tells the two SDEs apart.
  assert np.max(np.abs(np.asarray(var_path) - (1 - np.exp(-b_s)))) > 1e-2


@pytest.mark.parametrize('betas', SUBVP_BETAS, ids=str)
def test_subvp_inverse_log_snr(betas):
  """t(lambda(t)) = t on [t_min, 1] to float precision (float64 and float32), lambda(t(lambda))
  = lambda far outside that range, and the ends: t(+inf) = 0, t(-inf) = inf. lambda written
  from the paper: log(e^{-B} / (1 - e^{-B})²)."""
  proc = processes.make_process('subvp', beta_min=betas[0], beta_max=betas[1])
  t = np.linspace(proc.t_min, 1.0, 20001)
  big_b, _, _, _ = _paper_subvp(t, *betas)
  lam = -big_b - 2 * np.log(-np.expm1(-big_b))
  with jax.enable_x64(True):
    # |dt/dlambda| <= 1 / min|lambda'| and lambda carries ~1e-16 relative: t to ~1e-15
    # (measured <= 7e-15).
    np.testing.assert_allclose(proc.t_of_log_snr(jnp.asarray(lam)), t, rtol=0, atol=1e-13)
    np.testing.assert_allclose(proc.t_of_log_snr(proc.log_snr(jnp.asarray(t))), t, rtol=0,
                               atol=1e-13)
    wide = jnp.linspace(-80.0, 80.0, 1601, dtype=jnp.float64)
    back = proc.log_snr(proc.t_of_log_snr(wide))
    np.testing.assert_allclose(back, wide, rtol=1e-12, atol=1e-12)
    ends = proc.t_of_log_snr(jnp.array([INF, -INF]))
    assert float(ends[0]) == 0.0 and float(ends[1]) == INF
  t32 = jnp.asarray(t, jnp.float32)
  # float32: a few ulp of t (6e-8 near t = 1; measured <= 1.8e-7).
  np.testing.assert_allclose(proc.t_of_log_snr(proc.log_snr(t32)), t32, rtol=0, atol=5e-7)
  assert np.all(np.isfinite(proc.t_of_log_snr(jnp.linspace(-80.0, 80.0, 161))))


def test_subvp_endpoints_and_constants():
  """Defaults beta in [0.1, 20], t_min = 1e-3 (Song et al. App. C). t = 0: alpha = 1, sigma = 0,
  lambda = +inf. t = 1: alpha = e^{-10.05 / 2} = 6.57e-3 (the VP's), sigma = 1 - e^{-10.05}
  = 0.99996, so the prior is N(0, I) up to 4.3e-5."""
  proc = processes.make_process('subvp')
  assert proc.t_min == 1e-3 and proc.prior_std == 1.0
  with jax.enable_x64(True):
    zero, one = jnp.float64(0.0), jnp.float64(1.0)
    assert float(proc.alpha(zero)) == 1.0 and float(proc.sigma(zero)) == 0.0
    assert float(proc.log_snr(zero)) == INF
    assert float(proc.alpha(one)) == pytest.approx(math.exp(-10.05 / 2), rel=1e-14)
    assert float(proc.sigma(one)) == pytest.approx(1 - math.exp(-10.05), rel=1e-14)
    assert float(proc.log_snr(one)) == pytest.approx(
        -10.05 - 2 * math.log(1 - math.exp(-10.05)), rel=1e-14)
  assert float(proc.alpha(1.0)) == pytest.approx(6.5716e-3, rel=1e-4)
  assert float(proc.sigma(1.0)) == pytest.approx(0.999957, abs=1e-6)


def test_subvp_variance_is_below_vp():
  """The paper's point (§3.4): with the same beta, the sub-VP's variance (1 - e^{-B})² is below
  the VP's 1 - e^{-B} at every t > 0 (their ratio is 1 - e^{-B}, exactly), with the same mean
  and a smaller g² (beta (1 - e^{-2B}) < beta)."""
  sub, vp = processes.make_process('subvp'), processes.make_process('vp_linear')
  with jax.enable_x64(True):
    t = jnp.linspace(sub.t_min, 1.0, 4001, dtype=jnp.float64)
    var_sub, var_vp = np.asarray(sub.sigma(t)) ** 2, np.asarray(vp.sigma(t)) ** 2
    assert np.all(var_sub < var_vp)
    big_b, _, _, _ = _paper_subvp(np.asarray(t), 0.1, 20.0)
    np.testing.assert_allclose(var_sub / var_vp, 1 - np.exp(-big_b), rtol=1e-10)
    np.testing.assert_allclose(sub.alpha(t), vp.alpha(t), rtol=1e-14)
    assert np.all(np.asarray(sub.diffusion_squared(t)) < np.asarray(vp.diffusion_squared(t)))
    assert np.all(np.asarray(sub.log_snr(t)) > np.asarray(vp.log_snr(t)))


def test_t_min_is_required_of_every_process():
  """`t_min` is abstract in `Process`: a family without one cannot be built."""
  class NoTMin(processes.Process):
    def log_alpha(self, t):
      return jnp.zeros_like(t)

    def sigma_squared(self, t):
      return jnp.ones_like(t)

  with pytest.raises(TypeError, match='t_min'):
    NoTMin()
  assert all(_make(case).t_min >= 0 for case in CASES)


# --- jit, vmap, dtypes, names ---------------------------------------------------------------

METHODS = ('alpha', 'sigma', 'log_snr', 'drift_coefficient', 'diffusion_squared', 't_of_log_snr')


@pytest.mark.parametrize('case', [(name, {}) for name in processes.PROCESSES], ids=_id)
def test_jit_vmap_scalars_and_dtypes(case):
  proc = _make(case)

  def every_method(t):
    return {name: getattr(proc, name)(proc.log_snr(t) if name == 't_of_log_snr' else t)
            for name in METHODS}

  t = jnp.array([0.1, 0.4, 0.7], jnp.float32)
  jitted = jax.jit(every_method)(t)
  for name, out in jitted.items():
    assert out.dtype == jnp.float32 and out.shape == (3,), name
  vmapped = jax.jit(jax.vmap(every_method))(t)
  for name in METHODS:
    np.testing.assert_allclose(vmapped[name], jitted[name], rtol=1e-5, err_msg=name)
  assert all(out.shape == () for out in jax.jit(every_method)(0.4).values())
  with jax.enable_x64(True):
    assert all(out.dtype == jnp.float64 for out in jax.jit(every_method)(
        t.astype(jnp.float64)).values())
  # Hashing by identity: a process can be a static argument.
  alpha = jax.jit(lambda p, s: p.alpha(s), static_argnums=0)
  np.testing.assert_allclose(alpha(proc, t), proc.alpha(t), rtol=1e-6)


def test_make_process_errors_are_one_line_and_named():
  cases = [
      (('nope',), {}, "unknown process 'nope'"),
      (('ve',), {'sigma_mx': 3.0}, "process 've'.*sigma_mx.*valid arguments"),
      (('vp_discrete',), {'beta_strat': 1e-4}, "beta schedule 'linear'.*beta_strat"),
      (('vp_discrete',), {'schedule': 'cosine', 'beta_start': 1e-4}, 'beta_start'),
      (('ve',), {'sigma_min': 60.0}, 'VE: need 0 < sigma_min < sigma_max'),
      (('vp_cosine',), {'logsnr_min': 5.0, 'logsnr_max': -5.0}, 'logsnr_min < logsnr_max'),
      (('vp_cosine',), {'shift': 0.0, 'shift_end': 20.0}, 'strictly decreasing'),
      (('vp_linear',), {'beta_min': 0.0}, 'beta_min'),
      (('subvp',), {'beta_min': 30.0}, 'SubVP: need 0 < beta_min <= beta_max'),
  ]
  for args, kwargs, match in cases:
    with pytest.raises(ValueError, match=match) as info:
      processes.make_process(*args, **kwargs)
    assert '\n' not in str(info.value)
  with pytest.raises(ValueError, match=r'the last in \(0, 1\]'):
    processes.DiscreteVP(np.array([0.1, 1.0, 0.1]))
