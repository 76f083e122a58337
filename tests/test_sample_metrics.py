"""KID / MMD (unbiasedness, brute-force formula), precision and recall (identical, disjoint and
half-covered sets), Inception Score (closed-form extremes)."""

import math

import numpy as np
import pytest

from diffusion_jax.metrics import classifier_scores as is_lib
from diffusion_jax.metrics import kernel
from diffusion_jax.metrics import manifold as pr


def _brute_mmd2(x, y, k):
  """Unbiased MMD² by explicit sums over index pairs (Gretton et al. 2012, Eq. 3)."""
  m, n = len(x), len(y)
  sxx = sum(k(x[i:i + 1], x[j:j + 1])[0, 0] for i in range(m) for j in range(m) if i != j)
  syy = sum(k(y[i:i + 1], y[j:j + 1])[0, 0] for i in range(n) for j in range(n) if i != j)
  sxy = sum(k(x[i:i + 1], y[j:j + 1])[0, 0] for i in range(m) for j in range(n))
  return sxx / (m * (m - 1)) + syy / (n * (n - 1)) - 2 * sxy / (m * n)


@pytest.mark.parametrize('k', [kernel.polynomial_kernel(), kernel.rbf_kernel(1.3)])
def test_mmd2_matches_brute_force(k):
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(7, 3)), rng.normal(size=(5, 3)) + 0.5
  np.testing.assert_allclose(kernel.mmd2_unbiased(x, y, k), _brute_mmd2(x, y, k), rtol=1e-12)


def test_kid_is_unbiased_for_the_same_distribution():
  """Over 400 independent pairs of same-distribution sets, the mean of the unbiased MMD² must be
  within 4 standard errors of 0; the biased V-statistic (with diagonals) would sit far above."""
  rng = np.random.default_rng(1)
  k = kernel.polynomial_kernel()
  values, biased = [], []
  for _ in range(400):
    x, y = rng.normal(size=(20, 8)), rng.normal(size=(20, 8))
    values.append(kernel.mmd2_unbiased(x, y, k))
    biased.append(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())
  se = np.std(values) / math.sqrt(len(values))
  assert abs(np.mean(values)) < 4 * se, (np.mean(values), se)
  assert np.mean(biased) > 10 * se  # the check above can tell the two apart


def test_kid_separates_shifted_features_and_uses_subsets():
  rng = np.random.default_rng(2)
  real = rng.normal(size=(600, 16))
  same = kernel.kid(real, rng.normal(size=(500, 16)), num_subsets=20, subset_size=200)
  shifted = kernel.kid(real, rng.normal(size=(500, 16)) + 0.5, num_subsets=20, subset_size=200)
  assert abs(same[0]) < 3 * same[1] + 1e-3
  assert shifted[0] > 5 * shifted[1] and shifted[0] > 0.5  # measured 1.03 ± 0.11
  with pytest.raises(ValueError, match=r'features must be \[N >= 2, D\], got shape \(5,\)'):
    kernel.kid(np.zeros(5), real)


def test_mmd_rbf_median_bandwidth():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(200, 2))
  assert kernel.mmd_rbf(x, rng.normal(size=(200, 2)) + 2.0) > 0.1
  assert abs(kernel.mmd_rbf(x, rng.normal(size=(200, 2)))) < 0.02


def test_precision_recall_extremes_and_half_coverage():
  rng = np.random.default_rng(4)
  real = rng.normal(size=(300, 4))
  assert pr.precision_recall(real, real) == {'precision': 1.0, 'recall': 1.0}
  far = pr.precision_recall(real, rng.normal(size=(300, 4)) + 100.0)
  assert far == {'precision': 0.0, 'recall': 0.0}
  # Half the fakes are real points (inside), half far away (outside): precision exactly 0.5.
  fake = np.concatenate([real[:150], rng.normal(size=(150, 4)) + 100.0])
  result = pr.precision_recall(real, fake, block=64)  # small blocks: the blocking is exercised
  assert result['precision'] == 0.5
  # The fakes cover only the real points they contain (and their neighbourhoods): recall < 1.
  assert 0.5 <= result['recall'] < 1.0


def test_knn_radii_against_sorting():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(50, 3))
  d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
  np.testing.assert_allclose(pr.knn_radii(x, k=3, block=7), np.sort(d2, axis=1)[:, 3],
                             rtol=1e-9, atol=1e-12)
  with pytest.raises(ValueError, match='k=50, N=50'):
    pr.knn_radii(x, k=50)


def test_inception_score_extremes_and_formula():
  n, c = 1000, 10
  # Confident predictions spread evenly over C classes: IS = C.
  confident = 60.0 * np.eye(c)[np.arange(n) % c]
  mean, std = is_lib.inception_score(confident, splits=10)
  np.testing.assert_allclose(mean, c, rtol=1e-9)
  assert std < 1e-9
  # Identical predictions for every x: IS = 1.
  np.testing.assert_allclose(is_lib.inception_score(np.ones((n, c)) * [np.arange(c)])[0], 1.0)
  # Direct formula on one split.
  rng = np.random.default_rng(6)
  logits = rng.normal(size=(40, 5))
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  py = p.mean(0)
  want = np.exp(np.mean((p * (np.log(p) - np.log(py))).sum(1)))
  np.testing.assert_allclose(is_lib.inception_score(logits, splits=1)[0], want, rtol=1e-12)
