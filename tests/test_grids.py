"""Time grids and the pitfalls users hit in other libraries (issue: samplers, DESIGN §4, §6).

Each test names the pitfall it guards: duplicated or zero-length last steps on Karras grids, the
wrong previous timestep for DDPM spacings, NaN from eps-prediction at zero terminal SNR, silent
log-SNR clipping at the cosine schedule's ends, and a wrong final step to sigma = 0.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import analytic
from diffusion_jax import parameterization
from diffusion_jax import processes
from diffusion_jax import samplers

import sampler_testing as st

CONTINUOUS = ['vp_linear', 'vp_cosine', 've', 'edm', 'linear']


@pytest.mark.parametrize('grid', ['t', 'log_snr', 'karras'])
@pytest.mark.parametrize('name', CONTINUOUS)
@pytest.mark.parametrize('final', samplers.grids.FINALS)
def test_grid_is_strictly_decreasing_with_positive_noise(name, grid, final):
  proc = processes.make_process(name)
  if (name, grid, final) == ('linear', 't', 't_min'):   # t_min = 0 is data: cannot stop there
    with pytest.raises(ValueError, match="final='data'"):
      samplers.time_grid(proc, 12, grid, final=final)
    return
  g = samplers.time_grid(proc, 12, grid, final=final)
  assert g.t.shape == ((12,) if final == 'data' else (13,)) and g.steps == 12
  assert np.all(np.diff(g.t) < 0) and np.all(np.diff(g.log_snr) > 0)
  assert np.all(g.sigma > 0) and np.all(np.isfinite(g.log_snr[1:]))
  # Only 't' may start at an infinite noise level (alpha(1) = 0 of the linear interpolant).
  assert np.isfinite(g.log_snr[0]) or (grid == 't' and name == 'linear')
  assert g.to_data == (final == 'data')


def test_karras_grid_is_edm_eq5_without_duplicated_or_zero_length_last_step():
  """EDM's 18-step grid: sigma_i = (80^(1/7) + i/17 (0.002^(1/7) - 80^(1/7)))^7, then one step
  to sigma = 0. Pitfall: appending 0 to sigmas that already end in sigma_min twice, or ending
  with a zero-length step."""
  proc = processes.make_process('edm')
  i = np.arange(18)
  expected = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
  with jax.enable_x64(True):
    g = samplers.time_grid(proc, 18, 'karras', dtype=jnp.float64)
  np.testing.assert_allclose(g.sigma, expected, rtol=1e-12)
  assert len(np.unique(g.sigma)) == 18 and g.sigma[-1] == pytest.approx(0.002, rel=1e-12)
  # The 'edm' grid is the same on the EDM process; Heun on it costs 2 * 18 - 1 = 35 calls.
  np.testing.assert_allclose(samplers.time_grid(proc, 18, 'edm').sigma, expected, rtol=1e-5)
  den, count = st.counting(analytic.gaussian_denoiser(np.zeros(2), np.ones(2), proc))
  x, info = jax.jit(lambda x: samplers.heun_sample(den, proc, x, steps=18, grid='karras',
                                                   return_trajectory=True))(jnp.ones((3, 2)))
  jax.effects_barrier()
  assert info['nfe'] == 35 == count()
  steps_taken = np.abs(np.diff(np.asarray(info['trajectory']), axis=0)).max(axis=(1, 2))
  assert info['trajectory'].shape[0] == 19 and np.all(steps_taken > 0)   # no zero-length step


def test_edm_grid_outside_process_range_is_refused():
  with pytest.raises(ValueError, match="grid 'edm'"):
    samplers.time_grid(processes.make_process('ve', sigma_max=50.0), 10, 'edm')


@pytest.mark.parametrize('spacing,expected', [
    ('leading', [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]),
    ('trailing', [1000, 900, 800, 700, 600, 500, 400, 300, 200, 100]),
    ('linspace', [1000, 889, 778, 667, 556, 445, 334, 223, 112, 1]),
])
def test_previous_timestep_for_each_spacing(spacing, expected):
  """DDIM goes from each grid step n to the NEXT grid step m (then to 0, abar = 1): the update
  `x_m = sqrt(abar_m) x0 + sqrt(1 - abar_m) eps` with x0_hat = 0, eps_hat = x / sqrt(1 - abar_n)
  multiplies x by sqrt((1 - abar_m) / (1 - abar_n)), which reveals the m used. Pitfall: a
  'leading' grid whose previous step is n - T/S instead of the next grid point, or whose last
  step stops at n = 1 instead of reaching data."""
  proc = processes.DiscreteVP.from_name('linear', 1000)
  abar = np.concatenate([[1.0], proc.alphas_cumprod])

  def den(x, t, cond=None):
    n = jnp.round(t * 1000).astype(jnp.int32)
    return jnp.zeros_like(x), x / jnp.sqrt(1 - jnp.asarray(abar, x.dtype)[n])

  with jax.enable_x64(True):
    x_T = jnp.ones((1, 1), jnp.float64)
    _, info = samplers.ddim_sample(den, proc, x_T, steps=10, spacing=spacing,
                                   return_trajectory=True)
    traj = np.asarray(info['trajectory'])[:, 0, 0]
  n = np.asarray(expected)
  m = np.concatenate([n[1:], [0]])
  np.testing.assert_allclose(traj[1:] / traj[:-1], np.sqrt((1 - abar[m]) / (1 - abar[n])),
                             rtol=1e-10)
  np.testing.assert_array_equal(samplers.discrete_timesteps(1000, 10, spacing), n)
  # The same integer grid drives the continuous-time solvers on a DiscreteVP.
  np.testing.assert_allclose(samplers.time_grid(proc, 10, spacing).t, n / 1000, rtol=1e-6)


def _ztsnr_denoiser(kind, proc):
  mu, s2 = jnp.asarray([0.5, -0.5]), jnp.asarray([0.3, 0.1])
  model = analytic.optimal_model(kind, analytic.gaussian_denoiser(mu, s2, proc), proc)
  return parameterization.make_denoiser(model, proc, kind)


@pytest.mark.parametrize('sampler,kwargs', [
    (samplers.ddpm_sample, {'steps': 20}),
    (samplers.ddim_sample, {'steps': 20}),
    (samplers.euler_sample, {'steps': 20, 'grid': 't'}),
    (samplers.euler_sample, {'steps': 20, 'grid': 'trailing'}),
])
def test_eps_prediction_at_zero_terminal_snr_is_refused(sampler, kwargs):
  """alpha(1) = 0: x0 = (x - sigma eps) / alpha is 0/0. Refused with a clear error, not NaN."""
  proc = processes.DiscreteVP.from_name('linear', 1000, zero_terminal_snr=True)
  with pytest.raises(ValueError, match='zero terminal SNR'):
    sampler(_ztsnr_denoiser('eps', proc), proc, jnp.ones((2, 2)), jax.random.key(0), **kwargs)


@pytest.mark.parametrize('kind,grid', [('eps', 'log_snr'), ('eps', 'karras'), ('v', 't'),
                                       ('v', 'trailing'), ('x0', 't')])
def test_zero_terminal_snr_is_handled_without_nan(kind, grid):
  """Clipped grids start at lambda = -20 (alpha = 4.5e-5), where eps-prediction is defined;
  v- and x0-prediction can start at alpha = 0 itself (Lin et al. 2024)."""
  proc = processes.DiscreteVP.from_name('linear', 1000, zero_terminal_snr=True)
  g = samplers.time_grid(proc, 10, grid)
  assert (g.alpha[0] > 0) == (grid in ('log_snr', 'karras'))
  x, _ = samplers.euler_sample(_ztsnr_denoiser(kind, proc), proc,
                               jax.random.normal(jax.random.key(0), (64, 2)), steps=10, grid=grid)
  assert np.all(np.isfinite(np.asarray(x)))
  assert np.abs(np.asarray(x).mean(0) - [0.5, -0.5]).max() < 0.3


def test_cosine_endpoints_and_log_snr_clipping():
  """The continuous cosine schedule clips log-SNR to [logsnr_min, logsnr_max] = [-15, 15]
  (Hoogeboom et al. 2023): the grid's ends are exactly t = 1 and t = t_min with those values,
  inside the samplers' +-20 clip, so no silent clipping happens. Nichol & Dhariwal's discrete
  cosine schedule clips beta at 0.999, which caps its last log-SNR at a finite value."""
  proc = processes.make_process('vp_cosine')
  with jax.enable_x64(True):
    g = samplers.time_grid(proc, 10, 'log_snr', t_min=0.0, final='t_min', dtype=jnp.float64)
  assert (g.t[0], g.t[-1]) == (1.0, 0.0)
  np.testing.assert_allclose(g.log_snr[[0, -1]], [-15.0, 15.0], atol=1e-9)
  np.testing.assert_allclose(np.diff(g.log_snr), 3.0, atol=1e-9)        # uniform in lambda
  # Unclipped cosine (alpha(1) = 0): the grid starts at lambda = -20, stated, not at -inf.
  full = processes.make_process('vp_cosine', logsnr_min=-np.inf, logsnr_max=np.inf)
  g = samplers.time_grid(full, 10, 'log_snr', t_min=1e-4)
  assert g.log_snr[0] == pytest.approx(-20.0, abs=1e-3) and g.t[0] < 1.0
  disc = processes.DiscreteVP.from_name('cosine', 1000)
  lam_T = float(disc.log_snr(1.0))
  assert np.isfinite(lam_T) and lam_T == pytest.approx(np.log(disc.alphas_cumprod[-1] /
                                                              (1 - disc.alphas_cumprod[-1])))


@pytest.mark.parametrize('sampler', [samplers.heun_sample, samplers.euler_sample,
                                     samplers.flow_heun_sample, samplers.flow_rk4_sample])
def test_final_step_to_sigma_zero_is_the_denoised_state(sampler):
  """With final='data' the last step is to sigma = 0 and returns x0_hat at t_min from the
  state there, the exact Euler/DDIM step (EDM Alg. 2, line 8): so sampling to data with `steps`
  equals sampling to t_min with `steps - 1` on the same grid, then one denoiser call."""
  proc = processes.make_process('vp_linear')
  den = analytic.gaussian_denoiser(jnp.asarray([1.0, -1.0]), jnp.asarray([0.2, 0.5]), proc)
  x_T = jax.random.normal(jax.random.key(1), (16, 2))
  name = 'karras' if sampler in (samplers.heun_sample, samplers.euler_sample) else 't'
  x_data, info = sampler(den, proc, x_T, steps=8, grid=name)
  x_tmin, _ = sampler(den, proc, x_T, steps=7, final='t_min', grid=name)
  g = samplers.time_grid(proc, 8, name)
  np.testing.assert_allclose(x_data, den(x_tmin, g.t[-1])[0], rtol=1e-6, atol=1e-6)
  assert np.all(np.isfinite(np.asarray(x_data)))


def test_grid_errors_are_one_line():
  proc = processes.make_process('vp_linear')
  with pytest.raises(ValueError, match="unknown time grid 'uniform'"):
    samplers.time_grid(proc, 10, 'uniform')
  with pytest.raises(ValueError, match='needs a DiscreteVP'):
    samplers.time_grid(proc, 10, 'trailing')
  with pytest.raises(ValueError, match='steps=0'):
    samplers.time_grid(proc, 0)
  with pytest.raises(ValueError, match='t_min'):
    samplers.time_grid(proc, 10, t_min=1.0)


@pytest.mark.parametrize('sampler', ['dpm_solver_pp_2m', 'dpm_solver_pp_2m_sde', 'heun'])
def test_explicit_grid_reproduces_the_named_grid_step_for_step(sampler):
  """An explicit sequence of times (a stored schedule, another library's timesteps) drives any
  continuous sampler: the named grid's own times, given explicitly, give the same samples."""
  proc = processes.make_process('vp_cosine')
  den = analytic.gaussian_denoiser(jnp.asarray([1.0, -1.0]), jnp.asarray([0.2, 0.5]), proc)
  x_T = jax.random.normal(jax.random.key(1), (8, 2))
  fn, key = samplers.SAMPLERS[sampler], jax.random.key(2)
  named, _ = fn(den, proc, x_T, key, steps=6, grid='karras')
  times = tuple(float(t) for t in samplers.time_grid(proc, 6, 'karras').t)
  explicit, info = fn(den, proc, x_T, key, steps=6, grid=times)
  np.testing.assert_array_equal(np.asarray(explicit), np.asarray(named))
  # A different explicit grid is a different path (the times are really used).
  other, _ = fn(den, proc, x_T, key, steps=6, grid=tuple(np.linspace(0.98, 0.05, 6)))
  assert np.max(np.abs(np.asarray(other) - np.asarray(named))) > 1e-4


def test_explicit_grid_errors_are_one_line():
  proc = processes.make_process('vp_cosine')
  cases = [((0.5, 0.9, 0.1), 'strictly decreasing'), ((0.9, 0.5), 'visits 3 noise levels'),
           ((1.5, 0.5, 0.1), r'outside \[t_min, t_max\]'), ((0.9, np.nan, 0.1), 'finite times')]
  for times, match in cases:
    with pytest.raises(ValueError, match=match) as e:
      samplers.time_grid(proc, 3, times)
    assert '\n' not in str(e.value)
  assert samplers.time_grid(proc, 2, (0.9, 0.5, 0.1), final='t_min').steps == 2
