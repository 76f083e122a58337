"""What every denoiser wrapper shares (`guidance`, `inpainting`).

A wrapper returns a denoiser `(x_t, t, cond) -> (x0_hat, eps_hat)` that samplers treat like any
other, so it passes through the attributes they read: `kind` (for the zero-terminal-SNR check)
and `evals_per_call` (for honest NFE; classifier-free guidance doubles it).
"""

import jax.numpy as jnp

from diffusion_jax.samplers import _common


def pass_attributes(wrapped, inner, evals_factor: int = 1):
  """`wrapped` with `inner`'s `kind` and `evals_factor` times its `evals_per_call`."""
  wrapped.evals_per_call = evals_factor * _common.evals_per_call(inner)
  if hasattr(inner, 'kind'):
    wrapped.kind = inner.kind
  return wrapped


def per_example_t(t, x):
  """`t` (a number or `[B]`) as `[B]` in `x`'s dtype, `B = x.shape[0]`."""
  return jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
