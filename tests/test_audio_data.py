"""Audio data: the embedded synthetic corpus (determinism, balance, every clip valid and
speech-like, takes 0 and 1 the same content in fresh draws) and the TFDS audio sources.

Which TFDS path is real and which is faked:

* `data.name='tfds_audio'` is tested for real: a module fixture prepares a tiny ArrayRecord
  dataset on disk with TFDS's own `GeneratorBasedBuilder` (audio a `tfds.features.Tensor` of
  int16 samples, 'label' a `ClassLabel`), and the source reads it back through
  `tfds.data_source`, all without TensorFlow.
* speech_commands is faked: its audio is a TFDS `Audio` feature, which TFDS cannot even describe
  without TensorFlow (this project does not install it): `tfds.testing.mock_data` and
  `tfds.data_source` both fail with `ModuleNotFoundError: tensorflow`. Those tests replace
  `tfds.data_source` by an in-memory list of examples with the same interface, so crop / pad,
  batches and errors are checked against int16 samples written in the test.
"""

import json
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion_jax.data import audio
from diffusion_jax.data import sources
from diffusion_jax.data import tfds_audio
from tests.error_testing import assert_one_line_error

FS = 8000


def _log_band_spectrogram(x, n_fft=256, hop=64, bands=16):
  """`[N, F, bands]`: log power of `[N, L]` pooled into `bands` equal bands (250 Hz at 8 kHz),
  from periodic Hann frames every `hop` samples; a coarse stand-in for a log-mel spectrogram,
  written directly (not through the library's features)."""
  window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
  starts = np.arange(0, x.shape[1] - n_fft + 1, hop)
  frames = x[:, starts[:, None] + np.arange(n_fft)] * window
  power = np.abs(np.fft.rfft(frames, axis=-1)[..., 1:]) ** 2                   # drop DC
  return np.log(power.reshape(*power.shape[:2], bands, -1).sum(-1) + 1e-4)


def test_corpus_shapes_labels_and_determinism():
  x, y = audio.synth_clips('train')
  assert x.shape == (512, 4096, 1) and x.dtype == np.float32 and y.dtype == np.int32
  assert not x.flags.writeable and not y.flags.writeable          # the cached arrays are shared
  assert audio.synth_clips('train') [0] is x                       # cached per process
  np.testing.assert_array_equal(np.bincount(y), [103, 103, 102, 102, 102])   # 512 = 5 * 102 + 2
  xt, yt = audio.synth_clips('test')
  assert xt.shape == (128, 4096, 1) and np.bincount(yt).tolist() == [26, 26, 26, 25, 25]
  again, labels = audio.synth_clips.__wrapped__('test')            # rendered afresh
  np.testing.assert_array_equal(again, xt)
  np.testing.assert_array_equal(labels, yt)
  assert not np.array_equal(xt[:, :, 0], x[:128, :, 0])           # the splits differ


def test_every_clip_is_valid_bounded_and_framed_by_silence():
  x = np.concatenate([audio.synth_clips('train')[0], audio.synth_clips('test')[0],
                      audio.synth_clips('test', take=1)[0]])[..., 0]
  for i, clip in enumerate(x):
    audio.check_clip(clip, f'clip {i}')
  peak = np.abs(x).max(1)
  # Peaks in [0.3, 0.9] up to float32 rounding of the final rescale (a few ulp of 0.9).
  assert peak.min() >= 0.3 - 1e-6 and peak.max() <= 0.9 + 1e-6
  # >= 15 ms of silence first, and the utterance is over by 480 ms: only the -70 dB floor
  # (rms 3.2e-4; 6 sigma over 256 samples) is left in the first 100 and last 256 samples.
  assert np.abs(x[:, :100]).max() < 2e-3 and np.abs(x[:, -256:]).max() < 2e-3


def test_clips_are_voiced_harmonic_and_the_label_is_the_first_vowel():
  x, y = audio.synth_clips('test')
  x = x[..., 0].astype(np.float64)
  n_fft, shares = 512, []
  for clip in x:
    # The loudest 64 ms frame is periodic with a period of 80-260 Hz (normalised autocorrelation
    # above 0.5 at some lag in [8000 / 260, 8000 / 80]) and not a pure tone: the strongest
    # harmonic (its Hann main lobe, +-3 bins, would hold > 99.9 % of a sine's energy) holds
    # < 97 % of it, and < 75 % in the median clip (vowel energy is concentrated near F1).
    energy = np.convolve(clip ** 2, np.ones(n_fft), 'valid')
    frame = clip[np.argmax(energy):][:n_fft]
    frame = frame - frame.mean()
    lags = np.arange(FS // 260, FS // 80 + 1)
    r = np.array([np.dot(frame[:-k], frame[k:]) / np.sqrt(np.dot(frame[:-k], frame[:-k])
                                                          * np.dot(frame[k:], frame[k:]))
                  for k in lags])
    assert r.max() > 0.5
    power = np.abs(np.fft.rfft(frame * np.hanning(n_fft))) ** 2
    k = np.argmax(power)
    shares.append(power[max(k - 3, 0):k + 4].sum() / power.sum())
  assert max(shares) < 0.97 and np.median(shares) < 0.75
  # The label is the first syllable's vowel: in the loudest 64 ms of the first 300 ms (which
  # hold the first vowel), /i/ and /u/ (F1 ~ 300 Hz) have most of their energy at 150-450 Hz,
  # /a/ and /o/ (F1 ~ 600-750 Hz) at 500-1200 Hz (class means over the test split).
  frames = []
  for clip in x:
    energy = np.convolve(clip[:2400] ** 2, np.ones(n_fft), 'valid')
    frames.append(clip[np.argmax(energy):][:n_fft] * np.hanning(n_fft))
  power = np.abs(np.fft.rfft(np.array(frames), axis=1)) ** 2
  freqs = np.fft.rfftfreq(n_fft, 1 / FS)
  def share(lo, hi):
    return power[:, (freqs >= lo) & (freqs < hi)].sum(1) / power.sum(1)
  low, mid = share(150, 450), share(500, 1200)
  for k, vowel in enumerate(audio.VOWELS):
    if vowel in 'iu':
      assert low[y == k].mean() > 0.6 and mid[y == k].mean() < 0.2, vowel
    if vowel in 'ao':
      assert mid[y == k].mean() > 0.6 and low[y == k].mean() < 0.25, vowel


def test_takes_share_content_in_fresh_draws():
  x0, y0 = audio.synth_clips('test')
  x1, y1 = audio.synth_clips('test', take=1)
  np.testing.assert_array_equal(y0, y1)
  a, b = x0[..., 0].astype(np.float64), x1[..., 0].astype(np.float64)
  # Fresh phases and noise: the takes are uncorrelated on average (a clip dominated by one
  # harmonic has correlation cos(phase difference), so single clips can correlate), and the
  # difference has the energy of both: E|a - b|^2 = |a|^2 + |b|^2.
  corr = np.sum(a * b, 1) / np.sqrt(np.sum(a * a, 1) * np.sum(b * b, 1))
  assert abs(corr.mean()) < 0.1                                   # std ~ 0.3 / sqrt(128)
  ratio = np.sum((a - b) ** 2, 1) / np.sum(a * a + b * b, 1)
  assert 0.8 < ratio.mean() < 1.2
  # The same content: each clip's log spectrogram is far closer to its other take than to the
  # next utterance's, for every clip.
  sa, sb = _log_band_spectrogram(a), _log_band_spectrogram(b)
  same = np.abs(sa - sb).mean((1, 2))
  other = np.abs(sa - np.roll(sa, 1, axis=0)).mean((1, 2))
  assert np.all(same < 0.6 * other), (same.max(), other.min())
  assert not np.array_equal(audio.synth_clips('test', take=2)[0], x1)


def test_check_clip_errors():
  audio.check_clip(np.full(100, 0.5), 'ok')
  assert_one_line_error(lambda: audio.check_clip(np.full(10, 3e-6), 'train clip 7'),
                        ['train clip 7: silent clip (peak 3e-06 < 1e-4)'])
  x = np.full(1000, 0.1)
  x[:21] = 1.0                                                    # 21 / 1000 samples
  assert_one_line_error(lambda: audio.check_clip(x, 'a'),
                        ['a: clipped clip (2.1% of samples at |x| >= 0.999)'])
  x[1:21] = 0.1
  audio.check_clip(x, 'one in 1000 (0.1 %) is allowed')
  x[0] = -0.9995
  x[1] = 0.999                                                    # 0.2 %, both signs count
  assert_one_line_error(lambda: audio.check_clip(x, 'b'), ['b: clipped clip (0.2%'])
  x[5] = np.nan
  assert_one_line_error(lambda: audio.check_clip(x, 'c'), ['c: non-finite samples (1 of 1000)'])


def test_make_source_synth_audio_and_bad_configs():
  src = sources.make_source(sources.DataConfig(name='synth_audio', split='test'))
  assert (src.image_shape, src.num_classes, src.sample_rate, len(src)) == ((4096, 1), 5, 8000, 128)
  b = src.batch(seed=0, step=0, global_batch=8)
  assert b['image'].shape == (8, 4096, 1) and b['label'].shape == (8,)
  same = sources.make_source(sources.DataConfig(name='synth_audio', split='test',
                                                sample_rate=8000, clip_length=4096))
  np.testing.assert_array_equal(same.batch(seed=0, step=0, global_batch=8)['image'], b['image'])
  cases = [
      (dict(sample_rate=16000), ['config.data.sample_rate=16000: synth_audio is rendered at '
                                 '8000 Hz (nothing is resampled)']),
      (dict(clip_length=8000), ['config.data.clip_length=8000', '4096']),
      (dict(split='valid'), ["config.data.split='valid'", "'test', 'train'"]),
  ]
  for kwargs, words in cases:
    cfg = sources.DataConfig(name='synth_audio', **kwargs)
    assert_one_line_error(lambda cfg=cfg: sources.make_source(cfg), words)
  assert_one_line_error(lambda: audio.synth_clips('valid'), ["split='valid'"])
  assert_one_line_error(lambda: audio.synth_clips('test', -1), ['take=-1'])


class _FakeSource:
  """What `tfds.data_source` returns: `len` and `[i]` -> {'audio': int16 [n], 'label': int}."""

  def __init__(self, examples):
    self.examples, self.reads = examples, 0

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    self.reads += 1
    return self.examples[i]


def _speech(lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [{'audio': rng.integers(-3000, 3000, n).astype(np.int16), 'label': i % 12}
          for i, n in enumerate(lengths)]


@pytest.fixture()
def fake_tfds(monkeypatch):
  opened = {}
  examples = {'train': _speech([16000, 12000, 17001, 15999] * 5),
              'test': _speech([16000] * 6, seed=1)}

  def data_source(name, split, data_dir=None, download=True):
    assert name == 'speech_commands' and not download
    if split not in examples:
      raise KeyError(split)
    opened[split] = _FakeSource(examples[split])
    return opened[split]
  monkeypatch.setattr(tfds, 'data_source', data_source)
  return examples, opened


def test_speech_commands_crop_pad_and_labels(fake_tfds):
  examples, opened = fake_tfds
  src = sources.make_source(sources.DataConfig(name='speech_commands', sample_rate=16000))
  assert (src.image_shape, src.num_classes, src.sample_rate, len(src)) == ((16000, 1), 12, 16000,
                                                                           20)
  assert opened['train'].reads == 1                               # opening reads one example
  raw = [e['audio'].astype(np.float32) / 32768 for e in examples['train'][:4]]
  got = src.examples([0, 1, 2, 3])
  assert got['image'].shape == (4, 16000, 1) and got['image'].dtype == np.float32
  np.testing.assert_array_equal(got['image'][0, :, 0], raw[0])
  np.testing.assert_array_equal(got['image'][1, :2000, 0], 0)     # (16000 - 12000) // 2 left
  np.testing.assert_array_equal(got['image'][1, 2000:14000, 0], raw[1])
  np.testing.assert_array_equal(got['image'][1, 14000:, 0], 0)
  np.testing.assert_array_equal(got['image'][2, :, 0], raw[2][500:16500])   # 1001 // 2 = 500
  np.testing.assert_array_equal(got['image'][3, :, 0], np.pad(raw[3], (0, 1)))
  np.testing.assert_array_equal(got['label'], [0, 1, 2, 3])
  short = tfds_audio.AudioSource('speech_commands', split='test', clip_length=4000)
  np.testing.assert_array_equal(short.example(2)['image'][:, 0],
                                examples['test'][2]['audio'][6000:10000] / np.float32(32768))
  assert short.images.shape == (6, 4000, 1)                      # the split, read whole


def test_speech_commands_batches_are_deterministic_and_sharded(fake_tfds):
  src = tfds_audio.AudioSource('speech_commands')
  whole = src.batch(seed=3, step=2, global_batch=8)
  again = tfds_audio.AudioSource('speech_commands').batch(seed=3, step=2, global_batch=8)
  np.testing.assert_array_equal(whole['image'], again['image'])
  parts = [src.batch(seed=3, step=2, global_batch=8, process_index=p, process_count=2)
           for p in range(2)]
  np.testing.assert_array_equal(np.concatenate([p['image'] for p in parts]), whole['image'])
  np.testing.assert_array_equal(np.concatenate([p['label'] for p in parts]), whole['label'])
  seen = np.concatenate([src.batch(5, s, 10)['label'] for s in range(2)])
  assert sorted(seen.tolist()) == sorted(i % 12 for i in range(20))   # one epoch, each once


def test_speech_commands_errors(fake_tfds, monkeypatch):
  examples, _ = fake_tfds
  assert_one_line_error(
      lambda: sources.make_source(sources.DataConfig(name='speech_commands', sample_rate=8000)),
      ['config.data.sample_rate=8000: speech_commands is recorded at 16000 Hz'])
  assert_one_line_error(lambda: tfds_audio.AudioSource('speech_commands', clip_length=-1),
                        ['config.data.clip_length=-1'])
  assert_one_line_error(lambda: tfds_audio.AudioSource('speech_commands', split='valid'),
                        ['tfds build speech_commands', 'TensorFlow', 'KeyError'])
  assert_one_line_error(lambda: tfds_audio.AudioSource('esc50'), ["unknown preset 'esc50'"])
  examples['train'][3]['audio'][:] = 0
  examples['train'][4]['audio'][:100] = 32767
  src = tfds_audio.AudioSource('speech_commands')
  assert_one_line_error(lambda: src.example(3),
                        ['speech_commands train example 3: silent clip (peak 0 < 1e-4)'])
  assert_one_line_error(lambda: src.examples([0, 4]),
                        ['speech_commands train example 4: clipped clip (0.6% of samples'])
  examples['train'][0] = {'sound': examples['train'][0]['audio'], 'label': 0}
  assert_one_line_error(lambda: tfds_audio.AudioSource('speech_commands'),
                        ["examples have no key 'audio'", "['label', 'sound']"])


# ---- data.name='tfds_audio': a real TFDS dataset prepared on disk ------------------------------

TINY_LENGTHS = {'train': [64, 40, 51, 90, 71, 65, 63, 30, 100], 'test': [64, 20, 128]}


def _tiny_examples(split):
  """The int16 clips `[n]` and labels of the tiny dataset, written here (not read back)."""
  rng = np.random.default_rng(7 if split == 'train' else 8)
  return [(rng.integers(-3000, 3000, n).astype(np.int16), i % 3)
          for i, n in enumerate(TINY_LENGTHS[split])]


class TinyAudio(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A TFDS builder whose audio is a Tensor of int16 samples (no TensorFlow needed)."""
  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'audio': tfds.features.Tensor(shape=(None,), dtype=np.int16),
        'label': tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in TINY_LENGTHS}

  def _generate_examples(self, split):
    for i, (x, label) in enumerate(_tiny_examples(split)):
      yield i, {'audio': x, 'label': label}


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
  """A data_dir holding 'tiny_audio' prepared as ArrayRecord (the builder class is not
  registered, so reads go through the prepared files alone)."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  TinyAudio(data_dir=data_dir, file_format='array_record').download_and_prepare()
  return data_dir


def _tiny_cfg(data_dir, **kwargs):
  fields = dict(name='tfds_audio', tfds_name='tiny_audio', data_dir=data_dir, sample_rate=16000,
                clip_length=64)
  return sources.DataConfig(**{**fields, **kwargs})


def _stored_order(data_dir, split):
  """Index -> position in `_tiny_examples` (TFDS stores examples in key-hash order): each clip
  is found by its length, unique within a split, and must have round-tripped exactly."""
  raw = tfds.data_source('tiny_audio', split=split, data_dir=data_dir)
  written = _tiny_examples(split)
  order = [TINY_LENGTHS[split].index(len(raw[i]['audio'])) for i in range(len(raw))]
  for i, j in enumerate(order):
    np.testing.assert_array_equal(raw[i]['audio'], written[j][0])
  assert sorted(order) == list(range(len(written)))
  return order


def test_tfds_audio_reads_a_prepared_dataset_crop_pad_and_labels(tiny_dir):
  src = sources.make_source(_tiny_cfg(tiny_dir))
  assert (src.image_shape, src.num_classes, src.sample_rate, len(src)) == ((64, 1), 3, 16000, 9)
  order = _stored_order(tiny_dir, 'train')
  written = _tiny_examples('train')
  got = src.examples(np.arange(9))
  assert got['image'].shape == (9, 64, 1) and got['image'].dtype == np.float32
  # Offsets written by hand for L = 64: (zeros left, first kept sample, zeros right).
  # n = 64: whole; 40: 12 + 40 + 12; 51: 6 + 51 + 7; 90: [13:77]; 71: [3:67]; 65: [0:64];
  # 63: 0 + 63 + 1; 30: 17 + 30 + 17; 100: [18:82].
  spans = {64: (0, 0, 0), 40: (12, 0, 12), 51: (6, 0, 7), 90: (0, 13, 0), 71: (0, 3, 0),
           65: (0, 0, 0), 63: (0, 0, 1), 30: (17, 0, 17), 100: (0, 18, 0)}
  for i, j in enumerate(order):
    x = written[j][0].astype(np.float64) / 32768                 # exact in float32 too
    left, start, right = spans[len(x)]
    expect = np.concatenate([np.zeros(left), x[start:start + 64 - left - right], np.zeros(right)])
    np.testing.assert_array_equal(got['image'][i, :, 0], expect.astype(np.float32))
    assert got['label'][i] == written[j][1]
  test = sources.make_source(_tiny_cfg(tiny_dir, split='test', clip_length=32, label_key=''))
  assert (len(test), test.num_classes, test.image_shape) == (3, 0, (32, 1))
  assert 'label' not in test.example(0)
  order = _stored_order(tiny_dir, 'test')
  whole = test.images                                              # the split, read whole
  assert whole.shape == (3, 32, 1)
  for i, j in enumerate(order):
    x = _tiny_examples('test')[j][0] / np.float32(32768)
    expect = {64: x[16:48], 20: np.pad(x, (6, 6)), 128: x[48:80]}[len(x)]
    np.testing.assert_array_equal(whole[i, :, 0], expect)


def test_tfds_audio_batches_are_deterministic_and_sharded(tiny_dir):
  cfg = _tiny_cfg(tiny_dir)
  src = sources.make_source(cfg)
  whole = src.batch(seed=3, step=2, global_batch=6)
  again = sources.make_source(cfg).batch(seed=3, step=2, global_batch=6)
  for key in ('image', 'label'):
    np.testing.assert_array_equal(whole[key], again[key])
  parts = [src.batch(seed=3, step=2, global_batch=6, process_index=p, process_count=3)
           for p in range(3)]
  for key in ('image', 'label'):
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
  epoch = src.batch(seed=5, step=0, global_batch=9)                # one epoch: each example once
  np.testing.assert_array_equal(np.sort(epoch['image'][..., 0], axis=0),
                                np.sort(src.images[..., 0], axis=0))
  assert sorted(epoch['label'].tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_tfds_audio_errors(tiny_dir, tmp_path):
  cases = [
      (dict(sample_rate=0), ["config.data.sample_rate=0: data.name='tfds_audio' needs the rate"]),
      (dict(clip_length=0), ["config.data.clip_length=0: data.name='tfds_audio' needs"]),
      (dict(tfds_name=''), ["config.data.tfds_name: data.name='tfds_audio' needs"]),
      (dict(num_classes=5), ["config.data.num_classes=5: 'tiny_audio' label 'label' is a "
                             'ClassLabel of 3 classes']),
      (dict(tfds_name='no_such_audio'), ["TFDS dataset 'no_such_audio' is not readable in "
                                         f'data_dir={tiny_dir}', 'DatasetNotFoundError']),
      (dict(data_dir=str(tmp_path / 'nowhere')), ['config.data.data_dir=', 'no such directory']),
      (dict(split='valid'), ["split 'valid'", "Unknown split 'valid'"]),
      (dict(label_key='speaker'), ["examples have no key 'speaker'", "['audio', 'label']"]),
  ]
  for kwargs, words in cases:
    cfg = _tiny_cfg(kwargs.pop('data_dir', tiny_dir), **kwargs)
    assert_one_line_error(lambda cfg=cfg: sources.make_source(cfg), words)
  # The same files described as an Audio feature: TFDS needs TensorFlow to read them at all.
  audio_dir = tmp_path / 'as_audio'
  shutil.copytree(tiny_dir, audio_dir)
  (features_file,) = audio_dir.glob('tiny_audio/*/features.json')
  features = json.loads(features_file.read_text())
  features['featuresDict']['features']['audio'] = {
      'pythonClassName': 'tensorflow_datasets.core.features.audio_feature.Audio',
      'audio': {'shape': {'dimensions': ['-1']}, 'dtype': 'int16', 'sampleRate': '16000',
                'encoding': 'none'}}
  features_file.write_text(json.dumps(features))
  assert_one_line_error(lambda: sources.make_source(_tiny_cfg(str(audio_dir))),
                        ["tfds_audio: 'tiny_audio' needs tensorflow to be read",
                         "data.name='tfds_audio'"])
  # Float samples pass as they are; other dtypes and out-of-range floats are refused.
  np.testing.assert_array_equal(tfds_audio.crop_or_pad(np.float32([0.5, -0.25]), 4),
                                [0, 0.5, -0.25, 0])
  assert_one_line_error(lambda: tfds_audio.crop_or_pad(np.float32([0.5, 1.5]), 4),
                        ['float samples must lie in [-1, 1]; got a peak of 1.5'])
  assert_one_line_error(lambda: tfds_audio.crop_or_pad(np.int32([5, 6]), 4),
                        ['samples must be int16 or float; got int32'])
