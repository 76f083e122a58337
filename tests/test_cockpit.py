"""The research cockpit's parts in-process: writer selection and resume, the best-checkpoint
keeper, reference statistics and the sample metric they feed. The whole loop with the real
writers (TensorBoard and W&B event files read back, grids, two in-loop FDs, the best step) is
test_cli.py's finished run."""

import json
import os
import struct
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import checkpointing
from diffusion_jax import evaluation
from diffusion_jax import metric_writer
from diffusion_jax import parallel
from diffusion_jax.data import digits
from diffusion_jax.metrics import digits_classifier
from diffusion_jax.metrics import frechet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def classifier(subprocess_cache):
  params, _ = digits_classifier.load_or_train_digits_classifier(subprocess_cache, seed=0)
  return params


def test_writer_names_are_checked_in_one_line(monkeypatch):
  assert metric_writer.parse_writers('tensorboard') == ('jsonl', 'tensorboard')
  assert metric_writer.parse_writers(' jsonl , wandb,') == ('jsonl', 'wandb')
  with pytest.raises(ValueError, match=r"unknown writer 'tensorbord'; choose from jsonl, "
                                       r'tensorboard, wandb') as e:
    metric_writer.parse_writers('jsonl,tensorbord')
  assert '\n' not in str(e.value)
  real = metric_writer.importlib.util.find_spec
  monkeypatch.setattr(metric_writer.importlib.util, 'find_spec',
                      lambda name: None if name == 'tensorboardX' else real(name))
  with pytest.raises(ValueError, match=r'pip install "diffusion_jax\[tb\]"'):
    metric_writer.parse_writers('tensorboard')


def _events(directory):
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = []
  for path in sorted(directory.glob('events.out.tfevents.*')):
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      out.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
      pos += 16 + length
  return out


def test_tensorboard_resume_hides_the_steps_past_the_checkpoint(tmp_path):
  first = metric_writer.TensorBoardWriter(tmp_path)
  for step in range(1, 11):
    first.write(step, {'loss': 1.0 / step})
  first.close()
  # Killed after step 10, resumed from the checkpoint of step 5: TensorBoard is told to drop
  # what the first run wrote from step 6 on (a SessionLog START at the purge step).
  second = metric_writer.TensorBoardWriter(tmp_path, resume_step=5)
  for step in range(6, 9):
    second.write(step, {'loss': 2.0 / step})
  second.close()
  events = _events(tmp_path)
  purges = [e.step for e in events if e.HasField('session_log') and e.session_log.status == 1]
  assert purges == [6]
  after = [(e.step, e.summary.value[0].simple_value) for e in events[events.index(
      next(e for e in events if e.HasField('session_log'))):] if e.summary.value]
  assert after == [(s, pytest.approx(2.0 / s)) for s in (6, 7, 8)]


@pytest.mark.parametrize('mode, values, best', [
    ('min', [5.0, 3.0, float('nan'), 4.0], 20),    # NaN (a diverged sampler) ranks last
    ('max', [30.0, float('nan'), 31.5, 29.0], 30),
])
def test_best_checkpoint_is_kept_across_a_resume(tmp_path, mode, values, best):
  directory = tmp_path / 'best'
  with checkpointing.Checkpointer(directory, max_to_keep=1, best_metric='m',
                                  best_mode=mode) as ckpt:
    for step, v in zip((10, 20, 30, 40), values, strict=True):
      ckpt.save(step, {'x': jnp.full(3, step, jnp.float32)}, {'step': step}, metrics={'m': v})
    ckpt.wait()
    assert ckpt.all_steps() == [best]
  worse = max(values[i] for i in range(4) if values[i] == values[i]) if mode == 'min' else -1.0
  with checkpointing.Checkpointer(directory, max_to_keep=1, best_metric='m',
                                  best_mode=mode) as ckpt:    # a resumed run's keeper
    ckpt.save(50, {'x': jnp.full(3, 50, jnp.float32)}, {'step': 50}, metrics={'m': worse})
    ckpt.wait()
    assert ckpt.all_steps() == [best]
    restored = ckpt.restore(best, {'x': jnp.zeros(3, jnp.float32)})
    np.testing.assert_array_equal(restored['x'], best)


def test_reference_statistics_of_the_test_digits_are_the_built_in_reference(
    classifier, tmp_path, subprocess_cache):
  features = lambda x: digits_classifier.classifier_features(classifier, x)
  test_x, test_y = digits.load_digits('test')
  source = _Source(test_x)
  streamed = evaluation.reference_stats(source, features, batch_size=64)   # 7 batches
  # The expected moments straight from numpy on all 450 feature vectors at once.
  f = np.asarray(features(test_x), np.float64)
  np.testing.assert_allclose(streamed.mean, f.mean(0), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(streamed.cov, np.cov(f, rowvar=False), rtol=1e-10, atol=1e-12)
  assert streamed.count == 450
  path = str(tmp_path / 'digits_test.npz')
  name = evaluation.digits_feature_name(classifier)
  frechet.save_stats(path, streamed.mean, streamed.cov, feature=name, count=450, split='test')
  assert frechet.load_stats_info(path) == {'feature': name, 'count': 450, 'split': 'test'}
  # The sample metric from that file gives the FD of the built-in reference (same moments).
  generated = digits_classifier.floor_subsample(300, seed=3)
  from_file = evaluation.SampleMetric('digits', None, subprocess_cache, reference_stats=path)
  built_in = digits_classifier.digits_fd(classifier, generated)
  assert from_file(generated)['fd'] == pytest.approx(built_in, rel=1e-9)
  # Statistics of another feature space are refused, in one line naming the file.
  frechet.save_stats(path, streamed.mean, streamed.cov, feature='inception_pool3:0123abcd')
  with pytest.raises(ValueError, match=r'digits_test.npz: statistics of features '
                                       r"'inception_pool3:0123abcd'") as e:
    evaluation.check_reference(path, name)
  assert '\n' not in str(e.value)


class _Source:
  def __init__(self, images):
    self.images = images

  def __len__(self):
    return len(self.images)

  def examples(self, indices):
    return {'image': self.images[np.asarray(indices)]}


def test_sample_metric_fd_floor_and_class_accuracy(classifier, subprocess_cache):
  metric = evaluation.SampleMetric('digits', None, subprocess_cache)
  real = digits_classifier.floor_subsample(200, seed=5)
  _, train_y = digits.load_digits('train')
  out = metric(real)
  assert metric.name == 'fd' and metric.mode == 'min'
  assert out['fd'] == pytest.approx(digits_classifier.digits_fd(classifier, real), rel=1e-12)
  assert out['fd_floor'] == pytest.approx(
      digits_classifier.digits_fd_floor(classifier, 200)[0], rel=1e-12)
  assert out['fd_ratio'] == pytest.approx(out['fd'] / out['fd_floor'])
  # 32x32 digits are measured at 8x8 (digits.to_native), as the final evaluation does.
  big, _ = digits.load_digits('train', 32)
  idx = np.arange(200)
  assert metric(big[idx])['fd'] == pytest.approx(metric(digits.load_digits('train')[0][idx])['fd'],
                                                 rel=1e-4)
  labels = np.arange(200) % 10
  assert metric(real, labels)['class_accuracy'] == pytest.approx(
      digits_classifier.classifier_accuracy(classifier, real, labels))


def test_map_batches_returns_pytrees_and_compiles_one_shape():
  mesh = parallel.make_mesh()
  shapes = []

  def fn(x):
    shapes.append(x.shape)   # traced once per distinct input shape
    return x.sum(axis=(1, 2, 3)), x[:, :1, :1, 0] * 2
  x = np.random.default_rng(0).normal(size=(23, 4, 4, 1)).astype(np.float32)
  total, corner = parallel.map_batches(fn, x, 10, mesh)
  np.testing.assert_allclose(total, x.sum(axis=(1, 2, 3)), rtol=1e-6, atol=1e-5)  # float32
  np.testing.assert_array_equal(corner, x[:, :1, :1, 0] * 2)
  assert len(shapes) == 1       # 10 + 10 + 3 rows: the last chunk padded to 10


# Suite time (~11 s of subprocesses): the statistics themselves are checked in-process above
# (reference_stats vs numpy moments), and the command with Inception by the slow FID test.
@pytest.mark.slow
def test_fid_stats_command_writes_digits_statistics_and_refuses_bad_flags(tmp_path,
                                                                        subprocess_cache):
  env = dict(os.environ, DIFFUSION_JAX_CACHE=subprocess_cache)
  out = tmp_path / 'ref.npz'
  run = lambda *flags: subprocess.run(
      [sys.executable, '-m', 'experiments.fid_stats', *flags], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=300)
  proc = run('--config=configs/digits.py', f'--out={out}', '--split=test', '--batch_size=100')
  assert proc.returncode == 0, proc.stderr[-2000:]
  info = frechet.load_stats_info(str(out))
  assert info['count'] == 450 and info['split'] == 'test'
  assert json.loads(info['data'])['name'] == 'digits'
  params, _ = digits_classifier.load_or_train_digits_classifier(subprocess_cache, seed=0)
  ref = digits_classifier.digits_reference_stats(params)
  mu, sigma = frechet.load_stats(str(out))
  np.testing.assert_allclose(mu, ref.mean, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(sigma, ref.cov, rtol=1e-8, atol=1e-12)
  proc = run('--config=configs/digits.py', f'--out={out}', '--config.data.name=toy2d')
  assert proc.returncode == 2 and 'toy2d' in proc.stderr.strip().splitlines()[-1]
  npy = tmp_path / 'x.npy'
  np.save(npy, np.zeros((4, 8, 8, 3), np.float32))
  proc = run('--config=configs/digits.py', f'--out={out}', '--config.data.name=npy',
             f'--config.data.path={npy}')
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: config.data.name='npy': --inception_weights is required (the converted FID "
      'Inception weights; docs/fid_inception.md)')


@pytest.fixture(scope='module')
def inception_file(tmp_path_factory):
  """Random FID-Inception weights (test_inception's), saved as a converted `.npz` would be."""
  from test_inception import _random_variables  # pylint: disable=g-import-not-at-top
  from diffusion_jax.metrics import inception  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp('inception') / 'fid_inception.npz')
  inception.save_inception_params(path, _random_variables())
  return path


def test_fid_metric_refuses_other_weights_and_other_feature_spaces(inception_file, tmp_path):
  from diffusion_jax.metrics import inception  # pylint: disable=g-import-not-at-top
  variables = inception.load_inception_params(inception_file)
  ref = str(tmp_path / 'ref.npz')
  rng = np.random.default_rng(0)
  a = rng.normal(size=(4, 4))
  frechet.save_stats(ref, rng.normal(size=4), a @ a.T, feature=inception.feature_name(variables))
  digest = inception.weights_digest(variables)
  metric = evaluation.SampleMetric('npy', None, '', reference_stats=ref,
                                   inception_weights=inception_file, inception_sha256=digest)
  assert metric.name == 'fid' and metric.mode == 'min'
  with pytest.raises(ValueError, match=f'is not the pinned {"0" * 64}') as e:
    evaluation.SampleMetric('npy', None, '', reference_stats=ref,
                            inception_weights=inception_file, inception_sha256='0' * 64)
  assert '\n' not in str(e.value)
  # Digits-classifier statistics cannot feed FID.
  frechet.save_stats(ref, rng.normal(size=4), a @ a.T, feature='digits_classifier:0123')
  with pytest.raises(ValueError, match=r"statistics of features 'digits_classifier:0123'"):
    evaluation.SampleMetric('npy', None, '', reference_stats=ref,
                            inception_weights=inception_file)


@pytest.mark.slow   # ~50 s: two Inception compiles at 299 x 299 on the CPU
def test_fid_of_the_reference_images_against_their_own_statistics_is_zero(inception_file,
                                                                         tmp_path):
  from diffusion_jax.metrics import inception  # pylint: disable=g-import-not-at-top
  variables = inception.load_inception_params(inception_file)
  images = np.random.default_rng(0).uniform(-1, 1, (12, 16, 16, 3)).astype(np.float32)
  images = np.round((images + 1) * 127.5) / 127.5 - 1    # 8-bit, as the metric quantises
  features = lambda x: inception.inception_features(variables, x, batch_size=12)[0]
  stats = evaluation.reference_stats(_Source(images), features, batch_size=12)
  ref = str(tmp_path / 'ref.npz')
  frechet.save_stats(ref, stats.mean, stats.cov, feature=inception.feature_name(variables),
                     count=stats.count)
  metric = evaluation.SampleMetric('npy', None, '', reference_stats=ref,
                                   inception_weights=inception_file)
  # Same images, same features up to the batch padding's float32 rounding: FID ~ 0 against a
  # trace of the covariance of order 1e2.
  assert metric(images)['fid'] < 1e-6 * np.trace(stats.cov)


@pytest.mark.slow   # ~1 min: fid_stats and a run on 2 devices with two in-loop FIDs
def test_fid_in_the_loop_on_image_data_over_two_devices(inception_file, tmp_path,
                                                        subprocess_cache):
  """Non-digit images: reference statistics from experiments.fid_stats, then a run whose
  in-loop FID (Inception over both devices) keeps the best step; the FID of the reference
  images against their own statistics is ~0 from the same command path."""
  images = np.random.default_rng(1).uniform(-1, 1, (32, 16, 16, 3)).astype(np.float32)
  data = tmp_path / 'images.npy'
  np.save(data, images)
  env = dict(os.environ, DIFFUSION_JAX_CACHE=subprocess_cache,
             XLA_FLAGS='--xla_force_host_platform_device_count=2')
  ref = tmp_path / 'ref.npz'
  common = ['--config=configs/digits.py:smoke', '--config.data.name=npy',
            f'--config.data.path={data}', '--config.model.attn_resolutions=(8,)']
  proc = subprocess.run([sys.executable, '-m', 'experiments.fid_stats', *common, f'--out={ref}',
                         f'--inception_weights={inception_file}', '--batch_size=8'], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '2 device(s)' in proc.stdout and frechet.load_stats_info(str(ref))['count'] == 32
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, '-m', 'experiments.train', *common, f'--workdir={workdir}',
       '--config.train.num_steps=10', '--config.eval.every=5', '--config.eval.num_samples=16',
       '--config.sample.grid_size=8', f'--config.eval.reference_stats={ref}',
       f'--config.eval.inception_weights={inception_file}'], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = [json.loads(ln) for ln in (workdir / 'metrics.jsonl').read_text().splitlines()]
  fids = {r['step']: r['in_loop/fid'] for r in records if 'in_loop/fid' in r}
  assert sorted(fids) == [5, 10] and all(v > 0 for v in fids.values())
  best = min(fids, key=fids.get)
  assert os.listdir(workdir / 'checkpoints_best') == [str(best)]
  result = json.loads((workdir / 'eval.json').read_text())
  assert result['fid'] > 0 and result['num_generated'] == 16
