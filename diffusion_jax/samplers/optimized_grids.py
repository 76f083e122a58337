"""Optimised time grids: few-step schedules searched for a given denoiser, saved as artefacts.

A schedule is the decreasing sequence of `steps` times a sampler visits before its final step to
clean data (`final='data'`); every continuous sampler takes it as `grid=times`
(`grids.explicit_times`). Two searches, both on the probability-flow ODE from prior draws `x_T`:

* `dp_schedule`: dynamic programming over a fine candidate grid (GITS, Chen et al. 2024, "On the
  Trajectory Regularity of ODE-based Diffusion Sampling", §4 and Alg. 1). Candidates
  `c_0 > ... > c_(M-1)` are uniform in log-SNR between the process ends; a teacher solves the ODE
  through them (`teacher_trajectory`). The cost of a move `i -> j` is the error of one Euler /
  DDIM step (EDM's `y = x / alpha`, `s = sigma / alpha` form: `x_j = alpha_j x0_hat + sigma_j
  eps_hat`) from the teacher state at `c_i`, against the teacher state at `c_j`; node `M` is
  clean data (alpha 1, sigma 0, the teacher's endpoint), reached by the step every sampler
  makes, `x0_hat`. The schedule is the path from `c_0` (the prior's time) to data with exactly
  `steps` moves of least total cost; its `steps` visited candidates are the grid.
* `ld3_schedule`: LD3 (Tong et al. 2024, "Learning to Discretize Denoising Diffusion ODEs",
  §3, Eq. 6): the interior log-SNR points, `lam_k = lam_0 + span cumsum(softmax(xi))_k`
  (monotone and inside the range by construction), are optimised with Adam through a
  differentiable few-step solver (`solve`) to bring its output close to the teacher's ODE
  endpoint from the same `x_T`.

Deviations from the papers. GITS: the grid's last time is chosen by the DP too (the path ends at
clean data, not at a fixed `t_min`), the cost is the mean squared (or, `norm='l2'`, the mean L2)
error of the DDIM step, and the teacher is any library sampler on the candidates refined by
`substeps`. LD3: the distance is squared L2 in data space, not LPIPS; there is no slack term
(the paper's relaxed objective `min ||x' - x_ref||` over `x'` near `x_T`); the step count's
first point is fixed at `t_max`; the best grid on a held-out part of `x_T` is kept (the uniform
log-SNR start included), so the result is never worse than the start there.

Artefact: `Schedule` (times, method, solver, steps, process fingerprint, criterion before /
after, settings), `save_schedule` (JSON) and `load_schedule`, which refuses a schedule made for
another process (class name and log-SNR at `FINGERPRINT_T`, float64, to `FINGERPRINT_RTOL`),
another step count, non-decreasing times or times outside `[t_min, t_max]`, each with a one-line
error naming the file.
"""

import dataclasses
import functools
import json
import math
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax.samplers import dpm_solver
from diffusion_jax.samplers import grids as grids_lib

# Solvers with a differentiable twin here (`solve`), name -> (kind, order).
SOLVERS = {
    'euler': ('euler', 1),
    'ddim': ('euler', 1),
    'dpm_solver_pp_2m': ('pp', 2),
    'dpm_solver_pp_3m': ('pp', 3),
    'unipc_bh2': ('unipc', 2),
}
METHODS = ('dp', 'ld3', 'uniform')
NORMS = ('mse', 'l2')
FINGERPRINT_T = (0.05, 0.2, 0.4, 0.6, 0.8, 0.95)
FINGERPRINT_RTOL = 1e-6


# --- log-SNR spans and candidate grids --------------------------------------------------------


def candidate_times(process, n: int, *, t_min=None, t_max: float = 1.0,
                    log_snr_clip: float = 20.0, dtype=None) -> np.ndarray:
  """`n >= 2` times uniform in log-SNR from `t_max` to `t_min` (the library's 'log_snr' grid
  with both ends, clipped at `|lambda| = log_snr_clip`), decreasing, as numpy."""
  if int(n) != n or n < 2:
    raise ValueError(f'candidates={n} must be an integer >= 2')
  g = grids_lib.time_grid(process, int(n) - 1, 'log_snr', t_min=t_min, t_max=t_max,
                          final='t_min', log_snr_clip=log_snr_clip, dtype=dtype)
  return np.asarray(g.t)


def uniform_times(process, steps: int, *, t_min=None, t_max: float = 1.0,
                  log_snr_clip: float = 20.0, dtype=None) -> np.ndarray:
  """The library's uniform log-SNR grid of `steps` steps to data (`grid='log_snr'`)."""
  return np.asarray(grids_lib.time_grid(process, steps, 'log_snr', t_min=t_min, t_max=t_max,
                                        log_snr_clip=log_snr_clip, dtype=dtype).t)


def refine(process, times, substeps: int, dtype=None) -> np.ndarray:
  """`times` with `substeps - 1` points inserted uniformly in log-SNR inside each interval
  (the given times kept exactly): `(len(times) - 1) substeps + 1` decreasing times."""
  times = np.asarray(times, np.float64)
  if int(substeps) != substeps or substeps < 1:
    raise ValueError(f'substeps={substeps} must be an integer >= 1')
  dtype = dtype or jnp.result_type(float)
  with jax.ensure_compile_time_eval():
    lam = np.asarray(process.log_snr(jnp.asarray(times, dtype)), np.float64)
    frac = np.arange(1, substeps) / substeps
    inner = lam[:-1, None] + frac[None, :] * np.diff(lam)[:, None]          # [M - 1, S - 1]
    t_inner = np.asarray(process.t_of_log_snr(jnp.asarray(inner, dtype)), np.float64)
  out = np.concatenate([times[:-1, None], t_inner], axis=1).reshape(-1)
  return np.concatenate([out, times[-1:]])


# --- teacher ---------------------------------------------------------------------------------


def teacher_trajectory(denoiser, process, x_T, times, *, teacher: str = 'heun',
                       substeps: int = 4, cond=None):
  """The ODE solved by the library sampler `teacher` through `times` (decreasing, `times[0]`
  the time of `x_T`), each interval refined into `substeps` (`refine`), `final='t_min'`.

  Returns `(states [M, B, ...]` at `times`, `x0 [B, ...]`): the end point at clean data is
  `x0_hat` at the last time, the step to data every sampler makes.
  """
  from diffusion_jax import samplers  # pylint: disable=g-import-not-at-top  # (cycle)
  if teacher not in samplers.SAMPLERS:
    raise ValueError(f'teacher={teacher!r}: not a sampler name in SAMPLERS')
  fine = refine(process, times, substeps, dtype=x_T.dtype)
  sampler = samplers.SAMPLERS[teacher]

  @jax.jit
  def run(x):
    x_end, info = sampler(denoiser, process, x, steps=fine.size - 1, grid=tuple(fine),
                          final='t_min', return_trajectory=True, cond=cond)
    x0, _ = denoiser(x_end, jnp.asarray(fine[-1], x.dtype), cond)
    return info['trajectory'][::substeps], x0

  return run(x_T)


def rms_error(x, x_ref) -> float:
  """`sqrt(mean_b ||x_b - x_ref_b||²)`: `ode_err` of experiments/benchmark_samplers."""
  d = (x - x_ref).reshape(x.shape[0], -1)
  return float(jnp.sqrt(jnp.mean(jnp.sum(d * d, axis=-1))))


def sampler_error(denoiser, process, x_T, times, solver: str, x_ref, *, cond=None,
                  **options) -> float:
  """`rms_error` of the library sampler `solver` on the explicit grid `times` against `x_ref`."""
  from diffusion_jax import samplers  # pylint: disable=g-import-not-at-top
  sampler = samplers.SAMPLERS['euler' if solver == 'ddim' else solver]
  times = tuple(float(t) for t in times)
  x, _ = jax.jit(lambda x: sampler(denoiser, process, x, steps=len(times), grid=times,
                                   cond=cond, **options))(x_T)
  return rms_error(x, x_ref)


# --- dynamic programming (GITS) --------------------------------------------------------------


def dp_cost_matrix(denoiser, process, states, times, x0, *, norm: str = 'mse', cond=None):
  """`C [M + 1, M + 1]` (numpy float64): `C[i, j]` is the error of one DDIM step from the
  teacher state `states[i]` at `times[i]` to node `j` against the teacher there (node `M` is
  clean data, alpha 1, sigma 0, target `x0`); `inf` where `j <= i`. 'mse' averages the squared
  L2 error over the batch, 'l2' the L2 error. One denoiser call per candidate, one jit."""
  if norm not in NORMS:
    raise ValueError(f'norm={norm!r}; choose from {NORMS}')
  dtype = states.dtype
  t = jnp.asarray(times, dtype)
  alpha = jnp.concatenate([process.alpha(t), jnp.ones((1,), dtype)])        # [M + 1]
  sigma = jnp.concatenate([process.sigma(t), jnp.zeros((1,), dtype)])
  targets = jnp.concatenate([states, x0[None]], axis=0)                     # [M + 1, B, ...]

  def row(args):
    x_i, t_i = args
    x0_i, eps_i = denoiser(x_i, t_i, cond)

    def cost(a_j, s_j, target_j):
      d = (a_j * x0_i + s_j * eps_i - target_j).reshape(x_i.shape[0], -1)
      sq = jnp.sum(d * d, axis=-1)                                          # [B]
      return jnp.mean(sq) if norm == 'mse' else jnp.mean(jnp.sqrt(sq))
    return jax.vmap(cost)(alpha, sigma, targets)                            # [M + 1]

  rows = jax.jit(lambda s, t: jax.lax.map(row, (s, t)))(states, t)         # [M, M + 1]
  c = np.asarray(rows, np.float64)
  c = np.concatenate([c, np.full((1, c.shape[1]), np.inf)], axis=0)
  c[np.tril_indices(c.shape[0])] = np.inf
  return c


def dp_path(costs, moves: int):
  """The least-cost path `0 = n_0 < n_1 < ... < n_moves = N - 1` through the `N` nodes of
  `costs [N, N]` (`costs[i, j]` for `i -> j`), by dynamic programming (Bellman): `D_k(j) =
  min_(i < j) D_(k-1)(i) + C(i, j)`. Returns `(path [moves + 1] ints, total cost)`."""
  costs = np.asarray(costs, np.float64)
  n = costs.shape[0]
  if int(moves) != moves or not 1 <= moves <= n - 1:
    raise ValueError(f'steps={moves}: a path through {n} nodes has 1 to {n - 1} moves')
  best = np.full(n, np.inf)
  best[0] = 0.0
  back = np.zeros((moves + 1, n), np.int64)
  for k in range(1, moves + 1):
    total = best[:, None] + costs                                           # [i, j]
    back[k] = np.argmin(total, axis=0)
    best = total[back[k], np.arange(n)]
  path = [n - 1]
  for k in range(moves, 0, -1):
    path.append(int(back[k, path[-1]]))
  return np.asarray(path[::-1]), float(best[n - 1])


# --- the differentiable few-step solvers -----------------------------------------------------


def _phi(k: int, z):
  """`phi_k(z) = sum_j z^j / (j + k)!` in jnp: series where |z| < 1, recursion elsewhere (as
  `dpm_solver.phi`), differentiable in `z`."""
  series = sum(z**j * (1.0 / math.factorial(j + k)) for j in range(30))
  safe = jnp.where(jnp.abs(z) < 1.0, 1.0, z)
  rec = jnp.exp(safe)
  for m in range(1, k + 1):
    rec = (rec - 1.0 / math.factorial(m - 1)) / safe
  return jnp.where(jnp.abs(z) < 1.0, series, rec)


def _dot(weights, terms):
  """`sum_j weights[j] terms[j]` over the first `len(weights)` terms."""
  out = weights[0] * terms[0]
  for w, term in zip(weights[1:], terms[1:len(weights)], strict=True):
    out = out + w * term
  return out


def _solve_small(nodes, b):
  """`rho` with `sum_k rho_k nodes_k^(n-1) = b_n` (UniPC); one unknown: its limit 1/2."""
  if len(nodes) == 0:
    return []
  if len(nodes) == 1:
    return [0.5]
  r = jnp.stack(nodes)
  vander = r[None, :] ** jnp.arange(len(nodes))[:, None]
  rho = jnp.linalg.solve(vander, jnp.stack(b[:len(nodes)]))
  return [rho[k] for k in range(len(nodes))]


def solve(denoiser, process, x_T, times, solver: str = 'dpm_solver_pp_2m', *, cond=None,
          lower_order_final: bool = False):
  """The library sampler `solver` with `grid=times, final='data'` written as a jnp function of
  (possibly traced) `times [K]`, so that a loss can be differentiated through the grid.

  Same update formulas as `ode.euler_sample` (DDIM), `dpm_solver.dpm_solver_pp_sample` (2M, and
  3M with the exact quadratic moments) and `unipc.unipc_sample` (bh2, order 2, UniC), with
  the coefficients formed in jnp from `alpha, sigma, log_snr` at `times` instead of numpy.
  """
  if solver not in SOLVERS:
    raise ValueError(f'solver={solver!r}: differentiable twins exist for {sorted(SOLVERS)}')
  kind, order = SOLVERS[solver]
  t = jnp.asarray(times, x_T.dtype)
  alpha, sigma = process.alpha(t), process.sigma(t)
  lh = 0.5 * process.log_snr(t)
  n = t.shape[0] - 1
  orders = dpm_solver.step_orders(n, order, lower_order_final).tolist()
  x = x_T
  hist = []                      # [m_i, m_(i-1), ...]
  corr = None                    # UniPC: (x_(i-1), its factor, weights on hist, on the new m)
  for i in range(n):
    m, eps = denoiser(x, t[i], cond)
    h = lh[i + 1] - lh[i]
    if kind == 'euler':          # x_(i+1) = alpha_(i+1) x0_hat + sigma_(i+1) eps_hat
      x = alpha[i + 1] * m + sigma[i + 1] * eps
      continue
    p = orders[i]
    base = -jnp.expm1(-h)        # 1 - e^(-h) = h phi_1(-h)
    if kind == 'unipc':
      if corr is not None:       # UniC: point i recomputed with the new m_i
        x_prev, a_c, w_c, w_new = corr
        x = a_c * x_prev + _dot(w_c, hist) + w_new * m
      hist = [m] + hist[:order - 1]
      hh, B, a_t = -h, -base, alpha[i + 1]          # bh2: B(h) = e^hh - 1
      b = [hh * math.factorial(k) * _phi(k + 1, hh) / B for k in range(1, p + 1)]
      r = [(lh[i - k] - lh[i]) / h for k in range(1, p)]
      rho = _solve_small(r, b)
      w_p = [a_t * base + a_t * B * sum((rho[k] / r[k] for k in range(p - 1)), 0.0)]
      w_p += [-a_t * B * rho[k - 1] / r[k - 1] for k in range(1, p)]
      x_next = sigma[i + 1] / sigma[i] * x + _dot(w_p, hist)
      if i + 1 < n:              # the corrector of point i + 1, applied at the next step
        rho_c = _solve_small(r + [jnp.ones_like(h)], b)
        w_c = [a_t * base + a_t * B * (sum((rho_c[k] / r[k] for k in range(p - 1)), 0.0)
                                       + rho_c[-1])]
        w_c += [-a_t * B * rho_c[k - 1] / r[k - 1] for k in range(1, p)]
        corr = (x, sigma[i + 1] / sigma[i], w_c, -a_t * B * rho_c[-1])
      x = x_next
      continue
    hist = [m] + hist[:order - 1]
    if p == 1:
      w = [base]
    elif p == 2:                 # D = (1 + 1/(2r)) m_i - 1/(2r) m_(i-1), r = h_(i-1) / h
      r = (lh[i] - lh[i - 1]) / h
      w = [base * (1.0 + 0.5 / r), -base * 0.5 / r]
    else:                        # the quadratic through the last three m, integrated exactly
      nodes = jnp.stack([jnp.zeros_like(h), (lh[i - 1] - lh[i]) / h, (lh[i - 2] - lh[i]) / h])
      moments = jnp.stack([h * math.factorial(k) * _phi(k + 1, -h) for k in range(3)])
      w = jnp.linalg.solve(nodes[None, :] ** jnp.arange(3)[:, None], moments)
      w = [w[0], w[1], w[2]]
    x = sigma[i + 1] / sigma[i] * x + alpha[i + 1] * _dot(w, hist)
  x0, _ = denoiser(x, t[n], cond)
  return x0


# --- LD3 -------------------------------------------------------------------------------------


def _solve_sq_err(times, x_T, x_ref, cond, *, denoiser, process, solver, lower_order_final):
  out = solve(denoiser, process, x_T, times, solver, cond=cond,
              lower_order_final=lower_order_final)
  d = (out - x_ref).reshape(x_T.shape[0], -1)
  return jnp.mean(jnp.sum(d * d, axis=-1))


# Compiled once per (denoiser, process, solver, number of times, batch shape): the grid is traced.
_solve_sq_err_jit = jax.jit(_solve_sq_err, static_argnames=(
    'denoiser', 'process', 'solver', 'lower_order_final'))


def solver_error(denoiser, process, x_T, times, solver: str, x_ref, *, cond=None,
                 lower_order_final: bool = False) -> float:
  """`rms_error` of `solve(..., times, solver)` against `x_ref` (equal to `sampler_error` to
  float precision, with one compile per step count instead of one per grid)."""
  return math.sqrt(float(_solve_sq_err_jit(
      jnp.asarray(times, x_T.dtype), x_T, x_ref, cond, denoiser=denoiser, process=process,
      solver=solver, lower_order_final=lower_order_final)))


def _t_of_log_snr(process, lam):
  """`process.t_of_log_snr(lam)` with the inverse function's derivative `1 / lambda'(t)` as its
  gradient (some inverses bisect, which has none); its value is the inverse's, bit for bit."""
  t = jax.lax.stop_gradient(process.t_of_log_snr(lam))
  slope = jax.lax.stop_gradient(jax.vmap(jax.grad(lambda s: process.log_snr(s)))(t))
  return t + (lam - jax.lax.stop_gradient(lam)) / slope


def ld3_times(process, logits, lam_ends, t_max: float):
  """The `K = len(logits)` grid times of LD3's parameters: `t_0 = t_max`, then `lam_k = lam_0 +
  (lam_1 - lam_0) cumsum(softmax(logits))_k` for k = 1..K-1 (the last fraction is the gap left
  below `t_min`), mapped to times (differentiable; `_t_of_log_snr`)."""
  lam0, lam1 = lam_ends
  frac = jnp.cumsum(jax.nn.softmax(logits))[:-1]
  lam = lam0 + (lam1 - lam0) * frac
  return jnp.concatenate([jnp.asarray([t_max], lam.dtype), _t_of_log_snr(process, lam)])


def _ld3_loss(logits, x, ref, cond, lam_ends, t_max, **static):
  return _solve_sq_err(ld3_times(static['process'], logits, lam_ends, t_max), x, ref, cond,
                       **static)


@functools.partial(jax.jit, static_argnames=('denoiser', 'process', 'solver', 'lower_order_final',
                                             't_max', 'iters', 'batch_size'))
def _ld3_optimise(logits, lr, key, xt, rt, xh, rh, cond, lam_ends, *, t_max, iters, batch_size,
                  **static):
  """Adam on LD3's logits over `iters` minibatches of the training draws `xt` (targets `rt`),
  keeping the logits of least held-out loss (`xh`, `rh`). Compiled once per configuration."""
  opt = optax.adam(lr)
  n_train = xt.shape[0]
  loss = functools.partial(_ld3_loss, cond=cond, lam_ends=lam_ends, t_max=t_max, **static)

  def body(carry, k):
    logits, state, best_logits, best_val = carry
    idx = jax.random.choice(k, n_train, (batch_size,), replace=False) \
        if batch_size < n_train else jnp.arange(n_train)
    grad = jax.grad(loss)(logits, xt[idx], rt[idx])
    updates, state = opt.update(grad, state, logits)
    logits = optax.apply_updates(logits, updates)
    val = loss(logits, xh, rh)
    better = val < best_val
    return (logits, state, jnp.where(better, logits, best_logits),
            jnp.where(better, val, best_val)), None

  start = (logits, opt.init(logits), logits, loss(logits, xh, rh))
  (_, _, best_logits, best_val), _ = jax.lax.scan(body, start, jax.random.split(key, iters))
  return best_logits, best_val


# --- the artefact ----------------------------------------------------------------------------


def fingerprint(process) -> dict:
  """Class name and `log_snr` (float64) at `FINGERPRINT_T`, with `t_min`: what `load_schedule`
  compares to tell processes apart."""
  with jax.enable_x64(True):
    lam = np.asarray(process.log_snr(jnp.asarray(FINGERPRINT_T, jnp.float64)), np.float64)
  return {'class': type(process).__name__, 't': list(FINGERPRINT_T),
          'log_snr': [float(v) for v in lam], 't_min': float(process.t_min)}


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A searched grid of `steps` decreasing times (`grid=times` of any sampler, `final='data'`).

  `criterion` names what `before` (uniform log-SNR grid) and `after` (this grid) measure,
  `settings` how it was found."""
  times: tuple[float, ...]
  method: str
  solver: str
  steps: int
  process: dict
  criterion: str
  before: float
  after: float
  settings: dict = dataclasses.field(default_factory=dict)


def save_schedule(path: str, schedule: Schedule) -> None:
  """Writes `schedule` as JSON (times at full float64 precision; `load_schedule` reads it)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  record = dataclasses.asdict(schedule)
  record['times'] = [float(t) for t in schedule.times]
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=2)


def load_schedule(path: str, *, process, steps: int, t_min=None, t_max: float = 1.0) -> Schedule:
  """The schedule `save_schedule` wrote, refused with a one-line error naming `path` if it was
  made for another process (fingerprint), has another step count, or its times are not strictly
  decreasing or leave `[t_min, t_max]` (`t_min`: the process's)."""
  try:
    with open(path, encoding='utf-8') as f:
      record = json.load(f)
    fields = {f.name for f in dataclasses.fields(Schedule)}
    schedule = Schedule(**{k: v for k, v in record.items() if k in fields})
  except (OSError, ValueError, TypeError) as e:
    raise ValueError(f'schedule {path}: cannot read it ({type(e).__name__}: '
                     f'{str(e).splitlines()[0] if str(e) else ""})') from None
  want, got = fingerprint(process), schedule.process or {}
  same = got.get('class') == want['class'] and len(got.get('log_snr', ())) == len(
      want['log_snr']) and np.allclose(got['log_snr'], want['log_snr'], rtol=FINGERPRINT_RTOL,
                                       atol=FINGERPRINT_RTOL, equal_nan=True)
  if not same:
    raise ValueError(f'schedule {path}: made for another process ({got.get("class")}, log_snr '
                     f'{got.get("log_snr")} at t = {got.get("t")}), not this '
                     f'{want["class"]} ({want["log_snr"]})')
  if schedule.steps != steps or len(schedule.times) != steps:
    raise ValueError(f'schedule {path}: has {len(schedule.times)} times for steps='
                     f'{schedule.steps}, not steps={steps}')
  t = np.asarray(schedule.times, np.float64)
  if t.ndim != 1 or not np.all(np.isfinite(t)) or np.any(np.diff(t) >= 0):
    raise ValueError(f'schedule {path}: times are not strictly decreasing: {t.tolist()}')
  lo = float(process.t_min if t_min is None else t_min)
  if t[-1] < lo - 1e-9 or t[0] > t_max + 1e-9:
    raise ValueError(f'schedule {path}: times run from {t[0]:.6g} to {t[-1]:.6g}, outside '
                     f'[t_min, t_max] = [{lo:.6g}, {t_max:.6g}] of this process')
  return dataclasses.replace(schedule, times=tuple(float(v) for v in t))


# --- the searches ----------------------------------------------------------------------------


def _lam_ends(process, t_min, t_max, log_snr_clip, dtype):
  ends = candidate_times(process, 2, t_min=t_min, t_max=t_max, log_snr_clip=log_snr_clip,
                         dtype=dtype)
  with jax.ensure_compile_time_eval():
    return np.asarray(process.log_snr(jnp.asarray(ends, dtype)), np.float64)


def dp_schedules(denoiser, process, x_T, *, steps: Sequence[int], solver: str = 'euler',
                 candidates: int = 121, teacher: str = 'heun', substeps: int = 4,
                 norm: str = 'mse', cond=None, t_min=None, t_max: float = 1.0,
                 log_snr_clip: float = 20.0, teacher_out=None) -> list[Schedule]:
  """`dp_schedule` for several step counts from one teacher solve and one cost matrix."""
  dtype = x_T.dtype
  cand = candidate_times(process, candidates, t_min=t_min, t_max=t_max,
                         log_snr_clip=log_snr_clip, dtype=dtype)
  states, x0 = teacher_out if teacher_out is not None else teacher_trajectory(
      denoiser, process, x_T, cand, teacher=teacher, substeps=substeps, cond=cond)
  costs = dp_cost_matrix(denoiser, process, states, cand, x0, norm=norm, cond=cond)
  settings = dict(candidates=int(candidates), teacher=teacher, substeps=int(substeps),
                  norm=norm, batch=int(x_T.shape[0]), log_snr_clip=float(log_snr_clip))
  out = []
  for k in steps:
    path, total = dp_path(costs, int(k))
    times = cand[path[:-1]]
    uniform = uniform_times(process, int(k), t_min=t_min, t_max=t_max,
                            log_snr_clip=log_snr_clip, dtype=dtype)
    errs = [solver_error(denoiser, process, x_T, g, solver, x0, cond=cond)
            for g in (uniform, times)]
    out.append(Schedule(tuple(float(v) for v in times), 'dp', solver, int(k),
                        fingerprint(process), f'rms error of {solver} vs the teacher endpoint',
                        errs[0], errs[1], dict(settings, dp_cost=total)))
  return out


def dp_schedule(denoiser, process, x_T, *, steps: int, **kwargs) -> Schedule:
  """GITS's dynamic-programming schedule of `steps` steps (see the module docstring).

  `x_T [B, ...]`: prior draws at `t_max`; `candidates` times uniform in log-SNR; `teacher` a
  library sampler run on them refined `substeps` times; `norm` the cost ('mse': mean squared
  error of a DDIM step, 'l2': mean L2 error, GITS's); `solver` only names the sampler whose
  error the record reports before (uniform log-SNR) and after."""
  return dp_schedules(denoiser, process, x_T, steps=[steps], **kwargs)[0]


def ld3_schedule(denoiser, process, x_T, *, steps: int, key, solver: str = 'dpm_solver_pp_2m',
                 iters: int = 200, lr: float = 0.05, holdout: float = 0.25,
                 batch_size: int | None = None, teacher: str = 'heun', teacher_steps: int = 480,
                 x_ref=None, cond=None, t_min=None, t_max: float = 1.0,
                 log_snr_clip: float = 20.0, remainder: float = 1e-3,
                 lower_order_final: bool = False) -> Schedule:
  """LD3's learned schedule of `steps` steps for `solver` (see the module docstring).

  `key` splits `x_T [B, ...]` into a training part and a held-out fraction `holdout`, and draws
  the training minibatches (`batch_size`, all of the training part by default); the same key
  gives the same times. `x_ref`: the ODE endpoints of `x_T` (default: the `teacher` sampler on a
  uniform log-SNR grid of `teacher_steps`, to data). Adam (`lr`) for `iters` steps on the
  softmax logits, started at the uniform log-SNR grid (the last gap below the grid, which the
  uniform grid has 0, starts at `remainder` of the span); the grid with the least held-out
  error is returned, the exact uniform grid counted. `criterion`: the held-out RMS error.
  """
  if solver not in SOLVERS:
    raise ValueError(f'solver={solver!r}: ld3 needs a differentiable twin, one of '
                     f'{sorted(SOLVERS)}')
  if int(steps) != steps or steps < 1:
    raise ValueError(f'steps={steps} must be an integer >= 1')
  if not 0.0 < holdout < 1.0 or x_T.shape[0] < 2:
    raise ValueError(f'holdout={holdout} must lie in (0, 1), and x_T needs >= 2 draws')
  dtype = x_T.dtype
  if x_ref is None:
    grid = uniform_times(process, teacher_steps, t_min=t_min, t_max=t_max,
                         log_snr_clip=log_snr_clip, dtype=dtype)
    _, x_ref = teacher_trajectory(denoiser, process, x_T, grid, teacher=teacher, substeps=1,
                                  cond=cond)
  k_split, k_batch = jax.random.split(key)
  perm = jax.random.permutation(k_split, x_T.shape[0])
  n_hold = max(1, int(round(holdout * x_T.shape[0])))
  hold, train = perm[:n_hold], perm[n_hold:]
  xh, rh, xt, rt = x_T[hold], x_ref[hold], x_T[train], x_ref[train]
  uniform = uniform_times(process, steps, t_min=t_min, t_max=t_max, log_snr_clip=log_snr_clip,
                          dtype=dtype)
  settings = dict(iters=int(iters), lr=float(lr), holdout=float(holdout),
                  batch_size=batch_size, teacher=teacher, teacher_steps=int(teacher_steps),
                  batch=int(x_T.shape[0]), log_snr_clip=float(log_snr_clip),
                  remainder=float(remainder), lower_order_final=bool(lower_order_final))

  static = dict(denoiser=denoiser, process=process, solver=solver,
                lower_order_final=lower_order_final)
  before = math.sqrt(float(_solve_sq_err_jit(jnp.asarray(uniform, dtype), xh, rh, cond,
                                             **static)))
  if steps == 1:
    return Schedule(tuple(float(v) for v in uniform), 'ld3', solver, 1, fingerprint(process),
                    f'held-out rms error of {solver} vs the teacher endpoint', before, before,
                    settings)
  lam_ends = jnp.asarray(_lam_ends(process, t_min, t_max, log_snr_clip, dtype), dtype)
  logits0 = jnp.concatenate([jnp.zeros(steps - 1, dtype), jnp.asarray(
      [math.log(remainder * (steps - 1) / (1.0 - remainder))], dtype)])
  bs = xt.shape[0] if batch_size is None else min(int(batch_size), xt.shape[0])
  best_logits, best_val = _ld3_optimise(logits0, jnp.asarray(lr, dtype), k_batch, xt, rt, xh,
                                        rh, cond, lam_ends, t_max=float(t_max), iters=int(iters),
                                        batch_size=bs, **static)
  times = np.asarray(ld3_times(process, best_logits, lam_ends, t_max), np.float64)
  after = math.sqrt(float(best_val))
  ok = np.all(np.diff(np.asarray(times, dtype)) < 0)
  if after >= before or not ok:
    times, after = uniform, before
  return Schedule(tuple(float(v) for v in times), 'ld3', solver, int(steps),
                  fingerprint(process), f'held-out rms error of {solver} vs the teacher endpoint',
                  before, after, settings)
