"""Tests for `models.AutoencoderKL` and its weight loader (`weights.load_autoencoder_kl`).

The reference is diffusers' `AutoencoderKL`, run once by `fixtures/sd_vae/make_fixture.py`: a tiny
random-weight model saved in the diffusers and the LDM layouts, with its encoder moments and
decoder outputs. Both files must load to the same variables, and our model must reproduce the
reference's outputs. Programs are compiled at LLVM optimisation level 0 (run once or twice each).
"""

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

from diffusion_jax.models import SD_VAE_CONFIG, AutoencoderKL
from diffusion_jax.models.autoencoder import DiagonalGaussian
from diffusion_jax.weights import autoencoder_kl_variables, load_autoencoder_kl
from diffusion_jax.weights import sd_vae

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'sd_vae')
DIFFUSERS = os.path.join(FIXTURE, 'diffusers.safetensors')
LDM = os.path.join(FIXTURE, 'ldm.safetensors')
TOLERANCE = 1e-4  # max abs difference to the reference, float32
_FAST_COMPILE = {'xla_backend_optimization_level': 0}


def _config():
  with open(os.path.join(FIXTURE, 'config.json'), encoding='utf-8') as f:
    config = json.load(f)
  return {**config, 'block_out_channels': tuple(config['block_out_channels'])}


MODEL = AutoencoderKL(**_config())


@functools.partial(jax.jit, static_argnames='method', compiler_options=_FAST_COMPILE)
def _apply(variables, x, method):
  return MODEL.apply(variables, x, method=method)


@pytest.fixture(scope='module')
def expected():
  return dict(np.load(os.path.join(FIXTURE, 'expected.npz')))


@pytest.fixture(scope='module')
def variables():
  return {'diffusers': load_autoencoder_kl(DIFFUSERS, MODEL),
          'ldm': load_autoencoder_kl(LDM, _config())}


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')


def _max_abs(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)))


def test_both_layouts_load_the_same_variables(variables):
  shapes = jax.eval_shape(MODEL.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  want = {k: v.shape for k, v in _flat(shapes).items()}
  diffusers, ldm = _flat(variables['diffusers']), _flat(variables['ldm'])
  assert {k: v.shape for k, v in diffusers.items()} == want
  assert diffusers.keys() == ldm.keys()
  for k in diffusers:  # ldm.safetensors is float16; its values are exactly the float32 ones
    assert diffusers[k].dtype == ldm[k].dtype == np.float32, k
    np.testing.assert_array_equal(diffusers[k], ldm[k], err_msg=k)


@pytest.mark.parametrize('layout', ['diffusers', 'ldm'])
def test_encoder_matches_reference(variables, expected, layout):
  posterior = _apply(variables[layout], expected['x'], 'encode')
  assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 4, 4)  # [B, H/f, W/f, L]
  assert _max_abs(posterior.mean, expected['mean']) <= TOLERANCE
  assert _max_abs(posterior.logvar, expected['logvar']) <= TOLERANCE


@pytest.mark.parametrize('layout', ['diffusers', 'ldm'])
def test_decoder_matches_reference(variables, expected, layout):
  decoded = _apply(variables[layout], expected['z'], 'decode')
  assert decoded.shape == (2, 16, 16, 3)
  assert _max_abs(decoded, expected['decoded']) <= TOLERANCE


def test_reconstruction_through_the_mode_matches_reference(variables, expected):
  reconstruction, posterior = _apply(variables['diffusers'], expected['x'], '__call__')
  assert _max_abs(reconstruction, expected['reconstruction']) <= TOLERANCE
  assert _max_abs(posterior.mean, expected['mean']) <= TOLERANCE


def test_reconstruction_through_a_posterior_sample(variables, expected):
  key = jax.random.key(7)
  sampled = jax.jit(functools.partial(MODEL.apply, sample_posterior=True),
                    compiler_options=_FAST_COMPILE)
  reconstruction, posterior = sampled(variables['diffusers'], expected['x'], key)
  z = posterior.sample(key)
  assert _max_abs(z, expected['mean']) > 0.1  # a draw, not the mode
  want = _apply(variables['diffusers'], z, 'decode')
  np.testing.assert_allclose(reconstruction, want, atol=1e-5)


def test_older_diffusers_attention_names(variables, tmp_path):
  old = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}
  renamed = {}
  for key, value in safetensors.numpy.load_file(DIFFUSERS).items():
    for new_name, old_name in old.items():
      key = key.replace(f'.attentions.0.{new_name}.', f'.attentions.0.{old_name}.')
    renamed[key] = value
  assert 'decoder.mid_block.attentions.0.proj_attn.weight' in renamed
  path = str(tmp_path / 'old.safetensors')
  safetensors.numpy.save_file(renamed, path)
  got = _flat(load_autoencoder_kl(path, MODEL))
  for k, v in _flat(variables['diffusers']).items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)


def test_bfloat16_file(variables, tmp_path):
  # numpy has no bfloat16: the loader reads such a file through JAX.
  path = str(tmp_path / 'bf16.safetensors')
  safetensors.numpy.save_file({k: v.astype(ml_dtypes.bfloat16) for k, v in
                               safetensors.numpy.load_file(DIFFUSERS).items()}, path)
  got = _flat(load_autoencoder_kl(path, MODEL))
  for k, v in _flat(variables['diffusers']).items():
    assert got[k].dtype == np.float32
    np.testing.assert_array_equal(got[k], v.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_kl_is_the_closed_form(expected):
  mu, logvar = expected['mean'], expected['logvar']
  sigma = np.exp(0.5 * logvar.astype(np.float64))
  want = 0.5 * np.sum(mu**2 + sigma**2 - 1 - np.log(sigma**2), axis=(1, 2, 3))
  got = DiagonalGaussian(jnp.asarray(mu), jnp.asarray(logvar)).kl()
  assert got.shape == (2,)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_posterior_clips_logvar_and_samples():
  moments = jnp.concatenate([jnp.full((1, 1, 1, 3), 2.0), jnp.array([[[[-50.0, 0.5, 25.0]]]])],
                            axis=-1)  # [1, 1, 1, 2 L]: mean 2, logvar -50 / 0.5 / 25
  posterior = DiagonalGaussian.from_moments(moments)
  np.testing.assert_array_equal(posterior.logvar.ravel(), [-30.0, 0.5, 20.0])
  np.testing.assert_array_equal(posterior.mode(), posterior.mean)
  small = DiagonalGaussian(jnp.full((4000, 1), 2.0), jnp.full((4000, 1), math.log(0.25)))
  z = small.sample(jax.random.key(0))  # 4000 draws of N(2, 0.5²)
  assert abs(float(z.mean()) - 2.0) < 4 * 0.5 / math.sqrt(4000)
  assert abs(float(z.std()) - 0.5) < 0.03


def test_sd_config():
  model = AutoencoderKL(**SD_VAE_CONFIG)
  assert model.f == 8 and model.scaling_factor == 0.18215
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  assert sum(math.prod(s.shape) for s in jax.tree.leaves(shapes)) == 83_653_863  # as diffusers
  diffusers = sd_vae.state_dict_shapes(SD_VAE_CONFIG)
  ldm = sd_vae.state_dict_shapes(SD_VAE_CONFIG, 'ldm')
  assert len(diffusers) == len(ldm) == 248
  # Keys and shapes of the published Stable Diffusion VAE files.
  assert diffusers['decoder.up_blocks.2.resnets.0.conv_shortcut.weight'] == (256, 512, 1, 1)
  assert diffusers['encoder.mid_block.attentions.0.to_q.weight'] == (512, 512)
  assert ldm['decoder.up.1.block.0.nin_shortcut.weight'] == (256, 512, 1, 1)
  assert ldm['decoder.up.3.upsample.conv.weight'] == (512, 512, 3, 3)
  assert ldm['encoder.mid.attn_1.proj_out.weight'] == (512, 512, 1, 1)
  assert ldm['encoder.down.0.downsample.conv.weight'] == (128, 128, 3, 3)


def _error(fn, *args, **kwargs) -> str:
  with pytest.raises(ValueError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert '\n' not in message
  return message


def test_missing_extra_and_misshapen_tensors_are_named():
  state = safetensors.numpy.load_file(DIFFUSERS)
  missing = {k: v for k, v in state.items() if k != 'encoder.conv_in.bias'}
  message = _error(autoencoder_kl_variables, missing, MODEL, 'vae.safetensors')
  assert "'encoder.conv_in.bias'" in message and 'vae.safetensors' in message
  message = _error(autoencoder_kl_variables, {**state, 'encoder.extra.weight': np.zeros(2)},
                   MODEL, 'vae.safetensors')
  assert "'encoder.extra.weight'" in message and 'vae.safetensors' in message
  key = 'decoder.up_blocks.1.resnets.0.conv1.weight'
  message = _error(autoencoder_kl_variables, {**state, key: np.zeros((16, 16, 3, 1))}, MODEL,
                   'vae.safetensors')
  assert repr(key) in message and '(16, 16, 3, 1)' in message and '(16, 16, 3, 3)' in message


def test_wrong_config_or_file_is_one_line_error(tmp_path):
  # Channels that differ from the file's: a shape error naming the key and both shapes.
  message = _error(load_autoencoder_kl, LDM, {**_config(), 'block_out_channels': (8, 16, 32)})
  assert LDM in message and "'first_stage_model.decoder.conv_in.bias'" in message
  assert '(16,)' in message and '(32,)' in message
  # One ResNet block too many per level: keys missing from the file.
  message = _error(load_autoencoder_kl, DIFFUSERS, {**_config(), 'layers_per_block': 2})
  assert DIFFUSERS in message and "'decoder.up_blocks.2.resnets.2.conv1.bias'" in message
  # An LDM checkpoint's extra VAE key is refused (its non-VAE keys are ignored).
  ldm = safetensors.numpy.load_file(LDM)
  ldm['first_stage_model.encoder.mid.attn_2.q.weight'] = np.zeros((16, 16, 1, 1), np.float16)
  message = _error(autoencoder_kl_variables, ldm, MODEL, 'sd.safetensors')
  assert "'first_stage_model.encoder.mid.attn_2.q.weight'" in message
  assert "['foo']" in _error(load_autoencoder_kl, DIFFUSERS, {**_config(), 'foo': 1})
  message = _error(autoencoder_kl_variables, {'model.diffusion_model.x': np.zeros(1)}, MODEL)
  assert 'neither the diffusers nor the LDM' in message
  (tmp_path / 'junk.safetensors').write_bytes(b'not a safetensors file')
  assert 'junk.safetensors' in _error(load_autoencoder_kl, str(tmp_path / 'junk.safetensors'),
                                      MODEL)


def test_input_and_field_errors(variables):
  v = variables['diffusers']
  message = _error(MODEL.apply, v, jnp.zeros((1, 18, 18, 3)))
  assert '18x18' in message and 'f=4' in message
  assert 'in_channels=3' in _error(MODEL.apply, v, jnp.zeros((1, 16, 16, 1)))
  assert 'latent_channels=4' in _error(
      functools.partial(MODEL.apply, method='decode'), v, jnp.zeros((1, 4, 4, 3)))
  assert 'PRNG key' in _error(functools.partial(MODEL.apply, sample_posterior=True), v,
                              jnp.zeros((1, 16, 16, 3)))
  x = jnp.zeros((1, 16, 16, 3))
  init = lambda **kw: jax.eval_shape(AutoencoderKL(**{**_config(), **kw}).init,
                                     jax.random.key(0), x)
  assert 'norm_num_groups=4' in _error(init, block_out_channels=(8, 18))
  assert 'block_out_channels=()' in _error(init, block_out_channels=())
  assert 'layers_per_block=0' in _error(init, layers_per_block=0)
  assert 'dropout=1.0' in _error(init, dropout=1.0)
