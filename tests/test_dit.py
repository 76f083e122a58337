"""DiT: patchify / unpatchify, adaLN-Zero (exact zero at init), position embeddings,
conditioning (time, class with null label and label dropout, cross-attended context), bf16,
remat and input errors. Parameter counts and GFLOPs against the paper are in
test_reference_configs.py (the published sizes); here the models are tiny.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import MODELS, DiT
from diffusion_jax.models.dit import dit_variant, sincos_2d
from tests.test_unet import _FAST_COMPILE, _apply, _random_params

B = 4
_TINY = dict(hidden_size=32, depth=2, num_heads=4, num_classes=10, context_dim=6)


def _inputs(key, batch=B, shape=(8, 8, 4)):
  kx, kt = jax.random.split(key)
  return jax.random.normal(kx, (batch, *shape)), jax.random.uniform(kt, (batch,))


def _cond(key, batch=B):
  return {'label': jnp.arange(batch) % 10, 'context': jax.random.normal(key, (batch, 5, 6))}


def test_registry_and_variants():
  assert MODELS['dit'] is DiT
  assert dit_variant('XL/2') == dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2)
  assert dit_variant('S/8')['patch_size'] == 8
  with pytest.raises(ValueError, match=r"'M/2' is not SIZE/PATCH"):
    dit_variant('M/2')


def test_sincos_2d_formula():
  emb = sincos_2d(2, 3, 8)  # [6, 8]: token k is row k // 3, column k % 3
  omega = 1.0 / 10_000 ** (np.arange(2) / 2)
  for k in range(6):
    row, col = divmod(k, 3)
    want = np.concatenate([np.sin(col * omega), np.cos(col * omega),
                           np.sin(row * omega), np.cos(row * omega)])
    np.testing.assert_allclose(emb[k], want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('patch, out_channels', [(2, None), (4, 8)])
def test_zero_at_init_and_shapes(patch, out_channels):
  model = DiT(**_TINY, patch_size=patch, out_channels=out_channels)
  x, t = _inputs(jax.random.key(0))
  init = jax.jit(model.init_with_output, compiler_options=_FAST_COMPILE)
  out, params = init(jax.random.key(1), x, t, _cond(jax.random.key(2)))
  assert out.shape == (B, 8, 8, out_channels or 4) and out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), 0.0)  # adaLN-Zero and a zero final layer
  p = params['params']
  assert p['final_linear']['kernel'].shape == (32, patch * patch * (out_channels or 4))
  assert p['y_embedder']['embedding'].shape == (11, 32)  # 10 classes + the null class
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_patchify_round_trip_is_the_identity_map():
  """Unpatchify inverts patchify: with the x_embedder, blocks and modulation zeroed and the
  final layer set to the inverse of the patch embedding, the network is the identity."""
  p, c, d = 2, 4, 16
  model = DiT(hidden_size=d, depth=1, num_heads=2, patch_size=p)
  x, t = _inputs(jax.random.key(3))
  params = _random_params(model, jax.random.key(4), x, t, scale=0.0)
  # x_embedder: pixel (i, j, ch) of a patch -> feature (i * p + j) * c + ch (d = p * p * c).
  kernel = np.eye(d, dtype=np.float32).reshape(p, p, c, d)
  params['params']['x_embedder']['kernel'] = jnp.asarray(kernel)
  # Final layer: feature f -> output f, undoing the embedding; LayerNorm must be bypassed, so
  # compare against the normalised tokens instead: LN per token, then unpatchify.
  params['params']['final_linear']['kernel'] = jnp.eye(d, dtype=jnp.float32)
  pos = sincos_2d(4, 4, d)  # the fixed position embedding is added to the tokens
  tokens = x.reshape(B, 4, p, 4, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(B, 16, d) + pos
  mean = tokens.mean(-1, keepdims=True)
  normed = (tokens - mean) / jnp.sqrt(tokens.var(-1, keepdims=True) + 1e-6)
  want = normed.reshape(B, 4, 4, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(B, 8, 8, c)
  np.testing.assert_allclose(np.asarray(_apply(model, params, x, t)), np.asarray(want),
                             rtol=1e-4, atol=1e-4)


@pytest.fixture(scope='module')
def tiny():
  model = DiT(**_TINY)
  x, _ = _inputs(jax.random.key(5))
  x = jnp.broadcast_to(x[:1], x.shape)
  t = jnp.full((B,), 0.5)
  cond = _cond(jax.random.key(6))
  return model, _random_params(model, jax.random.key(7), x, t, cond), x, t, cond


def test_time_class_and_context_change_the_output(tiny):
  model, params, x, t, cond = tiny
  out = np.asarray(_apply(model, params, x, t, cond))
  assert np.all(np.isfinite(out)) and np.abs(out).max() > 1e-3
  for i in range(1, B):
    assert np.abs(out[i] - out[0]).max() > 1e-4, f'label has no effect (row {i})'
  assert np.abs(np.asarray(_apply(model, params, x, jnp.full((B,), 0.9), cond)) - out).max() > 1e-4
  moved = dict(cond, context=cond['context'] + 1.0)
  assert np.abs(np.asarray(_apply(model, params, x, t, moved)) - out).max() > 1e-4
  np.testing.assert_array_equal(
      np.asarray(_apply(model, params, x, t, {'context': cond['context']})),
      np.asarray(_apply(model, params, x, t, dict(cond, label=jnp.full((B,), 10)))))


def test_label_dropout_rate_is_honoured():
  """Outputs equal the labelled or the null-label output; the null count is Binomial(n, rate)
  and must lie within 4.5 sd of n * rate (see test_unet_variants.py)."""
  n, rate = 400, 0.25
  model = DiT(hidden_size=16, depth=1, num_heads=2, num_classes=10, label_dropout=rate)
  x, t = _inputs(jax.random.key(8), batch=n, shape=(4, 4, 1))
  labels = jnp.arange(n) % 10
  params = _random_params(model, jax.random.key(9), x[:1], t[:1], labels[:1])
  trained = np.asarray(_apply(model, params, x, t, labels, jax.random.key(10), train=True))
  kept = np.asarray(_apply(model, params, x, t, labels))
  null = np.asarray(_apply(model, params, x, t, None))
  is_kept = np.abs(trained - kept).max((1, 2, 3)) < 1e-5
  is_null = np.abs(trained - null).max((1, 2, 3)) < 1e-5
  assert np.all(is_kept ^ is_null)
  dropped = int(is_null.sum())
  assert abs(dropped - n * rate) < 4.5 * math.sqrt(n * rate * (1 - rate)), dropped


def test_bfloat16_agrees_with_float32(tiny):
  """Same bound as the U-Net's (test_unet_variants.py): 5 % of the output RMS."""
  model, params, x, t, cond = tiny
  out32 = np.asarray(_apply(model, params, x, t, cond))
  out16 = np.asarray(_apply(DiT(**_TINY, dtype='bfloat16'), params, x, t, cond))
  err = np.sqrt(np.mean((out16 - out32) ** 2) / np.mean(out32 ** 2))
  assert out16.dtype == np.float32 and 1e-5 < err < 0.05, err


def test_remat_gives_the_same_outputs_and_gradients(tiny):
  model, params, x, t, cond = tiny

  @functools.partial(jax.jit, static_argnames='m', compiler_options=_FAST_COMPILE)
  def grad(m, params):
    return jax.value_and_grad(lambda p: jnp.sum(m.apply(p, x, t, cond) ** 2))(params)
  (l0, g0), (l1, g1) = grad(model, params), grad(DiT(**_TINY, remat=True), params)
  np.testing.assert_allclose(float(l0), float(l1), rtol=1e-5)
  # Scale-relative: XLA may reassociate float32 sums in the rematerialised blocks.
  scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(g0))
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize('kwargs, x_shape, t_shape, cond, match', [
    ({}, (2, 8, 8), (2,), None, r'x must be \[B, H, W, C\], got shape \(2, 8, 8\)'),
    ({'patch_size': 4}, (2, 6, 8, 4), (2,), None, r'\(2, 6, 8, 4\)\) must be divisible by '
                                                  r'patch_size=4'),
    ({}, (2, 8, 8, 4), (3,), None, r't must have shape \[B\] = \(2,\).*got \(3,\)'),
    ({'num_heads': 5}, (2, 8, 8, 4), (2,), None, r'num_heads=5 must divide hidden_size=32'),
    ({'num_classes': 10}, (2, 8, 8, 4), (2,), jnp.zeros((2, 1), jnp.int32), r'\(2, 1\)'),
    ({'context_dim': 6}, (2, 8, 8, 4), (2,), {'context': jnp.zeros((2, 3, 5))},
     r'got \(2, 3, 5\)'),
])
def test_bad_inputs_name_the_shape(kwargs, x_shape, t_shape, cond, match):
  model = DiT(**{'hidden_size': 32, 'depth': 1, 'num_heads': 4, **kwargs})
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  t = jax.ShapeDtypeStruct(t_shape, jnp.float32)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.init, jax.random.key(0), x, t, cond)
