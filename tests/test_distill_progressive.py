"""Progressive distillation (Salimans & Ho 2022, Alg. 2) against closed forms on Gaussian data.

The teacher is the exact Gaussian denoiser (`analytic.gaussian_denoiser`), so every expected
value is the DDIM update `z_s = alpha_s x0_hat + sigma_s eps_hat` written out here in numpy
float64, never through `distill.progressive`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import analytic
from diffusion_jax import parameterization as param
from diffusion_jax import processes
from diffusion_jax import samplers
from diffusion_jax.distill import progressive

MU, S2 = np.array([0.7, -1.3]), np.array([0.25, 2.0])
B = 16


def _processes():
  return {'linear': processes.PROCESSES['linear'](),
          'vp_cosine': processes.PROCESSES['vp_cosine'](),
          'vp_discrete': processes.DiscreteVP.from_name('cosine', num_steps=16)}


def _teacher_ddim(teacher, process, z, steps):
  """`steps` deterministic DDIM steps on t = j / steps, the last one to the data (x0_hat)."""
  z = np.asarray(z)
  for j in range(steps, 0, -1):
    x0, eps = (np.asarray(a) for a in teacher(jnp.asarray(z), jnp.full(z.shape[:1], j / steps)))
    if j == 1:
      return x0
    s = np.array((j - 1) / steps)
    z = process.alpha_np(s) * x0 + process.sigma_np(s) * eps
  raise AssertionError('unreachable')


def _hand_target(teacher, process, z, t, n):
  """Alg. 2's x~ per example, from two DDIM steps written out (t'' = data when t = 1/N)."""
  z, t = np.asarray(z), np.asarray(t)
  t1, t2 = t - 0.5 / n, t - 1.0 / n
  x0, eps = (np.asarray(a) for a in teacher(jnp.asarray(z), jnp.asarray(t)))
  z1 = process.alpha_np(t1)[:, None] * x0 + process.sigma_np(t1)[:, None] * eps
  x0, eps = (np.asarray(a) for a in teacher(jnp.asarray(z1), jnp.asarray(t1)))
  last = np.isclose(t, 1.0 / n)[:, None]
  a2 = np.where(last, 1.0, process.alpha_np(t2)[:, None])
  s2 = np.where(last, 0.0, process.sigma_np(t2)[:, None])
  z2 = a2 * x0 + s2 * eps
  alpha, sigma = process.alpha_np(t)[:, None], process.sigma_np(t)[:, None]
  # One student DDIM step from t with x~ must land on z2: a2 x~ + s2 (z - alpha x~) / sigma = z2.
  return (z2 - s2 / sigma * z) / (a2 - s2 / sigma * alpha)


@pytest.mark.parametrize('name', ['linear', 'vp_cosine', 'vp_discrete'])
def test_perfect_student_sampled_equals_2n_teacher_ddim_steps(name):
  # The key property of Alg. 2: a student whose x0_hat is the target, sampled with N steps on
  # `student_sampler`'s grid, ends exactly where 2N teacher DDIM steps end. float64: the two
  # paths differ only by rounding (~1e-15 per step), so 1e-10 is generous but far below any
  # formula error (a wrong coefficient moves the endpoint by O(0.1)).
  process = _processes()[name]
  n = 4
  with jax.enable_x64(True):
    teacher = analytic.gaussian_denoiser(MU, S2, process)

    def student(z, t, cond=None):
      x0 = progressive.two_step_target(teacher, process, z, t, n, cond)
      alpha, sigma = (param.expand_like(c, z) for c in process.alpha_sigma(jnp.asarray(t)))
      return x0, (z - alpha * x0) / sigma

    z = jax.random.normal(jax.random.key(0), (B, 2), jnp.float64)
    sampler, options = progressive.student_sampler(process, n)
    assert sampler == ('ddim' if name == 'vp_discrete' else 'euler')
    x_student, info = samplers.SAMPLERS[sampler](param.Denoiser(student, kind='v'), process, z,
                                                 steps=n, **options)
    assert info['nfe'] == n
    expected = _teacher_ddim(teacher, process, z, 2 * n)
    np.testing.assert_allclose(np.asarray(x_student), expected, atol=1e-10, rtol=0)
    # And the library's own 2N-step teacher run on the same sampler agrees with the hand loop.
    sampler2, options2 = progressive.student_sampler(process, 2 * n)
    x_teacher, _ = samplers.SAMPLERS[sampler2](teacher, process, z, steps=2 * n, **options2)
    np.testing.assert_allclose(np.asarray(x_teacher), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize('weighting', ['truncated_snr', 'snr_plus_one'])
def test_loss_per_example_written_out(weighting):
  # Per example: w(t) mean_d (x~ - x_hat)² with x_hat from the v-output (x_t = alpha x0 + sigma
  # eps, v = alpha eps - sigma x0 solved for x0) and w = max(SNR, 1) or SNR + 1. The linear
  # interpolant is not variance preserving (alpha² + sigma² != 1), so the v-conversion's
  # normalisation is exercised; t = 1 (SNR 0) and t near 0 (SNR > 1) both occur. float64: 1e-12.
  process = _processes()['linear']
  n = 4
  with jax.enable_x64(True):
    teacher = analytic.gaussian_denoiser(MU, S2, process)
    objective = progressive.progressive_distillation(process, teacher=teacher, student_steps=n,
                                                     weighting=weighting)
    assert objective.kind == 'v'
    seen = {}

    def model_fn(z, t, cond):
      del cond
      seen['z'], seen['t'] = np.asarray(z), np.asarray(t)
      return 0.3 * z + 0.1

    x0 = jnp.asarray(np.random.default_rng(0).normal(size=(64, 2)))
    loss, aux = objective(model_fn, x0, jax.random.key(1))
    z, t = seen['z'], seen['t']
    assert set(np.round(t * n).astype(int)) == {1, 2, 3, 4}
    np.testing.assert_allclose(np.asarray(aux['t']), t)
    alpha, sigma = 1.0 - t[:, None], t[:, None]
    v = 0.3 * z + 0.1
    x_hat = (alpha * z - sigma * v) / (alpha**2 + sigma**2)
    snr = (alpha[:, 0] / sigma[:, 0]) ** 2
    w = np.maximum(snr, 1.0) if weighting == 'truncated_snr' else snr + 1.0
    expected = w * np.mean((_hand_target(teacher, process, z, t, n) - x_hat) ** 2, axis=-1)
    np.testing.assert_allclose(np.asarray(aux['loss_per_example']), expected, rtol=1e-12)
    np.testing.assert_allclose(float(loss), expected.mean(), rtol=1e-12)


def test_teacher_gets_no_gradient():
  # The loss's gradient w.r.t. the teacher's parameters (mu, s2) is exactly zero (stop_gradient:
  # Alg. 2 never differentiates the teacher), while the student's parameter gets a nonzero one.
  process = _processes()['vp_cosine']
  with jax.enable_x64(True):
    x0 = jnp.asarray(np.random.default_rng(1).normal(size=(32, 2)))

    def loss_of(theta, mu, s2):
      objective = progressive.progressive_distillation(
          process, teacher=analytic.gaussian_denoiser(mu, s2, process), student_steps=2)
      return objective(lambda z, t, cond: theta * z, x0, jax.random.key(2))[0]

    g_theta, g_mu, g_s2 = jax.jit(jax.grad(loss_of, argnums=(0, 1, 2)))(
        0.5, jnp.asarray(MU), jnp.asarray(S2))
    assert abs(float(g_theta)) > 1e-3
    np.testing.assert_array_equal(np.asarray(g_mu), 0.0)
    np.testing.assert_array_equal(np.asarray(g_s2), 0.0)


def test_student_steps_and_times():
  assert [progressive.student_steps(64, k) for k in range(7)] == [64, 32, 16, 8, 4, 2, 1]
  for args, match in [((12, 3), 'not divisible by 2\\^3'), ((0, 1), 'teacher_steps=0'),
                      ((8, -1), 'round=-1'), ((8.5, 1), 'teacher_steps=8.5')]:
    with pytest.raises(ValueError, match=match):
      progressive.student_steps(*args)
  process = _processes()
  np.testing.assert_array_equal(progressive.student_times(process['linear'], 4),
                                [1.0, 0.75, 0.5, 0.25])
  with pytest.raises(ValueError, match='does not divide the DiscreteVP steps T=16'):
    progressive.student_times(process['vp_discrete'], 3)
  with pytest.raises(ValueError, match='t_min'):
    progressive.student_times(processes.PROCESSES['vp_linear'](), 2000)


def test_constructor_refusals():
  process = _processes()
  teacher = analytic.gaussian_denoiser(MU, S2, process['linear'])
  build = progressive.progressive_distillation
  with pytest.raises(ValueError, match='needs teacher='):
    build(process['linear'], student_steps=2)
  with pytest.raises(ValueError, match="weighting='snr'"):
    build(process['linear'], teacher=teacher, student_steps=2, weighting='snr')
  with pytest.raises(ValueError, match="teacher kind 'eps' cannot give x0 at t = 1"):
    build(process['linear'], teacher=param.Denoiser(teacher, kind='eps'), student_steps=2)
  with pytest.raises(ValueError, match="teacher kind 'consistency'"):
    build(process['linear'], teacher=param.Denoiser(teacher, kind='consistency'),
          student_steps=2)
  with pytest.raises(ValueError, match='trained on VPCosine but the student uses Linear'):
    build(process['linear'], teacher=teacher, student_steps=2,
          teacher_process=process['vp_cosine'])
  with pytest.raises(ValueError, match='2N = 32 to divide the DiscreteVP steps T=16'):
    build(process['vp_discrete'], teacher=teacher, student_steps=16)
  # The same process passes, also as an equal copy.
  build(process['linear'], teacher=teacher, student_steps=2,
        teacher_process=processes.PROCESSES['linear']())


@pytest.mark.slow
def test_student_learns_2n_teacher_steps_in_n_on_a_mixture():
  # One round on the 2-D mixture (linear interpolant, exact GMM teacher): an MLP student of N = 2
  # steps, 1500 Adam steps, must reproduce the teacher's 4-step DDIM samples from the same noise.
  # Measured: RMS 0.007 (2000 steps) against 0.26 for the teacher's own 2-step samples; the bar,
  # 0.05 and under a fifth of that baseline, leaves room for seeds and CPU float differences.
  import optax   # pylint: disable=g-import-not-at-top
  from diffusion_jax.data import toy2d   # pylint: disable=g-import-not-at-top
  from diffusion_jax.models.mlp import MLP   # pylint: disable=g-import-not-at-top
  process = processes.PROCESSES['linear']()
  mix = toy2d.default_mixture()
  teacher = analytic.gmm_denoiser(mix.weights, mix.means, mix.stds**2, process)
  objective = progressive.progressive_distillation(process, teacher=teacher, student_steps=2)
  net = MLP(hidden=128, depth=3)
  params = net.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))
  opt = optax.adam(1e-3)

  @jax.jit
  def step(params, state, key):
    k_x, k_loss = jax.random.split(key)
    loss_fn = lambda p: objective(lambda x, t, c: net.apply(p, x, t), mix.sample(k_x, 256),
                                  k_loss)[0]
    updates, state = opt.update(jax.grad(loss_fn)(params), state, params)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  for i in range(1500):
    params, state = step(params, state, jax.random.fold_in(jax.random.key(1), i))
  student = param.make_denoiser(lambda x, t, c: net.apply(params, x, t), process, objective)
  z = jax.random.normal(jax.random.key(9), (4096, 2))
  rms = lambda a, b: float(jnp.sqrt(jnp.mean((a - b) ** 2)))
  name, options = progressive.student_sampler(process, 2)
  x_student, _ = samplers.SAMPLERS[name](student, process, z, steps=2, **options)
  x_teacher2, _ = samplers.SAMPLERS[name](teacher, process, z, steps=2, **options)
  name4, options4 = progressive.student_sampler(process, 4)
  x_teacher4, _ = samplers.SAMPLERS[name4](teacher, process, z, steps=4, **options4)
  baseline = rms(x_teacher2, x_teacher4)
  assert rms(x_student, x_teacher4) < min(0.05, 0.2 * baseline), (rms(x_student, x_teacher4),
                                                                  baseline)


def test_karras_grid_on_edm_a_perfect_edm_student_equals_2n_teacher_steps():
  # EDM's t is sigma / sigma_max, so S&H's t = i / N puts the steps uniformly in sigma; the
  # 'karras' grid puts them at Karras et al.'s (2022, Eq. 5) levels, rho = 7, written out here:
  # s_j = (s_min^(1/7) + (j / 2N) (s_max^(1/7) - s_min^(1/7)))^7, j = 2N..0, t = s / sigma_max.
  # A student of kind 'edm' (one that starts from an EDM teacher's weights) whose x0_hat is the
  # target, sampled on the N-step grid, lands where 2N hand-written teacher DDIM steps land.
  # float64; 1e-10 as in the test above.
  process = processes.PROCESSES['edm']()
  n = 4
  s_max, s_min = float(process.sigma_np(np.array(1.0))), float(
      process.sigma_np(np.array(float(process.t_min))))
  levels = (s_min ** (1 / 7) + np.arange(2 * n, -1, -1) / (2 * n)
            * (s_max ** (1 / 7) - s_min ** (1 / 7))) ** 7                   # s_2N .. s_0
  fine = levels / s_max
  np.testing.assert_allclose(progressive.student_times(process, n, 'karras'), fine[:-1:2],
                             rtol=1e-12)
  with jax.enable_x64(True):
    teacher = analytic.gaussian_denoiser(MU, S2, process)

    def student(z, t, cond=None):
      x0 = progressive.two_step_target(teacher, process, z, t, n, cond, grid='karras')
      sigma = param.expand_like(process.sigma(jnp.asarray(t)), z)
      return x0, (z - x0) / sigma

    z = s_max * jax.random.normal(jax.random.key(1), (B, 2), jnp.float64)
    sampler, options = progressive.student_sampler(process, n, 'karras')
    x_student, _ = samplers.SAMPLERS[sampler](param.Denoiser(student, kind='edm'), process, z,
                                              steps=n, **options)
    # 2N teacher DDIM steps (alpha = 1: z_s = x0_hat + s eps_hat) through every fine level.
    x = np.asarray(z)
    for j in range(2 * n):
      x0, eps = (np.asarray(a) for a in teacher(jnp.asarray(x), jnp.full((B,), fine[j])))
      x = x0 if j == 2 * n - 1 else x0 + levels[j + 1] * eps
    np.testing.assert_allclose(np.asarray(x_student), x, atol=1e-10, rtol=0)
    # The loss reads the student's output as kind 'edm' and carries sigma_data.
    objective = progressive.progressive_distillation(process, teacher=teacher, student_steps=n,
                                                     grid='karras', kind='edm',
                                                     sigma_data=0.5)
    assert (objective.kind, objective.sigma_data) == ('edm', 0.5)
