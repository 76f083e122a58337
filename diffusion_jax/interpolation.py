"""Interpolation between prior draws: `slerp` and the batch for an interpolation figure.

Samplers take the prior draw `x_T` as an argument (DESIGN §4), so a batch of interpolated draws
fed to a deterministic sampler gives a path between two samples.
"""

import jax.numpy as jnp

from diffusion_jax.parameterization import expand_like


def slerp(x0, x1, alpha, *, eps: float = 1e-6):
  """Spherical interpolation between prior draws, per example (leading axis = batch).

  Over the non-batch axes of `x0, x1 [B, ...]`: the direction moves along the great circle from
  `x0 / |x0|` to `x1 / |x1|` (`sin((1 - a) theta) u0 + sin(a theta) u1) / sin theta`) and the
  norm is interpolated linearly, `(1 - a) |x0| + a |x1|`. For draws of equal norm this is the
  usual slerp of the vectors themselves (as in DDIM's interpolations, Song et al. 2021, §5.4), so
  unit-norm inputs stay unit-norm and Gaussian draws keep their typical norm `~ sqrt(D)` instead
  of shrinking as under linear interpolation. `alpha` is a number or `[B]`; `alpha = 0` returns
  `x0` and `alpha = 1` returns `x1` exactly. The angle is
  `theta = 2 atan2(|u0 - u1|, |u0 + u1|)`, accurate at every angle. Where `sin theta < eps`
  (parallel, or exactly opposite where the great circle is not defined) the direction is
  interpolated linearly instead.
  """
  x0, x1 = jnp.asarray(x0), jnp.asarray(x1)
  if x0.shape != x1.shape or x0.ndim < 2:
    raise ValueError(f'slerp needs x0, x1 of the same shape [B, ...] (ndim >= 2); got {x0.shape} '
                     f'and {x1.shape}')
  axes = tuple(range(1, x0.ndim))
  a = expand_like(jnp.broadcast_to(jnp.asarray(alpha, x0.dtype), x0.shape[:1]), x0)
  norm = lambda v: jnp.sqrt(jnp.sum(v * v, axis=axes, keepdims=True))
  r0, r1 = norm(x0), norm(x1)
  u0 = x0 / jnp.where(r0 > 0, r0, 1)
  u1 = x1 / jnp.where(r1 > 0, r1, 1)
  theta = 2 * jnp.arctan2(norm(u0 - u1), norm(u0 + u1))
  sin = jnp.sin(theta)
  ok = sin >= eps
  safe = jnp.where(ok, sin, 1)
  c0 = jnp.where(ok, jnp.sin((1 - a) * theta) / safe, 1 - a)
  c1 = jnp.where(ok, jnp.sin(a * theta) / safe, a)
  out = ((1 - a) * r0 + a * r1) * (c0 * u0 + c1 * u1)
  return jnp.where(a == 0, x0, jnp.where(a == 1, x1, out))


def interpolation_batch(x_a, x_b, num: int, *, method: str = 'slerp'):
  """`(batch [num, ...], alphas [num])`: `num` points from prior draw `x_a` to `x_b` (one draw
  each, no batch axis), `alphas = linspace(0, 1, num)`, by `slerp` or `'linear'` interpolation.
  Feed `batch` to any sampler as `x_T` for an interpolation figure (deterministic samplers map
  it to a path between the two samples)."""
  if method not in ('slerp', 'linear'):
    raise ValueError(f"method={method!r}; choose 'slerp' or 'linear'")
  x_a, x_b = jnp.asarray(x_a), jnp.asarray(x_b)
  if x_a.ndim == 0:
    raise ValueError('interpolation_batch needs non-scalar draws')
  alphas = jnp.linspace(0.0, 1.0, num, dtype=x_a.dtype)
  xa = jnp.broadcast_to(x_a, (num,) + x_a.shape)
  xb = jnp.broadcast_to(x_b, (num,) + x_b.shape)
  if method == 'linear':
    a = expand_like(alphas, xa)
    return (1 - a) * xa + a * xb, alphas
  return slerp(xa, xb, alphas), alphas
