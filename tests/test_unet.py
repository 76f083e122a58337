"""Tests for the DDPM U-Net: shapes, zero output at init, conditioning, dropout, validation.

XLA compiles slowly on CPU (a U-Net `init` takes 10-25 s at the default optimisation level,
mostly LLVM on the per-parameter RNG code), so the file compiles few programs, all at LLVM
optimisation level 0: one real `init` (for the zero-at-init check) and one `apply` per
configuration. Other parameter sets come from `jax.eval_shape` shapes and one flat
`jax.random.normal` draw.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import MODELS, UNet
from diffusion_jax.models.unet import timestep_embedding

B = 4
DIGIT_SHAPE = (8, 8, 1)  # [H, W, C]
# 2-3x faster compiles for slower code; these tests run each program only once or twice.
_FAST_COMPILE = {'xla_backend_optimization_level': 0}


@functools.partial(jax.jit, static_argnames=('model', 'train'), compiler_options=_FAST_COMPILE)
def _apply(model, params, x, t, cond=None, dropout_key=None, train=False):
  rngs = None if dropout_key is None else {'dropout': dropout_key}
  return model.apply(params, x, t, cond, train=train, rngs=rngs)


def _inputs(key, shape=DIGIT_SHAPE, batch=B):
  kx, kt = jax.random.split(key)
  x = jax.random.normal(kx, (batch, *shape))  # [B, H, W, C]
  t = jax.random.uniform(kt, (batch,))  # [B]
  return x, t


def _random_params(model, key, x, t, cond=None, scale=0.1):
  """Parameters of `model`'s shapes drawn i.i.d. N(0, scale²), with no `init` compile."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, cond)
  return _perturb(jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes), key, scale)


def _perturb(params, key, scale=0.1):
  """`params + N(0, scale²)` noise, drawn as one flat vector and added on the host.

  Eager per-leaf arithmetic would compile one tiny XLA program per parameter shape.
  """
  leaves, treedef = jax.tree.flatten(params)
  sizes = [x.size for x in leaves]
  flat = scale * np.asarray(jax.random.normal(key, (sum(sizes),)))
  chunks = np.split(flat, np.cumsum(sizes)[:-1])
  noisy = [np.asarray(x) + c.reshape(x.shape) for x, c in zip(leaves, chunks, strict=True)]
  return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in noisy])


@pytest.fixture(scope='module')
def digits_init():
  """A real `init` of the default model on digit-shaped inputs: (x, t, params, output)."""
  x, t = _inputs(jax.random.key(0))
  init = jax.jit(UNet().init_with_output, compiler_options=_FAST_COMPILE)
  out, params = init(jax.random.key(1), x, t)
  return x, t, params, out


def test_registry():
  assert MODELS['unet'] is UNet


def test_timestep_embedding():
  t = np.array([0.0, 1.0, 250.0, 999.0], np.float32)
  emb = np.asarray(timestep_embedding(jnp.asarray(t), 6))  # [B, 6]
  freqs = 10_000.0 ** (-np.arange(3) / 3)  # Vaswani et al.: 1 / 10000^(2i / d)
  expected = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], -1)
  np.testing.assert_allclose(emb, expected, rtol=1e-4, atol=1e-4)
  assert timestep_embedding(jnp.asarray(t), 7).shape == (4, 7)  # odd width: zero-padded


def test_bfloat16_compute_keeps_float32_params_and_output():
  model = UNet(dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((2, *DIGIT_SHAPE), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x, t)
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  assert jax.eval_shape(model.apply, params, x, t).dtype == jnp.float32


def test_zero_output_at_init_and_shape(digits_init):
  x, _, params, out = digits_init
  assert out.shape == x.shape and out.dtype == jnp.float32
  # The zero-initialised output conv makes the whole network exactly zero (DDPM / ADM).
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_output_depends_on_t_after_perturbation(digits_init):
  x, _, params, _ = digits_init
  params = _perturb(params, jax.random.key(2))
  # Same image in every row, a different t per row: rows must differ, and only through t.
  x_same = jnp.broadcast_to(x[:1], x.shape)
  t = jnp.array([0.0, 0.25, 0.5, 1.0])
  out = np.asarray(_apply(UNet(), params, x_same, t))
  assert out.shape == x.shape and np.all(np.isfinite(out))
  assert np.abs(out).max() > 1e-3
  for i in range(1, B):
    assert np.abs(out[i] - out[0]).max() > 1e-4, f'output does not depend on t (row {i})'
  # Same t again gives the same output: the row differences are due to t alone.
  out_again = np.asarray(_apply(UNet(), params, x_same, jnp.full((B,), 0.25)))
  np.testing.assert_allclose(out_again[0], out[1], rtol=1e-5, atol=1e-5)


def test_larger_rgb_shape():
  model = UNet(ch=16, ch_mult=(1, 2, 2), attn_resolutions=(8,), num_heads=2, num_groups=4)
  x, t = _inputs(jax.random.key(3), shape=(16, 16, 3), batch=2)
  params = _random_params(model, jax.random.key(4), x, t)
  out = _apply(model, params, x, t)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))


def test_class_conditioning_and_null_label():
  model = UNet(num_classes=10)
  x, _ = _inputs(jax.random.key(5))
  x_same = jnp.broadcast_to(x[:1], x.shape)
  t = jnp.full((B,), 0.5)
  labels = jnp.array([0, 3, 7, 10])  # 10 is the null label
  params = _random_params(model, jax.random.key(6), x, t, labels)
  assert params['params']['class_embed']['embedding'].shape == (11, 4 * model.ch)
  out = np.asarray(_apply(model, params, x_same, t, labels))
  assert np.all(np.isfinite(out))
  for i in range(1, B):
    assert np.abs(out[i] - out[0]).max() > 1e-4, f'output does not depend on the label (row {i})'
  # `cond=None` means the null label.
  out_none = np.asarray(_apply(model, params, x_same, t, None))
  np.testing.assert_allclose(out_none[0], out[3], rtol=1e-5, atol=1e-5)


def test_dropout_only_when_training(digits_init):
  x, t, params, _ = digits_init
  params = _perturb(params, jax.random.key(7))
  model = UNet(dropout=0.5)
  eval_a = np.asarray(_apply(model, params, x, t, dropout_key=jax.random.key(8)))
  eval_b = np.asarray(_apply(model, params, x, t, dropout_key=jax.random.key(9)))
  # train=False is deterministic, ignores the dropout rng and matches the dropout-free model.
  np.testing.assert_array_equal(eval_a, eval_b)
  np.testing.assert_allclose(eval_a, np.asarray(_apply(UNet(), params, x, t)), rtol=1e-5,
                             atol=1e-6)
  jax.eval_shape(model.apply, params, x, t)  # needs no 'dropout' rng when not training
  train_a = np.asarray(_apply(model, params, x, t, dropout_key=jax.random.key(8), train=True))
  train_b = np.asarray(_apply(model, params, x, t, dropout_key=jax.random.key(9), train=True))
  assert np.abs(train_a - eval_a).max() > 1e-4
  assert np.abs(train_a - train_b).max() > 1e-4
  with pytest.raises(Exception, match='dropout'):
    jax.eval_shape(functools.partial(model.apply, train=True), params, x, t)  # no dropout rng


@pytest.mark.parametrize(
    'model, x_shape, t_shape, cond, match',
    [
        (UNet(), (2, 8, 8), (2,), None, r'\[B, H, W, C\]'),
        (UNet(), (2, 7, 8, 1), (2,), None, r'divisible by 2'),
        (UNet(ch_mult=(1, 2, 2)), (2, 10, 8, 1), (2,), None, r'\(2, 10, 8, 1\).*divisible by 4'),
        (UNet(), (2, 8, 8, 1), (3,), None, r't must have shape'),
        (UNet(), (2, 8, 8, 1), (2, 1), None, r't must have shape'),
        (UNet(), (2, 8, 8, 1), (2,), np.array([1, 2]), r'num_classes=0'),
        (UNet(num_classes=10), (2, 8, 8, 1), (2,), np.array([1, 2, 3]), r'class labels must be'),
        (UNet(num_classes=10), (2, 8, 8, 1), (2,), np.array([1.0, 2.0]), r'class labels must be'),
        (UNet(ch=20), (2, 8, 8, 1), (2,), None, r'num_groups=8 must divide'),
        (UNet(num_heads=3), (2, 8, 8, 1), (2,), None, r'num_heads=3 must divide'),
    ])
def test_bad_inputs_raise(model, x_shape, t_shape, cond, match):
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
  t = jax.ShapeDtypeStruct(t_shape, jnp.float32)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.init, jax.random.key(0), x, t, cond)


def _expected_param_count(ch, ch_mult, num_res_blocks, attn_levels, c_in, num_classes=0):
  """Counts the DDPM layout by hand; `attn_levels` are level indices with attention."""
  emb = 4 * ch

  def conv(k, a, b):
    return k * k * a * b + b

  def dense(a, b):
    return a * b + b

  def norm(c):
    return 2 * c

  def res(a, b):
    return (norm(a) + conv(3, a, b) + dense(emb, b) + norm(b) + conv(3, b, b)
            + (conv(1, a, b) if a != b else 0))

  def attn(c):
    return norm(c) + 4 * dense(c, c)

  n = dense(ch, emb) + dense(emb, emb) + conv(3, c_in, ch)
  n += (num_classes + 1) * emb if num_classes else 0
  skips, c = [ch], ch
  for i, m in enumerate(ch_mult):
    for _ in range(num_res_blocks):
      n += res(c, ch * m) + (attn(ch * m) if i in attn_levels else 0)
      c = ch * m
      skips.append(c)
    if i != len(ch_mult) - 1:
      n += conv(3, c, c)
      skips.append(c)
  n += 2 * res(c, c) + attn(c)
  for i, m in reversed(list(enumerate(ch_mult))):
    for _ in range(num_res_blocks + 1):
      n += res(c + skips.pop(), ch * m) + (attn(ch * m) if i in attn_levels else 0)
      c = ch * m
    if i != 0:
      n += conv(3, c, c)
  return n + norm(c) + conv(3, c, c_in)


@pytest.mark.parametrize('kwargs, attn_levels', [
    ({}, (1,)),
    ({'ch': 64, 'num_res_blocks': 2}, (1,)),
    ({'ch_mult': (1, 2, 2), 'attn_resolutions': (2,), 'num_classes': 10}, (2,)),
])
def test_param_count(kwargs, attn_levels):
  model = UNet(**kwargs)
  x = jax.ShapeDtypeStruct((1, *DIGIT_SHAPE), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)  # nothing allocated
  count = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
  print(f'UNet({kwargs}): {count:,} params')
  assert count == _expected_param_count(
      model.ch, model.ch_mult, model.num_res_blocks, attn_levels, 1, model.num_classes)
  if not kwargs:
    assert count == 701_345  # the default digits model
