"""Forward processes on one convention: `x_t = alpha(t) x0 + sigma(t) eps`, t in [0, 1].

`t = 0` is data, `t = 1` is the prior, `lambda(t) = log(alpha^2 / sigma^2)` (log-SNR) is
strictly decreasing. Everything a sampler or objective needs follows from `alpha` and `sigma`;
the SDE coefficients are derived from them, never hand-written per family (DESIGN §1).

This module holds the discrete variance-preserving process of DDPM (Ho et al. 2020). The
continuous VP, VE, EDM and linear-interpolant families follow the same interface.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


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


def _float_dtype(x):
  # float32 unless the input is already a wider float (tests run some checks in float64).
  return jnp.promote_types(x.dtype, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) \
      else jnp.dtype(jnp.float32)


BETA_SCHEDULES = {
    'linear': linear_betas,
    'cosine': cosine_betas,
}


@dataclasses.dataclass(frozen=True, eq=False)
class DiscreteVP:
  """DDPM's discrete variance-preserving process, embedded in continuous time.

  Step `n = 1..T` sits at `t_n = n / T` with `alpha(t_n)^2 = alphas_cumprod[n-1]` exactly, and
  `t = 0` is clean data (`alpha = 1`, `sigma = 0`). Between grid points `log alpha` is linear in
  `t` (as DPM-Solver does for discrete models), so `t(lambda)` has an exact inverse and
  continuous-time samplers can run on a discretely trained model. Discrete samplers (DDPM
  ancestral, DDIM) only ever evaluate grid points, where the values are exact.

  Hashing is by identity (`eq=False`), so an instance can be closed over or passed as a static
  argument to `jax.jit`.
  """
  betas: np.ndarray  # [T], float64

  def __post_init__(self):
    betas = np.asarray(self.betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
      raise ValueError(f'DiscreteVP: betas must be a non-empty 1-D array, got shape {betas.shape}')
    if not np.all((betas > 0) & (betas < 1)):
      raise ValueError('DiscreteVP: every beta must lie in (0, 1)')
    object.__setattr__(self, 'betas', betas)

  @classmethod
  def from_name(cls, schedule: str = 'linear', num_steps: int = 1000, **kwargs) -> 'DiscreteVP':
    if schedule not in BETA_SCHEDULES:
      raise ValueError(f'unknown beta schedule {schedule!r}; choose from {sorted(BETA_SCHEDULES)}')
    return cls(BETA_SCHEDULES[schedule](num_steps, **kwargs))

  # --- the discrete view -------------------------------------------------------------------
  @property
  def num_steps(self) -> int:
    return int(self.betas.shape[0])

  @property
  def alphas_cumprod(self) -> np.ndarray:
    """`abar_n = prod_{i<=n} (1 - beta_i)`, n = 1..T, float64 `[T]`."""
    return np.cumprod(1.0 - self.betas)

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
    return np.concatenate([[0.0], 0.5 * np.log(self.alphas_cumprod)])

  def log_alpha(self, t):
    t = jnp.asarray(t)
    dtype = _float_dtype(t)
    grid_t = jnp.linspace(0.0, 1.0, self.num_steps + 1, dtype=dtype)
    return jnp.interp(t.astype(dtype), grid_t, jnp.asarray(self._log_alpha_grid, dtype))

  def alpha(self, t):
    return jnp.exp(self.log_alpha(t))

  def sigma(self, t):
    # sqrt(1 - alpha^2) = sqrt(-expm1(2 log alpha)), accurate where alpha is close to 1.
    return jnp.sqrt(-jnp.expm1(2.0 * self.log_alpha(t)))

  def log_snr(self, t):
    """lambda(t) = log(alpha² / sigma²) = 2 log alpha - log(1 - alpha²); +inf at t = 0."""
    la = self.log_alpha(t)
    return 2.0 * la - jnp.log(-jnp.expm1(2.0 * la))

  def t_of_log_snr(self, lam):
    """Exact inverse of `log_snr` on [0, 1] (log alpha is piecewise linear in t)."""
    lam = jnp.asarray(lam)
    dtype = _float_dtype(lam)
    # alpha² = sigmoid(lambda)  =>  log alpha = -0.5 * softplus(-lambda).
    la = -0.5 * jax.nn.softplus(-lam.astype(dtype))
    grid_t = jnp.linspace(0.0, 1.0, self.num_steps + 1, dtype=dtype)
    grid_la = jnp.asarray(self._log_alpha_grid, dtype)
    # jnp.interp needs increasing x: log alpha decreases in t, so flip both.
    return jnp.interp(la, grid_la[::-1], grid_t[::-1])

  def marginal(self, x0, eps, t):
    """Draws from q(x_t | x0): `alpha(t) x0 + sigma(t) eps`, with `t` of shape [B]."""
    shape = (-1,) + (1,) * (x0.ndim - 1)
    return self.alpha(t).reshape(shape) * x0 + self.sigma(t).reshape(shape) * eps

  def prior_sample(self, key, shape, dtype=jnp.float32):
    """x_1 ~ N(0, I): the prior the samplers start from (alpha(1) ≈ 0 for standard schedules)."""
    return jax.random.normal(key, shape, dtype)


def make_process(name: str, **kwargs):
  """Builds a process from its name in `PROCESSES` and keyword arguments (e.g. from a config)."""
  if name not in PROCESSES:
    raise ValueError(f'unknown process {name!r}; choose from {sorted(PROCESSES)}')
  return PROCESSES[name](**kwargs)


PROCESSES = {
    'vp_discrete': DiscreteVP.from_name,
}
