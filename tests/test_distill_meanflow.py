"""MeanFlow (Geng et al. 2025), the flow-map sampler and the second time input, against closed
forms on Gaussian data (DESIGN §6).

For data `N(mu, diag(s²))` on the linear interpolant (`a(t) = 1 - t`, `sigma(t) = t`) the PF ODE
moves `x_t = a(t) mu + sqrt(R(t)) z`, `R(t) = a(t)² s² + t²`, with `z` fixed, so written out
here (not through the code under test):
  flow map       Phi_{t->r}(x) = a(r) mu + sqrt(R(r) / R(t)) (x - a(t) mu)
  velocity       v(x, t) = -mu + (t - a(t) s²) / R(t) (x - a(t) mu)          (= dx/dt)
  average vel.   u(x, r, t) = (x - Phi_{t->r}(x)) / (t - r)                   (Eq. 3)
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax import parameterization as param
from diffusion_jax import processes
from diffusion_jax import samplers
from diffusion_jax.data import toy2d
from diffusion_jax.distill import meanflow as mf
from diffusion_jax.distill import shortcut as sc
from diffusion_jax.metrics.sliced import sliced_wasserstein
from diffusion_jax.models import layers
from diffusion_jax.models import mlp
from diffusion_jax.models import unet
from diffusion_jax.samplers import flow_map as fm

MU = np.array([0.8, -0.4, 0.3])
S2 = np.array([0.05, 0.3, 1.5])
LINEAR = processes.make_process('linear')


def _col(a):
  return a[:, None]


def exact_phi(x, t, r, mu=MU, s2=S2):
  a_t, a_r = 1.0 - _col(t), 1.0 - _col(r)
  big_r_t, big_r_r = a_t**2 * s2 + _col(t) ** 2, a_r**2 * s2 + _col(r) ** 2
  return a_r * mu + jnp.sqrt(big_r_r / big_r_t) * (x - a_t * mu)


def exact_v(x, t, mu=MU, s2=S2):
  a = 1.0 - _col(t)
  return -mu + (_col(t) - a * s2) / (a**2 * s2 + _col(t) ** 2) * (x - a * mu)


def exact_u_model(mu=MU, s2=S2):
  """The exact average velocity as a network `(z, t, cond) -> u(z, t - delta, t)`; at delta = 0
  the instantaneous velocity."""
  def model(z, t, cond):
    delta = cond['delta']
    safe = jnp.where(delta > 0, delta, 1.0)
    u = (z - exact_phi(z, t, t - delta, mu, s2)) / _col(safe)
    return jnp.where(_col(delta > 0), u, exact_v(z, t, mu, s2))
  return model


def _points(n, key=0, t_lo=0.2):
  """`(z, r, t)` float64 with `0 <= r < t - 0.05`, `t` in [t_lo, 1] (1 itself included)."""
  k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
  t = jax.random.uniform(k1, (n,), jnp.float64, t_lo, 1.0).at[0].set(1.0)
  r = jax.random.uniform(k2, (n,), jnp.float64) * (t - 0.05)
  r = r.at[1].set(0.0)
  z = jax.random.normal(k3, (n, 3), jnp.float64) * 1.3
  return z, r, t


# --- the MeanFlow target ---------------------------------------------------------------------


def test_exact_average_velocity_is_a_fixed_point_of_the_target():
  # The identity u = v - (t - r)(v d_z u + d_t u) (Eq. 6-8) holds exactly for the exact u and
  # the marginal v; float64 and closed forms, so only rounding separates them (~1e-13).
  with jax.enable_x64(True):
    z, r, t = _points(32)
    u, u_tgt = jax.jit(mf.meanflow_target, static_argnums=0)(exact_u_model(), z, r, t,
                                                             exact_v(z, t))
    np.testing.assert_allclose(u, (z - exact_phi(z, t, r)) / _col(t - r), atol=1e-12)
    np.testing.assert_allclose(u_tgt, u, atol=1e-10)


@pytest.mark.parametrize('wrong', ['instantaneous', 'other_variance'])
def test_a_wrong_average_velocity_is_not_a_fixed_point(wrong):
  # Two wrong fields: u = v(z, t) (ignores r), and the exact u of data with 1.5x the variance.
  # Their targets differ from themselves by O(0.1) on these points (>> the 1e-10 above).
  with jax.enable_x64(True):
    z, r, t = _points(32)
    if wrong == 'instantaneous':
      model = lambda z_, t_, c: exact_v(z_, t_)
    else:
      model = exact_u_model(s2=1.5 * S2)
    u, u_tgt = mf.meanflow_target(model, z, r, t, exact_v(z, t))
    assert float(jnp.max(jnp.abs(u_tgt - u))) > 0.05


def test_target_at_r_equal_t_is_the_given_velocity():
  # At r = t the factor (t - r) vanishes: u_tgt = v whatever the network (flow matching).
  with jax.enable_x64(True):
    z, _, t = _points(8)
    v = jax.random.normal(jax.random.key(5), z.shape, jnp.float64)
    model = lambda z_, t_, c: jnp.tanh(2.0 * z_) * _col(t_) ** 2 + _col(c['delta'])
    _, u_tgt = mf.meanflow_target(model, z, t, t, v)
    np.testing.assert_array_equal(u_tgt, v)


def test_gradients_flow_only_into_the_online_branch():
  # model = theta * u*: the target depends on theta through the jvp, but sits under
  # stop_gradient (Eq. 9); the online u does not. The adaptive weight is stop-gradient too.
  with jax.enable_x64(True):
    z, r, t = _points(8)
    v = exact_v(z, t)

    def branch(theta, which):
      model = lambda z_, t_, c: theta * exact_u_model()(z_, t_, c)
      return jnp.sum(mf.meanflow_target(model, z, r, t, v)[which])

    assert float(jax.grad(branch)(2.0, 1)) == 0.0
    assert abs(float(jax.grad(branch)(2.0, 0))) > 1.0
    assert float(jax.grad(lambda s: mf.adaptive_weight(s, 1.0, 1e-3))(0.7)) == 0.0


def _expected_loss(r, t, s2=S2):
  """E ||u*(z_t, r, t) - u_tgt||² given (r, t) for Gaussian data: u_tgt - u* = (I - (t - r)
  d_z u*) (v_t - v(z_t, t)), with (t - r) d_z u* = 1 - sqrt(R(r) / R(t)) per dimension and
  Var[eps - x0 | z_t] = s² + 1 - (t - a s²)² / R(t) (the joint Gaussian law)."""
  a_t, a_r = 1.0 - _col(t), 1.0 - _col(r)
  big_r_t, big_r_r = a_t**2 * s2 + _col(t) ** 2, a_r**2 * s2 + _col(r) ** 2
  var = s2 + 1.0 - (_col(t) - a_t * s2) ** 2 / big_r_t
  return jnp.sum(big_r_r / big_r_t * var, axis=-1)


def test_loss_with_the_exact_field_matches_its_closed_form():
  # The whole loss (draws of (r, t), z_t, v_t = eps - x0, the jvp tangent) at the exact u*:
  # its batch mean (p = 0) must equal the mean closed-form expectation at the drawn (r, t).
  # 4096 examples: per-example values have relative std ~0.8, so the mean is within ~1.3 %;
  # 5 % is ~4 standard errors. A wrong sign of v or of the interpolant is off by > 50 %.
  with jax.enable_x64(True):
    n = 4096
    x0 = MU + jnp.sqrt(S2) * jax.random.normal(jax.random.key(1), (n, 3), jnp.float64)

    @jax.jit
    def run(x0):
      loss, aux = mf.meanflow_loss(exact_u_model(), x0, jax.random.key(2), ratio=0.5,
                                   time_mean=-0.4, time_std=1.0, p=0.0, c=1e-3)
      # Adaptive weighting (p = 1): sg(w) ||Delta||² = s / (s + c), s = ||Delta||² (sum).
      _, aux1 = mf.meanflow_loss(exact_u_model(), x0[:64], jax.random.key(3), ratio=0.5,
                                 time_mean=-0.4, time_std=1.0, p=1.0, c=1e-3)
      return loss, jnp.mean(_expected_loss(aux['r'], aux['t'])), aux1

    loss, expected, aux1 = run(x0)
    assert abs(float(loss) / float(expected) - 1.0) < 0.05
    s = aux1['mse'] * 3
    np.testing.assert_allclose(aux1['loss_per_example'], s / (s + 1e-3), rtol=1e-12)


def test_r_t_sampling():
  # r <= t always; r != t for `ratio` of the batch (binomial: std 0.0068 at n = 4000, so 0.03
  # is > 4 std); logit-normal draws lie strictly inside (0, 1).
  draw = jax.jit(mf.sample_r_t, static_argnums=1, static_argnames=('ratio', 'mean', 'std'))
  r, t = draw(jax.random.key(0), 4000, ratio=0.25, mean=-0.4, std=1.0)
  assert bool(jnp.all(r <= t)) and bool(jnp.all((r > 0) & (t < 1)))
  assert abs(float(jnp.mean(r < t)) - 0.25) < 0.03
  r0, t0 = draw(jax.random.key(0), 100, ratio=0.0, mean=-0.4, std=1.0)
  np.testing.assert_array_equal(r0, t0)


# --- sampling by jumps -----------------------------------------------------------------------


@pytest.mark.parametrize('steps,times', [(1, None), (4, None), (3, (1.0, 0.7, 0.2, 0.0))])
def test_flow_map_sampling_with_the_exact_field_is_the_exact_ode_endpoint(steps, times):
  # z_0 = z_1 - u(z_1, 0, 1) (Alg. 2) is the exact PF-ODE endpoint; so is any chain of jumps.
  with jax.enable_x64(True):
    z1 = jax.random.normal(jax.random.key(4), (16, 3), jnp.float64)
    flow = mf.make_flow_map(exact_u_model(), LINEAR)
    x0, info = jax.jit(lambda z: fm.flow_map_sample(flow, LINEAR, z, steps=steps, times=times,
                                                    return_trajectory=True))(z1)
    ones = jnp.ones(16, jnp.float64)
    np.testing.assert_allclose(x0, exact_phi(z1, ones, 0 * ones), atol=1e-12)
    assert info['nfe'] == steps and info['trajectory'].shape == (steps + 1, 16, 3)
    np.testing.assert_array_equal(info['trajectory'][0], z1)


def test_flow_map_sample_bad_inputs():
  flow = mf.make_flow_map(exact_u_model(), LINEAR)
  z = jnp.zeros((2, 3))
  for kwargs in [dict(steps=0), dict(steps=2, times=(1.0, 0.0)), dict(steps=2, times=(1, .5, .6)),
                 dict(steps=1, times=(1.5, 0.0))]:
    with pytest.raises(ValueError, match='flow_map_sample'):
      fm.flow_map_sample(flow, LINEAR, z, **kwargs)
  with pytest.raises(ValueError, match='FlowMap'):
    fm.flow_map_sample(lambda x, t, c: (x, x), LINEAR, z, steps=1)


def test_every_plain_sampler_refuses_a_flow_map_in_one_line():
  flow = mf.make_flow_map(lambda x, t, c: x, LINEAR)
  z = jnp.zeros((2, 3))
  for name, sampler in samplers.SAMPLERS.items():
    if sampler is fm.flow_map_sample:   # the one sampler that takes it
      continue
    process = processes.make_process('vp_discrete') if name == 'ddim' else LINEAR
    with pytest.raises(ValueError) as e:
      sampler(flow, process, z, jax.random.key(0), steps=2)
    message = str(e.value)
    assert "'mean_velocity'" in message and 'samplers.flow_map_sample' in message, name
    assert '\n' not in message, name
  with pytest.raises(ValueError, match='flow_map_sample'):
    param.as_denoiser(flow)


def test_objective_refusals():
  with pytest.raises(ValueError, match="process 'linear'"):
    mf.meanflow(processes.make_process('vp_cosine'))
  with pytest.raises(ValueError, match='teacher'):
    mf.meanflow(LINEAR, teacher=param.Denoiser(lambda x, t, c: (x, x)))
  with pytest.raises(ValueError, match='ratio'):
    mf.meanflow(LINEAR, ratio=1.5)
  with pytest.raises(ValueError, match="'velocity'"):
    mf.make_flow_map(lambda x, t, c: x, LINEAR, 'velocity')
  objective = mf.meanflow(LINEAR)
  assert objective.kind == 'mean_velocity' and objective.kind in param.FLOW_MAP_KINDS


# --- the second time input -------------------------------------------------------------------


def _random_params(shapes, key):
  """Random parameters of the given shapes (no init: the output layer would be zero there)."""
  leaves, tree = jax.tree_util.tree_flatten(shapes)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [0.3 * jax.random.normal(k, p.shape, p.dtype)
             for p, k in zip(leaves, keys, strict=True)])


def _check_delta_input(build, x):
  """Off: no new parameters; on: exactly the two delta layers more (same shapes elsewhere), and
  the output moves with delta. Shapes by `eval_shape` (init itself would compile)."""
  t, labels = jnp.full((2,), 0.5), jnp.array([0, 2])
  plain, with_delta = build(), build(delta_input=True)
  s_plain = jax.eval_shape(plain.init, jax.random.key(0), x, t, labels)['params']
  s_delta = jax.eval_shape(with_delta.init, jax.random.key(0), x, t,
                           layers.with_delta(labels, jnp.zeros(2)))
  assert not any('delta' in k for k in s_plain)
  assert set(s_delta['params']) - set(s_plain) == {'delta_dense_0', 'delta_dense_1'}
  assert {k: s_delta['params'][k] for k in s_plain} == s_plain
  p = _random_params(s_delta, jax.random.key(1))
  out = lambda d: with_delta.apply(p, x, t, layers.with_delta(labels, jnp.full((2,), d)))
  assert float(jnp.max(jnp.abs(out(0.0) - out(0.25)))) > 1e-3


def _check_delta_errors(build, x):
  """The cond checks run before any layer: no parameters needed."""
  t, labels = jnp.full((2,), 0.5), jnp.array([0, 2])
  empty = {'params': {}}
  with pytest.raises(ValueError, match='delta_input=True needs'):
    build(delta_input=True).apply(empty, x, t, labels)
  with pytest.raises(ValueError, match='delta_input=False'):
    build().apply(empty, x, t, layers.with_delta(labels, jnp.zeros(2)))
  with pytest.raises(ValueError, match=r'cond\["delta"\] must be'):
    build(delta_input=True).apply(empty, x, t, layers.with_delta(labels, jnp.zeros(3)))


def _mlp(**kw):
  return mlp.MLP(hidden=16, depth=1, num_classes=3, **kw)


def _unet(**kw):
  # num_groups=2 < ch: with one channel per group GroupNorm would erase any time embedding.
  return unet.UNet(ch=8, ch_mult=(1,), attn_resolutions=(), num_groups=2, num_classes=3, **kw)


def test_delta_input_mlp():
  _check_delta_input(_mlp, jnp.ones((2, 4)))
  _check_delta_errors(_mlp, jnp.ones((2, 4)))


def test_delta_input_unet_errors():
  _check_delta_errors(_unet, jnp.ones((2, 4, 4, 1)))


@pytest.mark.slow
def test_delta_input_unet():
  # Slow: a U-Net's eager forward compiles op by op (~4 s on 2 idle cores).
  _check_delta_input(_unet, jnp.ones((2, 4, 4, 1)))


def test_with_delta_merges_into_every_cond():
  d = jnp.ones(2)
  assert layers.with_delta(None, d) == {'delta': d}
  labels = jnp.array([1, 2])
  assert set(layers.with_delta(labels, d)) == {'label', 'delta'}
  merged = layers.with_delta({'label': labels, 'context': jnp.zeros((2, 1, 4))}, d)
  assert set(merged) == {'label', 'context', 'delta'}


# --- a tiny training run (slow) -------------------------------------------------------------


def train_flow_map_2d(objective, num_steps=3000, **model_fields):
  """`num_steps` Adam steps of a delta-input MLP on the eight-Gaussians mixture (the recipe of
  tests/test_train2d.py), then the sliced Wasserstein distance of 5,000 flow-map samples at
  1, 2 and 4 jumps, in multiples of the data floor. Returns `{steps: SW / floor}`."""
  model = mlp.MLP(**{'hidden': 128, 'depth': 3, **model_fields}, delta_input=True)
  params = model.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)),
                      layers.with_delta(None, jnp.zeros((1,))))['params']
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(
      optax.warmup_cosine_decay_schedule(0.0, 2e-3, 100, num_steps, 2e-4)))
  opt_state = opt.init(params)
  apply = lambda p: (lambda x, t, c: model.apply({'params': p}, x, t, c))

  @jax.jit
  def step(params, opt_state, key):
    k_data, k_obj = jax.random.split(key)
    x0 = toy2d.eight_gaussians(k_data, 512)
    loss, grads = jax.value_and_grad(lambda p: objective(apply(p), x0, k_obj)[0])(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for i in range(num_steps):
    params, opt_state, loss = step(params, opt_state, jax.random.fold_in(jax.random.key(1), i))
  assert bool(jnp.isfinite(loss))
  builder = {'mean_velocity': mf.make_flow_map, 'shortcut': sc.make_flow_map}[objective.kind]
  flow = builder(apply(params), objective.process, objective)
  ref = toy2d.eight_gaussians(jax.random.key(4), 5000)
  floor = float(sliced_wasserstein(jax.random.key(6), toy2d.eight_gaussians(
      jax.random.key(5), 5000), ref))
  x1 = jax.random.normal(jax.random.key(2), (5000, 2))
  out = {}
  for steps in (1, 2, 4):
    xs, _ = jax.jit(lambda x, s=steps: fm.flow_map_sample(flow, LINEAR, x, steps=s))(x1)
    out[steps] = float(sliced_wasserstein(jax.random.key(6), xs, ref)) / floor
  return out


# Measured (3,000 steps, seed 0; SW / floor at 1, 2, 4 jumps): MeanFlow with p = 0 and
# time_scale = 1: 1.51, 1.22, 1.29; with the paper's p = 1 (time_scale = 1): 2.17, 2.85, 3.02;
# with the MLP's default time_scale = 1000, p = 0 does not train (5.71: the prior) and p = 1 gives
# 2.92, 3.87, 4.31. Shortcut (defaults, time_scale = 1000): 1.09, 1.03, 0.93.
FEW_STEP_CASES = [
    ('meanflow', mf.meanflow, {'adaptive_p': 0.0}, {'time_scale': 1.0}),
    ('shortcut', sc.shortcut, {}, {}),
]


@pytest.mark.slow
@pytest.mark.parametrize('case', FEW_STEP_CASES, ids=lambda c: c[0])
def test_few_step_model_trains_on_a_2d_mixture(case):
  # The bar of tests/test_train2d.py (SW <= 2.5 x floor; the N(0, I) prior scores 5.5 x), at 1
  # and 4 jumps.
  _, build, options, model_fields = case
  ratios = train_flow_map_2d(build(LINEAR, **options), **model_fields)
  assert ratios[1] <= 2.5 and ratios[4] <= 2.5, ratios
