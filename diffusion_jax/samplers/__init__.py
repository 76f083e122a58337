"""Samplers compiled whole (DESIGN §4): `x0, info = sample(denoiser, process, x_T, key, *,
steps, cond=None, ...)`.

The prior draw `x_T` is an argument, so comparisons, inversion and interpolation start from
identical noise. The time grid (`grids`) is separate from the update rule, and each loop is one
`lax.scan` inside whatever `jit` wraps it. `info['nfe']` is the exact number of network
evaluations; `info['trajectory']` (with `return_trajectory=True`) stacks the states visited.
`likelihood.log_likelihood` gives log-densities (and bits/dim) from the probability-flow ODE.
"""

from diffusion_jax.samplers import defaults
from diffusion_jax.samplers import grids
from diffusion_jax.samplers import likelihood
from diffusion_jax.samplers.adaptive import adaptive_sample
from diffusion_jax.samplers.consistency import consistency_multistep_sample
from diffusion_jax.samplers.discrete import ddim_sample
from diffusion_jax.samplers.discrete import ddim_invert
from diffusion_jax.samplers.discrete import ddpm_sample
from diffusion_jax.samplers.discrete import euler_invert
from diffusion_jax.samplers.grids import GRIDS
from diffusion_jax.samplers.grids import SPACINGS
from diffusion_jax.samplers.grids import Grid
from diffusion_jax.samplers.grids import discrete_timesteps
from diffusion_jax.samplers.grids import time_grid
from diffusion_jax.samplers.dpm_solver import dpm_solver_1_sample
from diffusion_jax.samplers.dpm_solver import dpm_solver_2_sample
from diffusion_jax.samplers.dpm_solver import dpm_solver_3_sample
from diffusion_jax.samplers.dpm_solver import dpm_solver_pp_2m_sample
from diffusion_jax.samplers.dpm_solver import dpm_solver_pp_3m_sample
from diffusion_jax.samplers.dpm_solver import dpm_solver_pp_sample
from diffusion_jax.samplers.dpm_solver import dpm_solver_pp_sde_sample
from diffusion_jax.samplers.dpm_solver import dpm_solver_sample
from diffusion_jax.samplers.ipndm import ipndm_sample
from diffusion_jax.samplers.ode import FLOW_METHODS
from diffusion_jax.samplers.ode import euler_sample
from diffusion_jax.samplers.ode import flow_euler_sample
from diffusion_jax.samplers.ode import flow_heun_sample
from diffusion_jax.samplers.ode import flow_midpoint_sample
from diffusion_jax.samplers.ode import flow_rk4_sample
from diffusion_jax.samplers.flow_map import flow_map_sample
from diffusion_jax.samplers.ode import flow_sample
from diffusion_jax.samplers.ode import heun_sample
from diffusion_jax.samplers.ode import velocity
from diffusion_jax.samplers.sde import euler_maruyama_sample
from diffusion_jax.samplers.sde import pc_sample
from diffusion_jax.samplers.unipc import unipc_bh1_sample
from diffusion_jax.samplers.unipc import unipc_bh2_sample
from diffusion_jax.samplers.unipc import unipc_sample

# name -> sampler(denoiser, process, x_T, key=None, *, steps, cond=None, ...) -> (x0, info).
SAMPLERS = {
    'ddpm': ddpm_sample,
    'ddim': ddim_sample,
    'euler': euler_sample,
    'heun': heun_sample,
    'flow_euler': flow_euler_sample,
    'flow_midpoint': flow_midpoint_sample,
    'flow_heun': flow_heun_sample,
    'flow_rk4': flow_rk4_sample,
    'dpm_solver_1': dpm_solver_1_sample,
    'dpm_solver_2': dpm_solver_2_sample,
    'dpm_solver_3': dpm_solver_3_sample,
    'dpm_solver_pp_2m': dpm_solver_pp_2m_sample,
    'dpm_solver_pp_3m': dpm_solver_pp_3m_sample,
    'dpm_solver_pp_2m_sde': dpm_solver_pp_sde_sample,
    'unipc_bh1': unipc_bh1_sample,
    'unipc_bh2': unipc_bh2_sample,
    'ipndm': ipndm_sample,
    'euler_maruyama': euler_maruyama_sample,
    'pc': pc_sample,
    'consistency': consistency_multistep_sample,
    'adaptive': adaptive_sample,
    'flow_map': flow_map_sample,
}
# The samplers of a `parameterization.FlowMap` (MeanFlow, shortcut models) rather than of a
# denoiser; every other sampler refuses a FlowMap in one line, and these refuse a denoiser.
FLOW_MAP_SAMPLERS = ('flow_map',)

# The keyword options a run's config may set (`config.sample.options`), name -> type; a sampler
# takes those of them in its signature, and an unset one keeps the sampler's default.
SAMPLER_OPTIONS = dict(
    grid=str, spacing=str, variance=str, eta=float, rho=float, t_min=float, s_churn=float,
    order=int, method=str, variant=str, rtol=float, atol=float, solver=str, snr=float,
    corrector_steps=int, lower_order_final=bool, times=tuple)
# The types a value may have: `grid` is a name or an explicit sequence of times
# (`grids.explicit_times`; set in a config file, or as a list in a saved config.json);
# `times` is the consistency sampler's own evaluation times (e.g. sCM's, `distill.trigflow`).
SAMPLER_OPTION_TYPES = {**SAMPLER_OPTIONS, 'grid': str | tuple[float, ...],
                        'times': tuple[float, ...]}
