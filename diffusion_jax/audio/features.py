"""Spectral features of waveforms: STFT, mel filterbank, log-mel spectrogram, MFCC.

Conventions (one place for all of them): a frame is `n_fft` samples (frame length = FFT size)
under a periodic Hann window `w[n] = 0.5 - 0.5 cos(2 pi n / n_fft)`; a waveform of `L` samples
gives exactly `F = L / hop` frames, which is what a vocoder upsampling by `hop` needs. The mel
scale is HTK's, `m = 2595 log10(1 + f / 700)` (Young et al., The HTK Book), with triangles
normalised to unit area as in Slaney's Auditory Toolbox (1998); the log-mel is
`log(max(|STFT| @ M, log_floor))` (natural log, magnitude, power 1), the conditioning of
WaveGrad (Chen et al. 2021) and of most neural vocoders.

The public functions are JAX (jit-able with `MelConfig` static, any leading batch axes); the
`*_numpy` twins run the same arithmetic on host numpy in float64, for metrics and file writers
that should not compile anything.
"""

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class MelConfig:
  """The `mel` config section: how waveforms become log-mel features."""
  sample_rate: int = 8000
  n_fft: int = 256         # frame length = FFT size, periodic Hann window
  hop: int = 64
  n_mels: int = 40
  fmin: float = 0.0
  fmax: float = 0.0        # 0: sample_rate / 2
  log_floor: float = 1e-5  # log(max(mel, log_floor))

  @property
  def f_max(self) -> float:
    """`fmax`, with 0 resolved to the Nyquist frequency `sample_rate / 2`."""
    return float(self.fmax) if self.fmax else self.sample_rate / 2

  def check(self) -> 'MelConfig':
    """Raises a one-line ValueError naming `mel.<field>=<value>` for an unusable setting."""
    for name in ('sample_rate', 'n_fft', 'hop', 'n_mels'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f'mel.{name}={value!r} must be a positive integer')
    if self.n_fft % 2:
      raise ValueError(f'mel.n_fft={self.n_fft} must be even')
    if self.hop > self.n_fft:
      raise ValueError(f'mel.hop={self.hop} must be <= mel.n_fft={self.n_fft} (frames would '
                       'skip samples)')
    nyquist = self.sample_rate / 2
    if self.fmax < 0 or self.f_max > nyquist:
      raise ValueError(f'mel.fmax={self.fmax} must be 0 (Nyquist) or in (fmin, {nyquist}] '
                       f'(sample_rate / 2)')
    if not 0 <= self.fmin < self.f_max:
      raise ValueError(f'mel.fmin={self.fmin} must satisfy 0 <= fmin < fmax={self.f_max}')
    if not self.log_floor > 0:
      raise ValueError(f'mel.log_floor={self.log_floor} must be > 0 (log of zero)')
    mel_filterbank(self.sample_rate, self.n_fft, self.n_mels, self.fmin, self.f_max)
    return self


def num_frames(num_samples: int, hop: int) -> int:
  """`F = num_samples / hop`: the frame count, which must be exact (no partial frame)."""
  if hop < 1:
    raise ValueError(f'mel.hop={hop} must be a positive integer')
  if num_samples % hop:
    raise ValueError(f'mel.hop={hop} does not divide the waveform length {num_samples} '
                     f'({num_samples} % {hop} = {num_samples % hop})')
  return num_samples // hop


def hann_window(n_fft: int) -> np.ndarray:
  """Periodic Hann window `w[n] = 0.5 - 0.5 cos(2 pi n / n_fft)`, `n = 0..n_fft-1` (float64)."""
  return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)


def _check_stft(num_samples: int, n_fft: int, hop: int) -> int:
  if n_fft < 2 or n_fft % 2:
    raise ValueError(f'stft: n_fft={n_fft} must be an even integer >= 2')
  if not 0 < hop <= n_fft:
    raise ValueError(f'stft: hop={hop} must be in (0, n_fft={n_fft}]')
  if num_samples < n_fft:
    raise ValueError(f'stft: waveform length {num_samples} is shorter than n_fft={n_fft}')
  return num_frames(num_samples, hop)


def _stft(xp, x, n_fft: int, hop: int, real_dtype):
  """`X[..., f, k] = sum_n pad(x)[f hop + n] w[n] exp(-2 pi i k n / n_fft)` with `xp` = jnp | np."""
  x = xp.asarray(x, real_dtype)
  frames_count = _check_stft(x.shape[-1], n_fft, hop)
  left = (n_fft - hop) // 2
  right = n_fft - hop - left
  padded = xp.pad(x, [(0, 0)] * (x.ndim - 1) + [(left, right)], mode='reflect')
  index = hop * np.arange(frames_count)[:, None] + np.arange(n_fft)[None, :]   # [F, n_fft]
  frames = padded[..., index] * xp.asarray(hann_window(n_fft), real_dtype)    # [..., F, n_fft]
  return xp.fft.rfft(frames, axis=-1)                                         # [..., F, K]


def stft(x, n_fft: int, hop: int):
  """Complex STFT `[..., F, n_fft // 2 + 1]` of waveforms `x` `[..., L]`, `F = L / hop`.

  `x` is reflect-padded by `p = (n_fft - hop) // 2` on the left and `n_fft - hop - p` on the
  right (frame `f` is then centred near samples `f hop .. (f + 1) hop`); frame `f` is
  `padded[f hop : f hop + n_fft] * w` and `X[f, k] = sum_n frame[n] exp(-2 pi i k n / n_fft)`.
  """
  return _stft(jnp, x, n_fft, hop, jnp.float32)


def stft_numpy(x, n_fft: int, hop: int) -> np.ndarray:
  """`stft` on host numpy in float64 (complex128)."""
  return _stft(np, x, n_fft, hop, np.float64)


def hz_to_mel(f):
  """HTK mel scale `m = 2595 log10(1 + f / 700)`."""
  return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def mel_to_hz(m):
  """Inverse of the HTK mel scale, `f = 700 (10^(m / 2595) - 1)`."""
  return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=32)
def _filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float):
  edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))   # f_0..f_{M+1}
  freqs = np.arange(n_fft // 2 + 1) * sample_rate / n_fft                          # [K]
  lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]                                 # [M] each
  rising = (freqs[:, None] - lo) / (mid - lo)
  falling = (hi - freqs[:, None]) / (hi - mid)
  weights = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (hi - lo))      # [K, M]
  empty = np.flatnonzero(weights.max(axis=0) <= 0)
  if empty.size:
    m = int(empty[0])
    raise ValueError(f'mel.n_mels={n_mels}: mel filter {m} ({lo[m]:.1f}-{hi[m]:.1f} Hz) holds no '
                     f'FFT bin (bin spacing {sample_rate / n_fft:.2f} Hz); use fewer mels or a '
                     'larger n_fft')
  weights.setflags(write=False)
  return weights


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float,
                   fmax: float) -> np.ndarray:
  """Mel filter matrix `M` `[n_fft // 2 + 1, n_mels]` (float64) so that `mel = |X| @ M`.

  `n_mels + 2` points `f_0 < ... < f_{n_mels+1}` equally spaced in HTK mel between `fmin` and
  `fmax`; filter `m` is the triangle rising from `f_m` to 1 at `f_{m+1}` and falling to 0 at
  `f_{m+2}`, scaled by `2 / (f_{m+2} - f_m)` (Slaney: unit area in Hz), sampled at the FFT bin
  frequencies `k sample_rate / n_fft`. A filter that covers no bin is an error, not a dead channel.
  """
  if not 0 <= fmin < fmax <= sample_rate / 2:
    raise ValueError(f'mel_filterbank: need 0 <= fmin < fmax <= sample_rate / 2, got fmin={fmin}, '
                     f'fmax={fmax}, sample_rate={sample_rate}')
  if n_mels < 1 or n_fft < 2:
    raise ValueError(f'mel_filterbank: need n_mels >= 1 and n_fft >= 2, got n_mels={n_mels}, '
                     f'n_fft={n_fft}')
  return _filterbank(int(sample_rate), int(n_fft), int(n_mels), float(fmin), float(fmax)).copy()


def _mel(xp, x, cfg: MelConfig, real_dtype):
  cfg.check()
  fb = _filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, float(cfg.fmin), cfg.f_max)
  return xp.abs(_stft(xp, x, cfg.n_fft, cfg.hop, real_dtype)) @ xp.asarray(fb, real_dtype)


def mel_spectrogram(x, cfg: MelConfig):
  """Mel spectrogram `|STFT(x)| @ M` `[..., F, n_mels]` (magnitude, power 1) of `x` `[..., L]`."""
  return _mel(jnp, x, cfg, jnp.float32)


def _waveforms(waveforms):
  shape = np.shape(waveforms)
  if len(shape) == 3 and shape[-1] == 1:
    return waveforms[..., 0]
  if len(shape) == 2:
    return waveforms
  raise ValueError(f'log_mel: waveforms must be [N, L, 1] or [N, L], got shape {tuple(shape)}')


def log_mel(waveforms, cfg: MelConfig):
  """Log-mel features `log(max(|STFT| @ M, log_floor))` `[N, F, n_mels]` of `[N, L, 1]` (or
  `[N, L]`) waveforms; jit with `cfg` static, e.g. `jax.jit(log_mel, static_argnums=1)`."""
  return jnp.log(jnp.maximum(_mel(jnp, _waveforms(waveforms), cfg, jnp.float32), cfg.log_floor))


def log_mel_numpy(waveforms, cfg: MelConfig) -> np.ndarray:
  """`log_mel` on host numpy in float64."""
  x = _waveforms(np.asarray(waveforms))
  return np.log(np.maximum(_mel(np, x, cfg, np.float64), cfg.log_floor))


def dct_matrix(num_mels: int, n: int) -> np.ndarray:
  """Orthonormal DCT-II basis `[num_mels, n]`: `D[m, k] = s_k cos(pi k (2 m + 1) / (2 M))`,
  `s_0 = sqrt(1 / M)`, `s_k = sqrt(2 / M)` (the first `n` columns of an orthogonal matrix)."""
  if not 1 <= n <= num_mels:
    raise ValueError(f'mfcc: n={n} coefficients must be in [1, n_mels={num_mels}]')
  m, k = np.arange(num_mels)[:, None], np.arange(n)[None, :]
  scale = np.where(k == 0, np.sqrt(1.0 / num_mels), np.sqrt(2.0 / num_mels))
  return scale * np.cos(np.pi * k * (2 * m + 1) / (2 * num_mels))


def mfcc(log_mels, n: int):
  """Mel-frequency cepstral coefficients `[..., F, n]`: orthonormal DCT-II of `log_mels`
  `[..., F, n_mels]` over the mel axis, `c_k = sum_m log_mel_m D[m, k]` (`dct_matrix`)."""
  log_mels = jnp.asarray(log_mels)
  return log_mels @ jnp.asarray(dct_matrix(log_mels.shape[-1], n), log_mels.dtype)


def mfcc_numpy(log_mels, n: int) -> np.ndarray:
  """`mfcc` on host numpy in float64."""
  log_mels = np.asarray(log_mels, np.float64)
  return log_mels @ dct_matrix(log_mels.shape[-1], n)
