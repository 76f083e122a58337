"""DDPM U-Net (Ho et al. 2020, arXiv:2006.11239, App. B), in Flax linen.

A PixelCNN++-style backbone: ResBlocks with a time embedding added in every
block, self-attention at chosen resolutions, stride-2 downsampling, nearest
upsampling and encoder→decoder skip connections. Layers that end a residual
branch (and the output conv) are zero-initialised, so every block starts as
the identity and the network outputs exactly zero at init (Dhariwal & Nichol
2021, ADM). Time is continuous, `t ∈ [0, 1]` with 0 = data (DESIGN.md §1).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """Sinusoidal embedding `[sin(t w_i), cos(t w_i)]`, `w_i = max_period^(-i / (dim/2))`.

  Vaswani et al. 2017, §3.5, as used for the noise level in DDPM. `t`: `[B]` → `[B, dim]`.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)  # [half]
  args = t.astype(jnp.float32)[:, None] * freqs[None, :]  # [B, half]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)  # [B, 2 * half]
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _conv3x3(features: int, dtype: Dtype, name: str, zero_init: bool = False,
             strides: int = 1) -> nn.Conv:
  # Symmetric padding (not XLA 'SAME', which pads only bottom/right at stride 2) so a stride-2
  # conv sees the same neighbourhood at every output position.
  return nn.Conv(features, (3, 3), strides=(strides, strides), padding=((1, 1), (1, 1)),
                 dtype=dtype,
                 kernel_init=nn.initializers.zeros if zero_init else nn.linear.default_kernel_init,
                 name=name)


class ResBlock(nn.Module):
  """GroupNorm → SiLU → conv → +Dense(temb) → GroupNorm → SiLU → dropout → conv(zero), + skip."""
  features: int
  num_groups: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, *, train: bool) -> jax.Array:
    # x: [B, H, W, C_in], temb: [B, E]
    h = nn.silu(nn.GroupNorm(self.num_groups, dtype=self.dtype, name='norm_0')(x))
    h = _conv3x3(self.features, self.dtype, 'conv_0')(h)  # [B, H, W, F]
    # DDPM applies the nonlinearity to the shared embedding before each block's projection.
    temb = nn.Dense(self.features, dtype=self.dtype, name='temb_proj')(nn.silu(temb))  # [B, F]
    h = h + temb[:, None, None, :]
    h = nn.silu(nn.GroupNorm(self.num_groups, dtype=self.dtype, name='norm_1')(h))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = _conv3x3(self.features, self.dtype, 'conv_1', zero_init=True)(h)
    if x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), dtype=self.dtype, name='shortcut')(x)
    return x + h  # [B, H, W, F]


class AttnBlock(nn.Module):
  """Multi-head self-attention over the H*W positions, zero-initialised output, residual."""
  num_heads: int
  num_groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hgt, wid, c = x.shape  # [B, H, W, C]
    head_dim = c // self.num_heads
    h = nn.GroupNorm(self.num_groups, dtype=self.dtype, name='norm')(x)
    h = h.reshape(b, hgt * wid, c)  # [B, T, C]
    q, k, v = (nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype, name=name)(h)
               for name in ('query', 'key', 'value'))  # [B, T, N, D] each
    # The library call picks a fused (flash / cuDNN) kernel where the backend has one.
    h = jax.nn.dot_product_attention(q, k, v)  # [B, T, N, D]
    h = nn.DenseGeneral(c, axis=(-2, -1), dtype=self.dtype, kernel_init=nn.initializers.zeros,
                        name='out')(h)  # [B, T, C]
    return x + h.reshape(b, hgt, wid, c)


class Downsample(nn.Module):
  """Stride-2 3x3 conv: [B, H, W, C] → [B, H/2, W/2, C]."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _conv3x3(x.shape[-1], self.dtype, 'conv', strides=2)(x)


class Upsample(nn.Module):
  """Nearest-neighbour 2x then 3x3 conv: [B, H, W, C] → [B, 2H, 2W, C]."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]
    return _conv3x3(x.shape[-1], self.dtype, 'conv')(x)


class UNet(nn.Module):
  """DDPM U-Net `(x_t [B, H, W, C], t [B], cond [B] | None) -> [B, H, W, out_channels]`.

  Attributes:
    ch: base channel count; level `i` has `ch * ch_mult[i]` channels.
    ch_mult: channel multipliers, one per resolution level (each level but the last halves H, W).
    num_res_blocks: ResBlocks per encoder level (the decoder has one more, for the skips).
    attn_resolutions: spatial sizes (H) at which self-attention follows each ResBlock. The
      middle block always attends.
    num_heads: attention heads; must divide the channels at every attention site.
    dropout: dropout rate inside ResBlocks, active only with `train=True` ('dropout' rng).
    num_groups: GroupNorm groups; must divide `ch * m` for every `m` in `ch_mult`.
    out_channels: output channels; `None` means the input's channel count.
    time_scale: `t` is multiplied by this before the sinusoidal embedding, so that `t ∈ [0, 1]`
      spans the frequency range DDPM's integer steps 0..999 do.
    num_classes: 0 for unconditional. If > 0, a learned class embedding (with an extra null
      label `num_classes`, for classifier-free guidance) is added to the time embedding.
    dtype: compute dtype; parameters are always float32 and the output is float32.
  """
  ch: int = 32
  ch_mult: tuple[int, ...] = (1, 2)
  num_res_blocks: int = 1
  attn_resolutions: tuple[int, ...] = (4,)
  num_heads: int = 1
  dropout: float = 0.0
  num_groups: int = 8
  out_channels: int | None = None
  time_scale: float = 1000.0
  num_classes: int = 0
  dtype: Dtype = jnp.float32

  def _check_config(self):
    for m in self.ch_mult:
      c = self.ch * m
      if c % self.num_groups:
        raise ValueError(f'UNet: num_groups={self.num_groups} must divide every level\'s channels '
                         f'ch * ch_mult = {[self.ch * k for k in self.ch_mult]}; {c} is not.')
    if self.num_heads < 1:
      raise ValueError(f'UNet: num_heads must be >= 1, got {self.num_heads}.')

  def _check_inputs(self, x, t, cond):
    if x.ndim != 4:
      raise ValueError(f'UNet: x must be [B, H, W, C], got shape {x.shape}.')
    b, hgt, wid, _ = x.shape
    factor = 2 ** (len(self.ch_mult) - 1)
    if hgt % factor or wid % factor:
      raise ValueError(f'UNet: H and W of x (shape {x.shape}) must be divisible by {factor} '
                       f'= 2**(len(ch_mult) - 1) for ch_mult={self.ch_mult}.')
    t = jnp.asarray(t)
    if t.shape not in ((b,), ()):
      raise ValueError(f'UNet: t must have shape [B] = ({b},) (or be a scalar), got {t.shape}.')
    t = jnp.broadcast_to(t, (b,))
    if self.num_classes == 0:
      if cond is not None:
        raise ValueError('UNet: cond was given but num_classes=0 (unconditional model).')
      return t, None
    if cond is None:
      # No label means the null label: the unconditional branch of classifier-free guidance.
      return t, jnp.full((b,), self.num_classes, jnp.int32)
    cond = jnp.asarray(cond)
    if cond.shape != (b,) or not jnp.issubdtype(cond.dtype, jnp.integer):
      raise ValueError(f'UNet: cond must be integer labels of shape [B] = ({b},), '
                       f'got {cond.dtype} {cond.shape}.')
    return t, cond

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, cond: jax.Array | None = None, *,
               train: bool = False) -> jax.Array:
    """`x`: [B, H, W, C]; `t`: [B] in [0, 1]; `cond`: int [B] in [0, num_classes] or None."""
    self._check_config()
    t, cond = self._check_inputs(x, t, cond)
    out_channels = x.shape[-1] if self.out_channels is None else self.out_channels
    num_levels = len(self.ch_mult)

    def res_block(h, features, name):
      return ResBlock(features, self.num_groups, self.dropout, self.dtype, name=name)(
          h, temb, train=train)

    def maybe_attn(h, name):
      if h.shape[1] not in self.attn_resolutions:
        return h
      return self._attn(h, name)

    # Time (and class) embedding.
    temb = timestep_embedding(t * self.time_scale, self.ch)  # [B, ch]
    temb = nn.Dense(4 * self.ch, dtype=self.dtype, name='temb_dense_0')(temb)
    temb = nn.Dense(4 * self.ch, dtype=self.dtype, name='temb_dense_1')(nn.silu(temb))  # [B, E]
    if self.num_classes > 0:
      # Row `num_classes` is the null label.
      temb = temb + nn.Embed(self.num_classes + 1, 4 * self.ch, dtype=self.dtype,
                             name='class_embed')(cond)

    # Encoder: store every activation the decoder will consume as a skip.
    h = _conv3x3(self.ch, self.dtype, 'conv_in')(x.astype(self.dtype))  # [B, H, W, ch]
    skips = [h]
    for i, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = res_block(h, self.ch * mult, f'down_{i}_res_{j}')
        h = maybe_attn(h, f'down_{i}_attn_{j}')
        skips.append(h)
      if i != num_levels - 1:
        h = Downsample(self.dtype, name=f'down_{i}_downsample')(h)  # [B, H/2, W/2, C]
        skips.append(h)

    # Middle, at the lowest resolution.
    h = res_block(h, h.shape[-1], 'mid_res_0')
    h = self._attn(h, 'mid_attn')
    h = res_block(h, h.shape[-1], 'mid_res_1')

    # Decoder: num_res_blocks + 1 blocks per level, each eating one skip.
    for i in reversed(range(num_levels)):
      for j in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res_block(h, self.ch * self.ch_mult[i], f'up_{i}_res_{j}')
        h = maybe_attn(h, f'up_{i}_attn_{j}')
      if i != 0:
        h = Upsample(self.dtype, name=f'up_{i}_upsample')(h)  # [B, 2H, 2W, C]
    assert not skips, 'every encoder activation must be consumed by the decoder'

    h = nn.silu(nn.GroupNorm(self.num_groups, dtype=self.dtype, name='norm_out')(h))
    h = _conv3x3(out_channels, self.dtype, 'conv_out', zero_init=True)(h)
    return h.astype(jnp.float32)  # [B, H, W, out_channels]

  def _attn(self, h, name):
    if h.shape[-1] % self.num_heads:
      raise ValueError(f'UNet: num_heads={self.num_heads} must divide the {h.shape[-1]} '
                       f'channels at the attention block {name!r}.')
    return AttnBlock(self.num_heads, self.num_groups, self.dtype, name=name)(h)
