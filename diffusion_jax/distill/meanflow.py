"""MeanFlow: one-step generation by the average velocity (Geng et al. 2025, "Mean Flows for
One-step Generative Modeling").

On the linear interpolant `z_t = (1 - t) x + t eps` (process 'linear'; the paper's Eq. 1 and our
convention alike, t = 1 prior), with instantaneous velocity `v = dz/dt`, the average velocity
between `r <= t` is (Eq. 3)

  u(z_t, r, t) = 1 / (t - r) * integral_r^t v(z_tau, tau) dtau,

so `z_r = z_t - (t - r) u(z_t, r, t)` exactly (Eq. 12): one network call jumps from noise to data
(`z_0 = z_1 - u(z_1, 0, 1)`, Alg. 2). Differentiating `(t - r) u = integral_r^t v` in `t` gives
the MeanFlow identity (Eq. 6)

  u(z_t, r, t) = v(z_t, t) - (t - r) d/dt u(z_t, r, t),
  d/dt u = v d_z u + d_t u                                          (Eq. 8)

the total derivative being the Jacobian-vector product of `u` along `(v, 0, 1)` in `(z, r, t)`
(`jax.jvp`). Training (Eq. 9-10, Alg. 1) regresses the network on the stop-gradient target

  u_tgt = v_t - (t - r) (v_t d_z u_theta + d_t u_theta),   v_t = eps - x,

with the conditional velocity `v_t` in place of the marginal `v` (the target is linear in `v`,
so its conditional mean given `z_t` is the identity's right-hand side). Adaptive weighting
(§4.3): the per-example loss is `sg(w) ||Delta||²`, `w = 1 / (||Delta||² + c)^p`,
`Delta = u_theta - u_tgt` (`||.||²` the squared L2 norm over the example's dimensions); `(r, t)`
are two draws of a logit-normal law, ordered, with `r = t` for a fraction `1 - ratio` of the
batch (plain flow matching there). Defaults are the paper's best ablation settings (Table 1):
`lognorm(-0.4, 1.0)`, 25 % of `r != t`, `p = 1`; `c = 1e-3`.

The network is `model_fn(z_t, t, layers.with_delta(cond, t - r))`: a model built with
`delta_input=True` (models.MLP, models.UNet) takes `t - r` as its second time input. Its
prediction kind is 'mean_velocity'; it is sampled by jumps (`make_flow_map`,
`samplers.flow_map_sample`), and the plain samplers refuse it. The paper's classifier-free
guidance variant (§4.2) is not implemented; class labels are passed through as
ordinary conditioning.

Measured on the 2-D eight-Gaussians mixture (tests/test_distill_meanflow.py, slow; MLP, 3,000
Adam steps; sliced Wasserstein over the data floor at 1 / 2 / 4 jumps): the network's time
embedding matters, since the target differentiates the network in `t`: with the MLP's default
sinusoidal `time_scale = 1000` the tangent is dominated by high frequencies and the plain loss
(`adaptive_p = 0`) does not train (5.7: the prior's score), while `time_scale = 1` gives 1.51 /
1.22 / 1.29. The paper's adaptive weight (`p = 1`, a robust loss whose minimiser is not the
conditional mean of the noisy target) is worse on this low-dimensional task: 2.17 / 2.85 / 3.02.
"""

import jax
import jax.numpy as jnp

from diffusion_jax import objectives
from diffusion_jax import parameterization as param
from diffusion_jax.models import layers
from diffusion_jax.processes_continuous import LinearInterpolant

KIND = 'mean_velocity'


def check_process(process, who: str = 'meanflow'):
  """The MeanFlow identity is written for the linear interpolant: refuse any other process."""
  if not isinstance(process, LinearInterpolant):
    raise ValueError(f"{who}: MeanFlow's average velocity is defined on the linear interpolant "
                     f"(process 'linear'), got process {type(process).__name__}")


def average_velocity(model_fn, z, r, t, cond=None):
  """`u_theta(z, r, t) = model_fn(z, t, with_delta(cond, t - r))`; `r`, `t` are `[B]`."""
  return model_fn(z, t, layers.with_delta(cond, t - r))


def meanflow_target(model_fn, z, r, t, v, cond=None):
  """`(u, u_tgt)`: the network's `u_theta(z, r, t)` and the MeanFlow target (Eq. 10)

  `u_tgt = v - (t - r) (v d_z u_theta + d_t u_theta)`, the total derivative by one `jax.jvp` of
  `u_theta` along `(v, 0, 1)` in `(z, r, t)` (Eq. 8); `u_tgt` is under stop_gradient (Eq. 9).
  `v` is the velocity at `(z, t)`: `eps - x` in training, the marginal velocity where the
  identity (Eq. 6) is checked. `r`, `t` are `[B]`.
  """
  def u_fn(z_, r_, t_):
    return average_velocity(model_fn, z_, r_, t_, cond)

  u, dudt = jax.jvp(u_fn, (z, r, t), (v, jnp.zeros_like(r), jnp.ones_like(t)))
  u_tgt = v - param.expand_like(t - r, z) * dudt
  return u, jax.lax.stop_gradient(u_tgt)


def sample_r_t(key, batch: int, *, ratio: float, mean: float, std: float, dtype=jnp.float32):
  """`(r, t)` `[B]`: two logit-normal draws `sigmoid(N(mean, std²))`, `t` the larger; `r = t`
  except for a fraction `ratio` of the examples (Geng et al. 2025, §4.3 and Table 1)."""
  k_times, k_ratio = jax.random.split(key)
  a, b = jax.nn.sigmoid(mean + std * jax.random.normal(k_times, (2, batch), dtype))
  t, r = jnp.maximum(a, b), jnp.minimum(a, b)
  keep = jax.random.uniform(k_ratio, (batch,), dtype) < ratio
  return jnp.where(keep, r, t), t


def adaptive_weight(sq_norm, p: float, c: float):
  """`w = 1 / (||Delta||² + c)^p` under stop_gradient (Geng et al. 2025, §4.3)."""
  return jax.lax.stop_gradient(1.0 / (sq_norm + c) ** p)


def meanflow_loss(model_fn, x0, key, cond=None, *, ratio: float, time_mean: float,
                  time_std: float, p: float, c: float):
  """MeanFlow's training loss (Alg. 1) on a batch `x0 [B, ...]` -> `(loss, aux)`.

  `aux`: 'loss_per_example' (`sg(w) ||Delta||²`), 't', 'r', 'mse' (`||Delta||²` / dims).
  """
  k_time, k_eps = jax.random.split(key)
  batch = x0.shape[0]
  r, t = sample_r_t(k_time, batch, ratio=ratio, mean=time_mean, std=time_std, dtype=x0.dtype)
  eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
  tb = param.expand_like(t, x0)
  z = (1.0 - tb) * x0 + tb * eps
  v = eps - x0
  u, u_tgt = meanflow_target(model_fn, z, r, t, v, cond)
  delta = (u - u_tgt).reshape(batch, -1)
  sq_norm = jnp.sum(delta**2, axis=-1)
  per_example = adaptive_weight(sq_norm, p, c) * sq_norm if p else sq_norm
  aux = {'loss_per_example': per_example, 't': t, 'r': r, 'mse': sq_norm / delta.shape[-1]}
  return jnp.mean(per_example), aux


def meanflow(process, *, teacher=None, ratio: float = 0.25, time_mean: float = -0.4,
             time_std: float = 1.0, adaptive_p: float = 1.0,
             adaptive_c: float = 1e-3) -> objectives.Objective:
  """The MeanFlow objective (Geng et al. 2025, Eq. 9-10, Alg. 1), kind 'mean_velocity'.

  Trains from scratch (no teacher). `ratio`: the fraction of examples with `r != t` (Table 1:
  25 %); `time_mean`, `time_std`: the logit-normal law of `(r, t)` (Table 1: -0.4, 1.0);
  `adaptive_p`, `adaptive_c`: the adaptive weight `1 / (||Delta||² + c)^p` (Table 1: p = 1;
  `p = 0` is the plain squared L2 loss). The network needs `delta_input=True`.
  """
  check_process(process)
  if teacher is not None:
    raise ValueError('meanflow trains from scratch: teacher must be None, got '
                     f'{type(teacher).__name__}')
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f'meanflow: ratio={ratio} (the fraction of r != t) must lie in [0, 1]')
  if not time_std > 0:
    raise ValueError(f'meanflow: time_std={time_std} must be > 0')
  if not adaptive_p >= 0 or not adaptive_c > 0:
    raise ValueError(f'meanflow: adaptive_p={adaptive_p} must be >= 0 and adaptive_c='
                     f'{adaptive_c} > 0')

  def loss(model_fn, x0, key, cond=None):
    return meanflow_loss(model_fn, x0, key, cond, ratio=float(ratio),
                         time_mean=float(time_mean), time_std=float(time_std),
                         p=float(adaptive_p), c=float(adaptive_c))

  return objectives.Objective('meanflow', loss, process, KIND)


def make_flow_map(model_fn, process, objective=KIND) -> param.FlowMap:
  """The `FlowMap` of a MeanFlow network: `z_s = z_t - (t - s) u_theta(z_t, s, t)` (Eq. 12).

  `objective` is the `meanflow` objective (or the kind string 'mean_velocity'). One network
  call per jump; `t`, `s` scalars or `[B]`.
  """
  kind = objective if isinstance(objective, str) else objective.kind
  if kind != KIND:
    raise ValueError(f"meanflow.make_flow_map: kind {kind!r} is not MeanFlow's {KIND!r}")
  check_process(process, 'meanflow.make_flow_map')

  def fn(x_t, t, s, cond=None):
    t = jnp.broadcast_to(jnp.asarray(t, x_t.dtype), x_t.shape[:1])
    s = jnp.broadcast_to(jnp.asarray(s, x_t.dtype), x_t.shape[:1])
    return x_t - param.expand_like(t - s, x_t) * average_velocity(model_fn, x_t, s, t, cond)

  return param.FlowMap(fn, kind=KIND)
