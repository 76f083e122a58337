"""Shortcut models: one network for every step size (Frans et al. 2024, "One Step Diffusion via
Shortcut Models").

A shortcut model `s(x_t, t, d)` is conditioned on the step size `d` as well as the time, and
jumps `d` at once. The paper's time runs from noise (0) to data (1); on our convention (t = 1
prior, the linear interpolant `x_t = (1 - t) x0 + t eps`, process 'linear') its step (Eq. 3)
reads

  x_{t-d} = x_t - d s(x_t, t, d),

so `s(x_t, t, d) = (x_t - x_{t-d}) / d` along the probability-flow ODE, and at `d = 0` the
shortcut is the flow's velocity `v = dx/dt` (flow matching, target `eps - x0`). Two steps of `d`
make one of `2d` (Eq. 4, the self-consistency property):

  s(x_t, t, 2d) = s(x_t, t, d) / 2 + s(x'_{t-d}, t - d, d) / 2,   x'_{t-d} = x_t - d s(x_t, t, d).

Training (Eq. 5, Alg. 1) regresses `s(x_t, t, 0)` on `eps - x0` for a fraction `1 - k` of the
batch and `s(x_t, t, 2d)` on the stop-gradient right-hand side above for the other `k` (their
1/4), with `d` drawn uniformly among the powers of two `1/M, ..., 1/2` (`M = 128` the smallest
step: `2d` spans `2/M .. 1`) and `t` uniformly on the grid of `2d`-steps (`t = j 2d`, `j = 1 ..
1/(2d)`, so that `t - 2d >= 0`). At the smallest `d = 1/M` the target queries the model at
`d = 0` (the paper's §3.2). The loss is the mean squared error over both parts.

The network is `model_fn(x_t, t, layers.with_delta(cond, d))`, a model built with
`delta_input=True`; prediction kind 'shortcut', sampled by jumps (`make_flow_map`,
`samplers.flow_map_sample`, `steps = 1/d`). Classifier-free guidance (applied by the paper to
the flow-matching part only) and the EMA-teacher target are not implemented.
"""

import math

import jax
import jax.numpy as jnp

from diffusion_jax import objectives
from diffusion_jax import parameterization as param
from diffusion_jax.models import layers
from diffusion_jax.processes_continuous import LinearInterpolant

KIND = 'shortcut'


def check_process(process, who: str = 'shortcut'):
  """Shortcut models are trained on the linear interpolant: refuse any other process."""
  if not isinstance(process, LinearInterpolant):
    raise ValueError(f"{who}: shortcut models are trained on the linear interpolant (process "
                     f"'linear'), got process {type(process).__name__}")


def shortcut_velocity(model_fn, x, t, d, cond=None):
  """`s(x, t, d) = model_fn(x, t, with_delta(cond, d))`; `t`, `d` are `[B]`."""
  return model_fn(x, t, layers.with_delta(cond, d))


def shortcut_target(model_fn, x_t, t, d, cond=None, d_query=None):
  """The self-consistency target for step `2d` at `(x_t, t)` (Frans et al. 2024, Eq. 4), under
  stop_gradient: `(s(x_t, t, d) + s(x', t - d, d)) / 2`, `x' = x_t - d s(x_t, t, d)`.

  The model is queried at step size `d_query` (default `d`; the paper's `0` at the smallest
  `d`), the state moves by `d`. `t`, `d`, `d_query` are `[B]`. Two network calls.
  """
  d_query = d if d_query is None else d_query
  s_first = shortcut_velocity(model_fn, x_t, t, d_query, cond)
  x_mid = x_t - param.expand_like(d, x_t) * s_first
  s_second = shortcut_velocity(model_fn, x_mid, t - d, d_query, cond)
  return jax.lax.stop_gradient((s_first + s_second) / 2.0)


def sample_self_consistency(key, batch: int, max_steps: int, dtype=jnp.float32):
  """`(t, d, d_query)` `[B]` for the self-consistency part: `d = 2^k / M`, `k` uniform in
  `0 .. log2 M - 1`; `t = j 2d`, `j` uniform in `1 .. 1/(2d)`; `d_query = 0` where `d = 1/M`."""
  levels = int(round(math.log2(max_steps)))
  k_level, k_time = jax.random.split(key)
  k = jax.random.randint(k_level, (batch,), 0, levels)
  d = jnp.exp2(k.astype(dtype)) / max_steps
  n_steps = jnp.right_shift(max_steps, k + 1)                     # 1 / (2d), an integer
  j = jnp.floor(jax.random.uniform(k_time, (batch,), dtype) * n_steps) + 1
  t = jnp.minimum(j, n_steps) * 2.0 * d
  return t, d, jnp.where(k == 0, 0.0, d).astype(dtype)


def shortcut_loss(model_fn, x0, key, cond=None, *, fraction: float, max_steps: int):
  """The shortcut models' loss (Alg. 1) on `x0 [B, ...]` -> `(loss, aux)`; the first
  `int(B * fraction)` examples are self-consistency ones, the rest flow matching at `d = 0`.

  `aux`: 'loss_per_example' (mean squared error per example), 't', 'd' (the step-size input:
  `2d` or 0), 'self_consistency' (bool `[B]`).
  """
  batch = x0.shape[0]
  n_sc = int(batch * fraction)
  k_sc, k_fm, k_eps = jax.random.split(key, 3)
  t_sc, d_sc, dq_sc = sample_self_consistency(k_sc, n_sc, max_steps, x0.dtype)
  t_fm = jax.random.uniform(k_fm, (batch - n_sc,), x0.dtype)
  t = jnp.concatenate([t_sc, t_fm])
  d_in = jnp.concatenate([2.0 * d_sc, jnp.zeros_like(t_fm)])
  eps = jax.random.normal(k_eps, x0.shape, x0.dtype)
  tb = param.expand_like(t, x0)
  x_t = (1.0 - tb) * x0 + tb * eps
  target = eps - x0
  if n_sc:
    sc_cond = jax.tree_util.tree_map(lambda c: c[:n_sc], cond)
    sc_target = shortcut_target(model_fn, x_t[:n_sc], t_sc, d_sc, sc_cond, dq_sc)
    target = jnp.concatenate([sc_target, target[n_sc:]])
  out = shortcut_velocity(model_fn, x_t, t, d_in, cond)
  per_example = jnp.mean(((out - target) ** 2).reshape(batch, -1), axis=-1)
  aux = {'loss_per_example': per_example, 't': t, 'd': d_in,
         'self_consistency': jnp.arange(batch) < n_sc}
  return jnp.mean(per_example), aux


def shortcut(process, *, teacher=None, fraction: float = 0.25,
             max_steps: int = 128) -> objectives.Objective:
  """The shortcut-model objective (Frans et al. 2024, Eq. 5, Alg. 1), kind 'shortcut'.

  Trains from scratch (no teacher). `fraction`: the share of the batch trained by
  self-consistency (the paper's k = 1/4); `max_steps`: `M`, a power of two, so the smallest
  step is `1/M` (the paper's 128). The network needs `delta_input=True`.
  """
  check_process(process)
  if teacher is not None:
    raise ValueError('shortcut trains from scratch: teacher must be None, got '
                     f'{type(teacher).__name__}')
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f'shortcut: fraction={fraction} (the self-consistency share) must lie in '
                     '[0, 1]')
  if (not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 2
      or max_steps & (max_steps - 1)):
    raise ValueError(f'shortcut: max_steps={max_steps!r} must be a power of two >= 2')

  def loss(model_fn, x0, key, cond=None):
    return shortcut_loss(model_fn, x0, key, cond, fraction=float(fraction), max_steps=max_steps)

  return objectives.Objective('shortcut', loss, process, KIND)


def make_flow_map(model_fn, process, objective=KIND) -> param.FlowMap:
  """The `FlowMap` of a shortcut network: `x_s = x_t - d s(x_t, t, d)`, `d = t - s` (Eq. 3).

  `objective` is the `shortcut` objective (or the kind string 'shortcut'). One call per jump.
  """
  kind = objective if isinstance(objective, str) else objective.kind
  if kind != KIND:
    raise ValueError(f"shortcut.make_flow_map: kind {kind!r} is not the shortcut model's "
                     f'{KIND!r}')
  check_process(process, 'shortcut.make_flow_map')

  def fn(x_t, t, s, cond=None):
    t = jnp.broadcast_to(jnp.asarray(t, x_t.dtype), x_t.shape[:1])
    d = t - jnp.broadcast_to(jnp.asarray(s, x_t.dtype), x_t.shape[:1])
    return x_t - param.expand_like(d, x_t) * shortcut_velocity(model_fn, x_t, t, d, cond)

  return param.FlowMap(fn, kind=KIND)
