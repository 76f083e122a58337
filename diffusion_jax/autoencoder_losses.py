"""Training losses of the autoencoders of latent diffusion, as pure functions with explicit keys.

  kl_vae_loss   the KL-VAE of LDM (Rombach et al. 2022, §3 and App. G; `models.AutoencoderKL`):
                reconstruction through a posterior sample + beta * KL(q(z | x) || N(0, I)).
  vq_vae_loss   VQ-VAE (van den Oord et al. 2017, Eq. 3): reconstruction + codebook loss
                + beta * commitment loss; the EMA variant (App. A.1) drops the codebook loss.

Convention (LDM's `LPIPSWithDiscriminator` and the VQ-VAE paper's per-example Eq. 3): every term
is summed over the elements of one example (pixels, or latent elements) and averaged over the
batch. So LDM's `kl_weight` (1e-6 for its KL-f8) is `beta` here, and VQ-VAE's `beta = 0.25`
weighs a commitment term summed over the same latent elements as its codebook term. The learned
output log-variance, the perceptual (LPIPS) term and the adversarial term of LDM's loss are not
part of these functions; a caller adds them to `loss`.

Both return `(loss, aux)` with `loss` the batch mean of `aux['loss_per_example']` `[B]`; `aux`
also holds each term's batch mean and the batch's PSNR in dB for data in [-1, 1] (peak-to-peak 2:
`10 log10(4 / MSE)`, MSE over every element of the batch).
"""

import numbers
from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffusion_jax.models import vq

RECONSTRUCTIONS = ('l1', 'l2')


def _check(name: str, x: jax.Array, reconstruction: str, **weights: Any) -> None:
  if x.ndim < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f'{name}: x must be a float [B, ...] batch, got {x.dtype} {x.shape}.')
  if reconstruction not in RECONSTRUCTIONS:
    raise ValueError(f'{name}: reconstruction={reconstruction!r} must be one of '
                     f'{RECONSTRUCTIONS}.')
  for field, value in weights.items():
    if isinstance(value, numbers.Real) and not value >= 0:
      raise ValueError(f'{name}: {field}={value} must be >= 0.')


def _sum_per_example(x: jax.Array) -> jax.Array:
  return jnp.sum(x, axis=tuple(range(1, x.ndim)))  # [B]


def reconstruction_error(x: jax.Array, x_hat: jax.Array, kind: str = 'l1') -> jax.Array:
  """`sum |x - x_hat|` ('l1') or `sum (x - x_hat)²` ('l2') over each example's elements, `[B]`."""
  if x_hat.shape != x.shape:
    raise ValueError(f'reconstruction_error: the reconstruction has shape {x_hat.shape}, the '
                     f'data {x.shape}; they must match.')
  diff = x.astype(jnp.float32) - x_hat.astype(jnp.float32)
  return _sum_per_example(jnp.abs(diff) if kind == 'l1' else jnp.square(diff))


def psnr(x: jax.Array, x_hat: jax.Array, peak_to_peak: float = 2.0) -> jax.Array:
  """PSNR in dB of the whole batch: `10 log10(peak_to_peak² / MSE)`; 2 for data in [-1, 1]."""
  mse = jnp.mean(jnp.square(x.astype(jnp.float32) - x_hat.astype(jnp.float32)))
  return 10.0 * jnp.log10(peak_to_peak**2 / mse)


def kl_vae_loss(apply_fn: Callable, variables: Any, x: jax.Array, key: jax.Array, *,
                beta: float = 1e-6, reconstruction: str = 'l1') -> tuple[jax.Array, dict]:
  """LDM's KL-VAE loss: `rec(x, D(z)) + beta KL(q(z | x) || N(0, I))`, `z ~ q(z | x)` from `key`.

  `apply_fn(variables, x, key, sample_posterior=True) -> (x_hat, posterior)` is
  `AutoencoderKL.apply` (or a wrapper adding dropout rngs / `train=True`); `posterior.kl()` is
  `0.5 sum(mean² + var - 1 - logvar)` per example. `aux`: `loss_per_example`, `reconstruction`,
  `kl` (batch means of the per-example sums), `psnr` (of the sampled reconstruction).
  """
  _check('kl_vae_loss', x, reconstruction, beta=beta)
  x_hat, posterior = apply_fn(variables, x, key, sample_posterior=True)
  rec = reconstruction_error(x, x_hat, reconstruction)  # [B]
  kl = posterior.kl()  # [B]
  per_example = rec + beta * kl
  aux = {'loss_per_example': per_example, 'reconstruction': jnp.mean(rec), 'kl': jnp.mean(kl),
         'psnr': psnr(x, jax.lax.stop_gradient(x_hat))}
  return jnp.mean(per_example), aux


def vq_vae_loss(encode_fn: Callable, decode_fn: Callable, codebook: jax.Array, x: jax.Array, *,
                beta_commit: float = 0.25, reconstruction: str = 'l2',
                ema: bool = False) -> tuple[jax.Array, dict]:
  """VQ-VAE's loss (Eq. 3): `rec(x, D(z_q)) + ||sg(z_e) - e||² + beta ||z_e - sg(e)||²`.

  `encode_fn(x) -> z_e` `[B, ..., D]` and `decode_fn(z_q) -> x_hat` close over their parameters;
  `codebook` `[K, D]` (a parameter, or `EMAState.codebook`). With `ema=True` the codebook term
  is dropped: the codebook then gets no gradient at all (the straight-through estimator passes
  none to it) and is updated by `vq.ema_update(state, aux['z'], aux['indices'])`.
  `aux`: `loss_per_example`, `reconstruction`, `codebook`, `commitment` (batch means of the
  per-example sums), `perplexity`, `usage`, `psnr`, and `z` (encoder output, no gradient) and
  `indices` for the EMA update and `vq.restart_dead_codes`.
  """
  _check('vq_vae_loss', x, reconstruction, beta_commit=beta_commit)
  z = encode_fn(x)  # [B, ..., D]
  if z.ndim < 2 or z.shape[0] != x.shape[0]:
    raise ValueError(f'vq_vae_loss: encode_fn must return a [B, ..., D] batch with B='
                     f'{x.shape[0]}, got shape {z.shape}.')
  z_q, indices, q = vq.quantize(z, codebook)
  x_hat = decode_fn(z_q)
  rec = reconstruction_error(x, x_hat, reconstruction)  # [B]
  e = jnp.take(codebook, indices, axis=0)  # the chosen codes, with their gradient
  codebook_term = _sum_per_example(jnp.square(jax.lax.stop_gradient(z) - e))  # [B]
  commitment = _sum_per_example(jnp.square(z - jax.lax.stop_gradient(e)))  # [B]
  per_example = rec + beta_commit * commitment
  if not ema:
    per_example = per_example + codebook_term
  aux = {'loss_per_example': per_example, 'reconstruction': jnp.mean(rec),
         'codebook': jnp.mean(codebook_term), 'commitment': jnp.mean(commitment),
         'perplexity': q['perplexity'], 'usage': q['usage'],
         'psnr': psnr(x, jax.lax.stop_gradient(x_hat)), 'z': jax.lax.stop_gradient(z),
         'indices': indices}
  return jnp.mean(per_example), aux

