"""The digits classifier behind the quick-start's Fréchet distance: accuracy, cache, FD sanity."""

import logging
import os

import jax
import numpy as np
import pytest

from diffusion_jax.data.digits import load_digits
from diffusion_jax.metrics import (
    classifier_accuracy,
    classifier_features,
    classifier_logits,
    digits_classifier_cache_path,
    digits_fd,
    digits_fd_eval,
    digits_fd_floor,
    digits_reference_stats,
    load_or_train_digits_classifier,
)

# A few steps are enough to exercise caching and retraining without paying for a real run.
_TINY = {'steps': 10}


@pytest.fixture(scope='module')
def trained(subprocess_cache):
  """The classifier of the default recipe, trained once for the whole run in the cache the
  subprocess tests share (the first file that needs it trains it: ~20 s cold)."""
  cache_dir = subprocess_cache
  params, info = load_or_train_digits_classifier(cache_dir)
  return cache_dir, params, info


@pytest.fixture(scope='module')
def reference(trained):
  return digits_reference_stats(trained[1])


def _noise(n, seed=0):
  rng = np.random.default_rng(seed)
  return rng.uniform(-1.0, 1.0, size=(n, 8, 8, 1)).astype(np.float32)


def test_reaches_test_accuracy(trained):
  _, params, info = trained       # trained here or by an earlier file of the run (shared cache)
  assert info['test_accuracy'] >= 0.95
  test_x, test_y = load_digits('test')
  assert classifier_accuracy(params, test_x, test_y) == info['test_accuracy']


def test_features_and_logits_shapes_and_batching(trained):
  params = trained[1]
  x, _ = load_digits('train')
  feats = classifier_features(params, x)  # more than one internal chunk
  assert feats.shape == (len(x), 64)
  assert np.all(np.isfinite(feats))
  assert classifier_logits(params, x[:3]).shape == (3, 10)
  # Results do not depend on how the images are chunked.
  np.testing.assert_allclose(classifier_features(params, x[700:703]), feats[700:703],
                             rtol=1e-5, atol=1e-6)
  assert classifier_features(params, x[:0]).shape == (0, 64)
  with pytest.raises(ValueError, match=r'\[N, 8, 8, 1\]'):
    classifier_features(params, x[..., 0])


def test_second_call_loads_from_cache(trained):
  cache_dir, params, info = trained
  params2, info2 = load_or_train_digits_classifier(cache_dir)
  assert info2['loaded_from_cache']
  assert info2['test_accuracy'] == info['test_accuracy']
  assert info2['cache_path'] == info['cache_path']
  x, _ = load_digits('test')
  np.testing.assert_array_equal(classifier_features(params2, x), classifier_features(params, x))


def test_recipe_and_seed_select_the_cache_file(tmp_path):
  base = digits_classifier_cache_path(tmp_path)
  assert digits_classifier_cache_path(tmp_path, recipe_overrides=_TINY) != base
  assert digits_classifier_cache_path(tmp_path, seed=1) != base
  with pytest.raises(ValueError, match='unknown recipe key'):
    digits_classifier_cache_path(tmp_path, recipe_overrides={'stepz': 1})


def _truncate(path):
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])


def _flip_bytes(path):
  # Damage array data in the middle of the file while keeping it a readable size.
  with open(path, 'r+b') as f:
    f.seek(os.path.getsize(path) // 2)
    chunk = f.read(64)
    f.seek(-len(chunk), os.SEEK_CUR)
    f.write(bytes(b ^ 0xFF for b in chunk))


def _garbage(path):
  with open(path, 'wb') as f:
    f.write(b'not an npz file')


@pytest.mark.parametrize('corrupt', [_truncate, _flip_bytes, _garbage])
def test_corrupt_cache_is_detected_and_retrained(tmp_path, caplog, corrupt):
  params, info = load_or_train_digits_classifier(tmp_path, recipe_overrides=_TINY)
  assert not info['loaded_from_cache']
  corrupt(info['cache_path'])
  with caplog.at_level(logging.WARNING):
    params2, info2 = load_or_train_digits_classifier(tmp_path, recipe_overrides=_TINY)
  assert not info2['loaded_from_cache']
  assert any('corrupt' in r.getMessage() for r in caplog.records)
  # Training is a function of the seed, so the retrained weights are the originals.
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  # The overwritten file is whole again.
  _, info3 = load_or_train_digits_classifier(tmp_path, recipe_overrides=_TINY)
  assert info3['loaded_from_cache']
  assert not [f for f in os.listdir(tmp_path) if f.startswith('.tmp_')]


def test_real_digits_are_much_closer_than_noise(trained, reference):
  params = trained[1]
  test_x, _ = load_digits('test')
  fd_real = digits_fd(params, test_x[::2], reference=reference)
  fd_noise = digits_fd(params, _noise(225), reference=reference)
  assert 0.0 <= fd_real < 0.2 * fd_noise


def test_eval_reports_floor_at_matched_n(trained, reference):
  params, info = trained[1], trained[2]
  m = digits_fd_eval(params, _noise(1000), reference=reference,
                     classifier_test_accuracy=info['test_accuracy'])
  assert m['num_generated'] == m['num_floor'] == 1000 and not m['floor_capped']
  assert m['fd_floor'] == digits_fd_floor(params, 1000, reference=reference)[0]
  assert 0.0 < m['fd_floor'] < 0.1 * m['fd']
  assert m['classifier_test_accuracy'] == info['test_accuracy']
  assert all(isinstance(v, (float, int, bool)) for v in m.values())
  # Without the cached pieces, the same numbers are recomputed.
  m2 = digits_fd_eval(params, _noise(1000))
  assert m2['fd'] == pytest.approx(m['fd'], rel=1e-9)
  assert m2['classifier_test_accuracy'] == info['test_accuracy']


def test_floor_uses_all_train_digits_when_n_exceeds_them(trained, reference):
  params = trained[1]
  m = digits_fd_eval(params, _noise(1400), reference=reference, classifier_test_accuracy=1.0)
  assert m['num_floor'] == len(load_digits('train')[1]) == 1347
  assert m['floor_capped']
  assert np.isfinite(m['fd_floor'])


def test_non_finite_samples_give_nan(trained, reference):
  x = _noise(10)
  x[3, 2, 2, 0] = np.nan
  assert np.isnan(digits_fd(trained[1], x, reference=reference))


def test_cache_file_of_another_run_is_not_loaded(tmp_path, caplog):
  _, info = load_or_train_digits_classifier(tmp_path, recipe_overrides=_TINY)
  other = digits_classifier_cache_path(tmp_path, seed=1, recipe_overrides=_TINY)
  os.replace(info['cache_path'], other)  # a valid file under the wrong name
  with caplog.at_level(logging.WARNING):
    _, info1 = load_or_train_digits_classifier(tmp_path, seed=1, recipe_overrides=_TINY)
  assert not info1['loaded_from_cache'] and info1['seed'] == 1
  assert any('seed 0, expected' in r.getMessage() for r in caplog.records)
