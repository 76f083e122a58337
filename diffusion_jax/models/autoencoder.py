"""Latent diffusion's autoencoders, KL-regularised (Stable Diffusion's VAE) and VQ; Flax linen.

Rombach et al. 2022 (arXiv:2112.10752, §3 and App. G): an encoder maps an image `[B, H, W, C]`
in [-1, 1] to a diagonal Gaussian over latents `[B, H/f, W/f, latent_channels]` (`f = 2**(levels
- 1)`, "KL-f8" for Stable Diffusion), a decoder maps a latent back; a small KL term to N(0, I)
keeps the latent space smooth. Latent diffusion diffuses `scaling_factor * z` (0.18215 for
SD 1.x / 2.x, 0.13025 for SDXL), which gives the latents roughly unit variance.

The layers are those of the reference implementation (the `AutoencoderKL` of LDM and diffusers),
so its published weights load unchanged (`diffusion_jax.weights.load_autoencoder_kl`):
  Encoder: conv_in 3x3; per level `layers_per_block` ResNet blocks, then (all but the last level)
    a stride-2 3x3 conv on the input padded by one row / column at the bottom / right only;
    mid block (ResNet, single-head self-attention, ResNet); GroupNorm, SiLU, conv_out 3x3 to
    `2 * latent_channels` (mean, log-variance); then `quant_conv` 1x1.
  Decoder: `post_quant_conv` 1x1; conv_in 3x3; mid block; per level from the lowest resolution
    `layers_per_block + 1` ResNet blocks, then (all but the full-resolution level) nearest 2x
    upsampling and a 3x3 conv; GroupNorm, SiLU, conv_out 3x3.
  ResNet block: GN -> SiLU -> conv3x3 -> GN -> SiLU -> dropout -> conv3x3, plus the input (through
    a 1x1 conv where the channels change). Every GroupNorm has eps 1e-6.
Layout is NHWC (torch's is NCHW). Module names are the reference's (`norm1`, `conv_shortcut`, …)
where it helps the weight loader; decoder level `i` is the level of resolution `H / 2**i`.

`AutoencoderVQ` is LDM's other first stage, "VQ-reg" (VQ-f4, VQ-f8): the same towers with a
VQ-VAE codebook (`vq.VectorQuantizer`; van den Oord et al. 2017) between `quant_conv` and
`post_quant_conv`; latent diffusion diffuses its unquantized encoder output and the decoder
quantizes first. `AUTOENCODERS` maps config names ('kl', 'vq') to the two classes.
"""

import numbers
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import initializers
from diffusion_jax.models import layers
from diffusion_jax.models import vq

Dtype = Any

# Stable Diffusion 1.x / 2.x's VAE (LDM's "kl-f8"): f = 8, 83.65 M parameters.
SD_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=4, norm_num_groups=32, scaling_factor=0.18215)
SDXL_SCALING_FACTOR = 0.13025  # SDXL's VAE: the same architecture, retrained


class DiagonalGaussian(NamedTuple):
  """The encoder's posterior q(z | x) = N(mean, diag(exp(logvar))); a pytree of two arrays."""
  mean: jax.Array    # [B, h, w, latent_channels]
  logvar: jax.Array  # [B, h, w, latent_channels], clipped to [-30, 20] as in LDM

  @classmethod
  def from_moments(cls, moments: jax.Array) -> 'DiagonalGaussian':
    """`moments` `[..., 2 L]`: the mean in the first L channels, the log-variance in the rest."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  def sample(self, key: jax.Array) -> jax.Array:
    """`mean + std * eps`, `eps ~ N(0, I)` drawn from `key` (reparameterised)."""
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL(q || N(0, I)) per example, `[B]`: `0.5 sum(mean² + var - 1 - logvar)` over the rest."""
    axes = tuple(range(1, self.mean.ndim))
    return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=axes)


def _conv(features: int, kernel: int, dtype: Dtype, name: str, strides: int = 1,
          padding: Any = None) -> nn.Conv:
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2  # 'same' for odd kernels at stride 1
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                 dtype=dtype, kernel_init=initializers.lecun_normal(), name=name)


def _group_norm(num_groups: int, dtype: Dtype, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups, epsilon=1e-6, dtype=dtype, name=name)


class ResnetBlock(nn.Module):
  """GN -> SiLU -> conv3x3 -> GN -> SiLU -> dropout -> conv3x3, + (1x1-projected) input."""
  features: int
  num_groups: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    h = nn.silu(_group_norm(self.num_groups, self.dtype, 'norm1')(x))  # x: [B, H, W, C_in]
    h = _conv(self.features, 3, self.dtype, 'conv1')(h)
    h = nn.silu(_group_norm(self.num_groups, self.dtype, 'norm2')(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv(self.features, 3, self.dtype, 'conv2')(h)
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, self.dtype, 'conv_shortcut')(x)
    return x + h  # [B, H, W, features]


class AttnBlock(nn.Module):
  """Single-head self-attention over the H*W positions after a GroupNorm, with a residual."""
  num_groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape  # [B, H, W, C]
    h = _group_norm(self.num_groups, self.dtype, 'norm')(x).reshape(b, hgt * wid, 1, c)
    q, k, v = (nn.Dense(c, dtype=self.dtype, kernel_init=initializers.lecun_normal(),
                        name=name)(h) for name in ('query', 'key', 'value'))  # [B, T, 1, C]
    h = layers.attention(q, k, v)  # softmax(q k^T / sqrt(C)) v, [B, T, 1, C]
    h = nn.Dense(c, dtype=self.dtype, kernel_init=initializers.lecun_normal(), name='out')(h)
    return x + h.reshape(b, hgt, wid, c)


class MidBlock(nn.Module):
  """ResNet block, self-attention, ResNet block, at the lowest resolution."""
  num_groups: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    c = x.shape[-1]
    x = ResnetBlock(c, self.num_groups, self.dropout, self.dtype, name='res_0')(x, train)
    x = AttnBlock(self.num_groups, self.dtype, name='attn')(x)
    return ResnetBlock(c, self.num_groups, self.dropout, self.dtype, name='res_1')(x, train)


class _Tower(nn.Module):
  """What the encoder and the decoder share: their fields and ResNet blocks."""
  block_out_channels: tuple[int, ...]
  layers_per_block: int
  out_features: int
  num_groups: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  def res(self, h: jax.Array, features: int, name: str, train: bool) -> jax.Array:
    return ResnetBlock(features, self.num_groups, self.dropout, self.dtype, name=name)(h, train)

  def mid(self, h: jax.Array, train: bool) -> jax.Array:
    return MidBlock(self.num_groups, self.dropout, self.dtype, name='mid')(h, train)

  def out(self, h: jax.Array) -> jax.Array:
    h = nn.silu(_group_norm(self.num_groups, self.dtype, 'norm_out')(h))
    return _conv(self.out_features, 3, self.dtype, 'conv_out')(h)


class Encoder(_Tower):
  """Images `[B, H, W, C]` -> `[B, H/f, W/f, out_features]` (the posterior's moments)."""

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    h = _conv(self.block_out_channels[0], 3, self.dtype, 'conv_in')(x)
    last = len(self.block_out_channels) - 1
    for i, features in enumerate(self.block_out_channels):
      for j in range(self.layers_per_block):
        h = self.res(h, features, f'down_{i}_res_{j}', train)
      if i != last:
        # Pads bottom / right only, so output (y, x) sees input rows / columns 2y..2y+2.
        h = _conv(features, 3, self.dtype, f'down_{i}_downsample', strides=2,
                  padding=((0, 1), (0, 1)))(h)  # [B, H/2, W/2, features]
    return self.out(self.mid(h, train))


class Decoder(_Tower):
  """Latents `[B, h, w, L]` -> images `[B, h f, w f, out_features]`."""

  @nn.compact
  def __call__(self, z: jax.Array, train: bool) -> jax.Array:
    h = _conv(self.block_out_channels[-1], 3, self.dtype, 'conv_in')(z)
    h = self.mid(h, train)
    for i in reversed(range(len(self.block_out_channels))):
      features = self.block_out_channels[i]
      for j in range(self.layers_per_block + 1):
        h = self.res(h, features, f'up_{i}_res_{j}', train)
      if i != 0:
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest, [B, 2H, 2W, features]
        h = _conv(features, 3, self.dtype, f'up_{i}_upsample')(h)
    return self.out(h)


class _Autoencoder(nn.Module):
  """What `AutoencoderKL` and `AutoencoderVQ` share: `f` and the checks of their fields and
  inputs (each subclass declares the fields, so their order stays each model's own)."""

  @property
  def f(self) -> int:
    """The downsampling factor f (LDM's "KL-f8", "VQ-f4"): latents are `[B, H/f, W/f, L]`."""
    return 2 ** max(len(self.block_out_channels) - 1, 0)

  def _check_config(self, positive: tuple[str, ...] = ()) -> None:
    """The fields both models have, and the subclass's own `positive` (> 0) ones."""
    name = type(self).__name__
    channels = tuple(self.block_out_channels)
    if not channels or not all(isinstance(c, numbers.Integral) and c > 0 for c in channels):
      raise ValueError(f'{name}: block_out_channels={channels} must be one or more positive '
                       f'integers (the channels of each resolution level).')
    layers.check_fields(name, self,
                        positive=('in_channels', 'out_channels', 'layers_per_block',
                                  'latent_channels', 'norm_num_groups') + positive,
                        probabilities=('dropout',))
    bad = [c for c in channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f'{name}: norm_num_groups={self.norm_num_groups} must divide every entry '
                       f'of block_out_channels={channels}; {bad[0]} is not divisible.')

  def _check_input(self, method: str, x: jax.Array, channels: int, field: str) -> None:
    name = type(self).__name__
    if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f'{name}.{method}: expects a float [B, H, W, C] array, got '
                       f'{x.dtype} {x.shape}.')
    if x.shape[-1] != channels:
      raise ValueError(f'{name}.{method}: {field}={channels} but the input has '
                       f'{x.shape[-1]} channels (shape {x.shape}; the layout is NHWC).')

  def _check_image(self, method: str, x: jax.Array) -> None:
    """An image batch `[B, H, W, in_channels]` with H and W divisible by f."""
    self._check_input(method, x, self.in_channels, 'in_channels')
    if x.shape[1] % self.f or x.shape[2] % self.f:
      raise ValueError(f'{type(self).__name__}.{method}: image size {x.shape[1]}x{x.shape[2]} '
                       f'is not divisible by f={self.f} (block_out_channels='
                       f'{self.block_out_channels}).')


class AutoencoderKL(_Autoencoder):
  """LDM's KL autoencoder: `encode(x) -> DiagonalGaussian`, `decode(z) -> image`.

  The defaults are Stable Diffusion 1.x's VAE (`SD_VAE_CONFIG`). Images are NHWC in [-1, 1],
  float; outputs are float32.

  Attributes:
    in_channels, out_channels: image channels in and out.
    block_out_channels: channels of each resolution level; every level but the last halves H, W.
    layers_per_block: ResNet blocks per encoder level (the decoder has one more).
    latent_channels: channels of the latent z.
    norm_num_groups: GroupNorm groups; must divide every entry of `block_out_channels`.
    scaling_factor: latent diffusion works on `scaling_factor * z` (SD 1.x: 0.18215; SDXL:
      0.13025); kept here for the code that encodes a data set, not applied by the module.
    dropout: dropout rate in the ResNet blocks with `train=True` (needs a 'dropout' rng); 0 in SD.
    dtype: compute dtype ('float32', 'bfloat16'); parameters are float32.
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  dropout: float = 0.0
  dtype: Any = 'float32'

  def setup(self):
    self._check_config(positive=('scaling_factor',))
    dtype = layers.canonical_dtype('AutoencoderKL', self.dtype)
    channels = tuple(self.block_out_channels)
    self.encoder = Encoder(channels, self.layers_per_block, 2 * self.latent_channels,
                           self.norm_num_groups, self.dropout, dtype)
    self.quant_conv = _conv(2 * self.latent_channels, 1, dtype, None)
    self.post_quant_conv = _conv(self.latent_channels, 1, dtype, None)
    self.decoder = Decoder(channels, self.layers_per_block, self.out_channels,
                           self.norm_num_groups, self.dropout, dtype)
    self._dtype = dtype

  def encode(self, x: jax.Array, *, train: bool = False) -> DiagonalGaussian:
    """Images `[B, H, W, in_channels]` in [-1, 1] -> the posterior over `[B, H/f, W/f, L]`."""
    self._check_image('encode', x)
    moments = self.quant_conv(self.encoder(x.astype(self._dtype), train))  # [B, h, w, 2L]
    return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

  def decode(self, z: jax.Array, *, train: bool = False) -> jax.Array:
    """Latents `[B, h, w, latent_channels]` (unscaled) -> images `[B, h f, w f, out_channels]`."""
    self._check_input('decode', z, self.latent_channels, 'latent_channels')
    h = self.decoder(self.post_quant_conv(z.astype(self._dtype)), train)
    return h.astype(jnp.float32)

  def __call__(self, x: jax.Array, key: jax.Array | None = None, sample_posterior: bool = False,
               *, train: bool = False) -> tuple[jax.Array, DiagonalGaussian]:
    """Reconstruction of `x` through a posterior sample (from `key`) or its mode, and the
    posterior (for the KL term of training), as LDM's `AutoencoderKL.forward`."""
    if sample_posterior and key is None:
      raise ValueError('AutoencoderKL: sample_posterior=True needs a PRNG key.')
    posterior = self.encode(x, train=train)
    z = posterior.sample(key) if sample_posterior else posterior.mode()
    return self.decode(z, train=train), posterior


class AutoencoderVQ(_Autoencoder):
  """LDM's VQ-regularised autoencoder ("VQ-reg"): `encode(x) -> z_e`, `decode(z) -> image`.

  Rombach et al. 2022 (§3, App. G) with VQ-VAE's quantizer (van den Oord et al. 2017): the towers
  of `AutoencoderKL`, and between them a codebook of `num_codes` vectors of `latent_channels`:
  encoder -> quant_conv 1x1 -> z_e -> nearest code (straight-through) -> post_quant_conv 1x1 ->
  decoder. As in LDM, latent diffusion diffuses the pre-quantization z_e (`encode`), and `decode`
  quantizes first, so the quantizer acts as the decoder's first layer. The defaults are LDM's
  "VQ-f4" (f = 4, D = 3) with 256 codes (LDM's has 8192). Images are NHWC in [-1, 1], float;
  outputs are float32.

  The codebook is that of `vq.VectorQuantizer` 'quantizer'. With `ema_codebook=True` it is
  `variables['vq_ema']['quantizer']`, the fields of a `vq.EMAState`, which the trainer updates
  from `__call__`'s aux: `vq.ema_update(EMAState(**that), aux['z'], aux['indices'])` (and
  `vq.restart_dead_codes`), writing the result back; no gradient reaches it. With `False` it is
  the parameter `params['quantizer']['codebook']`, trained by `aux['codebook_loss']` (the
  reconstruction passes it no gradient: `vq.quantize`'s straight-through estimator).

  Attributes:
    in_channels, out_channels, block_out_channels, layers_per_block, norm_num_groups, dropout,
      dtype: as `AutoencoderKL`'s.
    latent_channels: D, the channels of z_e and of every code.
    num_codes: K, the codebook's size.
    ema_codebook: the codebook is an EMA of the encoder outputs (VQ-VAE App. A.1), not a
      parameter.
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512)
  layers_per_block: int = 2
  latent_channels: int = 3
  num_codes: int = 256
  norm_num_groups: int = 32
  ema_codebook: bool = True
  dropout: float = 0.0
  dtype: Any = 'float32'

  def setup(self):
    self._check_config(positive=('num_codes',))
    dtype = layers.canonical_dtype('AutoencoderVQ', self.dtype)
    channels = tuple(self.block_out_channels)
    self.encoder = Encoder(channels, self.layers_per_block, self.latent_channels,
                           self.norm_num_groups, self.dropout, dtype)
    self.quant_conv = _conv(self.latent_channels, 1, dtype, None)
    self.quantizer = vq.VectorQuantizer(self.num_codes, self.latent_channels,
                                        ema=self.ema_codebook)
    self.post_quant_conv = _conv(self.latent_channels, 1, dtype, None)
    self.decoder = Decoder(channels, self.layers_per_block, self.out_channels,
                           self.norm_num_groups, self.dropout, dtype)
    self._dtype = dtype

  def encode(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    """Images `[B, H, W, in_channels]` in [-1, 1] -> z_e `[B, H/f, W/f, D]`, not quantized."""
    self._check_image('encode', x)
    z = self.quant_conv(self.encoder(x.astype(self._dtype), train))  # [B, h, w, D]
    return z.astype(jnp.float32)

  def quantize(self, z: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
    """`vq.quantize(z, codebook)` of `z` `[B, h, w, D]`: `(z_q, indices [B, h, w], aux)`, `z_q`
    the nearest codes with the straight-through gradient; aux: `codebook_loss`,
    `commitment_loss` (means over elements), `perplexity`, `usage`."""
    self._check_input('quantize', z, self.latent_channels, 'latent_channels')
    return self.quantizer(z)

  def decode(self, z: jax.Array, *, quantize: bool = True, train: bool = False) -> jax.Array:
    """Latents `[B, h, w, D]` -> images `[B, h f, w f, out_channels]`; `z` is replaced by its
    nearest codes first unless `quantize=False` (for `z` that already is codes)."""
    self._check_input('decode', z, self.latent_channels, 'latent_channels')
    if quantize:
      z, _, _ = self.quantizer(z)
    h = self.decoder(self.post_quant_conv(z.astype(self._dtype)), train)
    return h.astype(jnp.float32)

  def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, dict]:
    """The reconstruction `decode(encode(x))` and aux: `quantize`'s, plus `z` (z_e, with its
    gradient, for the commitment term), `indices` and `codebook` `[K, D]` (the one used), so
    that a trainer can form `vq_vae_loss`'s terms and the EMA update of the codebook."""
    z = self.encode(x, train=train)
    z_q, indices, aux = self.quantize(z)
    codebook = self.quantizer.variables['vq_ema' if self.ema_codebook else 'params']['codebook']
    x_hat = self.decode(z_q, quantize=False, train=train)
    return x_hat, {**aux, 'z': z, 'indices': indices, 'codebook': codebook}


# Autoencoders by config name (`model.autoencoder`): LDM's KL-reg and VQ-reg first stages.
AUTOENCODERS = {'kl': AutoencoderKL, 'vq': AutoencoderVQ}
