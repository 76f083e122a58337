"""The `mel` config section: a waveform model conditioned on log-mel spectrograms (WaveGrad).

A vocoder run diffuses waveforms `[L, 1]` and conditions every example on the log-mel
spectrogram of its own clip (`features.log_mel`, `F = L / hop` frames), computed on the host as
an image-derived condition (`data.derived`): the loop, resume and multi-process reads see it like
a label, evaluation conditions sample i on held-out clip i's spectrogram, and the samples are
scored against the recorded clips (log-spectral distance, mel-cepstral distortion,
multi-resolution STFT distance; `metrics.audio`) with the real-data floor beside them where the
data has one (`synth_audio`: the distance between two independent renderings of the same
utterances, which is what a perfect model of p(waveform | mel) would score).

WaveGrad conditions its network on the continuous noise level sqrt(abar) (Chen et al. 2021,
§3.2) rather than on a step index; here that is the process's `alpha(t)`, handed to the model as
its `noise_level` function, so one network serves every inference schedule (`audio.schedules`).
For EDM-preconditioned kinds the network's time input is already a noise level (c_noise) and is
embedded as given.
"""

import functools
import math
import os

import numpy as np

from diffusion_jax import configuration
from diffusion_jax.audio import features
from diffusion_jax.data import derived

KEY = 'mel'


def mel_config(section) -> features.MelConfig:
  """The section as a checked `MelConfig`."""
  return configuration.from_section(features.MelConfig, 'mel', section).check()


def native_sample_rate(data) -> int:
  """The rate the configured audio data is recorded at (`data.sample_rate` if set)."""
  if data.sample_rate:
    return int(data.sample_rate)
  if data.name == 'synth_audio':
    from diffusion_jax.data import audio as audio_data  # pylint: disable=g-import-not-at-top
    return audio_data.SAMPLE_RATE
  from diffusion_jax.data import tfds_audio  # pylint: disable=g-import-not-at-top
  if data.name not in tfds_audio.PRESETS:
    raise ValueError(f"config.data.sample_rate: data.name={data.name!r} records no sample "
                     f'rate; set data.sample_rate')
  return int(tfds_audio.PRESETS[data.name].sample_rate)


def build_condition(section, model, image_shape, *, process=None, objective=None, data=None):
  """`(model, ImageCondition)` for `config.mel`: checks the spectrogram against the data and the
  model, and gives the model the process's noise level `alpha(t)` = sqrt(abar)."""
  cfg = mel_config(section)
  image_shape = tuple(image_shape)
  if len(image_shape) != 2 or image_shape[1] != 1:
    raise ValueError(f'config.mel: a mel-conditioned model diffuses waveforms [L, 1]; the data '
                     f'has examples of shape {list(image_shape)}')
  features.num_frames(image_shape[0], cfg.hop)
  if data is not None:
    from diffusion_jax.data import sources  # pylint: disable=g-import-not-at-top
    if data.name not in sources.AUDIO_DATASETS:
      raise ValueError(f'config.mel: data.name={data.name!r} is not audio; choose from '
                       f'{list(sources.AUDIO_DATASETS)}')
    rate = native_sample_rate(data)
    if rate != cfg.sample_rate:
      raise ValueError(f'config.mel.sample_rate={cfg.sample_rate} does not match the data '
                       f'({data.name} at {rate} Hz; nothing is resampled)')
  n_mels, factors = getattr(model, 'n_mels', None), getattr(model, 'factors', None)
  if n_mels is None or factors is None:
    raise ValueError(f'config.mel: model {type(model).__name__} takes no spectrogram; use '
                     f"model.name='wavegrad'")
  if n_mels != cfg.n_mels:
    raise ValueError(f'config.model.n_mels={n_mels} does not match config.mel.n_mels='
                     f'{cfg.n_mels}')
  if math.prod(factors) != cfg.hop:
    raise ValueError(f'config.model.factors={list(factors)} upsample by {math.prod(factors)}, '
                     f'not by the spectrogram hop config.mel.hop={cfg.hop}')
  kind = getattr(objective, 'kind', None)
  if process is not None and kind not in ('edm', 'consistency'):
    model = model.clone(noise_level=process.alpha)
  condition = derived.ImageCondition(
      key=KEY, fn=functools.partial(_log_mel, cfg), rank=2,
      reference_metrics=functools.partial(reference_metrics, cfg, data),
      save=functools.partial(save_listening, cfg))
  return model, condition


def _log_mel(cfg: features.MelConfig, waveforms) -> np.ndarray:
  """Host numpy (the data pipeline's side; the same code as the jitted `features.log_mel`)."""
  return np.asarray(features.log_mel_numpy(np.asarray(waveforms, np.float32), cfg), np.float32)


def reference_metrics(cfg: features.MelConfig, data, samples, references) -> dict:
  """LSD, MCD and MR-STFT of `samples` against the clips their spectrograms came from, and for
  `synth_audio` the same numbers for a second, independent rendering of those clips (`_floor`)
  and the ratios to it (`_ratio`)."""
  from diffusion_jax.metrics import audio as audio_metrics  # pylint: disable=g-import-not-at-top
  out = {k: float(v) for k, v in audio_metrics.audio_metrics(samples, references, cfg).items()}
  floor = floor_metrics(cfg, data, len(references)) if data is not None else None
  if floor:
    for k, v in floor.items():
      out[f'{k}_floor'] = v
      out[f'{k}_ratio'] = out[k] / v if v > 0 else float('inf')
  return out


def floor_metrics(cfg: features.MelConfig, data, num: int) -> dict | None:
  """The real-data floor of the first `num` held-out conditions (test clip `i % N`): take 1 of
  each clip scored against take 0, or None where the data has no second take."""
  if data.name != 'synth_audio':
    return None
  from diffusion_jax.data import audio as audio_data  # pylint: disable=g-import-not-at-top
  from diffusion_jax.metrics import audio as audio_metrics  # pylint: disable=g-import-not-at-top
  take0, _ = audio_data.synth_clips('test', take=0)
  take1, _ = audio_data.synth_clips('test', take=1)
  idx = np.arange(num) % len(take0)
  return {k: float(v) for k, v in audio_metrics.audio_metrics(take1[idx], take0[idx],
                                                               cfg).items()}


def save_listening(cfg: features.MelConfig, directory: str, samples, references) -> None:
  """WAV files of samples and their references, and their spectrograms as one PNG
  (`audio.io.save_listening`), under `directory/audio`."""
  from diffusion_jax.audio import io as audio_io  # pylint: disable=g-import-not-at-top
  if references is None:
    references = np.zeros_like(samples)
  audio_io.save_listening(os.path.join(directory, 'audio'), np.asarray(samples),
                          np.asarray(references), cfg, num=len(samples))
