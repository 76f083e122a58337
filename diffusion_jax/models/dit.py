"""DiT: diffusion transformer with adaLN-Zero blocks (Peebles & Xie 2023, arXiv:2212.09748).

`x [B, H, W, C]` is cut into `p x p` patches (a stride-p conv), given fixed 2-D sin-cos
position embeddings, and run through `depth` transformer blocks whose LayerNorms are modulated
by the conditioning vector `c = embed(t) + embed(label)`: `LN(x) (1 + scale) + shift`, with each
residual branch multiplied by a gate. The modulation layers and the final projection start at
zero (adaLN-Zero, §3.2), so every block is the identity and the output is exactly zero at init.
Sizes (Table 1): S (384, 12 blocks, 6 heads), B (768, 12, 12), L (1024, 24, 16), XL (1152, 28,
16); patch 2, 4 or 8. `out_channels = 2C` adds the learned variances DiT trains with L_vlb.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import initializers
from diffusion_jax.models import layers

# name -> (hidden size, depth, heads), Peebles & Xie 2023, Table 1.
DIT_VARIANTS = {'S': (384, 12, 6), 'B': (768, 12, 12), 'L': (1024, 24, 16), 'XL': (1152, 28, 16)}


def dit_variant(name: str) -> dict:
  """'XL/2' -> dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2)."""
  size, _, patch = name.partition('/')
  if size not in DIT_VARIANTS or patch not in ('2', '4', '8'):
    raise ValueError(f'dit_variant: {name!r} is not SIZE/PATCH with SIZE in {list(DIT_VARIANTS)} '
                     f'and PATCH in 2, 4, 8')
  hidden, depth, heads = DIT_VARIANTS[size]
  return dict(hidden_size=hidden, depth=depth, num_heads=heads, patch_size=int(patch))


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding `[grid_h * grid_w, dim]` (MAE / DiT convention).

  Half the channels embed the column index, half the row index, each as `[sin, cos]` of the
  index times `1 / 10000^(k / (dim/4))`, k = 0..dim/4-1.
  """
  if dim % 4:
    raise ValueError(f'sincos_2d: dim must be divisible by 4, got {dim}')
  omega = 1.0 / 10_000 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))  # [dim/4]

  def embed_1d(pos):  # [N] -> [N, dim/2]
    args = pos[:, None] * omega[None, :]
    return np.concatenate([np.sin(args), np.cos(args)], axis=1)
  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64),
                           np.arange(grid_w, dtype=np.float64), indexing='ij')
  emb = np.concatenate([embed_1d(cols.reshape(-1)), embed_1d(rows.reshape(-1))], axis=1)
  return emb.astype(np.float32)  # [grid_h * grid_w, dim]


def _modulate(x, shift, scale):
  return x * (1 + scale[:, None, :]) + shift[:, None, :]  # x: [B, T, D]; shift, scale: [B, D]


_xavier = initializers.xavier_uniform()


class DiTBlock(nn.Module):
  """adaLN-Zero block: x += gate_msa * Attn(mod(LN(x))); [x += CrossAttn(LN(x), context)];
  x += gate_mlp * MLP(mod(LN(x))). The six modulation vectors come from SiLU(c) -> Dense, zero
  at init."""
  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, c, context=None, context_mask=None):
    # x: [B, T, D], c: [B, D]
    d, heads = self.hidden_size, self.num_heads
    mod = nn.Dense(6 * d, dtype=self.dtype, kernel_init=initializers.zeros,
                   name='adaLN_modulation')(nn.silu(c))  # [B, 6D]
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    norm = lambda name: nn.LayerNorm(1e-6, use_bias=False, use_scale=False, dtype=self.dtype,
                                     name=name)

    h = _modulate(norm('norm1')(x), shift_msa, scale_msa)
    qkv = nn.DenseGeneral((3, heads, d // heads), dtype=self.dtype, kernel_init=_xavier,
                          name='qkv')(h)  # [B, T, 3, N, D/N]
    h = layers.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # [B, T, N, D/N]
    h = nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, kernel_init=_xavier,
                        name='proj')(h)  # [B, T, D]
    x = x + gate_msa[:, None, :] * h

    if context is not None:
      h = layers.CrossAttention(heads, self.dtype, name='cross_attn')(
          norm('norm_cross')(x), context, context_mask)
      x = x + h

    h = _modulate(norm('norm2')(x), shift_mlp, scale_mlp)
    h = nn.Dense(int(d * self.mlp_ratio), dtype=self.dtype, kernel_init=_xavier, name='fc1')(h)
    h = nn.Dense(d, dtype=self.dtype, kernel_init=_xavier,
                 name='fc2')(nn.gelu(h, approximate=True))
    return x + gate_mlp[:, None, :] * h  # [B, T, D]


class DiT(nn.Module):
  """DiT `(x_t [B, H, W, C], t [B], cond) -> [B, H, W, out_channels]`, float32 output.

  Attributes:
    patch_size, hidden_size, depth, num_heads, mlp_ratio: the transformer (see `dit_variant`).
    out_channels: `None` = input channels; `2C` = prediction and learned variance per channel.
    num_classes, label_dropout: class conditioning with a learned null label `num_classes`,
      replaced for a fraction `label_dropout` of training labels (classifier-free guidance).
    context_dim, context_dropout: a cross-attended context sequence `cond['context']`.
    embedding, time_scale, fourier_scale, frequency_dim: the noise-level features fed to the
      timestep MLP (DiT: 256 sinusoidal frequencies of the integer step, `t * 1000`).
    dtype: compute dtype; parameters are float32.
    remat: rematerialise each block in the backward pass (`jax.checkpoint`).
  """
  patch_size: int = 2
  hidden_size: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  out_channels: int | None = None
  num_classes: int = 0
  label_dropout: float = 0.0
  context_dim: int = 0
  context_dropout: float = 0.0
  embedding: str = 'sinusoidal'
  time_scale: float = 1000.0
  fourier_scale: float = 16.0
  frequency_dim: int = 256
  dtype: Any = 'float32'
  remat: bool = False

  def _check(self, x):
    layers.check_fields('DiT', self, positive=('patch_size', 'hidden_size', 'depth',
                                               'num_heads', 'mlp_ratio', 'frequency_dim'),
                        non_negative=('num_classes', 'context_dim'),
                        probabilities=('label_dropout', 'context_dropout'))
    p = self.patch_size
    if self.hidden_size % self.num_heads:
      raise ValueError(f'DiT: num_heads={self.num_heads} must divide hidden_size='
                       f'{self.hidden_size}.')
    if self.hidden_size % 4:
      raise ValueError(f'DiT: hidden_size={self.hidden_size} must be divisible by 4 (2-D '
                       f'sin-cos position embedding).')
    if x.shape[1] % p or x.shape[2] % p:
      raise ValueError(f'DiT: H and W of x (shape {x.shape}) must be divisible by '
                       f'patch_size={p}.')

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, cond: Any = None, *,
               train: bool = False) -> jax.Array:
    t = layers.check_inputs('DiT', x, t, ndim=4)
    self._check(x)
    c_in = layers.parse_cond('DiT', cond, x.shape[0], self.num_classes, self.context_dim)
    c_in = layers.drop_context(self, c_in, self.context_dropout, train=train)
    dtype = layers.canonical_dtype('DiT', self.dtype)
    b, height, width, channels = x.shape
    p, d = self.patch_size, self.hidden_size
    gh, gw = height // p, width // p
    out_channels = channels if self.out_channels is None else self.out_channels

    # Patchify: [B, H, W, C] -> [B, T, D], T = (H/p)(W/p), plus fixed position embeddings.
    h = nn.Conv(d, (p, p), strides=(p, p), padding='VALID', dtype=dtype, kernel_init=_xavier,
                name='x_embedder')(x.astype(dtype))
    h = h.reshape(b, gh * gw, d) + jnp.asarray(sincos_2d(gh, gw, d), dtype)[None]

    # Conditioning vector c [B, D]: timestep MLP, plus the label embedding.
    normal = initializers.normal(0.02)
    temb = layers.noise_embedding(t, self.frequency_dim, self.embedding, self.time_scale,
                                  self.fourier_scale)
    temb = nn.Dense(d, dtype=dtype, kernel_init=normal, name='t_embedder_0')(temb)
    c = nn.Dense(d, dtype=dtype, kernel_init=normal, name='t_embedder_1')(nn.silu(temb))
    if self.num_classes > 0:
      labels = layers.drop_labels(self, c_in.labels, self.num_classes, self.label_dropout,
                                  train=train)
      c = c + nn.Embed(self.num_classes + 1, d, dtype=dtype, embedding_init=normal,
                       name='y_embedder')(labels)

    block_cls = nn.remat(DiTBlock) if self.remat else DiTBlock
    for i in range(self.depth):
      h = block_cls(d, self.num_heads, self.mlp_ratio, dtype, name=f'block_{i}')(
          h, c, c_in.context, c_in.context_mask)

    # Final layer: adaLN-modulated LayerNorm, zero-initialised linear to p*p*out channels.
    shift, scale = jnp.split(nn.Dense(2 * d, dtype=dtype, kernel_init=initializers.zeros,
                                      name='final_adaLN')(nn.silu(c)), 2, axis=-1)
    h = _modulate(nn.LayerNorm(1e-6, use_bias=False, use_scale=False, dtype=dtype,
                               name='final_norm')(h), shift, scale)
    h = nn.Dense(p * p * out_channels, dtype=dtype, kernel_init=initializers.zeros,
                 name='final_linear')(h)  # [B, T, p*p*C_out]
    # Unpatchify: [B, gh, gw, p, p, C_out] -> [B, H, W, C_out].
    h = h.reshape(b, gh, gw, p, p, out_channels).transpose(0, 1, 3, 2, 4, 5)
    return h.reshape(b, height, width, out_channels).astype(jnp.float32)
