"""Image editing with any trained model and any sampler: SDEdit and DDIM-inversion editing (§8).

* `sdedit` (Meng et al. 2022, "SDEdit", arXiv:2108.01073, §3): noise the input to an
  intermediate time, `x_t = alpha(t) x0 + sigma(t) eps` with `t = strength`, and run a sampler
  from there (`t_max = t`). The forward marginal is exact: for `x0 ~ data`, `x_t ~ q_t`, so a
  sampler exact in law returns data again (marginal preservation); for an input off the data
  (a stroke painting, another class) the reverse process pulls it onto the data manifold while
  keeping what survives the noise (coarse layout at small strength, nothing at strength 1).
* `invert_and_edit` (DDIM inversion, Song, Meng & Ermon 2021, §4.3 and §5.4; as an editing
  method, Hertz et al. 2023 "Prompt-to-Prompt" §3.3 and Mokady et al. 2023 "Null-text
  Inversion" §3): encode the input along the deterministic sampler's path with the *source*
  condition (`samplers.ddim_invert`, or `samplers.euler_invert` for continuous processes), then
  decode that latent with the *target* condition by DDIM (eta = 0) or any deterministic sampler.
  Inverting only to `t_edit < 1` keeps more of the input.

Both are pure functions of `(denoiser, process, x0, key)` that `jax.jit` compiles whole (the
sampler name, `strength` / `t_edit`, `steps` and the options are static). Conditions and
classifier-free guidance enter through `cond=` and `guidance.classifier_free_guidance`, so
every sampler, model and process that samples can edit.

Start times on a DiscreteVP: its discrete samplers (`ddpm`, `ddim`, the integer spacings
'trailing' ...) live on the steps `n / T`, so `strength` and `t_edit` are rounded to the nearest
step, `t = round(strength T) / T` (for every sampler, so all start from the same `x_t`).
"""

import inspect
from typing import Any

import jax
import jax.numpy as jnp

from diffusion_jax import guidance
from diffusion_jax.parameterization import expand_like
from diffusion_jax.samplers import SAMPLERS
from diffusion_jax.samplers import discrete

INVERSIONS = ('ddim', 'euler')


def _resolve(sampler, who: str):
  """`(name, fn)` for a name in `SAMPLERS` or a sampler callable."""
  if isinstance(sampler, str):
    if sampler not in SAMPLERS:
      raise ValueError(f'{who}: unknown sampler {sampler!r}; choose from {sorted(SAMPLERS)}')
    return sampler, SAMPLERS[sampler]
  if not callable(sampler):
    raise ValueError(f'{who}: sampler must be a name in samplers.SAMPLERS or a sampler '
                     f'function, got {type(sampler).__name__}')
  return getattr(sampler, '__name__', type(sampler).__name__), sampler


def _parameters(fn) -> dict:
  try:
    return dict(inspect.signature(fn).parameters)
  except (TypeError, ValueError):
    return {}


def _takes(fn, name: str) -> bool:
  params = _parameters(fn)
  return name in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def _check_start(fn, name: str, who: str, kwargs: dict):
  """Refuses a sampler that cannot start mid-way and options that would set the start."""
  if not _takes(fn, 't_max'):
    raise ValueError(f'{who}: sampler {name!r} takes no t_max, so it cannot start from an '
                     'intermediate time; use one of samplers.SAMPLERS')
  for k in ('t_max', 'times'):
    if k in kwargs:
      raise ValueError(f'{who}: {k}= is set by {who} itself (from strength / t_edit); remove it '
                       'from the sampler options')


def _start_time(process, value, who: str, what: str) -> float:
  """`value` as a concrete float in [0, 1], rounded to the nearest step on a DiscreteVP."""
  try:
    value = float(value)
  except (TypeError, jax.errors.ConcretizationTypeError):
    raise ValueError(f'{who}: {what} must be a concrete number (it fixes the time grid; pass '
                     'it as a static argument under jit)') from None
  if not 0.0 <= value <= 1.0:
    raise ValueError(f'{who}: {what}={value} must lie in [0, 1] (0 = data, 1 = prior)')
  steps = getattr(process, 'num_steps', None)
  if steps is not None:
    return round(value * steps) / steps
  return value


def _check_above_t_min(process, t: float, kwargs: dict, who: str, what: str):
  t_min = kwargs.get('t_min')
  t_min = float(process.t_min if t_min is None else t_min)
  if getattr(process, 'num_steps', None) is None and 0.0 < t <= t_min:
    raise ValueError(f'{who}: {what}={t} lies at or below the sampler\'s t_min={t_min:.4g}, so '
                     f'there is nothing to denoise; use {what}=0 (the input) or above t_min')


def noise_to(process, x0, t: float, eps):
  """`x_t = alpha(t) x0 + sigma(t) eps` (DESIGN §1), the forward marginal draw at time `t`."""
  tb = jnp.full(x0.shape[:1], t, x0.dtype)                           # [B]
  return expand_like(process.alpha(tb), x0) * x0 + expand_like(process.sigma(tb), x0) * eps


def sdedit(sampler, denoiser, process, x0, key, strength: float, **sampler_kwargs):
  """SDEdit (Meng et al. 2022, §3, "SDEdit(x_g; t0, theta)"): noise `x0 [B, ...]` to
  `t = strength` and denoise it with `sampler` (a name in `samplers.SAMPLERS` or a function).

  With `(k_noise, k_sample) = jax.random.split(key)` and `eps = normal(k_noise, x0.shape)`:
  `x_t = alpha(t) x0 + sigma(t) eps`, then `sampler(denoiser, process, x_t, k_sample,
  t_max=t, **sampler_kwargs)`. `t` is `strength` (Meng et al.'s `t0`; on a DiscreteVP rounded
  to the nearest step, see the module docstring). `steps` (in `sampler_kwargs`, with `cond`,
  grid options ...) counts the steps taken from `t` down to data, as for any sampler with
  `t_max`; diffusers' img2img instead takes the last `int(steps * strength)` of a full run's
  steps, which is `steps=max(1, round(N * strength))` here (an equal step density).

  `strength = 0` returns `x0` itself (no network call, `info['nfe'] = 0`). `strength = 1` is
  plain sampling from `x_1 = alpha(1) x0 + sigma(1) eps`: on processes with alpha(1) = 0
  (zero terminal SNR, the linear interpolant) that is pure noise and the input is forgotten;
  where alpha(1) > 0 (DDPM's linear schedule: alpha(1) = 0.0064; VE / EDM: alpha = 1 with a
  large sigma(1)) a trace `alpha(1) x0` of the input remains, exactly as the forward process
  leaves it, so from data inputs the output is still exact in law (x_1 ~ q_1, not the prior).
  Every entry of `SAMPLERS` takes `t_max` (discrete DDPM / DDIM: `t T` must be a step); a
  sampler function without it is refused, as are `t_max=` / `times=` among the options (the
  start is `strength`'s). Returns `(x, info)`: the sampler's `info` plus `t_start`.
  """
  who = 'sdedit'
  name, fn = _resolve(sampler, who)
  _check_start(fn, name, who, sampler_kwargs)
  t = _start_time(process, strength, who, 'strength')
  if t == 0.0:
    return x0, {'nfe': 0, 'denoiser_calls': 0, 't_start': 0.0}
  _check_above_t_min(process, t, sampler_kwargs, who, 'strength')
  k_noise, k_sample = jax.random.split(key)
  eps = jax.random.normal(k_noise, x0.shape, x0.dtype)
  x_t = noise_to(process, x0, t, eps)
  x, info = fn(denoiser, process, x_t, k_sample, t_max=t, **sampler_kwargs)
  return x, dict(info, t_start=t)


def _maybe_guided(denoiser, scale, null_cond, who: str, what: str):
  """`denoiser` itself at scale 1 (one evaluation per call), else classifier-free guidance."""
  if isinstance(scale, (int, float)) and scale == 1:
    return denoiser
  if null_cond is None:
    raise ValueError(f'{who}: {what}={scale} (classifier-free guidance) needs null_cond, the '
                     "'no condition' input (e.g. the null class label)")
  return guidance.classifier_free_guidance(denoiser, scale, null_cond)


def invert_and_edit(denoiser, process, x0, source_cond: Any, target_cond: Any, *, steps: int,
                    t_edit: float = 1.0, inversion: str | None = None, sampler=None,
                    grid: str | None = None, source_scale: float = 1.0,
                    target_scale: float = 1.0, null_cond: Any = None, iterations: int = 1,
                    **sampler_kwargs):
  """DDIM-inversion editing: invert `x0` with `source_cond`, regenerate with `target_cond`.

  1. Inversion to `t_edit` (Song et al. 2021, §4.3: DDIM with eta = 0 is an Euler step of the
     probability-flow ODE, so it can be run backwards): `inversion='ddim'`
     (`samplers.ddim_invert`, DiscreteVP only, the default there; `grid` is its spacing,
     'trailing' by default) or 'euler' (`samplers.euler_invert`, any process, the default
     elsewhere; `grid` is its time grid, 'karras' by default), `steps` steps with `iterations`
     fixed-point sweeps each, on the denoiser guided by `source_scale`.
  2. Regeneration from that latent at `t_edit` by `sampler` (default: the inversion's exact
     counterpart, `ddim` with eta = 0 or `euler`; or any deterministic entry of `SAMPLERS`,
     run with `key=None`, so a stochastic one is refused) with the same `steps`, `grid` (as
     `spacing=` for the DDIM-family) and `t_max = t_edit`, on the denoiser guided by
     `target_scale`; `sampler_kwargs` go to it (`rho` and `t_min` to the Euler inversion too).

  With `source_cond == target_cond`, equal scales and the counterpart sampler, the output is
  the round trip `x0` up to the inversion error, O(1 / steps) for one sweep (Song et al. 2021,
  Fig. 6); `t_edit < 1` edits less (the latent keeps more of `x0`; Meng et al. 2022's
  trade-off, now deterministic). Guidance: a scale of 1 uses `denoiser` on its condition (one
  evaluation per call); any other needs `null_cond` and uses
  `guidance.classifier_free_guidance`. Inverting with a scale above 1 drifts from the input
  (Mokady et al. 2023, §3.1 and Fig. 3: what null-text inversion repairs), so the usual choice
  is `source_scale=1` and a larger `target_scale`.

  Returns `(x, info)` with `nfe` (both phases), `inversion_nfe`, `generation_nfe`, `t_edit`
  and `latent` (the inverted `x` at `t_edit`). `t_edit = 0` returns `x0` (no call).
  """
  who = 'invert_and_edit'
  discrete_process = getattr(process, 'num_steps', None) is not None
  inversion = inversion or ('ddim' if discrete_process else 'euler')
  if inversion not in INVERSIONS:
    raise ValueError(f'{who}: inversion={inversion!r}; choose from {INVERSIONS}')
  if inversion == 'ddim' and not discrete_process:
    raise ValueError(f"{who}: inversion='ddim' runs on the integer steps of a DiscreteVP; got "
                     f"{type(process).__name__} (use inversion='euler')")
  name, fn = _resolve(inversion if sampler is None else sampler, who)
  _check_start(fn, name, who, sampler_kwargs)
  t = _start_time(process, t_edit, who, 't_edit')
  if t == 0.0:
    return x0, {'nfe': 0, 'inversion_nfe': 0, 'generation_nfe': 0, 't_edit': 0.0, 'latent': x0}
  _check_above_t_min(process, t, sampler_kwargs, who, 't_edit')
  den_source = _maybe_guided(denoiser, source_scale, null_cond, who, 'source_scale')
  den_target = _maybe_guided(denoiser, target_scale, null_cond, who, 'target_scale')
  if inversion == 'ddim':
    grid = grid or 'trailing'
    latent, info_inv = discrete.ddim_invert(den_source, process, x0, steps=steps,
                                            cond=source_cond, spacing=grid, t_max=t,
                                            iterations=iterations)
  else:
    grid = grid or 'karras'
    shared = {k: sampler_kwargs[k] for k in ('rho', 't_min') if k in sampler_kwargs}
    latent, info_inv = discrete.euler_invert(den_source, process, x0, steps=steps,
                                             cond=source_cond, grid=grid, t_max=t,
                                             iterations=iterations, **shared)
  params = _parameters(fn)   # the DDIM family takes the grid as `spacing`; adaptive takes none
  grid_kw = {'spacing': grid} if 'spacing' in params else {'grid': grid} if 'grid' in params \
      else {}
  try:
    x, info_gen = fn(den_target, process, latent, None, steps=steps, cond=target_cond,
                     t_max=t, **grid_kw, **sampler_kwargs)
  except ValueError as e:
    if 'PRNG key' not in str(e):
      raise
    raise ValueError(f'{who} regenerates deterministically (no key): sampler {name!r} with '
                     f'these options is stochastic ({e})') from None
  return x, {'nfe': info_inv['nfe'] + info_gen['nfe'], 'inversion_nfe': info_inv['nfe'],
             'generation_nfe': info_gen['nfe'], 't_edit': t, 'latent': latent}
