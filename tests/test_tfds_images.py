"""TFDS image pipeline on `tfds.testing.mock_data` (the network is closed here): shapes and
ranges per preset, per-process disjoint shards whose union is the single-process batch, the
same batches after a restart, deterministic flips and dequantization, one-line errors."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from diffusion_jax.data import tfds_images

N = 40


@pytest.fixture()
def mock():
  with tfds.testing.mock_data(num_examples=N):
    yield


@pytest.mark.parametrize('name, shape', [
    ('cifar10', (32, 32, 3)), ('mnist', (28, 28, 1)), ('celeb_a', (64, 64, 3)),
    ('imagenet32', (32, 32, 3)),
])
def test_presets_give_shapes_ranges_and_labels(mock, name, shape):
  src = tfds_images.ImageSource(name)
  assert len(src) == N and src.image_shape == shape
  b = src.batch(seed=0, step=0, global_batch=8)
  assert b['image'].shape == (8, *shape) and b['image'].dtype == np.float32
  assert b['image'].min() >= -1.0 and b['image'].max() <= 1.0
  assert ('label' in b) == (tfds_images.PRESETS[name].label_key is not None)


def test_pixels_are_the_source_pixels_scaled(mock):
  src = tfds_images.ImageSource('cifar10', flip=False)
  raw = np.asarray(tfds.data_source('cifar10', split='train')[5]['image'], np.float32)
  np.testing.assert_array_equal(src.examples([5])['image'][0], raw / 127.5 - 1.0)
  deq = tfds_images.ImageSource('cifar10', flip=False, dequantize=True).examples([5])['image'][0]
  u = (deq + 1.0) * 128.0 - raw  # the added uniform noise
  assert u.min() >= 0.0 and u.max() < 1.0 and u.std() > 0.2


def test_process_shards_are_disjoint_and_make_up_the_batch(mock):
  src = tfds_images.ImageSource('cifar10')
  whole = src.batch(seed=3, step=7, global_batch=12)
  parts = [src.batch(seed=3, step=7, global_batch=12, process_index=p, process_count=3)
           for p in range(3)]
  np.testing.assert_array_equal(np.concatenate([p['image'] for p in parts]), whole['image'])
  np.testing.assert_array_equal(np.concatenate([p['label'] for p in parts]), whole['label'])
  with pytest.raises(ValueError, match='global batch 12 is not divisible by process_count=5'):
    src.batch(seed=3, step=7, global_batch=12, process_count=5)


def test_restart_at_step_k_gives_the_same_batches(mock):
  run = [tfds_images.ImageSource('cifar10').batch(1, s, 16)['image'] for s in range(6)]
  resumed = tfds_images.ImageSource('cifar10')  # a fresh process, as after a restart
  for s in (3, 4, 5):
    np.testing.assert_array_equal(resumed.batch(1, s, 16)['image'], run[s])
  # An epoch of 40 examples at batch 8 visits each example once.
  src = tfds_images.ImageSource('cifar10', flip=False)
  seen = np.concatenate([src.batch(2, s, 8)['image'] for s in range(5)])
  assert len({x.tobytes() for x in seen}) == N


def test_flips_are_keyed_by_position_and_about_half(mock):
  src = tfds_images.ImageSource('cifar10')
  plain = tfds_images.ImageSource('cifar10', flip=False)
  a = src.examples(np.zeros(200, int), seed=0, positions=np.arange(200))['image']
  base = plain.examples([0])['image'][0]
  flipped = np.array([np.array_equal(x, base[:, ::-1]) for x in a])
  same = np.array([np.array_equal(x, base) for x in a])
  assert np.all(flipped ^ same)
  assert abs(flipped.sum() - 100) < 4.5 * np.sqrt(50)  # Binomial(200, 1/2)


def test_missing_data_is_one_line_and_names_data_dir(tmp_path):
  with pytest.raises(ValueError) as e:
    tfds_images.ImageSource('cifar10', data_dir=str(tmp_path))
  msg = str(e.value)
  assert '\n' not in msg and str(tmp_path) in msg and 'tfds build cifar10' in msg
  with pytest.raises(ValueError, match="unknown preset 'cifar100'"):
    tfds_images.ImageSource('cifar100')


def test_the_training_loop_trains_on_mock_tfds_data(tmp_path):
  """One real run of the loop on TFDS data (`data.name='cifar10'`, class-conditional): the
  mock's 32x32x3 images and labels flow through build, the sharded batches, a checkpoint and
  sampling with guidance."""
  from configs import digits as digits_config  # pylint: disable=g-import-not-at-top
  from diffusion_jax import train_loop  # pylint: disable=g-import-not-at-top
  config = digits_config.get_config('smoke,mlp,cond')
  config.data = dict(name='cifar10')
  config.train.update(num_steps=2, batch_size=8, checkpoint_every=2, log_every=1)
  config.eval.enabled = False
  config.sample.update(steps=2, batch_size=4, grid_size=4)
  with tfds.testing.mock_data(num_examples=N):
    result = train_loop.train_and_evaluate(config, str(tmp_path))
  assert result['step'] == 2
  samples = np.load(tmp_path / 'samples.npy')
  assert samples.shape == (4, 32, 32, 3) and np.all(np.isfinite(samples))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2']


def test_any_tfds_dataset_by_name_and_keys(mock):
  from diffusion_jax.data import sources  # pylint: disable=g-import-not-at-top
  cfg = sources.DataConfig(name='tfds', tfds_name='cifar10', image_size=16, num_classes=10)
  src = sources.make_source(cfg)
  assert src.image_shape == (16, 16, 3) and src.num_classes == 10
  b = src.batch(seed=1, step=2, global_batch=4)
  assert b['image'].shape == (4, 16, 16, 3) and b['label'].shape == (4,)
  unlabelled = sources.make_source(sources.DataConfig(name='tfds', tfds_name='cifar10',
                                                      image_size=8, label_key=''))
  assert 'label' not in unlabelled.batch(seed=1, step=2, global_batch=4)
  with pytest.raises(ValueError, match="name='tfds' needs data.tfds_name and data.image_size"):
    sources.make_source(sources.DataConfig(name='tfds', tfds_name='cifar10'))
  with pytest.raises(ValueError, match="examples have no key 'pixels'"):
    sources.make_source(sources.DataConfig(name='tfds', tfds_name='cifar10', image_size=8,
                                           image_key='pixels'))
