"""Euler, Heun (EDM) and the flow-ODE Runge-Kutta solvers: measured convergence order on
Gaussian data against the closed-form PF-ODE solution (DESIGN §6)."""

import pytest

from diffusion_jax import processes
from diffusion_jax import samplers

import sampler_testing as st


@pytest.mark.parametrize('name,order,fn,kw', [
    ('euler', 1, samplers.euler_sample, {}),
    ('heun', 2, samplers.heun_sample, {}),
    ('flow_euler', 1, samplers.flow_sample, {'method': 'euler'}),
    ('flow_midpoint', 2, samplers.flow_sample, {'method': 'midpoint'}),
    ('flow_heun', 2, samplers.flow_sample, {'method': 'heun'}),
    ('flow_rk4', 4, samplers.flow_sample, {'method': 'rk4'}),
])
@pytest.mark.parametrize('proc_name', ['vp_linear', 'subvp', 'edm', 'linear'])
def test_convergence_order(name, order, fn, kw, proc_name):
  proc = processes.make_process(proc_name)
  grid = 't' if name.startswith('flow') and proc_name == 'linear' else 'karras'
  t_min = 0.05 if proc_name == 'linear' else None
  steps_list = [8, 16, 32, 64] if order < 4 else [4, 8, 16, 32]
  if proc_name == 'subvp':
    # Flow-Heun's error on sub-VP changes sign near 8 steps (0.034, 0.030, 0.0094, 0.0025,
    # 0.00064 at 8..128): start where every solver is asymptotic.
    steps_list = [2 * n for n in steps_list]
  errors = st.endpoint_errors(fn, proc, steps_list, grid=grid, t_min=t_min, **kw)
  measured = st.fitted_order(steps_list, errors)
  # Band: above 0.7 x order (the pre-asymptotic bend: RK4 on VP measures 3.12 over 4..32
  # steps) and below order + 0.5, so a solver of the next order fails (Euler must not pass as
  # Heun). Measured (vp_linear / subvp / edm / linear): euler 0.94 / 0.96 / 0.94 / 0.82, heun
  # 2.09 / 2.06 / 2.09 / 2.15, flow_euler 1.08 / 0.97 / 0.94 / 0.97, flow_midpoint 2.23 / 2.13
  # / 2.94 / 3.00, flow_heun 1.92 / 1.85 / 2.09 / 1.94, flow_rk4 3.12 / 4.20 / 3.67 / 4.30.
  # Midpoint measures 3.0 on the alpha = 1 processes (EDM, linear interpolant): its h² error
  # term cancels on this Gaussian problem, while Heun on the same runs measures 2.0 and midpoint
  # on VP 2.1-2.2; there alone the upper bound is 3.2.
  hi = order + 0.5
  if name == 'flow_midpoint' and proc_name in ('edm', 'linear'):
    hi = 3.2
  assert order * 0.7 < measured < hi, (measured, errors)
