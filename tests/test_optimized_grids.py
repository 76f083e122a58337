"""Optimised time grids (`samplers.optimized_grids`, issue 24): GITS's dynamic programming, LD3,
the differentiable solver twins and the saved schedule.

Truth used here, written in the tests: for Gaussian data N(mu, diag(s2)) the probability-flow
ODE moves `x_T` along `x_t = alpha_t mu + sqrt(alpha_t² s2 + sigma_t²) z`, `z` fixed, so its
endpoint at clean data is `mu + sqrt(s2) z` and its state at any time is known exactly; the
posterior mean is `mu + alpha s2 / (alpha² s2 + sigma²) (x - alpha mu)`. The DP is checked
against a brute force over all paths; the solver twins against the library samplers.
"""

import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import analytic
from diffusion_jax import processes
from diffusion_jax import samplers
from diffusion_jax.samplers import optimized_grids as og

MU = np.array([0.5, -1.0])
S2 = np.array([0.05, 0.6])       # anisotropic: the two coordinates want different grids


@pytest.fixture(scope='module')
def proc():
  return processes.DiscreteVP.from_name('linear', 1000)


@pytest.fixture(scope='module')
def den(proc):
  return analytic.gaussian_denoiser(MU, S2, proc)


def _exact_state(proc, x_T, t):
  """The PF-ODE state at times `t [M]` from `x_T` at t = 1 (t = 0: clean data), `[M, B, D]`."""
  t = np.atleast_1d(np.asarray(t, np.float64))
  a1, s1 = (np.asarray(f(jnp.asarray(1.0, jnp.float64)), np.float64) for f in (proc.alpha,
                                                                                 proc.sigma))
  z = (np.asarray(x_T) - a1 * MU) / np.sqrt(a1**2 * S2 + s1**2)
  a = np.where(t == 0, 1.0, np.asarray(proc.alpha(jnp.asarray(t, jnp.float64)), np.float64))
  s = np.where(t == 0, 0.0, np.asarray(proc.sigma(jnp.asarray(t, jnp.float64)), np.float64))
  return a[:, None, None] * MU + np.sqrt(a[:, None, None]**2 * S2 + s[:, None, None]**2) * z


def _rms(x, ref):
  return float(np.sqrt(np.mean(np.sum((np.asarray(x) - ref) ** 2, axis=-1))))


# --- the differentiable twins equal the library samplers -------------------------------------


def _check_twin(proc, den, name):
  """Same grid (non-uniform, from t = 1), same x_T: the jnp twin and the library sampler agree
  to float64 rounding (1e-12 on values of order 1; both form the same coefficients, in numpy
  float64 and jnp float64). A wrong sign or index in a twin's coefficient moves it by >= 1e-3."""
  with jax.enable_x64(True):
    x_T = jax.random.normal(jax.random.key(0), (8, 2), jnp.float64)
    times = (1.0, 0.62, 0.41, 0.2, 0.07, 0.015)
    want, info = jax.jit(lambda x: samplers.SAMPLERS[name](den, proc, x, steps=len(times),
                                                           grid=times))(x_T)
    got = jax.jit(lambda x, t: og.solve(den, proc, x, t, name))(x_T, jnp.asarray(times))
  assert info['nfe'] == len(times)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-12,
                             err_msg=name)


# DPM-Solver++(3M) runs its first-, second- (= 2M) and third-order updates on this grid
# (warm-up), so it covers 2M's formula; the rest are slow.
@pytest.mark.parametrize('name', ['dpm_solver_pp_3m', 'unipc_bh2'])
def test_solver_twins_equal_the_library_samplers(proc, den, name):
  _check_twin(proc, den, name)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['euler', 'dpm_solver_pp_2m'])
def test_solver_twins_equal_the_library_samplers_more(proc, den, name):
  _check_twin(proc, den, name)


# --- dynamic programming ---------------------------------------------------------------------


def _brute_force(costs, moves):
  n = costs.shape[0]
  best = (np.inf, None)
  for inner in itertools.combinations(range(1, n - 1), moves - 1):
    path = (0,) + inner + (n - 1,)
    total = sum(costs[i, j] for i, j in itertools.pairwise(path))
    best = min(best, (total, path))
  return best


def test_dp_path_is_the_brute_force_optimum():
  rng = np.random.default_rng(0)
  for n in (5, 8):
    costs = rng.uniform(0.1, 2.0, (n, n))
    costs[np.tril_indices(n)] = np.inf
    for moves in range(1, n):
      path, total = og.dp_path(costs, moves)
      want_total, want_path = _brute_force(costs, moves)
      assert tuple(path) == want_path, (n, moves)
      assert total == pytest.approx(want_total, rel=1e-12)
  with pytest.raises(ValueError, match='steps=5'):
    og.dp_path(np.zeros((5, 5)), 5)


def test_dp_cost_matrix_is_the_ddim_step_error(proc, den):
  """`C[i, j]` = mean over the batch of `||alpha_j x0_i + sigma_j eps_i - x_j||²` with the
  posterior mean `x0_i` written here from the closed form and exact ODE states."""
  with jax.enable_x64(True):
    x_T = np.asarray(jax.random.normal(jax.random.key(1), (16, 2), jnp.float64))
    times = np.array([1.0, 0.5, 0.2, 0.05, 0.001])
    states = _exact_state(proc, x_T, times)
    x0 = _exact_state(proc, x_T, [0.0])[0]
    c = og.dp_cost_matrix(den, proc, jnp.asarray(states), times, jnp.asarray(x0))
    a = np.asarray(proc.alpha(jnp.asarray(times, jnp.float64)), np.float64)
    s = np.asarray(proc.sigma(jnp.asarray(times, jnp.float64)), np.float64)
  a_n, s_n = np.append(a, 1.0), np.append(s, 0.0)
  targets = np.concatenate([states, x0[None]])
  for i in range(len(times)):
    post = MU + a[i] * S2 / (a[i]**2 * S2 + s[i]**2) * (states[i] - a[i] * MU)
    eps = (states[i] - a[i] * post) / s[i]
    for j in range(len(times) + 1):
      if j <= i:
        assert c[i, j] == np.inf
        continue
      want = np.mean(np.sum((a_n[j] * post + s_n[j] * eps - targets[j]) ** 2, -1))
      # rel 1e-6: the cost is a squared difference of O(1) states about 1e-2 apart, formed
      # in XLA and in numpy (measured 4e-9); a wrong coefficient changes it by O(1).
      assert c[i, j] == pytest.approx(want, rel=1e-6, abs=1e-15), (i, j)
  assert np.all(c[-1] == np.inf)


# --- the searched schedules beat the uniform log-SNR grid ------------------------------------


@pytest.fixture(scope='module')
def gaussian_case(proc, den):
  """Exact teacher on 41 log-SNR-uniform candidates (128 draws, seed 2), and 128 held-out draws
  (seed 3) with their exact endpoints (one batch shape: the compiled solvers are shared)."""
  with jax.enable_x64(True):
    x_opt = jax.random.normal(jax.random.key(2), (128, 2), jnp.float64)
    x_test = jax.random.normal(jax.random.key(3), (128, 2), jnp.float64)
    cand = og.candidate_times(proc, 41, dtype=jnp.float64)
    teacher = (jnp.asarray(_exact_state(proc, x_opt, cand)),
               jnp.asarray(_exact_state(proc, x_opt, [0.0])[0]))
    ref_test = _exact_state(proc, x_test, [0.0])[0]
  return dict(x_opt=x_opt, x_test=x_test, ref_test=ref_test, cand=cand, teacher=teacher)


def _held_out_error(proc, den, case, times, solver):
  """RMS error on the held-out draws of `solver` on `times`, through its jnp twin (equal to the
  library sampler, `test_solver_twins_equal_the_library_samplers`; compiled once per NFE)."""
  with jax.enable_x64(True):
    return og.solver_error(den, proc, case['x_test'], times, solver,
                           jnp.asarray(case['ref_test']))


def test_dp_schedule_never_worse_than_uniform_log_snr(proc, den, gaussian_case):
  """On held-out draws, with the library's Euler (DDIM) sampler: the DP grid's error is at most
  the uniform log-SNR grid's at NFE 3, 4 and 6 (measured 0.3-0.5 x; 1.0 is the claim)."""
  case = gaussian_case
  with jax.enable_x64(True):
    found = og.dp_schedules(den, proc, case['x_opt'], steps=[3, 4, 6], solver='euler',
                            candidates=41, teacher_out=case['teacher'])
  for s in found:
    assert s.steps == len(s.times) and s.times[0] == 1.0
    assert np.all(np.diff(s.times) < 0) and s.times[-1] >= proc.t_min
    uniform = og.uniform_times(proc, s.steps, dtype=jnp.float64)
    dp_err = _held_out_error(proc, den, case, s.times, 'euler')
    uni_err = _held_out_error(proc, den, case, uniform, 'euler')
    assert dp_err <= uni_err, (s.steps, dp_err, uni_err)
    assert s.after <= s.before


def test_ld3_schedule_never_worse_than_uniform_and_deterministic(proc, den, gaussian_case):
  """LD3 for DPM-Solver++(2M) at NFE 4 (30 Adam steps): held-out error at most the uniform
  log-SNR grid's; the same key gives identical times; another key (another split and
  minibatches) other times."""
  case = gaussian_case
  run = lambda k: og.ld3_schedule(den, proc, case['x_opt'], steps=4, key=jax.random.key(k),
                                  solver='dpm_solver_pp_2m', iters=30, lr=0.1, batch_size=32,
                                  x_ref=case['teacher'][1])
  with jax.enable_x64(True):
    a, b, c = run(0), run(0), run(1)
  assert a.times == b.times
  assert a.times != c.times
  assert a.after < a.before
  uniform = og.uniform_times(proc, 4, dtype=jnp.float64)
  assert _held_out_error(proc, den, case, a.times, 'dpm_solver_pp_2m') <= _held_out_error(
      proc, den, case, uniform, 'dpm_solver_pp_2m')


@pytest.mark.slow
@pytest.mark.parametrize('solver', ['euler', 'dpm_solver_pp_3m', 'unipc_bh2'])
def test_ld3_never_worse_than_uniform_more_solvers(proc, den, gaussian_case, solver):
  case = gaussian_case
  for steps in (3, 5, 8):
    with jax.enable_x64(True):
      s = og.ld3_schedule(den, proc, case['x_opt'], steps=steps, key=jax.random.key(0),
                          solver=solver, iters=100, x_ref=case['teacher'][1])
    uniform = og.uniform_times(proc, steps, dtype=jnp.float64)
    assert _held_out_error(proc, den, case, s.times, solver) <= _held_out_error(
        proc, den, case, uniform, solver), (solver, steps)


@pytest.mark.slow
def test_dp_with_a_solver_teacher_matches_the_exact_teacher(proc, den, gaussian_case):
  """The default teacher (Heun through the candidates, 4 sub-steps) is close enough to the
  exact ODE that the DP picks the same grid."""
  case = gaussian_case
  with jax.enable_x64(True):
    exact = og.dp_schedule(den, proc, case['x_opt'], steps=5, candidates=41,
                           teacher_out=case['teacher'])
    heun = og.dp_schedule(den, proc, case['x_opt'], steps=5, candidates=41)
  assert exact.times == heun.times


# --- the artefact ----------------------------------------------------------------------------


def _schedule(proc, steps=4):
  times = tuple(float(t) for t in og.uniform_times(proc, steps, dtype=jnp.float32))
  return og.Schedule(times, 'dp', 'euler', steps, og.fingerprint(proc), 'rms', 0.5, 0.25,
                     {'candidates': 41})


def test_schedule_round_trip_and_refusals(tmp_path, proc):
  path = str(tmp_path / 'schedules' / 'euler_dp_nfe4.json')
  s = _schedule(proc)
  og.save_schedule(path, s)
  # A process built again (another instance, same schedule) matches the fingerprint.
  again = processes.DiscreteVP.from_name('linear', 1000)
  assert og.load_schedule(path, process=again, steps=4) == s

  def refused(match, **kwargs):
    with pytest.raises(ValueError, match=match) as e:
      og.load_schedule(kwargs.pop('p', path), **{'process': proc, 'steps': 4, **kwargs})
    assert '\n' not in str(e.value) and str(e.value).startswith(f'schedule {path}')

  refused('another process', process=processes.DiscreteVP.from_name('cosine', 1000))
  refused('another process', process=processes.VPLinear())
  refused('not steps=5', steps=5)
  record = json.load(open(path, encoding='utf-8'))
  for times, match in (([0.9, 0.95, 0.5, 0.1], 'not strictly decreasing'),
                       ([1.5, 0.5, 0.2, 0.1], 'outside'),
                       ([1.0, 0.5, 0.2, 1e-4], 'outside')):
    with open(path, 'w', encoding='utf-8') as f:
      json.dump({**record, 'times': times}, f)
    refused(match)
  with open(path, 'w', encoding='utf-8') as f:
    f.write('{not json')
  refused('cannot read')


def test_loaded_schedule_is_a_sampler_grid(tmp_path, proc, den):
  s = dataclasses.replace(_schedule(proc, 3), times=(1.0, 0.3, 0.02))
  og.save_schedule(str(tmp_path / 's.json'), s)
  loaded = og.load_schedule(str(tmp_path / 's.json'), process=proc, steps=3)
  box = {}

  def run(x):
    x0, box['info'] = samplers.SAMPLERS['unipc_bh2'](den, proc, x, steps=3, grid=loaded.times)
    return x0
  jax.eval_shape(run, jax.ShapeDtypeStruct((2, 2), jnp.float32))   # traced, not compiled
  assert box['info']['nfe'] == 3
