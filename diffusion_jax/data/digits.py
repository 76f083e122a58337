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


@functools.lru_cache(maxsize=None)
def _raw():
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  d = datasets.load_digits()
  return d.images.astype(np.float32), d.target.astype(np.int32)


def load_digits(split: str = 'train') -> tuple[np.ndarray, np.ndarray]:
  """Returns `(images, labels)`: images `[N, 8, 8, 1]` float32 in [-1, 1], labels `[N]` int32.

  Splits: 'train' (1,347 examples), 'test' (450: indices i with i % 4 == 0), 'all' (1,797).
  """
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
  return x.astype(np.float32), labels[keep]


def to_uint8(x: np.ndarray) -> np.ndarray:
  """Maps [-1, 1] images back to uint8 [0, 255] for display."""
  return np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(np.uint8)
