"""Properties every entry of `samplers.SAMPLERS` must have (issue: samplers; DESIGN §2, §4):

* exact NFE — `info['nfe']` equals the denoiser calls that really executed (counted by a host
  callback inside the compiled loop), with and without the final step to data;
* compiled whole — the loop is `lax.scan`/`while`, so tracing cost does not grow with steps;
* works with every prediction kind — a model of any kind (eps, x0, v, score, velocity, edm)
  that is optimal for Gaussian data samples exactly what the exact denoiser samples.
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import analytic
from diffusion_jax import parameterization
from diffusion_jax import processes
from diffusion_jax import samplers

import sampler_testing as st

PROC = processes.DiscreteVP.from_name('linear', 1000)
# The flow_* samplers refuse a DiscreteVP (their dx/dt jumps at its integer steps): they run on
# the continuous VP with the same linear beta.
FLOW_PROC = processes.make_process('vp_linear')
MU, S2 = jnp.asarray([0.5, -1.0]), jnp.asarray([0.3, 0.05])
# Every sampler of a denoiser (a FlowMap's own sampler is tested in test_distill_meanflow.py).
NAMES = sorted(n for n in samplers.SAMPLERS if n not in samplers.FLOW_MAP_SAMPLERS)


def _proc(name):
  return FLOW_PROC if name.startswith('flow_') else PROC


def _run(name, den, x_T, steps, **kw):
  fn = samplers.SAMPLERS[name]
  return jax.jit(lambda x, k: fn(den, _proc(name), x, k, steps=steps, **kw))(
      x_T, jax.random.key(3))


def _accepts(name, option):
  return option in inspect.signature(samplers.SAMPLERS[name]).parameters


# Network evaluations per step, from each method's definition (written out, not read from the
# samplers): one for DDPM (Ho et al. 2020, Alg. 2), DDIM (Song et al. 2021, Eq. 12), Euler and
# Euler-Maruyama, consistency multistep (Song et al. 2023, Alg. 1), DPM-Solver-1 and the
# multistep DPM-Solver++ 2M / 3M / 2M-SDE (Lu et al. 2022b, Alg. 2: earlier evaluations are
# reused) and UniPC (Zhao et al. 2023: the corrector reuses the next step's evaluation); two
# for Heun (Karras et al. 2022, Alg. 1), explicit midpoint and DPM-Solver-2; three for
# DPM-Solver-3 (Lu et al. 2022a, Alg. 1-2); four for classical RK4; two for PC with its one
# default corrector step (Song et al. 2021b, Alg. 2). With final='data' the last step is
# replaced by one evaluation, x0_hat at the last grid time (EDM Alg. 1 line 8: no second stage
# at sigma = 0), except PC, whose last level still runs its corrector before the noise-free
# predictor. `adaptive` is data dependent: only the counted calls are checked.
STAGES = {'ddpm': 1, 'ddim': 1, 'euler': 1, 'euler_maruyama': 1, 'consistency': 1,
          'dpm_solver_1': 1, 'dpm_solver_pp_2m': 1, 'dpm_solver_pp_3m': 1,
          'dpm_solver_pp_2m_sde': 1, 'unipc_bh1': 1, 'unipc_bh2': 1, 'heun': 2,
          'flow_heun': 2, 'flow_midpoint': 2, 'flow_euler': 1, 'dpm_solver_2': 2,
          'dpm_solver_3': 3, 'flow_rk4': 4, 'pc': 2, 'ipndm': 1}


# Heun's default grid below 20 steps with final='data' ('auto', rule 'heun', samplers.defaults)
# takes its first step, from t_max straight down to log-SNR -3, as one Euler step: one call fewer.
FEW_STEP_JUMP_SAVES = {'heun': 1}


def expected_nfe(name, steps, final):
  k = STAGES[name]
  if final == 'data' and name != 'pc':
    return k * (steps - 1) + 1 - (FEW_STEP_JUMP_SAVES.get(name, 0) if steps < 20 else 0)
  return k * steps


def test_every_fixed_step_sampler_has_a_stage_count():
  assert set(STAGES) == set(NAMES) - {'adaptive'}


@pytest.mark.parametrize('name', [n if n != 'adaptive' else pytest.param(n, marks=pytest.mark.slow)
                                  for n in NAMES])
@pytest.mark.parametrize('steps', [4, pytest.param(7, marks=pytest.mark.slow)])
def test_nfe_is_exact(name, steps):
  """`info['nfe']` is the method's evaluation count and the calls that really executed."""
  finals = ['data', 't_min'] if _accepts(name, 'final') else [None]
  for final in finals:
    den, count = st.counting(analytic.gaussian_denoiser(MU, S2, _proc(name)))
    kw = {} if final is None else {'final': final}
    x, info = _run(name, den, jnp.ones((4, 2)), steps, **kw)
    jax.block_until_ready(x)
    jax.effects_barrier()
    assert info['nfe'] == count() > 0, (name, final, int(info['nfe']), count())
    if name != 'adaptive':
      assert info['nfe'] == expected_nfe(name, steps, final), (name, final, info['nfe'])
    assert np.all(np.isfinite(np.asarray(x)))


@pytest.mark.parametrize('name', NAMES)
def test_trace_cost_does_not_grow_with_steps(name):
  """The denoiser is traced a fixed number of times, whatever the step count: no Python loop
  over steps (DESIGN §4)."""
  traced = {}

  def count_traces(steps):
    calls = []

    def den(x, t, cond=None):
      calls.append(1)
      return analytic.gaussian_denoiser(MU, S2, _proc(name))(x, t, cond)
    fn = samplers.SAMPLERS[name]
    jax.make_jaxpr(lambda x: fn(den, _proc(name), x, jax.random.key(0), steps=steps)[0])(
        jnp.ones((4, 2)))
    return len(calls)
  traced = {steps: count_traces(steps) for steps in (4, 40)}
  assert traced[4] == traced[40] <= 8, traced


KINDS = ['eps', 'x0', 'v', 'score', 'velocity', 'edm']
# The default run pairs the first twelve sampler names with one kind each (kinds rotate over the
# sorted names, so every kind meets one or two samplers), less the five samplers that compile
# slowest (~50 s of CI in all; each still has its exact-NFE test by default). The conversion is
# `make_denoiser`'s, the same for every sampler. The full product is `slow`.
_SLOW_TO_COMPILE = {'adaptive', 'consistency', 'dpm_solver_pp_3m', 'euler_maruyama', 'pc'}
PAIRS = [pytest.param(name, kind, id=f'{name}-{kind}',
                      marks=() if ((i - j) % len(KINDS) == 0 and i < 2 * len(KINDS)
                                   and name not in _SLOW_TO_COMPILE)
                      else pytest.mark.slow)
         for i, name in enumerate(NAMES) for j, kind in enumerate(KINDS)]


@pytest.mark.parametrize('name,kind', PAIRS)
def test_every_prediction_kind_samples_the_same(name, kind):
  """A network of any kind, optimal for Gaussian data and wrapped by `make_denoiser`, gives the
  same samples as the exact denoiser (same noise, float64): the conversions are exact, so the
  difference is rounding, amplified at most by 1 / alpha(1) ~ 150 at the first step."""
  with jax.enable_x64(True):
    proc = _proc(name)
    exact = analytic.gaussian_denoiser(MU, S2, proc)
    x_T = jax.random.normal(jax.random.key(0), (8, 2), jnp.float64)
    ref, _ = _run(name, exact, x_T, 6)
    den = parameterization.make_denoiser(analytic.optimal_model(kind, exact, proc), proc, kind)
    x, _ = _run(name, den, x_T, 6)
    np.testing.assert_allclose(x, ref, rtol=1e-7, atol=1e-7, err_msg=f'{name} {kind}')


@pytest.mark.parametrize('name', NAMES)
def test_signature_lists_the_options(name):
  """Presets (e.g. 'dpm_solver_pp_2m', 'flow_rk4') keep their base sampler's signature, so the
  training loop can check a config's options against it: no options hidden in **kwargs."""
  params = inspect.signature(samplers.SAMPLERS[name]).parameters
  assert {'steps', 'cond'} <= set(params), (name, list(params))
  assert all(p.kind != p.VAR_KEYWORD for p in params.values()), (name, list(params))
