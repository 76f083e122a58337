"""scikit-learn's 8x8 handwritten digits, the embedded dataset that needs no download.

1,797 real 8x8 images with 17 grey levels (0..16) and 10 classes, shipped inside
scikit-learn. The split is a fixed function of the example index (every fourth
example is held out), so it does not depend on any RNG implementation or version.
"""

import functools

import numpy as np

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)  # [H, W, C]
MAX_LEVEL = 16.0  # pixel values are integers 0..16
SPLITS = ('train', 'test', 'all')
SIZES = (8, 16)


@functools.lru_cache(maxsize=None)
def _raw():
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  d = datasets.load_digits()
  return d.images.astype(np.float32), d.target.astype(np.int32)


def load_digits(split: str = 'train', size: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Returns `(images, labels)`: images `[N, size, size, 1]` float32 in [-1, 1], labels `[N]`.

  Splits: 'train' (1,347 examples), 'test' (450: indices i with i % 4 == 0), 'all' (1,797).
  `size=16` repeats each pixel 2 x 2 (nearest-neighbour upsampling: `to_native` undoes it
  exactly, so 16x16 models are measured in the same 8x8 feature space).
  """
  if size not in SIZES:
    raise ValueError(f'digits: size={size}; choose from {SIZES}')
  if split not in SPLITS:
    raise ValueError(f'digits: unknown split {split!r}; expected one of {SPLITS}')
  images, labels = _raw()
  idx = np.arange(len(labels))
  if split == 'test':
    keep = idx % 4 == 0
  elif split == 'train':
    keep = idx % 4 != 0
  else:
    keep = np.ones_like(idx, dtype=bool)
  x = images[keep][..., None] / MAX_LEVEL * 2.0 - 1.0
  factor = size // IMAGE_SHAPE[0]
  x = np.repeat(np.repeat(x, factor, axis=1), factor, axis=2)
  return x.astype(np.float32), labels[keep]


def to_native(x: np.ndarray) -> np.ndarray:
  """`[N, 8k, 8k, 1]` images back to 8x8 by k x k block means (the inverse of `load_digits`'s
  upsampling; the identity on 8x8 images)."""
  x = np.asarray(x)
  k = x.shape[1] // IMAGE_SHAPE[0]
  if k == 1:
    return x
  if x.shape[1:] != (8 * k, 8 * k, 1):
    raise ValueError(f'digits.to_native: expected [N, {8 * k}, {8 * k}, 1], got {x.shape}')
  return x.reshape(len(x), 8, k, 8, k, 1).mean(axis=(2, 4))


def to_uint8(x: np.ndarray) -> np.ndarray:
  """Maps [-1, 1] images back to uint8 [0, 255] for display."""
  return np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(np.uint8)
