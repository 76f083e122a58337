"""Classifier-free guidance, guidance rescale and guidance interval: denoiser wrappers (§4).

A sampler only ever sees a denoiser `(x_t, t, cond) -> (x0_hat, eps_hat)`; each function here
wraps one into another, so guidance works with every sampler in `samplers.SAMPLERS`. They
compose:

  guided = classifier_free_guidance(denoiser, scale, null_cond)
  guided = guidance_rescale(guided, 0.7, process)          # optional, Lin et al. 2024
  guided = guidance_interval(guided, (lo, hi))             # optional, outermost

which is exactly `classifier_free_guidance(denoiser, scale, null_cond, rescale=0.7,
interval=(lo, hi), process=process)`. A guided denoiser also carries
`guided_and_conditional(x_t, t, cond) -> ((x0, eps), (x0_c, eps_c))`, the guided pair and the
conditional one from the same batched call, which is what the rescale and the interval need.

Wrappers keep the pair `(x0_hat, eps_hat)` consistent with `x_t = alpha x0_hat + sigma eps_hat`
and pass through `kind` and `evals_per_call` (`_wrappers.pass_attributes`; guidance doubles it).
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from diffusion_jax._wrappers import pass_attributes
from diffusion_jax._wrappers import per_example_t
from diffusion_jax.parameterization import Denoiser
from diffusion_jax.parameterization import expand_like

INTERVAL_VARIABLES = ('t', 'sigma')


def _null_like(cond, null_cond):
  """`null_cond` broadcast to every leaf of `cond` (a leaf, or a pytree matching `cond`)."""
  leaves, treedef = jax.tree.flatten(cond)
  null_leaves = jax.tree.leaves(null_cond)
  if jax.tree.structure(null_cond) != treedef:
    if len(null_leaves) != 1:
      raise ValueError('null_cond must be one array (used for every leaf of cond) or a pytree '
                       f'with the structure of cond; got {jax.tree.structure(null_cond)} for '
                       f'cond {treedef}')
    null_leaves = null_leaves * len(leaves)
  nulls = [jnp.broadcast_to(jnp.asarray(n, jnp.asarray(c).dtype), jnp.shape(c))
           for c, n in zip(leaves, null_leaves, strict=True)]
  return jax.tree.unflatten(treedef, nulls)


@dataclasses.dataclass(frozen=True)
class GuidedDenoiser(Denoiser):
  """A `Denoiser` that also gives `guided_and_conditional(x_t, t, cond) -> ((x0, eps),
  (x0_c, eps_c))`: the guided pair and the conditional one from the same batched call."""
  guided_and_conditional: Callable[..., Any] | None = None


def _guided(parts, inner, evals_factor: int = 1) -> GuidedDenoiser:
  """A denoiser from `parts(x_t, t, cond) -> ((x0, eps), (x0_c, eps_c))`, carrying `parts`."""
  def guided(x_t, t, cond: Any = None):
    return parts(x_t, t, cond)[0]
  return pass_attributes(guided, inner, evals_factor, cls=GuidedDenoiser,
                         guided_and_conditional=parts)


def _parts_of(guided, who: str):
  if not isinstance(guided, GuidedDenoiser):
    raise ValueError(f'{who} wraps a classifier_free_guidance denoiser (it needs the '
                     f'conditional prediction too); got {type(guided).__name__}')
  return guided.guided_and_conditional


def _check_rescale(phi):
  if phi < 0 or phi > 1:
    raise ValueError(f'rescale={phi} must lie in [0, 1] (phi of Lin et al. 2024, §3.4)')


def _check_interval(interval, interval_in):
  if interval_in not in INTERVAL_VARIABLES:
    raise ValueError(f'interval_in={interval_in!r}; choose from {INTERVAL_VARIABLES}')
  if interval is None:
    return None
  lo, hi = (float(v) for v in interval)
  if not lo <= hi:
    raise ValueError(f'interval={interval} must be (lo, hi) with lo <= hi')
  return lo, hi


def classifier_free_guidance(denoiser, scale, null_cond, *, rescale: float = 0.0,
                             interval=None, interval_in: str = 't', process=None):
  """Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper.

  `scale` (a number, or per example `[B]`) combines the conditional and the unconditional
  prediction as `eps = eps_u + scale (eps_c - eps_u)`, and `x0` the same way: `scale = 1` is the
  conditional model (exactly, bitwise), `scale = 0` the unconditional one, `scale > 1` guides.
  Ho & Salimans write `eps = (1 + w) eps_c - w eps_u`, so `scale = 1 + w`; EDM2 (Karras et al.
  2024) and Kynkäänniemi et al. (2024) use `scale` as here. Both halves of the pair are combined
  with the same weights `(1 - scale, scale)`, which sum to 1: since each prediction satisfies
  `x_t = alpha x0 + sigma eps`, so does the guided pair, i.e. guiding x0, eps, v or the score is
  the same thing (all are affine in `(x0, eps)` given `x_t`).

  The conditional and the unconditional prediction come from ONE call of `denoiser` on a batch
  of `2B`: `x_t` and `t` repeated, `cond` (an array with leading batch axis `[B, ...]`, e.g.
  integer labels `[B]`, or any pytree of such arrays) followed by `null_cond` broadcast to it
  (one array for every leaf, e.g. the label of the "null" class, or a pytree like `cond`). The
  guided denoiser therefore costs 2 network evaluations: its `evals_per_call` is twice the
  inner one's, and samplers report `nfe` accordingly. `kind` is passed through.

  `rescale = phi > 0` then applies `guidance_rescale(., phi, process)` and `interval = (lo, hi)`
  then `guidance_interval(., interval, interval_in=interval_in, process=process)`, in that
  order; the result is the same, bitwise, as composing those wrappers by hand.
  """
  interval = _check_interval(interval, interval_in)
  _check_rescale(rescale)
  needs_process = rescale > 0 or (interval is not None and interval_in == 'sigma')
  if needs_process and process is None:
    raise ValueError("classifier_free_guidance: rescale > 0 or interval_in='sigma' needs "
                     'process= (for alpha(t) and sigma(t))')

  def parts(x_t, t, cond: Any = None):
    if cond is None:
      raise ValueError('classifier_free_guidance needs cond (the conditional half of the batch)')
    batch = x_t.shape[0]
    t_b = per_example_t(t, x_t)
    cond = jax.tree.map(lambda c: jnp.broadcast_to(c, (batch,) + jnp.shape(c)[1:])
                        if jnp.ndim(c) else jnp.broadcast_to(c, (batch,)), cond)
    null = _null_like(cond, null_cond)
    both = jax.tree.map(lambda c, n: jnp.concatenate([c, n], axis=0), cond, null)
    x0_2, eps_2 = denoiser(jnp.concatenate([x_t, x_t], axis=0),
                           jnp.concatenate([t_b, t_b], axis=0), both)
    x0_c, x0_u = x0_2[:batch], x0_2[batch:]
    eps_c, eps_u = eps_2[:batch], eps_2[batch:]
    w = expand_like(jnp.broadcast_to(jnp.asarray(scale, x_t.dtype), (batch,)), x_t)
    # (1 - w) u + w c: exactly c at w = 1 and exactly u at w = 0.
    x0 = (1 - w) * x0_u + w * x0_c
    eps = (1 - w) * eps_u + w * eps_c
    return (x0, eps), (x0_c, eps_c)

  guided = _guided(parts, denoiser, 2)
  if rescale > 0:
    guided = guidance_rescale(guided, rescale, process)
  if interval is not None:
    guided = guidance_interval(guided, interval, interval_in=interval_in, process=process)
  return guided


def guidance_rescale(guided, phi: float, process):
  """Guidance rescale (Lin et al. 2024, §3.4) of a `classifier_free_guidance` denoiser.

  Applied to the guided **x0 prediction**: with per-example standard deviations over all
  non-batch axes, `x0_r = x0_g std(x0_c) / std(x0_g)` and `x0 = phi x0_r + (1 - phi) x0_g`;
  `eps` is then recomputed from `x_t` as `eps_g + (alpha / sigma) (x0_g - x0)`
  (= `(x_t - alpha x0) / sigma`) so the pair stays consistent. (Implementations that rescale the
  raw network output, eps or v, give different results.) `phi = 1` makes `std(x0)` equal to the
  conditional prediction's; the paper uses `phi = 0.7`; `phi = 0` returns `guided` itself.
  """
  _check_rescale(phi)
  parts_in = _parts_of(guided, 'guidance_rescale')
  if phi == 0:
    return guided
  if process is None:
    raise ValueError('guidance_rescale needs process (for alpha(t) and sigma(t))')

  def parts(x_t, t, cond: Any = None):
    (x0, eps), (x0_c, eps_c) = parts_in(x_t, t, cond)
    t_b = per_example_t(t, x_t)
    axes = tuple(range(1, x_t.ndim))
    std_c = jnp.std(x0_c, axis=axes, keepdims=True)
    std_g = jnp.std(x0, axis=axes, keepdims=True)
    ratio = jnp.where(std_g > 0, std_c / jnp.where(std_g > 0, std_g, 1), 1)
    x0_new = x0 * (phi * ratio + (1 - phi))
    alpha = expand_like(process.alpha(t_b), x_t)
    sigma = expand_like(process.sigma(t_b), x_t)
    eps = eps + alpha / sigma * (x0 - x0_new)
    return (x0_new, eps), (x0_c, eps_c)

  return _guided(parts, guided)


def guidance_interval(guided, interval, *, interval_in: str = 't', process=None):
  """Guidance only where the noise variable lies in `[lo, hi]` (Kynkäänniemi et al. 2024).

  Wraps a `classifier_free_guidance` denoiser (possibly rescaled): inside the closed interval
  `interval = (lo, hi)` it returns the guided prediction, elsewhere the conditional one
  (exactly). The variable is `t` (`interval_in='t'`) or EDM's noise level `sigma / alpha`
  (`interval_in='sigma'`, as in the paper; needs `process`). Both branches are still computed in
  the one batched call, so every call counts 2 evaluations even outside the interval: the NFE
  stays honest, not optimistic.
  """
  lo, hi = _check_interval(interval, interval_in)
  parts_in = _parts_of(guided, 'guidance_interval')
  if interval_in == 'sigma' and process is None:
    raise ValueError("guidance_interval: interval_in='sigma' needs process (for sigma / alpha)")

  def parts(x_t, t, cond: Any = None):
    (x0, eps), (x0_c, eps_c) = parts_in(x_t, t, cond)
    t_b = per_example_t(t, x_t)
    v = t_b if interval_in == 't' else process.sigma(t_b) / process.alpha(t_b)
    inside = expand_like((v >= lo) & (v <= hi), x_t)
    return (jnp.where(inside, x0, x0_c), jnp.where(inside, eps, eps_c)), (x0_c, eps_c)

  return _guided(parts, guided)
