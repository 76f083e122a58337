"""Continuous-time consistency models on TrigFlow: sCT and sCD (Lu & Song 2024, "Simplifying,
Stabilizing and Scaling Continuous-Time Consistency Models", sCM).

TrigFlow (sCM §3) is `processes.TrigFlow`: `x_tau = cos(tau) x0 + sin(tau) z`,
`z ~ N(0, sigma_d² I)`, with the library's time `t = 2 tau / pi` (`eps = z / sigma_d`). One
network `F` serves both readings of sCM §3:

  diffusion model    sigma_d F(x_tau / sigma_d, c_noise) ~ dx_tau/dtau = cos(tau) z - sin(tau) x0
  consistency model  f(x_tau, tau) = cos(tau) x_tau - sin(tau) sigma_d F(x_tau / sigma_d, c_noise)

so `f(x, 0) = x` exactly (sigma_min = 0). As a prediction kind ('trigflow') the pair
`(x0_hat, eps_hat)` is a rotation of `(x_tau, sigma_d F)`: `x0_hat = cos x - sin sigma_d F`,
`eps_hat = sin x / sigma_d + cos F`, with no division anywhere in [0, pi/2]
(`trigflow_denoiser`, `to_x0_eps`, `target`).

Time conditioning (sCM §4.1, "stable time conditioning"): `c_noise(tau) = tau`, here passed to
the network as the library time `t = 2 tau / pi` (the same line up to a constant, which the
network's embedding absorbs). EDM's `log(sigma_d tan tau) / 4` is not offered: its derivative
diverges at `tau -> pi/2`, which the tangent `dF / dtau` feeds on.

Training (sCM §4.2 and Alg. 1): with `f^-` the model under stop_gradient, the continuous-time
consistency gradient is `grad E[-w(tau) sigma_d sin(tau) F^T df^- / dtau]`, where
`df^- / dtau = -cos(tau) (sigma_d F^- - dx_tau / dtau) - sin(tau) (x_tau + sigma_d dF^- / dtau)`
and `dF^- / dtau` is one `jax.jvp` of the network along `(dx_tau / dtau, 1)`. With
`w(tau) = 1 / (sigma_d tan tau)` it is the gradient of the surrogate of Alg. 1:

  g = cos(tau) df^-/dtau
    = -cos²(tau) (sigma_d F^- - dx/dtau) - r cos(tau) sin(tau) (x_tau + sigma_d dF^-/dtau)
  g <- g / (||g|| + c)                                              (tangent normalisation)
  L = e^{w_phi(tau)} / D ||F(x_tau / sigma_d, tau) - F^- - g||² - w_phi(tau)   (adaptive weighting)

with the tangent warm-up `r = min(1, step / H)` on the second term, `D` the data dimension and
`tau = arctan(e^s / sigma_d)`, `s ~ N(P_mean, P_std²)` (log-normal proposal on
`sigma_d tan tau`). sCT takes `dx_tau / dtau = cos(tau) z - sin(tau) x0` from the data pair, sCD
the teacher's probability-flow velocity. At `F = F^-` the gradient of `L` in `F` is
`-2 e^{w} / D g`, which is how the tests check the stop-gradient structure.

Adaptive weighting needs `w_phi(tau)`, a second output. A network whose `model_fn` returns a
pair `(F, w)` (`w [B]`) has it: wrap the model in `TimeWeighted` (parameters
`{'net': ..., 'weight': ...}`, one tree for the train loop); a plain output means `w = 0`
(uniform weighting). Everything that turns `F` into a prediction (`trigflow_denoiser`) drops
the second output.

Left out: the paper's architecture changes (adaptive double normalisation, pixel norm in the
time embedding), the fp16 JVP rearrangement (the tangents here are `(dx/dtau, 1)` and the
products are formed afterwards: the same value in float32), classifier-free guidance in the
sCD teacher, and pretraining a TrigFlow diffusion model (sCD distils any diffusion teacher,
converted exactly to TrigFlow by log-SNR matching, `teacher_velocity`).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import objectives
from diffusion_jax import parameterization as param
from diffusion_jax.models import layers
from diffusion_jax.parameterization import expand_like
from diffusion_jax.processes_continuous import Process
from diffusion_jax.processes_continuous import TrigFlow

KIND = 'trigflow'
MIDDLE_TAU = 1.1   # sCM's intermediate time for 2-step sampling (Lu & Song 2024, §5 / App. G)

# --- the kind -----------------------------------------------------------------------------


def _require_trigflow(process, who):
  if not isinstance(process, TrigFlow):
    raise ValueError(f"{who}: sCM needs the TrigFlow process (PROCESSES['trigflow']), got "
                     f'{type(process).__name__}')
  return process.sigma_data


def tau_of_t(t):
  """TrigFlow's `tau = pi t / 2` of the library time `t`."""
  return 0.5 * math.pi * t


def t_of_tau(tau):
  """The library time `t = 2 tau / pi`, which is also the network's time input `c_noise`."""
  return tau / (0.5 * math.pi)


def split_output(out):
  """`(F, w)` of a network output: a pair `(F, w [B])` (`TimeWeighted`) or `F` alone (w = None)."""
  if isinstance(out, (tuple, list)):
    if len(out) != 2:
      raise ValueError(f'a trigflow network returns F or (F, w); got {len(out)} outputs')
    return out[0], out[1]
  return out, None


def network(model_fn, x_tau, tau, cond, sigma_data):
  """`F(x_tau / sigma_d, c_noise(tau))` and the adaptive weight `w` (None without one).

  `x_tau [B, ...]`, `tau [B]`; the network's time input is `t = 2 tau / pi` (module docstring).
  """
  return split_output(model_fn(x_tau / sigma_data, t_of_tau(tau), cond))


def consistency_fn(model_fn, x_tau, tau, cond=None, *, sigma_data: float):
  """`f(x_tau, tau) = cos(tau) x_tau - sin(tau) sigma_d F(x_tau / sigma_d, tau)` (sCM §3)."""
  tau = jnp.broadcast_to(jnp.asarray(tau, x_tau.dtype), x_tau.shape[:1])
  out, _ = network(model_fn, x_tau, tau, cond, sigma_data)
  return expand_like(jnp.cos(tau), x_tau) * x_tau - expand_like(jnp.sin(tau), x_tau) * (
      sigma_data * out)


def _cos_sin(process, t, x):
  """`(cos tau, sin tau)` at the library time `t`, expanded against `x`: `alpha` and
  `sigma / sigma_d` (alpha(1) = 0 exactly, see `processes.TrigFlow`)."""
  alpha, sigma = process.alpha_sigma(t)
  return expand_like(alpha, x), expand_like(sigma / process.sigma_data, x)


def target(x0, eps, process, t):
  """The network's target `F = (cos(tau) z - sin(tau) x0) / sigma_d` with `z = sigma_d eps`:
  `cos(tau) eps - sin(tau) x0 / sigma_d` (sCM §3, the TrigFlow diffusion target)."""
  _require_trigflow(process, 'trigflow target')
  cos, sin = _cos_sin(process, t, x0)
  return cos * eps - sin * x0 / process.sigma_data


def to_x0_eps(out, x_t, process, t):
  """`(x0_hat, eps_hat)` of a 'trigflow' output `F` at `(x_t, t)`: the rotation
  `x0 = cos x - sin sigma_d F`, `eps = sin x / sigma_d + cos F` (inverse of `target`; the
  pair satisfies `x_t = alpha x0 + sigma eps` exactly in real arithmetic). A pair `(F, w)`
  is accepted and `w` dropped."""
  _require_trigflow(process, 'trigflow to_x0_eps')
  out, _ = split_output(out)
  sd = process.sigma_data
  cos, sin = _cos_sin(process, t, x_t)
  return cos * x_t - sin * sd * out, sin * x_t / sd + cos * out


def trigflow_denoiser(model_fn, process, sigma_d: float | None = None, *,
                      clip_x0: float | None = None) -> param.Denoiser:
  """The `Denoiser` of a 'trigflow' network: `x0_hat = f(x_t, tau)`, the consistency function
  (a sample, for an sCM model; `E[x0 | x_t]` for a TrigFlow diffusion model), sigma_min = 0.

  Sample an sCM model with `samplers.consistency_multistep_sample(denoiser, process, x_T, key,
  times=sample_times(steps))`; x_T ~ N(0, sigma_d² I) is `process.prior_sample`. `sigma_d`,
  if given, must be the process's. `clip_x0` as in `parameterization.make_denoiser` (eps_hat
  recomputed from the clipped x0_hat, t > 0).
  """
  sd = _require_trigflow(process, 'trigflow_denoiser')
  if sigma_d is not None and float(sigma_d) != sd:
    raise ValueError(f'trigflow_denoiser: sigma_d={sigma_d} differs from the process\'s '
                     f'sigma_data={sd}')
  if clip_x0 is not None and not clip_x0 > 0:
    raise ValueError(f'trigflow_denoiser: clip_x0={clip_x0} must be > 0 (None: no clipping)')

  def fn(x_t, t, cond=None):
    t = jnp.broadcast_to(jnp.asarray(t, x_t.dtype), x_t.shape[:1])
    out = model_fn(x_t / sd, t, cond)      # c_noise = t = 2 tau / pi
    x0, eps = to_x0_eps(out, x_t, process, t)
    if clip_x0 is not None:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
      cos, sin = _cos_sin(process, t, x_t)
      eps = (x_t - cos * x0) / (sin * sd)
    return x0, eps

  return param.Denoiser(fn, kind=KIND, sigma_min=0.0)


def sample_times(steps: int, middle_tau: float = MIDDLE_TAU) -> np.ndarray:
  """Decreasing library times for `consistency_multistep_sample(times=...)`.

  1 step: `tau = pi/2`; 2 steps: `pi/2, 1.1` (sCM's choice, §5); more steps (our extension,
  the paper samples with 1 or 2): `pi/2`, then `steps - 1` taus evenly spaced from
  `middle_tau` down to `middle_tau / (steps - 1)`.
  """
  if not isinstance(steps, (int, np.integer)) or steps < 1:
    raise ValueError(f'sample_times: steps={steps!r} must be an integer >= 1')
  if not 0.0 < middle_tau < 0.5 * math.pi:
    raise ValueError(f'sample_times: middle_tau={middle_tau} must lie in (0, pi/2)')
  taus = middle_tau * np.arange(steps - 1, 0, -1) / max(steps - 1, 1)
  return np.concatenate([[1.0], t_of_tau(taus)])


# --- the adaptive weight w_phi(tau) -------------------------------------------------------


class TimeWeighted(nn.Module):
  """`net` plus sCM's learned weighting `w_phi(tau)` (sCM §4.2, adaptive weighting).

  Returns `(net(x, t, cond), w [B])`; parameters `{'net': ..., 'weight': ...}`. `w` is an MLP
  of the sinusoidal embedding of the network's time input `t`, its output layer
  zero-initialised (`w = 0`, uniform weighting, at init).
  """
  net: nn.Module
  hidden: int = 64
  time_scale: float = 1000.0

  @nn.compact
  def __call__(self, x, t, cond=None, *, train: bool = False):
    out = self.net(x, t, cond, train=train)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
    h = layers.timestep_embedding(t * self.time_scale, self.hidden)
    w = AdaptiveWeight(self.hidden, name='weight')(h)
    return out, w


class AdaptiveWeight(nn.Module):
  """`[B, E]` time embedding -> `w [B]`: Dense, SiLU, zero-initialised Dense."""
  hidden: int = 64

  @nn.compact
  def __call__(self, h):
    h = nn.silu(nn.Dense(self.hidden)(h))
    return nn.Dense(1, kernel_init=nn.initializers.zeros)(h)[:, 0]


# --- the tangent ----------------------------------------------------------------------------


def tangent(model_fn, x_tau, tau, dx_dtau, cond=None, *, sigma_data: float, r=1.0):
  """`(F^-, df^- / dtau)` along the trajectory through `x_tau` with velocity `dx_dtau`.

  `df/dtau = -cos(tau) (sigma_d F - dx/dtau) - r sin(tau) (x_tau + sigma_d dF/dtau)` (sCM §4.1;
  `r = 1` is the total derivative, `r < 1` the warm-up), `dF/dtau` by one `jax.jvp` of
  `(x, tau) -> F(x / sigma_d, tau)` along `(dx_dtau, 1)`. Not stop-gradiented here.
  """
  def net(x, s):
    return network(model_fn, x, s, cond, sigma_data)[0]
  f_minus, d_f = jax.jvp(net, (x_tau, tau), (dx_dtau, jnp.ones_like(tau)))
  cos, sin = expand_like(jnp.cos(tau), x_tau), expand_like(jnp.sin(tau), x_tau)
  r = expand_like(jnp.asarray(r, x_tau.dtype), x_tau)
  df_dtau = -cos * (sigma_data * f_minus - dx_dtau) - r * sin * (x_tau + sigma_data * d_f)
  return f_minus, df_dtau


def _norm(x):
  return jnp.sqrt(jnp.sum(jnp.square(x).reshape(x.shape[0], -1), axis=-1))   # [B]


def normalize_tangent(g, c: float | None = 0.1):
  """sCM's tangent normalisation `g / (||g|| + c)` per example (§4.2; `c = 0.1`); None: `g`."""
  if c is None:
    return g
  return g / expand_like(_norm(g) + c, g)


def warmup_ratio(step, warmup_steps: int):
  """sCM's tangent warm-up `r = min(1, step / H)` (§4.2); `H = 0` gives `r = 1`."""
  if warmup_steps <= 0:
    return jnp.ones((), jnp.float32)
  return jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)


# --- the teacher's velocity (sCD) -----------------------------------------------------------


def teacher_velocity(teacher, process, x_tau, tau, cond=None, teacher_process=None):
  """The teacher's PF-ODE velocity `dx_tau / dtau = cos(tau) sigma_d eps_hat - sin(tau) x0_hat`.

  `teacher(x, t, cond) -> (x0_hat, eps_hat)` is a denoiser on `teacher_process` (default: the
  TrigFlow `process` itself). Another process is reached exactly by matching log-SNR: at
  `lambda = 2 log(cot(tau) / sigma_d)`, `t' = teacher_process.t_of_log_snr(lambda)` and
  `x' = (alpha'(t') / cos tau) x_tau` (equivalently `sigma' / (sigma_d sin tau)`) hold the same
  `(x0, eps)`, so the teacher's `(x0_hat, eps_hat)` at `(x', t')` are the ones at `(x_tau, tau)`.
  """
  sd = process.sigma_data
  cos, sin = expand_like(jnp.cos(tau), x_tau), expand_like(jnp.sin(tau), x_tau)
  if teacher_process is None:
    x0, eps = teacher(x_tau, t_of_tau(tau), cond)
  else:
    lam = 2.0 * (jnp.log(jnp.cos(tau)) - jnp.log(jnp.sin(tau)) - math.log(sd))
    t_teacher = teacher_process.t_of_log_snr(lam)
    alpha, sigma = (expand_like(c, x_tau) for c in teacher_process.alpha_sigma(t_teacher))
    # Whichever of cos, sin is the larger divides: no 0/0 at either end.
    scale = jnp.where(cos >= sin, alpha / cos, sigma / (sd * sin))
    x0, eps = teacher(scale * x_tau, t_teacher, cond)
  return cos * sd * eps - sin * x0


def _check_teacher(teacher, teacher_process, who):
  kind = param.as_denoiser(teacher).kind
  if kind is not None and kind not in param.KINDS:
    raise ValueError(f'{who}: the teacher must be a diffusion model (kind in {param.KINDS}) '
                     f'whose x0_hat is E[x0 | x_t]; got kind {kind!r}')
  if teacher_process is None:
    return
  if not isinstance(teacher_process, Process):
    raise ValueError(f'{who}: teacher_process must be a Process, got '
                     f'{type(teacher_process).__name__}')
  if hasattr(teacher_process, 'num_steps'):
    raise ValueError(f'{who}: the teacher\'s process {type(teacher_process).__name__} is '
                     'discrete-time; sCD needs its velocity at every tau')


def _tau_range(process, teacher_process):
  """`(tau_lo, tau_hi)`: the taus whose log-SNR the teacher's process reaches on
  `[t_min, 1]` (all of [0, pi/2] without a teacher process)."""
  if teacher_process is None:
    return 0.0, 0.5 * math.pi
  sd = process.sigma_data
  lam_hi, lam_lo = teacher_process.log_snr_np([teacher_process.t_min, 1.0])
  with np.errstate(over='ignore'):
    return (float(np.arctan(np.exp(-0.5 * lam_hi) / sd)),
            float(np.arctan(np.exp(-0.5 * lam_lo) / sd)))


# --- the loss -------------------------------------------------------------------------------


def _scm_loss(model_fn, x0, key, cond, step, *, process, velocity, p_mean, p_std, tangent_c,
              warmup_steps, tau_range):
  """Alg. 1 of sCM, one batch: per-example `e^w / D ||F - F^- - g||² - w` (module docstring)."""
  sd = process.sigma_data
  batch, dim = x0.shape[0], math.prod(x0.shape[1:])
  key_tau, key_z = jax.random.split(key)
  s = p_mean + p_std * jax.random.normal(key_tau, (batch,), x0.dtype)
  tau = jnp.clip(jnp.arctan(jnp.exp(s) / sd), *tau_range)                  # [B]
  z = sd * jax.random.normal(key_z, x0.shape, x0.dtype)                     # z ~ N(0, sd² I)
  cos, sin = expand_like(jnp.cos(tau), x0), expand_like(jnp.sin(tau), x0)
  x_tau = cos * x0 + sin * z
  dx_dtau = jax.lax.stop_gradient(velocity(x0, z, x_tau, tau, cond))
  out, w = network(model_fn, x_tau, tau, cond, sd)
  f_minus, df_dtau = tangent(model_fn, x_tau, tau, dx_dtau, cond, sigma_data=sd,
                             r=warmup_ratio(step, warmup_steps))
  g = jax.lax.stop_gradient(normalize_tangent(cos * df_dtau, tangent_c))
  f_minus = jax.lax.stop_gradient(f_minus)
  w = jnp.zeros((batch,), x0.dtype) if w is None else w.astype(x0.dtype)
  sq = jnp.sum(jnp.square(out - f_minus - g).reshape(batch, -1), axis=-1)   # [B]
  per_example = jnp.exp(w) / dim * sq - w
  t = t_of_tau(tau)
  aux = {'loss_per_example': per_example, 't': t, 'log_snr': process.log_snr(t), 'tau': tau,
         'weight': w, 'tangent_norm': _norm(g)}
  return jnp.mean(per_example), aux


def _check_options(who, p_std, tangent_c, warmup_steps):
  if not p_std > 0:
    raise ValueError(f'{who}: p_std={p_std} must be > 0')
  if tangent_c is not None and not tangent_c > 0:
    raise ValueError(f'{who}: tangent_c={tangent_c} must be > 0 (None: no normalisation)')
  if warmup_steps < 0:
    raise ValueError(f'{who}: warmup_steps={warmup_steps} must be >= 0')


def scm_training(process, *, total_steps: int, warmup_steps: int | None = None,
                 p_mean: float = -1.0, p_std: float = 1.4,
                 tangent_c: float | None = 0.1) -> objectives.Objective:
  """sCT: continuous-time consistency training (sCM Alg. 1 with `dx/dtau = cos z - sin x0`).

  `tau = arctan(e^s / sigma_d)`, `s ~ N(p_mean, p_std²)` (CIFAR-10's -1.0, 1.4, sCM App. G);
  tangent normalisation `c = tangent_c` (None: off); warm-up over `warmup_steps` (default
  `total_steps // 10`, our choice; the paper warms up over 10k of its iterations; 0: off).
  Adaptive weighting when the network returns `(F, w)` (`TimeWeighted`). The loss takes
  `step=`; the record's kind is 'trigflow'.
  """
  who = 'scm_training'
  sd = _require_trigflow(process, who)
  if not isinstance(total_steps, (int, np.integer)) or total_steps < 1:
    raise ValueError(f'{who}: total_steps={total_steps!r} must be an integer >= 1')
  warmup_steps = total_steps // 10 if warmup_steps is None else int(warmup_steps)
  _check_options(who, p_std, tangent_c, warmup_steps)

  def velocity(x0, z, x_tau, tau, cond):
    del x_tau, cond
    return expand_like(jnp.cos(tau), x0) * z - expand_like(jnp.sin(tau), x0) * x0

  def loss(model_fn, x0, key, cond=None, *, step=0):
    return _scm_loss(model_fn, x0, key, cond, step, process=process, velocity=velocity,
                     p_mean=p_mean, p_std=p_std, tangent_c=tangent_c,
                     warmup_steps=warmup_steps, tau_range=(0.0, 0.5 * math.pi))

  return objectives.Objective('scm_training', loss, process, KIND, sigma_data=sd, takes_step=True)


def scm_distillation(process, *, teacher, teacher_process=None, warmup_steps: int = 0,
                     p_mean: float = -1.0, p_std: float = 1.4,
                     tangent_c: float | None = 0.1) -> objectives.Objective:
  """sCD: continuous-time consistency distillation (sCM Alg. 1 with the teacher's velocity).

  `teacher` is a diffusion `Denoiser` (kind in `parameterization.KINDS`, or a plain function)
  on `teacher_process` (default: `process`, TrigFlow); another continuous process is converted
  exactly (`teacher_velocity`) and tau is clipped to the log-SNR range the teacher's process
  covers on `[t_min, 1]` (none is lost for the linear interpolant; EDM's default sigma range
  [0.002, 80] holds all but ~1e-5 of the default proposal). The teacher never receives a
  gradient. Tangent warm-up over `warmup_steps` (default 0, off), normalisation and proposal
  as `scm_training`. The loss takes `step=`.
  """
  who = 'scm_distillation'
  _require_trigflow(process, who)
  if teacher is None:
    raise ValueError(f'{who}: needs teacher= (a diffusion Denoiser)')
  _check_teacher(teacher, teacher_process, who)
  warmup_steps = int(warmup_steps)
  _check_options(who, p_std, tangent_c, warmup_steps)
  tau_range = _tau_range(process, teacher_process)

  def velocity(x0, z, x_tau, tau, cond):
    del x0, z
    return teacher_velocity(teacher, process, x_tau, tau, cond, teacher_process)

  def loss(model_fn, x0, key, cond=None, *, step=0):
    return _scm_loss(model_fn, x0, key, cond, step, process=process, velocity=velocity,
                     p_mean=p_mean, p_std=p_std, tangent_c=tangent_c,
                     warmup_steps=warmup_steps, tau_range=tau_range)

  return objectives.Objective('scm_distillation', loss, process, KIND,
                              sigma_data=process.sigma_data, takes_step=True)
