"""U-Net denoisers: DDPM, DDPM++ and ADM, one module selected by config (Flax linen).

* **DDPM** (Ho et al. 2020, arXiv:2006.11239, App. B; the defaults): a PixelCNN++-style
  backbone of ResBlocks with the time embedding added in every block, self-attention at chosen
  resolutions, stride-2 conv downsampling, nearest + conv upsampling, encoder→decoder skips.
* **DDPM++** (Song et al. 2021, arXiv:2011.13456, App. H): `resblock_updown=True` (BigGAN
  residual blocks that resample inside the block) and `skip_rescale=True` (every residual sum
  divided by √2); `embedding='fourier'` gives NCSN++'s random-Fourier noise features.
* **ADM** (Dhariwal & Nichol 2021, arXiv:2105.05233, §3): `resblock_updown=True`,
  `scale_shift_norm=True` (adaptive GroupNorm: `GN(h) (1 + s) + b`, `(s, b)` from the embedding),
  `num_head_channels=64`, class embedding added to the time embedding.

Layers that end a residual branch (and the output conv) are zero-initialised, so every block
starts as the identity and the network outputs exactly zero at init (ADM's choice). Time is
continuous, `t ∈ [0, 1]` with 0 = data (DESIGN.md §1), or EDM's `c_noise`. Conditioning (class
labels with a learned null class and label dropout, a cross-attended context) is described in
`layers.py`.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import initializers
from diffusion_jax.models import layers
from diffusion_jax.models.layers import timestep_embedding  # noqa: F401  (public re-export)

Dtype = Any


def _conv3x3(features: int, dtype: Dtype, name: str, zero_init: bool = False,
             strides: int = 1) -> nn.Conv:
  # Symmetric padding (not XLA 'SAME', which pads only bottom/right at stride 2) so a stride-2
  # conv sees the same neighbourhood at every output position.
  return nn.Conv(features, (3, 3), strides=(strides, strides), padding=((1, 1), (1, 1)),
                 dtype=dtype,
                 kernel_init=initializers.zeros if zero_init else initializers.lecun_normal(),
                 name=name)


def _upsample_nearest(x: jax.Array) -> jax.Array:
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]


def _downsample_avg(x: jax.Array) -> jax.Array:
  return nn.avg_pool(x, (2, 2), strides=(2, 2))  # [B, H/2, W/2, C]


class ResBlock(nn.Module):
  """GN → SiLU → [resample] → conv → +emb → GN → SiLU → dropout → conv(zero), + skip.

  `resample='down'|'up'` is the BigGAN block (Brock et al. 2019) of DDPM++ and ADM: both the
  branch and the skip path are resampled (average pooling / nearest), without an extra conv.
  `resample_shortcut_conv` adds a 1x1 conv on the resampled skip path even when the channels
  agree (NCSN++ / DDPM++; ADM keeps the identity). `scale_shift_norm` replaces `h + emb` by
  ADM's adaptive GroupNorm `GN(h) (1 + s) + b`.
  """
  features: int
  num_groups: int
  dropout: float = 0.0
  resample: str | None = None
  resample_shortcut_conv: bool = False
  scale_shift_norm: bool = False
  skip_rescale: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    # x: [B, H, W, C_in], temb: [B, E]
    h = nn.silu(nn.GroupNorm(self.num_groups, dtype=self.dtype, name='norm_0')(x))
    if self.resample is not None:
      resample = _downsample_avg if self.resample == 'down' else _upsample_nearest
      h, x = resample(h), resample(x)
    h = _conv3x3(self.features, self.dtype, 'conv_0')(h)  # [B, H', W', F]
    # DDPM applies the nonlinearity to the shared embedding before each block's projection.
    emb_features = 2 * self.features if self.scale_shift_norm else self.features
    emb = nn.Dense(emb_features, dtype=self.dtype, kernel_init=initializers.lecun_normal(),
                   name='temb_proj')(nn.silu(temb))
    emb = emb[:, None, None, :]  # [B, 1, 1, F or 2F]
    if self.scale_shift_norm:
      scale, shift = jnp.split(emb, 2, axis=-1)
      h = nn.GroupNorm(self.num_groups, dtype=self.dtype, name='norm_1')(h) * (1 + scale) + shift
      h = nn.silu(h)
    else:
      h = nn.silu(nn.GroupNorm(self.num_groups, dtype=self.dtype, name='norm_1')(h + emb))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv3x3(self.features, self.dtype, 'conv_1', zero_init=True)(h)
    if x.shape[-1] != self.features or (self.resample and self.resample_shortcut_conv):
      x = nn.Conv(self.features, (1, 1), dtype=self.dtype,
                  kernel_init=initializers.lecun_normal(), name='shortcut')(x)
    out = x + h
    return out / math.sqrt(2.0) if self.skip_rescale else out  # [B, H', W', F]


class AttnBlock(nn.Module):
  """Multi-head self-attention over the H*W positions (zero-initialised output, residual), then,
  given a context, cross-attention to it (the text-conditioning hook of latent diffusion)."""
  num_heads: int
  num_groups: int
  skip_rescale: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None,
               context_mask: jax.Array | None = None) -> jax.Array:
    b, hgt, wid, c = x.shape  # [B, H, W, C]
    head_dim = c // self.num_heads
    h = nn.GroupNorm(self.num_groups, dtype=self.dtype, name='norm')(x)
    h = h.reshape(b, hgt * wid, c)  # [B, T, C]
    q, k, v = (nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype,
                               kernel_init=initializers.lecun_normal(), name=name)(h)
               for name in ('query', 'key', 'value'))  # [B, T, N, D] each
    h = layers.attention(q, k, v)  # [B, T, N, D]
    h = nn.DenseGeneral(c, axis=(-2, -1), dtype=self.dtype, kernel_init=initializers.zeros,
                        name='out')(h)  # [B, T, C]
    x = x + h.reshape(b, hgt, wid, c)
    if self.skip_rescale:
      x = x / math.sqrt(2.0)
    if context is not None:
      h = nn.GroupNorm(self.num_groups, dtype=self.dtype, name='cross_norm')(x)
      h = layers.CrossAttention(self.num_heads, self.dtype, name='cross_attn')(
          h.reshape(b, hgt * wid, c), context, context_mask)  # [B, T, C]
      x = x + h.reshape(b, hgt, wid, c)
    return x


class Downsample(nn.Module):
  """Stride-2 3x3 conv (or 2x2 average pooling): [B, H, W, C] → [B, H/2, W/2, C]."""
  with_conv: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if not self.with_conv:
      return _downsample_avg(x)
    return _conv3x3(x.shape[-1], self.dtype, 'conv', strides=2)(x)


class Upsample(nn.Module):
  """Nearest-neighbour 2x, then (optionally) a 3x3 conv: [B, H, W, C] → [B, 2H, 2W, C]."""
  with_conv: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = _upsample_nearest(x)
    return _conv3x3(x.shape[-1], self.dtype, 'conv')(x) if self.with_conv else x


class UNet(nn.Module):
  """U-Net `(x_t [B, H, W, C], t [B], cond) -> [B, H, W, out_channels]`, float32 output.

  Attributes:
    ch: base channel count; level `i` has `ch * ch_mult[i]` channels.
    ch_mult: channel multipliers, one per resolution level (each level but the last halves H, W).
    num_res_blocks: ResBlocks per encoder level (the decoder has one more, for the skips).
    attn_resolutions: spatial sizes (H) at which self-attention follows each ResBlock. The
      middle block always attends.
    decoder_attn_per_level: in the decoder, one attention block per level after its ResBlocks
      (NCSN++ / DDPM++) instead of one after every ResBlock (DDPM, ADM).
    num_heads: attention heads; must divide the channels at every attention site.
    num_head_channels: if > 0, channels per head instead (ADM: 64); overrides `num_heads`.
    dropout: dropout rate inside ResBlocks, active only with `train=True` ('dropout' rng).
    num_groups: GroupNorm groups; must divide `ch * m` for every `m` in `ch_mult`.
    resblock_updown: resample with BigGAN ResBlocks (DDPM++, ADM) instead of a conv layer.
    resample_shortcut_conv: with `resblock_updown`, a 1x1 conv on the resampled skip path
      (NCSN++ / DDPM++) rather than the identity (ADM).
    resample_with_conv: without `resblock_updown`, stride-2 conv / nearest + conv (DDPM) if
      True, else plain average pooling / nearest.
    scale_shift_norm: ADM's adaptive GroupNorm time conditioning.
    skip_rescale: divide every residual sum by √2 (DDPM++).
    embedding: 'sinusoidal' (of `t * time_scale`, DDPM) or 'fourier' (random Fourier features
      of `t` with `fourier_scale`, NCSN++).
    out_channels: output channels; `None` means the input's channel count (2C: a prediction and
      a learned variance per channel, for the VLB objectives).
    num_classes: 0 for unconditional. If > 0, a learned class embedding with an extra null label
      `num_classes` is added to the time embedding; `label_dropout` replaces a training label by
      the null label with that probability (classifier-free guidance).
    context_dim: if > 0, `cond['context']` `[B, L, context_dim]` is cross-attended at every
      attention site; `context_dropout` zeroes a training example's context.
    delta_input: a second time input `cond['delta']` (`[B]`, required then: MeanFlow's
      `t - r`, a shortcut model's step size), embedded like `t` by its own Dense layers
      (`delta_dense_0/1`) and added to the time embedding. False leaves the network unchanged.
    dtype: compute dtype ('float32', 'bfloat16'); parameters are float32, the output float32.
    remat: rematerialise every block in the backward pass (`jax.checkpoint`): less memory,
      one more forward.
  """
  ch: int = 32
  ch_mult: tuple[int, ...] = (1, 2)
  num_res_blocks: int = 1
  attn_resolutions: tuple[int, ...] = (4,)
  num_heads: int = 1
  num_head_channels: int = 0
  dropout: float = 0.0
  num_groups: int = 8
  resblock_updown: bool = False
  resample_shortcut_conv: bool = False
  resample_with_conv: bool = True
  decoder_attn_per_level: bool = False
  scale_shift_norm: bool = False
  skip_rescale: bool = False
  embedding: str = 'sinusoidal'
  time_scale: float = 1000.0
  fourier_scale: float = 16.0
  out_channels: int | None = None
  num_classes: int = 0
  label_dropout: float = 0.0
  context_dim: int = 0
  context_dropout: float = 0.0
  dtype: Any = 'float32'
  remat: bool = False
  delta_input: bool = False

  def _check_config(self):
    if not self.ch_mult or min(self.ch_mult) < 1:
      raise ValueError(f'UNet: ch_mult={self.ch_mult} must be one or more positive integers '
                       f'(the channel multiplier of each resolution level).')
    layers.check_fields('UNet', self, positive=('ch', 'num_res_blocks', 'num_groups'),
                        non_negative=('num_classes', 'context_dim', 'num_head_channels'),
                        probabilities=('dropout', 'label_dropout', 'context_dropout'))
    for m in self.ch_mult:
      c = self.ch * m
      if c % self.num_groups:
        raise ValueError(f'UNet: num_groups={self.num_groups} must divide every level\'s channels '
                         f'ch * ch_mult = {[self.ch * k for k in self.ch_mult]}; {c} is not.')
    if self.num_heads < 1:
      raise ValueError(f'UNet: num_heads must be >= 1, got {self.num_heads}.')
    if self.embedding not in layers.EMBEDDINGS:
      raise ValueError(f'UNet: embedding={self.embedding!r}; choose from {layers.EMBEDDINGS}.')

  def _check_inputs(self, x, t):
    t = layers.check_inputs('UNet', x, t, ndim=4)
    factor = 2 ** (len(self.ch_mult) - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f'UNet: H and W of x (shape {x.shape}) must be divisible by {factor} '
                       f'= 2**(len(ch_mult) - 1) for ch_mult={self.ch_mult}.')
    sizes = [x.shape[1] // 2**i for i in range(len(self.ch_mult))]
    unused = [r for r in self.attn_resolutions if r not in sizes]
    if unused:     # attention that would silently never run
      raise ValueError(f'UNet: attn_resolutions={tuple(self.attn_resolutions)}: {unused} is not '
                       f'among the resolutions {sizes} of this input (H={x.shape[1]}, '
                       f'ch_mult={self.ch_mult}).')
    return t

  def _heads(self, channels: int, name: str) -> int:
    if self.num_head_channels > 0:
      key, value = 'num_head_channels', self.num_head_channels
    else:
      key, value = 'num_heads', self.num_heads
    if channels % value:
      raise ValueError(f'UNet: {key}={value} must divide the {channels} channels at the '
                       f'attention block {name!r}.')
    return channels // value if key == 'num_head_channels' else value

  def _encode(self, x: jax.Array, t: jax.Array, cond: Any, train: bool,
              hint: jax.Array | None = None):
    """Checks, embedding, `conv_in` (plus `hint` [B, H, W, ch] if given), encoder and middle.

    Returns `(h, skips, res_block, maybe_attn, dtype)`: the middle block's output, the encoder
    activations the decoder consumes, and the block builders the decoder reuses. Called from a
    compact `__call__` (this one's, or `controlnet.UNetEncoder`'s, whose parameters are then the
    encoder's and middle's of a `UNet`, under the same names).
    """
    self._check_config()
    t = self._check_inputs(x, t)
    c = layers.parse_cond('UNet', cond, x.shape[0], self.num_classes, self.context_dim,
                          delta_input=self.delta_input)
    c = layers.drop_context(self, c, self.context_dropout, train=train)
    dtype = layers.canonical_dtype('UNet', self.dtype)
    num_levels = len(self.ch_mult)
    res_cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
    attn_cls = nn.remat(AttnBlock) if self.remat else AttnBlock

    def res_block(h, features, name, resample=None):
      block = res_cls(features, self.num_groups, self.dropout, resample,
                      self.resample_shortcut_conv, self.scale_shift_norm, self.skip_rescale, dtype,
                      name=name)
      return block(h, temb, train)

    def attn(h, name):
      block = attn_cls(self._heads(h.shape[-1], name), self.num_groups, self.skip_rescale, dtype,
                       name=name)
      return block(h, c.context, c.context_mask)

    def maybe_attn(h, name):
      return attn(h, name) if h.shape[1] in self.attn_resolutions else h

    # Noise-level (and class) embedding, [B, 4 ch].
    temb = layers.noise_embedding(t, self.ch, self.embedding, self.time_scale, self.fourier_scale)
    dense_init = initializers.lecun_normal()
    temb = nn.Dense(4 * self.ch, dtype=dtype, kernel_init=dense_init, name='temb_dense_0')(temb)
    temb = nn.Dense(4 * self.ch, dtype=dtype, kernel_init=dense_init,
                    name='temb_dense_1')(nn.silu(temb))  # [B, E]
    if self.delta_input:   # the second time input, embedded like t (own layers)
      demb = layers.noise_embedding(c.delta, self.ch, self.embedding, self.time_scale,
                                    self.fourier_scale)
      demb = nn.Dense(4 * self.ch, dtype=dtype, kernel_init=dense_init, name='delta_dense_0')(demb)
      temb = temb + nn.Dense(4 * self.ch, dtype=dtype, kernel_init=dense_init,
                             name='delta_dense_1')(nn.silu(demb))
    if self.num_classes > 0:
      # Row `num_classes` is the null label (the unconditional branch of guidance).
      labels = layers.drop_labels(self, c.labels, self.num_classes, self.label_dropout,
                                  train=train)
      temb = temb + nn.Embed(self.num_classes + 1, 4 * self.ch, dtype=dtype,
                             embedding_init=initializers.embed_normal(),
                             name='class_embed')(labels)

    # Encoder: store every activation the decoder will consume as a skip.
    h = _conv3x3(self.ch, dtype, 'conv_in')(x.astype(dtype))  # [B, H, W, ch]
    if hint is not None:  # ControlNet's condition features (Zhang et al. 2023, Fig. 3)
      h = h + hint.astype(dtype)
    skips = [h]
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = res_block(h, self.ch * mult, f'down_{i}_res_{j}')
        h = maybe_attn(h, f'down_{i}_attn_{j}')
        skips.append(h)
      if i != num_levels - 1:
        name = f'down_{i}_downsample'
        if self.resblock_updown:
          h = res_block(h, h.shape[-1], name, resample='down')
        else:
          h = Downsample(self.resample_with_conv, dtype, name=name)(h)
        skips.append(h)  # [B, H/2, W/2, C]

    # Middle, at the lowest resolution.
    h = res_block(h, h.shape[-1], 'mid_res_0')
    h = attn(h, 'mid_attn')
    h = res_block(h, h.shape[-1], 'mid_res_1')

    return h, skips, res_block, maybe_attn, dtype

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, cond: Any = None, *,
               train: bool = False, residuals: Any = None) -> jax.Array:
    """`x`: [B, H, W, C]; `t`: [B] (or scalar); `cond`: see `layers.parse_cond`.

    `residuals` (ControlNet, Zhang et al. 2023, §3.2 and Fig. 3): a sequence of one array per
    encoder skip, in the encoder's order, then one for the middle block's output, each of that
    activation's shape; each is added to its activation before the decoder consumes it.
    """
    h, skips, res_block, maybe_attn, dtype = self._encode(x, t, cond, train)
    out_channels = x.shape[-1] if self.out_channels is None else self.out_channels
    num_levels = len(self.ch_mult)
    if residuals is not None:
      shapes = [s.shape for s in skips] + [h.shape]
      got = [getattr(r, 'shape', None) for r in residuals]
      if got != shapes:
        raise ValueError(f'UNet: residuals must have the shapes of the skips and the middle '
                         f'output, {shapes}; got {got}.')
      skips = [s + r.astype(dtype) for s, r in zip(skips, residuals[:-1], strict=True)]
      h = h + residuals[-1].astype(dtype)

    # Decoder: num_res_blocks + 1 blocks per level, each eating one skip.
    for i in reversed(range(num_levels)):
      for j in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res_block(h, self.ch * self.ch_mult[i], f'up_{i}_res_{j}')
        if not self.decoder_attn_per_level:
          h = maybe_attn(h, f'up_{i}_attn_{j}')
      if self.decoder_attn_per_level:
        h = maybe_attn(h, f'up_{i}_attn')
      if i != 0:
        name = f'up_{i}_upsample'
        if self.resblock_updown:
          h = res_block(h, h.shape[-1], name, resample='up')
        else:
          h = Upsample(self.resample_with_conv, dtype, name=name)(h)  # [B, 2H, 2W, C]
    assert not skips, 'every encoder activation must be consumed by the decoder'

    h = nn.silu(nn.GroupNorm(self.num_groups, dtype=dtype, name='norm_out')(h))
    h = _conv3x3(out_channels, dtype, 'conv_out', zero_init=True)(h)
    return h.astype(jnp.float32)  # [B, H, W, out_channels]
