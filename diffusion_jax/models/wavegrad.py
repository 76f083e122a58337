"""WaveGrad: a mel-conditioned waveform denoiser (Chen et al. 2021, arXiv:2009.00713, §3, Fig. 3-6).

The network predicts the noise of a noisy waveform `x` `[B, L, 1]` given its log-mel
spectrogram `cond` `[B, F, n_mels]`, `L = F * prod(factors)` (one mel frame per hop of
`prod(factors)` samples). Two paths meet at every resolution:

* **DBlocks** (Fig. 4) run over the noisy waveform: a kernel-5 conv to `first_channels`, then
  one DBlock per factor but the first, in reverse order, each downsampling by its factor
  (residual: 1x1 conv then downsample; main: downsample, then three LeakyReLU -> 3-tap convs
  with dilations 1, 2, 4). Downsampling is the mean over each group of `factor` samples.
* **FiLM** (Fig. 5) turns the DBlock features `h` of a resolution and the positional encoding of
  the noise level into a scale and a shift: `g = LReLU(conv(h)) + PE(n)`,
  `scale = conv(g)`, `shift = conv(g)`, both `[B, L_r, C_u]`.
* **UBlocks** (Fig. 3) run from the mel: a 3-tap conv to `mel_channels`, then one UBlock per
  factor, each upsampling by its factor (nearest neighbour) and FiLM-modulating its activations:
  `x' = up(conv1x1(x)) + conv_d2(LReLU(FiLM(conv_d1(up(LReLU(x))))))`,
  `out = x' + conv_d8(LReLU(FiLM(conv_d4(LReLU(FiLM(x'))))))`, `FiLM(h) = scale * h + shift`,
  dilations `1, 2, 4, 8`.
A final 3-tap conv maps the last UBlock to `out_channels`. LeakyReLU slope 0.2 throughout; every
conv pads symmetrically with zeros (same length, no causal shift).

The noise level (§3.2): WaveGrad conditions on the continuous noise level `n = sqrt(abar)`
through a sinusoidal positional encoding at a linear scale of 5000,
`PE(n)_i = sin(5000 n w_i)`, `PE(n)_{d/2+i} = cos(5000 n w_i)`, `w_i = 10000^(-i / (d/2))`.
`noise_level` maps the library's `t in [0, 1]` to `n` (the `mel` builder passes the process's
`alpha`, which is `sqrt(abar(t))` for a VP process); with `noise_level=None` the network encodes
its time input as given (`t in [0, 1]`, or EDM's `c_noise`), at the same scale.
"""

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import initializers
from diffusion_jax.models import layers

Dtype = Any
_SLOPE = 0.2  # LeakyReLU negative slope (Chen et al. 2021, Fig. 3-5)


def positional_encoding(noise: jax.Array, dim: int, scale: float = 5000.0) -> jax.Array:
  """WaveGrad's noise-level encoding (§3.2): Vaswani et al.'s sinusoid of `scale * noise`.

  `[sin(scale n w_i), cos(scale n w_i)]`, `w_i = 10000^(-i / (dim/2))`, `i < dim/2` (an odd
  `dim` gets a zero last feature). `noise`: `[B]` -> `[B, dim]`.
  """
  return layers.timestep_embedding(scale * noise.astype(jnp.float32), dim)


def _lrelu(h: jax.Array) -> jax.Array:
  return nn.leaky_relu(h, _SLOPE)


def _conv(features: int, kernel: int, dtype: Dtype, name: str, dilation: int = 1) -> nn.Conv:
  pad = dilation * (kernel - 1) // 2  # symmetric: output sample i is centred on input i
  return nn.Conv(features, (kernel,), kernel_dilation=(dilation,), padding=((pad, pad),),
                 dtype=dtype, kernel_init=initializers.lecun_normal(), name=name)


def _upsample(h: jax.Array, factor: int) -> jax.Array:
  return jnp.repeat(h, factor, axis=1)  # [B, L * factor, C], nearest neighbour


def _downsample(h: jax.Array, factor: int) -> jax.Array:
  b, n, c = h.shape
  return h.reshape(b, n // factor, factor, c).mean(axis=2)  # [B, L / factor, C]


class FiLM(nn.Module):
  """Feature-wise linear modulation from the DBlock features and the noise level (Fig. 5).

  `h` `[B, L_r, C_d]`, `pe` `[B, C_d]` -> `(scale, shift)`, each `[B, L_r, features]`.
  """
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, pe: jax.Array) -> tuple[jax.Array, jax.Array]:
    g = _lrelu(_conv(h.shape[-1], 3, self.dtype, 'conv')(h))
    g = g + pe[:, None, :].astype(g.dtype)  # the encoding is the same at every position
    scale = _conv(self.features, 3, self.dtype, 'scale')(g)
    shift = _conv(self.features, 3, self.dtype, 'shift')(g)
    return scale, shift


class UBlock(nn.Module):
  """Upsampling block (Fig. 3): `x` `[B, L, C]` -> `[B, L * factor, features]`, FiLM-modulated
  by `scale`, `shift` `[B, L * factor, features]`; dilations `(1, 2, 4, 8)`."""
  features: int
  factor: int
  dilations: tuple[int, ...] = (1, 2, 4, 8)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, scale: jax.Array, shift: jax.Array) -> jax.Array:
    conv = lambda i: _conv(self.features, 3, self.dtype, f'conv_{i}', self.dilations[i])
    film = lambda h: scale * h + shift
    residual = _conv(self.features, 1, self.dtype, 'residual')(_upsample(x, self.factor))
    h = conv(0)(_upsample(_lrelu(x), self.factor))
    h = conv(1)(_lrelu(film(h)))
    x = residual + h
    h = conv(2)(_lrelu(film(x)))
    h = conv(3)(_lrelu(film(h)))
    return x + h


class DBlock(nn.Module):
  """Downsampling block (Fig. 4): `x` `[B, L, C]` -> `[B, L / factor, features]`."""
  features: int
  factor: int
  dilations: tuple[int, ...] = (1, 2, 4)
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    residual = _downsample(_conv(self.features, 1, self.dtype, 'residual')(x), self.factor)
    h = _downsample(x, self.factor)
    for i, d in enumerate(self.dilations):
      h = _conv(self.features, 3, self.dtype, f'conv_{i}', d)(_lrelu(h))
    return h + residual


class WaveGrad(nn.Module):
  """WaveGrad (Chen et al. 2021): `(x [B, L, 1], t [B], log-mel [B, F, n_mels]) -> [B, L, 1]`.

  `factors` are the UBlocks' upsampling factors, in order from the mel (their product is the
  mel hop); `upsample_channels` their widths; `downsample_channels` the widths of the DBlocks
  (one per factor but the first, the DBlock at each UBlock's output resolution, from the
  waveform's resolution down); `first_channels` the width of the waveform's first conv (which
  feeds the last UBlock's FiLM); `mel_channels` the width of the conv on the mel. The paper's
  22 kHz model is `factors=(5, 5, 3, 2, 2)`, `upsample_channels=(512, 512, 256, 128, 128)`,
  `downsample_channels=(128, 128, 256)`, `first_channels=32`, `mel_channels=768`, 128 mels. The
  defaults here are a narrow version (206k parameters) for 8 kHz clips with a hop of 64: a train
  step (batch 16, L 4096, Adam) takes ~0.25 s on two shared CPU cores. `dtype` is the compute
  dtype (parameters stay float32).
  """
  factors: tuple[int, ...] = (4, 4, 2, 2)
  n_mels: int = 40
  upsample_channels: tuple[int, ...] = (64, 64, 32, 16)
  downsample_channels: tuple[int, ...] = (16, 32, 32)
  first_channels: int = 8
  mel_channels: int = 96
  noise_scale: float = 5000.0
  noise_level: Callable[[jax.Array], jax.Array] | None = None
  out_channels: int = 1
  dtype: Any = 'float32'

  def _check_config(self):
    n = len(self.factors)
    if n < 1 or any(not isinstance(f, int) or f < 1 for f in self.factors):
      raise ValueError(f'WaveGrad: factors={self.factors} must be one or more positive integers.')
    if len(self.upsample_channels) != n:
      raise ValueError(f'WaveGrad: upsample_channels={self.upsample_channels} must have one '
                       f'width per factor ({n} for factors={self.factors}).')
    if len(self.downsample_channels) != n - 1:
      raise ValueError(f'WaveGrad: downsample_channels={self.downsample_channels} must have '
                       f'len(factors) - 1 = {n - 1} widths (factors={self.factors}).')
    widths = (*self.upsample_channels, *self.downsample_channels)
    if min(widths, default=1) < 1:
      raise ValueError(f'WaveGrad: channel widths {widths} must all be >= 1.')
    layers.check_fields('WaveGrad', self, positive=('n_mels', 'first_channels', 'mel_channels',
                                                    'noise_scale', 'out_channels'))

  def _check_inputs(self, x, t, cond):
    if x.ndim != 3:
      raise ValueError(f'WaveGrad: x must be [B, L, C] (a noisy waveform), got shape {x.shape}.')
    t = layers.check_inputs('WaveGrad', x, t, ndim=3)
    if cond is None or isinstance(cond, dict):
      raise ValueError(f'WaveGrad: cond must be the log-mel array [B, F, n_mels] = '
                       f'({x.shape[0]}, F, {self.n_mels}), got {type(cond).__name__}.')
    cond = jnp.asarray(cond)
    hop = math.prod(self.factors)
    if (cond.ndim != 3 or cond.shape[0] != x.shape[0] or cond.shape[2] != self.n_mels
        or cond.shape[1] * hop != x.shape[1]):
      raise ValueError(f'WaveGrad: the log-mel {cond.shape} does not fit the waveform {x.shape}: '
                       f'need [B, F, n_mels] = ({x.shape[0]}, L / {hop}, {self.n_mels}) with F * '
                       f'prod(factors={self.factors}) == L.')
    return t, cond

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, cond: Any = None, *,
               train: bool = False) -> jax.Array:
    """`x`: noisy waveform `[B, L, 1]`; `t`: `[B]` (or scalar); `cond`: log-mel `[B, F, n_mels]`.

    `train` is accepted for the common interface (the network has no dropout).
    """
    del train
    self._check_config()
    t, mel = self._check_inputs(x, t, cond)
    dtype = layers.canonical_dtype('WaveGrad', self.dtype)
    noise = t if self.noise_level is None else self.noise_level(t)
    noise = jnp.broadcast_to(jnp.asarray(noise, jnp.float32), t.shape)  # [B]

    # Downsampling path over the noisy waveform: features at every UBlock's output resolution.
    h = _conv(self.first_channels, 5, dtype, 'wave_conv')(x.astype(dtype))  # [B, L, C_0]
    features = [h]
    down_factors = tuple(reversed(self.factors))[:-1]
    for i, (factor, width) in enumerate(zip(down_factors, self.downsample_channels, strict=True)):
      h = DBlock(width, factor, dtype=dtype, name=f'dblock_{i}')(h)
      features.append(h)  # [B, L / prod(down_factors[:i + 1]), width]

    # Upsampling path from the mel, FiLM-modulated at each resolution.
    u = _conv(self.mel_channels, 3, dtype, 'mel_conv')(mel.astype(dtype))  # [B, F, C_mel]
    n = len(self.factors)
    for i, (factor, width) in enumerate(zip(self.factors, self.upsample_channels, strict=True)):
      d = features[n - 1 - i]  # [B, F * prod(factors[:i + 1]), C_d]
      pe = positional_encoding(noise, d.shape[-1], self.noise_scale)  # [B, C_d]
      scale, shift = FiLM(width, dtype=dtype, name=f'film_{i}')(d, pe)
      u = UBlock(width, factor, dtype=dtype, name=f'ublock_{i}')(u, scale, shift)
    out = _conv(self.out_channels, 3, dtype, 'out_conv')(u)
    return out.astype(jnp.float32)  # [B, L, out_channels]
