"""What every denoiser wrapper shares (`guidance`, `inpainting`).

A wrapper returns a `parameterization.Denoiser` that samplers treat like any other, so it keeps
what they read: `kind` (for the zero-terminal-SNR check), `sigma_min`, and `evals_per_call` (for
honest NFE; classifier-free guidance doubles it). It drops `with_variance`, which would bypass
the wrapper.
"""

import jax.numpy as jnp

from diffusion_jax.parameterization import Denoiser
from diffusion_jax.parameterization import as_denoiser


def pass_attributes(wrapped, inner, evals_factor: int = 1, *, cls=Denoiser, **fields) -> Denoiser:
  """The `cls` (a `Denoiser`) calling `wrapped`, with `inner`'s `kind` and `sigma_min`,
  `evals_factor` times its `evals_per_call`, and any extra `fields` of `cls`."""
  inner = as_denoiser(inner)
  return cls(wrapped, kind=inner.kind, evals_per_call=evals_factor * inner.evals_per_call,
             sigma_min=inner.sigma_min, **fields)


def per_example_t(t, x):
  """`t` (a number or `[B]`) as `[B]` in `x`'s dtype, `B = x.shape[0]`."""
  return jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
