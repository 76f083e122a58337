"""iPNDM (Zhang & Chen 2023) against closed forms on Gaussian data (DESIGN §6): measured
convergence order, a step-by-step float64 reference written here from the textbook
Adams-Bashforth formulas, equivalences (order 1 = Euler / DDIM; 'variable' = 'fixed' on a grid
uniform in s), and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import analytic
from diffusion_jax import processes
from diffusion_jax import samplers
from diffusion_jax.samplers import ipndm

import sampler_testing as st

STEPS = 7          # 7 grid times, 6 scan steps: orders 1, 2, 3, 4, 4, 4 (order 4, warm-up)
BATCH = 6


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


def _den(proc):
  return analytic.gaussian_denoiser(jnp.asarray(st.MU), jnp.asarray(st.S2), proc)


def _x_T(proc, seed=1):
  return proc.prior_sample(jax.random.key(seed), (BATCH, st.MU.size), jnp.float64)


# --- convergence order ---------------------------------------------------------------------------


@pytest.mark.parametrize('order,lo,hi', [(1, 0.8, 1.3), (2, 1.75, 2.3), (3, 2.65, 3.3),
                                         (4, 3.5, 4.3)])
def test_convergence_order_variable_step(order, lo, hi):
  """Slope of log(max error) between 64 and 256 Karras steps (rho 7), VP-linear, float64, against
  the closed-form PF-ODE endpoint at t_min (final='t_min'). Theory: order p.

  Measured: 0.99, 1.94, 2.88, 3.79; local slopes over 8..512 steps approach p slowly
  (order 4: 2.1, 2.9, 3.5, 3.7, 3.9, 3.9) because the first steps are huge in s = sigma/alpha
  (157 -> ...), so lower bounds are ~0.3 below p; each upper bound lies below the next order's
  lower bound, so a method of the wrong order fails. Asymptotically the lower-order warm-up
  steps would bound the global error by O(h²), but they lie at high noise, where eps_hat
  barely changes with s, and that term is far below the ones measured here.
  """
  proc = processes.make_process('vp_linear')
  steps = [64, 256]
  errors = st.endpoint_errors(ipndm.ipndm_sample, proc, steps, grid='karras', batch=8,
                              order=order, variant='variable')
  measured = st.fitted_order(steps, errors)
  assert lo < measured < hi, (measured, errors)


# --- step-by-step reference ----------------------------------------------------------------------


def np_eps(x, a, s):
  """E[eps | x_t] for x0 ~ N(MU, diag(S2)), x_t = a x0 + s eps (numpy)."""
  x0 = st.MU + a * st.S2 / (a * a * st.S2 + s * s) * (x - a * st.MU)
  return (x - a * x0) / s


def np_x0(x, a, s):
  return st.MU + a * st.S2 / (a * a * st.S2 + s * s) * (x - a * st.MU)


def lagrange_integral(nodes, j, lo, hi):
  """int_lo^hi L_j(s) ds for the Lagrange basis polynomial L_j of `nodes` (raw s units)."""
  others = [n for k, n in enumerate(nodes) if k != j]
  basis = np.poly1d(np.poly(others)) / np.prod([nodes[j] - n for n in others])
  antiderivative = np.polyint(basis)
  return antiderivative(hi) - antiderivative(lo)


def ref_ipndm(x, g, order, variant, lower_order_final=False):
  """iPNDM on `dy/ds = eps`, `y = x / alpha`, `s = sigma / alpha` (Zhang & Chen 2023; Karras
  et al. 2022, Eq. 4). Step i of n uses order p = min(order, i + 1) (and <= n - i with
  lower_order_final). 'fixed': y' = y + h (b . e) with the textbook Adams-Bashforth b:
  p = 1: e0; p = 2: (3 e0 - e1) / 2; p = 3: (23 e0 - 16 e1 + 5 e2) / 12; p = 4: (55 e0 - 59 e1
  + 37 e2 - 9 e3) / 24 (e0 the newest). 'variable': y' = y + sum_j (int_s^s' L_j) e_j, the
  interpolating polynomial through the last p slopes at their s, integrated over the step."""
  a, sg = np.asarray(g.alpha), np.asarray(g.sigma)
  s = sg / a
  n = len(s) - 1
  out, es = [x], []
  for i in range(n):
    es.insert(0, np_eps(x, a[i], sg[i]))
    p = min(order, i + 1, n - i) if lower_order_final else min(order, i + 1)
    h = s[i + 1] - s[i]
    y = x / a[i]
    if variant == 'fixed':
      e = es
      if p == 1:
        y = y + h * e[0]
      elif p == 2:
        y = y + h * (3.0 * e[0] - e[1]) / 2.0
      elif p == 3:
        y = y + h * (23.0 * e[0] - 16.0 * e[1] + 5.0 * e[2]) / 12.0
      else:
        y = y + h * (55.0 * e[0] - 59.0 * e[1] + 37.0 * e[2] - 9.0 * e[3]) / 24.0
    else:
      nodes = [s[i - j] for j in range(p)]
      y = y + sum(lagrange_integral(nodes, j, s[i], s[i + 1]) * es[j] for j in range(p))
    x = a[i + 1] * y
    out.append(x)
  if g.to_data:
    out.append(np_x0(x, a[-1], sg[-1]))
  return np.stack(out)


def _sample(proc, x_T, **kw):
  kw.setdefault('grid', 'karras')     # the reference loops below are written on Karras grids
  return ipndm.ipndm_sample(_den(proc), proc, x_T, steps=STEPS, return_trajectory=True, **kw)


@pytest.mark.parametrize('variant,lower_order_final', [
    ('fixed', False), ('variable', False), ('variable', True),
    pytest.param('fixed', True, marks=pytest.mark.slow)])
def test_matches_adams_bashforth_step_by_step(variant, lower_order_final):
  """The whole trajectory on a 7-point Karras grid (rho 7: consecutive steps in s shrink by
  factors 2.3 to 6.7), VP-linear, order 4 with its warm-up (and lower-order final steps),
  float64, against `ref_ipndm`. Both sides evaluate the same arithmetic in float64 up to
  reordering: measured <= 9e-15 relative to the state's scale (alpha(1) ~ 0.006 makes the
  first states ~150); tolerance 1e-10."""
  proc = processes.make_process('vp_linear')
  x_T = _x_T(proc)
  g = samplers.time_grid(proc, STEPS, 'karras', dtype=jnp.float64)
  _, info = _sample(proc, x_T, order=4, variant=variant, lower_order_final=lower_order_final)
  ref = ref_ipndm(np.asarray(x_T), g, 4, variant, lower_order_final)
  lib = np.asarray(info['trajectory'])
  assert lib.shape == ref.shape == (STEPS + 1, BATCH, st.MU.size)
  scale = np.maximum(1.0, np.max(np.abs(ref), axis=(1, 2)))
  err = np.max(np.abs(lib - ref), axis=(1, 2)) / scale
  assert np.all(err <= 1e-10), err
  assert np.max(np.abs(ref[-1] - ref[0])) > 0.1          # the reference really moves


def test_variants_agree_on_a_grid_uniform_in_s_and_differ_elsewhere():
  """Karras with rho = 1 is uniform in s = sigma / alpha: there the variable-step weights are
  the constant ones (to rounding of the grid's s, ~1e-13 relative; tolerance 1e-9). On the
  rho = 7 grid the variants differ (> 1e-3: both are checked against the reference above)."""
  proc = processes.make_process('vp_linear')
  x_T = _x_T(proc)
  g = samplers.time_grid(proc, STEPS, 'karras', rho=1.0, dtype=jnp.float64)
  h = np.diff(g.sigma / g.alpha)
  assert np.ptp(h) < 1e-9 * np.abs(h).max(), h            # really uniform in s
  traj = {v: np.asarray(_sample(proc, x_T, order=4, variant=v, rho=1.0)[1]['trajectory'])
          for v in ('fixed', 'variable')}
  np.testing.assert_allclose(traj['variable'], traj['fixed'], rtol=1e-9, atol=1e-9)
  g7 = samplers.time_grid(proc, STEPS, 'karras', dtype=jnp.float64)
  x = np.asarray(x_T)
  diff = np.abs(ref_ipndm(x, g7, 4, 'variable')[-2] - ref_ipndm(x, g7, 4, 'fixed')[-2]).max()
  assert diff > 1e-3, diff


@pytest.mark.parametrize('variant', ['variable', 'fixed'])
def test_order_1_is_euler(variant):
  """Order 1 is Euler in s = DDIM (`euler_sample`) on the same grid: the same trajectory up to
  float64 rounding of the two arrangements (`a x + alpha' h eps` vs `alpha' x0 + sigma' eps`),
  amplified by at most 1 / alpha(1) ~ 150; rtol 1e-10."""
  proc = processes.make_process('vp_linear')
  x_T = _x_T(proc)
  kw = dict(steps=STEPS, grid='karras', return_trajectory=True)
  x, info = ipndm.ipndm_sample(_den(proc), proc, x_T, order=1, variant=variant, **kw)
  ref, ref_info = samplers.euler_sample(_den(proc), proc, x_T, **kw)
  np.testing.assert_allclose(info['trajectory'], ref_info['trajectory'], rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(x, ref, rtol=1e-10, atol=1e-10)
  assert info['nfe'] == ref_info['nfe'] == STEPS


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize('kw,match', [
    ({'order': 0}, r'ipndm_sample: order=0; choose from \(1, 2, 3, 4\)'),
    ({'order': 5}, r'ipndm_sample: order=5'),
    ({'variant': 'bh2'}, r"ipndm_sample: variant='bh2'; choose from \('variable', 'fixed'\)"),
])
def test_bad_options_are_refused_in_one_line(kw, match):
  proc = processes.make_process('vp_linear')
  with pytest.raises(ValueError, match=match) as e:
    ipndm.ipndm_sample(_den(proc), proc, jnp.ones((2, 3)), steps=4, **kw)
  assert '\n' not in str(e.value)


def test_zero_terminal_snr_is_refused():
  """The linear interpolant has alpha(1) = 0: s = sigma / alpha is infinite at t = 1, for any
  prediction kind, so a grid starting there is refused in one line."""
  proc = processes.make_process('linear')
  with pytest.raises(ValueError, match=r'ipndm_sample.*infinite at t = 1') as e:
    ipndm.ipndm_sample(_den(proc), proc, jnp.ones((2, 3)), steps=4, grid='t')
  assert '\n' not in str(e.value)
