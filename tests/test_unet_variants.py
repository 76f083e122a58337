"""U-Net variants (DDPM++, ADM), conditioning (labels, label dropout, cross-attention), Fourier
noise features, bfloat16 compute and rematerialisation.

Compiles are few and at LLVM optimisation level 0 (see test_unet.py); parameters for the
numerical checks are drawn from `jax.eval_shape` shapes, not from a compiled `init`.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import UNet, layers
from tests.test_unet import _FAST_COMPILE, _apply, _random_params

B = 4
SHAPE = (8, 8, 1)
# Every switch on: BigGAN up/down blocks with 1x1 skip convs, adaptive GroupNorm, skip rescale,
# NCSN++ decoder attention, Fourier features, 4-channel heads, classes, a context, 2C outputs.
_ALL = dict(ch=8, num_groups=4, resblock_updown=True, resample_shortcut_conv=True,
            scale_shift_norm=True, skip_rescale=True, decoder_attn_per_level=True,
            embedding='fourier', num_head_channels=4, num_classes=10, context_dim=6,
            out_channels=2)


def _cond(key, batch=B, length=5, dim=6, labels=None):
  context = jax.random.normal(key, (batch, length, dim))  # [B, L, Dc]
  labels = jnp.arange(batch) % 10 if labels is None else labels
  return {'label': labels, 'context': context}


def _inputs(key, batch=B, shape=SHAPE):
  kx, kt = jax.random.split(key)
  return jax.random.normal(kx, (batch, *shape)), jax.random.uniform(kt, (batch,))


@pytest.mark.slow   # ~8-16 s; moved out of the default run (its 10-minute budget)
def test_all_switches_zero_at_init_and_output_channels():
  model = UNet(**_ALL)
  x, t = _inputs(jax.random.key(0))
  init = jax.jit(model.init_with_output, compiler_options=_FAST_COMPILE)
  out, params = init(jax.random.key(1), x, t, _cond(jax.random.key(2)))
  assert out.shape == (B, 8, 8, 2) and out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), 0.0)  # zero residual branches and head
  p = params['params']
  assert 'shortcut' in p['down_0_downsample'] and 'shortcut' in p['up_1_upsample']
  assert p['down_0_res_0']['temb_proj']['kernel'].shape == (32, 16)  # scale and shift: 2 x 8
  assert 'up_0_attn' not in p and 'up_1_attn' in p  # one decoder attention per 4x4 level
  assert p['mid_attn']['query']['kernel'].shape == (16, 4, 4)  # 16 channels / 4 per head
  assert 'cross_attn' in p['mid_attn']


@pytest.mark.parametrize('kwargs', [
    dict(resblock_updown=True),
    dict(resblock_updown=True, resample_shortcut_conv=True, skip_rescale=True,
         decoder_attn_per_level=True),
    dict(resblock_updown=True, scale_shift_norm=True, num_head_channels=8),
    dict(resample_with_conv=False, embedding='fourier'),
    dict(ch_mult=(1, 2, 2), attn_resolutions=(8, 2), out_channels=2),
])
def test_variant_shapes(kwargs):
  model = UNet(**kwargs)
  x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x, t)
  out = jax.eval_shape(model.apply, params, x, t)
  assert out.shape == (2, 8, 8, kwargs.get('out_channels', 1)) and out.dtype == jnp.float32


def test_resblock_updown_matches_hand_count():
  """The ADM block with resampling has no skip conv (channels agree); NCSN++'s has a 1x1 one."""
  x = jax.ShapeDtypeStruct((1, *SHAPE), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)

  def count(**kw):
    shapes = jax.eval_shape(UNet(**kw).init, jax.random.key(0), x, t)
    return sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
  emb = 128  # 4 * ch; level 0 has 32 channels, level 1 has 64
  conv3 = lambda a, b: 9 * a * b + b
  resblock = lambda c: 2 * (2 * c) + 2 * conv3(c, c) + emb * c + c  # norms, convs, temb
  base = count()
  # The updown model swaps the down conv (32 ch) and the up conv (64 ch) for ResBlocks.
  updown = base - conv3(32, 32) - conv3(64, 64) + resblock(32) + resblock(64)
  assert count(resblock_updown=True) == updown
  assert count(resblock_updown=True, resample_shortcut_conv=True) == (
      updown + (32 * 32 + 32) + (64 * 64 + 64))


def test_fourier_embedding_formula():
  t = jnp.array([0.0, 0.3, 1.0])
  emb = np.asarray(layers.fourier_embedding(t, 8, scale=16.0))
  w = 16.0 * np.asarray(jax.random.normal(jax.random.key(0), (4,)))
  args = 2 * np.pi * np.asarray(t)[:, None] * w
  np.testing.assert_allclose(emb, np.concatenate([np.sin(args), np.cos(args)], -1), atol=1e-4)
  # Fixed frequencies: a second call (another trace) gives the same features.
  np.testing.assert_array_equal(emb, np.asarray(jax.jit(layers.fourier_embedding,
                                                        static_argnums=1)(t, 8)))


@pytest.fixture(scope='module')
def all_switches():
  model = UNet(**_ALL)
  x, _ = _inputs(jax.random.key(3))
  x = jnp.broadcast_to(x[:1], x.shape)  # one image in every row
  t = jnp.full((B,), 0.5)
  cond = _cond(jax.random.key(4))
  params = _random_params(model, jax.random.key(5), x, t, cond)
  return model, params, x, t, cond


def test_time_class_and_context_change_the_output(all_switches):
  model, params, x, t, cond = all_switches
  out = np.asarray(_apply(model, params, x, t, cond))
  assert np.all(np.isfinite(out)) and np.abs(out).max() > 1e-3
  for i in range(1, B):  # rows differ only in their label
    assert np.abs(out[i] - out[0]).max() > 1e-4, f'label has no effect (row {i})'
  other_t = np.asarray(_apply(model, params, x, jnp.full((B,), 0.25), cond))
  assert np.abs(other_t - out).max() > 1e-4
  other_context = dict(cond, context=cond['context'] + 1.0)
  assert np.abs(np.asarray(_apply(model, params, x, t, other_context)) - out).max() > 1e-4
  # cond without a label is the null label, exactly.
  no_label = {'context': cond['context']}
  null = dict(cond, label=jnp.full((B,), 10))
  np.testing.assert_array_equal(np.asarray(_apply(model, params, x, t, no_label)),
                                np.asarray(_apply(model, params, x, t, null)))


def test_context_mask_hides_masked_tokens(all_switches):
  model, params, x, t, cond = all_switches
  mask = jnp.array([True, True, True, False, False])[None].repeat(B, 0)  # [B, L]
  masked = dict(cond, context_mask=mask)
  out = np.asarray(_apply(model, params, x, t, masked))
  # Changing only the masked tokens leaves the output unchanged (their weights are exactly 0) …
  changed = cond['context'].at[:, 3:].add(5.0)
  np.testing.assert_allclose(np.asarray(_apply(model, params, x, t, dict(masked, context=changed))),
                             out, rtol=1e-6, atol=1e-6)
  # … while changing a visible one does not.
  changed = cond['context'].at[:, 0].add(5.0)
  out_visible = np.asarray(_apply(model, params, x, t, dict(masked, context=changed)))
  assert np.abs(out_visible - out).max() > 1e-4


@pytest.mark.slow  # suite time; test_dit.py checks the shared label dropout
def test_label_dropout_rate_is_honoured():
  """With train=True each label is replaced by the null label independently w.p. `rate`.

  Each example's output must equal either its labelled or its null-label output; the number of
  null ones is Binomial(n, rate): the test fails if it is more than 4.5 sd off (p < 1e-5), e.g.
  when dropout is ignored (0 drops) or applied always.
  """
  n, rate = 400, 0.3
  model = UNet(ch=8, num_groups=4, num_classes=10, label_dropout=rate)
  x, t = _inputs(jax.random.key(6), batch=n)
  labels = jnp.arange(n) % 10
  params = _random_params(model, jax.random.key(7), x[:1], t[:1], labels[:1])
  trained = np.asarray(_apply(model, params, x, t, labels, jax.random.key(8), train=True))
  kept = np.asarray(_apply(model, params, x, t, labels))
  null = np.asarray(_apply(model, params, x, t, None))
  axes = (1, 2, 3)
  is_kept = np.abs(trained - kept).max(axes) < 1e-5
  is_null = np.abs(trained - null).max(axes) < 1e-5
  assert np.all(is_kept ^ is_null), 'each output must be the labelled or the null one'
  dropped = int(is_null.sum())
  sd = math.sqrt(n * rate * (1 - rate))
  assert abs(dropped - n * rate) < 4.5 * sd, f'{dropped} of {n} labels dropped at rate {rate}'
  # Evaluation never drops.
  np.testing.assert_array_equal(np.asarray(_apply(model, params, x, t, labels, jax.random.key(8))),
                                kept)


@pytest.mark.slow  # shares layers._drop with the label-dropout test above
def test_context_dropout_zeroes_the_context():
  n = 64
  model = UNet(ch=8, num_groups=4, context_dim=3, context_dropout=0.5)
  x, t = _inputs(jax.random.key(9), batch=n)
  context = jax.random.normal(jax.random.key(10), (n, 2, 3)) + 1.0
  params = _random_params(model, jax.random.key(11), x[:1], t[:1], {'context': context[:1]})
  trained = np.asarray(_apply(model, params, x, t, {'context': context}, jax.random.key(12),
                              train=True))
  kept = np.asarray(_apply(model, params, x, t, {'context': context}))
  zero = np.asarray(_apply(model, params, x, t, {'context': jnp.zeros_like(context)}))
  is_kept = np.abs(trained - kept).max((1, 2, 3)) < 1e-5
  is_zero = np.abs(trained - zero).max((1, 2, 3)) < 1e-5
  assert np.all(is_kept ^ is_zero) and 0 < is_zero.sum() < n


def test_bfloat16_agrees_with_float32(all_switches):
  """bf16 keeps 8 significant bits: each rounding errs by <= 2^-9 relative. Over the ~40
  rounded ops on the longest path, independent errors grow like sqrt(40) * 2^-9 ≈ 1.2 %
  of the activations' scale; the bound is 5 % of the output's RMS."""
  model, params, x, t, cond = all_switches
  out32 = np.asarray(_apply(model, params, x, t, cond))
  out16 = np.asarray(_apply(UNet(**_ALL, dtype='bfloat16'), params, x, t, cond))
  assert out16.dtype == np.float32
  rms = np.sqrt(np.mean(out32 ** 2))
  err = np.sqrt(np.mean((out16 - out32) ** 2)) / rms
  assert err < 0.05, f'bf16 relative RMS error {err:.4f}'
  assert err > 1e-5, 'bf16 output equals float32: the compute dtype was not applied'


@pytest.mark.slow  # ~20 s; test_dit.py's remat test keeps the same check in the default run
def test_remat_gives_the_same_outputs_and_gradients():
  kw = dict(ch=8, num_groups=4, dropout=0.3, num_classes=10, label_dropout=0.2)
  x, t = _inputs(jax.random.key(13))
  labels = jnp.arange(B)
  params = _random_params(UNet(**kw), jax.random.key(14), x, t, labels)

  @functools.partial(jax.jit, static_argnames='model', compiler_options=_FAST_COMPILE)
  def loss_and_grad(model, params):
    def loss(p):
      out = model.apply(p, x, t, labels, train=True, rngs={'dropout': jax.random.key(15)})
      return jnp.sum(out ** 2), out
    return jax.value_and_grad(loss, has_aux=True)(params)

  (l0, out0), g0 = loss_and_grad(UNet(**kw), params)
  (l1, out1), g1 = loss_and_grad(UNet(**kw, remat=True), params)
  # Mathematically identical; XLA fuses the rematerialised blocks differently, so float32 sums
  # may be reassociated (measured: 4e-8 on outputs of scale 0.1, i.e. a few ulps). A changed
  # dropout mask or a dropped block would differ at the scale of the values themselves.
  _close_at_scale(out0, out1)
  np.testing.assert_allclose(float(l0), float(l1), rtol=1e-5)
  # Gradients at the scale of the whole gradient (some leaves, e.g. biases feeding a GroupNorm,
  # are exactly zero in exact arithmetic and float noise of 1e-12 in either run).
  scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(g0))
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True):
    _close_at_scale(a, b, scale=scale)


def _close_at_scale(a, b, rel=1e-5, scale=None):
  a, b = np.asarray(a), np.asarray(b)
  scale = np.abs(a).max() if scale is None else scale
  np.testing.assert_allclose(a, b, rtol=0, atol=rel * scale)


@pytest.mark.parametrize('cond, match', [
    ({'label': jnp.zeros((2,), jnp.float32)}, r'integers of shape \[B\] = \(2,\), got float32'),
    ({'label': jnp.zeros((3,), jnp.int32)}, r'\(3,\)'),
    ({'context': jnp.zeros((2, 5))}, r'context must be \[B, L, context_dim\].*got \(2, 5\)'),
    ({'context': jnp.zeros((2, 5, 4))}, r'got \(2, 5, 4\)'),
    ({'context': jnp.zeros((2, 5, 6)), 'context_mask': jnp.ones((2, 4), bool)},
     r'context_mask must be bool \[B, L\].*\(2, 4\)'),
    ({'label': jnp.zeros((2,), jnp.int32)}, r'context_dim=6 needs'),  # a label but no context
    ({'labels': jnp.zeros((2,), jnp.int32)}, r"unknown cond keys \['labels'\]"),
    (None, r'context_dim=6 needs cond\["context"\]'),
])
def test_bad_conditioning_names_the_shape(cond, match):
  model = UNet(ch=8, num_groups=4, num_classes=10, context_dim=6)
  x = jax.ShapeDtypeStruct((2, *SHAPE), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.init, jax.random.key(0), x, t, cond)


@pytest.mark.parametrize('kwargs, match', [
    (dict(context_dim=0), r'a context was given but context_dim=0'),
    (dict(dtype='int32'), r"dtype='int32' is not a floating dtype"),
    (dict(embedding='learned'), r"embedding='learned'"),
    (dict(label_dropout=1.0), r'label_dropout=1.0 must lie in \[0, 1\)'),
    (dict(num_head_channels=5), r'num_head_channels=5 must divide the 16 channels'),
])
def test_bad_model_settings(kwargs, match):
  model = UNet(ch=8, num_groups=4, **kwargs)
  x = jax.ShapeDtypeStruct((2, *SHAPE), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  cond = {'context': jnp.zeros((2, 3, 4))} if 'context_dim' in kwargs else None
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(model.init, jax.random.key(0), x, t, cond)

