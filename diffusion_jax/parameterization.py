"""What a network's output means, and the pure conversions between meanings (DESIGN §2).

With `x_t = alpha x0 + sigma eps`, a prediction kind fixes the network's target:

  eps        eps
  x0         x0
  v          alpha eps - sigma x0                      (Salimans & Ho 2022, §4)
  score      -eps / sigma  = grad log q(x_t)           (for the Gaussian perturbation)
  velocity   d x_t / dt = alpha' x0 + sigma' eps       (flow matching target)

`to_x0_eps` maps any kind's output back to `(x0_hat, eps_hat)` and `target` maps `(x0, eps)`
to any kind's target; the pair round-trips exactly up to float rounding. Samplers only ever
see a denoiser `(x_t, t, cond) -> (x0_hat, eps_hat)` built by `make_denoiser`.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

KINDS = ('eps', 'x0', 'v', 'score', 'velocity')

ModelFn = Callable[..., jax.Array]   # (x_t [B, ...], t [B], cond) -> out [B, ...]
Denoiser = Callable[..., tuple[jax.Array, jax.Array]]


def expand_like(a, x):
  """Reshapes per-example coefficients `[B]` (or scalars) to broadcast against `x [B, ...]`."""
  a = jnp.asarray(a, x.dtype)
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) if a.ndim else a


def _check_kind(kind):
  if kind not in KINDS:
    raise ValueError(f'unknown prediction kind {kind!r}; choose from {KINDS}')


def _coefficients(process, t):
  """alpha, sigma and their time derivatives at `t` (derivatives by forward-mode autodiff)."""
  alpha, d_alpha = jax.jvp(process.alpha, (t,), (jnp.ones_like(t),))
  sigma, d_sigma = jax.jvp(process.sigma, (t,), (jnp.ones_like(t),))
  return alpha, sigma, d_alpha, d_sigma


def target(kind: str, x0, eps, process, t):
  """The regression target of prediction `kind` for the pair `(x0, eps)` at time `t [B]`."""
  _check_kind(kind)
  if kind == 'eps':
    return eps
  if kind == 'x0':
    return x0
  alpha, sigma, d_alpha, d_sigma = (expand_like(c, x0) for c in _coefficients(process, t))
  if kind == 'v':
    return alpha * eps - sigma * x0
  if kind == 'score':
    return -eps / sigma
  return d_alpha * x0 + d_sigma * eps  # velocity


def to_x0_eps(kind: str, out, x_t, process, t):
  """Converts a network output of `kind` at `(x_t, t)` into `(x0_hat, eps_hat)`.

  Uses `x_t = alpha x0 + sigma eps` to recover the other half. For `v`,
  `x0 = (alpha x_t - sigma v) / (alpha² + sigma²)` and `eps = (sigma x_t + alpha v) / (...)`,
  which is Salimans & Ho's `x0 = alpha x_t - sigma v` when the process is variance preserving.
  """
  _check_kind(kind)
  alpha, sigma, d_alpha, d_sigma = (expand_like(c, x_t) for c in _coefficients(process, t))
  if kind == 'eps':
    eps = out
    return (x_t - sigma * eps) / alpha, eps
  if kind == 'x0':
    x0 = out
    return x0, (x_t - alpha * x0) / sigma
  if kind == 'v':
    norm = alpha**2 + sigma**2
    return (alpha * x_t - sigma * out) / norm, (sigma * x_t + alpha * out) / norm
  if kind == 'score':
    eps = -sigma * out
    return (x_t - sigma * eps) / alpha, eps
  # velocity: solve [alpha sigma; alpha' sigma'] [x0; eps] = [x_t; v].
  det = alpha * d_sigma - sigma * d_alpha
  return (d_sigma * x_t - sigma * out) / det, (alpha * out - d_alpha * x_t) / det


def make_denoiser(model_fn: ModelFn, process, kind: str, clip_x0: float | None = None) -> Denoiser:
  """Wraps a network into the denoiser `(x_t, t, cond) -> (x0_hat, eps_hat)` samplers consume.

  `clip_x0` (e.g. 1.0 for data in [-1, 1]) clips `x0_hat` to the data range and recomputes
  `eps_hat` from it so the pair stays consistent with `x_t`, as DDPM's sampler does.
  """
  _check_kind(kind)

  def denoiser(x_t, t, cond: Any = None):
    t = jnp.broadcast_to(jnp.asarray(t, x_t.dtype), x_t.shape[:1])
    x0, eps = to_x0_eps(kind, model_fn(x_t, t, cond), x_t, process, t)
    if clip_x0 is not None:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
      alpha, sigma = expand_like(process.alpha(t), x_t), expand_like(process.sigma(t), x_t)
      eps = (x_t - alpha * x0) / sigma
    return x0, eps

  return denoiser
