"""Few-step sampling of a flow map (MeanFlow, shortcut models), compiled whole as one `lax.scan`.

A `parameterization.FlowMap` jumps along the probability-flow ODE, `x_s = fn(x_t, t, s, cond)`
for `s < t`, instead of giving `(x0_hat, eps_hat)`: MeanFlow's `z_r = z_t - (t - r) u(z_t, r, t)`
(Geng et al. 2025, Eq. 12 and Alg. 2), a shortcut model's `x_{t-d} = x_t - d s(x_t, t, d)`
(Frans et al. 2024, Eq. 4 and Alg. 2, time reversed to our t = 1 prior). `flow_map_sample`
chains `steps` such jumps from `t = 1` to the data at `t = 0`; one step is the methods' 1-NFE
sampler. The plain samplers refuse a flow map (`parameterization.flow_map_refusal`).
"""

import jax.numpy as jnp
import numpy as np

from diffusion_jax import parameterization
from diffusion_jax.samplers import _common


def flow_map_times(steps: int, times=None) -> np.ndarray:
  """The jump times: `times` checked (strictly decreasing, in [0, 1], `steps + 1` of them), or
  the uniform grid `1, 1 - 1/steps, ..., 0`."""
  if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
    raise ValueError(f'flow_map_sample: steps={steps!r} must be an integer >= 1')
  if times is None:
    return np.linspace(1.0, 0.0, steps + 1)
  t = np.asarray(times, np.float64)
  if t.ndim != 1 or t.shape[0] != steps + 1:
    raise ValueError(f'flow_map_sample: times must be a sequence of steps + 1 = {steps + 1} '
                     f'times, got shape {t.shape}')
  if not (np.all(np.isfinite(t)) and np.all(np.diff(t) < 0) and t[0] <= 1.0 and t[-1] >= 0.0):
    raise ValueError(f'flow_map_sample: times={t.tolist()} must decrease strictly within [0, 1]')
  return t


def flow_map_sample(flow_map, process, x_T, key=None, *, steps: int, times=None, cond=None,
                    return_trajectory: bool = False):
  """`steps` jumps of `flow_map` from `x_T` (at `times[0]`, 1 by default) to `times[-1]` (0).

  `times` defaults to the uniform grid in `t`; an explicit decreasing sequence of `steps + 1`
  times is accepted. `process` is the process the flow map was trained on (its time
  convention); the jumps themselves need nothing from it. Deterministic; `key` is unused.
  Returns `(x0, info)` with `info['nfe'] = steps * flow_map.evals_per_call`,
  `info['denoiser_calls'] = steps` and, with `return_trajectory`, `info['trajectory']`
  `[steps + 1, ...]` starting at `x_T`.
  """
  del key, process
  if not isinstance(flow_map, parameterization.FlowMap):
    raise ValueError(f'flow_map_sample needs a parameterization.FlowMap (built by the method\'s '
                     f'make_flow_map), got {type(flow_map).__name__}')
  _common.check_x_T(x_T, 'flow_map_sample')
  t = jnp.asarray(flow_map_times(steps, times), x_T.dtype)

  def step(x, inputs):
    t_i, t_next = inputs
    return flow_map.jump(x, t_i, t_next, cond)

  x, traj = _common.scan(step, x_T, (t[:-1], t[1:]), return_trajectory)
  info = {'nfe': int(steps) * int(flow_map.evals_per_call), 'denoiser_calls': int(steps)}
  if return_trajectory:
    info['trajectory'] = _common.trajectory(x_T, traj)
  return x, info
