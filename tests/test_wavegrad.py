"""Tests for WaveGrad (Chen et al. 2021): a numpy port of the paper's blocks, FiLM, the noise
level, locality of the mel conditioning, gradients and input checks.

One tiny configuration at one input shape, so the file compiles one forward and one gradient
program (at LLVM optimisation level 0). The oracle `_reference` re-implements Fig. 3-6 in plain
numpy from the parameter tree, independently of the module's helpers.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import MODELS
from diffusion_jax.models.wavegrad import WaveGrad, positional_encoding

_FAST_COMPILE = {'xla_backend_optimization_level': 0}
B, F, N_MELS = 2, 32, 3
FACTORS = (2, 3)
L = F * 6
# Distinct widths everywhere, so a FiLM wired to the wrong resolution fails on shapes or values;
# the odd DBlock width 5 exercises the zero-padded odd positional encoding.
TINY = dict(factors=FACTORS, n_mels=N_MELS, upsample_channels=(6, 4), downsample_channels=(5,),
            first_channels=4, mel_channels=7)


def _tent(t):
  """A noise level with equal values at t and 1 - t: t = 0.25 and 0.75 both give 0.5 exactly."""
  return 1.0 - jnp.abs(2.0 * t - 1.0)


MODEL = WaveGrad(**TINY, noise_level=_tent)


@functools.partial(jax.jit, static_argnames='model', compiler_options=_FAST_COMPILE)
def _apply(model, params, x, t, mel):
  return model.apply(params, x, t, mel)


def _inputs(seed=0):
  kx, kt, km = jax.random.split(jax.random.key(seed), 3)
  x = np.asarray(jax.random.normal(kx, (B, L, 1)))
  t = np.asarray(jax.random.uniform(kt, (B,)))
  mel = np.asarray(jax.random.normal(km, (B, F, N_MELS)))
  return x, t, mel


@pytest.fixture(scope='module')
def params():
  """Parameters of MODEL's shapes, every leaf (biases included) N(0, 0.3^2): no `init` compile,
  and nonzero biases so that a wrongly dropped bias shows."""
  x, t, mel = _inputs()
  shapes = jax.eval_shape(MODEL.init, jax.random.key(0), x, t, mel)
  leaves, treedef = jax.tree.flatten(shapes)
  rng = np.random.default_rng(0)
  return jax.tree.unflatten(treedef, [0.3 * rng.standard_normal(s.shape).astype(np.float32)
                                      for s in leaves])


# ---- numpy oracle ----------------------------------------------------------------------------

def _np_conv(h, p, dilation=1):
  """Zero-padded 'same' 1-D conv: out[:, i] = sum_j h[:, i + (j - (k-1)/2) d] @ W[j] + b."""
  w, b = np.asarray(p['kernel'], np.float64), np.asarray(p['bias'], np.float64)
  k = w.shape[0]
  pad = dilation * (k - 1) // 2
  hp = np.pad(h, ((0, 0), (pad, pad), (0, 0)))
  n = h.shape[1]
  return sum(hp[:, j * dilation:j * dilation + n] @ w[j] for j in range(k)) + b


def _np_lrelu(h):
  return np.where(h >= 0, h, 0.2 * h)


def _np_pe(n, dim, scale=5000.0):
  half = dim // 2
  w = 10000.0 ** (-np.arange(half) / half)
  a = scale * n[:, None] * w[None, :]
  pe = np.concatenate([np.sin(a), np.cos(a)], axis=1)
  return np.pad(pe, ((0, 0), (0, dim % 2)))


def _reference(params, x, noise, mel, factors=FACTORS):
  """WaveGrad's forward pass (Chen et al. 2021, Fig. 3-6) in float64 numpy."""
  p = params['params']
  h = _np_conv(np.asarray(x, np.float64), p['wave_conv'])
  feats = [h]
  for i, s in enumerate(reversed(factors[1:])):                    # DBlocks, Fig. 4
    q = p[f'dblock_{i}']
    res = _np_conv(h, q['residual'])
    res = res.reshape(res.shape[0], -1, s, res.shape[2]).mean(2)
    h = h.reshape(h.shape[0], -1, s, h.shape[2]).mean(2)
    for j, d in enumerate((1, 2, 4)):
      h = _np_conv(_np_lrelu(h), q[f'conv_{j}'], d)
    h = h + res
    feats.append(h)
  u = _np_conv(np.asarray(mel, np.float64), p['mel_conv'])
  for i, s in enumerate(factors):
    d = feats[len(factors) - 1 - i]
    q = p[f'film_{i}']                                             # FiLM, Fig. 5
    g = _np_lrelu(_np_conv(d, q['conv'])) + _np_pe(noise, d.shape[2])[:, None, :]
    scale, shift = _np_conv(g, q['scale']), _np_conv(g, q['shift'])
    q = p[f'ublock_{i}']                                           # UBlock, Fig. 3
    up = lambda v, s=s: np.repeat(v, s, axis=1)
    y = _np_conv(up(u), q['residual']) + _np_conv(
        _np_lrelu(scale * _np_conv(up(_np_lrelu(u)), q['conv_0'], 1) + shift), q['conv_1'], 2)
    z = _np_conv(_np_lrelu(scale * y + shift), q['conv_2'], 4)
    u = y + _np_conv(_np_lrelu(scale * z + shift), q['conv_3'], 8)
  return _np_conv(u, p['out_conv'])


# ---- tests -----------------------------------------------------------------------------------

def test_registered():
  assert MODELS['wavegrad'] is WaveGrad


def test_positional_encoding_by_hand():
  # w = 10000^(-i/2) = (1, 0.01) for dim 4; 5000 * (0.25, 0.5) = (1250, 2500), exact in float32.
  # Tolerance: the float32 frequency 0.01 (relative error ~6e-8) times 2500 and sin/cos of
  # arguments ~2500 (ulp 2.4e-4) give errors ~1e-4.
  got = np.asarray(positional_encoding(jnp.array([0.25, 0.5]), 4))
  want = [[np.sin(1250.0), np.sin(12.5), np.cos(1250.0), np.cos(12.5)],
          [np.sin(2500.0), np.sin(25.0), np.cos(2500.0), np.cos(25.0)]]
  np.testing.assert_allclose(got, want, atol=5e-4)
  odd = np.asarray(positional_encoding(jnp.array([0.5]), 5, scale=2.0))  # args 1.0, 0.01
  np.testing.assert_allclose(odd, [[np.sin(1.0), np.sin(0.01), np.cos(1.0), np.cos(0.01), 0.0]],
                             atol=1e-6)


def test_matches_numpy_port_of_the_paper(params):
  x, t, mel = _inputs()
  got = np.asarray(_apply(MODEL, params, x, t, mel))
  assert got.shape == (B, L, 1)
  want = _reference(params, x, 1.0 - np.abs(2.0 * t.astype(np.float64) - 1.0), mel)
  # float32 through ~20 layers: relative error ~1e-7 per layer; but the positional encoding's
  # arguments (up to 5000) carry an absolute error up to ulp(5000) / 2 = 2.4e-4 (float32), which
  # the FiLM scales multiply into the output (observed up to ~5e-5 of the output's peak).
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_noise_level_enters_only_through_noise_level(params):
  x, _, mel = _inputs()
  both = np.asarray(_apply(MODEL, params, x, np.array([0.25, 0.75], np.float32), mel))
  other = np.asarray(_apply(MODEL, params, x, np.array([0.25, 0.6], np.float32), mel))
  x_same = np.concatenate([x[:1], x[:1]])
  mel_same = np.concatenate([mel[:1], mel[:1]])
  same = np.asarray(_apply(MODEL, params, x_same, np.array([0.25, 0.75], np.float32), mel_same))
  np.testing.assert_array_equal(same[0], same[1])                 # _tent(0.25) == _tent(0.75)
  np.testing.assert_array_equal(both[0], other[0])
  assert np.abs(both[1] - other[1]).max() > 1e-3                  # 0.5 vs 0.8: a different output
  # noise_level=None encodes t itself: the same as a noise_level that is the identity.
  raw = WaveGrad(**TINY)
  t = np.array([0.3, 0.9], np.float32)
  np.testing.assert_array_equal(np.asarray(_apply(raw, params, x, t, mel)),
                                np.asarray(_apply(WaveGrad(**TINY, noise_level=lambda s: s),
                                                  params, x, t, mel)))
  np.testing.assert_allclose(np.asarray(_apply(raw, params, x, t, mel)),
                             _reference(params, x, t.astype(np.float64), mel),
                             rtol=1e-4, atol=1e-4 * np.abs(both).max())


def _set_film(params, scale_bias):
  """FiLM outputs fixed to scale = `scale_bias`, shift = 0 in every UBlock."""
  p = jax.tree.map(np.array, params)
  for i in range(len(FACTORS)):
    film = p['params'][f'film_{i}']
    for name, bias in (('scale', scale_bias), ('shift', 0.0)):
      film[name]['kernel'][:] = 0.0
      film[name]['bias'][:] = bias
  return p


def test_film_modulates_the_ublocks(params):
  x, t, mel = _inputs()
  x2, t2, _ = _inputs(seed=1)
  # scale = shift = 0: the UBlocks' modulated branches are constant, so the output no longer
  # depends on the noisy waveform or the noise level (only through FiLM do they enter).
  off = _set_film(params, 0.0)
  a = np.asarray(_apply(MODEL, off, x, t, mel))
  np.testing.assert_array_equal(a, np.asarray(_apply(MODEL, off, x2, t2, mel)))
  # scale = 1, shift = 0: the identity modulation; still independent of x and t, but the
  # branches now pass the mel through, so the output changes (and matches the port).
  ident = _set_film(params, 1.0)
  b = np.asarray(_apply(MODEL, ident, x, t, mel))
  np.testing.assert_array_equal(b, np.asarray(_apply(MODEL, ident, x2, t2, mel)))
  assert np.abs(a - b).max() > 1e-2
  want = _reference(ident, x, 1.0 - np.abs(2.0 * t.astype(np.float64) - 1.0), mel)
  np.testing.assert_allclose(b, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  # With the trained-like (random) FiLM, the waveform does reach the output.
  assert np.abs(np.asarray(_apply(MODEL, params, x, t, mel))
                - np.asarray(_apply(MODEL, params, x2, t, mel))).max() > 1e-3


def test_mel_frame_reaches_only_its_receptive_field(params):
  x, t, mel = _inputs()
  f = F // 2
  bumped = mel.copy()
  bumped[:, f] += 10.0
  diff = np.abs(np.asarray(_apply(MODEL, params, x, t, bumped))
                - np.asarray(_apply(MODEL, params, x, t, mel)))[..., 0]  # [B, L]
  # Support of frame f, by hand: the 3-tap mel conv reaches frames f-1..f+1; a UBlock with
  # factor s maps samples [a, b] to [a s, (b + 1) s - 1] and widens them by its dilated taps,
  # 1 + 2 + 4 + 8 = 15 each side; the 3-tap output conv adds 1 each side.
  lo, hi = f - 1, f + 1
  for s in FACTORS:
    lo, hi = lo * s - 15, (hi + 1) * s - 1 + 15
  lo, hi = lo - 1, hi + 1
  assert (lo, hi) == (29, 168) and 0 < lo and hi < L - 1
  assert (diff[:, :lo] == 0).all() and (diff[:, hi + 1:] == 0).all()
  assert (diff[:, [lo, hi]] > 0).all()                            # the support is exact
  assert (diff[:, f * 6:(f + 1) * 6] > 1e-3).all()                # the frame's own hop


def test_gradients_reach_every_parameter(params):
  x, t, mel = _inputs()
  w = np.random.default_rng(1).standard_normal((B, L, 1)).astype(np.float32)
  loss = lambda p: jnp.sum(MODEL.apply(p, x, t, mel) * w)
  grads = jax.jit(jax.grad(loss), compiler_options=_FAST_COMPILE)(params)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  assert len(flat) == 2 * (1 + 4 + 1 + 3 * 2 + 5 * 2 + 1)  # conv kernels and biases
  dead = [jax.tree_util.keystr(k) for k, g in flat if not np.abs(np.asarray(g)).max() > 0]
  assert not dead, dead


def test_bad_inputs(params):
  x, t, mel = _inputs()
  with pytest.raises(ValueError, match=r'log-mel \(2, 31, 3\) does not fit the waveform '
                                       r'\(2, 192, 1\)'):
    MODEL.apply(params, x, t, mel[:, :-1])
  with pytest.raises(ValueError, match=r'log-mel \(2, 32, 4\)'):
    MODEL.apply(params, x, t, np.zeros((B, F, 4), np.float32))
  with pytest.raises(ValueError, match='cond must be the log-mel array'):
    MODEL.apply(params, x, t, None)
  with pytest.raises(ValueError, match=r'x must be \[B, L, C\]'):
    MODEL.apply(params, x[..., 0], t, mel)
  with pytest.raises(ValueError, match=r't must have shape \[B\]'):
    MODEL.apply(params, x, t[:1], mel)
  cases = [(dict(upsample_channels=(6,)), 'upsample_channels=\\(6,\\) must have one width'),
           (dict(downsample_channels=()), 'downsample_channels=\\(\\) must have'),
           (dict(factors=(2, 0)), 'factors=\\(2, 0\\)'),
           (dict(mel_channels=0), 'mel_channels=0 must be > 0')]
  for change, message in cases:
    with pytest.raises(ValueError, match=message):
      WaveGrad(**{**TINY, **change}).apply(params, x, t, mel)
