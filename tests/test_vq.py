"""Tests for the VQ-VAE quantizer (`models.vq`): every expected value is written out here from
the definitions (brute-force numpy distances, hand EMA arithmetic), never through the function
under test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import vq

import error_testing


def _data(seed=0, shape=(2, 3, 5, 4), k=7):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=shape).astype(np.float32)
  codebook = rng.normal(size=(k, shape[-1])).astype(np.float32)
  return z, codebook


def test_quantize_picks_the_nearest_code_and_returns_it():
  z, codebook = _data()
  z_q, indices, _ = vq.quantize(jnp.asarray(z), jnp.asarray(codebook))
  brute = np.array([[np.sum((v - c) ** 2) for c in codebook] for v in z.reshape(-1, 4)])
  assert indices.shape == (2, 3, 5) and indices.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(indices).reshape(-1), np.argmin(brute, axis=1))
  np.testing.assert_array_equal(np.asarray(z_q), codebook[np.asarray(indices)])


def test_quantize_losses_are_the_mean_squared_distance():
  z, codebook = _data(1)
  _, indices, aux = vq.quantize(jnp.asarray(z), jnp.asarray(codebook))
  want = np.mean((z - codebook[np.asarray(indices)]) ** 2)
  np.testing.assert_allclose(aux['codebook_loss'], want, rtol=1e-6)
  np.testing.assert_allclose(aux['commitment_loss'], want, rtol=1e-6)


def test_straight_through_gradient_is_the_identity_and_codebook_learns_only_from_its_loss():
  z, codebook = _data(2)
  w = np.random.default_rng(3).normal(size=z.shape).astype(np.float32)

  def through(z, codebook):
    return jnp.sum(w * vq.quantize(z, codebook)[0])

  dz, dcodebook = jax.grad(through, argnums=(0, 1))(jnp.asarray(z), jnp.asarray(codebook))
  np.testing.assert_array_equal(np.asarray(dz), w)  # exactly: d z_q / d z = I
  np.testing.assert_array_equal(np.asarray(dcodebook), 0.0)

  def loss(name):
    return lambda z, codebook: vq.quantize(z, codebook)[2][name]

  indices = np.asarray(vq.quantize(jnp.asarray(z), jnp.asarray(codebook))[1]).reshape(-1)
  flat = z.reshape(-1, 4)
  # d/de_k mean (z - e)² = sum over vectors given code k of 2 (e_k - z) / (number of elements)
  want = np.zeros_like(codebook)
  for i, v in zip(indices, flat, strict=True):
    want[i] += 2.0 * (codebook[i] - v) / z.size
  dz, dcodebook = jax.grad(loss('codebook_loss'), (0, 1))(jnp.asarray(z), jnp.asarray(codebook))
  np.testing.assert_array_equal(np.asarray(dz), 0.0)
  np.testing.assert_allclose(np.asarray(dcodebook), want, rtol=1e-5, atol=1e-7)
  dz, dcodebook = jax.grad(loss('commitment_loss'), (0, 1))(jnp.asarray(z),
                                                            jnp.asarray(codebook))
  np.testing.assert_allclose(np.asarray(dz), 2.0 * (z - codebook[indices].reshape(z.shape))
                             / z.size, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(dcodebook), 0.0)


def test_perplexity_and_usage():
  codebook = np.eye(4, dtype=np.float32) * 10.0  # code k sits at 10 e_k
  uniform = np.tile(codebook, (3, 1))  # every code used 3 times
  _, _, aux = vq.quantize(jnp.asarray(uniform), jnp.asarray(codebook))
  np.testing.assert_allclose(aux['perplexity'], 4.0, rtol=1e-6)
  assert float(aux['usage']) == 1.0
  one = np.tile(codebook[2:3], (5, 1))
  _, _, aux = vq.quantize(jnp.asarray(one), jnp.asarray(codebook))
  np.testing.assert_allclose(aux['perplexity'], 1.0, rtol=1e-6)
  assert float(aux['usage']) == 0.25
  # codes 0, 0, 0, 1: p = (3/4, 1/4), perplexity exp(-(3/4 log 3/4 + 1/4 log 1/4))
  mixed = codebook[[0, 0, 0, 1]]
  _, _, aux = vq.quantize(jnp.asarray(mixed), jnp.asarray(codebook))
  np.testing.assert_allclose(aux['perplexity'],
                             np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25))), rtol=1e-6)
  assert float(aux['usage']) == 0.5


def test_ema_update_by_hand_with_laplace_smoothing():
  # K = 3, D = 2; vectors go to codes 0, 0, 2; code 1 gets none.
  state = vq.EMAState(cluster_size=jnp.array([2.0, 0.5, 1.0]),
                      embed_sum=jnp.array([[2.0, 0.0], [0.5, 0.5], [-1.0, 1.0]]),
                      codebook=jnp.array([[1.0, 0.0], [1.0, 1.0], [-1.0, 1.0]]))
  z = jnp.array([[1.0, 2.0], [3.0, 0.0], [-2.0, 4.0]])
  indices = jnp.array([0, 0, 2])
  gamma, eps = 0.9, 0.1
  new = vq.ema_update(state, z, indices, decay=gamma, eps=eps)
  n_i = np.array([0.9 * 2.0 + 0.1 * 2, 0.9 * 0.5, 0.9 * 1.0 + 0.1 * 1])  # 2.0, 0.45, 1.0
  m_i = np.array([[0.9 * 2.0 + 0.1 * 4.0, 0.9 * 0.0 + 0.1 * 2.0],
                  [0.9 * 0.5, 0.9 * 0.5],
                  [0.9 * -1.0 + 0.1 * -2.0, 0.9 * 1.0 + 0.1 * 4.0]])
  n = 3.45
  smoothed = (n_i + 0.1) / (n + 3 * 0.1) * n
  np.testing.assert_allclose(new.cluster_size, n_i, rtol=1e-6)
  np.testing.assert_allclose(new.embed_sum, m_i, rtol=1e-6)
  np.testing.assert_allclose(new.codebook, m_i / smoothed[:, None], rtol=1e-6)


def test_ema_update_with_decay_zero_gives_the_batch_means():
  z, codebook = _data(4, shape=(40, 3), k=5)
  state = vq.init_ema_state(jnp.asarray(codebook))
  _, indices, _ = vq.quantize(jnp.asarray(z), state.codebook)
  new = vq.ema_update(state, jnp.asarray(z), indices, decay=0.0, eps=1e-7)
  indices = np.asarray(indices)
  used = np.unique(indices)
  assert len(used) >= 3
  for k in used:
    np.testing.assert_allclose(new.codebook[k], z[indices == k].mean(axis=0), rtol=1e-5,
                               atol=1e-6)
  np.testing.assert_array_equal(new.cluster_size, np.bincount(indices, minlength=5))


def test_restart_replaces_exactly_the_dead_codes_with_batch_rows():
  z, codebook = _data(5, shape=(4, 6, 3), k=6)
  state = vq.EMAState(cluster_size=jnp.array([5.0, 0.01, 2.0, 0.5, 0.99, 1.0]),
                      embed_sum=jnp.asarray(codebook) * 2.0, codebook=jnp.asarray(codebook))
  new = vq.restart_dead_codes(state, jnp.asarray(z), jax.random.key(0), threshold=1.0)
  dead = np.array([False, True, False, True, True, False])
  rows = {tuple(r) for r in z.reshape(-1, 3)}
  for k in range(6):
    if dead[k]:
      assert tuple(np.asarray(new.codebook[k])) in rows
      np.testing.assert_array_equal(new.embed_sum[k], new.codebook[k])
      assert float(new.cluster_size[k]) == 1.0
    else:  # bit-identical
      np.testing.assert_array_equal(new.codebook[k], state.codebook[k])
      np.testing.assert_array_equal(new.embed_sum[k], state.embed_sum[k])
      assert float(new.cluster_size[k]) == float(state.cluster_size[k])
  dead_codes = np.asarray(new.codebook)[dead]
  assert len({tuple(r) for r in dead_codes}) == 3  # drawn without replacement (24 rows >= K)
  again = vq.restart_dead_codes(state, jnp.asarray(z), jax.random.key(0), threshold=1.0)
  for a, b in zip(new, again, strict=True):
    np.testing.assert_array_equal(a, b)
  other = vq.restart_dead_codes(state, jnp.asarray(z), jax.random.key(1), threshold=1.0)
  assert not np.array_equal(other.codebook, new.codebook)


def test_module_holds_the_codebook():
  z = jnp.asarray(_data(6)[0])
  model = vq.VectorQuantizer(num_codes=8, features=4)
  variables = model.init(jax.random.key(0), z)
  codebook = variables['params']['codebook']
  assert codebook.shape == (8, 4) and float(jnp.max(jnp.abs(codebook))) <= 1 / 8
  z_q, _, _ = model.apply(variables, z)
  np.testing.assert_array_equal(z_q, vq.quantize(z, codebook)[0])
  ema = vq.VectorQuantizer(num_codes=8, features=4, ema=True)
  variables = ema.init(jax.random.key(0), z)
  assert 'params' not in variables
  state = vq.EMAState(**variables['vq_ema'])
  np.testing.assert_array_equal(state.cluster_size, 1.0)
  np.testing.assert_array_equal(state.embed_sum, state.codebook)


@pytest.mark.parametrize('call, words', [
    (lambda: vq.quantize(jnp.zeros((2, 3)), jnp.zeros((4, 2))), ['D=2', '(2, 3)']),
    (lambda: vq.quantize(jnp.zeros((2, 3)), jnp.zeros((0, 3))), ['K=0']),
    (lambda: vq.quantize(jnp.zeros((2, 3)), jnp.zeros((3,))), ['[K, D]']),
    (lambda: vq.quantize(jnp.zeros((2, 3), jnp.int32), jnp.zeros((4, 3))), ['floating']),
    (lambda: vq.ema_update(vq.init_ema_state(jnp.zeros((4, 3))), jnp.zeros((2, 3)),
                           jnp.zeros((2,), jnp.int32), decay=1.0), ['decay=1.0']),
    (lambda: vq.ema_update(vq.init_ema_state(jnp.zeros((4, 3))), jnp.zeros((2, 3)),
                           jnp.zeros((2,), jnp.int32), decay=-0.1), ['decay=-0.1']),
    (lambda: vq.ema_update(vq.init_ema_state(jnp.zeros((4, 3))), jnp.zeros((2, 3)),
                           jnp.zeros((2,), jnp.int32), eps=0.0), ['eps=0.0']),
    (lambda: vq.ema_update(vq.init_ema_state(jnp.zeros((4, 3))), jnp.zeros((2, 3)),
                           jnp.zeros((3,), jnp.int32)), ['indices', '(3,)']),
    (lambda: vq.ema_update(vq.init_ema_state(jnp.zeros((4, 3))), jnp.zeros((2, 5)),
                           jnp.zeros((2,), jnp.int32)), ['D=3']),
    (lambda: vq.restart_dead_codes(vq.init_ema_state(jnp.zeros((4, 3))), jnp.zeros((2, 3)),
                                   jax.random.key(0), threshold=-1.0), ['threshold=-1.0']),
    (lambda: vq.VectorQuantizer(0, 3).init(jax.random.key(0), jnp.zeros((2, 3))),
     ['num_codes=0']),
])
def test_bad_inputs_are_one_line_errors(call, words):
  error_testing.assert_one_line_error(call, words)
