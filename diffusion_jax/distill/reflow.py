"""Reflow (Liu, Gong & Liu 2022, "Flow Straight and Fast: Learning to Generate and Transfer Data
with Rectified Flow") as an `objectives.Objective` on the linear interpolant.

Rectified flow (their Eq. 1, Alg. 1) regresses the velocity of the straight interpolation
between a coupling `(X_0, X_1)`; "reflow" (§2.2 and Alg. 1, the k-rectified flow) re-trains on the
coupling the previous flow itself generates, `(Z_0^k, Z_1^k) = (noise, ODE_k(noise))`, which
straightens the paths so that few Euler steps suffice. In the library's time (t = 0 data, t = 1
noise; `processes.LinearInterpolant`, alpha = 1 - t, sigma = t):

  z ~ N(0, I),   x0^ = teacher PF-ODE solve from z at t = 1 down to the data (stop_gradient),
  x_t = (1 - t) x0^ + t z,   target  dx_t/dt = z - x0^,
  loss = mean_d (v_theta(x_t, t) - (z - x0^))²,   t ~ U(0, 1)

(Liu et al. Eq. 1 on the coupling of Alg. 1's reflow step; `parameterization.target
('velocity', ...)` on the linear interpolant is exactly `z - x0^`). The teacher is any
`parameterization.Denoiser` of a model trained on this process, solved with
`samplers.SAMPLERS[teacher_sampler]` in `teacher_steps` steps; every teacher output is under
`stop_gradient`, so the teacher is never differentiated. The coupling needs only the teacher's
noise -> data map, so the teacher may be trained on another process: given its own
`teacher_process`, its ODE is solved there, from its own prior `x_T = prior_std z` (an EDM
teacher from `sigma_max z`), and the pair is still `(z, x0^)`.

The coupling is generated inside the loss, from the loss's key, so the batch's `x0` only gives
the shape, dtype (and `cond`, passed to the teacher as the condition of each example): the
student never sees data. Draws: `key_z, key_t = jax.random.split(key)`,
`z = jax.random.normal(key_z, x0.shape, x0.dtype)`, `t` from `key_t`. The teacher solve costs
its NFE per training example; Liu et al. generate the coupling once offline (an equal-cost
alternative that needs storage, not done here).

`t_sampling='one_step'` trains at t = 1 only: Liu et al. §2.3's distillation of the k-rectified
flow into a one-step map, `x0^ = z - v(z, 1)` (sampled with `flow_euler`, 1 step). A reflowed
model is sampled with `samplers.SAMPLERS['flow_euler']` at any step count.
"""

import jax
import jax.numpy as jnp

from diffusion_jax import objectives
from diffusion_jax import parameterization as param
from diffusion_jax import processes_continuous
from diffusion_jax import samplers
from diffusion_jax.distill import progressive

T_SAMPLINGS = ('uniform', 'logit_normal', 'one_step')
# Samplers that draw noise cannot solve the PF-ODE into a deterministic coupling.
_STOCHASTIC = ('ddpm', 'euler_maruyama', 'pc', 'dpm_solver_pp_2m_sde', 'consistency')


def _frozen(teacher: param.Denoiser) -> param.Denoiser:
  """The teacher with its outputs under stop_gradient (never differentiated, not even through
  the ODE solver's loop)."""
  def fn(x_t, t, cond=None):
    return jax.lax.stop_gradient(teacher(x_t, t, cond))
  return param.Denoiser(fn, kind=teacher.kind, evals_per_call=teacher.evals_per_call)


def reflow_coupling(teacher, process, z, *, steps: int, sampler: str, cond=None,
                    options: dict | None = None):
  """`x0^` = the teacher's PF-ODE solve on its `process` from the unit noise `z` (the prior
  draw `process.prior_std * z` at t = 1) to the data, with `samplers.SAMPLERS[sampler]` in
  `steps` steps (Liu et al. 2022, Alg. 1, the reflow coupling).

  Not differentiated w.r.t. the teacher (its outputs are under stop_gradient)."""
  solve = samplers.SAMPLERS[sampler]
  x0, _ = solve(_frozen(param.as_denoiser(teacher)), process, process.prior_std * z,
                steps=steps, cond=cond, **(options or {}))
  return x0


def reflow(process, *, teacher=None, teacher_steps: int = 16,
           teacher_sampler: str = 'dpm_solver_pp_2m', teacher_options: dict | None = None,
           t_sampling: str = 'uniform', logit_mean: float = 0.0, logit_std: float = 1.0,
           teacher_process=None) -> objectives.Objective:
  """Reflow of `teacher` on the linear interpolant (Liu et al. 2022, Eq. 1 on the reflow
  coupling of Alg. 1), an Objective of kind 'velocity'; see the module docstring.

  `teacher_sampler` / `teacher_steps` / `teacher_options`: the deterministic library sampler
  that generates the coupling (`reflow_coupling`) on `teacher_process` (the process the
  teacher was trained on; default `process`). `t_sampling`: 'uniform' (their choice),
  'logit_normal' (Esser et al. 2024, `logit_mean`, `logit_std`) or 'one_step' (t = 1 only, §2.3
  distillation).
  """
  who = 'reflow'
  if not isinstance(process, processes_continuous.LinearInterpolant):
    raise ValueError(f'{who}: reflow straightens the linear interpolant (alpha = 1 - t, sigma = '
                     f"t, process 'linear'); got {type(process).__name__}")
  if teacher_sampler not in samplers.SAMPLERS or teacher_sampler in _STOCHASTIC:
    deterministic = sorted(set(samplers.SAMPLERS) - set(_STOCHASTIC))
    raise ValueError(f'{who}: teacher_sampler={teacher_sampler!r}; choose a deterministic '
                     f'ODE sampler from {deterministic}')
  if int(teacher_steps) != teacher_steps or teacher_steps < 1:
    raise ValueError(f'{who}: teacher_steps={teacher_steps!r} must be an integer >= 1')
  if t_sampling not in T_SAMPLINGS:
    raise ValueError(f'{who}: t_sampling={t_sampling!r}; choose from {T_SAMPLINGS}')
  teacher_process = process if teacher_process is None else teacher_process
  teacher = progressive.check_teacher(teacher_process, teacher, who)
  options = dict(teacher_options or {})

  def draw_t(key, batch, dtype):
    if t_sampling == 'one_step':
      return jnp.ones((batch,), dtype)
    if t_sampling == 'logit_normal':
      return objectives.logit_normal_t(process, key, batch, logit_mean, logit_std).astype(dtype)
    return jax.random.uniform(key, (batch,), dtype)

  def loss(model_fn, x0, key, cond=None, **kwargs):
    del kwargs   # step= from a loop that passes it
    key_z, key_t = jax.random.split(key)
    z = jax.random.normal(key_z, x0.shape, x0.dtype)                  # [B, ...] noise, t = 1
    x0_hat = reflow_coupling(teacher, teacher_process, z, steps=int(teacher_steps),
                             sampler=teacher_sampler, cond=cond, options=options)
    t = draw_t(key_t, x0.shape[0], x0.dtype)                          # [B]
    x_t = process.marginal(x0_hat, z, t)                              # (1 - t) x0^ + t z
    out = model_fn(x_t, t, cond)
    tgt = param.target('velocity', x0_hat, z, process, t)             # z - x0^
    per_example = jnp.mean(jnp.square(out - tgt).reshape(x0.shape[0], -1), axis=-1)
    aux = {'loss_per_example': per_example, 't': t, 'log_snr': process.log_snr(t)}
    return jnp.mean(per_example), aux

  return objectives.Objective('reflow', loss, process, 'velocity')
