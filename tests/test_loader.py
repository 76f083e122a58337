"""The grain loader (`data/loader.py`) against `source.batch`: identical batches at steps 0, 7 and
2999 for every kind of source, in this process and in worker processes; a resumed loader; the
rows of each process; one read per example; errors at their step. And the image-folder source:
labels from sub-folders, crop and resize, one-line errors naming the path."""

import os
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from diffusion_jax.data import latents
from diffusion_jax.data import loader
from diffusion_jax.data import sampler
from diffusion_jax.data import sources
from diffusion_jax.data import tfds_images

SEED, B, STEPS = 5, 8, (0, 7, 2999)
N_MOCK = 40


@pytest.fixture(scope='module')
def cifar10():
  """Mock CIFAR-10 with flips and dequantization on (per-example randomness to match)."""
  with tfds.testing.mock_data(num_examples=N_MOCK):
    yield tfds_images.ImageSource('cifar10', flip=True, dequantize=True)


def _png_folder(root, classes=('cat', 'dog'), per_class=9, shape=(12, 10, 3), seed=0):
  rng = np.random.default_rng(seed)
  for c in classes:
    os.makedirs(root / c, exist_ok=True)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 256, shape, np.uint8).squeeze()).save(root / c / f'{i}.png')
  return root


@pytest.fixture()
def folder_source(tmp_path):
  _png_folder(tmp_path / 'images')
  return sources.make_source(sources.DataConfig(name='folder', path=str(tmp_path / 'images'),
                                                image_size=8, flip=True, dequantize=True))


def _make(name, tmp_path, cifar10, folder_source):
  if name == 'digits':
    return sources.make_source(sources.DataConfig())
  if name == 'npy':
    rng = np.random.default_rng(1)
    np.save(tmp_path / 'x.npy', rng.normal(size=(30, 4, 4, 2)).astype(np.float32))
    np.save(tmp_path / 'y.npy', rng.integers(0, 3, 30))
    return sources.make_source(sources.DataConfig(name='npy', path=str(tmp_path / 'x.npy'),
                                                  labels_path=str(tmp_path / 'y.npy')))
  if name == 'latents':      # scaled by the stored factor, example by example
    rng = np.random.default_rng(2)
    np.save(tmp_path / 'latents.npy', rng.normal(size=(30, 2, 2, 3)).astype(np.float32))
    latents.write_info(str(tmp_path), {'scale_factor': 0.3, 'latent_shape': [2, 2, 3]})
    return sources.make_source(sources.DataConfig(name='latents', path=str(tmp_path)))
  if name == 'toy2d':
    return sources.make_source(sources.DataConfig(name='toy2d'))
  return cifar10 if name == 'cifar10' else folder_source


def _assert_same(got, want):
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _load(source, start, stop, **kw):
  with loader.batches(source, SEED, B, start, stop, **kw) as it:
    got = list(it)
  assert [s for s, _ in got] == list(range(start, stop))
  return dict(got)


@pytest.mark.parametrize('name', ['digits', 'npy', 'latents', 'toy2d', 'cifar10', 'folder'])
def test_grain_batches_equal_source_batches(name, tmp_path, cifar10, folder_source):
  source = _make(name, tmp_path, cifar10, folder_source)
  for step in STEPS:
    _assert_same(_load(source, step, step + 1)[step], source.batch(SEED, step, B))
  # Steps 5-7 again through grain's read threads and without the prefetching thread.
  got = _load(source, 5, 8, num_threads=2, prefetch=0)
  for step in (5, 6, 7):
    _assert_same(got[step], source.batch(SEED, step, B))


def test_batches_follow_the_sampler_order_and_position_keys(cifar10):
  """An oracle written here from the documented rule: row r of batch `step` is example
  `batch_indices(...)[r]`; Philox keyed by (seed, step * B + r) draws the flip coin, then the
  dequantization noise u: `(x + u) / 128 - 1`. (CIFAR-10 is 32x32: no crop or resize.)"""
  step = 2999
  got = _load(cifar10, step, step + 1)[step]
  for r, i in enumerate(sampler.batch_indices(SEED, step, B, N_MOCK)):
    raw = cifar10._source[int(i)]
    x = np.asarray(raw['image'], np.float32)
    rng = np.random.Generator(np.random.Philox(key=[SEED, step * B + r]))
    if rng.random() < 0.5:
      x = x[:, ::-1]
    want = (x + rng.random(x.shape).astype(np.float32)) / 128.0 - 1.0
    np.testing.assert_array_equal(got['image'][r], want)
    assert got['label'][r] == raw['label']


def test_resumed_loader_gives_the_same_batches(cifar10):
  whole = _load(cifar10, 0, 8)
  resumed = _load(cifar10, 5, 8)
  for step in (5, 6, 7):
    _assert_same(resumed[step], whole[step])


def test_each_process_gets_its_rows_of_the_global_batch(cifar10):
  digits = sources.make_source(sources.DataConfig())
  for source in (cifar10, digits):
    whole = _load(source, 6, 8)
    for p in range(4):
      part = _load(source, 6, 8, process_index=p, process_count=4)
      for step in (6, 7):
        for k in whole[step]:
          np.testing.assert_array_equal(part[step][k], whole[step][k][2 * p:2 * p + 2])
  with pytest.raises(ValueError, match='global batch 8 is not divisible by process_count=3'):
    loader.batches(cifar10, SEED, B, 0, 1, 0, 3)


class _CountingReads:
  """A data source that counts its reads."""

  def __init__(self, source):
    self.source, self.reads = source, 0

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    self.reads += 1
    return self.source[i]


def test_each_example_is_read_once(cifar10):
  counting = _CountingReads(cifar10._source)
  cifar10._source = counting
  try:
    batch = _load(cifar10, 3, 4)[3]
    assert counting.reads == B and batch['label'].shape == (B,)
    counting.reads = 0
    cifar10.batch(SEED, 3, B)         # the direct path reads once per example too
    assert counting.reads == B
  finally:
    cifar10._source = counting.source


def test_worker_processes_give_the_same_batches_and_raise_at_the_failing_step(tmp_path):
  """Two spawned workers on a folder of 100 images: batches 0..k-1 equal `source.batch` (k > 7),
  and the image that first appears at step k, made unreadable, fails that step on one line."""
  folder_source = _folder(_png_folder(tmp_path, per_class=50), image_size=8, flip=True)
  n = len(folder_source)
  first_use = {}
  for step in range(40):
    for i in sampler.batch_indices(SEED, step, B, n):
      first_use.setdefault(int(i), step)
  bad, k = max(first_use.items(), key=lambda item: item[1])
  assert k > 7
  with open(folder_source.files[bad], 'wb') as f:
    f.write(b'not an image')
  it = loader.batches(folder_source, SEED, B, 0, k + 3, num_workers=2)
  try:
    for step in range(k):
      got_step, got = next(it)
      assert got_step == step
      _assert_same(got, folder_source.batch(SEED, step, B))
    with pytest.raises(loader.LoadError) as e:
      next(it)
  finally:
    it.close()
  msg = str(e.value)
  assert msg.startswith(f'data: step {k}: ValueError') and '\n' not in msg
  assert folder_source.files[bad] in msg


@pytest.mark.slow   # suite time (~4 s): workers are also run by the test above, on a folder
def test_workers_read_mock_tfds_and_resume(cifar10):
  """Mock CIFAR-10 (flips, dequantization) in two workers from step 2998: the batches of an
  in-process loader and of `source.batch`."""
  got = _load(cifar10, 2998, 3001, num_workers=2)
  for step in (2998, 2999, 3000):
    _assert_same(got[step], cifar10.batch(SEED, step, B))


@pytest.mark.slow
@pytest.mark.parametrize('name', ['digits', 'npy', 'toy2d', 'cifar10', 'folder'])
def test_every_source_in_workers(name, tmp_path, cifar10, folder_source):
  source = _make(name, tmp_path, cifar10, folder_source)
  got = _load(source, 5, 8, num_workers=2, num_threads=1)
  for step in (5, 6, 7):
    _assert_same(got[step], source.batch(SEED, step, B))


def test_in_process_errors_are_raised_at_their_step():
  def failing(index, seed, position):
    del seed
    if position // B == 4:
      raise ValueError(f'example {index}\nwith a second line')
    return {'image': np.full((2,), position, np.float32)}
  source = _Examples(failing, 100)
  it = loader.batches(source, 0, B, 2, 9, prefetch=2)
  assert [next(it)[0], next(it)[0]] == [2, 3]
  with pytest.raises(loader.LoadError, match=r'^data: step 4: ValueError: example \d+ with a '
                                               r'second line$'):
    next(it)
  it.close()
  for key, value in (('num_workers', -1), ('prefetch', 1.5)):
    with pytest.raises(ValueError, match=f'{key}={value}'):
      loader.batches(source, 0, B, 0, 1, **{key: value})


class _Examples:
  def __init__(self, example, n):
    self.example, self.n = example, n

  def __len__(self):
    return self.n


def test_memory_mapped_arrays_travel_by_file_name(tmp_path):
  x = np.arange(2 * 3 * 2 * 1000, dtype=np.float32).reshape(1000, 3, 2, 2)
  np.save(tmp_path / 'x.npy', x)
  src = sources.make_source(sources.DataConfig(name='npy', path=str(tmp_path / 'x.npy')))
  data = pickle.dumps(src)
  assert len(data) < 2000 < x.nbytes
  again = pickle.loads(data)
  assert isinstance(again.images, np.memmap)
  _assert_same(again.batch(1, 2, 16), src.batch(1, 2, 16))


# --- the image-folder source ---------------------------------------------------------------

def _folder(path, **kw):
  return sources.make_source(sources.DataConfig(name='folder', path=str(path), **kw))


def test_folder_labels_are_sorted_sub_folder_names(tmp_path):
  _png_folder(tmp_path, classes=('zebra', 'ant', 'moth'), per_class=3)
  src = _folder(tmp_path, image_size=8)
  assert src.num_classes == 3 and len(src) == 9 and src.image_shape == (8, 8, 3)
  assert src.classes == ['ant', 'moth', 'zebra']
  for i, path in enumerate(src.files):
    assert src.example(i)['label'] == ['ant', 'moth', 'zebra'].index(os.path.basename(
        os.path.dirname(path)))
  assert src.files == sorted(src.files)
  b = src.batch(0, 0, 4)
  assert b['image'].dtype == np.float32 and b['label'].dtype == np.int32
  flat = tmp_path / 'flat'
  flat.mkdir()
  for name in ('b.png', 'a.jpg', 'notes.txt', '.hidden.png'):
    path = flat / name
    if name.endswith('txt'):
      path.write_text('not an image')
    else:
      Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(path)
  unlabelled = _folder(flat)
  assert unlabelled.num_classes == 0 and len(unlabelled) == 2
  assert [os.path.basename(f) for f in unlabelled.files] == ['a.jpg', 'b.png']
  assert 'label' not in unlabelled.batch(0, 0, 2) and unlabelled.image_shape == (5, 5, 3)


def test_folder_images_are_centre_cropped_resized_and_scaled(tmp_path):
  """The expected pixels are made here with PIL from the stored array, not by the library."""
  rng = np.random.default_rng(3)
  wide = rng.integers(0, 256, (12, 20, 3), np.uint8)     # H 12, W 20: crop columns 4..16
  Image.fromarray(wide).save(tmp_path / 'wide.png')
  Image.fromarray(rng.integers(0, 256, (12, 12), np.uint8)).save(tmp_path / 'x_grey.png')
  src = _folder(tmp_path, image_size=6)
  want = np.asarray(Image.fromarray(wide[:, 4:16]).resize((6, 6), Image.BOX), np.float32)
  np.testing.assert_array_equal(src.example(0)['image'], want / 127.5 - 1.0)
  # Up-sampling is bicubic, and crop=8 takes the centre 8x8 first.
  src = _folder(tmp_path, image_size=16, crop=8)
  want = np.asarray(Image.fromarray(wide[2:10, 6:14]).resize((16, 16), Image.BICUBIC),
                    np.float32)
  np.testing.assert_array_equal(src.example(0)['image'], want / 127.5 - 1.0)
  # No size: the shorter side of the first image; a greyscale image in an RGB set is RGB.
  src = _folder(tmp_path)
  assert src.image_shape == (12, 12, 3) and src.example(1)['image'].shape == (12, 12, 3)
  assert np.ptp(src.example(1)['image'], axis=-1).max() == 0
  # Flips: keyed by (seed, position), mirror images of the unflipped example.
  flipping = _folder(tmp_path, image_size=6, flip=True)
  plain = _folder(tmp_path, image_size=6).example(0)['image']
  flips = [np.array_equal(flipping.example(0, 0, p)['image'], plain[:, ::-1]) for p in range(40)]
  assert 5 < sum(flips) < 35
  assert all(f or np.array_equal(flipping.example(0, 0, p)['image'], plain)
             for p, f in enumerate(flips))


def test_folder_of_greyscale_images_has_one_channel(tmp_path):
  _png_folder(tmp_path, classes=('a', 'b'), per_class=2, shape=(9, 9, 1))
  src = _folder(tmp_path, image_size=4)
  assert src.image_shape == (4, 4, 1) and src.batch(0, 0, 4)['image'].shape == (4, 4, 4, 1)


def _one_line_error(fn, *parts):
  with pytest.raises(ValueError) as e:
    fn()
  msg = str(e.value)
  assert '\n' not in msg, msg
  for part in parts:
    assert str(part) in msg, (part, msg)
  return msg


def test_folder_bad_input_is_named_on_one_line(tmp_path):
  _one_line_error(lambda: _folder(tmp_path / 'nope'), 'config.data.path', tmp_path / 'nope',
                  'no such directory')
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'readme.txt').write_text('hi')
  _one_line_error(lambda: _folder(empty), 'config.data.path', empty, 'no .png/.jpg/.jpeg')
  mixed = _png_folder(tmp_path / 'mixed', classes=('a',), per_class=1)
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(mixed / 'loose.png')
  _one_line_error(lambda: _folder(mixed), 'config.data.path', mixed, "'loose.png'", "'a'",
                  'mixes image files')
  hollow = _png_folder(tmp_path / 'hollow', classes=('a',), per_class=1)
  (hollow / 'b').mkdir()
  _one_line_error(lambda: _folder(hollow), hollow, "class folder 'b' holds no")
  broken = tmp_path / 'broken'
  broken.mkdir()
  (broken / 'a.png').write_bytes(b'\x89PNG truncated')
  _one_line_error(lambda: _folder(broken), 'config.data.path', broken / 'a.png',
                  'cannot read image')
  later = _png_folder(tmp_path / 'later', classes=('a',), per_class=3)
  src = _folder(later)
  (later / 'a' / '2.png').write_bytes(b'')
  _one_line_error(lambda: src.examples([2]), later / 'a' / '2.png', 'cannot read image')
  _one_line_error(lambda: _folder(later, split='test'), "config.data.split='test'")
  _one_line_error(lambda: _folder(later, crop=-1), 'config.data.crop=-1')
  _one_line_error(lambda: sources.make_source(sources.DataConfig(name='folder')),
                  'config.data.path')
  _one_line_error(lambda: sources.make_source(sources.DataConfig(name='npy', image_size=8)),
                  'config.data.image_size=8')
