"""Text conditioning: a Transformer text encoder, and a denoiser that reads token ids.

`TextConditioned(net, encoder, empty_tokens, eos_id)` is a denoising network with the
DESIGN §2 interface `model(x_t, t, cond, *, train)` whose `cond` is a caption:

  {'tokens': [B, L] int32}                      token ids (`diffusion_jax.text` tokenizers),
                                                encoded on every call (training);
  {'context': [B, L, D], 'context_mask': [B, L]}  an encoding already made by `encode` (sampling:
                                                once per call of the sampler, not per step).

`encode(tokens)` runs the text encoder: its last hidden states `[B, L, D]` are the context that
`net` (a U-Net or DiT with `context_dim = D`) cross-attends to, and `context_mask` is True from
the BOS token through the first EOS (padding is not attended to; `mask_padding=False` attends to
every position, as Stable Diffusion 1.x does with CLIP).

Caption dropout, for classifier-free guidance: in training each example's tokens are replaced,
with probability `caption_dropout`, by `empty_tokens`, the tokens of the empty prompt "" (BOS,
EOS, padding). The unconditional branch is therefore the network conditioned on the encoding
of "", as in Stable Diffusion, and a negative prompt replaces it at sampling time
(`generation.make_sample_fn`). `net`'s own `context_dropout` (zeros for a dropped context) is
refused here: it would be a second, different unconditional branch.

The encoder is trained with the denoiser (its parameters are the `encoder` subtree of the
model's), or loaded from pretrained weights and frozen (`run_config.TextConfig.freeze`; the
optimizer then leaves the subtree unchanged, `training.make_optimizer(frozen=...)`).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import initializers
from diffusion_jax.models import layers


def context_mask(tokens: jax.Array, eos_id: int) -> jax.Array:
  """`[B, L]` bool: True at positions up to and including the first `eos_id` of each row (a row
  without EOS is all True). The jnp twin of the tokenizers' `context_mask`."""
  is_eos = tokens == eos_id
  before = jnp.cumsum(is_eos, axis=-1) - is_eos   # EOS tokens strictly before each position
  return before == 0


class _EncoderBlock(nn.Module):
  """Pre-LN Transformer block: `x += Attn(LN(x))` over unmasked keys; `x += MLP(LN(x))`."""
  num_heads: int
  mlp_ratio: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    d = x.shape[-1]
    head_dim = d // self.num_heads
    h = nn.LayerNorm(dtype=self.dtype, name='norm_attn')(x)
    proj = lambda name: nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype,
                                        kernel_init=initializers.lecun_normal(), name=name)
    h = layers.attention(proj('query')(h), proj('key')(h), proj('value')(h), mask)
    x = x + nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype,
                            kernel_init=initializers.lecun_normal(), name='out')(h)
    h = nn.LayerNorm(dtype=self.dtype, name='norm_mlp')(x)
    h = nn.Dense(self.mlp_ratio * d, dtype=self.dtype, name='mlp_in')(h)
    h = nn.Dense(d, dtype=self.dtype, name='mlp_out')(nn.gelu(h))
    return x + h


class TextEncoder(nn.Module):
  """A small bidirectional Transformer over token ids, trained from scratch.

  `tokens` `[B, L]` int32 -> hidden states `[B, L, width]`: token embedding plus a learned
  position embedding, `depth` pre-LN blocks whose attention sees only the positions of
  `context_mask(tokens, eos_id)` (BOS .. first EOS), and a final LayerNorm. Padding positions
  still get states (they attend to the caption), which the mask then hides from the denoiser.
  """
  vocab_size: int
  max_length: int
  eos_id: int
  width: int = 128
  depth: int = 2
  num_heads: int = 4
  dtype: Any = jnp.float32

  def setup(self):
    layers.check_fields('TextEncoder', self, positive=('vocab_size', 'max_length', 'width',
                                                       'depth', 'num_heads'))
    if self.width % self.num_heads:
      raise ValueError(f'TextEncoder: width={self.width} must be a multiple of '
                       f'num_heads={self.num_heads}.')

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    if tokens.ndim != 2 or tokens.shape[1] > self.max_length:
      raise ValueError(f'TextEncoder: tokens must be [B, L] with L <= max_length='
                       f'{self.max_length}, got shape {tokens.shape}.')
    embed = nn.Embed(self.vocab_size, self.width, embedding_init=initializers.embed_normal(),
                     name='token_embedding')
    pos = self.param('position_embedding', initializers.normal(0.02),
                     (self.max_length, self.width))
    h = embed(tokens).astype(self.dtype) + pos[:tokens.shape[1]].astype(self.dtype)
    mask = context_mask(tokens, self.eos_id)
    for i in range(self.depth):
      h = _EncoderBlock(self.num_heads, dtype=self.dtype, name=f'block_{i}')(h, mask)
    return nn.LayerNorm(dtype=self.dtype, name='final_norm')(h).astype(jnp.float32)


class CLIPTextStates(nn.Module):
  """The CLIP text tower (`models.clip.CLIPTextTransformer`) as a text encoder: tokens
  `[B, L]` -> its last hidden states `[B, L, hidden_size]` (what Stable Diffusion 1.x
  cross-attends to; SD 2.x's penultimate layer is the same with one layer fewer in the config).
  Its parameters are the tower's, under `transformer`."""
  config: Any     # models.clip.CLIPTextConfig

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    from diffusion_jax.models import clip  # pylint: disable=g-import-not-at-top
    states, _ = clip.CLIPTextTransformer(self.config, name='transformer')(tokens)
    return states.astype(jnp.float32)


class TextConditioned(nn.Module):
  """`net` (context_dim > 0) conditioned on a caption encoded by `encoder` (see the module
  docstring). `encoder(tokens [B, L]) -> [B, L, D]` with D = `net.context_dim`."""
  net: nn.Module
  encoder: nn.Module
  empty_tokens: tuple[int, ...]     # the empty prompt "", length L
  eos_id: int
  caption_dropout: float = 0.1
  mask_padding: bool = True
  freeze_encoder: bool = False      # no gradient flows into the encoder

  @property
  def context_length(self) -> int:
    return len(self.empty_tokens)

  def encode(self, tokens: jax.Array) -> dict:
    """`{'context': [B, L, D], 'context_mask': [B, L] bool}` for token ids `[B, L]`."""
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
      raise ValueError(f'TextConditioned: tokens must be [B, {self.context_length}] (the '
                       f'context length), got shape {tokens.shape}.')
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f'TextConditioned: tokens must be integer ids, got {tokens.dtype}.')
    context = self.encoder(tokens)
    if self.freeze_encoder:
      context = jax.lax.stop_gradient(context)
    if self.mask_padding:
      mask = context_mask(tokens, self.eos_id)
    else:
      mask = jnp.ones(tokens.shape, jnp.bool_)
    return {'context': context, 'context_mask': mask}

  def __call__(self, x: jax.Array, t: jax.Array, cond: Any = None, *,
               train: bool = False) -> jax.Array:
    if getattr(self.net, 'context_dropout', 0.0):
      raise ValueError('TextConditioned: set model.context_dropout=0 (captions are dropped to '
                       'the empty prompt by text.caption_dropout instead).')
    if not isinstance(cond, dict) or not ({'tokens'} <= set(cond) or {'context'} <= set(cond)):
      got = sorted(cond) if isinstance(cond, dict) else type(cond).__name__
      raise ValueError(f"TextConditioned: cond must be {{'tokens': [B, L]}} or {{'context', "
                       f"'context_mask'}} (a caption; '' is the unconditional prompt), got {got}.")
    if 'tokens' in cond:
      tokens = jnp.asarray(cond['tokens'])
      if train and self.caption_dropout > 0:
        drop = jax.random.bernoulli(self.make_rng('dropout'), self.caption_dropout,
                                    tokens.shape[:1])
        empty = jnp.asarray(self.empty_tokens, tokens.dtype)
        tokens = jnp.where(drop[:, None], empty[None, :], tokens)
      cond = self.encode(tokens)
    return self.net(x, t, {'context': cond['context'],
                           'context_mask': cond.get('context_mask')}, train=train)
