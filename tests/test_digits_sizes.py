"""The 32x32 digits: bilinear upsampling by 4 (half-pixel centres) and its exact inverse."""

import jax
import numpy as np
import pytest

from diffusion_jax.data import digits


def test_bilinear_matrix_matches_the_half_pixel_formula_by_hand():
  a = digits.bilinear_matrix()
  assert a.shape == (32, 8)
  np.testing.assert_allclose(a.sum(axis=1), 1.0, atol=1e-12)
  assert (a >= 0).all()
  # src = (i + 0.5) / 4 - 0.5, clamped to [0, 7]; weights (1 - w, w) on floor(src), floor(src) + 1.
  rows = {
      0: {0: 1.0},                  # src = -0.375, clamped to 0
      1: {0: 1.0},                  # src = -0.125, clamped to 0
      2: {0: 0.875, 1: 0.125},      # src = 0.125
      3: {0: 0.625, 1: 0.375},      # src = 0.375
      4: {0: 0.375, 1: 0.625},      # src = 0.625
      5: {0: 0.125, 1: 0.875},      # src = 0.875
      6: {1: 0.875, 2: 0.125},      # src = 1.125
      17: {3: 0.125, 4: 0.875},     # src = 3.875
      30: {7: 1.0},                 # src = 7.125, clamped to 7
      31: {7: 1.0},                 # src = 7.375, clamped to 7
  }
  for i, entries in rows.items():
    expected = np.zeros(8)
    for j, v in entries.items():
      expected[j] = v
    np.testing.assert_array_equal(a[i], expected, err_msg=f'row {i}')


def test_32x32_digits_are_jax_bilinear_resize_of_the_8x8():
  x8, y8 = digits.load_digits('test')
  x32, y32 = digits.load_digits('test', size=32)
  assert x32.shape == (450, 32, 32, 1) and x32.dtype == np.float32
  np.testing.assert_array_equal(y32, y8)
  expected = jax.image.resize(x8, (450, 32, 32, 1), method='bilinear')
  np.testing.assert_allclose(x32, np.asarray(expected), rtol=0, atol=1e-6)
  assert x32.min() >= -1.0 and x32.max() <= 1.0      # convex combinations of [-1, 1] pixels
  assert x32.min() == -1.0 and x32.max() == 1.0      # ... and the extremes are reached


@pytest.mark.parametrize('split', ['train', 'test'])
def test_to_native_inverts_the_32x32_upsampling(split):
  x8, _ = digits.load_digits(split)
  native = digits.to_native(digits.load_digits(split, size=32)[0])
  assert native.shape == x8.shape and native.dtype == np.float32
  np.testing.assert_allclose(native, x8, rtol=0, atol=1e-5)


def test_to_native_at_32x32_depends_on_every_pixel_it_should():
  x32, _ = digits.load_digits('test', size=32)
  x = x32[:2].copy()
  base = digits.to_native(x)
  x[0, 13, 21, 0] += 0.5
  moved = digits.to_native(x)
  assert np.abs(moved[0] - base[0]).max() > 1e-3
  np.testing.assert_array_equal(moved[1], base[1])   # other images untouched


@pytest.mark.parametrize('size', [8, 16, 32])
def test_sizes_stay_in_range(size):
  x, _ = digits.load_digits('all', size=size)
  assert x.shape[1:] == (size, size, 1)
  assert x.min() >= -1.0 and x.max() <= 1.0


def test_size_24_is_refused_in_one_line():
  with pytest.raises(ValueError, match=r'size=24') as e:
    digits.load_digits('test', size=24)
  assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match=r'got \(2, 24, 24, 1\)') as e:
    digits.to_native(np.zeros((2, 24, 24, 1), np.float32))
  assert '\n' not in str(e.value) and 'S in (8, 16, 32)' in str(e.value)
