"""scikit-learn's 8x8 handwritten digits, the embedded dataset that needs no download.

1,797 real 8x8 images with 17 grey levels (0..16) and 10 classes, shipped inside
scikit-learn. The split is a fixed function of the example index (every fourth
example is held out), so it does not depend on any RNG implementation or version.

Larger sizes are fixed linear maps of the 8x8 images, inverted by `to_native` so models at any
size are measured in the same 8x8 classifier feature space:
  16  each pixel repeated 2 x 2 (nearest); inverted by 2 x 2 block means.
  32  bilinear upsampling by 4 (for latent diffusion with an f=4 autoencoder): `A X A^T` with the
      32 x 8 matrix `A` of `bilinear_matrix`; inverted by its pseudo-inverse, `A^+ Y A^+^T`.
"""

import functools

import numpy as np

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 1)  # [H, W, C]
MAX_LEVEL = 16.0  # pixel values are integers 0..16
SPLITS = ('train', 'test', 'all')
SIZES = (8, 16, 32)
_BILINEAR_SIZE = 32


@functools.lru_cache(maxsize=None)
def bilinear_matrix(n_out: int = _BILINEAR_SIZE, n_in: int = IMAGE_SHAPE[0]) -> np.ndarray:
  """The `[n_out, n_in]` 1-D bilinear interpolation matrix `A` (float64, read-only).

  Half-pixel centres (`align_corners=False`), edges clamped: output pixel `i` samples the input
  at `src = (i + 0.5) * n_in / n_out - 0.5`, clipped to `[0, n_in - 1]`; with `j = floor(src)`
  and `w = src - j`, `A[i, j] = 1 - w` and `A[i, min(j + 1, n_in - 1)] += w`. For upsampling
  this is `jax.image.resize(..., 'bilinear')`, PIL's bilinear and torch's
  `F.interpolate(mode='bilinear', align_corners=False)`. Rows are convex weights (>= 0, sum 1),
  so `A X A^T` of an image in [-1, 1] stays in [-1, 1]; for `n_out >= n_in` A has full column
  rank, so its pseudo-inverse is a left inverse (`A^+ A = I`).
  """
  src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1)
  j = np.floor(src).astype(int)
  w = src - j
  a = np.zeros((n_out, n_in))
  a[np.arange(n_out), j] = 1.0 - w
  a[np.arange(n_out), np.minimum(j + 1, n_in - 1)] += w
  a.flags.writeable = False
  return a


@functools.lru_cache(maxsize=None)
def _bilinear_pinv() -> np.ndarray:
  a_pinv = np.linalg.pinv(bilinear_matrix())  # [8, 32]
  a_pinv.flags.writeable = False
  return a_pinv


@functools.lru_cache(maxsize=None)
def _raw():
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  d = datasets.load_digits()
  return d.images.astype(np.float32), d.target.astype(np.int32)


def load_digits(split: str = 'train', size: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Returns `(images, labels)`: images `[N, size, size, 1]` float32 in [-1, 1], labels `[N]`.

  Splits: 'train' (1,347 examples), 'test' (450: indices i with i % 4 == 0), 'all' (1,797).
  `size=16` repeats each pixel 2 x 2 (nearest neighbour); `size=32` upsamples bilinearly by 4
  (`bilinear_matrix`: half-pixel centres, edges clamped; values stay in [-1, 1], being convex
  combinations). `to_native` undoes either exactly, so models at every size are measured in the
  same 8x8 feature space.
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
  if size == _BILINEAR_SIZE:
    a = bilinear_matrix()
    x = np.einsum('ij,njkc,lk->nilc', a, x, a)  # A X A^T per image and channel
  else:
    factor = size // IMAGE_SHAPE[0]
    x = np.repeat(np.repeat(x, factor, axis=1), factor, axis=2)
  return x.astype(np.float32), labels[keep]


def to_native(x: np.ndarray) -> np.ndarray:
  """`[N, S, S, 1]` images (S in `SIZES`) back to 8x8, inverting `load_digits`'s upsampling.

  8: the identity. 16: 2 x 2 block means. 32: `A^+ Y A^+^T` with `A^+` the pseudo-inverse of
  `bilinear_matrix()`, exact on bilinear upsamplings (`A^+ A = I`) and the least-squares 8x8
  preimage of anything else.
  """
  x = np.asarray(x)
  if x.ndim != 4 or x.shape[1:] not in [(s, s, 1) for s in SIZES]:
    raise ValueError(f'digits.to_native: expected [N, S, S, 1] with S in {SIZES}, got {x.shape}')
  size = x.shape[1]
  if size == IMAGE_SHAPE[0]:
    return x
  if size == _BILINEAR_SIZE:
    a_pinv = _bilinear_pinv()
    out = np.einsum('ij,njkc,lk->nilc', a_pinv, x, a_pinv)  # A^+ Y A^+^T
    return out.astype(np.result_type(x.dtype, np.float32))
  k = size // IMAGE_SHAPE[0]
  return x.reshape(len(x), 8, k, 8, k, 1).mean(axis=(2, 4))


def to_uint8(x: np.ndarray) -> np.ndarray:
  """Maps [-1, 1] images back to uint8 [0, 255] for display."""
  return np.clip(np.round((np.asarray(x) + 1.0) * 127.5), 0, 255).astype(np.uint8)
