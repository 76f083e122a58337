"""Tests for `autoencoder_losses`: the KL-VAE loss on a tiny `AutoencoderKL` and the VQ-VAE loss
on linear maps, each against numpy written from the definitions (the posterior sample redrawn
as `mean + std * normal(key)`, the KL as `0.5 sum(mu² + sigma² - 1 - log sigma²)`, PSNR as
`10 log10(4 / MSE)`), never through the functions under test."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import autoencoder_losses as losses
from diffusion_jax.models import AutoencoderKL

import error_testing

MODEL = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16),
                      layers_per_block=1, latent_channels=2, norm_num_groups=4)
_FAST_COMPILE = {'xla_backend_optimization_level': 0}


@functools.partial(jax.jit, static_argnames='method', compiler_options=_FAST_COMPILE)
def _apply(variables, x, method):
  return MODEL.apply(variables, x, method=method)


@functools.partial(jax.jit, static_argnames=('beta', 'reconstruction'),
                   compiler_options=_FAST_COMPILE)
def _kl_loss(variables, x, key, beta, reconstruction):
  return losses.kl_vae_loss(MODEL.apply, variables, x, key, beta=beta,
                            reconstruction=reconstruction)


@pytest.fixture(scope='module')
def tiny():
  x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3), jnp.float32, -1.0, 1.0)
  variables = jax.jit(MODEL.init, compiler_options=_FAST_COMPILE)(jax.random.key(0), x)
  return variables, x


@pytest.mark.parametrize('reconstruction', ['l1', 'l2'])
def test_kl_vae_loss_by_hand(tiny, reconstruction):
  variables, x = tiny
  key, beta = jax.random.key(7), 0.3
  loss, aux = _kl_loss(variables, x, key, beta, reconstruction)
  posterior = _apply(variables, x, 'encode')
  mu, logvar = np.asarray(posterior.mean, np.float64), np.asarray(posterior.logvar, np.float64)
  z = mu + np.exp(0.5 * logvar) * np.asarray(jax.random.normal(key, mu.shape))
  x_hat = np.asarray(_apply(variables, jnp.asarray(z, jnp.float32), 'decode'), np.float64)
  diff = np.asarray(x, np.float64) - x_hat
  rec = np.sum(np.abs(diff) if reconstruction == 'l1' else diff**2, axis=(1, 2, 3))  # [B]
  kl = 0.5 * np.sum(mu**2 + np.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))  # [B]
  np.testing.assert_allclose(aux['loss_per_example'], rec + beta * kl, rtol=1e-4)
  np.testing.assert_allclose(loss, np.mean(rec + beta * kl), rtol=1e-4)
  np.testing.assert_allclose(aux['reconstruction'], np.mean(rec), rtol=1e-4)
  np.testing.assert_allclose(aux['kl'], np.mean(kl), rtol=1e-4)
  np.testing.assert_allclose(aux['psnr'], 10.0 * np.log10(4.0 / np.mean(diff**2)), rtol=1e-4)


def test_kl_vae_loss_is_deterministic_in_the_key(tiny):
  variables, x = tiny
  a = _kl_loss(variables, x, jax.random.key(3), 1e-6, 'l1')[0]
  b = _kl_loss(variables, x, jax.random.key(3), 1e-6, 'l1')[0]
  c = _kl_loss(variables, x, jax.random.key(4), 1e-6, 'l1')[0]
  assert float(a) == float(b) and float(a) != float(c)


def _vq_case(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, size=(3, 4, 4, 2)).astype(np.float32)
  codebook = rng.normal(size=(5, 2)).astype(np.float32) * 0.5
  return x, codebook


def _encode(x):
  return 2.0 * x  # z_e [B, 4, 4, D=2]


def _decode(z):
  return 0.5 * z


@pytest.mark.parametrize('ema', [False, True])
def test_vq_vae_loss_by_hand(ema):
  x, codebook = _vq_case()
  beta = 0.25
  loss, aux = losses.vq_vae_loss(_encode, _decode, jnp.asarray(codebook), jnp.asarray(x),
                                 beta_commit=beta, reconstruction='l2', ema=ema)
  z = 2.0 * x.astype(np.float64)
  distances = np.sum((z[..., None, :] - codebook[None, None, None]) ** 2, axis=-1)  # [B,4,4,K]
  e = codebook[np.argmin(distances, axis=-1)]
  x_hat = 0.5 * e
  rec = np.sum((x - x_hat) ** 2, axis=(1, 2, 3))
  vq_term = np.sum((z - e) ** 2, axis=(1, 2, 3))  # the codebook and the commitment term alike
  want = rec + beta * vq_term + (0.0 if ema else vq_term)
  np.testing.assert_allclose(aux['loss_per_example'], want, rtol=1e-5)
  np.testing.assert_allclose(loss, np.mean(want), rtol=1e-5)
  np.testing.assert_allclose(aux['reconstruction'], np.mean(rec), rtol=1e-5)
  np.testing.assert_allclose(aux['codebook'], np.mean(vq_term), rtol=1e-5)
  np.testing.assert_allclose(aux['commitment'], np.mean(vq_term), rtol=1e-5)
  np.testing.assert_allclose(aux['psnr'], 10 * np.log10(4 / np.mean((x - x_hat) ** 2)),
                             rtol=1e-5)
  np.testing.assert_array_equal(aux['indices'], np.argmin(distances, axis=-1))
  np.testing.assert_array_equal(aux['z'], 2.0 * x)


@pytest.mark.parametrize('ema', [False, True])
def test_vq_vae_codebook_gradient_comes_only_from_the_codebook_term(ema):
  x, codebook = _vq_case(1)

  def loss(codebook):
    return losses.vq_vae_loss(_encode, _decode, codebook, jnp.asarray(x), ema=ema)[0]

  grad = np.asarray(jax.grad(loss)(jnp.asarray(codebook)))
  z = (2.0 * x).reshape(-1, 2)
  indices = np.argmin(np.sum((z[:, None] - codebook[None]) ** 2, axis=-1), axis=1)
  want = np.zeros_like(codebook)  # d/de_k of mean_b sum (z - e)²: 2 (e_k - z) / B per vector
  if not ema:
    for i, v in zip(indices, z, strict=True):
      want[i] += 2.0 * (codebook[i] - v) / x.shape[0]
  np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('ema', [False, True])
def test_vq_vae_encoder_gradient_is_straight_through_plus_commitment(ema):
  x, codebook = _vq_case(2)
  beta = 0.4  # (with 0.25 the two terms cancel exactly for this decoder)

  def loss(scale):  # encoder z_e = scale * x, one parameter
    return losses.vq_vae_loss(lambda x: scale * x, _decode, jnp.asarray(codebook),
                              jnp.asarray(x), beta_commit=beta, ema=ema)[0]

  grad = float(jax.grad(loss)(2.0))
  z = 2.0 * x.astype(np.float64)
  e = codebook[np.argmin(np.sum((z[..., None, :] - codebook) ** 2, axis=-1), axis=-1)]
  # d rec / d z_q at z_q = e is -(x - e / 2); straight through, d z_q / d z = I; dz/dscale = x.
  # The codebook term sees sg(z_e): no encoder gradient, with or without EMA.
  dz = -(x - 0.5 * e) + beta * 2.0 * (z - e)
  np.testing.assert_allclose(grad, np.sum(dz * x) / x.shape[0], rtol=1e-5)


def test_psnr_of_a_known_error():
  x = jnp.zeros((2, 4, 4, 1))
  np.testing.assert_allclose(losses.psnr(x, x + 0.1), 10 * np.log10(4 / 0.01), rtol=1e-5)


@pytest.mark.parametrize('call, words', [
    (lambda: losses.kl_vae_loss(None, None, jnp.zeros((2, 8, 8, 3)), jax.random.key(0),
                                beta=1.0, reconstruction='l3'), ['l3']),
    (lambda: losses.kl_vae_loss(None, None, jnp.zeros((2, 8, 8, 3)), jax.random.key(0),
                                beta=-1.0), ['beta=-1.0']),
    (lambda: losses.kl_vae_loss(None, None, jnp.zeros((8,)), jax.random.key(0)), ['(8,)']),
    (lambda: losses.vq_vae_loss(_encode, _decode, jnp.zeros((5, 2)), jnp.zeros((2, 4, 4, 2)),
                                beta_commit=-0.25), ['beta_commit=-0.25']),
    (lambda: losses.vq_vae_loss(_encode, _decode, jnp.zeros((5, 3)), jnp.zeros((2, 4, 4, 2))),
     ['D=3']),
    (lambda: losses.vq_vae_loss(_encode, lambda z: z[:, :2], jnp.zeros((5, 2)),
                                jnp.zeros((2, 4, 4, 2))), ['(2, 2, 4, 2)', '(2, 4, 4, 2)']),
    (lambda: losses.vq_vae_loss(lambda x: x[0], _decode, jnp.zeros((5, 2)),
                                jnp.zeros((2, 4, 4, 2))), ['B=2']),
])
def test_bad_inputs_are_one_line_errors(call, words):
  error_testing.assert_one_line_error(call, words)
