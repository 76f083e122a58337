"""Super-resolution (diffusion_jax.models.superres): SR3's concatenated low-res condition, Ho et
al.'s Gaussian conditioning augmentation, the cascade's shapes and the data operators.

Tiny networks (a few hundred parameters) and tiny images; no training. Expected values are
written from the papers' formulas here, not through the module's helpers.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import objectives
from diffusion_jax import parameterization
from diffusion_jax import processes
from diffusion_jax import samplers
from diffusion_jax.configuration import ConfigError
from diffusion_jax.data import digits
from diffusion_jax.models import UNet
from diffusion_jax.models import superres


def tiny_unet(out_channels=1):
  return UNet(ch=4, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=2,
              out_channels=out_channels)


class TinyNet(nn.Module):
  """conv_in -> + time and label features -> SiLU -> conv: a network as cheap to compile as
  possible whose first layer is, like the U-Net's, a 3x3 conv named conv_in."""
  out_channels: int = 1

  @nn.compact
  def __call__(self, h, t, cond=None, *, train=False):
    h = nn.Conv(4, (3, 3), name='conv_in')(h)
    h = h + nn.Dense(4)(jnp.stack([t, jnp.cos(t)], -1))[:, None, None, :]
    return nn.Conv(self.out_channels, (3, 3))(nn.silu(h))


def init_random(model, key, *args, scale=0.3):
  """Parameters of `model`'s shapes, every one drawn N(0, scale²) (no init compile; and the
  U-Net's zero-initialised output conv would otherwise hide any dependence on the input)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), *args)['params']
  leaves, treedef = jax.tree_util.tree_flatten(shapes)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(
      treedef, [scale * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves, strict=True)])


class Spy(nn.Module):
  """Returns exactly what the wrapped network would see: the concatenated input."""

  @nn.compact
  def __call__(self, h, t, cond=None, *, train=False):
    assert cond is None
    return h


def cos_sin(s):
  # Ho et al. 2021 §4.3 with the augmentation process alpha = cos(pi s / 2), sigma = sin(pi s / 2)
  return np.cos(0.5 * np.pi * s), np.sin(0.5 * np.pi * s)


def nearest_up(c, f):
  return np.repeat(np.repeat(np.asarray(c), f, axis=1), f, axis=2)


X = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
C = jax.random.uniform(jax.random.key(1), (3, 4, 4, 1), minval=-1, maxval=1)
T = jnp.array([0.1, 0.5, 0.9])


def test_augmentation_formula_and_level_zero_is_the_clean_condition():
  eps = np.asarray(jax.random.normal(jax.random.key(2), C.shape))
  s = np.array([0.0, 0.3, 1.0], np.float32)
  z = np.asarray(superres.augment_condition(C, s, eps))
  a, sg = cos_sin(s.astype(np.float64))
  want = a[:, None, None, None] * np.asarray(C) + sg[:, None, None, None] * eps
  # float32 cos/sin and one multiply-add: a few ulps of values of order 1
  np.testing.assert_allclose(z, want, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(z[0], np.asarray(C)[0])     # s = 0: exactly c (alpha 1, sigma 0)


def test_wrong_resolution_condition_is_a_one_line_error_naming_both_shapes():
  model = superres.SuperResolution(tiny_unet(), factor=2)
  bad = jnp.zeros((3, 8, 8, 1))   # already at the output resolution
  with pytest.raises(ValueError) as e:
    model.init(jax.random.key(0), X, T, bad)
  msg = str(e.value)
  assert '\n' not in msg
  assert '(3, 8, 8, 1)' in msg and 'factor=2' in msg and '[3, 4, 4, C]' in msg
  assert msg.count('(3, 8, 8, 1)') == 2          # the condition's shape and x_t's


def test_level_zero_passes_the_condition_through_exactly_and_reaches_the_network():
  """Sampling with augmentation level 0: the network sees [x_t, nearest-up(c), 0] exactly (its
  output equals the network applied to that input, bit for bit), and changing c changes it."""
  net = TinyNet()
  model = superres.SuperResolution(net, factor=2, augment='gaussian', sample_aug_level=0.0)
  params = init_random(model, jax.random.key(3), X, T, C)
  apply = jax.jit(model.apply)
  out = apply({'params': params}, X, T, C)
  h = np.concatenate([np.asarray(X), nearest_up(C, 2), np.zeros((3, 8, 8, 1), np.float32)], -1)
  ref = jax.jit(net.apply)({'params': params['net']}, jnp.asarray(h), T)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
  other = apply({'params': params}, X, T, C.at[1].multiply(-1.0))
  assert not np.allclose(other[1], out[1], atol=1e-3)       # the condition reaches the output
  np.testing.assert_array_equal(np.asarray(other[0]), np.asarray(out[0]))   # per example


def test_augmentation_off_at_sampling_reproduces_the_plain_concat_model():
  """A model trained with augmentation, sampled at level 0, is the plain SR3 concat model: its
  level channel is zero, so dropping that input channel's weights from the first conv gives an
  `augment='none'` model with the same outputs (to float32 summation order, 1e-6)."""
  aug = superres.SuperResolution(TinyNet(), factor=2, augment='gaussian')
  plain = superres.SuperResolution(TinyNet(), factor=2, augment='none')
  params = init_random(aug, jax.random.key(4), X, T, C)
  kernel = params['net']['conv_in']['kernel']            # [3, 3, C + C' + 1, ch]
  assert kernel.shape[2] == 3
  plain_params = jax.tree_util.tree_map(lambda p: p, params)
  plain_params['net']['conv_in']['kernel'] = kernel[:, :, :2]
  ref_shapes = jax.tree_util.tree_map(jnp.shape, jax.eval_shape(plain.init, jax.random.key(0), X,
                                                                 T, C)['params'])
  assert jax.tree_util.tree_map(jnp.shape, plain_params) == ref_shapes
  np.testing.assert_allclose(jax.jit(aug.apply)({'params': params}, X, T, C),
                             jax.jit(plain.apply)({'params': plain_params}, X, T, C),
                             rtol=0, atol=1e-6)


def test_training_augments_with_the_dropout_rng_at_a_level_given_to_the_network():
  """In training the network sees [x_t, up(z_s), s] with s ~ U[0, aug_max] per example and
  z_s = cos(pi s / 2) c + sin(pi s / 2) eps: recovering eps from z_s and s gives N(0, 1) noise.
  n = 512 examples: the mean of s within 0.05 of aug_max / 2 (its standard error is
  aug_max / sqrt(12 n) = 0.0064); eps's 8,192 values have mean within 0.05 and std within 0.05
  of 1 (standard errors 0.011 and 0.008)."""
  aug_max, n = 0.5, 512
  model = superres.SuperResolution(Spy(), factor=2, augment='gaussian', aug_max=aug_max)
  x = jnp.zeros((n, 8, 8, 1))
  c = jnp.tile(C, (n // 3 + 1, 1, 1, 1))[:n]
  h = np.asarray(model.apply({}, x, jnp.zeros(n), c, train=True,
                             rngs={'dropout': jax.random.key(5)}))
  assert h.shape == (n, 8, 8, 3)
  np.testing.assert_array_equal(h[..., 0], 0.0)                       # x_t untouched
  level = h[..., 2]
  s = level[:, 0, 0]
  np.testing.assert_array_equal(level, np.broadcast_to(s[:, None, None], level.shape))
  assert s.min() >= 0 and s.max() <= aug_max and abs(s.mean() - aug_max / 2) < 0.05
  z = h[:, ::2, ::2, 1:2]                                             # the nearest-up(z) pixels
  np.testing.assert_array_equal(nearest_up(z, 2), h[..., 1:2])
  a, sg = cos_sin(s.astype(np.float64))
  eps = (z - a[:, None, None, None] * np.asarray(c)) / sg[:, None, None, None]
  keep = s > 0.05        # dividing by sigma(s) near 0 amplifies float32 rounding
  assert abs(eps[keep].mean()) < 0.05 and abs(eps[keep].std() - 1.0) < 0.05
  again = model.apply({}, x, jnp.zeros(n), c, train=True, rngs={'dropout': jax.random.key(6)})
  assert not np.allclose(again[..., 2], level)                         # a new draw per key


def test_prepare_cond_augments_once_at_the_sampling_level():
  model = superres.SuperResolution(Spy(), factor=2, augment='gaussian', sample_aug_level=0.3)
  key = jax.random.key(7)
  cond = model.prepare_cond(C, key)
  a, sg = cos_sin(0.3)
  want = a * np.asarray(C) + sg * np.asarray(jax.random.normal(key, C.shape))
  np.testing.assert_allclose(cond['low_res'], want, rtol=0, atol=1e-6)
  np.testing.assert_allclose(cond['aug_level'], [0.3] * 3)
  h = model.apply({}, X, T, cond)   # every sampler step then sees this same z_s and level
  np.testing.assert_array_equal(np.asarray(h[..., 1:2]), nearest_up(cond['low_res'], 2))
  np.testing.assert_allclose(h[..., 2], 0.3)
  with pytest.raises(ValueError, match='prepare_cond'):
    model.apply({}, X, T, C)         # a level > 0 without a key for its noise is refused
  plain = superres.SuperResolution(Spy(), factor=2, augment='none')
  np.testing.assert_array_equal(plain.prepare_cond(C, key)['low_res'], C)


def test_data_operators_downsample_inverts_the_pipelines_upsampling():
  """The 16x16 digits are each 8x8 pixel repeated 2 x 2: 2 x 2 block means give the 8x8 digits
  back exactly, and the model's nearest upsampling of the 8x8 digits is the 16x16 data exactly.
  Bilinear x4 of the 8x8 digits is the pipeline's 32x32 (float32 rounding, 1e-6)."""
  x8, _ = digits.load_digits('test', 8)
  x16, _ = digits.load_digits('test', 16)
  np.testing.assert_array_equal(superres.downsample(x16, 2), x8)
  np.testing.assert_array_equal(np.asarray(superres.upsample_condition(jnp.asarray(x8), 2)), x16)
  x32, _ = digits.load_digits('test', 32)
  np.testing.assert_allclose(superres.upsample_condition(jnp.asarray(x8), 4, 'bilinear'), x32,
                             rtol=0, atol=1e-6)
  # block means of a hand-made image
  img = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
  np.testing.assert_array_equal(superres.downsample(img, 2)[0, :, :, 0],
                                [[2.5, 4.5], [10.5, 12.5]])


def test_consistency_metric_and_builder():
  sr, cond = superres.build_condition(
      {'factor': 2, 'augment': 'gaussian', 'aug_max': 0.4, 'sample_aug_level': 0.1},
      tiny_unet(out_channels=None), (16, 16, 1))
  assert cond.key == 'low_res' and sr.net.out_channels == 1 and sr.out_channels == 1
  assert (sr.factor, sr.augment, sr.aug_max, sr.sample_aug_level) == (2, 'gaussian', 0.4, 0.1)
  x16, _ = digits.load_digits('test', 16)
  np.testing.assert_array_equal(cond(x16), digits.load_digits('test', 8)[0])
  # a sample off its condition by +d on one pixel of the 16x16 image: block mean off by d / 4
  c = cond(x16[:2])
  samples = x16[:2].copy()
  samples[0, 0, 0, 0] += 0.8
  m = cond.metrics(samples, c)
  np.testing.assert_allclose(m['sr_consistency_l2'], 0.2 / 2, rtol=1e-5)      # mean of 0.2, 0
  np.testing.assert_allclose(m['sr_consistency_rmse'], math.sqrt(0.04 / 128), rtol=1e-5)
  with pytest.raises(ConfigError, match='config.superres.augment'):
    superres.build_condition({'augment': 'blur'}, tiny_unet(), (16, 16, 1))
  with pytest.raises(ConfigError, match='config.superres.factor=3'):
    superres.build_condition({'factor': 3}, tiny_unet(), (16, 16, 1))


def test_cascade_shapes_base_8x8_to_sr_16x16():
  """Base 8x8 sample -> prepare_cond (augmentation at the sampling level) -> SR sampler -> 16x16,
  through the library's denoisers and a sampler, compiled as one program."""
  process = processes.make_process('vp_discrete', schedule='linear', num_steps=1000)
  objective = objectives.make_objective('ddpm_eps', process)
  base = TinyNet()
  sr = superres.SuperResolution(TinyNet(), factor=2, augment='gaussian', sample_aug_level=0.2)
  x8, x16 = jnp.zeros((2, 8, 8, 1)), jnp.zeros((2, 16, 16, 1))
  base_params = init_random(base, jax.random.key(8), x8, jnp.zeros(2), scale=0.1)
  sr_params = init_random(sr, jax.random.key(10), x16, jnp.zeros(2), jnp.zeros((2, 8, 8, 1)),
                          scale=0.1)
  ddim = samplers.SAMPLERS['ddim']

  @jax.jit
  def cascade(key):
    k_base, k_aug, k_sr = jax.random.split(key, 3)
    den = parameterization.make_denoiser(
        lambda x, t, c: base.apply({'params': base_params}, x, t, c), process, objective, 1.0)
    low, _ = ddim(den, process, jax.random.normal(k_base, x8.shape), None, steps=2)
    sr_den = parameterization.make_denoiser(
        lambda x, t, c: sr.apply({'params': sr_params}, x, t, c), process, objective, 1.0)
    cond = sr.prepare_cond(low, k_aug)
    high, _ = ddim(sr_den, process, jax.random.normal(k_sr, x16.shape), None, steps=2,
                   cond=cond)
    return low, cond, high

  low, cond, high = cascade(jax.random.key(9))
  assert low.shape == (2, 8, 8, 1) and cond['low_res'].shape == (2, 8, 8, 1)
  assert high.shape == (2, 16, 16, 1) and np.isfinite(np.asarray(high)).all()
  np.testing.assert_allclose(cond['aug_level'], [0.2, 0.2])
  assert digits.to_native(np.asarray(high)).shape == (2, 8, 8, 1)


class Probe(nn.Module):
  """Predicts the upsampled condition the wrapper hands it (channel 1 of its input)."""

  @nn.compact
  def __call__(self, h, t, cond=None, *, train=False):
    return h[..., 1:2]


def test_sampling_applies_prepare_cond_once_per_call():
  """`generation.make_sample_fn` corrupts the condition once, at the sampling level, with noise
  from `fold_in(key, 1)`: an x0-predicting probe that returns its upsampled condition, sampled
  by one DDIM step (whose result is x0_hat), returns nearest-up(cos(pi s/2) c + sin(pi s/2) eps)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from configs import sr_digits  # pylint: disable=g-import-not-at-top
  from diffusion_jax import generation  # pylint: disable=g-import-not-at-top
  from diffusion_jax import run_config  # pylint: disable=g-import-not-at-top
  config = sr_digits.get_config('smoke')
  config.objective.name = 'ddpm_x0'
  config.sample.update(sampler='ddim', steps=1, clip_x0=0.0)
  setup = run_config.build(config, image_shape=(8, 8, 1))
  level = 0.3
  model = superres.SuperResolution(Probe(), factor=2, augment='gaussian', sample_aug_level=level)
  sample = generation.make_sample_fn(dataclasses.replace(setup, model=model))
  key = jax.random.key(13)
  x = sample({}, jnp.zeros((3, 8, 8, 1)), key, C)
  a, sg = cos_sin(level)
  z = a * np.asarray(C) + sg * np.asarray(jax.random.normal(jax.random.fold_in(key, 1), C.shape))
  np.testing.assert_allclose(x, nearest_up(z, 2), rtol=0, atol=1e-5)  # float32 sampler update
