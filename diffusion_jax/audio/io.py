"""Audio files: mono 16-bit PCM WAV (stdlib `wave`), log-mel spectrogram PNGs, and a listening
folder (generated and reference clips side by side) that a person plays instead of reading numbers.

Samples map to PCM as `round(32767 x)` after clipping to [-1, 1], and back as `pcm / 32767`
(the one PCM value outside, -32768, reads as -1), so a round trip is exact to 1 / 32767.
"""

import os
import wave

import numpy as np

from diffusion_jax.audio import features

PCM_SCALE = 32767.0


def _mono(x, where: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim == 2 and x.shape[-1] == 1:
    x = x[:, 0]
  if x.ndim != 1 or x.size == 0:
    raise ValueError(f'{where}: waveform must be [L] or [L, 1] with L >= 1, got shape '
                     f'{np.shape(x)}')
  if not np.isfinite(x).all():
    raise ValueError(f'{where}: waveform holds non-finite values (NaN or inf)')
  return x


def write_wav(path, x, sample_rate: int) -> None:
  """Writes `x` `[L]` or `[L, 1]` (clipped to [-1, 1]) to `path` as mono 16-bit PCM, atomically."""
  if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) \
      or sample_rate < 1:
    raise ValueError(f'write_wav: sample_rate={sample_rate!r} must be a positive integer')
  pcm = np.round(np.clip(_mono(x, f'write_wav({os.fspath(path)})'), -1.0, 1.0) * PCM_SCALE)
  tmp = f'{os.fspath(path)}.tmp'
  with wave.open(tmp, 'wb') as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(int(sample_rate))
    f.writeframes(pcm.astype('<i2').tobytes())
  os.replace(tmp, path)


def read_wav(path) -> tuple[np.ndarray, int]:
  """`(x, sample_rate)`: float32 `x` `[L]` in [-1, 1] from a mono 16-bit PCM WAV file."""
  try:
    with wave.open(os.fspath(path), 'rb') as f:
      channels, width, rate = f.getnchannels(), f.getsampwidth(), f.getframerate()
      data = f.readframes(f.getnframes())
  except (OSError, EOFError, wave.Error) as e:
    raise ValueError(f'read_wav: {os.fspath(path)} is not a readable WAV file '
                     f'({type(e).__name__}: {e})') from e
  if channels != 1:
    raise ValueError(f'read_wav: {os.fspath(path)} has {channels} channels; only mono is read')
  if width != 2:
    raise ValueError(f'read_wav: {os.fspath(path)} holds {8 * width}-bit samples; only 16-bit '
                     'PCM is read')
  pcm = np.frombuffer(data, '<i2').astype(np.float32)
  return np.maximum(pcm / np.float32(PCM_SCALE), np.float32(-1.0)), rate


def save_spectrogram_png(path, log_mels, titles, cfg: features.MelConfig,
                         ncols: int = 1) -> None:
  """One panel per log-mel `[F, n_mels]` (time in seconds across, mel bin up, one shared colour
  scale), `ncols` panels per row in the order given, titled by `titles`; written atomically."""
  panels = [np.asarray(m, np.float64) for m in log_mels]
  titles = list(titles)
  if not panels or len(titles) != len(panels):
    raise ValueError(f'save_spectrogram_png: {len(panels)} log-mels and {len(titles)} titles '
                     '(need as many titles as panels, at least one)')
  for m in panels:
    if m.ndim != 2 or m.shape[1] != cfg.n_mels:
      raise ValueError(f'save_spectrogram_png: a log-mel must be [F, mel.n_mels={cfg.n_mels}], '
                       f'got shape {m.shape}')
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  ncols = max(1, min(ncols, len(panels)))
  nrows = -(-len(panels) // ncols)
  lo = min(m.min() for m in panels)
  hi = max(max(m.max() for m in panels), lo + 1e-6)
  fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.0 * nrows), dpi=100,
                           squeeze=False)
  for ax in axes.ravel()[len(panels):]:
    ax.axis('off')
  for ax, m, title in zip(axes.ravel()[:len(panels)], panels, titles, strict=True):
    seconds = m.shape[0] * cfg.hop / cfg.sample_rate
    ax.imshow(m.T, origin='lower', aspect='auto', cmap='magma', vmin=lo, vmax=hi,
              extent=(0.0, seconds, 0, cfg.n_mels))
    ax.set_title(title, fontsize=8)
    ax.set_xlabel('time (s)', fontsize=7)
    ax.set_ylabel('mel bin', fontsize=7)
    ax.tick_params(labelsize=6)
  fig.tight_layout()
  tmp = f'{os.fspath(path)}.tmp'
  fig.savefig(tmp, format='png')
  plt.close(fig)
  os.replace(tmp, path)


def save_listening(directory, samples, references, cfg: features.MelConfig,
                   num: int = 8) -> list[str]:
  """Writes `sample_<i>.wav`, `reference_<i>.wav` for `i < num` and `spectrograms.png`
  (reference | sample per row) into `directory`; returns the paths written."""
  samples, references = np.asarray(samples), np.asarray(references)
  if samples.shape != references.shape:
    raise ValueError(f'save_listening: samples shape {samples.shape} != references shape '
                     f'{references.shape}')
  if samples.ndim not in (2, 3) or (samples.ndim == 3 and samples.shape[-1] != 1):
    raise ValueError(f'save_listening: clips must be [N, L, 1] or [N, L], got shape '
                     f'{samples.shape}')
  if num < 1:
    raise ValueError(f'save_listening: num={num} must be >= 1')
  num = min(num, samples.shape[0])
  os.makedirs(directory, exist_ok=True)
  paths, titles = [], []
  for i in range(num):
    for name, clip in (('reference', references[i]), ('sample', samples[i])):
      path = os.path.join(directory, f'{name}_{i}.wav')
      write_wav(path, clip, cfg.sample_rate)
      paths.append(path)
      titles.append(f'{name} {i}')
  both = np.stack([references[:num], samples[:num]], axis=1).reshape(2 * num, -1)
  mels = features.log_mel_numpy(both, cfg)                                   # [2 num, F, M]
  png = os.path.join(directory, 'spectrograms.png')
  save_spectrogram_png(png, mels, titles, cfg, ncols=2)
  return paths + [png]
