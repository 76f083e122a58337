"""DMD / DMD2 (`diffusion_jax.distill.dmd`) against closed forms on Gaussian data.

Data `N(MU, diag(S2))` on the linear interpolant (`alpha = 1 - t`, `sigma = t`). A generator
`x = m + s z` (z the prior draw at t = 1, kind 'x0') has law `N(m, diag(s²))`, and the exact
fake score of that law is the Gaussian posterior mean with `(m, s²)`. For Gaussian `N(c, v)`
the score of `x_t` is `-(x_t - alpha c) / (alpha² v + sigma²)` (DESIGN §6), from which DMD's
gradient (Eq. 7, weighting Eq. 8) is written out below without the module's x0-difference form.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax import analytic
from diffusion_jax import objectives
from diffusion_jax import parameterization as param
from diffusion_jax import processes
from diffusion_jax.distill import dmd

MU = np.array([0.8, -0.4, 0.3])
S2 = np.array([0.05, 0.3, 1.5])
M_G = np.array([0.2, 0.1, -0.5])       # the generator's law N(M_G, S_G²)
S_G = np.array([0.7, 1.1, 0.5])
LIN = processes.make_process('linear')
B = 64


def teacher(kind='x0'):
  return param.Denoiser(analytic.gaussian_denoiser(MU, S2, LIN), kind=kind)


def gaussian_x0(x_t, t, c, v):
  """`E[x0 | x_t]` for `x0 ~ N(c, diag(v))` on the linear interpolant, written out."""
  alpha, sigma = (1 - t)[:, None], t[:, None]
  return c + alpha * v / (alpha**2 * v + sigma**2) * (x_t - alpha * c)


def model_fn_of(params):
  """`model_fn(x, t, cond, part=...)`: generator `m + s x` (used at t = 1), exact fake of
  `N(fm, fv)`; both kind 'x0' (the network sees `(x_t, t)`)."""
  def model_fn(x, t, cond=None, part='generator'):
    del cond
    g, f = params['generator'], params['fake']
    if part == 'generator':
      return g['m'] + g['s'] * x
    return gaussian_x0(x, t, f['m'], f['v'])
  return model_fn


def params_of(fake_m, fake_v, m=M_G, s=S_G):
  return {'generator': {'m': jnp.asarray(m), 's': jnp.asarray(s)},
          'fake': {'m': jnp.asarray(fake_m), 'v': jnp.asarray(fake_v)}}


def x0_batch():
  return jnp.zeros((B, 3), jnp.float64)   # DMD's generator loss never reads real data


def test_grad_formula_written_out():
  # One example, d = 2: mean |mu_real - x| = (1 + 2) / 2 = 1.5; grad = (mu_fake - mu_real) / 1.5.
  x = jnp.array([[1.0, 2.0]])
  got = dmd.distribution_matching_grad(x, jnp.array([[0.0, 4.0]]), jnp.array([[1.0, 1.0]]))
  np.testing.assert_allclose(got, [[1 / 1.5, -3 / 1.5]], rtol=1e-6)
  # The surrogate's gradient on x is grad / d (mean over d = 2 dimensions).
  g = jax.grad(lambda y: dmd.distribution_matching_loss(y, got)[0])(x)
  np.testing.assert_allclose(g, got / 2, rtol=1e-6)


def test_matched_fake_gives_zero_generator_gradient():
  with jax.enable_x64(True):
    obj = dmd.dmd(LIN, teacher=teacher(), fake_weight=0.0)
    key = jax.random.PRNGKey(0)
    grad_fn = jax.jit(jax.grad(lambda p: obj(model_fn_of(p), x0_batch(), key)[0]))
    # fake == real: the distribution-matching gradient vanishes (float64 round-off only).
    grads = grad_fn(params_of(MU, S2))
    for leaf in jax.tree_util.tree_leaves(grads['generator']):
      np.testing.assert_allclose(leaf, 0.0, atol=1e-12)
    # a mismatched fake (the generator's own law) does not.
    grads = grad_fn(params_of(M_G, S_G**2))
    assert float(jnp.max(jnp.abs(grads['generator']['m']))) > 1e-3


def test_dm_gradient_equals_score_difference():
  """Generator law N(M_G, S_G²), its exact fake score: the generator's gradient is the chain
  rule of DMD's `w_t (s_fake - s_real)` (Eqs. 7-8) through `x = m + s z`."""
  with jax.enable_x64(True):
    obj = dmd.dmd(LIN, teacher=teacher(), fake_weight=0.0)
    params = params_of(M_G, S_G**2)
    f = lambda p: obj(model_fn_of(p), x0_batch(), jax.random.PRNGKey(1))
    (_, aux), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    x, x_t, t = aux['x'], aux['x_t'], aux['t']
    np.testing.assert_allclose(aux['generator_time'], 1.0)
    alpha, sigma = (1 - t)[:, None], t[:, None]
    s_real = -(x_t - alpha * MU) / (alpha**2 * S2 + sigma**2)
    s_fake = -(x_t - alpha * M_G) / (alpha**2 * S_G**2 + sigma**2)
    mu_real = MU + alpha * S2 / (alpha**2 * S2 + sigma**2) * (x_t - alpha * MU)
    w = sigma**2 / alpha * 3 / jnp.sum(jnp.abs(mu_real - x), axis=1, keepdims=True)
    g_x = w * (s_fake - s_real) / (B * 3)      # d loss / d x: batch mean, mean over d = 3
    z = (x - M_G) / S_G
    # The two forms differ only by round-off (alpha >= 0.02 in t ~ U[0.02, 0.98]): 1e-9.
    np.testing.assert_allclose(grads['generator']['m'], jnp.sum(g_x, 0), rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(grads['generator']['s'], jnp.sum(g_x * z, 0), rtol=1e-9,
                               atol=1e-14)
    # DMD's t ~ U[0.02, 0.98] on a non-unit-alpha process, and x_t = alpha x + sigma eps with
    # eps ~ N(0, I): 192 draws, mean within 5 standard errors, std within 0.3 (its sd ~ 0.05).
    assert float(t.min()) >= 0.02 and float(t.max()) <= 0.98
    eps = (x_t - alpha * x) / sigma
    assert abs(float(eps.mean())) < 5 / np.sqrt(eps.size) and abs(float(eps.std()) - 1) < 0.3


def generic_params(key):
  k = jax.random.split(key, 4)
  return {'generator': {'w': 0.3 * jax.random.normal(k[0], (3, 3)), 'b': jnp.full((3,), 0.1)},
          'fake': {'w': 0.3 * jax.random.normal(k[1], (3, 3)), 'b': jnp.full((3,), -0.2)}}


def generic_model_fn(params):
  def model_fn(x, t, cond=None, part='generator'):
    del cond
    p = params[part]
    return jnp.tanh(x @ p['w'] + p['b']) * (1 + t[:, None])
  return model_fn


def test_gradients_reach_only_their_networks():
  with jax.enable_x64(True):
    key, x0 = jax.random.PRNGKey(2), x0_batch() + 0.5
    params = generic_params(jax.random.PRNGKey(3))
    reg = lambda x_T, c: 0.5 * x_T

    def grads(dm_weight, fake_weight, regression_weight=0.0):
      obj = dmd.dmd(LIN, teacher=teacher(), dm_weight=dm_weight, fake_weight=fake_weight,
                    regression_weight=regression_weight, regression_fn=reg)
      return jax.grad(lambda p: obj(generic_model_fn(p), x0, key)[0])(params)

    both, gen_only, fake_only = grads(1.0, 1.0), grads(1.0, 0.0), grads(0.0, 1.0)
    reg_only = grads(0.0, 0.0, 1.0)
    zero = lambda tree: all(bool(jnp.all(leaf == 0)) for leaf in jax.tree_util.tree_leaves(tree))
    assert zero(gen_only['fake']) and not zero(gen_only['generator'])
    assert zero(fake_only['generator']) and not zero(fake_only['fake'])
    assert zero(reg_only['fake']) and not zero(reg_only['generator'])
    for part, single in (('generator', gen_only), ('fake', fake_only)):
      for a, b in zip(jax.tree_util.tree_leaves(both[part]),
                      jax.tree_util.tree_leaves(single[part]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)

    # The teacher (here a function of its own parameters) receives no gradient.
    def loss_of_teacher(tp):
      real = param.Denoiser(analytic.gaussian_denoiser(tp['mu'], tp['s2'], LIN), kind='x0')
      return dmd.dmd(LIN, teacher=real)(generic_model_fn(params), x0, key)[0]
    tg = jax.grad(loss_of_teacher)({'mu': jnp.asarray(MU), 's2': jnp.asarray(S2)})
    assert zero(tg)


def test_gan_term_against_a_linear_discriminator():
  """DMD2's GAN term (§4.3) with `D(x_t) = mean_d(A x_t + C)`: `L_G = softplus(-D(x_t))`, whose
  gradient through `x_t = alpha x + sigma eps`, `x = m + s z` is written out; a constant `D`
  (A = 0) gives `L_D = softplus(-C) + softplus(C)` (real and fake alike)."""
  a_, c_ = 0.7, -0.3
  with jax.enable_x64(True):
    def model_fn_of_gan(params, a):
      base = model_fn_of(params)

      def model_fn(x, t, cond=None, part='generator'):
        return a * x + c_ if part == 'discriminator' else base(x, t, cond, part)
      return model_fn
    obj = dmd.dmd(LIN, teacher=teacher(), dm_weight=0.0, fake_weight=0.0, gan_weight=2.0,
                  discriminator_weight=0.0)
    f = lambda p, a: obj(model_fn_of_gan(p, a), x0_batch(), jax.random.PRNGKey(10))
    (_, aux), grads = jax.value_and_grad(f, has_aux=True)(params_of(M_G, S_G**2), a_)
    logit = a_ * aux['x_t'].mean(1) + c_
    np.testing.assert_allclose(aux['loss_gan_generator'], jax.nn.softplus(-logit), rtol=1e-12)
    alpha = 1 - aux['t']
    dx = 2.0 * (-jax.nn.sigmoid(-logit)) * a_ * alpha / 3 / B          # [B]: d loss / d x_j
    np.testing.assert_allclose(grads['generator']['m'], jnp.full(3, jnp.sum(dx)), rtol=1e-9)
    _, aux = f(params_of(M_G, S_G**2), 0.0)
    np.testing.assert_allclose(aux['loss_discriminator'],
                               jax.nn.softplus(-c_) + jax.nn.softplus(c_), rtol=1e-12)


def test_gan_gradients_reach_only_their_networks():
  with jax.enable_x64(True):
    params = generic_params(jax.random.PRNGKey(11))
    params['discriminator'] = generic_params(jax.random.PRNGKey(12))['fake']
    x0 = x0_batch() + 0.5

    def grads(gan_weight, discriminator_weight, step):
      obj = dmd.dmd(LIN, teacher=teacher(), dm_weight=0.0, fake_weight=0.0, fake_updates=1,
                    gan_weight=gan_weight, discriminator_weight=discriminator_weight)
      return jax.grad(lambda p: obj(generic_model_fn(p), x0, jax.random.PRNGKey(13),
                                    step=step)[0])(params)
    gen_term, disc_term = grads(1.0, 0.0, 0), grads(1.0, 1.0, 1)   # step 1: no generator term
    norm = lambda tree: float(sum(jnp.sum(jnp.abs(leaf)) for leaf in
                                  jax.tree_util.tree_leaves(tree)))
    # The generator's GAN loss trains the generator only: its two terms' gradients on D's
    # parameters are the same numbers with opposite signs (round-off at most).
    assert norm(gen_term['generator']) > 1e-3 and norm(gen_term['discriminator']) < 1e-12
    assert norm(disc_term['discriminator']) > 1e-3 and norm(disc_term['generator']) == 0
    assert norm(gen_term['fake']) == 0 and norm(disc_term['fake']) == 0


def test_two_time_scale_masking_and_optimizer():
  with jax.enable_x64(True):
    params = generic_params(jax.random.PRNGKey(4))
    obj = dmd.dmd(LIN, teacher=teacher(), fake_updates=2)
    key, x0 = jax.random.PRNGKey(5), x0_batch()
    norms, masks = [], []
    for step in range(4):
      g = jax.grad(lambda p, s=step: obj(generic_model_fn(p), x0, key, step=s)[0])(params)
      norms.append(float(jnp.abs(g['generator']['w']).sum()))
      loss, aux = obj(generic_model_fn(params), x0, key, step=step)
      masks.append(float(aux['generator_step']))
      if step in (1, 2):   # fake-only steps: the loss is the fake term alone
        np.testing.assert_allclose(loss, jnp.mean(aux['loss_fake']), rtol=1e-12)
    assert masks == [1.0, 0.0, 0.0, 1.0]
    assert norms[0] > 0 and norms[3] > 0 and norms[1] == 0 and norms[2] == 0

  # The optimizer moves the generator only on steps 0, 3, ... (Adam would drift on zeros).
  opt = dmd.ttur_optimizer(optax.adam(0.1), optax.adam(0.1))
  p = {'generator': {'w': jnp.ones(2)}, 'fake': {'w': jnp.ones(2)}}
  state = opt.init(p)
  moved = []
  for step in range(4):
    g = {'generator': {'w': jnp.ones(2) * (step % 3 == 0)}, 'fake': {'w': jnp.ones(2)}}
    updates, state = opt.update(g, state, p)
    new = optax.apply_updates(p, updates)
    moved.append((bool(jnp.any(new['generator']['w'] != p['generator']['w'])),
                  bool(jnp.any(new['fake']['w'] != p['fake']['w']))))
    p = new
  assert moved == [(True, True), (False, True), (False, True), (True, True)]


def test_regression_loss_against_the_exact_ode_map():
  # For the linear interpolant the teacher's PF ODE from t = 1 maps z to MU + sqrt(S2) z.
  with jax.enable_x64(True):
    ode_map = lambda x_T, c: analytic.gaussian_pf_ode_solution(x_T, 1.0, 0.0, MU, S2, LIN)
    obj = dmd.dmd(LIN, teacher=teacher(), regression_weight=1.0, regression_fn=ode_map)
    shift = np.array([0.3, -0.1, 0.2])
    for offset in (0.0, shift):
      params = params_of(MU, S2, m=MU + offset, s=np.sqrt(S2))
      _, aux = obj(model_fn_of(params), x0_batch(), jax.random.PRNGKey(6))
      # G(z) - ODE(z) = offset exactly: the MSE is mean_d offset².
      np.testing.assert_allclose(aux['loss_regression'], np.mean(np.square(offset)), atol=1e-12)


def test_multistep_backward_simulation():
  """Two steps at t = 1, 0.5. A generator that outputs C at t = 1 and its input at t = 0.5: an
  example at t = 0.5 gets `alpha C + sigma z` by backward simulation (DMD2 §4.5), and
  `alpha x0 + sigma eps` from the data without it."""
  np.testing.assert_allclose(dmd.generator_times(LIN, 4), [1.0, 0.75, 0.5, 0.25])
  np.testing.assert_allclose(dmd.generator_times(LIN, 2, t_max=0.9), [0.9, 0.45])
  c = jnp.array([10.0, -10.0, 4.0])

  def model_fn(x, t, cond=None, part='generator'):
    del cond
    if part == 'generator':
      return jnp.where((t == 1.0)[:, None], c, x)
    return x
  for backward, centre in ((True, 0.5 * c), (False, 0.5 * jnp.full(3, 3.0))):
    obj = dmd.dmd(LIN, teacher=teacher(), steps=2, backward_simulation=backward)
    _, aux = jax.jit(lambda x0, o=obj: o(model_fn, x0, jax.random.PRNGKey(7)))(
        jnp.full((B, 3), 3.0))
    late = aux['generator_time'] == 0.5
    assert 16 < int(late.sum()) < 48        # i ~ U{0, 1}: both times drawn
    np.testing.assert_allclose(aux['x'][~late], jnp.broadcast_to(c, aux['x'][~late].shape))
    # (x - centre) / sigma must be N(0, 1): ~96 draws, mean within 5 standard errors, std
    # within 0.3 (its sd is ~0.07); the wrong centre is off by >= 1.5 / 0.5 = 3.
    z = (aux['x'][late] - centre) / 0.5
    assert abs(float(z.mean())) < 5 / np.sqrt(z.size) and abs(float(z.std()) - 1) < 0.3


def test_sampled_by_the_consistency_sampler():
  """The trained generator is sampled as a denoiser of the objective's kind on its times:
  at one step the sample is `G(x_T, 1) = m + s x_T` exactly."""
  obj = dmd.dmd(LIN, teacher=teacher())
  params = params_of(MU, S2)
  den = param.make_denoiser(dmd.part_fn(model_fn_of(params), 'generator'), LIN, obj)
  x_T = jax.random.normal(jax.random.PRNGKey(9), (4, 3))
  x, info = dmd.sample(den, LIN, x_T, steps=1)
  np.testing.assert_allclose(x, M_G + S_G * x_T, rtol=1e-6)
  assert info['nfe'] == 1
  # Two steps: x0_hat at t = 1, re-noised to t = 0.5 with z_1 (the sampler's key split), then
  # x0_hat there (the same affine map of the network's input).
  x, info = dmd.sample(den, LIN, x_T, jax.random.PRNGKey(3), steps=2)
  z = jax.random.normal(jax.random.split(jax.random.PRNGKey(3), 2)[1], x_T.shape)
  np.testing.assert_allclose(x, M_G + S_G * (0.5 * (M_G + S_G * x_T) + 0.5 * z), rtol=1e-5)
  assert info['nfe'] == 2


def test_karras_dm_time_on_edm():
  # 'karras' (default on alpha = 1): sigma^(1/7) uniform between the 2% and 98% points of the
  # rho = 7 grid from sigma_min = 0.002 to sigma_max = 80 (DMD's EDM teachers).
  edm = processes.make_process('edm')
  t = dmd.dm_time_sampler(edm, None, 0.02, 0.98)(jax.random.PRNGKey(8), 4096)
  r = (80.0 * t) ** (1 / 7)
  a, b = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
  u = (r - a) / (b - a)
  assert float(u.min()) >= 0.02 - 1e-5 and float(u.max()) <= 0.98 + 1e-5
  # uniform: mean 0.5, sd 0.96 / sqrt(12 n); 5 standard errors.
  assert abs(float(u.mean()) - 0.5) < 5 * 0.96 / np.sqrt(12 * 4096)


class Tiny(nn.Module):
  """The library's network signature `(x, t, cond, *, train)` at the smallest cost."""
  features: int = 3

  @nn.compact
  def __call__(self, x, t, cond=None, *, train: bool = False):
    return nn.Dense(self.features)(x) * t[:, None]


def test_model_wrapper_and_init_from_teacher():
  net = Tiny()
  x, t = jnp.ones((2, 3)), jnp.full((2,), 0.5)
  model = dmd.dmd_model(net)
  params = model.init(jax.random.PRNGKey(0), x, t)['params']
  assert set(params) == {'generator', 'fake'}
  teacher_params = net.init(jax.random.PRNGKey(1), x, t)['params']
  teacher_params = jax.tree_util.tree_map(lambda p: p + 0.1, teacher_params)  # nonzero output
  both = dmd.init_from_teacher(params, teacher_params)
  want = net.apply({'params': teacher_params}, x, t)
  for part in dmd.PARTS:
    np.testing.assert_array_equal(model.apply({'params': both}, x, t, part=part), want)
  with pytest.raises(ValueError, match='teacher network'):
    dmd.init_from_teacher(params, Tiny(4).init(jax.random.PRNGKey(1), x, t)['params'])
  with pytest.raises(ValueError, match='part='):
    model.apply({'params': both}, x, t, part='teacher')
  # A discriminator of the teacher's architecture starts from the teacher; another keeps its own.
  for disc, from_teacher in ((Tiny(), True), (Tiny(5), False)):
    model = dmd.dmd_model(net, discriminator=disc)
    params = model.init(jax.random.PRNGKey(0), x, t)['params']
    assert set(params) == {'generator', 'fake', 'discriminator'}
    got = dmd.init_from_teacher(params, teacher_params)['discriminator']
    want = teacher_params if from_teacher else params['discriminator']
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
      np.testing.assert_array_equal(a, b)
    opt = dmd.ttur_optimizer(optax.sgd(1.0), optax.sgd(1.0))
    updates, _ = opt.update(jax.tree_util.tree_map(jnp.ones_like, params), opt.init(params))
    assert float(updates['discriminator']['Dense_0']['bias'][0]) == -1.0


def test_bad_inputs():
  with pytest.raises(ValueError, match="kind 'consistency'"):
    dmd.dmd(LIN, teacher=teacher('consistency'))
  with pytest.raises(ValueError, match='kind None'):
    dmd.dmd(LIN, teacher=analytic.gaussian_denoiser(MU, S2, LIN))
  with pytest.raises(ValueError, match="predicts 'velocity' but the teacher predicts 'x0'"):
    dmd.dmd(LIN, teacher=teacher(), fake_objective=objectives.flow_matching(LIN))
  with pytest.raises(ValueError, match=r"trained on EDM\(.*\) but the student runs on Linear"):
    dmd.dmd(LIN, teacher=teacher(), teacher_process=processes.make_process('edm'))
  dmd.dmd(LIN, teacher=teacher(), teacher_process=processes.make_process('linear'))
  with pytest.raises(ValueError, match='regression_fn'):
    dmd.dmd(LIN, teacher=teacher(), regression_weight=1.0)
  with pytest.raises(ValueError, match='one-step'):
    dmd.dmd(LIN, teacher=teacher(), steps=2, regression_weight=1.0, regression_fn=lambda x, c: x)
  with pytest.raises(ValueError, match='t_min < t_max'):
    dmd.dmd(LIN, teacher=teacher(), t_min=0.5, t_max=0.5)
  with pytest.raises(ValueError, match='fake_updates'):
    dmd.dmd(LIN, teacher=teacher(), fake_updates=-1)
  with pytest.raises(ValueError, match='steps=0'):
    dmd.dmd(LIN, teacher=teacher(), steps=0)


@pytest.mark.slow
def test_learns_a_two_mode_mixture():
  """DMD2 (TTUR, 4 fake updates per generator update) from scratch with the exact mixture
  teacher: a one-step MLP generator puts both modes at their places with about their spread.
  (An untrained generator outputs 0 everywhere: no mode.) ~1 min on two cores."""
  from diffusion_jax import training    # pylint: disable=import-outside-toplevel
  from diffusion_jax.models import mlp   # pylint: disable=import-outside-toplevel
  means, s2 = np.array([[-1.5, 0.5], [1.5, -0.5]]), np.full((2, 2), 0.1)
  real = param.Denoiser(analytic.gmm_denoiser(np.array([0.5, 0.5]), means, s2, LIN), kind='x0')
  obj = dmd.dmd(LIN, teacher=real, fake_updates=4)
  model = dmd.dmd_model(mlp.MLP(hidden=64, depth=2))
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((256, 2)), jnp.zeros((256,)))['params']
  opt = dmd.ttur_optimizer(optax.adam(1e-3, b1=0.0, b2=0.99), optax.adam(1e-3, b1=0.0, b2=0.99))
  ema = training.ema(0.0, warmup=False)

  def loss_fn(p, model_state, batch, key, step):
    def model_fn(x, t, c, **kw):   # what make_train_step's model_fn must pass on: part=
      return model.apply({'params': p}, x, t, c, train=True, **kw)
    return obj(model_fn, batch['image'], key, step=step)[0], ({}, model_state)

  step_fn = jax.jit(training.make_loss_train_step(loss_fn, opt, ema))
  state = training.init_train_state(params, opt, ema, jax.random.PRNGKey(1))
  batch = {'image': jnp.zeros((256, 2))}     # DMD never reads real data here
  for _ in range(2000):
    state, _ = step_fn(state, batch)
  den = param.make_denoiser(lambda x, t, c: model.apply({'params': state.params}, x, t, c), LIN,
                            obj)
  x, _ = dmd.sample(den, LIN, jax.random.normal(jax.random.PRNGKey(2), (4000, 2)), steps=1)
  x = np.asarray(x)
  right = x[:, 0] > 0
  assert 0.35 < right.mean() < 0.65
  for side, m in ((right, means[1]), (~right, means[0])):
    assert np.all(np.abs(x[side].mean(0) - m) < 0.5)
    assert np.all((0.5 * np.sqrt(0.1) < x[side].std(0)) & (x[side].std(0) < 1.5 * np.sqrt(0.1)))


def test_generator_times_on_edm_are_karras_levels():
  # On EDM (t = sigma / 80) DMD2's positions 1, 3/4, 1/2, 1/4 are read on Karras et al.'s
  # rho = 7 grid between sigma_min = 0.002 and sigma_max = 80, written out:
  # sigma(u) = (0.002^(1/7) + u (80^(1/7) - 0.002^(1/7)))^7.
  edm = processes.PROCESSES['edm']()
  u = np.array([1.0, 0.75, 0.5, 0.25])
  want = (0.002 ** (1 / 7) + u * (80.0 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7 / 80.0
  np.testing.assert_allclose(dmd.generator_times(edm, 4), want, rtol=1e-9)
  # Elsewhere the positions are the times (DMD2's 999, 749, 499, 249 of 1000).
  np.testing.assert_allclose(dmd.generator_times(processes.PROCESSES['vp_cosine'](), 4), u)
