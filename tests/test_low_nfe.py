"""Few-step defaults (issue 24, item 1): the 'auto' grid, lower-order final steps, the warning
when a sampler stops short of the data, and the flow solvers' refusal of a DiscreteVP.

The accuracy claim is checked on the sampler benchmark's own problem
(`experiments/benchmark_samplers.py`): a 2-D mixture of three Gaussians under DDPM's linear
schedule, its exact denoiser, float64, 2,048 prior draws from key 0; the error is the RMS
distance to the probability-flow ODE's endpoint from the same draw.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import analytic
from diffusion_jax import processes
from diffusion_jax import samplers
from diffusion_jax.samplers import defaults
from diffusion_jax.samplers import dpm_solver
from diffusion_jax.samplers import unipc

PROC = processes.DiscreteVP.from_name('linear', 1000)
W = np.array([0.5, 0.3, 0.2])
MEANS = np.array([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.2]])
S2 = np.full((3, 2), 0.04)


def _lam(t):
  return np.asarray(PROC.log_snr(jnp.asarray(t, jnp.float64)))


def test_auto_grid_is_the_rule_written_out():
  """5 steps: t_max, then 4 times uniform in log-SNR from -4 to 1.5 + 0.4 * 5 = 3.5; with
  final='t_min', or from 20 steps on, it is the uniform log-SNR grid; a given t_min is kept."""
  with jax.enable_x64(True):
    g = samplers.time_grid(PROC, 5, 'log_snr', dtype=jnp.float64)   # for the end points
    t = defaults.auto_times(PROC, 5, dtype=jnp.float64)
    assert t.shape == (5,) and t[0] == 1.0
    lam = _lam(t[1:])
    np.testing.assert_allclose(lam, [-4.0, -4.0 + 7.5 / 3, -4.0 + 15 / 3, 3.5], atol=1e-9)
    # final='t_min' and >= 20 steps: the uniform log-SNR grid from lambda(1) to lambda(1 / T).
    for steps, final in ((5, 't_min'), (20, 'data')):
      t = defaults.auto_times(PROC, steps, final=final, dtype=jnp.float64)
      n = steps + (final == 't_min')
      lam = _lam(t)
      np.testing.assert_allclose(lam, np.linspace(_lam(1.0), _lam(1e-3), n), atol=1e-9)
    assert g.t[0] == 1.0
    # An explicit t_min is the end point: 3 times from -4 up to lambda(0.05).
    t = defaults.auto_times(PROC, 4, t_min=0.05, dtype=jnp.float64)
    assert t[-1] == 0.05
    np.testing.assert_allclose(_lam(t[1:]), np.linspace(-4.0, _lam(0.05), 3),
                               atol=1e-9)


def test_auto_grid_without_a_high_noise_start_has_no_jump():
  """A run started below log-SNR -4 (SDEdit at t_max = 0.3: lambda ~ 0.4 on this schedule)
  has nothing to skip: uniform log-SNR from lambda(t_max) to the rule's end 1.5 + 0.4 * 6."""
  with jax.enable_x64(True):
    t = defaults.auto_times(PROC, 6, t_max=0.3, dtype=jnp.float64)
    assert t[0] == 0.3
    np.testing.assert_allclose(_lam(t), np.linspace(_lam(0.3), 3.9, 6), atol=1e-9)


def test_step_orders_written_out():
  np.testing.assert_array_equal(dpm_solver.step_orders(6, 3, False), [1, 2, 3, 3, 3, 3])
  np.testing.assert_array_equal(dpm_solver.step_orders(6, 3, True), [1, 2, 3, 3, 2, 1])
  np.testing.assert_array_equal(dpm_solver.step_orders(2, 2, True), [1, 1])


def test_lower_order_final_makes_the_last_step_ddim():
  """With lower_order_final the update into the last grid time is DPM-Solver++(1), i.e. DDIM
  in data form: x_next = (sigma' / sigma) x + alpha' (1 - e^(-h)) x0_hat(x) (Lu et al. 2022b,
  Eq. 9 with a constant x0_hat), written out here from the trajectory's last two states."""
  with jax.enable_x64(True):
    den = analytic.gmm_denoiser(W, MEANS, S2, PROC)
    x_T = jax.random.normal(jax.random.key(0), (64, 2), jnp.float64)
    x, info = samplers.dpm_solver_pp_3m_sample(den, PROC, x_T, steps=6, grid='log_snr',
                                               final='t_min', lower_order_final=True,
                                               return_trajectory=True)
    g = samplers.time_grid(PROC, 6, 'log_snr', final='t_min', dtype=jnp.float64)
    prev = info['trajectory'][-2]
    h = 0.5 * (g.log_snr[-1] - g.log_snr[-2])
    ddim = g.sigma[-1] / g.sigma[-2] * prev + g.alpha[-1] * (1 - np.exp(-h)) * den(
        prev, g.t[-2])[0]
    np.testing.assert_allclose(x, ddim, rtol=1e-10, atol=1e-10)
    y, _ = samplers.dpm_solver_pp_3m_sample(den, PROC, x_T, steps=6, grid='log_snr',
                                            final='t_min')
    assert float(jnp.max(jnp.abs(y - x))) > 1e-4    # the option changes the result
    # UniPC evaluates its model at predicted points (not in the trajectory), so its last
    # predictor row is checked instead: DDIM's coefficients, no history term.
    (ap, wp), _ = unipc.unipc_coefficients(g, 3, 'bh2', lower_order_final=True)
    np.testing.assert_allclose(ap[-1], g.sigma[-1] / g.sigma[-2], rtol=1e-12)
    np.testing.assert_allclose(wp[-1], [g.alpha[-1] * (1 - np.exp(-h)), 0.0, 0.0], rtol=1e-12,
                               atol=1e-15)


@pytest.fixture(scope='module')
def benchmark_problem():
  with jax.enable_x64(True):
    den = analytic.gmm_denoiser(W, MEANS, S2, PROC)
    x_T = jax.random.normal(jax.random.key(0), (2048, 2), jnp.float64)
    # The exact ODE endpoint to ~1e-7: DPM-Solver++(3M) on 400 uniform log-SNR steps (its
    # 200-step result differs from it by < 1e-6, far below the errors compared here, ~1e-2).
    ref, _ = jax.jit(lambda x: samplers.dpm_solver_pp_3m_sample(den, PROC, x, steps=400,
                                                                grid='log_snr'))(x_T)
    return den, x_T, ref


# The old defaults (before 'auto'): uniform log-SNR to t_min = 1 / T, no lower-order final.
@pytest.mark.parametrize('name', ['dpm_solver_pp_2m',
                                  pytest.param('dpm_solver_pp_3m', marks=pytest.mark.slow),
                                  pytest.param('unipc_bh2', marks=pytest.mark.slow)])
def test_no_option_default_halves_the_old_default_error_at_5_and_10_nfe(benchmark_problem,
                                                                        name):
  den, x_T, ref = benchmark_problem
  fn = samplers.SAMPLERS[name]
  with jax.enable_x64(True):
    for nfe in (5, 10):          # 1 call per step, the last being the step to data
      err_new = float(jnp.sqrt(jnp.mean(jnp.sum((fn(den, PROC, x_T, steps=nfe)[0] - ref) ** 2,
                                                -1))))
      err_old = float(jnp.sqrt(jnp.mean(jnp.sum(
          (fn(den, PROC, x_T, steps=nfe, grid='log_snr')[0] - ref) ** 2, -1))))
      assert err_new <= 0.5 * err_old, (name, nfe, err_new, err_old)


def test_flow_solvers_refuse_a_discrete_process():
  den = analytic.gaussian_denoiser(jnp.zeros(2), jnp.ones(2), PROC)
  with pytest.raises(ValueError, match=r'flow_sample\(rk4\).*DiscreteVP.*first order') as e:
    samplers.flow_rk4_sample(den, PROC, jnp.ones((2, 2)), steps=4)
  assert '\n' not in str(e.value)


def test_warns_when_stopping_short_of_the_data():
  """'trailing' with 10 steps and final='t_min' stops at t = 0.1, not at t_min = 1e-3."""
  den = analytic.gaussian_denoiser(jnp.zeros(2), jnp.ones(2), PROC)
  with pytest.warns(UserWarning, match=r"stops at t = 0.1 .*still carries noise"):
    samplers.euler_sample(den, PROC, jnp.ones((2, 2)), steps=9, grid='trailing', final='t_min')
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    samplers.euler_sample(den, PROC, jnp.ones((2, 2)), steps=9, grid='log_snr', final='t_min')
    samplers.euler_sample(den, PROC, jnp.ones((2, 2)), steps=9, grid='trailing')


def test_a_stored_schedule_is_a_grid(tmp_path):
  """`grid=<path>.json` samples with the schedule's times (what a config's
  `sample.options.grid` can name); one for another step count is refused naming the file."""
  from diffusion_jax.samplers import optimized_grids
  times = (1.0, 0.3, 0.05)
  sched = optimized_grids.Schedule(times, 'dp', 'dpm_solver_pp_2m', 3,
                                   optimized_grids.fingerprint(PROC), 'rms', 1.0, 0.5, {})
  path = str(tmp_path / 'schedule.json')
  optimized_grids.save_schedule(path, sched)
  den = analytic.gaussian_denoiser(jnp.zeros(2), jnp.ones(2), PROC)
  x_T = jnp.ones((2, 2))
  a, _ = samplers.dpm_solver_pp_2m_sample(den, PROC, x_T, steps=3, grid=path)
  b, _ = samplers.dpm_solver_pp_2m_sample(den, PROC, x_T, steps=3, grid=times)
  np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match=r'schedule .*schedule.json: has 3 times for steps=3, '
                                       r'not steps=4'):
    samplers.dpm_solver_pp_2m_sample(den, PROC, x_T, steps=4, grid=path)


def _heun_written_out(den, x, t):
  """Karras et al. (2022, Alg. 2) without churn in `y = x / alpha`, `s = sigma / alpha`, on the
  times `t`, the first interval an Euler step, then `x0_hat` at the last time (written out from
  the denoiser and the process, not through the sampler)."""
  a = np.asarray(PROC.alpha(jnp.asarray(t)))
  s = np.asarray(PROC.sigma(jnp.asarray(t))) / a
  traj = [x]
  for i in range(len(t) - 1):
    d1 = den(x, t[i])[1]
    y = x / a[i] + (s[i + 1] - s[i]) * d1
    if i > 0:                                   # Heun: the trapezoid with the slope at the end
      d2 = den(a[i + 1] * y, t[i + 1])[1]
      y = x / a[i] + (s[i + 1] - s[i]) * 0.5 * (d1 + d2)
    x = a[i + 1] * y
    traj.append(x)
  return den(x, t[-1])[0], traj


def test_heun_auto_is_one_euler_jump_then_heun_written_out():
  """Heun's default below 20 steps: t = 1, then uniform log-SNR from -3 (-4 from 15 steps) to
  steps - 2 (5 steps: -3, -1, 1, 3); the first step Euler, the rest Heun, then x0_hat: 2 * 5 - 2
  = 8 calls. From 20 steps on, and with final='t_min', it is the Karras grid, all Heun."""
  with jax.enable_x64(True):
    den = analytic.gmm_denoiser(W, MEANS, S2, PROC)
    x_T = jax.random.normal(jax.random.key(1), (32, 2), jnp.float64)
    t = defaults.auto_times(PROC, 5, rule='heun')
    assert t[0] == 1.0
    np.testing.assert_allclose(_lam(t[1:]), [-3.0, -1.0, 1.0, 3.0], atol=1e-9)
    # From 15 steps the jump is to -4, and the end 15 - 2 = 13 is past lambda(t_min) ~ 9.21.
    t15 = defaults.auto_times(PROC, 15, rule='heun')
    assert t15[0] == 1.0 and t15[-1] == PROC.t_min
    np.testing.assert_allclose(_lam(t15[1:]), np.linspace(-4.0, _lam(PROC.t_min), 14), atol=1e-9)
    x, info = samplers.heun_sample(den, PROC, x_T, steps=5, return_trajectory=True)
    assert info['nfe'] == 8
    want, traj = _heun_written_out(den, x_T, t)
    np.testing.assert_allclose(info['trajectory'][1], traj[1], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(x, want, rtol=1e-10, atol=1e-10)
    for steps, final in ((20, 'data'), (4, 't_min')):
      a = samplers.heun_sample(den, PROC, x_T, steps=steps, final=final)
      b = samplers.heun_sample(den, PROC, x_T, steps=steps, final=final, grid='karras')
      np.testing.assert_array_equal(a[0], b[0])
      assert a[1]['nfe'] == b[1]['nfe'] == 2 * steps - (final == 'data')


def test_dpm_solver_3_auto_takes_the_jump_as_ddim_up_to_3_steps():
  """Singlestep DPM-Solver-3 on 'auto' with 3 grid times (t = 1, log-SNR -4, 2.7): the jump is
  one DDIM step, x_1 = alpha_1 x0_hat + sigma_1 eps_hat at t = 1 (Song et al. 2021, Eq. 12), so
  1 + 3 + 1 = 5 calls; from 4 grid times on every step is third order (3 * 3 + 1 = 10 calls),
  as on the same grid given explicitly."""
  with jax.enable_x64(True):
    den = analytic.gmm_denoiser(W, MEANS, S2, PROC)
    x_T = jax.random.normal(jax.random.key(1), (32, 2), jnp.float64)
    x, info = samplers.dpm_solver_3_sample(den, PROC, x_T, steps=3, return_trajectory=True)
    assert info['nfe'] == 5
    t1 = defaults.auto_times(PROC, 3)[1]
    np.testing.assert_allclose(_lam(t1), -4.0, atol=1e-9)
    x0, eps = den(x_T, 1.0)
    np.testing.assert_allclose(info['trajectory'][1], PROC.alpha(t1) * x0 + PROC.sigma(t1) * eps,
                               rtol=1e-10, atol=1e-10)
    a = samplers.dpm_solver_3_sample(den, PROC, x_T, steps=4)
    b = samplers.dpm_solver_3_sample(den, PROC, x_T, steps=4,
                                     grid=tuple(defaults.auto_times(PROC, 4)))
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1]['nfe'] == b[1]['nfe'] == 10


# The bar for the staged samplers, with the old defaults' errors and the best hand-picked old
# options (c6cd45a: every grid x t_min x Karras rho of the benchmark's sweep) written out, as
# measured on the benchmark's draws: (name, target NFE, steps, old default, best hand-picked).
# Heun's old default is Karras (rho 7) at 3 / 5 steps (5 / 9 calls); its best hand-picked are
# 'trailing' (3 steps) and 't' with t_min = 0.08 (5 steps). DPM-Solver-3's old default is
# uniform log-SNR (2 / 4 steps); its hand-picked bars are the (0.86 / 0.16).
STAGED_BARS = [('heun', 5, 3, 4.325, 0.441), ('heun', 10, 6, 1.832, 0.207),
               pytest.param('dpm_solver_3', 5, 3, 36.5, 0.86, marks=pytest.mark.slow),
               pytest.param('dpm_solver_3', 10, 4, 0.375, 0.16, marks=pytest.mark.slow)]


@pytest.mark.parametrize('name,nfe,steps,old,hand', STAGED_BARS)
def test_staged_samplers_meet_the_few_step_bar(benchmark_problem, name, nfe, steps, old, hand):
  """The no-option default at the most steps whose NFE fits: at most half the old default's
  error and no more than the best hand-picked old option's (the reference here is DPM-Solver++
  3M on 400 steps; the benchmark's Heun on 4,000 differs from it by < 1e-6)."""
  den, x_T, ref = benchmark_problem
  fn = samplers.SAMPLERS[name]
  with jax.enable_x64(True):
    x, info = fn(den, PROC, x_T, steps=steps)
    assert info['nfe'] <= nfe
    err = float(jnp.sqrt(jnp.mean(jnp.sum((x - ref) ** 2, -1))))
    assert err <= min(0.5 * old, hand), (name, nfe, err)
