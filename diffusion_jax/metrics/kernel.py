"""Kernel two-sample statistics: unbiased MMD², KID (Bińkowski et al. 2018) and RBF-MMD.

Everything is float64 NumPy on feature arrays `[N, D]`. KID is computed on random subsets (as
in the reference implementations) so that 50,000 samples never form a 50,000² kernel matrix.
"""

from collections.abc import Callable

import numpy as np

Kernel = Callable[[np.ndarray, np.ndarray], np.ndarray]


def polynomial_kernel(degree: int = 3, gamma: float | None = None, coef0: float = 1.0) -> Kernel:
  """`k(x, y) = (gamma x·y + coef0)^degree`; KID's default is gamma = 1/D, coef0 = 1, degree 3."""
  def k(x, y):
    g = 1.0 / x.shape[1] if gamma is None else gamma
    return (g * (x @ y.T) + coef0) ** degree
  return k


def rbf_kernel(bandwidth: float) -> Kernel:
  """`k(x, y) = exp(-|x - y|² / (2 bandwidth²))`."""
  def k(x, y):
    d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * (x @ y.T)
    return np.exp(-np.maximum(d2, 0.0) / (2 * bandwidth ** 2))
  return k


def _features(name: str, x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f'{name}: features must be [N >= 2, D], got shape {x.shape}')
  return x


def mmd2_unbiased(x, y, kernel: Kernel) -> float:
  """Unbiased MMD² (Gretton et al. 2012, Eq. 3): the within-set means exclude the diagonal,
  so its expectation is exactly 0 when x and y come from the same distribution."""
  x, y = _features('mmd2_unbiased', x), _features('mmd2_unbiased', y)
  if x.shape[1] != y.shape[1]:
    raise ValueError(f'mmd2_unbiased: feature sizes differ, {x.shape} vs {y.shape}')
  m, n = len(x), len(y)
  kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
  return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1))
               + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean())


def kid(real, fake, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
  """Kernel Inception Distance: mean and std over `num_subsets` random subsets (without
  replacement within a subset) of the unbiased polynomial-kernel MMD². `subset_size` is capped
  at the smaller set's size. Works on any features (Inception pool3, the digits classifier…)."""
  real, fake = _features('kid', real), _features('kid', fake)
  size = min(subset_size, len(real), len(fake))
  rng = np.random.default_rng(seed)
  kernel = polynomial_kernel()
  values = [mmd2_unbiased(real[rng.choice(len(real), size, replace=False)],
                          fake[rng.choice(len(fake), size, replace=False)], kernel)
            for _ in range(num_subsets)]
  return float(np.mean(values)), float(np.std(values))


def median_bandwidth(x, y) -> float:
  """The median pairwise distance of the pooled samples (the usual RBF bandwidth heuristic)."""
  z = np.concatenate([_features('median_bandwidth', x), _features('median_bandwidth', y)])
  d2 = (z * z).sum(1)[:, None] + (z * z).sum(1)[None, :] - 2 * z @ z.T
  return float(np.sqrt(np.median(np.maximum(d2[np.triu_indices(len(z), 1)], 0.0))))


def mmd_rbf(x, y, bandwidth: float | None = None) -> float:
  """Unbiased RBF-kernel MMD² for low-dimensional samples (median bandwidth by default)."""
  bandwidth = median_bandwidth(x, y) if bandwidth is None else bandwidth
  return mmd2_unbiased(x, y, rbf_kernel(bandwidth))
