"""Adaptive PF-ODE sampling and PF-ODE log-likelihood against closed forms (DESIGN §6).

* `adaptive_sample` on Gaussian data with the exact denoiser lands on the closed-form PF-ODE
  solution within a multiple of rtol, converging as rtol tightens, and its data-dependent NFE
  equals the denoiser calls that really ran (host-callback count), rejected steps included.
* `log_likelihood` on a 2-D Gaussian mixture with the exact denoiser equals the mixture
  marginal's exact log-density at t_min (with the exact marginal at t_max as prior), on VP,
  VE, EDM and the linear interpolant; the Hutchinson estimate is unbiased.
* Bits/dim of dequantized 8-bit data: known densities give known numbers.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import analytic
from diffusion_jax import elbo
from diffusion_jax import parameterization
from diffusion_jax import processes
from diffusion_jax.samplers import adaptive
from diffusion_jax.samplers import likelihood

import sampler_testing as st

# A 2-D mixture of two diagonal Gaussians.
W = np.array([0.3, 0.7])
M = np.array([[1.0, -0.5], [-1.0, 0.8]])
S2 = np.array([[0.1, 0.2], [0.3, 0.05]])


def gmm_log_density(x, t, process):
  """Exact `log p_t(x)`: the mixture with means `alpha m_k`, variances `alpha² s_k² + sigma²`."""
  t = jnp.asarray(t, x.dtype)
  a, s = process.alpha(t), process.sigma(t)
  r2 = a**2 * jnp.asarray(S2) + s**2                                        # [K, D]
  log_k = -0.5 * jnp.sum((x[:, None] - a * jnp.asarray(M)) ** 2 / r2 + jnp.log(2 * math.pi * r2),
                         axis=-1)
  return jax.scipy.special.logsumexp(jnp.log(jnp.asarray(W)) + log_k, axis=-1)


def gmm_marginal_sample(key, n, process, t):
  k_c, k_x, k_e = jax.random.split(key, 3)
  c = jax.random.choice(k_c, len(W), (n,), p=jnp.asarray(W))
  x0 = jnp.asarray(M)[c] + jnp.sqrt(jnp.asarray(S2)[c]) * jax.random.normal(k_x, (n, 2))
  t = jnp.asarray(t, x0.dtype)
  return process.alpha(t) * x0 + process.sigma(t) * jax.random.normal(k_e, x0.shape)


def _run_counted(fn):
  """Runs `fn()` and waits for its host callbacks, so that `count()` is complete."""
  out = fn()
  jax.block_until_ready(out)
  jax.effects_barrier()
  return out


# --- adaptive sampler ----------------------------------------------------------------------


def test_adaptive_endpoint_converges_with_rtol():
  """VP linear, Gaussian data, float64: |x(t_min) - exact| <= 30 rtol (a step's local error is
  <= rtol (1 + |x|), |x| <= 4, over ~10-40 steps), falling and NFE rising as rtol tightens."""
  with jax.enable_x64(True):
    proc = processes.VPLinear()
    mu, s2 = jnp.asarray(st.MU), jnp.asarray(st.S2)
    den = analytic.gaussian_denoiser(mu, s2, proc)
    x_T = proc.prior_sample(jax.random.key(0), (32, 3), jnp.float64)
    exact = analytic.gaussian_pf_ode_solution(x_T, 1.0, proc.t_min, mu, s2, proc)
    run = jax.jit(lambda x, tol: adaptive.adaptive_sample(den, proc, x, rtol=tol, atol=tol,
                                                          final='t_min'))
    tols = [1e-4, 1e-6, 1e-8]
    errors, nfes = [], []
    for tol in tols:
      x, info = run(x_T, tol)
      errors.append(float(jnp.max(jnp.abs(x - exact))))
      nfes.append(int(info['nfe']))
      assert bool(info['success'])
  # Measured: errors 7.7e-5, 1.1e-5, 4.2e-9; NFE 62, 110, 218 (tsit5).
  assert all(e <= 30 * tol for e, tol in zip(errors, tols, strict=True)), (errors, tols)
  assert errors[0] > errors[1] > errors[2], errors
  assert nfes[0] < nfes[1] < nfes[2], nfes


@pytest.mark.parametrize('solver,final,dt0', [
    ('tsit5', 'data', 0.9),     # FSAL; a too-large first step: rejected first attempts
    ('heun', 't_min', None),    # not FSAL: every stage each step
    ('dopri8', 'data', None),   # FSAL, 14 stages; with the trajectory
])
def test_adaptive_nfe_is_exact(solver, final, dt0):
  proc = processes.VPLinear()
  den, count = st.counting(analytic.gaussian_denoiser(st.MU, st.S2, proc))
  x_T = proc.prior_sample(jax.random.key(1), (16, 3))
  traj = solver == 'dopri8'
  # `steps` (the common signature) is accepted and ignored.
  fn = jax.jit(lambda x: adaptive.adaptive_sample(den, proc, x, jax.random.key(0), steps=7,
                                                  solver=solver, rtol=1e-4, atol=1e-4,
                                                  final=final, dt0=dt0, return_trajectory=traj))
  x, info = _run_counted(lambda: fn(x_T))
  calls = count()
  assert int(info['nfe']) == int(info['denoiser_calls']) == calls > 0, (int(info['nfe']), calls)
  stages, fsal = adaptive.stage_cost(adaptive.make_solver(solver))
  tried = int(info['num_steps']) + int(info['num_rejected_steps'])
  assert calls == (1 if fsal or dt0 is None else 0) + (dt0 is None) + (final == 'data') + \
      tried * (stages - fsal)
  if dt0 is not None:
    assert int(info['num_rejected_steps']) > 0   # the first step was retried, at no extra f0
  assert np.all(np.isfinite(np.asarray(x)))
  if traj:
    n = int(info['num_steps'])
    rows = np.asarray(info['trajectory'])
    assert int(info['trajectory_length']) == n + 2
    np.testing.assert_array_equal(rows[0], np.asarray(x_T))
    np.testing.assert_array_equal(rows[n + 1], np.asarray(x))
    assert np.all(np.isfinite(rows[:n + 2])) and np.all(np.isinf(rows[n + 2:]))
    ts = np.asarray(info['trajectory_t'])
    assert ts[0] == 1.0 and np.all(np.diff(ts[:n + 1]) < 0)
    np.testing.assert_allclose(ts[n], proc.t_min, rtol=1e-6)
    # final='data': the last row is x0_hat at t_min of the ODE state there (the step to data).
    x0_hat, _ = analytic.gaussian_denoiser(st.MU, st.S2, proc)(
        jnp.asarray(rows[n]), jnp.asarray(proc.t_min, jnp.float32))
    np.testing.assert_allclose(rows[n + 1], x0_hat, rtol=1e-5, atol=1e-6)


def test_adaptive_flow_matching_velocity_model_to_t0():
  """Linear interpolant with a velocity-kind model (the flow-matching ODE), t_min = 0 where
  sigma = 0: the ODE ends on data (no extra call) at the exact `mu + s z` to ~rtol."""
  with jax.enable_x64(True):
    proc = processes.LinearInterpolant()
    mu, s2 = jnp.asarray(st.MU), jnp.asarray(st.S2)
    exact_den = analytic.gaussian_denoiser(mu, s2, proc)
    model = analytic.optimal_model('velocity', exact_den, proc)
    den, count = st.counting(parameterization.make_denoiser(model, proc, 'velocity'))
    x_T = proc.prior_sample(jax.random.key(2), (32, 3), jnp.float64)
    fn = jax.jit(lambda x: adaptive.adaptive_sample(den, proc, x, rtol=1e-7, atol=1e-7))
    x, info = _run_counted(lambda: fn(x_T))
    exact = mu + jnp.sqrt(s2) * x_T          # z = x_T at t = 1 (alpha = 0, sigma = 1)
    err = float(jnp.max(jnp.abs(x - exact)))
    assert err < 1e-5, err                    # measured ~1e-7
    # No step to data: f0, the starting-step heuristic and 6 new stages per tried Tsit5 step.
    stages, fsal = adaptive.stage_cost(adaptive.make_solver('tsit5'))
    tried = int(info['num_steps']) + int(info['num_rejected_steps'])
    assert int(info['nfe']) == count() == 2 + tried * (stages - fsal)
    x0_den = parameterization.make_denoiser(
        analytic.optimal_model('x0', exact_den, proc), proc, 'x0')
    with pytest.raises(ValueError, match='sigma'):
      adaptive.adaptive_sample(x0_den, proc, x_T)


def test_adaptive_rejects_bad_options():
  proc = processes.VPLinear()
  den = analytic.gaussian_denoiser(st.MU, st.S2, proc)
  x = jnp.ones((2, 3))
  with pytest.raises(ValueError, match='unknown adaptive solver'):
    adaptive.adaptive_sample(den, proc, x, solver='euler')
  with pytest.raises(ValueError, match='final'):
    adaptive.adaptive_sample(den, proc, x, final='t')
  with pytest.raises(ValueError, match='t_min'):
    adaptive.adaptive_sample(den, proc, x, t_min=0.5, t_max=0.4)


# --- log-likelihood ------------------------------------------------------------------------

# (process, t_min, max |default-prior logp - exact logp| allowed): the default prior
# N(0, prior_std²) differs from the marginal at t = 1 by its mean alpha(1) m_k and variance.
LIKELIHOOD_CASES = {
    'vp_linear': (processes.VPLinear(), 1e-3, 0.02),    # measured 0.0096 (alpha(1) = 6.6e-3)
    've': (processes.VE(), 1e-5, 0.05),                 # measured 0.028 (mean m_k / 50)
    'edm': (processes.EDM(), None, 0.05),               # measured 0.018 (sigma_max = 80)
    'linear': (processes.LinearInterpolant(), 1e-3, 0.0),  # exact: alpha(1) = 0
}


@pytest.mark.parametrize('name', sorted(LIKELIHOOD_CASES))
def test_exact_trace_log_likelihood_equals_gmm_density(name):
  """Exact trace, rtol = atol = 1e-6, float64: |logp - exact| <= 20 rtol (measured 2-6 rtol at
  rtol = 1e-5). The same solve with the default prior differs by the prior mismatch only."""
  proc, t_min, prior_gap = LIKELIHOOD_CASES[name]
  tol = 1e-6
  with jax.enable_x64(True):
    t_min = float(proc.t_min if t_min is None else t_min)
    den, count = st.counting(analytic.gmm_denoiser(W, M, S2, proc))
    x = gmm_marginal_sample(jax.random.key(3), 16, proc, t_min)
    fn = jax.jit(lambda x: likelihood.log_likelihood(den, proc, x, t_min=t_min, rtol=tol,
                                                     atol=tol))
    logp_default, info = _run_counted(lambda: fn(x))
    exact = gmm_log_density(x, t_min, proc)
    logp = gmm_log_density(info['x_prior'], 1.0, proc) + info['delta_logp']
    err = float(jnp.max(jnp.abs(logp - exact)))
    gap = float(jnp.max(jnp.abs(logp_default - exact)))
    nfe, products = int(info['nfe']), int(info['products_per_eval'])
  assert err <= 20 * tol, (name, err)
  assert gap <= prior_gap + 20 * tol, (name, gap)
  assert nfe == count() > 0
  assert products == 2


@pytest.mark.parametrize('probe,num_probes', [
    ('rademacher', 1), pytest.param('gaussian', 2, marks=pytest.mark.slow)])
def test_hutchinson_is_unbiased(probe, num_probes):
  """4 points x 512 copies, each copy with its own fixed probes (one batched solve): the mean
  of the Hutchinson estimates lies within 4 standard errors of the exact-trace value (measured
  |z| <= 1.5; per-copy std 0.1-2.3 nats for one Rademacher probe, ~2-3 for a Gaussian one)."""
  with jax.enable_x64(True):
    proc = processes.VPLinear()
    t_min, copies, tol = 1e-3, 512, 1e-5
    den, count = st.counting(analytic.gmm_denoiser(W, M, S2, proc))
    pts = gmm_marginal_sample(jax.random.key(4), 4, proc, t_min)
    exact, _ = jax.jit(lambda x: likelihood.log_likelihood(den, proc, x, t_min=t_min, rtol=tol,
                                                           atol=tol))(pts)
    reps = jnp.repeat(pts, copies, axis=0)
    count_before = count()
    fn = jax.jit(lambda x, k: likelihood.log_likelihood(
        den, proc, x, k, trace='hutchinson', num_probes=num_probes, probe=probe, t_min=t_min,
        rtol=tol, atol=tol))
    est, info = _run_counted(lambda: fn(reps, jax.random.key(5)))
    assert int(info['nfe']) == count() - count_before
    assert int(info['products_per_eval']) == num_probes
  est = np.asarray(est).reshape(4, copies)
  mean, se = est.mean(axis=1), est.std(axis=1, ddof=1) / math.sqrt(copies)
  assert np.all(est.std(axis=1) > 1e-3)                 # the probes do make a difference
  np.testing.assert_array_less(np.abs(mean - np.asarray(exact)), 4 * se + 1e-4)


def test_likelihood_rejects_bad_options():
  proc = processes.VPLinear()
  den = analytic.gmm_denoiser(W, M, S2, proc)
  x = jnp.zeros((2, 2))
  with pytest.raises(ValueError, match='trace'):
    likelihood.log_likelihood(den, proc, x, trace='skilling')
  with pytest.raises(ValueError, match='key'):
    likelihood.log_likelihood(den, proc, x, trace='hutchinson')
  with pytest.raises(ValueError, match='probe'):
    likelihood.log_likelihood(den, proc, x, jax.random.key(0), trace='hutchinson',
                              probe='sphere')


# --- bits per dimension --------------------------------------------------------------------


def test_dequantize_lands_in_the_cell():
  k = jax.random.randint(jax.random.key(6), (64, 4, 4, 3), 0, 256).astype(jnp.uint8)
  for lo, hi in [(-1.0, 1.0), (0.0, 1.0)]:
    x = likelihood.dequantize(jax.random.key(7), k, data_range=(lo, hi))
    cell = np.floor((np.asarray(x, np.float64) - lo) * 256 / (hi - lo))
    np.testing.assert_array_equal(cell, np.asarray(k))
    u = (np.asarray(x, np.float64) - lo) * 256 / (hi - lo) - np.asarray(k)
    assert abs(u.mean() - 0.5) < 0.02 and abs(u.var() - 1 / 12) < 0.01


@pytest.mark.parametrize('data_range', [(-1.0, 1.0), (0.0, 1.0)])
def test_bits_per_dim_of_known_densities(data_range):
  """Uniform over [lo, hi]^D costs 8 bits/dim (256 equally likely values); uniform on one
  dequantization cell costs 0 (the point mass on that integer); in units agreeing with
  `elbo.bits_per_dim` (log_scale = log(256 / (hi - lo)), log 128 for [-1, 1])."""
  lo, hi = data_range
  d = 3072
  width = hi - lo
  uniform = jnp.full((5,), -d * math.log(width))
  cell = jnp.full((5,), d * math.log(256 / width))
  np.testing.assert_allclose(likelihood.nll_bits_per_dim(uniform, d, data_range=data_range),
                             8.0, rtol=1e-6)
  np.testing.assert_allclose(likelihood.nll_bits_per_dim(cell, d, data_range=data_range), 0.0,
                             atol=1e-5)
  logp = jnp.asarray([-1234.5, 321.0])
  np.testing.assert_allclose(
      likelihood.nll_bits_per_dim(logp, d, data_range=data_range),
      elbo.bits_per_dim(-logp, d, log_scale=math.log(256 / width)), rtol=1e-6)
  if data_range == (-1.0, 1.0):   # elbo's k / 127.5 - 1 scaling: 0.0056 bits/dim lower
    gap = (likelihood.nll_bits_per_dim(logp, d)
           - elbo.bits_per_dim(-logp, d, log_scale=elbo.LOG_127_5))
    np.testing.assert_allclose(gap, math.log2(128 / 127.5), atol=1e-6)


def test_bits_per_dim_end_to_end_gaussian():
  """`bits_per_dim` of 8-bit data under the PF-ODE of Gaussian data (exact denoiser, exact
  prior) equals the closed-form bits/dim of the same dequantized points."""
  with jax.enable_x64(True):
    proc = processes.VPLinear()
    t_min = 1e-3
    mu, s2 = jnp.asarray([0.2, -0.3, 0.1]), jnp.asarray([0.3, 0.2, 0.4])
    den = analytic.gaussian_denoiser(mu, s2, proc)

    def marginal_logp(x, t):
      t = jnp.asarray(t, x.dtype)
      var = proc.alpha(t) ** 2 * s2 + proc.sigma(t) ** 2
      return -0.5 * jnp.sum((x - proc.alpha(t) * mu) ** 2 / var + jnp.log(2 * math.pi * var), -1)

    k = jax.random.randint(jax.random.key(8), (8, 3), 60, 200).astype(jnp.uint8)
    key = jax.random.key(9)
    bpd, _ = jax.jit(lambda k, key: likelihood.bits_per_dim(
        den, proc, k, key, dtype=jnp.float64, t_min=t_min, rtol=1e-7, atol=1e-7,
        prior_logp=lambda z: marginal_logp(z, 1.0)))(k, key)
    x = likelihood.dequantize(jax.random.split(key)[0], k, dtype=jnp.float64)
    expected = likelihood.nll_bits_per_dim(marginal_logp(x, t_min), 3)
  np.testing.assert_allclose(bpd, expected, atol=1e-5)
