"""2-D toy data sampled on the fly (no files), each `sampler(key, n) -> [n, 2]` float32.

`TOYS` maps names to samplers: two moons, swiss roll, checkerboard, concentric rings, 8
Gaussians and a Gaussian mixture. Mixtures are `GaussianMixture`s, which also give the exact
log-density and score, at t = 0 and (through `diffused`) at any time of any process, for tests,
likelihood checks and benchmarks. Shapes are scaled to roughly unit spread.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class GaussianMixture(NamedTuple):
  """`sum_k w_k N(means_k, diag(stds_k²))`: weights `[K]`, means `[K, D]`, stds `[K, D]`."""
  weights: jax.Array
  means: jax.Array
  stds: jax.Array

  @classmethod
  def isotropic(cls, means, std, weights=None) -> 'GaussianMixture':
    means = jnp.asarray(means, jnp.float32)
    k = means.shape[0]
    weights = jnp.full((k,), 1.0 / k) if weights is None else jnp.asarray(weights, jnp.float32)
    return cls(weights / weights.sum(), means, jnp.broadcast_to(jnp.asarray(std, jnp.float32),
                                                                means.shape))

  def sample(self, key, n: int) -> jax.Array:
    k_comp, k_noise = jax.random.split(key)
    comp = jax.random.choice(k_comp, self.weights.shape[0], (n,), p=self.weights)
    eps = jax.random.normal(k_noise, (n, self.means.shape[1]))
    return self.means[comp] + self.stds[comp] * eps  # [n, D]

  def component_log_probs(self, x: jax.Array) -> jax.Array:
    """`log w_k + log N(x; m_k, s_k²)`, `[N, K]`."""
    z = (x[:, None, :] - self.means[None]) / self.stds[None]                  # [N, K, D]
    log_norm = -0.5 * jnp.sum(z ** 2 + jnp.log(2 * jnp.pi * self.stds[None] ** 2), -1)
    return jnp.log(self.weights)[None] + log_norm

  def log_prob(self, x: jax.Array) -> jax.Array:
    """Exact log-density, `[N]`."""
    return jax.nn.logsumexp(self.component_log_probs(x), axis=-1)

  def score(self, x: jax.Array) -> jax.Array:
    """Exact `∇_x log p(x) = sum_k r_k(x) (m_k - x) / s_k²`, `[N, D]`."""
    resp = jax.nn.softmax(self.component_log_probs(x), axis=-1)[..., None]    # [N, K, 1]
    return jnp.sum(resp * (self.means[None] - x[:, None]) / self.stds[None] ** 2, axis=1)

  def diffused(self, alpha, sigma) -> 'GaussianMixture':
    """The law of `x_t = alpha x0 + sigma eps` (scalars): means `alpha m`, variances
    `alpha² s² + sigma²`; its `score` is the exact score at that time."""
    return GaussianMixture(self.weights, alpha * self.means,
                           jnp.sqrt(alpha ** 2 * self.stds ** 2 + sigma ** 2))


def eight_gaussians_params(radius: float = 1.5, std: float = 0.15):
  """Means `[8, 2]` on a circle, shared isotropic std, equal weights."""
  angles = 2 * np.pi * np.arange(8) / 8
  means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
  return means.astype(np.float32), float(std)


def eight_gaussians_mixture(radius: float = 1.5, std: float = 0.15) -> GaussianMixture:
  means, std = eight_gaussians_params(radius, std)
  return GaussianMixture.isotropic(means, std)


def eight_gaussians(key, n: int, radius: float = 1.5, std: float = 0.15):
  """`n` samples `[n, 2]` from the 8-Gaussian mixture (a standard 2-D benchmark)."""
  means, std = eight_gaussians_params(radius, std)
  k_comp, k_noise = jax.random.split(key)
  comp = jax.random.randint(k_comp, (n,), 0, 8)
  return jnp.asarray(means)[comp] + std * jax.random.normal(k_noise, (n, 2))


def default_mixture() -> GaussianMixture:
  """An asymmetric 3-component mixture with unequal weights and anisotropic components."""
  return GaussianMixture(jnp.array([0.5, 0.3, 0.2]),
                         jnp.array([[-1.0, -0.5], [1.0, 0.0], [0.0, 1.2]]),
                         jnp.array([[0.3, 0.2], [0.2, 0.4], [0.25, 0.25]]))


def gaussian_mixture(key, n: int):
  return default_mixture().sample(key, n)


def two_moons(key, n: int, noise: float = 0.05):
  """Two interleaved half circles of radius 1 (upper centred at 0, lower at (1, -0.5)),
  shifted to zero mean, plus Gaussian noise."""
  k_side, k_angle, k_noise = jax.random.split(key, 3)
  theta = jnp.pi * jax.random.uniform(k_angle, (n,))
  upper = jax.random.bernoulli(k_side, 0.5, (n,))
  x = jnp.where(upper, jnp.cos(theta), 1.0 - jnp.cos(theta))
  y = jnp.where(upper, jnp.sin(theta), 0.5 - jnp.sin(theta))
  pts = jnp.stack([x - 0.5, y - 0.25], axis=1)
  return pts + noise * jax.random.normal(k_noise, (n, 2))


def swiss_roll(key, n: int, noise: float = 0.05):
  """The 2-D swiss roll `r(u) (cos u, sin u)`, `u ~ U(1.5π, 4.5π)`, `r = u / (3π)`."""
  k_u, k_noise = jax.random.split(key)
  u = jax.random.uniform(k_u, (n,), minval=1.5 * jnp.pi, maxval=4.5 * jnp.pi)
  r = u / (3 * jnp.pi)
  return r[:, None] * jnp.stack([jnp.cos(u), jnp.sin(u)], 1) + noise * jax.random.normal(
      k_noise, (n, 2))


def checkerboard(key, n: int, cells: int = 4):
  """Uniform on the 'black' cells of a `cells x cells` board on [-2, 2]² (cells with
  floor(x) + floor(y) even, in cell units)."""
  k_cell, k_pos = jax.random.split(key)
  black = np.array([(i, j) for i in range(cells) for j in range(cells) if (i + j) % 2 == 0])
  idx = jax.random.randint(k_cell, (n,), 0, len(black))
  size = 4.0 / cells
  corner = jnp.asarray(black, jnp.float32)[idx] * size - 2.0
  return corner + size * jax.random.uniform(k_pos, (n, 2))


def rings(key, n: int, radii=(0.5, 1.0, 1.5), noise: float = 0.04):
  """Concentric circles with points spread in proportion to circumference."""
  k_ring, k_angle, k_noise = jax.random.split(key, 3)
  radii = jnp.asarray(radii, jnp.float32)
  ring = jax.random.choice(k_ring, len(radii), (n,), p=radii / radii.sum())
  angle = 2 * jnp.pi * jax.random.uniform(k_angle, (n,))
  pts = radii[ring][:, None] * jnp.stack([jnp.cos(angle), jnp.sin(angle)], 1)
  return pts + noise * jax.random.normal(k_noise, (n, 2))


TOYS = {
    'two_moons': two_moons,
    'swiss_roll': swiss_roll,
    'checkerboard': checkerboard,
    'rings': rings,
    'eight_gaussians': eight_gaussians,
    'gaussian_mixture': gaussian_mixture,
}
