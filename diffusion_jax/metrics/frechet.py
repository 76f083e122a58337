"""Fréchet distance between Gaussians fitted to features (Heusel et al. 2017, FID).

d² = ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^{1/2})  (Heusel et al. 2017; Dowson &
Landau 1982). The statistics are accumulated in float64 on the host: the trace term
subtracts numbers of similar size, so float32 statistics lose most of a small distance.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import scipy.linalg

# A square root whose diagonal has an imaginary part beyond this fraction of its real scale is
# not a rounding artefact but a sign of non-PSD or badly conditioned inputs.
_MAX_RELATIVE_IMAG = 1e-3


class FeatureStats:
  """Streaming mean and covariance of features, in float64, without keeping the samples.

  Keeps the count, the mean and the centred scatter matrix M2 = sum (x - mean)(x - mean)^T,
  combining batches with Chan et al.'s pairwise update (1979): centring each batch on its own
  mean avoids the cancellation of the naive E[x x^T] - mean mean^T.
  """

  def __init__(self, dim: int | None = None):
    self._dim = dim
    self._count = 0
    self._mean = None  # [D] float64
    self._m2 = None  # [D, D] float64

  @property
  def dim(self) -> int | None:
    return self._dim

  @property
  def count(self) -> int:
    return self._count

  @property
  def mean(self) -> np.ndarray:
    """Mean feature, `[D]` float64."""
    if self._count == 0:
      raise ValueError('FeatureStats.mean: no samples accumulated yet')
    return self._mean.copy()

  @property
  def cov(self) -> np.ndarray:
    """Unbiased covariance (ddof=1, as `np.cov(x, rowvar=False)`), `[D, D]` float64."""
    if self._count < 2:
      raise ValueError(f'FeatureStats.cov: needs at least 2 samples, got {self._count}')
    return self._m2 / (self._count - 1)

  def update(self, features) -> FeatureStats:
    """Adds a batch of features `[B, D]`; returns self so calls can be chained."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
      raise ValueError(f'FeatureStats.update: expected features [B, D], got shape {x.shape}')
    if x.shape[0] == 0:
      return self
    batch = FeatureStats(x.shape[1])
    batch._count = x.shape[0]
    batch._mean = x.mean(axis=0)
    centred = x - batch._mean
    batch._m2 = centred.T @ centred
    return self.merge(batch)

  def merge(self, other: FeatureStats) -> FeatureStats:
    """Adds the samples summarised by `other` to self (Chan et al. 1979); returns self."""
    if not isinstance(other, FeatureStats):
      raise TypeError(f'FeatureStats.merge: expected FeatureStats, got {type(other).__name__}')
    if other._count == 0:
      return self
    if self._dim is not None and other._dim != self._dim:
      raise ValueError(f'FeatureStats.merge: feature dims differ: {self._dim} vs {other._dim}')
    if self._count == 0:
      self._dim, self._count = other._dim, other._count
      self._mean, self._m2 = other._mean.copy(), other._m2.copy()
      return self
    n_a, n_b = self._count, other._count
    n = n_a + n_b
    delta = other._mean - self._mean  # [D]
    self._mean = self._mean + delta * (n_b / n)
    self._m2 = self._m2 + other._m2 + np.outer(delta, delta) * (n_a * n_b / n)
    self._count = n
    return self

  @classmethod
  def from_moments(cls, mean, cov, count: int) -> FeatureStats:
    """Statistics with this mean, (unbiased) covariance and count, e.g. read from a file."""
    mean, cov = _check_stats(mean, cov, ' (FeatureStats.from_moments)')
    if count < 2:
      raise ValueError(f'FeatureStats.from_moments: count={count}; needs at least 2')
    stats = cls(len(mean))
    stats._mean, stats._m2, stats._count = mean.copy(), cov * (count - 1), int(count)
    return stats

  @classmethod
  def from_features(cls, features, batch_size: int | None = None) -> FeatureStats:
    """Statistics of `[N, D]` features, optionally accumulated `batch_size` rows at a time."""
    x = np.asarray(features)
    if x.ndim != 2:
      raise ValueError(f'FeatureStats.from_features: expected [N, D], got shape {x.shape}')
    stats = cls(x.shape[1])
    step = batch_size or max(len(x), 1)
    for i in range(0, len(x), step):
      stats.update(x[i:i + step])
    return stats


def _sqrtm(a: np.ndarray) -> np.ndarray:
  # Rank-deficient covariances (fewer samples than dims, dead features) are routine here and
  # their consequences are checked by the caller, so scipy's singular-matrix warning is noise.
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
    return scipy.linalg.sqrtm(a)


def _check_stats(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
  mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
  sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
  if mu.ndim != 1:
    raise ValueError(f'frechet_distance: mu{name} must be a vector [D], got shape {mu.shape}')
  if sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f'frechet_distance: sigma{name} must be [D, D] = {(mu.shape[0],) * 2} '
                     f'to match mu{name}, got shape {sigma.shape}')
  if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
    raise ValueError(f'frechet_distance: mu{name} or sigma{name} has non-finite entries')
  return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

  d² = ||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^{1/2})  (Heusel et al. 2017).

  Args:
    mu1: mean `[D]`.
    sigma1: covariance `[D, D]`, symmetric positive semi-definite.
    mu2: mean `[D]`.
    sigma2: covariance `[D, D]`.
    eps: if the square root of S1 S2 comes back non-finite (singular product), both
      covariances are offset by `eps * I` and it is retried.

  Returns:
    d² as a Python float. Like the reference FID, this is the *squared* distance.
  """
  mu1, sigma1 = _check_stats(mu1, sigma1, '1')
  mu2, sigma2 = _check_stats(mu2, sigma2, '2')
  if mu1.shape != mu2.shape:
    raise ValueError(f'frechet_distance: feature dims differ: {mu1.shape[0]} vs {mu2.shape[0]}')

  diff = mu1 - mu2
  # S1 S2 is not symmetric, but it is similar to S1^{1/2} S2 S1^{1/2} (PSD), so its principal
  # square root exists and has a real, non-negative trace whenever S1 and S2 are PSD.
  covmean = _sqrtm(sigma1 @ sigma2)
  if not np.all(np.isfinite(covmean)):
    # Regularise both Gaussians and report the distance between the regularised pair, so the
    # traces and the root describe the same two distributions.
    offset = eps * np.eye(mu1.shape[0])
    sigma1, sigma2 = sigma1 + offset, sigma2 + offset
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.all(np.isfinite(covmean)):
      raise ValueError(f'frechet_distance: sqrtm(S1 S2) is not finite even with eps={eps} '
                       'added to the covariances')
  if np.iscomplexobj(covmean):
    # Rank-deficient products give roots with rounding-level imaginary parts; a large one
    # means the inputs were not covariances.
    diag = np.diagonal(covmean)
    imag = np.max(np.abs(diag.imag))
    scale = max(1.0, float(np.max(np.abs(diag.real))))
    if imag > _MAX_RELATIVE_IMAG * scale:
      raise ValueError(f'frechet_distance: sqrtm(S1 S2) has a large imaginary component '
                       f'({imag:.3g} vs real scale {scale:.3g}); are the covariances PSD?')
    covmean = covmean.real

  d2 = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
  return float(d2)


def frechet_distance_from_stats(stats1: FeatureStats, stats2: FeatureStats,
                                eps: float = 1e-6) -> float:
  """Fréchet distance between the Gaussians fitted by two `FeatureStats`."""
  return frechet_distance(stats1.mean, stats1.cov, stats2.mean, stats2.cov, eps=eps)


def frechet_distance_from_features(features1, features2, eps: float = 1e-6) -> float:
  """Fréchet distance between Gaussians fitted to features `[N1, D]` and `[N2, D]`."""
  f1, f2 = np.asarray(features1), np.asarray(features2)
  if f1.ndim != 2 or f2.ndim != 2:
    raise ValueError(f'frechet_distance_from_features: expected [N, D] features, got shapes '
                     f'{f1.shape} and {f2.shape}')
  if f1.shape[1] != f2.shape[1]:
    raise ValueError(f'frechet_distance_from_features: feature dims differ: {f1.shape[1]} vs '
                     f'{f2.shape[1]}')
  return frechet_distance_from_stats(FeatureStats.from_features(f1),
                                     FeatureStats.from_features(f2), eps=eps)


def save_stats(path: str, mu, sigma, **info) -> None:
  """Writes reference statistics as `.npz` with arrays `mu` [D] and `sigma` [D, D] (float64),
  the layout FID tools commonly distribute (e.g. the TTUR / pytorch-fid `.npz` files). `info`
  (strings and numbers: the feature space, the data, the count) is stored beside them as 0-d
  arrays, which FID tools ignore; `load_stats_info` reads it back."""
  mu, sigma = _check_stats(mu, sigma, ' (save_stats)')
  bad = [k for k in info if k in ('mu', 'sigma')]
  if bad:
    raise ValueError(f'save_stats: {bad[0]!r} is the name of a statistic, not of an info field')
  tmp = f'{path}.tmp'
  with open(tmp, 'wb') as f:  # a file object: np.savez would append '.npz' to a bare name
    np.savez(f, mu=mu, sigma=sigma, **{k: np.asarray(v) for k, v in info.items()})
  os.replace(tmp, path)


def load_stats_info(path: str) -> dict:
  """The info fields `save_stats` stored beside `mu` and `sigma` (`{}` for a FID tool's file)."""
  try:
    with np.load(path) as data:
      return {k: data[k].item() for k in data.files if k not in ('mu', 'sigma')
              and data[k].ndim == 0}
  except (OSError, EOFError, ValueError) as e:
    raise ValueError(f'load_stats: cannot read {path}: {e}') from None


def load_stats(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads `(mu, sigma)` from an `.npz` written by `save_stats` or a FID tool."""
  try:
    with np.load(path) as data:
      missing = [k for k in ('mu', 'sigma') if k not in data.files]
      if missing:
        raise ValueError(f'load_stats: {path} lacks {missing}; it has {data.files}')
      mu, sigma = data['mu'], data['sigma']
  except (OSError, EOFError) as e:
    raise ValueError(f'load_stats: cannot read {path}: {e}') from None
  return _check_stats(mu, sigma, f' in {path}')
