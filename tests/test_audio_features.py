"""Audio features, metrics and files against direct computations written here: the STFT against
a DFT loop (and scipy.signal.stft), the HTK / Slaney filterbank against the formula by hand,
log-mel against numpy, MFCC against scipy's orthonormal DCT, the metrics against their
definitions (zero on identical clips, known values under a gain), WAV round trips."""

import functools
import math
import wave

import jax
import numpy as np
import pytest
import scipy.fft
import scipy.signal
from PIL import Image

from diffusion_jax.audio import features
from diffusion_jax.audio import io as audio_io
from diffusion_jax.metrics import audio as audio_metrics


def _reflect_pad(x, n_fft, hop):
  """Reflect padding by index: sample j < 0 is x[-j], sample j >= L is x[2 (L - 1) - j]."""
  left = (n_fft - hop) // 2
  right = n_fft - hop - left
  length = x.shape[-1]
  src = [(-j if j < 0 else (2 * (length - 1) - j if j >= length else j))
         for j in range(-left, length + right)]
  return x[..., src]


def _dft_stft(x, n_fft, hop):
  """`X[f, k] = sum_n pad(x)[f hop + n] w[n] exp(-2 pi i k n / N)` by explicit loops."""
  padded = _reflect_pad(np.asarray(x, np.float64), n_fft, hop)
  w = [0.5 - 0.5 * math.cos(2 * math.pi * n / n_fft) for n in range(n_fft)]
  frames = x.shape[-1] // hop
  out = np.zeros(x.shape[:-1] + (frames, n_fft // 2 + 1), np.complex128)
  for f in range(frames):
    for k in range(n_fft // 2 + 1):
      out[..., f, k] = sum(padded[..., f * hop + n] * w[n]
                           * np.exp(-2j * math.pi * k * n / n_fft) for n in range(n_fft))
  return out


def _filterbank_by_formula(sample_rate, n_fft, n_mels, fmin, fmax):
  """HTK mel points and Slaney-normalised triangles, one weight at a time."""
  mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)
  hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)
  step = (mel(fmax) - mel(fmin)) / (n_mels + 1)
  f = [hz(mel(fmin) + i * step) for i in range(n_mels + 2)]
  out = np.zeros((n_fft // 2 + 1, n_mels))
  for k in range(n_fft // 2 + 1):
    freq = k * sample_rate / n_fft
    for m in range(n_mels):
      if f[m] < freq <= f[m + 1]:
        out[k, m] = (freq - f[m]) / (f[m + 1] - f[m])
      elif f[m + 1] < freq < f[m + 2]:
        out[k, m] = (f[m + 2] - freq) / (f[m + 2] - f[m + 1])
      out[k, m] *= 2.0 / (f[m + 2] - f[m])
  return out


@pytest.mark.parametrize('length, n_fft, hop', [(48, 16, 4), (60, 12, 5)])
def test_stft_matches_dft_loop_and_scipy(length, n_fft, hop):
  x = np.random.default_rng(0).uniform(-1, 1, (2, length))
  want = _dft_stft(x, n_fft, hop)                                       # [2, F, K]
  assert want.shape == (2, length // hop, n_fft // 2 + 1)
  np.testing.assert_allclose(features.stft_numpy(x, n_fft, hop), want, atol=1e-12)
  # float32: ~n_fft terms of size <= 1, each rounded at 6e-8 relative.
  np.testing.assert_allclose(np.asarray(features.stft(x, n_fft, hop)), want, atol=2e-5)
  # scipy frames the padded signal the same way and scales by 1 / sum(w) (periodic Hann).
  window = scipy.signal.get_window('hann', n_fft)
  _, _, z = scipy.signal.stft(_reflect_pad(x, n_fft, hop), window=window, nperseg=n_fft,
                              noverlap=n_fft - hop, boundary=None, padded=False)
  np.testing.assert_allclose(np.swapaxes(z, -1, -2) * window.sum(), want, atol=1e-12)


def test_mel_filterbank_by_hand():
  # One mel filter between 0 and 2100 Hz: mel(2100) = 2595 log10 4 = 2 mel(700), so its peak is
  # 700 Hz and its height 2 / 2100. Bins every 500 Hz (n_fft 16 at 8000 Hz).
  fb = features.mel_filterbank(8000, 16, 1, 0.0, 2100.0)
  h = 2.0 / 2100.0
  want = [0.0, 500 / 700 * h, 1100 / 1400 * h, 600 / 1400 * h, 100 / 1400 * h, 0, 0, 0, 0]
  np.testing.assert_allclose(fb[:, 0], want, rtol=1e-12, atol=1e-15)
  for args in [(8000, 32, 3, 100.0, 3000.0), (8000, 256, 40, 0.0, 4000.0),
               (16000, 64, 5, 50.0, 7000.0)]:
    np.testing.assert_allclose(features.mel_filterbank(*args), _filterbank_by_formula(*args),
                               rtol=1e-12, atol=1e-15)


CFG = features.MelConfig(sample_rate=8000, n_fft=128, hop=32, n_mels=24)


@functools.lru_cache(maxsize=None)
def _jit_log_mel(cfg):
  return jax.jit(lambda x: features.log_mel(x, cfg))


def _numpy_log_mel(x, cfg):
  """Frames by slicing, `np.fft.rfft`, the formula filterbank, natural log with the floor."""
  padded = _reflect_pad(np.asarray(x, np.float64), cfg.n_fft, cfg.hop)
  w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(cfg.n_fft) / cfg.n_fft)
  frames = np.stack([padded[..., f * cfg.hop:f * cfg.hop + cfg.n_fft] * w
                     for f in range(x.shape[-1] // cfg.hop)], axis=-2)
  fb = _filterbank_by_formula(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin,
                              cfg.fmax or cfg.sample_rate / 2)
  return np.log(np.maximum(np.abs(np.fft.rfft(frames, axis=-1)) @ fb, cfg.log_floor))


def test_log_mel_jit_on_batches_matches_numpy():
  x = np.random.default_rng(1).uniform(-0.5, 0.5, (3, 512, 1)).astype(np.float32)
  x[2] = 0.0                                                          # floor: log(1e-5)
  got = np.asarray(_jit_log_mel(CFG)(x))
  assert got.shape == (3, 512 // CFG.hop, CFG.n_mels)
  want = _numpy_log_mel(x[..., 0], CFG)
  # float32 STFT: relative error ~1e-6 on mels of order 0.1-1, so ~1e-5 in the log.
  np.testing.assert_allclose(got, want, atol=1e-4)
  np.testing.assert_allclose(got[2], math.log(1e-5), atol=1e-6)
  np.testing.assert_allclose(features.log_mel_numpy(x, CFG), want, atol=1e-12)
  np.testing.assert_allclose(features.log_mel_numpy(x[..., 0], CFG), want, atol=1e-12)
  mel = np.asarray(features.mel_spectrogram(x[0, :, 0], CFG))         # [F, n_mels], unbatched
  np.testing.assert_allclose(mel, np.exp(want[0]), rtol=1e-4)


def test_log_mel_of_a_sine_peaks_in_its_mel_bin():
  """A sine at the peak frequency of filter 13 (from the HTK formula: mel points equally spaced
  over [0, mel(4000)]) puts its largest log-mel in channel 13 in every frame."""
  m_max = 2595.0 * math.log10(1.0 + 4000.0 / 700.0)
  f_peak = 700.0 * (10.0 ** ((13 + 1) * m_max / (CFG.n_mels + 1) / 2595.0) - 1.0)
  t = np.arange(512) / 8000.0
  x = (0.5 * np.sin(2 * np.pi * f_peak * t))[None, :, None].astype(np.float32)
  got = np.asarray(_jit_log_mel(CFG)(x))[0]
  assert (np.argmax(got, axis=-1) == 13).all(), (f_peak, np.argmax(got, axis=-1))


def test_mfcc_is_scipy_orthonormal_dct():
  log_mels = np.random.default_rng(2).normal(size=(2, 5, 24))
  want = scipy.fft.dct(log_mels, type=2, norm='ortho', axis=-1)[..., :13]
  np.testing.assert_allclose(features.mfcc_numpy(log_mels, 13), want, atol=1e-12)
  np.testing.assert_allclose(np.asarray(features.mfcc(log_mels.astype(np.float32), 13)), want,
                             atol=2e-5)
  with pytest.raises(ValueError, match=r'mfcc: n=25 coefficients must be in \[1, n_mels=24\]'):
    features.mfcc_numpy(log_mels, 25)


def _clips(n=2, length=512, seed=3):
  return np.random.default_rng(seed).uniform(-0.4, 0.4, (n, length, 1))


def test_metrics_vanish_on_identical_clips_and_know_a_gain():
  y = _clips()
  for value in (audio_metrics.log_spectral_distance(y, y),
                audio_metrics.mel_cepstral_distortion(y, y, CFG),
                audio_metrics.mr_stft_distance(y, y)):
    np.testing.assert_array_equal(value, np.zeros(2))
  # |X| = 2 |Y|: every bin's log power differs by 20 log10 2 dB (eps = 1e-10 << |Y|^2).
  np.testing.assert_allclose(audio_metrics.log_spectral_distance(2 * y, y),
                             20 * math.log10(2), rtol=1e-7)
  # Spectral convergence || |Y| - |X| || / || |Y| || is 1 for x = 2y and 1/2 for x = y/2; the log
  # term is ln 2 either way. The reference is the denominator, not the generated clip.
  np.testing.assert_allclose(audio_metrics.mr_stft_distance(2 * y, y), 1 + math.log(2),
                             rtol=1e-9)
  np.testing.assert_allclose(audio_metrics.mr_stft_distance(y / 2, y), 0.5 + math.log(2),
                             rtol=1e-9)
  # A gain shifts every log-mel by ln 2: only c_0 moves, and c_0 is excluded.
  np.testing.assert_allclose(audio_metrics.mel_cepstral_distortion(2 * y, y, CFG), 0,
                             atol=1e-9)


def test_metrics_match_their_definitions_on_tiny_clips():
  rng = np.random.default_rng(4)
  x, y = rng.uniform(-1, 1, (2, 16)), rng.uniform(-1, 1, (2, 16))
  px = 10 * np.log10(np.abs(_dft_stft(x, 8, 4)) ** 2 + 1e-10)
  py = 10 * np.log10(np.abs(_dft_stft(y, 8, 4)) ** 2 + 1e-10)
  want = [np.mean([math.sqrt(np.mean((px[i, f] - py[i, f]) ** 2)) for f in range(4)])
          for i in range(2)]
  np.testing.assert_allclose(audio_metrics.log_spectral_distance(x, y, 8, 4), want, rtol=1e-12)

  want = np.zeros(2)
  for n_fft, hop in ((8, 2), (4, 4)):
    mx, my = np.abs(_dft_stft(x, n_fft, hop)), np.abs(_dft_stft(y, n_fft, hop))
    for i in range(2):
      want[i] += (np.sqrt(np.sum((my[i] - mx[i]) ** 2)) / np.sqrt(np.sum(my[i] ** 2))
                  + np.mean(np.abs(np.log(my[i]) - np.log(mx[i])))) / 2
  got = audio_metrics.mr_stft_distance(x[..., None], y[..., None], ((8, 2), (4, 4)))
  np.testing.assert_allclose(got, want, rtol=1e-12)

  x, y = _clips(seed=5)[..., 0], _clips(seed=6)[..., 0]
  cx = scipy.fft.dct(_numpy_log_mel(x, CFG), norm='ortho', axis=-1)[..., 1:13]
  cy = scipy.fft.dct(_numpy_log_mel(y, CFG), norm='ortho', axis=-1)[..., 1:13]
  want = (10 / math.log(10) * np.sqrt(2 * np.sum((cx - cy) ** 2, axis=-1))).mean(axis=-1)
  np.testing.assert_allclose(audio_metrics.mel_cepstral_distortion(x, y, CFG, 13), want,
                             rtol=1e-10)
  both = audio_metrics.audio_metrics(x, y, CFG)
  assert set(both) == {'lsd', 'mcd', 'mr_stft'}
  assert both['mcd'] == pytest.approx(want.mean(), rel=1e-10)
  assert both['lsd'] == pytest.approx(
      audio_metrics.log_spectral_distance(x, y, CFG.n_fft, CFG.hop).mean(), rel=1e-12)


def test_metrics_refuse_bad_clips():
  y = _clips()
  with pytest.raises(ValueError, match=r'generated shape \(2, 256, 1\) != reference shape '
                                       r'\(2, 512, 1\)'):
    audio_metrics.log_spectral_distance(y[:, :256], y)
  with pytest.raises(ValueError, match=r'reference clip 1 is silent'):
    audio_metrics.mr_stft_distance(y, y * np.array([1.0, 0.0])[:, None, None])
  with pytest.raises(ValueError, match=r'non-finite'):
    audio_metrics.mel_cepstral_distortion(y * np.nan, y, CFG)
  with pytest.raises(ValueError, match=r'mel.hop=64 does not divide the waveform length 500'):
    audio_metrics.log_spectral_distance(y[:, :500], y[:, :500])
  with pytest.raises(ValueError, match=r'n_mfcc=1 must be in \[2, mel.n_mels=24\]'):
    audio_metrics.mel_cepstral_distortion(y, y, CFG, n_mfcc=1)


def test_mel_config_and_frame_errors_name_the_field():
  assert features.MelConfig().check() == features.MelConfig()
  assert features.num_frames(4096, 64) == 64
  with pytest.raises(ValueError) as e:
    features.num_frames(4000, 64)
  assert str(e.value) == ('mel.hop=64 does not divide the waveform length 4000 '
                          '(4000 % 64 = 32)')
  for changes, words in [({'n_fft': 255}, 'mel.n_fft=255 must be even'),
                         ({'hop': 0}, 'mel.hop=0'), ({'hop': 512}, 'mel.hop=512'),
                         ({'n_mels': 0}, 'mel.n_mels=0'),
                         ({'fmin': 4000.0}, 'mel.fmin=4000.0'),
                         ({'fmax': 5000.0}, 'mel.fmax=5000.0'),
                         ({'fmax': -1.0}, 'mel.fmax=-1.0'),
                         ({'log_floor': 0.0}, 'mel.log_floor=0.0'),
                         ({'n_mels': 128}, 'mel.n_mels=128: mel filter 0'),
                         ({'sample_rate': 8000.0}, 'mel.sample_rate=8000.0')]:
    with pytest.raises(ValueError, match=words):
      features.MelConfig(**changes).check()
  with pytest.raises(ValueError, match=r'log_mel: waveforms must be \[N, L, 1\] or \[N, L\], '
                                       r'got shape \(2, 512, 2\)'):
    features.log_mel(np.zeros((2, 512, 2)), CFG)
  with pytest.raises(ValueError, match=r'stft: waveform length 64 is shorter than n_fft=128'):
    features.stft_numpy(np.zeros(64), 128, 32)


def test_wav_round_trip_and_bad_files(tmp_path):
  x = np.random.default_rng(7).uniform(-1, 1, 1000).astype(np.float32)
  x[:4] = [1.0, -1.0, 1.7, -3.0]                                       # last two: clipped
  path = tmp_path / 'a.wav'
  audio_io.write_wav(path, x[:, None], 8000)
  with wave.open(str(path), 'rb') as f:
    assert (f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()) == (
        1, 2, 8000, 1000)
  y, rate = audio_io.read_wav(path)
  assert rate == 8000 and y.dtype == np.float32 and y.shape == (1000,)
  # Rounding to the nearest of 65535 levels: at most half a step, plus float32 rounding.
  assert np.abs(y - np.clip(x, -1, 1)).max() <= 0.5 / 32767 + 1e-7
  np.testing.assert_array_equal(y[:4], [1.0, -1.0, 1.0, -1.0])

  stereo, bytes8, junk = tmp_path / 's.wav', tmp_path / 'b.wav', tmp_path / 'junk.wav'
  for p, channels, width in ((stereo, 2, 2), (bytes8, 1, 1)):
    with wave.open(str(p), 'wb') as f:
      f.setnchannels(channels)
      f.setsampwidth(width)
      f.setframerate(8000)
      f.writeframes(bytes(8))
  junk.write_bytes(b'not a wave file at all')
  for p, words in ((stereo, 's.wav has 2 channels'), (bytes8, 'b.wav holds 8-bit samples'),
                   (junk, 'junk.wav is not a readable WAV file'),
                   (tmp_path / 'none.wav', 'none.wav is not a readable WAV file')):
    with pytest.raises(ValueError, match=words):
      audio_io.read_wav(p)
  with pytest.raises(ValueError, match=r'non-finite'):
    audio_io.write_wav(tmp_path / 'n.wav', np.array([0.0, np.nan]), 8000)
  with pytest.raises(ValueError, match=r'must be \[L\] or \[L, 1\]'):
    audio_io.write_wav(tmp_path / 'n.wav', np.zeros((10, 2)), 8000)
  with pytest.raises(ValueError, match=r'sample_rate=0'):
    audio_io.write_wav(tmp_path / 'n.wav', np.zeros(10), 0)


def test_save_listening_writes_clips_and_spectrograms(tmp_path):
  samples, references = _clips(3, seed=8), _clips(3, seed=9)
  paths = audio_io.save_listening(tmp_path / 'listen', samples, references, CFG, num=2)
  names = sorted(p.rsplit('/', 1)[-1] for p in paths)
  assert names == ['reference_0.wav', 'reference_1.wav', 'sample_0.wav', 'sample_1.wav',
                   'spectrograms.png']
  y, rate = audio_io.read_wav(tmp_path / 'listen' / 'sample_1.wav')
  assert rate == 8000
  assert np.abs(y - samples[1, :, 0]).max() <= 0.5 / 32767 + 1e-7
  with Image.open(tmp_path / 'listen' / 'spectrograms.png') as img:
    width, height = img.size
  assert width > height > 100                                          # 2 rows of 2 panels
  with pytest.raises(ValueError, match=r'samples shape \(3, 512, 1\) != references shape '
                                       r'\(2, 512, 1\)'):
    audio_io.save_listening(tmp_path / 'x', samples, references[:2], CFG)
  with pytest.raises(ValueError, match=r'2 log-mels and 1 titles'):
    audio_io.save_spectrogram_png(tmp_path / 'x.png', np.zeros((2, 16, 24)), ['a'], CFG)
