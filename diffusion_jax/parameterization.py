"""What a network's output means, and the pure conversions between meanings (DESIGN §2).

With `x_t = alpha x0 + sigma eps`, a prediction kind fixes the network's target:

  eps        eps
  x0         x0
  v          alpha eps - sigma x0                      (Salimans & Ho 2022, §4)
  score      -eps / sigma  = grad log q(x_t)           (for the Gaussian perturbation)
  velocity   d x_t / dt = alpha' x0 + sigma' eps       (flow matching target)
  edm        F with D = c_skip x~ + c_out F(c_in x~, c_noise)   (Karras et al. 2022, Eq. 7)
  consistency  F with f = c_skip x~ + c_out F(c_in x~, c_noise), f(x, sigma_min) = x
             (Song et al. 2023, Eq. 5 and App. C; Song & Dhariwal 2023, §2)

For `edm`, `x~ = x_t / alpha` is the input rescaled to EDM's `alpha = 1` form, with noise level
`sigma~ = sigma / alpha = exp(-lambda / 2)`; for EDM's own process (`alpha = 1`) this is exactly
the paper's preconditioning. It is the one kind whose network sees transformed inputs: call
`network_input` before the network (objectives and `make_denoiser` do).

`consistency` wraps its network the same way, with the scalings shifted so that the consistency
function is the identity at `sigma~ = sigma_min`. A consistency model is trained by
self-consistency (`diffusion_jax.consistency`), not by regression: `target` raises for it, which
is why it is not in `KINDS` (the kinds with a regression target) but only in `ALL_KINDS`.

`to_x0_eps` maps any kind's output back to `(x0_hat, eps_hat)` and `target` maps `(x0, eps)`
to any kind's target; the pair round-trips exactly up to float rounding. Samplers only ever
see a denoiser `(x_t, t, cond) -> (x0_hat, eps_hat)` built by `make_denoiser`.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

KINDS = ('eps', 'x0', 'v', 'score', 'velocity', 'edm')   # kinds with a regression target
ALL_KINDS = KINDS + ('consistency',)                      # kinds a network's output may have
SIGMA_DATA = 0.5  # EDM's default data standard deviation (Karras et al. 2022, Table 1)

ModelFn = Callable[..., jax.Array]   # (x_t [B, ...], t [B], cond) -> out [B, ...]


def expand_like(a, x):
  """Reshapes per-example coefficients `[B]` (or scalars) to broadcast against `x [B, ...]`."""
  a = jnp.asarray(a, x.dtype)
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim)) if a.ndim else a


def _check_kind(kind):
  if kind not in ALL_KINDS:
    raise ValueError(f'unknown prediction kind {kind!r}; choose from {ALL_KINDS}')


def path_coefficients(process, t):
  """alpha, sigma and their time derivatives at `t` (derivatives by forward-mode autodiff)."""
  (alpha, sigma), (d_alpha, d_sigma) = jax.jvp(process.alpha_sigma, (t,), (jnp.ones_like(t),))
  return alpha, sigma, d_alpha, d_sigma


def kind_coefficients(kind: str, process, t):
  """`(alpha, sigma, d_alpha, d_sigma)` at `t`'s own shape, as much as `kind` needs: the time
  derivatives (forward-mode autodiff) only for 'velocity', None otherwise."""
  if kind == 'velocity':
    return path_coefficients(process, t)
  return (*process.alpha_sigma(t), None, None)


def edm_coefficients(process, t, sigma_data: float = SIGMA_DATA):
  """`(c_skip, c_out, c_in, c_noise)` at `t [B]` (Karras et al. 2022, Table 1, "Ours").

  With `s = sigma / alpha`: `c_skip = sd² / (s² + sd²)`, `c_out = s sd / sqrt(s² + sd²)`,
  `c_in = 1 / sqrt(s² + sd²)` (applied to `x~ = x_t / alpha`), `c_noise = ln(s) / 4`.
  """
  alpha, sigma = process.alpha_sigma(t)
  return _edm_of_s(sigma / alpha, sigma_data)


def _edm_of_s(s, sigma_data):
  """`edm_coefficients` at the noise level `s = sigma / alpha`."""
  sd2 = sigma_data**2
  norm = s**2 + sd2
  return sd2 / norm, s * sigma_data / jnp.sqrt(norm), 1.0 / jnp.sqrt(norm), 0.25 * jnp.log(s)


def consistency_coefficients(sigma, sigma_min: float, sigma_data: float = SIGMA_DATA):
  """`(c_skip, c_out, c_in, c_noise)` at noise level `sigma` (Song et al. 2023, App. C).

  `c_skip = sd² / ((sigma - sigma_min)² + sd²)`, `c_out = sd (sigma - sigma_min) / sqrt(sd² +
  sigma²)` (also Song & Dhariwal 2023, §2), so `c_skip = 1`, `c_out = 0` at `sigma = sigma_min`;
  `c_in = 1 / sqrt(sigma² + sd²)` and `c_noise = ln(sigma) / 4` are EDM's (Karras et al. 2022,
  Table 1), whose networks CM's experiments reuse. Takes `sigma` itself, not `t`: the
  boundary condition holds exactly only when `sigma == sigma_min` bitwise.
  """
  sd2 = sigma_data**2
  shifted = sigma - sigma_min
  return (sd2 / (shifted**2 + sd2), sigma_data * shifted / jnp.sqrt(sd2 + sigma**2),
          1.0 / jnp.sqrt(sigma**2 + sd2), 0.25 * jnp.log(sigma))


def consistency_sigma_min(process) -> float:
  """Where a consistency model is the identity: `process.sigma_min`, else sigma / alpha at t_min."""
  if getattr(process, 'sigma_min', None) is not None:
    return float(process.sigma_min)
  with jax.ensure_compile_time_eval():   # callable under jit: the process's constants only
    t_min = jnp.asarray(process.t_min, jnp.float32)
    return float(process.sigma(t_min) / process.alpha(t_min))


def network_input(kind: str, x_t, t, process, sigma_data: float = SIGMA_DATA):
  """What the network is called with: `(x_t, t)`, or `(c_in x_t / alpha, c_noise)` for `edm`

  and `consistency` (whose `c_in`, `c_noise` are EDM's). The time input has `t`'s shape.
  """
  if kind not in ('edm', 'consistency'):
    return x_t, t
  return _network_input(kind, x_t, t, *process.alpha_sigma(t), sigma_data)


def _network_input(kind, x_t, t, alpha, sigma, sigma_data):
  """`network_input` from `alpha, sigma` at `t` (unexpanded)."""
  if kind not in ('edm', 'consistency'):
    return x_t, t
  _, _, c_in, c_noise = _edm_of_s(sigma / alpha, sigma_data)
  return expand_like(c_in / alpha, x_t) * x_t, c_noise


def target(kind: str, x0, eps, process, t, sigma_data: float = SIGMA_DATA):
  """The regression target of prediction `kind` for the pair `(x0, eps)` at time `t [B]`."""
  _check_kind(kind)
  if kind == 'consistency':
    raise ValueError(
        "kind 'consistency' has no fixed regression target: a consistency model is trained "
        'against its own output at a lower noise level (diffusion_jax.consistency)')
  if kind == 'eps':
    return eps
  if kind == 'x0':
    return x0
  coefficients = kind_coefficients(kind, process, t)
  alpha, sigma, d_alpha, d_sigma = (c if c is None else expand_like(c, x0) for c in coefficients)
  if kind == 'v':
    return alpha * eps - sigma * x0
  if kind == 'score':
    return -eps / sigma
  if kind == 'velocity':
    return d_alpha * x0 + d_sigma * eps
  # edm: F_target = (x0 - c_skip x~) / c_out with x~ = x0 + (sigma / alpha) eps.
  c_skip, c_out, _, _ = _edm_of_s(sigma / alpha, sigma_data)
  x_tilde = x0 + sigma / alpha * eps
  return (x0 - c_skip * x_tilde) / c_out


def to_x0_eps(kind: str, out, x_t, process, t, sigma_data: float = SIGMA_DATA,
              sigma_min: float | None = None):
  """Converts a network output of `kind` at `(x_t, t)` into `(x0_hat, eps_hat)`.

  Uses `x_t = alpha x0 + sigma eps` to recover the other half. For `v`,
  `x0 = (alpha x_t - sigma v) / (alpha² + sigma²)` and `eps = (sigma x_t + alpha v) / (...)`,
  which is Salimans & Ho's `x0 = alpha x_t - sigma v` when the process is variance preserving.
  Where a coefficient vanishes (`alpha = 0` for eps/score/edm, `sigma = 0` for x0) the division
  is by zero: such endpoints are excluded by the processes' `t_min` / `t_max`.

  For `consistency`, `x0_hat` is the consistency function `f(x_t, sigma~)`; `sigma_min` defaults
  to `consistency_sigma_min(process)`. The schedule is evaluated at `t`'s own shape (a scalar
  `t` costs the same at any batch size), and differentiated only for 'velocity'.
  """
  _check_kind(kind)
  return _to_x0_eps(kind, out, x_t, kind_coefficients(kind, process, t), sigma_data, sigma_min,
                    process)


def _to_x0_eps(kind, out, x_t, coefficients, sigma_data, sigma_min, process):
  """`to_x0_eps` from `kind_coefficients` at `t` (unexpanded)."""
  alpha, sigma, d_alpha, d_sigma = (c if c is None else expand_like(c, x_t)
                                    for c in coefficients)
  if kind == 'consistency':
    sigma_min = consistency_sigma_min(process) if sigma_min is None else sigma_min
    c_skip, c_out, _, _ = consistency_coefficients(sigma / alpha, sigma_min, sigma_data)
    x0 = c_skip * (x_t / alpha) + c_out * out
    return x0, (x_t - alpha * x0) / sigma
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
  if kind == 'velocity':
    # Solve [alpha sigma; alpha' sigma'] [x0; eps] = [x_t; v].
    det = alpha * d_sigma - sigma * d_alpha
    return (d_sigma * x_t - sigma * out) / det, (alpha * out - d_alpha * x_t) / det
  c_skip, c_out, _, _ = _edm_of_s(sigma / alpha, sigma_data)
  x0 = c_skip * (x_t / alpha) + c_out * out
  return x0, (x_t - alpha * x0) / sigma


def denoise(model_fn: ModelFn, process, kind: str, x_t, t, cond: Any = None, *,
            clip_x0: float | None = None, sigma_data: float = SIGMA_DATA,
            sigma_min: float | None = None, split_output=None):
  """One network call at `(x_t, t)` -> `(x0_hat, eps_hat, extra)`; what `make_denoiser` runs.

  `split_output(out) -> (prediction, extra)` separates channels that are not the prediction
  (e.g. a learned variance, `elbo.split_learned_variance`); without it `extra` is None.
  `clip_x0` and `sigma_min` as in `make_denoiser`.

  The schedule is evaluated once, at `t`'s own shape (a sampler's scalar time stays scalar:
  nothing but the network scales with the batch), and differentiated only for 'velocity';
  only the network's time input is broadcast to `[B]`.
  """
  _check_kind(kind)
  t = jnp.asarray(t, x_t.dtype)
  coefficients = kind_coefficients(kind, process, t)
  x_in, t_in = _network_input(kind, x_t, t, *coefficients[:2], sigma_data)
  out = model_fn(x_in, jnp.broadcast_to(t_in, x_t.shape[:1]), cond)
  out, extra = split_output(out) if split_output is not None else (out, None)
  x0, eps = _to_x0_eps(kind, out, x_t, coefficients, sigma_data, sigma_min, process)
  if clip_x0 is not None:
    x0 = jnp.clip(x0, -clip_x0, clip_x0)
    alpha, sigma = (expand_like(c, x_t) for c in coefficients[:2])
    eps = (x_t - alpha * x0) / sigma
  return x0, eps, extra


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """What every sampler consumes: `denoiser(x_t, t, cond) -> (x0_hat, eps_hat)` plus what a
  sampler must know about it.

  `fn(x_t, t, cond) -> (x0_hat, eps_hat)` is the call itself. `kind` is the network's
  prediction kind (None when unknown), which samplers read to refuse a kind that divides by
  `alpha = 0`; `evals_per_call` is the number of network evaluations one call costs (2 under
  classifier-free guidance), from which samplers report an exact `info['nfe']`; `sigma_min`
  is where a consistency model is the identity; `with_variance(x_t, t, cond) -> (x0_hat,
  eps_hat, v)`, when not None, also returns Nichol & Dhariwal's variance interpolation `v` in
  [0, 1] from the same single call (`ddpm_sample(variance='learned')`). A wrapper that changes
  the prediction (guidance, inpainting) is `dataclasses.replace(inner, fn=..., ...)` and drops
  `with_variance` unless it wraps it too. Samplers accept any plain callable as well
  (`as_denoiser`): a function is a denoiser of unknown kind costing 1 evaluation a call.
  """
  fn: Callable[..., tuple[jax.Array, jax.Array]]
  kind: str | None = None
  evals_per_call: int = 1
  sigma_min: float | None = None
  with_variance: Callable[..., tuple[jax.Array, jax.Array, jax.Array]] | None = None

  def __call__(self, x_t, t, cond: Any = None):
    return self.fn(x_t, t, cond)


FLOW_MAP_KINDS = ('mean_velocity', 'shortcut')   # kinds sampled by jumps, not by a denoiser


def flow_map_refusal(kind) -> str:
  """The one-line refusal of a flow-map model where a denoiser is expected."""
  return (f'a {kind!r} model is a flow map (x_t, t, s) -> x_s, not a denoiser (x_t, t) -> '
          '(x0_hat, eps_hat): sample it with samplers.flow_map_sample')


@dataclasses.dataclass(frozen=True)
class FlowMap:
  """A few-step model that jumps along the probability-flow ODE: `fn(x_t, t, s, cond) -> x_s`.

  `t`, `s` (scalars or `[B]`, `s < t`) are times of the process; `kind` is the network's
  prediction kind ('mean_velocity': MeanFlow's average velocity, Geng et al. 2025;
  'shortcut': a shortcut model, Frans et al. 2024); `evals_per_call` the network evaluations
  one jump costs. Built by the method's `make_flow_map` (`diffusion_jax.distill.meanflow`,
  `diffusion_jax.distill.shortcut`) and sampled by `samplers.flow_map_sample`.

  It is not a denoiser: calling it as one (every plain sampler calls `denoiser(x_t, t, cond)`)
  or passing it to `as_denoiser` raises the one-line `flow_map_refusal`; jump with `jump`.
  """
  fn: Callable[..., jax.Array]
  kind: str
  evals_per_call: int = 1

  def jump(self, x_t, t, s, cond: Any = None):
    return self.fn(x_t, t, s, cond)

  def __call__(self, *args, **kwargs):
    raise ValueError(flow_map_refusal(self.kind))


def as_denoiser(denoiser) -> Denoiser:
  """`denoiser` itself if it is a `Denoiser`, else a plain callable wrapped into one.

  A `FlowMap` is refused in one line (sample it with `samplers.flow_map_sample`).
  """
  if isinstance(denoiser, Denoiser):
    return denoiser
  if isinstance(denoiser, FlowMap):
    raise ValueError(flow_map_refusal(denoiser.kind))
  if not callable(denoiser):
    raise TypeError(f'a denoiser must be callable as (x_t, t, cond) -> (x0_hat, eps_hat); '
                    f'got {type(denoiser).__name__}')
  return Denoiser(denoiser)


def make_denoiser(model_fn: ModelFn, process, objective, clip_x0: float | None = None, *,
                  sigma_data: float | None = None, learned_variance: bool = False,
                  sigma_min: float | None = None) -> Denoiser:
  """Wraps a network into the `Denoiser` samplers consume (for sCM's 'trigflow' kind its own
  denoiser, `distill.trigflow`; for a flow-map kind, `FLOW_MAP_KINDS`, the `FlowMap` that only
  `samplers.flow_map_sample` takes, every other sampler refusing it in one line).

  `objective` is the `objectives.Objective` the network was trained with: it says the
  prediction kind, `sigma_data` and whether the output carries a learned variance, so
  sampling uses exactly the parameterization training used. For outside use a kind string
  (one of `ALL_KINDS`) is accepted too, with `sigma_data` (default `SIGMA_DATA`) and
  `learned_variance` (the network outputs `2C` channels, `elbo.split_learned_variance`) given
  here; with an `Objective` these two come from it and must not be passed.

  `clip_x0` (e.g. 1.0 for data in [-1, 1]) clips `x0_hat` to the data range and recomputes
  `eps_hat` from it so the pair stays consistent with `x_t`, as DDPM's sampler does.
  `sigma_min` (kind 'consistency' only) defaults to `consistency_sigma_min(process)`.
  """
  if clip_x0 is not None and not clip_x0 > 0:    # 0 would clip x0_hat to 0; < 0 to -clip_x0
    raise ValueError(f'make_denoiser: clip_x0={clip_x0} must be > 0 (None: no clipping)')
  if isinstance(objective, str):
    kind = objective
    sigma_data = SIGMA_DATA if sigma_data is None else float(sigma_data)
  else:
    if sigma_data is not None or learned_variance:
      raise ValueError('make_denoiser: sigma_data and learned_variance come from the objective '
                       f'{objective.name!r}; pass them only with a kind string')
    kind, sigma_data = objective.kind, objective.sigma_data
    learned_variance = objective.learned_variance
  if kind == 'trigflow':     # sCM's TrigFlow networks (`distill.trigflow`): their own rotation
    from diffusion_jax.distill import trigflow  # pylint: disable=g-import-not-at-top (a cycle)
    return trigflow.trigflow_denoiser(model_fn, process, clip_x0=clip_x0)
  if kind in FLOW_MAP_KINDS:  # MeanFlow, shortcut: a FlowMap, which plain samplers refuse
    from diffusion_jax.distill import meanflow  # pylint: disable=g-import-not-at-top
    from diffusion_jax.distill import shortcut  # pylint: disable=g-import-not-at-top
    build = {'mean_velocity': meanflow.make_flow_map, 'shortcut': shortcut.make_flow_map}[kind]
    return build(model_fn, process, kind)
  _check_kind(kind)
  if kind != 'consistency':
    sigma_min = None
  elif sigma_min is None:
    sigma_min = consistency_sigma_min(process)
  split = split_learned_variance if learned_variance else None

  def with_variance(x_t, t, cond: Any = None):
    return denoise(model_fn, process, kind, x_t, t, cond, clip_x0=clip_x0,
                   sigma_data=sigma_data, sigma_min=sigma_min, split_output=split)

  def fn(x_t, t, cond: Any = None):
    x0, eps, _ = with_variance(x_t, t, cond)
    return x0, eps

  return Denoiser(fn, kind=kind, sigma_min=sigma_min,
                  with_variance=with_variance if learned_variance else None)


def split_learned_variance(out):
  """`[..., 2C]` network output -> `(prediction [..., C], v [..., C] in [0, 1])`.

  Nichol & Dhariwal (2021, Eq. 15) let the network output `v` per dimension with
  `Sigma = exp(v log beta + (1 - v) log beta~)`; the raw output in [-1, 1] maps to `(out + 1)/2`.
  """
  c = out.shape[-1] // 2
  return out[..., :c], (out[..., c:] + 1.0) / 2.0
