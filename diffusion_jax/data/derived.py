"""Conditions computed from the image itself: control maps (ControlNet), low-resolution copies
(super-resolution), ... .

An `ImageCondition` names the batch key and the function that computes the condition from clean
images; `DerivedSource` adds it to every example of any source, so the training loop, resume and
multi-process reads see it like a label. At evaluation the samples are conditioned on the
held-out split's conditions (`held_out`), and `metrics` scores the samples against them.
"""

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class ImageCondition:
  """`key`: the batch key and the model's `cond`; `fn(images [N, H, W, C] float32 in [-1, 1])
  -> conds [N, ...]` (host numpy, deterministic); `metrics(samples, conds) -> {name: float}`
  (optional) scores samples against the conditions they were given, and
  `reference_metrics(samples, references)` (optional) against the held-out examples the
  conditions were computed from (a vocoder's samples against the recorded clips);
  `save(directory, samples, references)` (optional) writes what a person would rather look at or
  listen to than the default image grid (WAV files and spectrograms)."""
  key: str
  fn: Callable[[np.ndarray], np.ndarray]
  metrics: Callable[[np.ndarray, np.ndarray], dict] | None = None
  rank: int = 3
  reference_metrics: Callable[[np.ndarray, np.ndarray], dict] | None = None
  save: Callable[[str, np.ndarray, np.ndarray], None] | None = None

  def __call__(self, images) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim != self.rank + 1:
      what = '[N, H, W, C]' if self.rank == 3 else f'[N, ...] with {self.rank} axes per example'
      raise ValueError(f'{self.key}: images must be {what}; got shape {images.shape}')
    return np.asarray(self.fn(images))

  def shape(self, image_shape) -> tuple:
    """The condition's shape for one image of `image_shape` (computed on a zero image)."""
    return tuple(self(np.zeros((1,) + tuple(image_shape), np.float32)).shape[1:])


class DerivedSource:
  """`base`'s examples with `condition.key` = `condition(image)` added (same indices, order and
  per-example randomness as `base`)."""

  def __init__(self, base, condition: ImageCondition):
    if condition.key in ('image', 'label'):
      raise ValueError(f'DerivedSource: condition key {condition.key!r} would replace the '
                       f'batch\'s own {condition.key!r}')
    self.base, self.condition = base, condition
    self.image_shape = base.image_shape
    self.num_classes = getattr(base, 'num_classes', 0)

  def __len__(self) -> int:
    return len(self.base)

  def __getattr__(self, name):     # images, labels, ... of the base
    if name in ('base', 'condition') or name.startswith('__'):
      raise AttributeError(name)
    return getattr(self.base, name)

  def _add(self, out: dict) -> dict:
    out = dict(out)
    out[self.condition.key] = self.condition(out['image']).astype(np.float32)
    return out

  def example(self, index: int, seed: int = 0, position: int = 0) -> dict:
    out = dict(self.base.example(index, seed, position))
    out[self.condition.key] = self.condition(out['image'][None])[0].astype(np.float32)
    return out

  def examples(self, indices, *args, **kwargs) -> dict:
    return self._add(self.base.examples(indices, *args, **kwargs))

  def batch(self, seed: int, step: int, global_batch: int, process_index: int = 0,
            process_count: int = 1) -> dict:
    return self._add(self.base.batch(seed, step, global_batch, process_index, process_count))


def held_out(condition: ImageCondition, images: np.ndarray, num: int):
  """`(conds [num, ...], references [num, H, W, C])`: sample i is conditioned on held-out image
  `i % len(images)`'s condition (the references are those images)."""
  images = np.asarray(images, np.float32)
  if not len(images):
    raise ValueError(f'{condition.key}: no held-out images to take conditions from')
  idx = np.arange(num) % len(images)
  refs = images[idx]
  return condition(refs).astype(np.float32), refs
