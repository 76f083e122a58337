"""Inpainting: known-region replacement as a denoiser wrapper, and RePaint (DESIGN §4).

`inpaint` wraps a denoiser `(x_t, t, cond) -> (x0_hat, eps_hat)` into another one, so it works
with every sampler in `samplers.SAMPLERS` (and composes with `guidance`); `inpaint_sample` runs
any sampler with it and pastes the known region into the result. `repaint_sample` is a sampler
of its own, since RePaint's jumps back in time need more than a denoiser.

The mask is binary, 1 / True = known, broadcastable to `x_t`.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax._wrappers import pass_attributes
from diffusion_jax._wrappers import per_example_t
from diffusion_jax.parameterization import expand_like
from diffusion_jax.samplers import _common
from diffusion_jax.samplers.grids import discrete_timesteps


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
    t_b = per_example_t(t, x_t)
    alpha = expand_like(process.alpha(t_b), x_t)
    sigma = expand_like(process.sigma(t_b), x_t)
    known_x = jnp.broadcast_to(known.astype(x_t.dtype), x_t.shape)
    m = jnp.broadcast_to(mask, x_t.shape)
    return jnp.where(m, known_x, x0), jnp.where(m, (x_t - alpha * known_x) / sigma, eps)

  return pass_attributes(wrapped, denoiser)


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
