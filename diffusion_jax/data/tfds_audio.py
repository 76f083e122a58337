"""TFDS audio datasets by index, with the data order a pure function of (seed, step).

As `data/tfds_images.py`: `tfds.data_source` gives random access to an ArrayRecord-prepared
split, so a batch reads only its own examples (the split is never loaded whole when the source
opens). Each example's int16 waveform becomes float32 `x / 32768` in [-1, 1), centre-cropped or
zero-padded to `clip_length` samples, shaped `[clip_length, 1]` like the embedded corpus.

Nothing is resampled: a run that asks for another sample rate than the dataset's is refused.
Every example read passes `audio.check_clip` (not silent, not clipped), or the read fails with
the split and index named.

TFDS's `Audio` feature needs TensorFlow to be described at all (even to read prepared data), so
reading these datasets needs TensorFlow installed beside this project (its tests replace
`tfds.data_source` by a fake with the same interface).
"""

import dataclasses

import numpy as np

from diffusion_jax.data import audio
from diffusion_jax.data import sampler as data_sampler
from diffusion_jax.data import tfds_images


@dataclasses.dataclass(frozen=True)
class AudioPreset:
  tfds_name: str
  sample_rate: int                 # Hz, as recorded
  num_classes: int
  clip_length: int                 # default samples per clip
  audio_key: str = 'audio'
  label_key: str | None = 'label'  # None: unlabelled


PRESETS = {
    # Warden 2018: 1 s int16 clips at 16 kHz (a few are shorter); 10 words, silence, unknown.
    'speech_commands': AudioPreset('speech_commands', 16000, 12, 16000),
}


def crop_or_pad(audio_samples, length: int) -> np.ndarray:
  """float32 `[length]`: the int16 samples `/ 32768`, the centre `length` of them (the first
  dropped sample is `(n - length) // 2`), or all of them zero-padded by `(length - n) // 2` on
  the left and the rest on the right."""
  x = np.asarray(audio_samples)
  if x.ndim == 2 and x.shape[1] == 1:
    x = x[:, 0]
  if x.ndim != 1:
    raise ValueError(f'tfds_audio: expected mono samples [n] or [n, 1]; got shape {x.shape}')
  x = x.astype(np.float32) / 32768.0
  n = len(x)
  if n >= length:
    start = (n - length) // 2
    return x[start:start + length]
  left = (length - n) // 2
  return np.pad(x, (left, length - n - left))


class AudioSource:
  """Random-access waveforms (and labels) of one TFDS split: the `sources.ArraySource`
  interface (`image_shape = (clip_length, 1)`, `num_classes`, `sample_rate`, `len`, `batch`,
  `examples`, `example`)."""

  def __init__(self, preset: AudioPreset | str, split: str = 'train', data_dir: str | None = None,
               clip_length: int = 0, sample_rate: int = 0):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if isinstance(preset, str):
      if preset not in PRESETS:
        raise ValueError(f'tfds_audio: unknown preset {preset!r}; choose from {sorted(PRESETS)} '
                         f'or pass an AudioPreset(tfds_name, sample_rate, ...)')
      preset = PRESETS[preset]
    if sample_rate not in (0, preset.sample_rate):
      raise ValueError(f'config.data.sample_rate={sample_rate}: {preset.tfds_name} is recorded '
                       f'at {preset.sample_rate} Hz (nothing is resampled)')
    if clip_length < 0:
      raise ValueError(f'config.data.clip_length={clip_length}: must be >= 0 (0 = '
                       f'{preset.clip_length}, the dataset\'s own)')
    self.preset, self.split = preset, split
    self.sample_rate = preset.sample_rate
    self.num_classes = preset.num_classes
    self.clip_length = clip_length or preset.clip_length
    self.image_shape = (self.clip_length, 1)
    try:
      self._source = tfds.data_source(preset.tfds_name, split=split, data_dir=data_dir,
                                      download=False)
      self._len = len(self._source)
    except Exception as e:  # noqa: BLE001  (tfds raises many types; all mean "not readable")
      raise ValueError(tfds_images._prepare_hint(preset.tfds_name, data_dir)  # pylint: disable=protected-access
                       + f'; reading TFDS audio needs TensorFlow installed here too '
                       f'({type(e).__name__})') from None
    first = self._source[0]
    for key in (preset.audio_key, preset.label_key):
      if key is not None and key not in first:
        raise ValueError(f'tfds_audio: {preset.tfds_name!r} examples have no key {key!r}; '
                         f'they have {sorted(first)}')
    self._images = None

  def __len__(self) -> int:
    return self._len

  def example(self, index: int, seed: int = 0, position: int = 0) -> dict:
    """The example at dataset `index`, from one read of the source (no per-example randomness:
    `seed` and `position` are unused)."""
    del seed, position
    raw = self._source[int(index)]
    x = crop_or_pad(raw[self.preset.audio_key], self.clip_length)
    audio.check_clip(x, f'{self.preset.tfds_name} {self.split} example {int(index)}')
    out = {'image': x[:, None]}
    if self.preset.label_key is not None:
      out['label'] = np.int32(raw[self.preset.label_key])
    return out

  def examples(self, indices, seed: int = 0, positions=None) -> dict:
    """The examples at dataset `indices`, stacked."""
    return tfds_images.stack_examples(self, indices, seed, positions)

  def batch(self, seed: int, step: int, global_batch: int, process_index: int = 0,
            process_count: int = 1) -> dict:
    """This process's rows of global batch `step` (`data.sampler.batch_rows`): a pure function
    of its arguments."""
    idx, positions = data_sampler.batch_rows(seed, step, global_batch, len(self),
                                             process_index, process_count)
    return self.examples(idx, seed=seed, positions=positions)

  @property
  def images(self) -> np.ndarray:
    """The whole split `[N, clip_length, 1]`, read once and kept (for held-out conditions and
    reference metrics; speech_commands' test split is 4,890 clips, 313 MB at 16000 samples)."""
    if self._images is None:
      self._images = self.examples(np.arange(len(self)))['image']
    return self._images
