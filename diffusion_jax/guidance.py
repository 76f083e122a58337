"""Guidance, inpainting and interpolation as denoiser wrappers (DESIGN §4).

A sampler only ever sees a denoiser `(x_t, t, cond) -> (x0_hat, eps_hat)`. Everything here
either wraps a denoiser into another one (classifier-free guidance, guidance rescale and interval,
known-region replacement), so it works with every sampler in `samplers.SAMPLERS`, or is a
sampler of its own that needs more than a denoiser (RePaint's jumps back in time), or acts on
prior draws (`slerp`, `interpolation_batch`).

Wrappers keep the pair `(x0_hat, eps_hat)` consistent with `x_t = alpha x0_hat + sigma eps_hat`
and pass through the attributes samplers read: `kind` (for the zero-terminal-SNR check) and
`evals_per_call` (for honest NFE; guidance doubles it).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.parameterization import Denoiser
from diffusion_jax.parameterization import as_denoiser
from diffusion_jax.parameterization import expand_like
from diffusion_jax.samplers import _common
from diffusion_jax.samplers.grids import discrete_timesteps

INTERVAL_VARIABLES = ('t', 'sigma')


def _pass_attributes(wrapped, inner, evals_factor: int = 1) -> Denoiser:
  """The `Denoiser` calling `wrapped`, with `inner`'s kind and `sigma_min`, `evals_factor`
  times its evaluations per call, and no `with_variance` (it would bypass the wrapper)."""
  inner = as_denoiser(inner)
  return dataclasses.replace(inner, fn=wrapped, evals_per_call=evals_factor * inner.evals_per_call,
                             with_variance=None)


def _per_example_t(t, x):
  return jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])


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

  `rescale = phi > 0` is the guidance rescale of Lin et al. (2024, §3.4), applied
  here to the guided **x0 prediction**: with per-example standard deviations over all non-batch
  axes, `x0_r = x0_g std(x0_c) / std(x0_g)` and `x0 = phi x0_r + (1 - phi) x0_g`; `eps` is then
  recomputed from `x_t` as `eps_g + (alpha / sigma) (x0_g - x0)` (= `(x_t - alpha x0) / sigma`)
  so the pair stays consistent. (Implementations that rescale the raw network output, eps or v,
  give different results.) `phi = 1` makes `std(x0)` equal to the conditional prediction's; the
  paper uses `phi = 0.7`. Needs `process`.

  `interval = (lo, hi)` applies guidance only where the noise variable lies in the closed
  interval `[lo, hi]` (Kynkäänniemi et al. 2024, "guidance interval") and returns the
  conditional prediction (exactly) elsewhere; the variable is `t` (`interval_in='t'`) or EDM's
  noise level `sigma / alpha` (`interval_in='sigma'`, as in the paper; needs `process`). Both
  branches are still computed in the one batched call, so every call counts 2 evaluations even
  outside the interval: the NFE stays honest, not optimistic.
  """
  if interval_in not in INTERVAL_VARIABLES:
    raise ValueError(f'interval_in={interval_in!r}; choose from {INTERVAL_VARIABLES}')
  if rescale < 0 or rescale > 1:
    raise ValueError(f'rescale={rescale} must lie in [0, 1] (phi of Lin et al. 2024, §3.4)')
  if interval is not None:
    lo, hi = (float(v) for v in interval)
    if not lo <= hi:
      raise ValueError(f'interval={interval} must be (lo, hi) with lo <= hi')
  needs_process = rescale > 0 or (interval is not None and interval_in == 'sigma')
  if needs_process and process is None:
    raise ValueError("classifier_free_guidance: rescale > 0 or interval_in='sigma' needs "
                     'process= (for alpha(t) and sigma(t))')

  def guided(x_t, t, cond: Any = None):
    if cond is None:
      raise ValueError('classifier_free_guidance needs cond (the conditional half of the batch)')
    batch = x_t.shape[0]
    t_b = _per_example_t(t, x_t)
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
    if rescale > 0:
      axes = tuple(range(1, x_t.ndim))
      std_c = jnp.std(x0_c, axis=axes, keepdims=True)
      std_g = jnp.std(x0, axis=axes, keepdims=True)
      ratio = jnp.where(std_g > 0, std_c / jnp.where(std_g > 0, std_g, 1), 1)
      x0_new = x0 * (rescale * ratio + (1 - rescale))
      alpha = expand_like(process.alpha(t_b), x_t)
      sigma = expand_like(process.sigma(t_b), x_t)
      eps = eps + alpha / sigma * (x0 - x0_new)
      x0 = x0_new
    if interval is not None:
      v = t_b if interval_in == 't' else process.sigma(t_b) / process.alpha(t_b)
      inside = expand_like((v >= lo) & (v <= hi), x_t)
      x0 = jnp.where(inside, x0, x0_c)
      eps = jnp.where(inside, eps, eps_c)
    return x0, eps

  return _pass_attributes(guided, denoiser, 2)


# --- inpainting ------------------------------------------------------------------------------


def _as_mask(mask):
  mask = jnp.asarray(mask)
  return mask if mask.dtype == jnp.bool_ else mask != 0


def inpaint(denoiser, process, known, mask):
  """Inpainting by known-region replacement, as a denoiser wrapper.

  `mask` (broadcastable to `x_t`; 1 / True = known) is binary; `known` holds the clean values
  there (anything elsewhere). The wrapped denoiser returns `x0_hat` with the known region set to
  `known` and `eps_hat` there recomputed as `(x_t - alpha known) / sigma`, so the pair still
  reconstructs `x_t`; the unknown region is the inner denoiser's, which sees the whole `x_t`.

  Why this is replacement: in the known region the pair is `(known, z)` with
  `z = (x_t - alpha known) / sigma`, i.e. `x_t = alpha known + sigma z` there. DDIM / Euler in
  `s = sigma / alpha` (and Heun, whose two slopes then agree) move it to
  `alpha' known + sigma' z`: the same `z`, exactly (the ODE `dy/ds = (y - known) / s` in
  `y = x / alpha` has the solution `known + s z`, which these steps reproduce). The DDPM
  ancestral step draws from `q(x_m | x_n, x0 = known)`, and composing with
  `x_n ~ q(x_n | known)` gives `q(x_m | known)`. So the known region stays a draw from the
  forward marginal `q(x_t | known)` throughout, the same as pasting a noised copy of `known` into
  `x_t` before each step, while the unknown region is updated by the sampler's own rule.
  DPM-Solver(++) and UniPC combine x0_hat's that all equal `known` there (or eps_hat's that all
  equal `z`), so they too keep `z`. Runge-Kutta steps in `t` (the `flow_*` samplers) follow
  that same curve up to their own truncation error, exact for the linear interpolant. The final
  step to data returns `x0_hat`, whose known region is `known`; `inpaint_sample` also pastes it
  into the output, bitwise.

  Replacement conditions the unknown region only through the denoiser's view of the noisy known
  region: it is exact when the two regions are independent (e.g. a diagonal Gaussian) but
  biased for correlated data (Lugmayr et al. 2022, §4; the known region's noise is not
  the one the model's unknown region was "expecting"). `repaint_sample` reduces that bias.
  """
  known = jnp.asarray(known)
  mask = _as_mask(mask)

  def wrapped(x_t, t, cond: Any = None):
    x0, eps = denoiser(x_t, t, cond)
    t_b = _per_example_t(t, x_t)
    alpha = expand_like(process.alpha(t_b), x_t)
    sigma = expand_like(process.sigma(t_b), x_t)
    known_x = jnp.broadcast_to(known.astype(x_t.dtype), x_t.shape)
    m = jnp.broadcast_to(mask, x_t.shape)
    return jnp.where(m, known_x, x0), jnp.where(m, (x_t - alpha * known_x) / sigma, eps)

  return _pass_attributes(wrapped, denoiser)


def paste(x, known, mask):
  """`x` with the known region (`mask` 1) set to `known`, exactly."""
  m = jnp.broadcast_to(_as_mask(mask), x.shape)
  return jnp.where(m, jnp.broadcast_to(jnp.asarray(known, x.dtype), x.shape), x)


def inpaint_sample(sampler, denoiser, process, x_T, key, known, mask, **kwargs):
  """Runs any `sampler(denoiser, process, x_T, key, **kwargs)` with the `inpaint` wrapper and
  pastes `known` into the result, so the known region is kept bitwise (samplers' last step,
  e.g. DDPM's `1 * x0_hat` written as a ratio of abar's, may round). Returns `(x, info)`."""
  x, info = sampler(inpaint(denoiser, process, known, mask), process, x_T, key, **kwargs)
  return paste(x, known, mask), info


def repaint_schedule(steps: int, jump_length: int = 10, resample: int = 10):
  """RePaint's walk over the `steps + 1` levels `0..steps` (0 = the prior end, `steps` = data).

  Returns numpy int arrays `(start, level)`, one entry per denoising step: the state is first
  moved up (re-noised) from level `start` to `level` (no move when equal) and then denoised
  from `level` to `level + 1`. The `steps` down-steps are cut into blocks of `jump_length`,
  aligned so the last block ends at data (the first may be shorter); each block is descended
  `resample` times, jumping back to its top between descents (Lugmayr et al. 2022, §4.2,
  with the jumps of Fig. 3 / App. B). Denoising steps, hence calls: `resample * steps`.
  """
  if steps < 1 or jump_length < 1 or resample < 1:
    raise ValueError(f'steps={steps}, jump_length={jump_length} and resample={resample} must '
                     'all be >= 1')
  tops = list(range(steps - jump_length, 0, -jump_length))[::-1]
  edges = [0] + tops + [steps]
  start, level = [], []
  for top, bottom in zip(edges[:-1], edges[1:], strict=True):
    for r in range(resample):
      for k in range(top, bottom):
        start.append(bottom if (r > 0 and k == top) else k)
        level.append(k)
  return np.asarray(start, np.int64), np.asarray(level, np.int64)


def repaint_sample(denoiser, process, x_T, key, known, mask, *, steps: int,
                   jump_length: int = 10, resample: int = 10, spacing: str = 'trailing',
                   cond=None, variance: str = 'small'):
  """RePaint (Lugmayr et al. 2022, Alg. 1 with jumps): inpainting with resampling.

  On a `DiscreteVP` process, on the `steps` respaced integer steps (`spacing` as in
  `discrete_timesteps`) plus clean data. Each denoising step from `n` to `m < n` is a DDPM
  ancestral step (posterior `q(x_m | x_n, x0 = x0_hat)`, variance 'small' or 'large' as in
  `ddpm_sample`, no noise into `m = 0`) for the unknown region, while the known region is a
  fresh draw from `q(x_m | known) = N(sqrt(abar_m) known, (1 - abar_m) I)`. A jump back from
  level `a` to a noisier level `b` re-noises the whole state with the forward process,
  `x_b ~ N(sqrt(abar_b / abar_a) x_a, (1 - abar_b / abar_a) I)` (one draw for the whole jump,
  which has the law of the step-by-step one). The walk is `repaint_schedule(steps, jump_length,
  resample)`, precomputed in numpy and run as one `lax.scan`; `resample = 1` is plain
  replacement with fresh known-region noise.

  `info['nfe'] = resample * steps * evals_per_call` exactly (`info['denoiser_calls']`,
  `info['jumps']`). The known region of the output is `known`, bitwise.
  """
  if not hasattr(process, 'num_steps'):
    raise ValueError(f'repaint_sample runs on the integer steps of a DiscreteVP process; got '
                     f'{type(process).__name__}')
  if variance not in ('small', 'large'):
    raise ValueError(f"variance={variance!r}; choose 'small' or 'large'")
  _common.need_key(key, 'repaint_sample', 'it draws noise at every step')
  n_levels = np.concatenate([discrete_timesteps(process.num_steps, steps, spacing), [0]])
  _common.check_terminal_snr(denoiser, process.alphas_cumprod[n_levels[0] - 1],
                             'repaint_sample')
  start, level = repaint_schedule(steps, jump_length, resample)
  n_start, n_from, n_to = n_levels[start], n_levels[level], n_levels[level + 1]
  jumps = start != level
  calls = level.shape[0]
  keys = jax.random.split(key, calls)
  xs = tuple(jnp.asarray(a, jnp.int32) for a in (n_start, n_from, n_to)) + \
      (jnp.asarray(jumps), keys)
  known = jnp.broadcast_to(jnp.asarray(known, x_T.dtype), x_T.shape)
  mask = jnp.broadcast_to(_as_mask(mask), x_T.shape)
  dtype = x_T.dtype

  def step(x, inputs):
    n_a, n, m, jump, k = inputs
    k_up, k_known, k_down = jax.random.split(k, 3)
    abar = lambda i: process.alpha_bar_of_step(i, dtype)
    # Jump back: from step n_a (less noise, possibly data) up to n.
    ratio = abar(n) / abar(n_a)
    renoised = jnp.sqrt(ratio) * x + jnp.sqrt(jnp.maximum(1 - ratio, 0.0)) * \
        jax.random.normal(k_up, x.shape, dtype)
    x = jnp.where(jump, renoised, x)
    # Denoise n -> m: DDPM ancestral for the unknown region ...
    abar_n, abar_m = abar(n), abar(m)
    beta = 1 - abar_n / abar_m
    x0, _ = denoiser(x, process.t_of_step(n, dtype), cond)
    mean = (jnp.sqrt(abar_m) * beta / (1 - abar_n)) * x0 \
        + (jnp.sqrt(1 - beta) * (1 - abar_m) / (1 - abar_n)) * x
    var = beta * (1 - abar_m) / (1 - abar_n) if variance == 'small' else beta
    unknown = mean + jnp.where(m > 0, jnp.sqrt(var), 0.0) * \
        jax.random.normal(k_down, x.shape, dtype)
    # ... and a fresh draw from q(x_m | known) for the known region.
    known_m = jnp.sqrt(abar_m) * known + jnp.sqrt(1 - abar_m) * \
        jax.random.normal(k_known, x.shape, dtype)
    return jnp.where(mask, known_m, unknown), None

  x, _ = jax.lax.scan(step, x_T, xs)
  return paste(x, known, mask), _common.make_info(denoiser, calls, jumps=int(jumps.sum()))


# --- interpolation between prior draws -------------------------------------------------------


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
