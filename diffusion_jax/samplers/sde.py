"""Samplers for the reverse-time SDE, each compiled whole as one `lax.scan`.

The forward process `x_t = alpha x0 + sigma eps` is the SDE `dx = f x dt + g dW` with
`f = d log alpha / dt` and `g² = d sigma² / dt - 2 f sigma²` (`process.drift_coefficient`,
`process.diffusion_squared`). Its reverse in time (Song et al. 2021, Eq. 6) is

  dx = [f x - g² score] dt + g dW̄,   score = grad log p_t(x) = -eps_hat / sigma.

* `euler_maruyama_sample`: Euler–Maruyama on that SDE between grid times.
* `pc_sample`: predictor–corrector (Song et al. 2021, Alg. 1; App. G, Algs. 2–5): a predictor
  step of the reverse SDE (reverse diffusion or Euler–Maruyama), preceded at every grid level by
  `corrector_steps` Langevin MCMC steps whose size is set by a signal-to-noise ratio `snr`.

With `final='data'` the SDE samplers end with the noise-free step to data: `x0_hat` at the last
grid time (Song et al.'s "denoising" last step, the limit of every update as sigma_next -> 0).
"""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import parameterization
from diffusion_jax.samplers import _common

PREDICTORS = ('reverse_diffusion', 'euler_maruyama')


def _sde_coefficients(process, t: np.ndarray, who: str):
  """`(f, g²)` at the grid times (concrete numpy); refuses infinite values (alpha = 0)."""
  with jax.ensure_compile_time_eval():
    tt = jnp.asarray(t)
    f = np.asarray(process.drift_coefficient(tt))
    g2 = np.asarray(process.diffusion_squared(tt))
  if not (np.all(np.isfinite(f)) and np.all(np.isfinite(g2))):
    raise ValueError(f'{who}: the SDE coefficients f, g² are infinite at some grid time (t = '
                     f'{t[~(np.isfinite(f) & np.isfinite(g2))]}, where alpha = 0); use t_max < 1')
  return f, g2


def _per_example_norm(x):
  return jnp.sqrt(jnp.sum(jnp.square(x).reshape(x.shape[0], -1), axis=-1))   # [B]


def euler_maruyama_sample(denoiser, process, x_T, key=None, *, steps: int, cond=None,
                          grid: str = 't', t_min=None, t_max: float = 1.0, rho: float = 7.0,
                          final: str = 'data', return_trajectory: bool = False):
  """Euler–Maruyama on the reverse-time SDE (Song et al. 2021, Eq. 6), from `t_i` to `t_i - h`:

  `x <- x - h (f x + g² eps_hat / sigma) + g sqrt(h) z`, with `f`, `g²`, `eps_hat`, `sigma` at
  `t_i` and `z ~ N(0, I)`. With `final='data'` the last step returns `x0_hat` (no noise).
  Calls: `steps` (one per step, the step to data included). Needs `key`.
  """
  _common.need_key(key, 'euler_maruyama_sample', 'it draws fresh noise at every step')
  g = _common.make_grid(process, steps, x_T, grid, t_min, t_max, rho, final)
  _common.check_terminal_snr(denoiser, g.alpha[0], 'euler_maruyama_sample')
  f, g2 = _sde_coefficients(process, g.t[:-1], 'euler_maruyama_sample')
  dtype = x_T.dtype
  t, _, sigma, _ = _common.as_arrays(g, dtype)
  h = jnp.asarray(np.float64(g.t[:-1]) - np.float64(g.t[1:]), dtype)
  f, g2 = jnp.asarray(f, dtype), jnp.asarray(g2, dtype)
  keys = jax.random.split(key, max(t.shape[0] - 1, 1))[:t.shape[0] - 1]

  def step(x, inputs):
    t_i, s_i, h_i, f_i, g2_i, k = inputs
    _, eps = denoiser(x, t_i, cond)
    drift = f_i * x + g2_i / s_i * eps            # = f x - g² score
    return x - h_i * drift + jnp.sqrt(g2_i * h_i) * jax.random.normal(k, x.shape, x.dtype)

  xs = (t[:-1], sigma[:-1], h, f, g2, keys)
  x, traj = _common.scan(step, x_T, xs, return_trajectory)
  return _common.finish(denoiser, x, t[-1], cond, g, traj, return_trajectory, t.shape[0] - 1, x_T)


def pc_sample(denoiser, process, x_T, key=None, *, steps: int, cond=None, grid: str = 't',
              t_min=None, t_max: float = 1.0, rho: float = 7.0, final: str = 'data',
              predictor: str = 'reverse_diffusion', corrector_steps: int = 1, snr: float = 0.16,
              snr_norm: str = 'batch', return_trajectory: bool = False):
  """Predictor–corrector sampling (Song et al. 2021, Alg. 1; App. G, Algs. 2–5).

  Every update step starts at a grid level `t_i` with `corrector_steps` Langevin steps
  (Algs. 4–5): `g = score(x, t_i) = -eps_hat / sigma_i`, `z ~ N(0, I)`,
  `e = 2 a_i (snr ||z|| / ||g||)²`, `x <- x + e g + sqrt(2 e) z`. `snr_norm='batch'` (the
  default) averages the per-example norms `||.||` (over all non-batch dimensions) over the
  batch, as Song et al.'s code does; 'example' uses each example's own, as the algorithms are
  written, which makes samples independent of the batch but is unstable for low-dimensional
  data: there `||g||` comes close to 0 near a mode with real probability, and the step `e`
  explodes (on a 2-D mixture: 2% of samples lost, component spread doubled). For
  high-dimensional data the two agree (the norms concentrate). Then the predictor moves to
  `t_{i+1}`:

  * 'reverse_diffusion' (App. E; Algs. 2–3's predictor): with the forward kernel between levels,
    `x_i = r x_{i+1} + G z`, `r = alpha_i / alpha_{i+1}`, `G² = sigma_i² - r² sigma_{i+1}²`,
    `x <- (2 - r) x + G² score + G z` (VE: `r = 1`, `G² = sigma_i² - sigma_{i+1}²`; DDPM:
    `r = sqrt(1 - beta_i)`, `G² = beta_i`, exactly the paper's);
  * 'euler_maruyama': the step of `euler_maruyama_sample`.

  `a_i` generalises the paper's `alpha_i = 1 - beta_i` (VP) and `1` (VE) to any process as the
  squared signal ratio of that same forward step, `a_i = (alpha(t_i) / alpha(t_{i+1}))²` (the
  next level is t = 0 for the last one when `final='data'`); for DDPM on all T steps this is
  `1 - beta_i` exactly, for VE and EDM it is 1.

  The corrector runs before the predictor (as Song et al.'s code orders them), so with
  `final='data'` the last level's predictor is the noise-free step to data (`x0_hat`). Calls:
  `steps * (1 + corrector_steps)` for either `final`. Needs `key`.
  """
  who = 'pc_sample'
  _common.need_key(key, who, 'its predictor and corrector draw fresh noise')
  if predictor not in PREDICTORS:
    raise ValueError(f'{who}: unknown predictor {predictor!r}; choose from {PREDICTORS}')
  if int(corrector_steps) != corrector_steps or corrector_steps < 0:
    raise ValueError(f'{who}: corrector_steps={corrector_steps} must be an integer >= 0')
  if snr < 0:
    raise ValueError(f'{who}: snr={snr} must be >= 0')
  if snr_norm not in ('batch', 'example'):
    raise ValueError(f"{who}: snr_norm={snr_norm!r}; choose 'batch' or 'example'")
  corrector_steps = int(corrector_steps)
  g = _common.make_grid(process, steps, x_T, grid, t_min, t_max, rho, final)
  _common.check_terminal_snr(denoiser, g.alpha[0], who)
  if np.any(g.alpha == 0):
    raise ValueError(f'{who}: a grid level has alpha = 0 (t = {g.t[0]:.4g}), where the forward '
                     'kernel between levels is degenerate; use t_max < 1')
  dtype = x_T.dtype
  n = g.t.shape[0]                                     # levels; updates from the first n - 1
  alpha, sigma = np.float64(g.alpha), np.float64(g.sigma)
  with jax.ensure_compile_time_eval():
    alpha_data = float(process.alpha(jnp.zeros((), dtype)))
  alpha_next = np.concatenate([alpha[1:], [alpha_data]]) if g.to_data else alpha[1:]
  a = (alpha[:alpha_next.shape[0]] / alpha_next) ** 2  # Langevin's a_i, one per update step
  # Predictor coefficients between consecutive levels: x_next = c_x x + c_eps eps_hat + c_z z.
  if predictor == 'reverse_diffusion':
    r = alpha[:-1] / alpha[1:]
    big_g2 = np.maximum(sigma[:-1] ** 2 - r**2 * sigma[1:] ** 2, 0.0)
    c_x, c_eps, c_z = 2.0 - r, -big_g2 / sigma[:-1], np.sqrt(big_g2)
  else:
    f, g2 = _sde_coefficients(process, g.t[:-1], who)
    h = np.float64(g.t[:-1]) - np.float64(g.t[1:])
    c_x, c_eps, c_z = 1.0 - h * f, -h * g2 / sigma[:-1], np.sqrt(g2 * h)
  updates = a.shape[0]                                 # = steps
  pad = updates - c_x.shape[0]                         # 1 with final='data': the step to data
  c_x, c_eps, c_z = (np.concatenate([c, np.zeros(pad)]) for c in (c_x, c_eps, c_z))
  t, _, sigma_j, _ = _common.as_arrays(g, dtype)
  coef = tuple(jnp.asarray(c, dtype) for c in (a, c_x, c_eps, c_z))
  keys = jax.random.split(key, (updates, corrector_steps + 1))

  def corrector(x, t_i, s_i, a_i, k):
    _, eps = denoiser(x, t_i, cond)
    score = -eps / s_i
    z = jax.random.normal(k, x.shape, x.dtype)
    z_norm, g_norm = _per_example_norm(z), _per_example_norm(score)      # [B]
    if snr_norm == 'batch':
      z_norm, g_norm = jnp.mean(z_norm), jnp.mean(g_norm)
    ratio = snr * z_norm / jnp.maximum(g_norm, jnp.finfo(x.dtype).tiny)
    e = parameterization.expand_like(2.0 * a_i * ratio**2, x)
    return x + e * score + jnp.sqrt(2.0 * e) * z

  def step(x, inputs):
    t_i, s_i, a_i, cx, ce, cz, k = inputs
    for j in range(corrector_steps):
      x = corrector(x, t_i, s_i, a_i, k[j])
    _, eps = denoiser(x, t_i, cond)
    return cx * x + ce * eps + cz * jax.random.normal(k[-1], x.shape, x.dtype)

  m = n - 1                                             # predictor steps between grid levels
  xs = (t[:m], sigma_j[:m]) + tuple(c[:m] for c in coef) + (keys[:m],)
  x, traj = _common.scan(step, x_T, xs, return_trajectory)
  calls = m * (1 + corrector_steps)
  if g.to_data:   # the last level's correctors, then its predictor: the step to data
    for j in range(corrector_steps):
      x = corrector(x, t[-1], sigma_j[-1], coef[0][-1], keys[-1, j])
    calls += corrector_steps
  return _common.finish(denoiser, x, t[-1], cond, g, traj, return_trajectory, calls, x_T,
                 corrector_steps=corrector_steps)
