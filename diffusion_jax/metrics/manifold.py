"""Improved precision and recall (Kynkäänniemi et al. 2019) on any feature space.

Each set's manifold is the union of balls around its points, each ball's radius the distance to
the point's k-th nearest neighbour within the set (itself excluded). Precision is the fraction
of generated samples inside the real manifold; recall the fraction of real samples inside the
generated one. Distances are computed in float64 row blocks, so memory is `block x N`.
"""

import numpy as np


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0.0)


def knn_radii(x, k: int = 3, block: int = 1024) -> np.ndarray:
  """Squared distance from each row of `x` to its k-th nearest other row, `[N]`."""
  x = np.asarray(x, np.float64)
  if not 1 <= k < len(x):
    raise ValueError(f'knn_radii: need 1 <= k < N, got k={k}, N={len(x)}')
  out = np.empty(len(x))
  for s in range(0, len(x), block):
    d = _sq_dists(x[s:s + block], x)                               # [b, N]
    # Index k: position 0 is the point itself (distance 0).
    out[s:s + block] = np.partition(d, k, axis=1)[:, k]
  return out


def _coverage(manifold: np.ndarray, radii: np.ndarray, queries: np.ndarray, block: int) -> float:
  inside = np.zeros(len(queries), bool)
  for s in range(0, len(queries), block):
    d = _sq_dists(queries[s:s + block], manifold)                   # [b, M]
    inside[s:s + block] = (d <= radii[None, :]).any(axis=1)
  return float(inside.mean())


def precision_recall(real, fake, k: int = 3, block: int = 1024) -> dict:
  """`{'precision', 'recall'}` of `fake` against `real` (features `[N, D]`, `[M, D]`)."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f'precision_recall: need [N, D] and [M, D] features, got {real.shape} and '
                     f'{fake.shape}')
  precision = _coverage(real, knn_radii(real, k, block), fake, block)
  recall = _coverage(fake, knn_radii(fake, k, block), real, block)
  return {'precision': precision, 'recall': recall}
