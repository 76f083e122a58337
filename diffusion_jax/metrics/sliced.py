"""Sliced Wasserstein distance for low-dimensional samples (Rabin et al. 2011; Bonneel 2015)."""

import jax
import jax.numpy as jnp


def sliced_wasserstein(key, x, y, num_projections: int = 512, p: int = 2):
  """`(E_theta W_p^p(theta·x, theta·y))^(1/p)` over random unit directions, equal sample sizes.

  In 1-D the optimal coupling of two equal-size empirical measures sorts both samples, so each
  projection costs a sort. `x`, `y`: `[N, D]`.
  """
  if x.shape != y.shape or x.ndim != 2:
    raise ValueError(f'sliced_wasserstein: need equal [N, D] shapes, got {x.shape}, {y.shape}')
  theta = jax.random.normal(key, (x.shape[1], num_projections), x.dtype)
  theta = theta / jnp.linalg.norm(theta, axis=0, keepdims=True)
  px, py = jnp.sort(x @ theta, axis=0), jnp.sort(y @ theta, axis=0)       # [N, P]
  return jnp.mean(jnp.abs(px - py) ** p) ** (1.0 / p)
