"""The FID InceptionV3: size against the reference network, shapes, resize convention, and the
torch-free weight converter (a randomly initialised network stands in for the real weights)."""

import collections
import io
import pickle
import re
import struct
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from diffusion_jax.metrics import inception
from diffusion_jax.metrics.classifier_scores import inception_score
from diffusion_jax.metrics.frechet import FeatureStats
from diffusion_jax.weights import fid_inception
from diffusion_jax.weights import torch_files

# pytorch-fid's `fid_inception_v3()` is torchvision's `Inception3(num_classes=1008,
# aux_logits=False)` with patched blocks; `sum(p.numel() for p in model.parameters())` is
# 23,850,960 (conv kernels, BatchNorm weight and bias, fc weight and bias; measured with
# pytorch-fid 0.3.0, torchvision 0.28). From torchvision's published count for inception_v3
# (`Inception_V3_Weights.IMAGENET1K_V1.meta['num_params']` = 27,161,264, with AuxLogits and 1000
# classes): minus AuxLogits (conv0 768->128 1x1 + BN, conv1 128->768 5x5 + BN, fc 768->1000),
# plus 8 more classes of 2048 weights and a bias.
_AUX_LOGITS = (768 * 128 + 2 * 128) + (128 * 768 * 25 + 2 * 768) + (768 * 1000 + 1000)
NUM_PARAMS = 27_161_264 - _AUX_LOGITS + 8 * (2048 + 1)
assert NUM_PARAMS == 23_850_960
# The BatchNorm running means and variances (buffers, not parameters): 2 x 17,216 channels.
NUM_BATCH_STATS = 34_432
NUM_CONV_LAYERS = 94  # BasicConv2d modules: 5 stem + 3 x 7 + 4 + 4 x 10 + 6 + 2 x 9
# pytorch-fid's state dict: 5 tensors per BasicConv2d (conv.weight, bn.weight / bias /
# running_mean / running_var), BatchNorm's num_batches_tracked, fc.weight and fc.bias.
NUM_STATE_DICT_KEYS = NUM_CONV_LAYERS * 6 + 2  # 566


def _random_variables(seed=0):
  """He-normal kernels and plausible BatchNorm statistics, so activations stay O(1)."""
  rng = np.random.default_rng(seed)
  flat = {}
  for key, shape in inception.variable_shapes().items():
    leaf = key.rsplit('/', 1)[1]
    if key.endswith('conv/kernel'):
      value = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:3])), shape)
    elif leaf == 'kernel':  # fc
      value = rng.normal(0.0, np.sqrt(1.0 / shape[0]), shape)
    elif leaf in ('scale', 'var'):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # bias, mean
      value = rng.normal(0.0, 0.1, shape)
    flat[key] = value.astype(np.float32)
  return traverse_util.unflatten_dict(flat, sep='/')


@pytest.fixture(scope='module')
def variables():
  return _random_variables()


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(1).uniform(-1.0, 1.0, (3, 32, 32, 3)).astype(np.float32)


def _abstract_variables():
  return traverse_util.unflatten_dict(
      {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in inception.variable_shapes().items()},
      sep='/')


def _count(prefix):
  return sum(int(np.prod(s)) for k, s in inception.variable_shapes().items()
             if k.startswith(prefix))


def test_parameter_count_matches_the_pytorch_fid_network():
  assert _count('params/') == NUM_PARAMS
  assert _count('batch_stats/') == NUM_BATCH_STATS
  kernels = [k for k in inception.variable_shapes() if k.endswith('conv/kernel')]
  assert len(kernels) == NUM_CONV_LAYERS
  assert _count('params/fc/') == 2048 * 1008 + 1008


@pytest.mark.parametrize('shape', [(2, 8, 8, 1), (3, 32, 32, 3), (2, 299, 299, 3),
                                   (1, 64, 48, 3)])
def test_output_shapes(shape):
  out = jax.eval_shape(inception.InceptionV3().apply, _abstract_variables(),
                       jax.ShapeDtypeStruct(shape, jnp.float32))
  assert [o.shape for o in out] == [(shape[0], 2048), (shape[0], 1008)]


@pytest.mark.slow  # suite time; the network is checked at 299 by the other tests
def test_features_for_several_input_sizes_one_network_compile(variables):
  rng = np.random.default_rng(2)
  for shape in [(8, 8, 1), (32, 32, 3), (299, 299, 3)]:
    x = rng.uniform(-1.0, 1.0, (3,) + shape).astype(np.float32)
    feats, logits = inception.inception_features(variables, x, batch_size=2)  # padded last chunk
    assert feats.shape == (3, 2048) and logits.shape == (3, 1008)
    assert feats.dtype == np.float32 and np.all(np.isfinite(feats)) and np.all(feats >= 0.0)
    assert np.std(feats) > 0.0
  empty = inception.inception_features(variables, np.zeros((0, 8, 8, 3), np.float32))
  assert empty[0].shape == (0, 2048) and empty[1].shape == (0, 1008)


@pytest.mark.slow  # suite time
def test_grayscale_is_repeated_to_rgb_and_chunking_does_not_matter(variables):
  gray = np.random.default_rng(3).uniform(-1.0, 1.0, (3, 16, 16, 1)).astype(np.float32)
  f1, l1 = inception.inception_features(variables, gray, batch_size=2)
  f3, l3 = inception.inception_features(variables, np.repeat(gray, 3, axis=-1), batch_size=2)
  np.testing.assert_array_equal(f1, f3)
  np.testing.assert_array_equal(l1, l3)
  # One image per chunk: a different program, the same numbers up to float rounding.
  f_one, _ = inception.inception_features(variables, gray[:1], batch_size=1)
  np.testing.assert_allclose(f_one, f1[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.slow   # ~8-16 s; moved out of the default run (its 10-minute budget)
def test_logits_bias_and_downstream_metrics(variables, images):
  feats, unbiased = inception.inception_features(variables, images, batch_size=2)
  _, biased = inception.inception_features(variables, images, batch_size=2, logits_bias=True)
  fc = variables['params']['fc']
  np.testing.assert_allclose(unbiased, feats @ fc['kernel'], rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(biased, unbiased + fc['bias'], rtol=1e-5, atol=1e-4)
  mean, _ = inception_score(unbiased, splits=1)
  assert 1.0 <= mean <= 1008.0
  assert FeatureStats.from_features(feats).mean.shape == (2048,)


def test_input_errors(variables):
  with pytest.raises(ValueError, match=r'float images.*uint8'):
    inception.inception_features(variables, np.zeros((2, 8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match=r'\[N, H, W, C\] with C = 1 or 3.*\(2, 8, 8, 4\)'):
    inception.inception_features(variables, np.zeros((2, 8, 8, 4), np.float32))


# -- The resize convention: bilinear, half-pixel centres, no antialiasing (pytorch-fid's
# F.interpolate(align_corners=False)). Output pixel i samples u = (i + 0.5) * n_in / n_out - 0.5.


def _resize(x, size):
  x = jnp.asarray(x, jnp.float32)[None, :, :, None]  # [1, H, W, 1]
  return np.asarray(inception.resize_bilinear(x, size))[0, :, :, 0]


def test_resize_upsampling_clamps_at_the_edges():
  # 2 -> 4: u = -0.25, 0.25, 0.75, 1.25, i.e. fractions 0, 0.25, 0.75, 1 between the two
  # pixels once the samples outside [0, 1] take the edge pixel. x = c + 2 r is bilinear, so the
  # output is c + 2 r at those fractions.
  got = _resize([[0.0, 1.0], [2.0, 3.0]], 4)
  want = [[0.0, 0.25, 0.75, 1.0],
          [0.5, 0.75, 1.25, 1.5],
          [1.5, 1.75, 2.25, 2.5],
          [2.0, 2.25, 2.75, 3.0]]
  np.testing.assert_allclose(got, want, atol=1e-6)
  # align_corners=True would sample at 0, 1/3, 2/3, 1 instead.
  assert abs(got[0, 1] - 1.0 / 3.0) > 0.05


def test_resize_downsampling_without_antialias():
  # 4 -> 2: u = 0.5, 2.5, the midpoints of pixel pairs: plain 2x2 block means. An antialiased
  # resize (a triangle twice as wide) spreads each pixel further; TF1's legacy op (u = 2 i)
  # would read pixels 0 and 2 only and give all zeros here.
  x = np.zeros((4, 4))
  x[1, 1], x[3, 3] = 4.0, 8.0
  np.testing.assert_allclose(_resize(x, 2), [[1.0, 0.0], [0.0, 2.0]], atol=1e-6)
  antialiased = jax.image.resize(jnp.asarray(x)[None, :, :, None], (1, 2, 2, 1), 'bilinear')
  assert not np.allclose(np.asarray(antialiased)[0, :, :, 0], [[1.0, 0.0], [0.0, 2.0]])


def test_resize_non_integer_ratio_and_identity():
  # 3 -> 2: u = 0.25, 1.75; the centre pixel has weight 0.25 at both, in both axes.
  x = np.zeros((3, 3))
  x[1, 1] = 16.0
  np.testing.assert_allclose(_resize(x, 2), np.ones((2, 2)), atol=1e-6)
  y = np.random.default_rng(4).normal(size=(299, 299))
  np.testing.assert_array_equal(_resize(y, 299), y.astype(np.float32))


# -- Weights: the state-dict name map and the torch-format converter.


def test_name_map_covers_every_layer_with_the_reference_shapes():
  shapes = fid_inception.state_dict_shapes()
  assert len(shapes) == NUM_CONV_LAYERS * 5 + 2
  assert len(set(shapes)) == len(inception.variable_shapes())  # one torch name per variable
  # Shapes as torchvision's Inception3 / pytorch-fid define the layers: [O, I, kh, kw].
  reference = {
      'Conv2d_1a_3x3.conv.weight': (32, 3, 3, 3),
      'Conv2d_4a_3x3.conv.weight': (192, 80, 3, 3),
      'Mixed_5b.branch5x5_2.conv.weight': (64, 48, 5, 5),
      'Mixed_5b.branch_pool.conv.weight': (32, 192, 1, 1),
      'Mixed_5d.branch_pool.conv.weight': (64, 288, 1, 1),
      'Mixed_6a.branch3x3.conv.weight': (384, 288, 3, 3),
      'Mixed_6b.branch7x7_2.conv.weight': (128, 128, 1, 7),
      'Mixed_6e.branch7x7dbl_4.conv.weight': (192, 192, 7, 1),
      'Mixed_7a.branch3x3_2.conv.weight': (320, 192, 3, 3),
      'Mixed_7b.branch3x3dbl_1.conv.weight': (448, 1280, 1, 1),
      'Mixed_7c.branch3x3_2b.conv.weight': (384, 384, 3, 1),
      'Mixed_7c.branch_pool.bn.running_var': (192,),
      'fc.weight': (1008, 2048),
      'fc.bias': (1008,),
  }
  for name, shape in reference.items():
    assert shapes[name] == shape, name
  prefixes = {n.rsplit('.', 2)[0] for n in shapes if '.conv.' in n or '.bn.' in n}
  assert len(prefixes) == NUM_CONV_LAYERS
  for p in prefixes:
    assert {f'{p}.conv.weight', f'{p}.bn.weight', f'{p}.bn.bias', f'{p}.bn.running_mean',
            f'{p}.bn.running_var'} <= set(shapes), p


def test_state_dict_round_trip_is_exact(variables):
  sd = fid_inception.variables_to_state_dict(variables)
  assert len(sd) == NUM_STATE_DICT_KEYS
  assert sd['Mixed_5b.branch1x1.bn.num_batches_tracked'].dtype == np.int64
  assert sd['fc.weight'].shape == (1008, 2048)
  np.testing.assert_array_equal(sd['fc.weight'], variables['params']['fc']['kernel'].T)
  k = variables['params']['Mixed_6b']['branch7x7_2']['conv']['kernel']  # [1, 7, 128, 128]
  np.testing.assert_array_equal(sd['Mixed_6b.branch7x7_2.conv.weight'][3, 5, 0, 6], k[0, 6, 5, 3])
  back = traverse_util.flatten_dict(fid_inception.state_dict_to_variables(sd), sep='/')
  flat = traverse_util.flatten_dict(variables, sep='/')
  assert back.keys() == flat.keys()
  for key in flat:
    np.testing.assert_array_equal(back[key], flat[key])


def test_save_convert_load_gives_identical_features(variables, images, tmp_path):
  pth = str(tmp_path / 'pt_inception-2015-12-05-6726825d.pth')
  torch_files.save_torch_state_dict(pth, fid_inception.variables_to_state_dict(variables))
  converted = fid_inception.convert_pytorch_fid_weights(pth, str(tmp_path / 'fid_inception.npz'))
  loaded = inception.load_inception_params(str(tmp_path / 'fid_inception.npz'))
  want = inception.inception_features(variables, images, batch_size=2)
  for vs in (converted, loaded):
    got = inception.inception_features(vs, images, batch_size=2)
    np.testing.assert_array_equal(got[0], want[0])  # bit for bit
    np.testing.assert_array_equal(got[1], want[1])


def test_legacy_format_reads_the_same_arrays(variables, tmp_path):
  # pytorch-fid's file dates from 2019 (torch 1.1), before the zip format became the default.
  sd = fid_inception.variables_to_state_dict(variables)
  torch_files.save_torch_state_dict(str(tmp_path / 'legacy.pth'), sd, legacy=True)
  got = torch_files.load_torch_state_dict(str(tmp_path / 'legacy.pth'))
  assert list(got) == list(sd)
  for name, value in sd.items():
    assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
    np.testing.assert_array_equal(got[name], value)


class _Global(str):
  """A global named in a pickle; calling it records the call instead of making it."""

  def __call__(self, *args):
    return ('call', str(self), args)


class _FactsUnpickler(pickle.Unpickler):
  """Reads data.pkl into plain tuples, to check the layout against torch's documented format."""

  def find_class(self, module, name):
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    return _Global(f'{module}.{name}')

  def persistent_load(self, pid):
    return ('pid', pid)


def test_zip_layout_follows_torch_save(tmp_path):
  sd = collections.OrderedDict(
      [('w', np.arange(6, dtype=np.float32).reshape(2, 3)), ('n', np.zeros((), np.int64))])
  path = tmp_path / 'weights.pth'
  torch_files.save_torch_state_dict(str(path), sd)
  raw = path.read_bytes()
  with zipfile.ZipFile(path) as z:
    names = z.namelist()
    assert names[0] == 'weights/data.pkl' and {'weights/data/0', 'weights/data/1'} <= set(names)
    assert z.read('weights/version') == b'3\n' and z.read('weights/byteorder') == b'little'
    for info in z.infolist():
      assert info.compress_type == zipfile.ZIP_STORED
      name_len, extra_len = struct.unpack('<HH', raw[info.header_offset + 26:][:4])
      assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
    data_pkl = z.read('weights/data.pkl')
    assert z.read('weights/data/0') == sd['w'].tobytes()
  assert data_pkl[:2] == b'\x80\x02'  # pickle protocol 2
  obj = _FactsUnpickler(io.BytesIO(data_pkl)).load()
  assert list(obj) == ['w', 'n']
  # _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks),
  # storage = persistent id ('storage', storage_type, key, location, numel).
  for name, storage_type, key, numel, size, stride in [
      ('w', 'torch.FloatStorage', '0', 6, (2, 3), (3, 1)),
      ('n', 'torch.LongStorage', '1', 1, (), ())]:
    kind, fn, args = obj[name]
    assert (kind, fn) == ('call', 'torch._utils._rebuild_tensor_v2')
    assert args[0] == ('pid', ('storage', storage_type, key, 'cpu', numel))
    assert args[1:] == (0, size, stride, False, collections.OrderedDict())


def test_reader_refuses_foreign_globals(tmp_path):
  # Unrestricted, this pickle would call os.system('true').
  payload = b'\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R.'
  zip_path = tmp_path / 'evil.pth'
  with zipfile.ZipFile(zip_path, 'w') as z:
    z.writestr('evil/data.pkl', payload)
  legacy_path = tmp_path / 'evil_legacy.pth'
  legacy_path.write_bytes(b''.join(pickle.dumps(o, protocol=2) for o in (
      0x1950a86a20f9469cfc6c, 1001, {'little_endian': True})) + payload)
  for path in (zip_path, legacy_path):
    with pytest.raises(ValueError, match=rf'{re.escape(str(path))}.*os\.system') as err:
      torch_files.load_torch_state_dict(str(path))
    assert '\n' not in str(err.value)


def test_reader_and_converter_errors_are_one_line_and_name_file_and_key(variables, tmp_path):
  sd = fid_inception.variables_to_state_dict(variables)
  cases = {
      'missing': ({k: v for k, v in sd.items() if k != 'Mixed_6c.branch1x1.conv.weight'},
                  r"missing 'Mixed_6c\.branch1x1\.conv\.weight'"),
      'shape': (dict(sd, **{'fc.weight': np.zeros((1000, 2048), np.float32)}),
                r"'fc\.weight' has shape \(1000, 2048\).*\(1008, 2048\)"),
      'unexpected': (dict(sd, **{'AuxLogits.fc.weight': np.zeros((1000, 768), np.float32)}),
                     r"unexpected 'AuxLogits\.fc\.weight'"),
  }
  for name, (state_dict, pattern) in cases.items():
    pth = str(tmp_path / f'{name}.pth')
    torch_files.save_torch_state_dict(pth, state_dict)
    with pytest.raises(ValueError, match=rf'{re.escape(pth)}: .*{pattern}') as err:
      fid_inception.convert_pytorch_fid_weights(pth, str(tmp_path / f'{name}.npz'))
    assert '\n' not in str(err.value)
  (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
  for bad, pattern in [('absent.pth', 'cannot read'), ('junk.pth', 'is neither a torch.save')]:
    path = re.escape(str(tmp_path / bad))
    with pytest.raises(ValueError, match=rf'load_torch_state_dict: (cannot read )?{path}') as err:
      torch_files.load_torch_state_dict(str(tmp_path / bad))
    assert pattern in str(err.value) and '\n' not in str(err.value)


def test_loader_errors_are_one_line_and_name_file_and_key(variables, tmp_path):
  good = str(tmp_path / 'good.npz')
  inception.save_inception_params(good, variables)
  flat = traverse_util.flatten_dict(inception.load_inception_params(good), sep='/')
  renamed = dict(flat)
  renamed['params/Mixed_5b/branch1x1/conv/kernel_'] = renamed.pop(
      'params/Mixed_5b/branch1x1/conv/kernel')
  reshaped = dict(flat, **{'batch_stats/Mixed_7c/branch_pool/bn/var': np.ones(7, np.float32)})
  cases = [
      (renamed, r"lacks 'params/Mixed_5b/branch1x1/conv/kernel'"),
      ({k: v for k, v in flat.items() if not k.startswith('params/fc/')},
       r"lacks 'params/fc/bias' \(and 1 more\)"),
      (reshaped, r"'batch_stats/Mixed_7c/branch_pool/bn/var' has shape \(7,\), InceptionV3 "
                 r"expects \(192,\)"),
  ]
  for i, (arrays, pattern) in enumerate(cases):
    path = str(tmp_path / f'bad{i}.npz')
    with open(path, 'wb') as f:
      np.savez(f, **arrays)
    with pytest.raises(ValueError, match=rf'load_inception_params: {re.escape(path)}.*{pattern}'
                       ) as err:
      inception.load_inception_params(path)
    assert '\n' not in str(err.value)
  for path, pattern in [(str(tmp_path / 'absent.npz'), 'does not exist'),
                        (str(tmp_path / 'bad0.npz.txt'), 'cannot read')]:
    if path.endswith('.txt'):
      with open(path, 'w') as f:
        f.write('not an npz')
    with pytest.raises(ValueError, match=rf'load_inception_params: (cannot read )?'
                       rf'{re.escape(path)}') as err:
      inception.load_inception_params(path)
    assert pattern in str(err.value) and '\n' not in str(err.value)


def test_matches_torch_when_torch_is_importable(variables, tmp_path):
  torch = pytest.importorskip('torch')
  sd = fid_inception.variables_to_state_dict(variables)
  for legacy in (False, True):
    ours = str(tmp_path / f'ours_{legacy}.pth')
    torch_files.save_torch_state_dict(ours, sd, legacy=legacy)
    loaded = torch.load(ours, weights_only=True)
    assert list(loaded) == list(sd)
    for name, value in sd.items():
      np.testing.assert_array_equal(loaded[name].numpy(), value)
    theirs = str(tmp_path / f'theirs_{legacy}.pth')
    torch.save({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, theirs,
               _use_new_zipfile_serialization=not legacy)
    got = torch_files.load_torch_state_dict(theirs)
    for name, value in sd.items():
      np.testing.assert_array_equal(got[name], value)


@pytest.mark.slow
def test_streamed_inception_metrics_of_the_reference_images_themselves(variables):
  """`evaluation.InceptionMetrics` over two batches of the very images the reference statistics
  and features come from: FID ~ 0 (float64 statistics; the sqrtm of a rank-deficient
  covariance leaves ~1e-5 of its trace), precision = recall = 1, and the Inception Score is
  that of the same logits."""
  from diffusion_jax import evaluation  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  # 8-bit values; batch size and image size as in the other tests, so compiled programs are
  # shared.
  x = (rng.integers(0, 256, (12, 32, 32, 3)) / 127.5 - 1.0).astype(np.float32)
  feats, logits = inception.inception_features(variables, x, batch_size=2)
  stats = FeatureStats.from_features(feats)
  m = evaluation.InceptionMetrics(variables, (stats.mean, stats.cov), reference_features=feats,
                                  batch_size=2)
  m.update(x[:6])
  m.update(x[6:])
  out = m.result()
  assert out['num_generated'] == 12
  assert abs(out['fid']) < 1e-3 * np.trace(stats.cov), out['fid']
  assert out['precision'] == 1.0 and out['recall'] == 1.0
  assert out['inception_score'] == pytest.approx(inception_score(logits, splits=10)[0])
