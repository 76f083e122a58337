"""UniPC (Zhao et al. 2023): the unified predictor-corrector, data-prediction multistep form,
compiled whole as one `lax.scan`.

Notation as in `dpm_solver`: `l = log(alpha / sigma)` is half our log-SNR, `h = l_(i+1) - l_i`,
`m_k = x0_hat(x_k, t_k)`, and the exact step is `x_(i+1) = (sigma_(i+1) / sigma_i) x_i +
alpha_(i+1) int_0^h e^(-(h - u)) x0_hat(l_i + u) du`. Write `hh = -h` and `B(h)` for the
variant's scale, `hh` ('bh1') or `e^hh - 1` ('bh2').

UniP-p (predictor, order p) keeps the DDIM term and adds `p - 1` scaled differences of past
predictions, `D_k = (m_(i-k) - m_i) / r_k` with `r_k = (l_(i-k) - l_i) / h < 0`:

  x_(i+1) = (sigma_(i+1) / sigma_i) x_i - alpha_(i+1) (e^hh - 1) m_i
            - alpha_(i+1) B(h) sum_k rho_k D_k,

where `rho` solves `sum_k rho_k r_k^(n-1) = hh n! phi_(n+1)(hh) / B(h)` for n = 1..p-1 (the
Taylor coefficients of the exact integral, so the local error is O(h^(p+1))). UniC-p (corrector)
evaluates `m_(i+1)` at the predicted point and recomputes the same step with one more difference,
`r_p = 1` at the new point, solving the p x p system: order p + 1, at no extra call, since
`m_(i+1)` is also the next step's model output (the prediction at `x_(i+1)` is not re-evaluated
at the corrected point). A one-unknown system (UniP-2, UniC-1) is replaced by its h -> 0 limit
`rho = 1/2` (as the authors' implementation does), which keeps the order and is where `B(h)`
makes a difference; with two or more unknowns the solve is exact and `B(h)` cancels. Warm-up:
step i (from 0) uses `min(order, i + 1)` (with UniC, step 0 is locally O(h³), so order 3 + UniC
is asymptotically bounded by 3 unless x0_hat barely moves at the start). The corrector is not
applied after the last grid step (that would cost an extra call), so NFE = steps. With
`final='data'` the step to sigma = 0 is `x0_hat` at the last grid time (1 call), as in every
sampler here.

Lower-order final steps (the authors' `lower_order_final`) are an option here, off by default
(step i of n then uses `min(order, i + 1, n - i)`); the default grid is 'auto'
(`samplers.defaults`), on which they measured worse; see `dpm_solver`'s module docstring.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.samplers import _common
from diffusion_jax.samplers import dpm_solver

VARIANTS = ('bh1', 'bh2')


def _solve_rho(nodes, b):
  """`rho` with `sum_k rho_k nodes_k^(n-1) = b_n`; the 1-unknown case uses its limit 1/2."""
  if len(nodes) == 0:
    return np.zeros(0)
  if len(nodes) == 1:
    return np.array([0.5])
  nodes = np.asarray(nodes, np.float64)
  R = nodes[None, :] ** np.arange(nodes.size)[:, None]
  return np.linalg.solve(R, np.asarray(b[:nodes.size], np.float64))


def unipc_coefficients(grid, order: int, variant: str, lower_order_final: bool = False):
  """Per scan step j (one per grid time but the last): predictor `(ap [N], wp [N, order])`
  from point j to j + 1 on `[m_j, m_(j-1), ...]`, and corrector `(ac, wc, wcn)` of point j
  (from j - 1) on `x_(j-1)`, `[m_(j-1), m_(j-2), ...]` and the new `m_j`; j = 0 is the
  identity."""
  lh = dpm_solver.half_log_snr(grid)
  alpha, sigma = np.asarray(grid.alpha, np.float64), np.asarray(grid.sigma, np.float64)
  n = lh.size - 1
  ap, wp = np.zeros(n), np.zeros((n, order))
  ac, wc, wcn = np.zeros(n), np.zeros((n, order)), np.zeros(n)
  ac[:1] = 1.0                      # no corrector at the first point (x_0 = x_T)
  orders = dpm_solver.step_orders(n, order, lower_order_final)
  for i in range(n):
    h = lh[i + 1] - lh[i]
    hh = -h
    p = int(orders[i])
    a_t = alpha[i + 1]
    base = a_t * h * float(dpm_solver.phi(1, hh))        # -alpha (e^hh - 1) on m_i
    B = hh if variant == 'bh1' else hh * float(dpm_solver.phi(1, hh))
    b = [hh * math.factorial(k) * float(dpm_solver.phi(k + 1, hh)) / B for k in range(1, p + 1)]
    r = [(lh[i - k] - lh[i]) / h for k in range(1, p)]
    # Predictor i -> i + 1 on [m_i, m_(i-1), ..., m_(i-p+1)].
    rho = _solve_rho(r, b)
    ap[i] = sigma[i + 1] / sigma[i]
    wp[i, 0] = base + a_t * B * sum(rho[k] / r[k] for k in range(p - 1))
    for k in range(1, p):
      wp[i, k] = -a_t * B * rho[k - 1] / r[k - 1]
    # Corrector of point i + 1, applied in scan step i + 1 (none after the last step).
    if i + 1 < n:
      rho_c = _solve_rho(r + [1.0], b)
      ac[i + 1] = sigma[i + 1] / sigma[i]
      wc[i + 1, 0] = base + a_t * B * (sum(rho_c[k] / r[k] for k in range(p - 1)) + rho_c[-1])
      for k in range(1, p):
        wc[i + 1, k] = -a_t * B * rho_c[k - 1] / r[k - 1]
      wcn[i + 1] = -a_t * B * rho_c[-1]
  return (ap, wp), (ac, wc, wcn)


def unipc_sample(denoiser, process, x_T, key=None, *, steps: int, order: int = 2,
                 variant: str = 'bh2', corrector: bool = True, cond=None, grid: str = 'auto',
                 t_min=None, t_max: float = 1.0, rho: float = 7.0, final: str = 'data',
                 lower_order_final: bool = False, return_trajectory: bool = False):
  """UniPC with UniP-`order` (1-3) and, if `corrector`, UniC (order + 1); see the module.

  One call per grid time but the last (`K - 1` for `K` grid times, = steps with
  `final='t_min'`), plus 1 for the step to data. `corrector=False` is UniP alone (for
  order 2 with 'bh2' it is DPM-Solver++(2M)'s update). Deterministic; `key` is unused.
  """
  del key
  if order not in (1, 2, 3):
    raise ValueError(f'unipc_sample: order={order}; choose 1, 2 or 3')
  if variant not in VARIANTS:
    raise ValueError(f'unipc_sample: variant={variant!r}; choose from {VARIANTS}')
  who = f'unipc_sample(order={order}, variant={variant!r})'
  g = _common.make_grid(process, steps, x_T, grid, t_min, t_max, rho, final)
  _common.require_finite_log_snr(g, who)
  dtype = x_T.dtype
  t = jnp.asarray(g.t, dtype)
  pred, corr = jax.tree.map(lambda a: jnp.asarray(a, dtype), unipc_coefficients(
      g, order, variant, lower_order_final))
  hist0 = jnp.zeros((order,) + x_T.shape, dtype)

  def step(carry, inputs):
    x_prev, x_pred, hist = carry          # hist = [m_(j-1), m_(j-2), ...]
    t_j, (ap, wp), (ac, wc, wcn) = inputs
    m, _ = denoiser(x_pred, t_j, cond)
    x = x_pred
    if corrector:
      x = ac * x_prev + dpm_solver.weighted_sum([wc[k] for k in range(order)] + [wcn],
                                                [hist[k] for k in range(order)] + [m])
    ms = [m] + [hist[k] for k in range(order - 1)]
    x_next = ap * x + dpm_solver.weighted_sum([wp[k] for k in range(order)], ms)
    return x, x_next, jnp.stack(ms)

  (_, x, _), traj = _common.scan(step, (x_T, x_T, hist0), (t[:-1], pred, corr),
                                 return_trajectory, x_of=lambda c: c[0])
  n = t.shape[0]
  if return_trajectory and n > 1:   # corrected x_0 .. x_(K-2), then the last (predicted) point
    traj = jnp.concatenate([traj[1:], x[None]], axis=0)
  return _common.finish(denoiser, x, t[-1], cond, g, traj, return_trajectory, n - 1, x_T)


unipc_bh1_sample = _common.preset(unipc_sample, 'unipc_bh1_sample', variant='bh1')
unipc_bh2_sample = _common.preset(unipc_sample, 'unipc_bh2_sample', variant='bh2')
