"""A WaveGrad vocoder run through the library's loop (issue 23): the `mel` condition section,
its checks, and what the run writes (WAV files, spectrograms, distances with their floor)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from configs import wavegrad_synth
from diffusion_jax import run_config
from diffusion_jax import train_loop
from diffusion_jax.audio import features
from diffusion_jax.audio import io as audio_io
from diffusion_jax.configuration import ConfigError
from diffusion_jax.data import audio as audio_data
from diffusion_jax.metrics import audio as audio_metrics


def smoke(**overrides):
  c = wavegrad_synth.get_config('smoke')
  for key, value in overrides.items():
    section, name = key.split('.')
    with c.unlocked():
      c[section][name] = value
  return c


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('wavegrad'))
  c = smoke()
  c.train.num_steps = 2
  c.eval.num_samples = 3
  c.sample.grid_size = 2
  result = train_loop.train_and_evaluate(c, workdir)
  return workdir, result


def test_run_scores_samples_against_the_held_out_clips_beside_the_floor(run):
  workdir, result = run
  with open(os.path.join(workdir, 'eval.json'), encoding='utf-8') as f:
    assert json.load(f) == json.loads(json.dumps(result))
  take0, _ = audio_data.synth_clips('test', take=0)
  take1, _ = audio_data.synth_clips('test', take=1)
  cfg = features.MelConfig()
  # The floor is take 1 of the first 3 held-out clips scored against take 0 (sample i is
  # conditioned on held-out clip i).
  want = audio_metrics.audio_metrics(take1[:3], take0[:3], cfg)
  for k in ('lsd', 'mcd', 'mr_stft'):
    assert result[f'{k}_floor'] == pytest.approx(want[k], rel=1e-12)
    assert result[f'{k}_ratio'] == pytest.approx(result[k] / want[k], rel=1e-12)
    assert np.isfinite(result[k]) and result[k] > 0


def test_run_writes_wav_files_of_samples_and_their_references_and_spectrograms(run):
  workdir, _ = run
  take0, _ = audio_data.synth_clips('test', take=0)
  samples = np.load(os.path.join(workdir, 'samples.npy'))
  assert samples.shape == (2, 4096, 1)
  for i in range(2):
    ref, rate = audio_io.read_wav(os.path.join(workdir, 'audio', f'reference_{i}.wav'))
    assert rate == 8000
    np.testing.assert_allclose(ref, take0[i, :, 0], atol=1.0 / 32767)
    x, _ = audio_io.read_wav(os.path.join(workdir, 'audio', f'sample_{i}.wav'))
    np.testing.assert_allclose(x, np.clip(samples[i, :, 0], -1, 1), atol=1.0 / 32767)
  assert os.path.getsize(os.path.join(workdir, 'audio', 'spectrograms.png')) > 1000
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    saved = json.load(f)
  assert saved['mel']['hop'] == 64 and saved['model']['name'] == 'wavegrad'


def test_condition_is_the_clips_log_mel_and_the_noise_level_is_sqrt_abar():
  setup = run_config.build(smoke())
  clips = audio_data.synth_clips('train')[0][:2]
  np.testing.assert_allclose(setup.condition(clips),
                             np.asarray(features.log_mel(jnp.asarray(clips), features.MelConfig())),
                             atol=1e-4)
  t = jnp.asarray([0.001, 0.3, 1.0])
  abar = np.cumprod(1.0 - np.linspace(1e-6, 1e-2, 1000))
  np.testing.assert_allclose(setup.model.noise_level(t) ** 2, abar[[0, 299, 999]], rtol=1e-5)
  c = smoke(**{'objective.name': 'edm'})
  c.process = {'name': 'edm'}
  edm = run_config.build(c)
  assert edm.model.noise_level is None           # EDM's c_noise is already a noise level


@pytest.mark.parametrize('overrides, match', [
    ({'mel.hop': 96}, 'mel.hop=96 does not divide the waveform length 4096'),
    ({'mel.sample_rate': 16000}, r'config.mel.sample_rate=16000 does not match the data'),
    ({'data.sample_rate': 16000}, 'config.data.sample_rate=16000'),
    ({'model.n_mels': 32}, 'config.model.n_mels=32 does not match config.mel.n_mels=40'),
    ({'model.factors': (4, 4, 2, 4)}, r'upsample by 128, not by the spectrogram hop'),
    ({'mel.n_fft': 255}, 'mel.n_fft=255'),
    ({'eval.every': 10}, 'in-loop evaluation of audio is not supported'),
])
def test_bad_audio_configs_are_one_line_errors(overrides, match):
  with pytest.raises(ConfigError, match=match) as e:
    run_config.build(smoke(**overrides))
  assert '\n' not in str(e.value)


def test_mel_section_on_image_data_is_refused():
  c = smoke()
  c.data = wavegrad_synth.digits.data_section(name='digits')
  with pytest.raises(ConfigError, match=r'config.mel: a mel-conditioned model diffuses '
                                        r'waveforms \[L, 1\]'):
    run_config.build(c)


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(
    n for n in __import__('diffusion_jax').samplers.SAMPLERS
    if n not in __import__('diffusion_jax').samplers.FLOW_MAP_SAMPLERS))
def test_every_sampler_runs_on_waveforms_as_on_flat_vectors(name):
  """Samplers are shape-agnostic: on waveform-shaped data [B, L, 1] (Gaussian, exact denoiser)
  each gives exactly what it gives on the same numbers flattened to [B, L]."""
  import jax  # pylint: disable=g-import-not-at-top
  from diffusion_jax import analytic  # pylint: disable=g-import-not-at-top
  from diffusion_jax import processes  # pylint: disable=g-import-not-at-top
  from diffusion_jax import samplers  # pylint: disable=g-import-not-at-top
  proc = processes.DiscreteVP.from_name('linear', 1000, beta_start=1e-6, beta_end=1e-2)
  mu = jnp.sin(jnp.arange(16.0))[:, None] * 0.5
  s2 = 0.05 + 0.1 * jnp.cos(jnp.arange(16.0))[:, None] ** 2
  x_T = jax.random.normal(jax.random.key(0), (4, 16, 1))
  fn = samplers.SAMPLERS[name]
  wave, _ = fn(analytic.gaussian_denoiser(mu, s2, proc), proc, x_T, jax.random.key(1), steps=6)
  flat, _ = fn(analytic.gaussian_denoiser(mu[:, 0], s2[:, 0], proc), proc, x_T[..., 0],
               jax.random.key(1), steps=6)
  assert wave.shape == (4, 16, 1)
  np.testing.assert_allclose(np.asarray(wave)[..., 0], np.asarray(flat), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_audio_iterations_searches_stores_and_tabulates(run, tmp_path):
  """experiments.audio_iterations on the smoke run: both searched schedules are stored with the
  run's process and reused by a second call, and the table has every row with its floor."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  workdir, _ = run
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, '-m', 'experiments.audio_iterations', f'--workdir={workdir}',
         '--num_samples=2', '--num_1000=1', '--seeds=0', '--search_clips=2',
         f'--out={tmp_path}']
  proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, 'schedules', 'wavegrad_6.json'), encoding='utf-8') as f:
    stored = json.load(f)
  assert stored['iterations'] == 6 and stored['process']['beta_end'] == 0.01
  with open(tmp_path / 'results.json', encoding='utf-8') as f:
    rows = json.load(f)['rows']
  assert [r['iterations'] for r in rows] == [6, 50, 50, 6, 50, 1000]
  assert all(r['lsd_floor'] > 0 for r in rows)
  again = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=1200)
  assert again.returncode == 0 and 'reusing' in again.stdout, again.stderr[-3000:]
