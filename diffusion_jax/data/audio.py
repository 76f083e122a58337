"""Audio data: the embedded synthetic speech-like corpus (`synth_audio`) and the TFDS audio
sources (`data/tfds_audio.py`), behind the `sources.ArraySource` interface.

Examples are float32 waveforms `[L, 1]` in [-1, 1]. The embedded corpus needs no download: 512
training and 128 test clips of `CLIP_LENGTH = 4096` samples at `SAMPLE_RATE = 8000` Hz (0.512 s),
rendered deterministically by a source-filter synthesizer (Fant 1960; the cascade formant
synthesizer of Klatt 1980, simplified), labelled by the vowel of their first syllable.

The synthesizer. An utterance is 1-3 syllables, each an optional consonant onset followed by a
vowel nucleus, with silence before, between and after them:

* Timing. Leading silence 15-60 ms; an onset that is nothing, a fricative (40-90 ms of noise) or
  a plosive (a 20-40 ms closure of silence, then an 8-20 ms burst); a vowel of 80-170 ms; gaps of
  20-50 ms between syllables. All durations are scaled down together when they would pass
  480 ms, so every clip ends in silence.
* Pitch. `f0(t) = f_b 2^(s (t - t_mid) + sum_syl a_syl exp(-(t - c_syl)^2 / (2 w_syl^2)))
  (1 + d sin(2 pi r t + psi))`, clipped to [80, 260] Hz: a speaker's base `f_b` (log-uniform
  90-210 Hz), a falling (70 %, s in [-0.6, -0.15] oct/s) or rising (question-like, s in
  [0.2, 0.6] oct/s) trend, an accent bump of 0-0.12 octave on each vowel, and vibrato at
  r = 4-7 Hz with depth d = 1-3 %.
* Voiced source. Additive harmonics `sum_k a_k(t) sin(k theta(t) + phi_k)` with
  `theta(t) = 2 pi sum_{n <= t} f0(n) / fs`, every harmonic below 3.8 kHz (faded out over
  3.7-3.9 kHz), with the -6 dB/octave slope of glottal flow (-12) plus lip radiation (+6):
  `a_k ~ 1 / k`.
* Vocal tract. Each harmonic is weighted by the cascade of four resonators evaluated at its
  frequency `f = k f0(t)`: `|H(f)| = prod_j (F_j^2 + b_j^2) / sqrt((b_j^2 + (f - F_j)^2)
  (b_j^2 + (f + F_j)^2))`, `b_j = B_j / 2` (the magnitude of the analog two-pole resonator with
  poles at `-pi B_j +- 2 pi i F_j`, unit gain at 0 Hz). F1/F2/F3 come from the vowel's table
  (Peterson & Barney 1952 adult male means for /a e i o u/), F4 is 3.3 kHz for every vowel (it
  lifts the top of the band, as Klatt's higher poles do), all scaled by a speaker's vocal-tract
  factor 0.92-1.18 (higher for higher voices), +-4 % per formant, clipped below 3.7 kHz;
  bandwidths 70 / 100 / 150 / 250 Hz times 0.8-1.3. Between syllables the formants glide (a softmax
  of Gaussian weights around the vowel centres); after a plosive F2 starts at a locus of
  1.2-2.0 kHz and reaches the vowel's F2 with a 25 ms time constant.
* Envelopes. Vowels: raised-cosine attack 10-30 ms and release 30-60 ms, a level of 0.8-1.0 on
  the first syllable and 0.5-0.9 on the others. Fricatives: band-passed noise (a Gaussian band
  of centre 1.8-3.6 kHz and width 0.4-1.2 kHz, applied in the DFT domain) with 15 ms / 20 ms
  raised-cosine edges at 0.15-0.35 of the vowel level; bursts: band-passed noise decaying
  exponentially over the burst (time constant a third of it) at 0.3-0.6. A breathy noise at
  2 % of the voiced envelope and a -70 dB noise floor run throughout.
* Level. The voiced part is scaled so that its loudest short-time power, `sum_k a_k^2 / 2`, is
  1 (a quantity independent of the harmonic phases); the clip then by `p / 2.1` (2.1: the
  median measured peak of such clips) with a target peak p in 0.4-0.75. A take whose peak still
  falls outside [0.3, 0.9] is rescaled to the nearest bound (about 1 % of clips), so every clip
  passes `check_clip`.

Content and takes. Every parameter above is drawn from a Philox stream keyed by the split: the
content. The harmonic phases `phi_k`, all noise, and jitter (`f0` times `1 + j(t)`, `j` a
smooth random path of 0.6 % rms) and shimmer (amplitude times `1 + s(t)`, 4 % rms) come from a
second stream keyed by (split, take). So take 1 is an independent recording of the same
utterances as take 0 (the data): the distance between them is the floor that a vocoder
conditioned on their spectra cannot beat.

All arrays are vectorised over the clips (one loop over the <= 48 harmonics); the whole corpus
(640 clips) renders in about a second.
"""

import functools

import numpy as np

from diffusion_jax.data import sources

SAMPLE_RATE = 8000
CLIP_LENGTH = 4096
NUM_CLASSES = 5                       # vowel of the first syllable: /a/, /e/, /i/, /o/, /u/
VOWELS = ('a', 'e', 'i', 'o', 'u')
SPLITS = {'train': 512, 'test': 128}

# Peterson & Barney (1952), adult male means (Hz): /a/ (father), /e/ (bet), /i/ (beet),
# /o/ (bought), /u/ (boot).
FORMANTS = np.array([[730, 1090, 2440, 3300], [530, 1840, 2480, 3300], [270, 2290, 3010, 3300],
                     [570, 840, 2410, 3300], [300, 870, 2240, 3300]], np.float64)
BANDWIDTHS = np.array([70.0, 100.0, 150.0, 250.0])
MAX_SYLLABLES = 3
_HOP = 16                             # control-rate step (2 ms)
_MAX_HARMONIC_HZ = 3900.0             # harmonics fade out over 3700-3900 Hz
_END = 0.48                           # the utterance ends by 480 ms
_CREST = 2.1
_SILENT, _CLIPPED_AT, _CLIPPED_FRACTION = 1e-4, 0.999, 1e-3


def check_clip(x, where: str) -> None:
  """ValueError if `x` is silent (peak < 1e-4), clipped (more than 0.1 % of its samples at
  `|x| >= 0.999`) or not finite; `where` names the clip."""
  x = np.asarray(x)
  if not np.all(np.isfinite(x)):
    raise ValueError(f'{where}: non-finite samples ({int(np.sum(~np.isfinite(x)))} of {x.size})')
  peak = float(np.max(np.abs(x))) if x.size else 0.0
  if peak < _SILENT:
    raise ValueError(f'{where}: silent clip (peak {peak:.1g} < 1e-4)')
  clipped = float(np.mean(np.abs(x) >= _CLIPPED_AT))
  if clipped > _CLIPPED_FRACTION:
    raise ValueError(f'{where}: clipped clip ({100 * clipped:.1f}% of samples at '
                     f'|x| >= {_CLIPPED_AT})')


def make_audio_source(cfg: sources.DataConfig):
  """The source for `cfg.name` in `sources.AUDIO_DATASETS`: 'synth_audio' (an `ArraySource` of
  this module's corpus with `.sample_rate`), a `data/tfds_audio.py` preset, or 'tfds_audio' (any
  TFDS dataset with Tensor audio: `tfds_audio.config_preset`)."""
  if cfg.name == 'synth_audio':
    if cfg.sample_rate not in (0, SAMPLE_RATE):
      raise ValueError(f'config.data.sample_rate={cfg.sample_rate}: synth_audio is rendered at '
                       f'{SAMPLE_RATE} Hz (nothing is resampled)')
    if cfg.clip_length not in (0, CLIP_LENGTH):
      raise ValueError(f'config.data.clip_length={cfg.clip_length}: synth_audio clips are '
                       f'{CLIP_LENGTH} samples ({CLIP_LENGTH / SAMPLE_RATE} s at {SAMPLE_RATE} Hz)')
    if cfg.split not in SPLITS:
      raise ValueError(f'config.data.split={cfg.split!r}: synth_audio has splits '
                       f'{sorted(SPLITS)}')
    clips, labels = synth_clips(cfg.split)
    source = sources.ArraySource(clips, labels, NUM_CLASSES, rank=2)
    source.sample_rate = SAMPLE_RATE
    return source
  from diffusion_jax.data import tfds_audio  # pylint: disable=g-import-not-at-top (tfds)
  if cfg.name == 'tfds_audio':
    return tfds_audio.AudioSource(tfds_audio.config_preset(cfg), split=cfg.split,
                                  data_dir=cfg.data_dir or None)
  if cfg.name not in tfds_audio.PRESETS:
    raise ValueError(f'config.data.name={cfg.name!r}: not an audio dataset; choose from '
                     f'{sorted(sources.AUDIO_DATASETS)}')
  return tfds_audio.AudioSource(cfg.name, split=cfg.split, data_dir=cfg.data_dir or None,
                                clip_length=cfg.clip_length, sample_rate=cfg.sample_rate)


@functools.lru_cache(maxsize=None)
def synth_clips(split: str, take: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """The embedded corpus: float32 clips `[N, 4096, 1]` and int32 labels `[N]` (read-only,
  cached per process); 'train' N = 512, 'test' N = 128. `take` > 0 renders the same utterances
  with fresh harmonic phases, noise, jitter and shimmer (see the module docstring)."""
  if split not in SPLITS:
    raise ValueError(f'synth_clips: split={split!r}; choose from {sorted(SPLITS)}')
  if isinstance(take, bool) or not isinstance(take, (int, np.integer)) or take < 0:
    raise ValueError(f'synth_clips: take={take!r} must be an integer >= 0')
  split_id = sorted(SPLITS).index(split) + 1
  content = _draw_content(np.random.Generator(np.random.Philox(key=[split_id, 0])),
                          SPLITS[split])
  rng = np.random.Generator(np.random.Philox(key=[split_id, 1 + int(take)]))
  clips = _render(content, rng)[..., None]
  labels = content['vowels'][:, 0].astype(np.int32)
  clips.flags.writeable = False
  labels.flags.writeable = False
  return clips, labels


def _raised_cosine(u):
  """0 for u <= 0, 1 for u >= 1, `(1 - cos(pi u)) / 2` between."""
  return 0.5 - 0.5 * np.cos(np.pi * np.clip(u, 0.0, 1.0))


def _draw_content(rng: np.random.Generator, n: int) -> dict:
  """Every take-independent parameter of `n` utterances (times in seconds, [N] or [N, S])."""
  s = MAX_SYLLABLES
  u = rng.uniform
  labels = rng.permutation(np.arange(n) % NUM_CLASSES)
  num_syl = rng.integers(1, s + 1, n)
  vowels = rng.integers(0, NUM_CLASSES, (n, s))
  vowels[:, 0] = labels
  active = np.arange(s)[None] < num_syl[:, None]                            # [N, S]
  onset = rng.choice(3, (n, s), p=[0.35, 0.35, 0.3])                      # none, fric, plosive
  fric, closure, burst = u(0.04, 0.09, (n, s)), u(0.02, 0.04, (n, s)), u(0.008, 0.02, (n, s))
  vowel, gap, lead = u(0.08, 0.17, (n, s)), u(0.02, 0.05, (n, s)), u(0.015, 0.06, n)
  fric, closure, burst = fric * (onset == 1), closure * (onset == 2), burst * (onset == 2)
  gap = gap * (np.arange(s)[None] < num_syl[:, None] - 1)
  fric, closure, burst, vowel = (d * active for d in (fric, closure, burst, vowel))
  total = (fric + closure + burst + vowel + gap).sum(1)
  scale = np.minimum(1.0, (_END - lead) / total)[:, None]
  fric, closure, burst, vowel, gap = (d * scale for d in (fric, closure, burst, vowel, gap))
  lengths = np.stack([fric, closure, burst, vowel, gap], -1).reshape(n, -1)  # [N, 5 S]
  starts = lead[:, None] + np.cumsum(lengths, 1) - lengths
  starts = starts.reshape(n, s, 5)
  pos = (np.log(u(90.0, 210.0, n)) - np.log(90.0)) / np.log(210.0 / 90.0)   # log-uniform f0
  base_f0 = 90.0 * (210.0 / 90.0) ** pos
  tract = 0.95 + 0.2 * pos + u(-0.03, 0.03, n)
  formants = FORMANTS[vowels] * tract[:, None, None] * u(0.96, 1.04, (n, s, 4))
  rising = rng.random(n) < 0.3
  return dict(
      vowels=vowels, active=active, onset=onset,
      fric_start=starts[..., 0], fric_len=fric, burst_start=starts[..., 2], burst_len=burst,
      vowel_start=starts[..., 3], vowel_len=vowel,
      attack=np.minimum(u(0.01, 0.03, (n, s)), vowel / 3),
      release=np.minimum(u(0.03, 0.06, (n, s)), vowel / 2),
      level=np.where(np.arange(s)[None] == 0, u(0.8, 1.0, (n, s)), u(0.5, 0.9, (n, s))) * active,
      base_f0=base_f0,
      slope=np.where(rising, u(0.2, 0.6, n), u(-0.6, -0.15, n)),
      accent=u(0.0, 0.12, (n, s)),
      vibrato_rate=u(4.0, 7.0, n), vibrato_depth=u(0.01, 0.03, n), vibrato_phase=u(0, 2 * np.pi, n),
      formants=np.minimum(formants, 3700.0),
      bandwidths=BANDWIDTHS * u(0.8, 1.3, (n, s, 4)),
      locus=u(1200.0, 2000.0, (n, s)) * tract[:, None],
      noise_centre=u(1800.0, 3600.0, (n, s)), noise_width=u(400.0, 1200.0, (n, s)),
      fric_level=u(0.15, 0.35, (n, s)), burst_level=u(0.3, 0.6, (n, s)),
      peak=u(0.4, 0.75, n))


def _smooth_noise(rng, shape, rms: float, width: int = 8) -> np.ndarray:
  """Gaussian noise `[N, C]` smoothed along its last axis by a Hann window of `width` control
  steps (16 ms), of standard deviation `rms`."""
  window = np.hanning(width + 2)[1:-1]
  window /= np.sqrt(np.sum(window ** 2))
  white = rng.standard_normal((*shape[:-1], shape[-1] + width - 1))
  return rms * sum(window[i] * white[..., i:i + shape[-1]] for i in range(width))


def _upsample(a: np.ndarray) -> np.ndarray:
  """Control-rate values `[..., L / HOP + 1]` linearly interpolated to `[..., L]`."""
  w = (np.arange(_HOP) / _HOP).astype(a.dtype)
  a0 = a[..., :-1, None]
  return (a0 + (a[..., 1:, None] - a0) * w).reshape(*a.shape[:-1], CLIP_LENGTH)


def _resonators(f, formants, bandwidths):
  """`prod_j |H_j(f)|` of the analog two-pole resonators (unit gain at 0 Hz): `f` `[N, C]`,
  formants and bandwidths `[N, 4, C]`."""
  b2 = (bandwidths / 2) ** 2
  f = f[:, None]
  gain = (formants ** 2 + b2) / np.sqrt((b2 + (f - formants) ** 2) * (b2 + (f + formants) ** 2))
  return np.prod(gain, axis=1)


def _voiced(f0, formants, bandwidths, env, phases, chunk: int = 32) -> np.ndarray:
  """float32 `[N, L]`: `sum_k a_k(t) sin(k theta(t) + phi_k)`, `a_k = env |H(k f0)| / k` (times
  the fade above 3.7 kHz) scaled so that `max_t sum_k a_k^2 / 2 = 1`. Control-rate inputs
  `[N, C]` (formants, bandwidths `[N, 4, C]`), phases `[N, K_max]`.

  `sin(k theta)` and `cos(k theta)` advance by the angle-addition recurrence, one step per
  harmonic; clips go in chunks of similar lowest f0, each up to its own highest harmonic.
  """
  theta = 2 * np.pi * np.cumsum(_upsample(f0), 1) / SAMPLE_RATE
  cos1, sin1 = np.cos(theta).astype(np.float32), np.sin(theta).astype(np.float32)
  out = np.zeros(theta.shape, np.float32)
  order = np.argsort(f0.min(1))
  for start in range(0, len(order), chunk):
    rows = order[start:start + chunk]
    f, fm, bw, e = f0[rows], formants[rows], bandwidths[rows], env[rows]
    num = int(_MAX_HARMONIC_HZ // f.min()) + 1
    amps = np.stack([e * _resonators(k * f, fm, bw) / k
                     * np.clip((_MAX_HARMONIC_HZ - k * f) / 200.0, 0.0, 1.0)
                     for k in range(1, num + 1)], 1)                          # [n, K, C]
    amps /= np.sqrt(np.sum(amps ** 2, 1).max(1) / 2)[:, None, None]
    amps = _upsample(amps.astype(np.float32))                                # [n, K, L]
    c1, s1 = cos1[rows], sin1[rows]
    ck, sk = c1, s1
    pc, ps = np.cos(phases[rows]).astype(np.float32), np.sin(phases[rows]).astype(np.float32)
    acc = np.zeros(c1.shape, np.float32)
    for k in range(num):
      if k:
        ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
      acc += amps[:, k] * (sk * pc[:, k:k + 1] + ck * ps[:, k:k + 1])        # sin(k th + phi)
    out[rows] = acc
  return out


def _render(c: dict, rng: np.random.Generator) -> np.ndarray:
  """float32 `[N, L]` waveforms of the utterances `c`; `rng` draws this take's randomness."""
  n = len(c['base_f0'])
  tc = (np.arange(CLIP_LENGTH // _HOP + 1) * _HOP / SAMPLE_RATE)[None, None]  # [1, 1, C]
  # Inactive syllables have zero lengths and levels: lengths are floored to keep 0 / 0 away.
  v0, vlen = c['vowel_start'][..., None], np.maximum(c['vowel_len'][..., None], 1e-3)  # [N, S, 1]
  centre = v0 + vlen / 2

  # Pitch contour (control rate), with this take's jitter.
  bumps = np.sum(c['accent'][..., None] * c['active'][..., None]
                 * np.exp(-0.5 * ((tc - centre) / (vlen / 2)) ** 2), axis=1)
  t_c = tc[0]
  f0 = c['base_f0'][:, None] * 2.0 ** (c['slope'][:, None] * (t_c - 0.25) + bumps)
  f0 = f0 * (1 + c['vibrato_depth'][:, None] * np.sin(
      2 * np.pi * c['vibrato_rate'][:, None] * t_c + c['vibrato_phase'][:, None]))
  f0 = np.clip(f0, 80.0, 260.0) * (1 + _smooth_noise(rng, f0.shape, 0.006))  # [N, C]

  # Formant tracks: a softmax of Gaussian weights around the vowel centres, F2 loci after
  # plosives.
  logits = np.where(c['active'][..., None], -0.5 * ((tc - centre) / vlen) ** 2, -1e9)
  weights = np.exp(logits - logits.max(1, keepdims=True))
  weights /= weights.sum(1, keepdims=True)                                    # [N, S, C]
  since = tc - v0
  glide = (c['onset'] == 2)[..., None] * (since > -0.01) * np.exp(-np.maximum(since, 0) / 0.025)
  f2 = c['formants'][..., 1:2] + (c['locus'][..., None] - c['formants'][..., 1:2]) * glide
  tracks = (c['formants'][..., 0:1], f2, c['formants'][..., 2:3], c['formants'][..., 3:4])
  formants = np.stack([np.sum(weights * f, 1) for f in tracks], 1)           # [N, 4, C]
  bandwidths = np.einsum('nsc,nsj->njc', weights, c['bandwidths'])            # [N, 4, C]

  # Vowel envelopes (control rate) with this take's shimmer.
  attack, release = (np.maximum(c[k][..., None], 1e-3) for k in ('attack', 'release'))
  env = np.sum(c['level'][..., None] * _raised_cosine(since / attack)
               * _raised_cosine((v0 + vlen - tc) / release), axis=1)
  env = env * (1 + _smooth_noise(rng, env.shape, 0.04))                      # [N, C]
  phases = rng.uniform(0, 2 * np.pi, (n, int(_MAX_HARMONIC_HZ // 80.0) + 1))
  voiced = _voiced(f0, formants, bandwidths, env, phases)

  # Band-passed noise: one band per syllable (its fricative or burst), one broad band of breath;
  # envelopes at the control rate.
  freqs = np.fft.rfftfreq(CLIP_LENGTH, 1 / SAMPLE_RATE)
  band = np.exp(-0.5 * ((freqs - c['noise_centre'][..., None]) / c['noise_width'][..., None]) ** 2)
  band = np.concatenate([band, np.broadcast_to(
      np.exp(-0.5 * ((freqs - 1900.0) / 1000.0) ** 2), (n, 1, len(freqs)))], 1)
  band /= np.sqrt(np.mean(band ** 2, -1, keepdims=True))                       # unit rms
  white = rng.standard_normal((n, MAX_SYLLABLES + 1, CLIP_LENGTH), np.float32)
  noise = np.fft.irfft(np.fft.rfft(white, axis=-1) * band.astype(np.float32), CLIP_LENGTH,
                       axis=-1).astype(np.float32)
  f_start, f_len = c['fric_start'][..., None], c['fric_len'][..., None]
  fric_env = (c['onset'] == 1)[..., None] * c['fric_level'][..., None] * _raised_cosine(
      (tc - f_start) / 0.015) * _raised_cosine((f_start + f_len - tc) / 0.02)
  b_start, b_len = c['burst_start'][..., None], c['burst_len'][..., None]
  burst_env = (c['onset'] == 2)[..., None] * c['burst_level'][..., None] * _raised_cosine(
      (tc - b_start) / 0.002) * np.exp(-np.maximum(tc - b_start, 0) / np.maximum(b_len / 3, 1e-4))
  noise_env = np.concatenate([(fric_env + burst_env) * c['level'][..., None],
                              0.02 * env[:, None]], 1).astype(np.float32)     # [N, S + 1, C]
  consonants = np.einsum('nsl,nsl->nl', noise, _upsample(noise_env))
  floor = 10 ** (-70 / 20) * rng.standard_normal((n, CLIP_LENGTH), np.float32)

  x = (voiced + consonants) * (c['peak'] / _CREST).astype(np.float32)[:, None] + floor
  peak = np.abs(x).max(1, keepdims=True)
  x = x * np.clip(peak, 0.3, 0.9) / peak
  return x.astype(np.float32)
