"""Reflow (Liu et al. 2022) against closed forms on Gaussian data N(mu, diag(s²)).

On the linear interpolant the exact probability-flow ODE maps the noise z (t = 1) to
`x0 = mu + s z` (affine; `gaussian_pf_ode_solution`). The 2-rectified flow's coupling is
therefore `(z, mu + s z)` and its interpolant `x_t = (1 - t)(mu + s z) + t z` is, for each t,
an invertible affine function of z: the conditional velocity is exact, `v*(x, t) = (1 - s) z -
mu` with `z = (x - (1 - t) mu) / ((1 - t) s + t)`, so the reflow loss has minimum 0 and the
reflowed flow is straight (one Euler step is exact). Written out here, not through the module.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import analytic
from diffusion_jax import parameterization as param
from diffusion_jax import processes
from diffusion_jax import samplers
from diffusion_jax.distill import reflow

MU, S2 = np.array([0.7, -1.3]), np.array([0.25, 2.0])
S = np.sqrt(S2)
# A fine RK4 solve of the teacher's ODE (32 steps on the uniform t grid down to t = 1e-8, then
# x0_hat): its error against the closed form, measured 7e-8 (1.5e-6 at 16 steps: order 4), is
# what separates the coupling from mu + s z; the tolerances below are set above it.
RK4 = dict(teacher_sampler='flow_rk4', teacher_steps=32,
           teacher_options=dict(grid='t', t_min=1e-8))


def _v_star(x, t):
  """The 2-rectified flow's exact velocity for Gaussian data (module docstring)."""
  t = jnp.asarray(t)[:, None]
  z = (x - (1 - t) * MU) / ((1 - t) * S + t)
  return (1 - S) * z - MU


def test_coupling_is_the_exact_affine_ode_map():
  process = processes.PROCESSES['linear']()
  with jax.enable_x64(True):
    teacher = analytic.gaussian_denoiser(MU, S2, process)
    z = jax.random.normal(jax.random.key(0), (16, 2), jnp.float64)
    x0 = reflow.reflow_coupling(teacher, process, z, steps=RK4['teacher_steps'],
                                sampler=RK4['teacher_sampler'], options=RK4['teacher_options'])
    np.testing.assert_allclose(np.asarray(x0), MU + S * np.asarray(z), atol=1e-6, rtol=0)
    np.testing.assert_allclose(
        np.asarray(x0), np.asarray(analytic.gaussian_pf_ode_solution(z, 1.0, 0.0, MU, S2,
                                                                      process)), atol=1e-6)


@pytest.mark.parametrize('t_sampling', ['uniform', 'one_step'])
def test_loss_written_out_and_straight_minimiser(t_sampling):
  # Per example with a model that outputs 0: the loss is mean_d (z - x0^)² = mean_d ((1 - s) z
  # - mu)², z the documented draw `normal(split(key)[0])`; the model sees x_t = (1 - t)(mu + s z)
  # + t z. The exact straight velocity v* has loss ~0 (its reflow minimum). Tolerances: 1e-6
  # on values that carry the solve error (7e-8) once, 1e-12 on a loss that carries it squared.
  process = processes.PROCESSES['linear']()
  with jax.enable_x64(True):
    teacher = analytic.gaussian_denoiser(MU, S2, process)
    objective = reflow.reflow(process, teacher=teacher, t_sampling=t_sampling, **RK4)
    assert objective.kind == 'velocity'
    x0 = jnp.zeros((32, 2), jnp.float64)
    key = jax.random.key(3)
    z = np.asarray(jax.random.normal(jax.random.split(key)[0], x0.shape, jnp.float64))
    seen = {}

    def zero_model(x, t, cond):
      del cond
      seen['x'], seen['t'] = np.asarray(x), np.asarray(t)
      return jnp.zeros_like(x)

    loss, aux = objective(zero_model, x0, key)
    t = seen['t']
    np.testing.assert_array_equal(np.asarray(aux['t']), t)
    if t_sampling == 'one_step':
      np.testing.assert_array_equal(t, 1.0)
    else:
      # U(0, 1): mean 1/2, std 1/sqrt(12) = 0.29; over 32 draws the mean's std is 0.05, so 0.12
      # is 2.4 of them (a fixed key: deterministic), and t² (mean 1/3) or t = 0.99 fail it.
      assert 0.0 <= t.min() and t.max() < 1.0 and abs(t.mean() - 0.5) < 0.12
    np.testing.assert_allclose(seen['x'], (1 - t[:, None]) * (MU + S * z) + t[:, None] * z,
                               atol=1e-6)
    expected = np.mean(((1 - S) * z - MU) ** 2, axis=-1)
    np.testing.assert_allclose(np.asarray(aux['loss_per_example']), expected, atol=1e-6)
    np.testing.assert_allclose(float(loss), expected.mean(), atol=1e-6)

    if t_sampling == 'uniform':   # the minimiser (at t = 1 it is the next test's Euler step)
      loss_star, _ = objective(lambda x, t, c: _v_star(x, t), x0, key)
      assert float(loss_star) < 1e-12


def test_one_euler_step_of_the_straight_flow_is_exact():
  # What reflow buys (Liu et al. §2.2): the reflowed velocity v* sampled with ONE flow_euler step
  # lands on the exact ODE map mu + s z. float64; v* is exact, so only rounding remains (1e-12).
  process = processes.PROCESSES['linear']()
  with jax.enable_x64(True):
    z = jax.random.normal(jax.random.key(5), (8, 2), jnp.float64)
    model = param.make_denoiser(lambda x, t, c: _v_star(x, t),
                                process, 'velocity')
    x, info = samplers.SAMPLERS['flow_euler'](model, process, z, steps=1)
    assert info['nfe'] == 1
    np.testing.assert_allclose(np.asarray(x), MU + S * np.asarray(z), atol=1e-12)


def test_teacher_gets_no_gradient():
  # The coupling is under stop_gradient: d loss / d (teacher's mu, s2) is exactly 0; the
  # student's parameter gets a gradient. A cheap fixed-step teacher solve (flow_euler, 2 steps).
  process = processes.PROCESSES['linear']()
  with jax.enable_x64(True):
    x0 = jnp.zeros((16, 2), jnp.float64)

    def loss_of(theta, mu, s2):
      objective = reflow.reflow(process, teacher=analytic.gaussian_denoiser(mu, s2, process),
                                teacher_sampler='flow_euler', teacher_steps=2)
      return objective(lambda x, t, c: theta * x, x0, jax.random.key(4))[0]

    g_theta, g_mu, g_s2 = jax.jit(jax.grad(loss_of, argnums=(0, 1, 2)))(
        0.5, jnp.asarray(MU), jnp.asarray(S2))
    assert abs(float(g_theta)) > 1e-3
    np.testing.assert_array_equal(np.asarray(g_mu), 0.0)
    np.testing.assert_array_equal(np.asarray(g_s2), 0.0)


def test_refusals():
  linear = processes.PROCESSES['linear']()
  teacher = analytic.gaussian_denoiser(MU, S2, linear)
  with pytest.raises(ValueError, match="reflow straightens the linear interpolant.*got VPCosine"):
    reflow.reflow(processes.PROCESSES['vp_cosine'](), teacher=teacher)
  with pytest.raises(ValueError, match='needs teacher='):
    reflow.reflow(linear)
  with pytest.raises(ValueError, match="teacher_sampler='ddpm'; choose a deterministic"):
    reflow.reflow(linear, teacher=teacher, teacher_sampler='ddpm')
  with pytest.raises(ValueError, match="t_sampling='two_step'"):
    reflow.reflow(linear, teacher=teacher, t_sampling='two_step')
  with pytest.raises(ValueError, match='teacher_steps=0'):
    reflow.reflow(linear, teacher=teacher, teacher_steps=0)
  with pytest.raises(ValueError, match="teacher kind 'eps' cannot give x0 at t = 1"):
    reflow.reflow(linear, teacher=param.Denoiser(teacher, kind='eps'))
  with pytest.raises(ValueError, match="teacher kind 'eps' cannot give x0 at t = 1"):
    reflow.reflow(linear, teacher=param.Denoiser(teacher, kind='eps'), teacher_process=linear)


def test_a_teacher_of_another_process_is_solved_on_its_own_process():
  # An EDM teacher (alpha = 1, sigma = 80 t): its coupling starts at its own prior x_T = 80 z.
  # For Gaussian data N(mu, s²) the EDM PF-ODE keeps (x - mu) / sqrt(s² + sigma²) constant, so
  # the exact endpoint is x0 = mu + s (80 z - mu) / sqrt(s² + 80²) per dimension (written out).
  # 96 DPM-Solver++(3M) steps (measured max error 4.5e-4 at 48 steps, 1.7e-5 at 96: third
  # order and better): 1e-4.
  edm = processes.PROCESSES['edm']()
  linear = processes.PROCESSES['linear']()
  with jax.enable_x64(True):
    teacher = param.Denoiser(analytic.gaussian_denoiser(MU, S2, edm), kind='x0')
    z = jax.random.normal(jax.random.key(3), (64, 2), jnp.float64)
    objective = reflow.reflow(linear, teacher=teacher, teacher_process=edm)
    got = reflow.reflow_coupling(teacher, edm, z, steps=96, sampler='dpm_solver_pp_3m')
    s_max = float(edm.sigma_np(np.array(1.0)))
    want = MU + np.sqrt(S2) * (s_max * np.asarray(z) - MU) / np.sqrt(S2 + s_max**2)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
    assert objective.kind == 'velocity'
    # And the loss draws its coupling there: a zero model's loss is mean_d (z - x0^)².
    key = jax.random.key(4)
    loss, aux = objective.loss(lambda x, t, c: jnp.zeros_like(x), jnp.zeros((64, 2)), key)
    key_z, _ = jax.random.split(key)
    z = jax.random.normal(key_z, (64, 2), jnp.float64)
    x0 = reflow.reflow_coupling(teacher, edm, z, steps=16, sampler='dpm_solver_pp_2m')
    np.testing.assert_allclose(np.asarray(aux['loss_per_example']),
                               np.mean((np.asarray(z) - np.asarray(x0))**2, -1), rtol=1e-10)


@pytest.mark.slow
def test_reflow_straightens_a_mixture_flow():
  # Reflow of the exact GMM teacher's flow (coupling by 16 DPM-Solver++(2M) steps), MLP student,
  # 1500 Adam steps: ONE Euler step of the reflowed flow must land near the teacher's exact ODE
  # map (RK4, 64 steps). Measured at 2000 steps: RMS 0.046 against 0.81 for one Euler step of the
  # teacher itself; the bar 0.15 and under a quarter of the teacher's leaves room for seeds.
  import optax   # pylint: disable=g-import-not-at-top
  from diffusion_jax.data import toy2d   # pylint: disable=g-import-not-at-top
  from diffusion_jax.models.mlp import MLP   # pylint: disable=g-import-not-at-top
  process = processes.PROCESSES['linear']()
  mix = toy2d.default_mixture()
  teacher = analytic.gmm_denoiser(mix.weights, mix.means, mix.stds**2, process)
  objective = reflow.reflow(process, teacher=teacher)
  net = MLP(hidden=128, depth=3)
  params = net.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))
  opt = optax.adam(1e-3)

  @jax.jit
  def step(params, state, key):
    loss_fn = lambda p: objective(lambda x, t, c: net.apply(p, x, t), jnp.zeros((256, 2)),
                                  key)[0]
    updates, state = opt.update(jax.grad(loss_fn)(params), state, params)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  for i in range(1500):
    params, state = step(params, state, jax.random.fold_in(jax.random.key(1), i))
  student = param.make_denoiser(lambda x, t, c: net.apply(params, x, t), process, objective)
  z = jax.random.normal(jax.random.key(9), (4096, 2))
  rms = lambda a, b: float(jnp.sqrt(jnp.mean((a - b) ** 2)))
  exact, _ = samplers.SAMPLERS['flow_rk4'](teacher, process, z, steps=64, grid='t', t_min=1e-6)
  x_student, _ = samplers.SAMPLERS['flow_euler'](student, process, z, steps=1)
  x_teacher, _ = samplers.SAMPLERS['flow_euler'](teacher, process, z, steps=1)
  assert rms(x_student, exact) < min(0.15, 0.25 * rms(x_teacher, exact)), (
      rms(x_student, exact), rms(x_teacher, exact))
