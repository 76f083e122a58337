"""A digits-CLIP: image and caption embeddings in one space, for the CLIP score of text-to-image.

Two towers trained contrastively on the captioned train digits (Radford et al. 2021, CLIP):
  image  conv3x3 -> conv3x3 -> avg-pool 2x2 -> dense -> dense   on native 8x8 digits
  text   token + position embeddings -> pre-LN Transformer blocks over BOS..EOS (padding masked)
         -> LayerNorm at the first EOS -> dense
both L2-normalised. With `s = exp(log_scale)` (learned, initialised to 1 / 0.07 and capped at
100 as in CLIP) and `S = s I T^T` for a batch of B image / text embeddings, the loss is the
symmetric InfoNCE `(CE(S, arange B) + CE(S^T, arange B)) / 2`. Each step draws fresh captions of
the train templates (`data.captions`); two captions in a batch may say the same thing (same class,
same named values, e.g. two label-only "a seven"), and are then false negatives of each other.

CLIP score (Hessel et al. 2021, CLIPScore) is `w * max(cos(image, text), 0)` averaged over pairs,
with w = 100 as torchmetrics reports it (the paper's w is 2.5).

  params, info = load_or_train_digits_clip(cache_dir)
  score = clip_score(params, images, tokens)  # beside info['clip_score_real']
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax.data import captions
from diffusion_jax.data import digits
from diffusion_jax.metrics import cached_model
from diffusion_jax.text import words

# Bump when anything that changes the trained weights changes (model, data, captions, training).
RECIPE_VERSION = 1

DEFAULT_RECIPE = {
    'version': RECIPE_VERSION,
    'conv_widths': (16, 32),
    'hidden_dim': 128,
    'embed_dim': 64,
    'text_width': 64,
    'text_depth': 2,
    'text_heads': 4,
    'steps': 1200,
    'batch_size': 256,
    'learning_rate': 2e-3,
    'weight_decay': 1e-4,
}

_EVAL_BATCH = 512
_MAX_SCALE = 100.0


class ImageTower(nn.Module):
  """`[B, 8, 8, 1]` digits in [-1, 1] -> `[B, embed_dim]` (not normalised)."""
  conv_widths: tuple[int, ...]
  hidden_dim: int
  embed_dim: int

  @nn.compact
  def __call__(self, x):
    for width in self.conv_widths:
      x = nn.relu(nn.Conv(width, (3, 3), padding='SAME')(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2)).reshape(x.shape[0], -1)  # [B, 4 * 4 * C]
    x = nn.gelu(nn.Dense(self.hidden_dim)(x))
    return nn.Dense(self.embed_dim)(x)


class TextTower(nn.Module):
  """`[B, L]` WordTokenizer ids -> `[B, embed_dim]`: the LayerNorm'd state at the first EOS."""
  vocab_size: int
  length: int
  width: int
  depth: int
  heads: int
  embed_dim: int
  eos_id: int = words.WordTokenizer.eos_id

  @nn.compact
  def __call__(self, tokens):
    mask = words.context_mask(tokens, eos_id=self.eos_id)  # [B, L]
    x = nn.Embed(self.vocab_size, self.width)(tokens)
    x = x + self.param('position', nn.initializers.normal(0.02), (self.length, self.width))
    attention_mask = mask[:, None, None, :]  # [B, 1, 1(query), L(key)]
    for _ in range(self.depth):
      h = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(self.heads)(h, h, mask=attention_mask)
      h = nn.LayerNorm()(x)
      x = x + nn.Dense(self.width)(nn.gelu(nn.Dense(2 * self.width)(h)))
    eos = jnp.argmax(tokens == self.eos_id, axis=-1)  # [B]
    x = nn.LayerNorm()(x[jnp.arange(x.shape[0]), eos])
    return nn.Dense(self.embed_dim)(x)


class DigitsCLIP(nn.Module):
  """The two towers and the learned logit scale `log s`."""
  recipe_items: tuple

  def setup(self):
    r = dict(self.recipe_items)
    tokenizer = words.WordTokenizer.for_captions()
    self.image = ImageTower(tuple(r['conv_widths']), r['hidden_dim'], r['embed_dim'])
    self.text = TextTower(tokenizer.vocab_size, tokenizer.context_length, r['text_width'],
                          r['text_depth'], r['text_heads'], r['embed_dim'])
    self.log_scale = self.param('log_scale', nn.initializers.constant(np.log(1 / 0.07)), ())

  def encode_image(self, x):
    return _normalize(self.image(x))

  def encode_text(self, tokens):
    return _normalize(self.text(tokens))

  def __call__(self, x, tokens):
    return self.encode_image(x), self.encode_text(tokens), self.log_scale


def _normalize(v):
  return v / jnp.sqrt(jnp.sum(v * v, axis=-1, keepdims=True) + 1e-12)


def _model(recipe: Mapping[str, Any]) -> DigitsCLIP:
  items = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(recipe.items()))
  return DigitsCLIP(items)


def contrastive_loss(image_emb, text_emb, log_scale):
  """Symmetric InfoNCE of `[B, D]` unit embeddings, pair i matching pair i (CLIP, Fig. 3)."""
  scale = jnp.minimum(jnp.exp(log_scale), _MAX_SCALE)
  logits = scale * image_emb @ text_emb.T  # [B(image), B(text)]
  target = jnp.arange(logits.shape[0])
  return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
                + optax.softmax_cross_entropy_with_integer_labels(logits.T, target).mean())


def _caption_table(labels, attributes, tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """Every caption `draw_caption` can give each image: tokens `[N, V, L]`, valid `[N, V]`."""
  num_templates = len(captions.TRAIN_TEMPLATES)
  rows, valid = [], []
  for label, values in zip(labels, attributes, strict=True):
    named = np.flatnonzero(values != captions.NOT_NAMED)
    subsets = [()] + [(a,) for a in named] + [(a, b) for a in named for b in named if a < b]
    texts = []
    for subset in subsets:
      v = np.full_like(values, captions.NOT_NAMED)
      v[list(subset)] = values[list(subset)]
      texts += [captions.caption(int(label), v, template=t) for t in range(num_templates)]
    rows.append(tokenizer.encode(texts))
    valid.append(len(texts))
  width = max(valid)
  table = np.zeros((len(rows), width, tokenizer.context_length), np.int32)
  for i, r in enumerate(rows):
    table[i, :len(r)] = r
  return table, np.arange(width)[None, :] < np.asarray(valid)[:, None]


def train_digits_clip(key, images, labels, attributes, recipe: Mapping[str, Any]):
  """Trains the digits-CLIP with AdamW and a cosine schedule; returns its `params`.

  Step i draws (from `fold_in(key, i)`) a batch of images with replacement and, for each, one
  caption uniformly among all the train-template captions true of it (0, 1 or 2 of its named
  attributes); so the captions change every step."""
  tokenizer = words.WordTokenizer.for_captions()
  table, valid = _caption_table(labels, attributes, tokenizer)
  images = jnp.asarray(images, jnp.float32)
  table, log_valid = jnp.asarray(table), jnp.log(jnp.asarray(valid, jnp.float32))
  model = _model(recipe)
  init_key, train_key = jax.random.split(key)
  params = jax.jit(model.init)(init_key, images[:1], table[:1, 0])['params']
  steps, batch_size = recipe['steps'], recipe['batch_size']
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, recipe['learning_rate'], warmup_steps=max(steps // 20, 1), decay_steps=max(steps, 2))
  tx = optax.adamw(schedule, weight_decay=recipe['weight_decay'])
  num = images.shape[0]

  def loss_fn(p, x, tokens):
    return contrastive_loss(*model.apply({'params': p}, x, tokens))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(p, opt_state, i):
    k_idx, k_cap = jax.random.split(jax.random.fold_in(train_key, i))
    idx = jax.random.randint(k_idx, (batch_size,), 0, num)
    which = jax.random.categorical(k_cap, log_valid[idx])  # [B]
    loss, grads = jax.value_and_grad(loss_fn)(p, images[idx], table[idx, which])
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  opt_state = tx.init(params)
  for i in range(steps):
    params, opt_state, _ = train_step(params, opt_state, i)
  return jax.device_get(params)


def _recipe_of(params) -> dict[str, Any]:
  # Evaluation needs only the layer sizes, and those are the parameter shapes.
  img, txt = params['image'], params['text']
  convs = sorted((k for k in img if k.startswith('Conv_')), key=lambda k: int(k[5:]))
  blocks = [k for k in txt if k.startswith('MultiHeadDotProductAttention_')]
  heads = txt[blocks[0]]['query']['kernel'].shape[1] if blocks else 1
  return dict(DEFAULT_RECIPE, conv_widths=tuple(img[k]['kernel'].shape[-1] for k in convs),
              hidden_dim=img['Dense_0']['kernel'].shape[-1],
              embed_dim=img['Dense_1']['kernel'].shape[-1],
              text_width=txt['Embed_0']['embedding'].shape[-1], text_depth=len(blocks),
              text_heads=heads)


@jax.jit
def _image_apply(params, x):
  return _model(_recipe_of(params)).apply({'params': params}, x, method='encode_image')


@jax.jit
def _text_apply(params, tokens):
  return _model(_recipe_of(params)).apply({'params': params}, tokens, method='encode_text')


def _chunked(fn, params, x, pad_value) -> np.ndarray:
  out = []
  for i in range(0, len(x), _EVAL_BATCH):
    chunk = x[i:i + _EVAL_BATCH]
    n = len(chunk)
    # Padded to one size: every chunk reuses one compiled function.
    pad = np.full((_EVAL_BATCH - n,) + chunk.shape[1:], pad_value, chunk.dtype)
    out.append(np.asarray(fn(params, np.concatenate([chunk, pad])))[:n])
  dim = params['image']['Dense_1']['kernel'].shape[-1]
  return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def image_embeddings(params, images) -> np.ndarray:
  """Unit embeddings `[N, D]` of `[N, S, S, 1]` digits (any `digits.SIZES`, clipped to [-1, 1])."""
  x = np.clip(digits.to_native(np.asarray(images, np.float32)), -1.0, 1.0).astype(np.float32)
  return _chunked(_image_apply, params, x, -1.0)


def text_embeddings(params, tokens) -> np.ndarray:
  """Unit embeddings `[N, D]` of `[N, L]` WordTokenizer ids (L = its context_length)."""
  tokens = np.asarray(tokens, np.int32)
  length = words.WordTokenizer.for_captions().context_length
  if tokens.ndim != 2 or tokens.shape[1] != length:
    raise ValueError(f'digits-CLIP: expected tokens [N, {length}], got shape {tokens.shape}')
  return _chunked(_text_apply, params, tokens, 0)


def clip_score_from_embeddings(image_emb, text_emb) -> float:
  """`mean_i 100 * max(cos(image_i, text_i), 0)` (CLIPScore with w = 100, as torchmetrics)."""
  a, b = np.asarray(image_emb, np.float64), np.asarray(text_emb, np.float64)
  cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
  return float(np.mean(100.0 * np.maximum(cos, 0.0)))


def clip_score(params, images, tokens) -> float:
  """CLIP score of `images[i]` with caption `tokens[i]`: the mean over pairs of
  `100 * max(cos(image, text), 0)` (Hessel et al. 2021 with w = 100, as torchmetrics reports)."""
  if len(images) != len(tokens):
    raise ValueError(f'clip_score: {len(images)} images but {len(tokens)} captions')
  return clip_score_from_embeddings(image_embeddings(params, images),
                                    text_embeddings(params, tokens))


def heldout_test_captions(seed: int = 0) -> tuple:
  """`(images, labels, named, template, texts)` of the test split, each with one held-out
  caption (`draw_caption` with `seed`, position = index)."""
  images, labels = digits.load_digits('test')
  attrs = captions.measure_attributes(images)
  named, template, texts = np.zeros_like(attrs), np.zeros(len(labels), np.int32), []
  for i, (label, values) in enumerate(zip(labels, attrs, strict=True)):
    text, named[i] = captions.draw_caption(int(label), values, seed=seed, position=i, index=i,
                                           subset='heldout')
    texts.append(text)
    template[i] = next(t for t in range(len(captions.HELDOUT_TEMPLATES))
                       if captions.caption(int(label), named[i], template=t,
                                           subset='heldout') == text)
  return images, labels, named, template, texts


def floor_metrics(params) -> dict[str, float]:
  """The real-data floor on the test split, each image with one held-out caption:

  retrieval_accuracy            the image's caption has the highest cosine among the 10
                                captions of the same template and named values, one per class
  attribute_retrieval_accuracy  over every (image, named attribute): the caption beats the same
                                caption with that attribute's value swapped (chance: 0.5)
  clip_score_real               `clip_score` of the images with their captions
  """
  tokenizer = words.WordTokenizer.for_captions()
  images, labels, named, template, texts = heldout_test_captions()
  img = image_embeddings(params, images)
  txt = text_embeddings(params, tokenizer.encode(texts))
  per_class = [[captions.caption(c, v, template=int(t), subset='heldout') for c in range(10)]
               for v, t in zip(named, template, strict=True)]
  cls_emb = text_embeddings(params, tokenizer.encode(sum(per_class, []))).reshape(
      len(labels), 10, -1)
  retrieval = np.argmax(np.einsum('nd,ncd->nc', img, cls_emb), -1) == labels
  swapped_texts, owners = [], []
  for i, (v, t) in enumerate(zip(named, template, strict=True)):
    for a in np.flatnonzero(v != captions.NOT_NAMED):
      w = v.copy()
      w[a] = 1 - w[a]
      swapped_texts.append(captions.caption(int(labels[i]), w, template=int(t), subset='heldout'))
      owners.append(i)
  owners = np.asarray(owners, int)
  swapped = text_embeddings(params, tokenizer.encode(swapped_texts))
  wins = np.sum(img[owners] * txt[owners], -1) > np.sum(img[owners] * swapped, -1)
  return {
      'retrieval_accuracy': float(np.mean(retrieval)),
      'attribute_retrieval_accuracy': float(np.mean(wins)) if len(wins) else float('nan'),
      'clip_score_real': clip_score_from_embeddings(img, txt),
  }


# ---------------------------------------------------------------------------------------------
# Cache: one .npz per (recipe, seed) (`metrics.cached_model`), as
# `digits_classifier` keeps its weights.


def _resolve_recipe(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
  return cached_model.resolve_recipe(DEFAULT_RECIPE, overrides, 'digits-CLIP')


def digits_clip_cache_path(cache_dir: str | os.PathLike, *, seed: int = 0,
                           recipe_overrides: Mapping[str, Any] | None = None) -> str:
  """The file `load_or_train_digits_clip` reads and writes for this recipe and seed."""
  return cached_model.cache_path(cache_dir, 'digits_clip', _resolve_recipe(recipe_overrides),
                                 seed)


def load_or_train_digits_clip(cache_dir: str | os.PathLike, *, seed: int = 0,
                              recipe_overrides: Mapping[str, Any] | None = None):
  """Loads the digits-CLIP cached in `cache_dir` for this recipe and seed, or trains and caches
  it (on the captioned train split; the floor is measured on the test split).

  The file name carries a hash of the recipe, and the file its recipe hash, seed and a SHA-256 of
  its parameters: a changed recipe never loads stale weights, and a damaged or mismatched file is
  logged, retrained and overwritten (atomically).

  Returns:
    `(params, info)`; `info` has the `floor_metrics` (`retrieval_accuracy`,
    `attribute_retrieval_accuracy`, `clip_score_real`), `recipe`, `recipe_hash`, `seed`,
    `train_seconds`, `cache_path` and `loaded_from_cache`.
  """
  recipe = _resolve_recipe(recipe_overrides)

  def train():
    images, labels = digits.load_digits('train')
    params = train_digits_clip(jax.random.key(seed), images, labels,
                               captions.measure_attributes(images), recipe)
    return params, floor_metrics(params)

  def abstract_params():
    length = words.WordTokenizer.for_captions().context_length
    return jax.eval_shape(_model(recipe).init, jax.random.key(0),
                          jnp.zeros((1,) + digits.IMAGE_SHAPE),
                          jnp.zeros((1, length), jnp.int32))['params']

  return cached_model.load_or_train(
      digits_clip_cache_path(cache_dir, seed=seed, recipe_overrides=recipe_overrides), recipe,
      seed, what='digits-CLIP', abstract_params=abstract_params, train=train,
      required='clip_score_real')
