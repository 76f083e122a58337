"""TFDS audio datasets by index, with the data order a pure function of (seed, step).

As `data/tfds_images.py`: `tfds.data_source` gives random access to an ArrayRecord-prepared
split, so a batch reads only its own examples (the split is never loaded whole when the source
opens). Each example's waveform becomes float32 in [-1, 1] (int16 samples `x / 32768`, float
samples as they are), centre-cropped or zero-padded to `clip_length` samples, shaped
`[clip_length, 1]` like the embedded corpus.

Two ways in:

* a preset (`PRESETS`: speech_commands). Its audio is a TFDS `Audio` feature, and TFDS needs
  TensorFlow to describe an `Audio` feature at all (even to read prepared data: `tfds.data_source`
  fails with `ModuleNotFoundError: tensorflow`), so reading it needs TensorFlow installed beside
  this project, which does not install it.
* `data.name='tfds_audio'` (`config_preset`): any ArrayRecord-prepared TFDS dataset whose
  'audio' is a `tfds.features.Tensor` of int16 (or float) samples `[n]` (e.g. your own
  `GeneratorBasedBuilder` prepared with `file_format='array_record'`); TFDS reads such data
  without TensorFlow. A Tensor stores no sample rate, so the config gives it
  (`data.sample_rate`), and the clip length (`data.clip_length`); `data.label_key` ('' =
  unlabelled) and `data.num_classes` (0 = the label's `ClassLabel` count) as for TFDS images.

Nothing is resampled: a run that asks for another sample rate than the dataset's is refused.
Every example read passes `audio.check_clip` (not silent, not clipped) and has a label in
`[0, num_classes)`, or the read fails with the split and index named.
"""

import dataclasses
import os

import numpy as np

from diffusion_jax.data import audio
from diffusion_jax.data import sampler as data_sampler
from diffusion_jax.data import tfds_images


@dataclasses.dataclass(frozen=True)
class AudioPreset:
  tfds_name: str
  sample_rate: int                 # Hz, as recorded
  num_classes: int                 # 0: the label feature's ClassLabel count
  clip_length: int                 # default samples per clip
  audio_key: str = 'audio'
  label_key: str | None = 'label'  # None: unlabelled


PRESETS = {
    # Warden 2018: 1 s int16 clips at 16 kHz (a few are shorter); 10 words, silence, unknown.
    'speech_commands': AudioPreset('speech_commands', 16000, 12, 16000),
}


def config_preset(cfg) -> AudioPreset:
  """The `AudioPreset` of `data.name='tfds_audio'` (`cfg` a `sources.DataConfig`): the dataset
  `cfg.tfds_name`, its 'audio' key, `cfg.label_key` ('' = unlabelled), `cfg.num_classes`, and the
  required `cfg.sample_rate` and `cfg.clip_length`."""
  if not cfg.tfds_name:
    raise ValueError("config.data.tfds_name: data.name='tfds_audio' needs the TFDS dataset's name")
  if cfg.sample_rate <= 0:
    raise ValueError(f"config.data.sample_rate={cfg.sample_rate}: data.name='tfds_audio' needs "
                     f'the rate {cfg.tfds_name!r} was recorded at (TFDS stores none for a Tensor)')
  if cfg.clip_length <= 0:
    raise ValueError(f"config.data.clip_length={cfg.clip_length}: data.name='tfds_audio' needs "
                     f'the samples per clip (clips are centre-cropped or zero-padded to it)')
  if cfg.num_classes < 0:
    raise ValueError(f'config.data.num_classes={cfg.num_classes}: must be >= 0 (0 = the '
                     f'ClassLabel count of {cfg.label_key!r})')
  return AudioPreset(cfg.tfds_name, cfg.sample_rate, cfg.num_classes, cfg.clip_length,
                     label_key=cfg.label_key or None)


def crop_or_pad(audio_samples, length: int) -> np.ndarray:
  """float32 `[length]`: the samples in [-1, 1] (int16 `/ 32768`, float as they are), the centre
  `length` of them (the first dropped sample is `(n - length) // 2`), or all of them zero-padded
  by `(length - n) // 2` on the left and the rest on the right."""
  x = np.asarray(audio_samples)
  if x.ndim == 2 and x.shape[1] == 1:
    x = x[:, 0]
  if x.ndim != 1:
    raise ValueError(f'tfds_audio: expected mono samples [n] or [n, 1]; got shape {x.shape}')
  if x.dtype == np.int16:
    x = x.astype(np.float32) / 32768.0
  elif np.issubdtype(x.dtype, np.floating):
    x = x.astype(np.float32)
    if x.size and np.max(np.abs(x)) > 1:
      raise ValueError(f'tfds_audio: float samples must lie in [-1, 1]; got a peak of '
                       f'{float(np.max(np.abs(x))):.3g}')
  else:
    raise ValueError(f'tfds_audio: samples must be int16 or float; got {x.dtype}')
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
    if data_dir and not os.path.isdir(data_dir):
      raise ValueError(f'config.data.data_dir={data_dir}: no such directory (the folder that '
                       f'holds the prepared TFDS data)')
    self.preset, self.split = preset, split
    self.sample_rate = preset.sample_rate
    self.clip_length = clip_length or preset.clip_length
    self.image_shape = (self.clip_length, 1)
    try:
      self._source = tfds.data_source(preset.tfds_name, split=split, data_dir=data_dir,
                                      download=False)
      self._len = len(self._source)
    except ModuleNotFoundError as e:
      raise ValueError(f'tfds_audio: {preset.tfds_name!r} needs {e.name or "TensorFlow"} to be '
                       f'read (TFDS describes an Audio feature only with TensorFlow): install '
                       f'tensorflow-cpu here, or prepare the data with its audio as a '
                       f"tfds.features.Tensor of int16 samples and read it as data.name="
                       f"'tfds_audio'") from None
    except Exception as e:  # noqa: BLE001  (tfds raises many types; all mean "not readable")
      reason = (str(e).strip().splitlines() or [''])[0][:200]
      raise ValueError(tfds_images._prepare_hint(preset.tfds_name, data_dir)  # pylint: disable=protected-access
                       + f' (split {split!r}: {type(e).__name__}: {reason})') from None
    if not self._len:
      raise ValueError(f'tfds_audio: {preset.tfds_name!r} split {split!r} is empty')
    first = self._source[0]
    for key in (preset.audio_key, preset.label_key):
      if key is not None and key not in first:
        raise ValueError(f'tfds_audio: {preset.tfds_name!r} examples have no key {key!r}; '
                         f'they have {sorted(first)}')
    self.num_classes = self._num_classes()
    self._images = None

  def __len__(self) -> int:
    return self._len

  def _num_classes(self) -> int:
    """The preset's class count, checked against (or, when 0, read from) the label's ClassLabel
    in the prepared dataset's features; 0 for unlabelled data."""
    key = self.preset.label_key
    if key is None:
      return 0
    info = getattr(self._source, 'dataset_info', None)
    features = getattr(info, 'features', None)
    stored = None
    if features is not None and key in features.keys():
      stored = getattr(features[key], 'num_classes', None)
    wanted = self.preset.num_classes
    if wanted and stored not in (None, wanted):
      raise ValueError(f'config.data.num_classes={wanted}: {self.preset.tfds_name!r} label '
                       f'{key!r} is a ClassLabel of {stored} classes')
    if not (wanted or stored):
      raise ValueError(f'config.data.num_classes=0: {self.preset.tfds_name!r} label {key!r} is '
                       f'not a ClassLabel; give data.num_classes (or data.label_key=\'\')')
    return int(wanted or stored)

  def example(self, index: int, seed: int = 0, position: int = 0) -> dict:
    """The example at dataset `index`, from one read of the source (no per-example randomness:
    `seed` and `position` are unused)."""
    del seed, position
    raw = self._source[int(index)]
    x = crop_or_pad(raw[self.preset.audio_key], self.clip_length)
    audio.check_clip(x, f'{self.preset.tfds_name} {self.split} example {int(index)}')
    out = {'image': x[:, None]}
    if self.preset.label_key is not None:
      label = int(raw[self.preset.label_key])
      if not 0 <= label < self.num_classes:
        raise ValueError(f'{self.preset.tfds_name} {self.split} example {int(index)}: label '
                         f'{label} outside 0..{self.num_classes - 1} (data.num_classes)')
      out['label'] = np.int32(label)
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
