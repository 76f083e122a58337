"""Fréchet distance and streaming feature statistics, checked against dense references."""

import numpy as np
import pytest

from diffusion_jax.metrics import frechet
from diffusion_jax.metrics.frechet import (
    FeatureStats,
    frechet_distance,
    frechet_distance_from_features,
    frechet_distance_from_stats,
)


def _psd_sqrt(s):
  w, v = np.linalg.eigh(s)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _reference_fd(mu1, s1, mu2, s2):
  # Tr((S1 S2)^{1/2}) = sum sqrt(eig(S1^{1/2} S2 S1^{1/2})): a symmetric PSD eigenproblem, so
  # no general matrix square root is involved.
  r = _psd_sqrt(s1)
  eig = np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0.0, None)
  diff = mu1 - mu2
  return diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.sum(np.sqrt(eig))


def _random_spd(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


@pytest.mark.parametrize('d', [1, 5, 64])
def test_matches_dense_reference_on_random_spd(d):
  rng = np.random.default_rng(d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
  got = frechet_distance(mu1, s1, mu2, s2)
  assert isinstance(got, float)
  np.testing.assert_allclose(got, _reference_fd(mu1, s1, mu2, s2), rtol=1e-6)


def test_diagonal_closed_form():
  rng = np.random.default_rng(0)
  d = 32
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  v1, v2 = rng.uniform(0.1, 3.0, size=d), rng.uniform(0.1, 3.0, size=d)
  want = np.sum((mu1 - mu2)**2) + np.sum(v1 + v2 - 2.0 * np.sqrt(v1 * v2))
  np.testing.assert_allclose(frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)), want,
                             rtol=1e-10)


def test_one_dimensional_is_squared_w2_between_normals():
  # W2²(N(m1, s1²), N(m2, s2²)) = (m1 - m2)² + (s1 - s2)².
  got = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-0.5]), np.array([[9.0]]))
  np.testing.assert_allclose(got, 1.5**2 + 1.0**2, rtol=1e-12)


def test_identical_statistics_give_zero():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(500, 48)) @ rng.normal(size=(48, 48))
  s = FeatureStats.from_features(x)
  d = frechet_distance_from_stats(s, s)
  assert abs(d) < 1e-9 * np.trace(s.cov)
  assert abs(frechet_distance_from_features(x, x)) < 1e-9 * np.trace(s.cov)


def test_symmetric():
  rng = np.random.default_rng(2)
  d = 20
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
  np.testing.assert_allclose(frechet_distance(mu1, s1, mu2, s2),
                             frechet_distance(mu2, s2, mu1, s1), rtol=1e-9)


def test_separates_shifted_and_scaled_gaussians():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(4000, 8))
  near = rng.normal(size=(4000, 8))
  far = 2.0 * rng.normal(size=(4000, 8)) + 1.0
  assert frechet_distance_from_features(x, near) < 0.1 < frechet_distance_from_features(x, far)


@pytest.mark.parametrize('n', [2, 10, 31])
def test_rank_deficient_covariances_give_finite_answer(n):
  # Fewer samples than dimensions: both covariances are singular, as is their product.
  rng = np.random.default_rng(n)
  d = 32
  f1, f2 = rng.normal(size=(n, d)), rng.normal(size=(n, d)) + 0.5
  got = frechet_distance_from_features(f1, f2)
  assert np.isfinite(got)
  want = _reference_fd(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_zero_covariances_give_squared_mean_distance():
  d = 4
  got = frechet_distance(np.zeros(d), np.zeros((d, d)), np.ones(d), np.zeros((d, d)))
  np.testing.assert_allclose(got, d, rtol=1e-12)


def test_non_finite_root_falls_back_to_offset(monkeypatch):
  rng = np.random.default_rng(4)
  d = 6
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
  real_sqrtm = frechet._sqrtm
  calls = []

  def flaky_sqrtm(a):
    calls.append(a)
    return np.full_like(a, np.inf) if len(calls) == 1 else real_sqrtm(a)

  monkeypatch.setattr(frechet, '_sqrtm', flaky_sqrtm)
  eps = 1e-3
  got = frechet_distance(mu1, s1, mu2, s2, eps=eps)
  assert len(calls) == 2
  # The retry measures the distance between the two offset Gaussians.
  offset = eps * np.eye(d)
  np.testing.assert_allclose(got, _reference_fd(mu1, s1 + offset, mu2, s2 + offset), rtol=1e-8)


def test_non_psd_input_raises_on_large_imaginary_part():
  with pytest.raises(ValueError, match='imaginary'):
    frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


@pytest.mark.parametrize('args, match', [
    ((np.zeros(3), np.eye(4), np.zeros(3), np.eye(3)), 'sigma1'),
    ((np.zeros(3), np.eye(3), np.zeros(3), np.eye(3)[:2]), 'sigma2'),
    ((np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)), 'dims differ'),
    ((np.zeros((3, 1)), np.eye(3), np.zeros(3), np.eye(3)), 'mu1'),
    ((np.full(3, np.nan), np.eye(3), np.zeros(3), np.eye(3)), 'non-finite'),
])
def test_shape_errors_are_clear(args, match):
  with pytest.raises(ValueError, match=match) as e:
    frechet_distance(*args)
  assert '\n' not in str(e.value)


def test_from_features_shape_errors():
  with pytest.raises(ValueError, match='dims differ'):
    frechet_distance_from_features(np.zeros((5, 3)), np.zeros((5, 4)))
  with pytest.raises(ValueError, match=r'\[N, D\]'):
    frechet_distance_from_features(np.zeros(5), np.zeros((5, 1)))


def _ragged_batches(rng, x):
  sizes = [1, 1, 2, 1, 7, 1, 50, 3, 1]
  out, i = [], 0
  while i < len(x):
    b = sizes[len(out) % len(sizes)] if len(out) < 40 else int(rng.integers(1, 100))
    out.append(x[i:i + b])
    i += b
  return out


def test_streaming_stats_match_numpy():
  rng = np.random.default_rng(5)
  # A large common offset: the naive E[x x^T] - mu mu^T would lose ~8 digits here.
  x = rng.normal(size=(1003, 24)) @ rng.normal(size=(24, 24)) + 1e4
  stats = FeatureStats()
  for batch in _ragged_batches(rng, x):
    stats.update(batch)
  assert stats.count == len(x)
  assert stats.dim == 24
  np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-11, atol=1e-12)


def test_streaming_single_rows():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(64, 5))
  stats = FeatureStats(5)
  for row in x:
    stats.update(row[None])
  np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-12, atol=1e-15)


def test_merge_equals_concatenation():
  rng = np.random.default_rng(7)
  a, b = rng.normal(size=(37, 6)) + 3.0, rng.normal(size=(1, 6)) - 2.0
  merged = FeatureStats.from_features(a).merge(FeatureStats.from_features(b))
  merged.merge(FeatureStats())  # merging nothing changes nothing
  both = np.concatenate([a, b])
  assert merged.count == 38
  np.testing.assert_allclose(merged.mean, both.mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(merged.cov, np.cov(both, rowvar=False), rtol=1e-12)
  empty_first = FeatureStats().merge(FeatureStats.from_features(a))
  np.testing.assert_allclose(empty_first.cov, np.cov(a, rowvar=False), rtol=1e-12)


def test_from_features_batch_size_is_irrelevant():
  x = np.random.default_rng(8).normal(size=(100, 3))
  s1, s2 = FeatureStats.from_features(x), FeatureStats.from_features(x, batch_size=7)
  np.testing.assert_allclose(s1.cov, s2.cov, rtol=1e-12)
  np.testing.assert_allclose(s1.mean, s2.mean, rtol=1e-12)


def test_stats_does_not_keep_samples():
  stats = FeatureStats()
  for _ in range(5):
    stats.update(np.ones((1000, 3)))
  arrays = [v for v in vars(stats).values() if isinstance(v, np.ndarray)]
  assert sum(a.size for a in arrays) == 3 + 3 * 3


def test_stats_errors():
  with pytest.raises(ValueError, match=r'\[B, D\]'):
    FeatureStats().update(np.zeros(3))
  with pytest.raises(ValueError, match='dims differ'):
    FeatureStats().update(np.zeros((2, 3))).update(np.zeros((2, 4)))
  with pytest.raises(ValueError, match='no samples'):
    _ = FeatureStats().mean
  with pytest.raises(ValueError, match='at least 2'):
    _ = FeatureStats().update(np.zeros((1, 3))).cov


def test_stats_file_round_trip_and_errors(tmp_path):
  rng = np.random.default_rng(7)
  x = rng.normal(size=(50, 4))
  mu, sigma = x.mean(0), np.cov(x, rowvar=False)
  path = str(tmp_path / 'ref_stats')  # no extension: written exactly where asked
  frechet.save_stats(path, mu, sigma)
  mu2, sigma2 = frechet.load_stats(path)
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)
  np.savez(tmp_path / 'bad.npz', mean=mu)
  with pytest.raises(ValueError, match=r"lacks \['mu', 'sigma'\]"):
    frechet.load_stats(str(tmp_path / 'bad.npz'))
  with pytest.raises(ValueError, match='cannot read'):
    frechet.load_stats(str(tmp_path / 'missing.npz'))
