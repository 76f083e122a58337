"""Shortcut models (Frans et al. 2024) against closed forms on Gaussian data (DESIGN §6).

For data `N(mu, diag(s²))` on the linear interpolant (`a(t) = 1 - t`, `sigma(t) = t`), written
out here (not through the code under test):
  flow map    Phi_{t->r}(x) = a(r) mu + sqrt(R(r) / R(t)) (x - a(t) mu),  R = a² s² + t²
  velocity    v(x, t) = -mu + (t - a(t) s²) / R(t) (x - a(t) mu)
  shortcut    s*(x, t, d) = (x - Phi_{t->t-d}(x)) / d  (d > 0),  s*(x, t, 0) = v(x, t)
Two exact jumps of `d` are one of `2d`, so `s*` satisfies the self-consistency target exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import parameterization as param
from diffusion_jax import processes
from diffusion_jax import samplers
from diffusion_jax.distill import shortcut as sc
from diffusion_jax.samplers import flow_map as fm

MU = np.array([0.8, -0.4, 0.3])
S2 = np.array([0.05, 0.3, 1.5])
LINEAR = processes.make_process('linear')
M = 128


def _col(a):
  return a[:, None]


def exact_phi(x, t, r, mu=MU, s2=S2):
  a_t, a_r = 1.0 - _col(t), 1.0 - _col(r)
  big_r_t, big_r_r = a_t**2 * s2 + _col(t) ** 2, a_r**2 * s2 + _col(r) ** 2
  return a_r * mu + jnp.sqrt(big_r_r / big_r_t) * (x - a_t * mu)


def exact_v(x, t, mu=MU, s2=S2):
  a = 1.0 - _col(t)
  return -mu + (_col(t) - a * s2) / (a**2 * s2 + _col(t) ** 2) * (x - a * mu)


def exact_s_model(mu=MU, s2=S2):
  """The exact shortcut as a network `(x, t, cond) -> s*(x, t, cond['delta'])`."""
  def model(x, t, cond):
    d = cond['delta']
    safe = jnp.where(d > 0, d, 1.0)
    s = (x - exact_phi(x, t, t - d, mu, s2)) / _col(safe)
    return jnp.where(_col(d > 0), s, exact_v(x, t, mu, s2))
  return model


def _points(n, key=0):
  """`(x, t, d)` float64: `d` a power of two in [1/M, 1/2], `t` in [2d, 1] (1 included)."""
  k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
  d = 2.0 ** -jax.random.randint(k1, (n,), 1, 8).astype(jnp.float64)
  t = (2 * d + (1 - 2 * d) * jax.random.uniform(k2, (n,), jnp.float64)).at[0].set(1.0)
  return 1.3 * jax.random.normal(k3, (n, 3), jnp.float64), t, d


def test_exact_shortcut_satisfies_self_consistency():
  # (s*(x, t, d) + s*(x', t - d, d)) / 2 = s*(x, t, 2d) exactly (Eq. 4); float64 rounding only.
  with jax.enable_x64(True):
    x, t, d = _points(32)
    target = jax.jit(sc.shortcut_target, static_argnums=0)(exact_s_model(), x, t, d)
    expected = (x - exact_phi(x, t, t - 2 * d)) / _col(2 * d)
    np.testing.assert_allclose(target, expected, atol=1e-10)


@pytest.mark.parametrize('wrong', ['instantaneous', 'scaled'])
def test_a_wrong_shortcut_is_not_self_consistent(wrong):
  # s = v (ignores d) and 1.1 s*: off by > 0.01 here. (The exact shortcut of other Gaussian
  # data would be self-consistent too: the flow-matching part is what pins the data down.)
  with jax.enable_x64(True):
    x, t, d = _points(32)
    model = ((lambda x_, t_, c: exact_v(x_, t_)) if wrong == 'instantaneous'
             else lambda x_, t_, c: 1.1 * exact_s_model()(x_, t_, c))
    target = sc.shortcut_target(model, x, t, d)
    online = model(x, t, {'delta': 2 * d})
    assert float(jnp.max(jnp.abs(target - online))) > 0.01


def test_target_queries_at_d_query_and_moves_by_d():
  # With d_query = 0 (the paper's smallest step) the target is (v(x, t) + v(x - d v, t - d)) / 2.
  with jax.enable_x64(True):
    x, t, d = _points(8)
    target = sc.shortcut_target(exact_s_model(), x, t, d, None, jnp.zeros_like(d))
    v1 = exact_v(x, t)
    expected = (v1 + exact_v(x - _col(d) * v1, t - d)) / 2
    np.testing.assert_allclose(target, expected, atol=1e-12)


def test_exact_velocity_at_zero_step():
  # s(x, t, 0) is the velocity: the flow map's jump with d -> 0 is an Euler step of v.
  with jax.enable_x64(True):
    x, t, _ = _points(8)
    out = exact_s_model()(x, t, {'delta': jnp.zeros_like(t)})
    h = 1e-6   # central difference of the exact trajectory; error O(h²) ~ 1e-12 (rounding 1e-10)
    fd = (exact_phi(x, t, t + h) - exact_phi(x, t, t - h)) / (2 * h)
    np.testing.assert_allclose(out, fd, atol=1e-7)


def test_gradients_flow_only_into_the_online_branch():
  with jax.enable_x64(True):
    x, t, d = _points(8)
    target = lambda theta: jnp.sum(sc.shortcut_target(
        lambda x_, t_, c: theta * exact_s_model()(x_, t_, c), x, t, d))
    assert float(jax.grad(target)(2.0)) == 0.0


def _fm_variance(t, s2=S2):
  """Per-dimension mean of Var[eps - x0 | x_t] (the joint Gaussian law): the flow-matching
  loss of the exact velocity."""
  a = 1.0 - _col(t)
  return jnp.mean(s2 + 1.0 - (_col(t) - a * s2) ** 2 / (a**2 * s2 + _col(t) ** 2), axis=-1)


def test_loss_with_the_exact_shortcut():
  # Self-consistency examples: zero loss where d > 1/M (exact target), small where the target
  # queries d = 0. Flow-matching examples: the closed-form Var[eps - x0 | x_t]; 3072 of them,
  # relative std per example ~0.8, so the mean is within ~1.5 %; 5 % is > 3 standard errors.
  with jax.enable_x64(True):
    n = 4096
    x0 = MU + jnp.sqrt(S2) * jax.random.normal(jax.random.key(1), (n, 3), jnp.float64)

    @jax.jit
    def run(x0):
      _, aux = sc.shortcut_loss(exact_s_model(), x0, jax.random.key(2), fraction=0.25,
                                max_steps=M)
      return aux, _fm_variance(aux['t'])

    aux, fm_var = run(x0)
    is_sc = np.asarray(aux['self_consistency'])
    assert is_sc.sum() == n // 4 and is_sc[: n // 4].all()
    loss, d_in = np.asarray(aux['loss_per_example']), np.asarray(aux['d'])
    assert np.all(d_in[~is_sc] == 0) and np.all(d_in[is_sc] >= 2 / M)
    exact_part = is_sc & (d_in > 2 / M)
    assert exact_part.sum() > 600 and loss[exact_part].max() < 1e-20
    assert loss[is_sc & (d_in == 2 / M)].max() < 1e-2
    ratio = loss[~is_sc].mean() / float(np.asarray(fm_var)[~is_sc].mean())
    assert abs(ratio - 1.0) < 0.05


def test_self_consistency_draws():
  # d in {1/M, ..., 1/2}, every level drawn; t on the 2d-grid with t - 2d >= 0 and t <= 1;
  # d_query = 0 exactly at d = 1/M.
  t, d, dq = jax.jit(sc.sample_self_consistency, static_argnums=(1, 2))(
      jax.random.key(0), 2000, M)
  t, d, dq = (np.asarray(a, np.float64) for a in (t, d, dq))
  levels = np.log2(d * M)
  np.testing.assert_array_equal(levels, np.round(levels))
  assert set(np.round(levels).astype(int)) == set(range(7))
  j = t / (2 * d)
  np.testing.assert_allclose(j, np.round(j), atol=1e-4)
  assert np.all(np.round(j) >= 1) and np.all(t <= 1 + 1e-6)
  np.testing.assert_array_equal(dq == 0, d == 1 / M)
  np.testing.assert_array_equal(dq[d > 1 / M], d[d > 1 / M])


@pytest.mark.parametrize('steps,times', [(1, None), (2, None), (8, None), (2, (0.9, 0.4, 0.0))])
def test_flow_map_sampling_with_the_exact_shortcut_is_exact(steps, times):
  with jax.enable_x64(True):
    x1 = jax.random.normal(jax.random.key(4), (16, 3), jnp.float64)
    flow = sc.make_flow_map(exact_s_model(), LINEAR)
    x0, info = jax.jit(lambda x: fm.flow_map_sample(flow, LINEAR, x, steps=steps,
                                                    times=times))(x1)
    start = 1.0 if times is None else times[0]
    ones = jnp.ones(16, jnp.float64)
    np.testing.assert_allclose(x0, exact_phi(x1, start * ones, 0 * ones), atol=1e-12)
    assert info['nfe'] == steps


def test_refusals():
  with pytest.raises(ValueError, match="process 'linear'"):
    sc.shortcut(processes.make_process('edm'))
  with pytest.raises(ValueError, match='teacher'):
    sc.shortcut(LINEAR, teacher=param.Denoiser(lambda x, t, c: (x, x)))
  for bad in (100, 1, 0):
    with pytest.raises(ValueError, match='max_steps'):
      sc.shortcut(LINEAR, max_steps=bad)
  with pytest.raises(ValueError, match='fraction'):
    sc.shortcut(LINEAR, fraction=-0.1)
  with pytest.raises(ValueError, match="'mean_velocity'"):
    sc.make_flow_map(lambda x, t, c: x, LINEAR, 'mean_velocity')
  flow = sc.make_flow_map(lambda x, t, c: x, LINEAR, sc.shortcut(LINEAR))
  with pytest.raises(ValueError, match=r"'shortcut' model .* samplers\.flow_map_sample"):
    samplers.SAMPLERS['flow_euler'](flow, LINEAR, jnp.zeros((2, 3)), steps=2)
