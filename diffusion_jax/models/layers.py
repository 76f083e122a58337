"""Pieces every backbone shares: noise-level embeddings, conditioning, attention.

Conditioning (`cond` in `model_fn(x_t, t, cond)`) is one of
  * `None`: unconditional (a class-conditional model then uses its null label);
  * integer class labels `[B]` in `[0, num_classes]`, where `num_classes` is the null label;
  * a dict with any of `'label'` (`[B]` ints), `'context'` (`[B, L, context_dim]`, a sequence the
    network cross-attends to, e.g. text-encoder states), `'context_mask'` (`[B, L]` bool,
    True = attend) and `'delta'` (`[B]` float, a second time input: MeanFlow's `t - r`, a
    shortcut model's step size `d`; only for a model built with `delta_input=True`, which then
    requires it; `with_delta` merges it into any cond).
Every field is optional and shape-checked by `parse_cond`, whose errors name the offending shape.
Classifier-free guidance needs an unconditional branch: class labels get a learned null
embedding (Ho & Salimans 2022) and `label_dropout` replaces a label by it during training; a
dropped context is all zeros with its mask all True (the "empty prompt" the network learns).
"""

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax.models import initializers

Dtype = Any


def canonical_dtype(name: str, dtype) -> jnp.dtype:
  """`jnp.dtype(dtype)` for a floating compute dtype ('float32', 'bfloat16', …), else an error."""
  try:
    d = jnp.dtype(dtype)
  except TypeError:
    d = None
  if d is None or not jnp.issubdtype(d, jnp.floating):
    raise ValueError(f'{name}: dtype={dtype!r} is not a floating dtype; use float32, bfloat16 '
                     f'or float16')
  return d


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


def fourier_embedding(t: jax.Array, dim: int, scale: float = 16.0, seed: int = 0) -> jax.Array:
  """Random Fourier features `[sin(2π w t), cos(2π w t)]`, `w ~ N(0, scale²)` fixed.

  Tancik et al. 2020; the noise embedding of NCSN++ / DDPM++ (Song et al. 2021, scale 16). The
  frequencies are a constant drawn from `seed` (not trained, as in the papers), so the module
  holds no extra state. `t`: `[B]` → `[B, dim]` (`dim` even).
  """
  if dim % 2:
    raise ValueError(f'fourier_embedding: dim must be even, got {dim}')
  w = scale * jax.random.normal(jax.random.key(seed), (dim // 2,), jnp.float32)  # [dim/2]
  args = 2 * math.pi * t.astype(jnp.float32)[:, None] * w[None, :]  # [B, dim/2]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)  # [B, dim]


EMBEDDINGS = ('sinusoidal', 'fourier')


def noise_embedding(t: jax.Array, dim: int, kind: str, time_scale: float,
                    fourier_scale: float) -> jax.Array:
  """The network's noise-level features: sinusoidal of `t * time_scale`, or Fourier of `t`.

  `t` is what the denoiser hands the network: continuous time in [0, 1] (DESIGN §1), or EDM's
  `c_noise`. `time_scale = 1000` makes `t ∈ [0, 1]` span the frequencies DDPM's integer steps do.
  """
  if kind == 'sinusoidal':
    return timestep_embedding(t * time_scale, dim)
  if kind == 'fourier':
    return fourier_embedding(t, dim, fourier_scale)
  raise ValueError(f'embedding={kind!r}: choose from {EMBEDDINGS}')


class Cond(NamedTuple):
  labels: jax.Array | None          # [B] int, num_classes = null
  context: jax.Array | None         # [B, L, context_dim]
  context_mask: jax.Array | None    # [B, L] bool
  delta: jax.Array | None = None    # [B] float32, the second time input (delta_input models)


def with_delta(cond: Any, delta) -> dict:
  """`cond` (None, class labels `[B]` or a dict) with the second time input `'delta'` set."""
  if cond is None:
    return {'delta': delta}
  if isinstance(cond, dict):
    return {**cond, 'delta': delta}
  return {'label': cond, 'delta': delta}


def parse_cond(name: str, cond: Any, batch: int, num_classes: int, context_dim: int, *,
               delta_input: bool = False) -> Cond:
  """Checks `cond` against what the model takes; errors name the model, field and shape.

  `delta_input`: the model takes a second time input `cond['delta']` (`[B]` or a scalar,
  returned as `[B]` float32), which is then required; without it a given delta is refused.
  """
  if cond is None:
    fields = {}
  elif isinstance(cond, dict):
    fields = dict(cond)
    unknown = set(fields) - {'label', 'context', 'context_mask', 'delta'}
    if unknown:
      raise ValueError(f'{name}: unknown cond keys {sorted(unknown)}; use label, context, '
                       f'context_mask, delta')
  else:
    fields = {'label': cond}

  delta = fields.get('delta')
  if delta is not None and not delta_input:
    raise ValueError(f'{name}: cond["delta"] (a second time input) was given but the model has '
                     f'delta_input=False.')
  if delta_input:
    if delta is None:
      raise ValueError(f'{name}: delta_input=True needs cond["delta"] of shape [B] = ({batch},) '
                       f'(with_delta(cond, delta)).')
    delta = jnp.asarray(delta)
    if delta.shape not in ((batch,), ()) or not jnp.issubdtype(delta.dtype, jnp.floating):
      raise ValueError(f'{name}: cond["delta"] must be floating of shape [B] = ({batch},) or a '
                       f'scalar, got {delta.dtype} {delta.shape}.')
    delta = jnp.broadcast_to(delta, (batch,)).astype(jnp.float32)

  labels = fields.get('label')
  if labels is not None:
    if num_classes == 0:
      raise ValueError(f'{name}: class labels were given but num_classes=0 (no class '
                       f'conditioning).')
    labels = jnp.asarray(labels)
    if labels.shape != (batch,) or not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(f'{name}: class labels must be integers of shape [B] = ({batch},), got '
                       f'{labels.dtype} {labels.shape}.')
  elif num_classes > 0:
    # No label means the null label: the unconditional branch of classifier-free guidance.
    labels = jnp.full((batch,), num_classes, jnp.int32)

  context, mask = fields.get('context'), fields.get('context_mask')
  if context is not None:
    if context_dim == 0:
      raise ValueError(f'{name}: a context was given but context_dim=0 (no cross-attention).')
    context = jnp.asarray(context)
    if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != context_dim:
      raise ValueError(f'{name}: context must be [B, L, context_dim] = ({batch}, L, '
                       f'{context_dim}), got {context.shape}.')
    if mask is not None:
      mask = jnp.asarray(mask)
      if mask.shape != context.shape[:2] or mask.dtype != jnp.bool_:
        raise ValueError(f'{name}: context_mask must be bool [B, L] = {context.shape[:2]}, got '
                         f'{mask.dtype} {mask.shape}.')
  elif mask is not None:
    raise ValueError(f'{name}: context_mask was given without a context.')
  elif context_dim > 0:
    raise ValueError(f'{name}: context_dim={context_dim} needs cond["context"] of shape '
                     f'[B, L, {context_dim}] (zeros for the unconditional branch).')
  return Cond(labels, context, mask, delta)


def check_fields(name: str, module: nn.Module, *, positive=(), non_negative=(),
                 probabilities=()) -> None:
  """One-line ValueErrors for module fields out of range: `positive` (> 0), `non_negative`
  (>= 0; e.g. `num_classes`, where a negative value would silently mean "unconditional") and
  `probabilities` (dropout rates, in [0, 1))."""
  for field in positive:
    if not getattr(module, field) > 0:
      raise ValueError(f'{name}: {field}={getattr(module, field)} must be > 0.')
  for field in non_negative:
    if not getattr(module, field) >= 0:
      raise ValueError(f'{name}: {field}={getattr(module, field)} must be >= 0.')
  for field in probabilities:
    if not 0.0 <= getattr(module, field) < 1.0:
      raise ValueError(f'{name}: {field}={getattr(module, field)} must lie in [0, 1).')


def check_inputs(name: str, x: jax.Array, t: Any, ndim: int) -> jax.Array:
  """Checks `x` has `ndim` axes and `t` is `[B]` or a scalar; returns `t` as `[B]` float."""
  if x.ndim != ndim:
    layout = {2: '[B, D]', 4: '[B, H, W, C]'}.get(ndim, f'{ndim} axes')
    raise ValueError(f'{name}: x must be {layout}, got shape {x.shape}.')
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'{name}: x must be floating, got dtype {x.dtype}.')
  t = jnp.asarray(t)
  if t.shape not in ((x.shape[0],), ()):
    raise ValueError(f'{name}: t must have shape [B] = ({x.shape[0]},) (or be a scalar), got '
                     f'{t.shape}.')
  return jnp.broadcast_to(t, x.shape[:1]).astype(jnp.float32)


def _drop(module: nn.Module, rate: float, batch: int, train: bool) -> jax.Array | None:
  """`[B]` bool, True where this example's conditioning is dropped (needs the 'dropout' rng)."""
  if not train or rate == 0.0:
    return None
  return jax.random.bernoulli(module.make_rng('dropout'), rate, (batch,))


def drop_labels(module: nn.Module, labels: jax.Array, num_classes: int, rate: float, *,
                train: bool) -> jax.Array:
  """Label dropout: in training, each label becomes the null label `num_classes` w.p. `rate`."""
  drop = _drop(module, rate, labels.shape[0], train)
  return labels if drop is None else jnp.where(drop, num_classes, labels)


class LabelEmbedding(nn.Module):
  """Class embedding with a learned null row `num_classes`; `rate` drops labels in training."""
  num_classes: int
  features: int
  rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, labels: jax.Array, *, train: bool) -> jax.Array:
    labels = drop_labels(self, labels, self.num_classes, self.rate, train=train)
    embed = nn.Embed(self.num_classes + 1, self.features, dtype=self.dtype,
                     embedding_init=initializers.embed_normal(), name='embedding')
    return embed(labels)  # [B, features]


def drop_context(module: nn.Module, cond: Cond, rate: float, *, train: bool) -> Cond:
  """Replaces dropped examples' context by zeros with a full mask (the unconditional branch)."""
  if cond.context is None:
    return cond
  drop = _drop(module, rate, cond.context.shape[0], train)
  if drop is None:
    return cond
  context = jnp.where(drop[:, None, None], 0.0, cond.context)
  mask = cond.context_mask
  if mask is not None:
    mask = jnp.where(drop[:, None], True, mask)
  return cond._replace(context=context, context_mask=mask)


def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              mask: jax.Array | None = None) -> jax.Array:
  """Softmax attention `[B, T, N, D] x [B, S, N, D] -> [B, T, N, D]`; `mask` `[B, S]` bool.

  `jax.nn.dot_product_attention` picks a fused (flash / cuDNN) kernel where the backend has one.
  """
  if mask is not None:
    mask = mask[:, None, None, :]  # [B, 1, 1, S], broadcast over heads and queries
  return jax.nn.dot_product_attention(q, k, v, mask=mask)


class CrossAttention(nn.Module):
  """Queries from `x` `[B, T, C]`, keys/values from `context` `[B, L, Dc]`; returns `[B, T, C]`.

  The output projection is zero-initialised, so `x + CrossAttention(...)` starts as identity.
  """
  num_heads: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array,
               mask: jax.Array | None = None) -> jax.Array:
    c = x.shape[-1]
    head_dim = c // self.num_heads
    dense = lambda name: nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype,
                                         kernel_init=initializers.lecun_normal(), name=name)
    q = dense('query')(x)                                   # [B, T, N, D]
    k = dense('key')(context.astype(self.dtype))            # [B, L, N, D]
    v = dense('value')(context.astype(self.dtype))          # [B, L, N, D]
    h = attention(q, k, v, mask)                            # [B, T, N, D]
    return nn.DenseGeneral(c, axis=(-2, -1), dtype=self.dtype,
                           kernel_init=initializers.zeros, name='out')(h)  # [B, T, C]


def example_cond(model, batch: int = 1, condition=None, image_shape=None):
  """A `cond` of the kind `model` takes, for `init`: zeros of an image-derived `condition`'s
  shape (for images of `image_shape`), `{'tokens': [B, L]}` for a text-conditioned model,
  labels `[B]` for a class-conditional one, else None; with a second time input
  (`delta_input`: MeanFlow, shortcut models) a zero `'delta'` beside it."""
  if condition is not None:
    return jnp.zeros((batch,) + condition.shape(image_shape), jnp.float32)
  length = getattr(model, 'context_length', 0)
  if length:
    return {'tokens': jnp.zeros((batch, length), jnp.int32)}
  cond = jnp.zeros((batch,), jnp.int32) if getattr(model, 'num_classes', 0) > 0 else None
  if getattr(model, 'delta_input', False):
    cond = with_delta(cond, jnp.zeros((batch,), jnp.float32))
  return cond
