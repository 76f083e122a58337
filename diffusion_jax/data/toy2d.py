"""2-D toy data sampled on the fly (no files): Gaussian mixtures with known parameters."""

import jax
import jax.numpy as jnp
import numpy as np


def eight_gaussians_params(radius: float = 1.5, std: float = 0.15):
  """Means `[8, 2]` on a circle, shared isotropic std, equal weights."""
  angles = 2 * np.pi * np.arange(8) / 8
  means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
  return means.astype(np.float32), float(std)


def eight_gaussians(key, n: int, radius: float = 1.5, std: float = 0.15):
  """`n` samples `[n, 2]` from the 8-Gaussian mixture (a standard 2-D benchmark)."""
  means, std = eight_gaussians_params(radius, std)
  k_comp, k_noise = jax.random.split(key)
  comp = jax.random.randint(k_comp, (n,), 0, 8)
  return jnp.asarray(means)[comp] + std * jax.random.normal(k_noise, (n, 2))
