"""Distances between generated and reference waveforms: log-spectral distance, mel cepstral
distortion, multi-resolution STFT distance. Host numpy in float64, one value per clip `[N]`.

`x` is the generated clip and `y` its reference (e.g. the vocoder's output and the recording
whose log-mel conditioned it); both `[N, L, 1]` or `[N, L]`, in [-1, 1].
"""

import numpy as np

from diffusion_jax.audio import features

LSD_EPS = 1e-10        # added to |X|^2 before 10 log10 (silent frames stay finite)
MR_STFT_FLOOR = 1e-7   # |X| floor before the log in the magnitude term
DEFAULT_RESOLUTIONS = ((128, 32), (256, 64), (512, 128))   # (n_fft, hop)


def _pair(x, y, name: str):
  """`x`, `y` as float64 `[N, L]`; a one-line error naming both shapes on a mismatch."""
  xa, ya = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if xa.shape != ya.shape:
    raise ValueError(f'{name}: generated shape {xa.shape} != reference shape {ya.shape}')
  if xa.ndim == 3 and xa.shape[-1] == 1:
    xa, ya = xa[..., 0], ya[..., 0]
  if xa.ndim != 2 or xa.shape[0] < 1:
    raise ValueError(f'{name}: clips must be [N, L, 1] or [N, L] with N >= 1, got shape '
                     f'{np.shape(x)}')
  if not (np.isfinite(xa).all() and np.isfinite(ya).all()):
    raise ValueError(f'{name}: clips hold non-finite values (NaN or inf)')
  return xa, ya


def log_spectral_distance(x, y, n_fft: int = 256, hop: int = 64) -> np.ndarray:
  """LSD in dB `[N]`: the mean over frames of
  `sqrt(mean_k (10 log10(|X_fk|^2 + eps) - 10 log10(|Y_fk|^2 + eps))^2)`, `eps = 1e-10`
  (Gray & Markel 1976; the form used for speech super-resolution, e.g. Kuleshov et al. 2017)."""
  x, y = _pair(x, y, 'log_spectral_distance')
  px = 10.0 * np.log10(np.abs(features.stft_numpy(x, n_fft, hop)) ** 2 + LSD_EPS)   # [N, F, K]
  py = 10.0 * np.log10(np.abs(features.stft_numpy(y, n_fft, hop)) ** 2 + LSD_EPS)
  return np.sqrt(np.mean((px - py) ** 2, axis=-1)).mean(axis=-1)


def mel_cepstral_distortion(x, y, cfg: features.MelConfig, n_mfcc: int = 13) -> np.ndarray:
  """MCD in dB `[N]` (Kubichek 1993): per frame
  `(10 / ln 10) sqrt(2 sum_{k=1}^{n_mfcc-1} (c_k - c'_k)^2)`, averaged over frames, where `c`
  are the orthonormal-DCT cepstra of the natural-log mel spectrum (`features.mfcc`). `c_0`
  (overall level) is excluded, so a gain change alone costs nothing."""
  x, y = _pair(x, y, 'mel_cepstral_distortion')
  if not 2 <= n_mfcc <= cfg.n_mels:
    raise ValueError(f'mel_cepstral_distortion: n_mfcc={n_mfcc} must be in [2, mel.n_mels='
                     f'{cfg.n_mels}]')
  cx = features.mfcc_numpy(features.log_mel_numpy(x, cfg), n_mfcc)[..., 1:]          # [N, F, n-1]
  cy = features.mfcc_numpy(features.log_mel_numpy(y, cfg), n_mfcc)[..., 1:]
  per_frame = 10.0 / np.log(10.0) * np.sqrt(2.0 * np.sum((cx - cy) ** 2, axis=-1))
  return per_frame.mean(axis=-1)


def mr_stft_distance(x, y, resolutions=DEFAULT_RESOLUTIONS) -> np.ndarray:
  """Multi-resolution STFT distance `[N]` (Yamamoto et al. 2020, Parallel WaveGAN, Eq. 1-3):
  per `(n_fft, hop)` the spectral convergence `|| |Y| - |X| ||_F / || |Y| ||_F` plus the log
  magnitude distance `mean | log|Y| - log|X| |` (magnitudes floored at 1e-7), averaged over
  the resolutions. A silent reference clip (zero `|| |Y| ||_F`) is an error."""
  x, y = _pair(x, y, 'mr_stft_distance')
  if not resolutions:
    raise ValueError('mr_stft_distance: resolutions is empty')
  total = np.zeros(x.shape[0])
  for n_fft, hop in resolutions:
    mx = np.abs(features.stft_numpy(x, n_fft, hop))                                  # [N, F, K]
    my = np.abs(features.stft_numpy(y, n_fft, hop))
    norm_y = np.sqrt(np.sum(my ** 2, axis=(1, 2)))
    if (norm_y == 0).any():
      raise ValueError(f'mr_stft_distance: reference clip {int(np.argmin(norm_y))} is silent '
                       '(spectral convergence divides by its norm)')
    sc = np.sqrt(np.sum((my - mx) ** 2, axis=(1, 2))) / norm_y
    log_mag = np.mean(np.abs(np.log(np.maximum(my, MR_STFT_FLOOR))
                             - np.log(np.maximum(mx, MR_STFT_FLOOR))), axis=(1, 2))
    total += sc + log_mag
  return total / len(resolutions)


def audio_metrics(samples, references, cfg: features.MelConfig) -> dict:
  """Means over clips: `lsd` (dB, at `cfg.n_fft` / `cfg.hop`), `mcd` (dB, 13 cepstra, or
  `n_mels` if fewer) and `mr_stft` (default resolutions); `samples[i]` is compared with
  `references[i]`."""
  cfg.check()
  return {
      'lsd': float(log_spectral_distance(samples, references, cfg.n_fft, cfg.hop).mean()),
      'mcd': float(mel_cepstral_distortion(samples, references, cfg,
                                           min(13, cfg.n_mels)).mean()),
      'mr_stft': float(mr_stft_distance(samples, references).mean()),
  }
