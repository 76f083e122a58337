"""Audio data: the embedded synthetic corpus (determinism, balance, every clip valid and
speech-like, takes 0 and 1 the same content in fresh draws) and the TFDS audio source.

`tfds.testing.mock_data` cannot describe speech_commands here: TFDS's `Audio` feature needs
TensorFlow, which this project does not install. The TFDS tests replace `tfds.data_source` by an
in-memory list of examples with the same interface, so crop / pad, batches and errors are checked
against int16 samples written in the test.
"""

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
