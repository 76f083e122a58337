"""Tests for `models.AutoencoderVQ`, LDM's VQ-regularised autoencoder: shapes, that decoding
really quantizes, the straight-through gradient of `vq.quantize`, where the codebook lives, and
one EMA codebook update, its expected value written out by hand. Tiny models; the forward passes
run eagerly, so that two routes to the same numbers agree exactly, and the gradients are compiled
at LLVM optimisation level 0 (the quickest here).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import AUTOENCODERS, AutoencoderKL, AutoencoderVQ, vq

import error_testing

CONFIG = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=3, num_codes=16,
              norm_num_groups=4)
K, D = 16, 3
_FAST_COMPILE = {'xla_backend_optimization_level': 0}


def _images(shape=(2, 8, 8, 3), seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32))


def _setup(**overrides):
  model = AutoencoderVQ(**{**CONFIG, **overrides})
  x = _images()
  return model, model.init(jax.random.key(0), x), x


@pytest.fixture(scope='module')
def ema():
  return _setup()


@pytest.fixture(scope='module')
def param():
  return _setup(ema_codebook=False)


def test_registry():
  assert AUTOENCODERS == {'kl': AutoencoderKL, 'vq': AutoencoderVQ}


@pytest.mark.parametrize('channels, f', [((8,), 1), ((8, 16), 2), ((8, 16, 16), 4)])
def test_shapes(channels, f):
  model = AutoencoderVQ(**{**CONFIG, 'block_out_channels': channels})
  assert model.f == f
  x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  h = 16 // f
  z = jax.eval_shape(lambda v, x: model.apply(v, x, method='encode'), variables, x)
  assert z.shape == (2, h, h, D) and z.dtype == jnp.float32
  z_q, indices, _ = jax.eval_shape(lambda v, z: model.apply(v, z, method='quantize'), variables,
                                   z)
  assert z_q.shape == (2, h, h, D) and indices.shape == (2, h, h) and indices.dtype == jnp.int32
  decoded = jax.eval_shape(lambda v, z: model.apply(v, z, method='decode'), variables, z)
  assert decoded.shape == (2, 16, 16, 3) and decoded.dtype == jnp.float32
  x_hat, aux = jax.eval_shape(model.apply, variables, x)
  assert x_hat.shape == (2, 16, 16, 3)
  assert aux['z'].shape == (2, h, h, D) and aux['indices'].shape == (2, h, h)
  assert aux['codebook'].shape == (K, D)
  assert {'codebook_loss', 'commitment_loss', 'perplexity', 'usage'} <= aux.keys()


def test_decode_quantizes_first(ema):
  model, variables, x = ema
  codebook = np.asarray(variables['vq_ema']['quantizer']['codebook'])
  z = model.apply(variables, x, method='encode')
  z_q, indices, _ = model.apply(variables, z, method='quantize')
  np.testing.assert_array_equal(z_q, codebook[np.asarray(indices)])
  decoded = model.apply(variables, z, method='decode')
  np.testing.assert_array_equal(
      decoded, model.apply(variables, z_q, method='decode', quantize=False))
  # z_e itself is no code, so skipping the quantizer decodes something else.
  assert float(jnp.min(jnp.abs(z - z_q))) > 0
  unquantized = model.apply(variables, z, method='decode', quantize=False)
  assert float(jnp.max(jnp.abs(unquantized - decoded))) > 1e-3


@pytest.mark.slow  # covered by faster tests; kept for -m slow
def test_call_is_decode_of_encode(ema):
  model, variables, x = ema
  x_hat, aux = model.apply(variables, x)
  z = model.apply(variables, x, method='encode')
  np.testing.assert_array_equal(x_hat, model.apply(variables, z, method='decode'))
  np.testing.assert_array_equal(aux['z'], z)
  _, indices, q = model.apply(variables, z, method='quantize')
  np.testing.assert_array_equal(aux['indices'], indices)
  np.testing.assert_array_equal(aux['codebook'], variables['vq_ema']['quantizer']['codebook'])
  for name in ('codebook_loss', 'commitment_loss', 'perplexity', 'usage'):
    np.testing.assert_array_equal(aux[name], q[name])


def _reconstruction_sum(model, x):
  """sum(decode(encode(x))) as a function of the variables."""
  return lambda v: jnp.sum(model.apply(v, x, method=lambda m, x: m.decode(m.encode(x))))


def _grads(*fns):
  """The gradients of the scalar functions `fns` of the variables, in one compiled program."""
  return jax.jit(lambda v: tuple(jax.grad(fn)(v) for fn in fns), compiler_options=_FAST_COMPILE)


def test_straight_through_gradient_with_the_ema_codebook(ema):
  # vq.quantize: `d z_q / d z = I` and the codebook gets no gradient through it.
  model, variables, x = ema
  grads, = _grads(_reconstruction_sum(model, x))(variables)
  assert 'quantizer' not in grads['params']  # the EMA codebook is no parameter
  assert float(jnp.max(jnp.abs(grads['params']['encoder']['conv_in']['kernel']))) > 0
  assert float(jnp.max(jnp.abs(grads['params']['quant_conv']['kernel']))) > 0
  np.testing.assert_array_equal(grads['vq_ema']['quantizer']['codebook'], 0.0)


@pytest.mark.slow  # covered by faster tests; kept for -m slow
def test_parameter_codebook(param):
  model, variables, x = param
  assert 'vq_ema' not in variables
  codebook = variables['params']['quantizer']['codebook']
  assert codebook.shape == (K, D)
  assert float(jnp.max(jnp.abs(codebook))) <= 1.0 / K  # VQ-VAE's uniform init in [-1/K, 1/K]
  _, aux = model.apply(variables, x)
  np.testing.assert_array_equal(aux['codebook'], codebook)
  codebook_loss = lambda v: model.apply(v, x)[1]['codebook_loss']
  codebook_sum = lambda v: jnp.sum(model.apply(v, x)[1]['codebook'])
  rec, loss, total = (g['params'] for g in _grads(
      _reconstruction_sum(model, x), codebook_loss, codebook_sum)(variables))
  # The reconstruction alone trains the encoder, not the codebook (straight-through) ...
  np.testing.assert_array_equal(rec['quantizer']['codebook'], 0.0)
  assert float(jnp.max(jnp.abs(rec['encoder']['conv_in']['kernel']))) > 0
  # ... which learns from the codebook loss; aux['codebook'] is the parameter, with its gradient.
  assert float(jnp.max(jnp.abs(loss['quantizer']['codebook']))) > 0
  np.testing.assert_array_equal(total['quantizer']['codebook'], 1.0)


@pytest.mark.slow  # covered by faster tests; kept for -m slow
def test_ema_collection_is_init_ema_state(ema):
  _, variables, _ = ema
  assert 'quantizer' not in variables['params']
  state = vq.EMAState(**variables['vq_ema']['quantizer'])
  assert state.codebook.shape == (K, D)
  assert float(jnp.max(jnp.abs(state.codebook))) <= 1.0 / K
  want = vq.init_ema_state(state.codebook)
  for name in vq.EMAState._fields:
    np.testing.assert_array_equal(getattr(state, name), getattr(want, name), err_msg=name)


def test_ema_update_written_back_moves_a_code_toward_its_vectors(ema):
  model, variables, x = ema
  _, aux = model.apply(variables, x)
  old = np.asarray(variables['vq_ema']['quantizer']['codebook'], np.float64)
  new = vq.ema_update(vq.EMAState(**variables['vq_ema']['quantizer']), aux['z'],
                      aux['indices'], decay=0.5)
  updated = {'params': variables['params'], 'vq_ema': {'quantizer': new._asdict()}}

  # By hand (VQ-VAE App. A.1, from init_ema_state: N_i = 1, m_i = e_i), gamma = 0.5:
  z = np.asarray(aux['z'], np.float64).reshape(-1, D)
  indices = np.asarray(aux['indices']).reshape(-1)
  counts = np.bincount(indices, minlength=K)
  k = int(np.argmax(counts))
  n_k = 0.5 * 1.0 + 0.5 * counts                 # N_i for every code
  m_k = 0.5 * old[k] + 0.5 * z[indices == k].sum(axis=0)
  total, eps = n_k.sum(), 1e-5
  smoothed = (n_k[k] + eps) / (total + K * eps) * total
  np.testing.assert_allclose(new.codebook[k], m_k / smoothed, rtol=1e-5, atol=1e-7)
  mean = z[indices == k].mean(axis=0)
  assert np.linalg.norm(new.codebook[k] - mean) < 0.75 * np.linalg.norm(old[k] - mean)

  # The model reads the written-back codebook and quantizes with it.
  _, aux = model.apply(updated, x)
  np.testing.assert_array_equal(aux['codebook'], new.codebook)
  codes = np.asarray(new.codebook, np.float64)
  z = np.asarray(aux['z'], np.float64).reshape(-1, 1, D)
  np.testing.assert_array_equal(np.asarray(aux['indices']).reshape(-1),
                                np.argmin(np.sum((z - codes) ** 2, axis=-1), axis=1))


def test_bad_config_and_inputs_are_one_line_errors(ema):
  model, variables, x = ema
  init = lambda **kw: jax.eval_shape(AutoencoderVQ(**{**CONFIG, **kw}).init, jax.random.key(0),
                                     x)
  error_testing.assert_one_line_error(lambda: init(num_codes=0), ['AutoencoderVQ', 'num_codes=0'])
  error_testing.assert_one_line_error(lambda: init(norm_num_groups=3),
                                      ['AutoencoderVQ', 'norm_num_groups=3', '(8, 16)'])
  error_testing.assert_one_line_error(lambda: init(latent_channels=0), ['latent_channels=0'])
  error_testing.assert_one_line_error(lambda: model.apply(variables, _images((1, 9, 9, 3))),
                                      ['AutoencoderVQ.encode', '9x9', 'f=2'])
  error_testing.assert_one_line_error(lambda: model.apply(variables, _images((1, 8, 8, 1))),
                                      ['AutoencoderVQ.encode', 'in_channels=3'])
  z = jnp.zeros((1, 4, 4, 4))
  for method in ('decode', 'quantize'):
    error_testing.assert_one_line_error(lambda: model.apply(variables, z, method=method),
                                        [f'AutoencoderVQ.{method}', 'latent_channels=3'])
