"""Forward processes on one convention: `x_t = alpha(t) x0 + sigma(t) eps`, t in [0, 1].

`t = 0` is data, `t = 1` is the prior, `lambda(t) = log(alpha^2 / sigma^2)` (log-SNR) is
strictly decreasing. Everything a sampler or objective needs follows from `alpha` and `sigma`;
the SDE coefficients are derived from them, never hand-written per family (DESIGN §1).

This module holds DDPM's discrete variance-preserving process (Ho et al. 2020) with its beta
schedules, `make_process` and `PROCESSES`; the shared continuous-time view (`Process`, with the
SDE coefficients) and the continuous families live in `processes_continuous` and are
re-exported here.
"""

import dataclasses
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.processes_continuous import EDM
from diffusion_jax.processes_continuous import VE
from diffusion_jax.processes_continuous import LinearInterpolant
from diffusion_jax.processes_continuous import Process
from diffusion_jax.processes_continuous import SubVP
from diffusion_jax.processes_continuous import TrigFlow
from diffusion_jax.processes_continuous import VPCosine
from diffusion_jax.processes_continuous import VPLinear
from diffusion_jax.processes_continuous import as_float
from diffusion_jax.processes_continuous import softplus


def linear_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
  """DDPM's linear schedule (Ho et al. 2020, §4): betas from 1e-4 to 0.02 over T = 1000.

  For T != 1000 the end points are rescaled by 1000 / T, as in Nichol & Dhariwal (2021), so
  the total noise added stays comparable.
  """
  scale = 1000.0 / num_steps
  return np.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=np.float64)


def cosine_betas(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Cosine schedule (Nichol & Dhariwal 2021, Eq. 17): abar(t) = f(t) / f(0),

  with f(t) = cos²(((t/T + s) / (1 + s)) · π/2).

  Betas are clipped at `max_beta` = 0.999 as in the paper, to avoid a singularity at t = 1.
  """
  def f(n):
    return math.cos((n / num_steps + s) / (1 + s) * math.pi / 2) ** 2
  betas = [min(1 - f(n + 1) / f(n), max_beta) for n in range(num_steps)]
  return np.asarray(betas, dtype=np.float64)


def scaled_linear_betas(num_steps: int, beta_start: float = 0.00085,
                        beta_end: float = 0.012) -> np.ndarray:
  """Latent diffusion / Stable Diffusion (Rombach et al. 2022): linear in sqrt(beta).

  Not rescaled with T. At T = 1000, sqrt(abar_T) = 0.068265 (Lin et al. 2024, §3.1).
  """
  return np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_steps, dtype=np.float64)**2


def sigmoid_betas(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
  """GeoDiff (Xu et al. 2022): sigmoid(linspace(-6, 6, T)) (beta_end - beta_start) + beta_start.

  The end points are therefore 1.49e-4 and 0.01995, not beta_start and beta_end. Not rescaled
  with T.
  """
  x = np.linspace(-6.0, 6.0, num_steps, dtype=np.float64)
  return beta_start + (beta_end - beta_start) / (1.0 + np.exp(-x))


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Lin et al. 2024, Algorithm 1: shift, scale sqrt(abar) to sqrt(abar_T) = 0, keeping abar_1.

  The last beta becomes exactly 1. With alpha(1) = 0, an eps-prediction cannot be turned into
  x0 at t = 1 (x0 = (x - sigma eps) / alpha divides by 0); pair it with v-prediction (§3.2).
  """
  root = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
  first, last = root[0], root[-1]
  root = (root - last) * first / (first - last)
  abar = root**2
  return 1.0 - np.concatenate([abar[:1], abar[1:] / abar[:-1]])


BETA_SCHEDULES = {
    'linear': linear_betas,
    'cosine': cosine_betas,
    'scaled_linear': scaled_linear_betas,
    'sigmoid': sigmoid_betas,
}

# Floor on abar in the log-alpha grid: log 0 at zero terminal SNR would make the interpolation
# on the last segment NaN (0 * -inf).
_ABAR_FLOOR = 1e-20


@jax.jit
def _interp_uniform(t, knots, values):
  """`jnp.interp(t, knots, values)` for the knots `n / T`, n = 0..T (correctly rounded): the
  same formula and values, with the interval from `floor(t T)` (corrected by one against the
  knots) instead of a search. Jitted, so eager calls compile it once per shape."""
  T = knots.shape[0] - 1
  # i: the first knot above t (searchsorted(knots, t, 'right')), clipped to [1, T].
  k = jnp.minimum(jnp.maximum(jnp.floor(t * T), 0.0), T - 1.0).astype(jnp.int32)
  i = jnp.minimum(jnp.maximum(k, 0), T - 1) + 1   # the int clip catches NaN t
  i = jnp.where((t < knots[i - 1]) & (i > 1), i - 1, i)
  i = jnp.where((t >= knots[i]) & (i < T), i + 1, i)
  t_left, t_right, v_left, v_right = knots[i - 1], knots[i], values[i - 1], values[i]
  t_clamped = jnp.minimum(jnp.maximum(t, 0.0), 1.0)
  out = v_left + ((t_clamped - t_left) / (t_right - t_left)) * (v_right - v_left)
  return jnp.where(t < 0.0, values[0], jnp.where(t > 1.0, values[-1], out))


@dataclasses.dataclass(frozen=True, eq=False)
class DiscreteVP(Process):
  """DDPM's discrete variance-preserving process, embedded in continuous time.

  Step `n = 1..T` sits at `t_n = n / T` with `alpha(t_n)^2 = alphas_cumprod[n-1]` exactly, and
  `t = 0` is clean data (`alpha = 1`, `sigma = 0`). Between grid points `log alpha` is linear in
  `t` (as DPM-Solver does for discrete models), so `t(lambda)` has an exact inverse and
  continuous-time samplers can run on a discretely trained model. Discrete samplers (DDPM
  ancestral, DDIM) only ever evaluate grid points, where the values are exact. `t_min = 1 / T`
  (the first step); prior N(0, I).

  Zero terminal SNR (`from_name(..., zero_terminal_snr=True)`, abar_T = 0): the log-alpha grid
  floors abar at 1e-20, so on the last segment log alpha runs linearly down to log(1e-10)
  (finite, as are `log_alpha`, `drift_coefficient` and `diffusion_squared` there), and at
  t >= 1 `alpha` is exactly 0, `sigma` 1, `log_snr` -inf and `t_of_log_snr(-inf)` = 1. Use
  v-prediction: eps-prediction cannot be converted to x0 at t = 1 (it divides by alpha = 0).

  Hashing is by identity (`eq=False`), so an instance can be closed over or passed as a static
  argument to `jax.jit`.
  """
  betas: np.ndarray  # [T], float64

  def __post_init__(self):
    betas = np.asarray(self.betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
      raise ValueError(f'DiscreteVP: betas must be a non-empty 1-D array, got shape {betas.shape}')
    # Only the last beta may be 1 (zero terminal SNR); an earlier 1 would zero abar twice.
    if not (np.all((betas[:-1] > 0) & (betas[:-1] < 1)) and 0 < betas[-1] <= 1):
      raise ValueError('DiscreteVP: every beta must lie in (0, 1), the last in (0, 1]')
    abar = np.cumprod(1.0 - betas)
    if np.any(abar[:-1] <= _ABAR_FLOOR) or 0 < abar[-1] <= _ABAR_FLOOR:
      raise ValueError(f'DiscreteVP: alphas_cumprod must stay above {_ABAR_FLOOR} (or end in '
                       'exactly 0, zero terminal SNR)')
    object.__setattr__(self, 'betas', betas)

  @classmethod
  def from_name(cls, schedule: str = 'linear', num_steps: int = 1000,
                zero_terminal_snr: bool = False, **kwargs) -> 'DiscreteVP':
    """`BETA_SCHEDULES[schedule](num_steps, **kwargs)`, optionally rescaled to zero terminal SNR."""
    if schedule not in BETA_SCHEDULES:
      raise ValueError(f'unknown beta schedule {schedule!r}; choose from {sorted(BETA_SCHEDULES)}')
    if not isinstance(num_steps, int) or num_steps < 1:
      raise ValueError(f'num_steps={num_steps!r}: the discrete process needs an integer T >= 1')
    make_betas = BETA_SCHEDULES[schedule]
    try:
      inspect.signature(make_betas).bind(num_steps, **kwargs)
    except TypeError as e:
      raise ValueError(f'beta schedule {schedule!r}: {e}') from None
    betas = make_betas(num_steps, **kwargs)
    return cls(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas)

  # --- the discrete view -------------------------------------------------------------------
  @property
  def num_steps(self) -> int:
    return int(self.betas.shape[0])

  @property
  def alphas_cumprod(self) -> np.ndarray:
    """`abar_n = prod_{i<=n} (1 - beta_i)`, n = 1..T, float64 `[T]`."""
    return np.cumprod(1.0 - self.betas)

  @property
  def zero_terminal_snr(self) -> bool:
    return bool(self.betas[-1] == 1.0)

  @property
  def t_min(self) -> float:
    return 1.0 / self.num_steps

  def t_of_step(self, n, dtype=jnp.float32):
    """Continuous time of integer step `n` (0 = data, T = last step)."""
    return jnp.asarray(n).astype(dtype) / self.num_steps

  def alpha_bar_of_step(self, n, dtype=jnp.float32):
    """Exact `abar_n` at integer steps `n` in 0..T, with `abar_0 = 1` (clean data)."""
    table = jnp.asarray(np.concatenate([[1.0], self.alphas_cumprod]), dtype)
    return table[jnp.asarray(n)]

  # --- the continuous view -----------------------------------------------------------------
  @property
  def _log_alpha_grid(self) -> np.ndarray:
    # [T + 1]: knot 0 at t = 0 (clean data), then 0.5 * log abar_n at t = n / T.
    return np.concatenate([[0.0], 0.5 * np.log(np.maximum(self.alphas_cumprod, _ABAR_FLOOR))])

  def _knots(self, dtype) -> np.ndarray:
    """`n / T`, n = 0..T, correctly rounded to `dtype`: `t_of_step(n)` hits a knot exactly."""
    return (np.arange(self.num_steps + 1) / self.num_steps).astype(dtype)

  def _log_alpha(self, t, xp):
    """Piecewise linear in t between the knots `(n / T, 0.5 log abar_n)`, constant outside
    [0, 1]: `jnp.interp`'s formula, with the knot interval found by index arithmetic
    (`floor(t T)`, corrected by one against the knots) instead of a search, so its cost does not
    grow with T or, at a scalar `t`, with the batch."""
    if xp is np:
      return np.interp(t, self._knots(np.float64), self._log_alpha_grid)
    return _interp_uniform(t, jnp.asarray(self._knots(t.dtype)),
                           jnp.asarray(self._log_alpha_grid, t.dtype))

  def _alpha(self, t, xp):
    alpha = xp.exp(self._log_alpha(t, xp))
    return xp.where(t >= 1.0, 0.0, alpha) if self.zero_terminal_snr else alpha

  def _sigma_squared(self, t, xp):
    # 1 - alpha² = -expm1(2 log alpha), accurate where alpha is close to 1.
    return -xp.expm1(2.0 * self._log_alpha(t, xp))

  def alpha_sigma(self, t):
    """`(alpha(t), sigma(t))` from one evaluation of log alpha."""
    t = as_float(t)
    la = self._log_alpha(t, jnp)
    alpha = jnp.exp(la)
    alpha = jnp.where(t >= 1.0, 0.0, alpha) if self.zero_terminal_snr else alpha
    return alpha, jnp.sqrt(-jnp.expm1(2.0 * la))

  def _log_snr(self, t, xp):
    """lambda(t) = log(alpha² / sigma²) = 2 log alpha - log(1 - alpha²); +inf at t = 0."""
    la = self._log_alpha(t, xp)
    lam = 2.0 * la - xp.log(-xp.expm1(2.0 * la))
    return xp.where(t >= 1.0, -xp.inf, lam) if self.zero_terminal_snr else lam

  def _t_of_log_snr(self, lam, xp):
    """Exact inverse of `log_snr` on [0, 1] (log alpha is piecewise linear in t)."""
    # alpha² = sigmoid(lambda)  =>  log alpha = -0.5 * softplus(-lambda).
    la = -0.5 * softplus(-lam, xp)
    grid_t = xp.asarray(self._knots(lam.dtype))
    grid_la = xp.asarray(self._log_alpha_grid, lam.dtype)
    # interp needs increasing x: log alpha decreases in t, so flip both.
    return xp.interp(la, grid_la[::-1], grid_t[::-1])


def make_process(name: str, **kwargs):
  """Builds a process from its name in `PROCESSES` and keyword arguments (e.g. from a config)."""
  if name not in PROCESSES:
    raise ValueError(f'unknown process {name!r}; choose from {sorted(PROCESSES)}')
  build = PROCESSES[name]
  signature = inspect.signature(build)
  try:
    signature.bind(**kwargs)
  except TypeError as e:
    valid = sorted(k for k, p in signature.parameters.items() if p.kind != p.VAR_KEYWORD)
    raise ValueError(f'process {name!r}: {e}; valid arguments are {valid}') from None
  return build(**kwargs)


PROCESSES = {
    'vp_discrete': DiscreteVP.from_name,
    'vp_linear': VPLinear,
    'subvp': SubVP,
    'vp_cosine': VPCosine,
    'vp_cosine_shifted': VPCosine.shifted,
    'vp_cosine_interpolated': VPCosine.interpolated,
    've': VE,
    'edm': EDM,
    'linear': LinearInterpolant,
    'trigflow': TrigFlow,
}
