"""A small digits classifier whose penultimate layer is the feature space for Fréchet distance.

The quick-start's quality bar is FD (Heusel et al. 2017) between generated and held-out real
8x8 digits, measured in the features of a CNN trained on the real training split — the FID
recipe with Inception replaced by a network that fits the data. The classifier's test accuracy
is reported beside the FD: features of a network that cannot tell digits apart measure little.

Typical use from a training loop:

  params, info = load_or_train_digits_classifier(cache_dir)
  reference = digits_reference_stats(params)              # once
  metrics = digits_fd_eval(params, samples, reference=reference,
                           classifier_test_accuracy=info['test_accuracy'])
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax.data.digits import IMAGE_SHAPE, NUM_CLASSES, load_digits
from diffusion_jax.metrics import cached_model
from diffusion_jax.metrics.frechet import FeatureStats, frechet_distance_from_stats

# Bump when anything that changes the trained weights changes (model, data, training code), so
# a cache written by an older recipe is never loaded as if it were the current one.
RECIPE_VERSION = 1

DEFAULT_RECIPE = {
    'version': RECIPE_VERSION,
    'conv_widths': (16, 32),
    'hidden_dim': 128,
    'feature_dim': 64,
    'dropout_rate': 0.2,
    'steps': 800,
    'batch_size': 128,
    'learning_rate': 3e-3,
    'weight_decay': 1e-4,
    'max_shift': 1,  # random translation augmentation, in pixels
}

_EVAL_BATCH = 512  # features are computed in fixed-size chunks: bounded memory, one compile
_BACKGROUND = -1.0  # the value of an empty pixel in [-1, 1] images

_LOG = logging.getLogger(__name__)


class DigitsClassifier(nn.Module):
  """conv3x3 -> conv3x3 -> avg-pool 2x2 -> dense -> dense (features) -> dense (logits)."""

  conv_widths: tuple[int, ...] = DEFAULT_RECIPE['conv_widths']
  hidden_dim: int = DEFAULT_RECIPE['hidden_dim']
  feature_dim: int = DEFAULT_RECIPE['feature_dim']
  dropout_rate: float = DEFAULT_RECIPE['dropout_rate']
  num_classes: int = NUM_CLASSES

  @nn.compact
  def __call__(self, x, *, train: bool = False, return_features: bool = False):
    # x: [B, 8, 8, 1] in [-1, 1]
    for width in self.conv_widths:
      x = nn.relu(nn.Conv(width, (3, 3), padding='SAME')(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))  # [B, 4, 4, C]
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden_dim)(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    # GELU rather than ReLU: no feature is exactly zero on a whole set, so the feature
    # covariance is not rank-deficient by construction.
    feats = nn.gelu(nn.Dense(self.feature_dim)(x))  # [B, feature_dim]
    logits = nn.Dense(self.num_classes)(feats)  # [B, 10]
    return (logits, feats) if return_features else logits


def _model(recipe: Mapping[str, Any]) -> DigitsClassifier:
  return DigitsClassifier(conv_widths=tuple(recipe['conv_widths']),
                          hidden_dim=recipe['hidden_dim'], feature_dim=recipe['feature_dim'],
                          dropout_rate=recipe['dropout_rate'])


def _resolve_recipe(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
  return cached_model.resolve_recipe(DEFAULT_RECIPE, overrides, 'digits classifier')


def _random_shift(key, x, max_shift: int):
  """Shifts each image `[B, H, W, C]` by a random integer offset, filling with background."""
  if max_shift == 0:
    return x
  b, h, w, _ = x.shape
  pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0))
  padded = jnp.pad(x, pad, constant_values=_BACKGROUND)
  offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)  # [B, 2]

  def crop(img, off):
    return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))

  return jax.vmap(crop)(padded, offsets)


def train_digits_classifier(key, images, labels, *, steps: int = DEFAULT_RECIPE['steps'],
                            batch_size: int = DEFAULT_RECIPE['batch_size'],
                            learning_rate: float = DEFAULT_RECIPE['learning_rate'],
                            weight_decay: float = DEFAULT_RECIPE['weight_decay'],
                            max_shift: int = DEFAULT_RECIPE['max_shift'],
                            model: DigitsClassifier | None = None):
  """Trains the classifier with AdamW and a cosine schedule; returns its `params`.

  The batch, shifts and dropout of step `i` come from `fold_in(key, i)`, so the result is a
  function of the key and the data only.

  Args:
    key: PRNG key.
    images: `[N, 8, 8, 1]` float in [-1, 1].
    labels: `[N]` integer classes.
    steps: optimiser steps (batches are drawn with replacement).
    batch_size: examples per step.
    learning_rate: peak learning rate of the cosine schedule.
    weight_decay: AdamW decoupled weight decay.
    max_shift: maximum random translation in pixels (0 disables augmentation).
    model: the module to train; `DigitsClassifier()` by default.

  Returns:
    The `params` collection of the trained model.
  """
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  if images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE or labels.shape != images.shape[:1]:
    raise ValueError(f'train_digits_classifier: expected images [N, 8, 8, 1] and labels [N], '
                     f'got {images.shape} and {labels.shape}')
  model = model or DigitsClassifier()
  init_key, train_key = jax.random.split(key)
  params = model.init(init_key, images[:1])['params']
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup_steps=max(steps // 20, 1), decay_steps=steps)
  tx = optax.adamw(schedule, weight_decay=weight_decay)
  num = images.shape[0]

  def loss_fn(p, x, y, dropout_key):
    logits = model.apply({'params': p}, x, train=True, rngs={'dropout': dropout_key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  # A Python loop over a jitted step rather than one `lax.fori_loop`: on jax 0.10 XLA:CPU ran
  # these convolutions inside a while loop ~25x slower than as top-level ops.
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(p, opt_state, i):
    k_idx, k_shift, k_drop = jax.random.split(jax.random.fold_in(train_key, i), 3)
    idx = jax.random.randint(k_idx, (batch_size,), 0, num)
    x = _random_shift(k_shift, images[idx], max_shift)  # [B, 8, 8, 1]
    grads = jax.grad(loss_fn)(p, x, labels[idx], k_drop)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state

  opt_state = tx.init(params)
  for i in range(steps):
    params, opt_state = train_step(params, opt_state, i)
  return jax.device_get(params)


def _model_from_params(params) -> DigitsClassifier:
  # Evaluation needs only the layer widths, and those are the parameter shapes.
  convs = sorted((k for k in params if k.startswith('Conv_')), key=lambda k: int(k[5:]))
  return DigitsClassifier(conv_widths=tuple(params[k]['kernel'].shape[-1] for k in convs),
                          hidden_dim=params['Dense_0']['kernel'].shape[-1],
                          feature_dim=params['Dense_1']['kernel'].shape[-1],
                          num_classes=params['Dense_2']['kernel'].shape[-1])


@jax.jit
def _apply_eval(params, x):
  return _model_from_params(params).apply({'params': params}, x, return_features=True)


def _batched_apply(params, images) -> tuple[np.ndarray, np.ndarray]:
  x = np.asarray(images, np.float32)
  if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE:
    raise ValueError(f'digits classifier: expected images [N, 8, 8, 1], got shape {x.shape}')
  logits, feats = [], []
  for i in range(0, len(x), _EVAL_BATCH):
    chunk = x[i:i + _EVAL_BATCH]
    n = len(chunk)
    # Pad to a fixed size so every chunk reuses one compiled function.
    chunk = np.concatenate([chunk, np.full((_EVAL_BATCH - n,) + IMAGE_SHAPE, _BACKGROUND,
                                           np.float32)])
    lg, ft = _apply_eval(params, chunk)
    logits.append(np.asarray(lg)[:n])
    feats.append(np.asarray(ft)[:n])
  if not logits:
    model = _model_from_params(params)
    return (np.zeros((0, model.num_classes), np.float32),
            np.zeros((0, model.feature_dim), np.float32))
  return np.concatenate(logits), np.concatenate(feats)


def classifier_features(params, images) -> np.ndarray:
  """Penultimate-layer features `[N, feature_dim]` of images `[N, 8, 8, 1]` in [-1, 1]."""
  return _batched_apply(params, images)[1]


def classifier_logits(params, images) -> np.ndarray:
  """Class logits `[N, 10]` of images `[N, 8, 8, 1]` in [-1, 1]."""
  return _batched_apply(params, images)[0]


def classifier_accuracy(params, images, labels) -> float:
  """Fraction of `images` whose arg-max class equals `labels`."""
  labels = np.asarray(labels)
  pred = np.argmax(classifier_logits(params, images), axis=-1)
  if pred.shape != labels.shape:
    raise ValueError(f'classifier_accuracy: {pred.shape[0]} images but labels of shape '
                     f'{labels.shape}')
  return float(np.mean(pred == labels))


# ---------------------------------------------------------------------------------------------
# Cache: one .npz per (recipe, seed) holding the flattened params and a JSON `info` record.


def params_digest(params) -> str:
  """SHA-256 of classifier parameters (a pytree or its flat dict): the identity of its feature
  space, which reference statistics record."""
  return cached_model.params_digest(params)


def digits_classifier_cache_path(cache_dir: str | os.PathLike, *, seed: int = 0,
                                 recipe_overrides: Mapping[str, Any] | None = None) -> str:
  """The file `load_or_train_digits_classifier` reads and writes for this recipe and seed."""
  return cached_model.cache_path(cache_dir, 'digits_classifier',
                                 _resolve_recipe(recipe_overrides), seed)


def load_or_train_digits_classifier(cache_dir: str | os.PathLike, *, seed: int = 0,
                                    recipe_overrides: Mapping[str, Any] | None = None):
  """Loads the classifier cached in `cache_dir` for this recipe and seed, or trains and caches it.

  Trains on `load_digits('train')` and measures accuracy on `load_digits('test')`. The cache
  (`metrics.cached_model`) file name carries a hash of the recipe, so a changed recipe never
  loads stale weights; a damaged or mismatched file is logged, retrained and overwritten.

  Args:
    cache_dir: directory for the cache file (created if missing); the caller chooses it.
    seed: PRNG seed of the training run.
    recipe_overrides: replacements for entries of `DEFAULT_RECIPE` (e.g. fewer steps in tests).

  Returns:
    `(params, info)`; `info` has `test_accuracy`, `train_accuracy`, `recipe`, `recipe_hash`,
    `seed`, `train_seconds`, `cache_path` and `loaded_from_cache`.
  """
  recipe = _resolve_recipe(recipe_overrides)

  def train():
    train_x, train_y = load_digits('train')
    test_x, test_y = load_digits('test')
    params = train_digits_classifier(
        jax.random.key(seed), train_x, train_y, steps=recipe['steps'],
        batch_size=recipe['batch_size'], learning_rate=recipe['learning_rate'],
        weight_decay=recipe['weight_decay'], max_shift=recipe['max_shift'],
        model=_model(recipe))
    info = {'test_accuracy': classifier_accuracy(params, test_x, test_y),
            'train_accuracy': classifier_accuracy(params, train_x, train_y)}
    if info['test_accuracy'] < 0.95:
      _LOG.warning('digits classifier reached only %.4f test accuracy; its features are a '
                   'weak basis for Fréchet distance.', info['test_accuracy'])
    return params, info

  def abstract_params():
    return jax.eval_shape(_model(recipe).init, jax.random.key(0),
                          jnp.zeros((1,) + IMAGE_SHAPE))['params']

  return cached_model.load_or_train(
      digits_classifier_cache_path(cache_dir, seed=seed, recipe_overrides=recipe_overrides),
      recipe, seed, what='digits classifier', abstract_params=abstract_params, train=train,
      required='test_accuracy')


# ---------------------------------------------------------------------------------------------
# Fréchet distance against the held-out test digits.


def digits_reference_stats(params) -> FeatureStats:
  """Feature statistics of the 450 held-out test digits: compute once, pass to the FD calls."""
  test_x, _ = load_digits('test')
  return FeatureStats.from_features(classifier_features(params, test_x))


def digits_fd(params, images, *, reference: FeatureStats | None = None) -> float:
  """FD between `images` `[N, 8, 8, 1]` in [-1, 1] and the test digits, in classifier features.

  Returns NaN (and logs a warning) if any image is non-finite, e.g. from a diverged sampler.
  """
  x = np.asarray(images, np.float32)
  if x.ndim != 4 or x.shape[1:] != IMAGE_SHAPE or x.shape[0] < 2:
    raise ValueError(f'digits_fd: expected >= 2 images [N, 8, 8, 1], got shape {x.shape}')
  if not np.all(np.isfinite(x)):
    _LOG.warning('digits_fd: %d of %d images are non-finite; FD is NaN.',
                    int(np.sum(~np.all(np.isfinite(x.reshape(len(x), -1)), axis=1))), len(x))
    return float('nan')
  reference = reference if reference is not None else digits_reference_stats(params)
  stats = FeatureStats.from_features(classifier_features(params, x))
  return frechet_distance_from_stats(stats, reference)


def digits_fd_floor(params, n: int, *, reference: FeatureStats | None = None,
                    seed: int = 0) -> tuple[float, int]:
  """FD of `n` real training digits vs the test digits: what a perfect generator would score.

  FD is biased upward at small sample sizes, so a generator's FD is compared with the floor at
  the same `n`. The subsample is a fixed function of `seed`; if `n` exceeds the 1,347 training
  digits, all of them are used.

  Returns:
    `(fd_floor, n_used)`.
  """
  real = floor_subsample(n, seed)
  return digits_fd(params, real, reference=reference), len(real)


def floor_subsample(n: int, seed: int = 0) -> np.ndarray:
  """`min(n, 1347)` real training digits, a fixed function of `seed`: the stand-in for a
  perfect generator's n samples (the floor of FD, KID, precision and recall)."""
  train_x, _ = load_digits('train')
  n_used = min(int(n), len(train_x))
  # Philox keyed by the seed: the subsample does not depend on global RNG state.
  rng = np.random.Generator(np.random.Philox(key=seed))
  return train_x[np.sort(rng.permutation(len(train_x))[:n_used])]


def digits_fd_eval(params, images, *, reference: FeatureStats | None = None,
                   classifier_test_accuracy: float | None = None,
                   floor_seed: int = 0) -> dict[str, float | int | bool]:
  """FD of generated digits vs the test split, beside its real-data floor at the same n.

  Args:
    params: classifier params (from `load_or_train_digits_classifier`).
    images: generated digits `[N, 8, 8, 1]` in [-1, 1], N >= 2 (>= 1,000 for reporting).
    reference: `digits_reference_stats(params)`, to avoid recomputing it at every call.
    classifier_test_accuracy: reported as given; measured on the test split if None.
    floor_seed: seed of the training-digit subsample that sets the floor.

  Returns:
    A dict of plain numbers: `fd`, `fd_floor`, `classifier_test_accuracy`, `num_generated`,
    `num_floor` (real digits behind the floor) and `floor_capped` (True when `num_generated`
    exceeds the 1,347 training digits, so the floor uses all of them and `num_floor` is less).
  """
  reference = reference if reference is not None else digits_reference_stats(params)
  num_generated = int(np.shape(images)[0])
  fd = digits_fd(params, images, reference=reference)
  fd_floor, num_floor = digits_fd_floor(params, num_generated, reference=reference,
                                        seed=floor_seed)
  if classifier_test_accuracy is None:
    test_x, test_y = load_digits('test')
    classifier_test_accuracy = classifier_accuracy(params, test_x, test_y)
  return {
      'fd': fd,
      'fd_floor': fd_floor,
      'classifier_test_accuracy': float(classifier_test_accuracy),
      'num_generated': num_generated,
      'num_floor': num_floor,
      'floor_capped': num_floor < num_generated,
  }
