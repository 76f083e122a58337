"""The continuous-time view every process shares, and the continuous families (DESIGN §1).

`Process` derives the SDE view from `alpha` and `sigma` by autodiff, once for every family (the
discrete VP of `processes` included). The families: VP SDE with linear beta (`VPLinear`),
sub-VP SDE (`SubVP`), cosine in log-SNR form with resolution shift (`VPCosine`), VE SDE (`VE`),
EDM (`EDM`), the linear interpolant / rectified flow (`LinearInterpolant`) and sCM's TrigFlow
(`TrigFlow`). Import them from `diffusion_jax.processes`, which re-exports them and holds
`PROCESSES`.

Every method accepts scalar or array `t`, works under `jit` / `vmap`, and computes in the
input's float dtype (float32 for integer or float16 input, float64 under `jax.enable_x64`).

Each formula is written once, as a private method `_name(t, xp)` over an array namespace `xp`:
the public methods evaluate it with `jax.numpy`, and the numpy twins (`alpha_np`, `sigma_np`,
`log_snr_np`, `t_of_log_snr_np`) with numpy in float64. Time grids are built from the twins at
trace time, so setting up a sampler compiles nothing (`samplers.grids`).
"""

import abc
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


def float_dtype(x):
  """float32 unless `x` is already a wider float (tests run some checks in float64)."""
  return jnp.promote_types(x.dtype, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) \
      else jnp.dtype(jnp.float32)


def as_float(t):
  """`t` as an array in `float_dtype(t)`: what every process method computes in."""
  t = jnp.asarray(t)
  return t.astype(float_dtype(t))


def as_float64(t) -> np.ndarray:
  """`t` as a float64 numpy array: what the numpy twins compute in."""
  return np.asarray(t, np.float64)


def softplus(x, xp):
  """log(1 + e^x) in `xp` (jax.nn.softplus for jnp)."""
  return jax.nn.softplus(x) if xp is jnp else np.logaddexp(x, 0.0)


def log_sigmoid(x, xp):
  """log sigmoid(x) = -softplus(-x) in `xp`."""
  return jax.nn.log_sigmoid(x) if xp is jnp else -np.logaddexp(-x, 0.0)


def sigmoid(x, xp):
  """1 / (1 + e^-x) in `xp`, without overflow in numpy."""
  if xp is jnp:
    return jax.nn.sigmoid(x)
  e = np.exp(-np.abs(x))
  return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _time_derivative(fn, t):
  """`(fn(t), d fn / dt)` by forward-mode autodiff, elementwise for array `t`."""
  t = as_float(t)
  return jax.jvp(fn, (t,), (jnp.ones_like(t),))


def _check(ok: bool, cls, message: str):
  if not ok:
    raise ValueError(f'{cls.__name__}: {message}')


def _floats(obj, *names):
  # Configs hand over ints and numpy scalars; Python floats keep the computation's dtype.
  for name in names:
    value = getattr(obj, name)
    if value is not None:
      object.__setattr__(obj, name, float(value))


class Process(abc.ABC):
  """What every process provides, with the SDE view derived from `alpha` and `sigma`.

  A family defines `_log_alpha(t, xp)`, `_sigma_squared(t, xp)` and `t_min` (a field or
  property), and overrides `_alpha`, `_sigma`, `_log_snr` and `_t_of_log_snr` where a closed
  form is more accurate. Each `_name(t, xp)` takes `t` already as a float array of `xp`
  (`jax.numpy` or numpy) and uses only `xp` and the helpers here (`softplus`, `log_sigmoid`,
  `sigmoid`), so the public jnp method `name(t)` and its float64 numpy twin `name_np(t)` are the
  same formula. `t_min` and `t_max = 1` bound the interval samplers integrate over (and
  objectives draw from); the prior is `N(0, prior_std² I)`.
  """

  t_max = 1.0

  @property
  @abc.abstractmethod
  def t_min(self) -> float:
    """The smallest time samplers and objectives use; every family defines it."""

  @property
  def prior_std(self) -> float:
    return 1.0

  @abc.abstractmethod
  def _log_alpha(self, t, xp):
    """log alpha(t); every family defines it."""

  @abc.abstractmethod
  def _sigma_squared(self, t, xp):
    """sigma(t)²; every family defines it (differentiated for g², where sigma's sqrt is not)."""

  def _alpha(self, t, xp):
    return xp.exp(self._log_alpha(t, xp))

  def _sigma(self, t, xp):
    return xp.sqrt(self._sigma_squared(t, xp))

  def _log_snr(self, t, xp):
    """lambda(t) = log(alpha² / sigma²)."""
    return 2.0 * self._log_alpha(t, xp) - xp.log(self._sigma_squared(t, xp))

  def _t_of_log_snr(self, lam, xp):
    """Inverse of `log_snr` by bisection on [0, 1], for schedules without a closed form.

    Resolves `t` to the float's resolution (nmant + 2 halvings); `lam` beyond the range of
    `log_snr` on [0, 1] gives the nearer end point.
    """
    def halve(_, bounds):
      lo, hi = bounds
      mid = 0.5 * (lo + hi)
      early = self._log_snr(mid, xp) > lam   # lambda decreases, so the root lies after mid
      return xp.where(early, mid, lo), xp.where(early, hi, mid)

    steps = int(np.finfo(lam.dtype).nmant) + 2
    bounds = (xp.zeros_like(lam), xp.ones_like(lam))
    if xp is jnp:
      lo, hi = jax.lax.fori_loop(0, steps, halve, bounds)
    else:
      for i in range(steps):
        bounds = halve(i, bounds)
      lo, hi = bounds
    return 0.5 * (lo + hi)

  # --- the public jnp methods (in t's float dtype) -----------------------------------------
  def log_alpha(self, t):
    """log alpha(t)."""
    return self._log_alpha(as_float(t), jnp)

  def sigma_squared(self, t):
    """sigma(t)²."""
    return self._sigma_squared(as_float(t), jnp)

  def alpha(self, t):
    return self._alpha(as_float(t), jnp)

  def sigma(self, t):
    return self._sigma(as_float(t), jnp)

  def alpha_sigma(self, t):
    """`(alpha(t), sigma(t))`, the pair a denoiser needs; families share work between them."""
    return self.alpha(t), self.sigma(t)

  def log_snr(self, t):
    """lambda(t) = log(alpha² / sigma²)."""
    return self._log_snr(as_float(t), jnp)

  def t_of_log_snr(self, lam):
    """The time at which `log_snr` equals `lam` (inverse of `log_snr`)."""
    return self._t_of_log_snr(as_float(lam), jnp)

  # --- float64 numpy twins: the same formulas, for grids built at trace time ---------------
  def alpha_np(self, t) -> np.ndarray:
    """`alpha(t)` in float64 numpy."""
    with np.errstate(all='ignore'):
      return self._alpha(as_float64(t), np)

  def sigma_np(self, t) -> np.ndarray:
    """`sigma(t)` in float64 numpy."""
    with np.errstate(all='ignore'):
      return self._sigma(as_float64(t), np)

  def log_snr_np(self, t) -> np.ndarray:
    """`log_snr(t)` in float64 numpy."""
    with np.errstate(all='ignore'):
      return self._log_snr(as_float64(t), np)

  def t_of_log_snr_np(self, lam) -> np.ndarray:
    """`t_of_log_snr(lam)` in float64 numpy."""
    with np.errstate(all='ignore'):
      return self._t_of_log_snr(as_float64(lam), np)

  def marginal(self, x0, eps, t):
    """Draws from q(x_t | x0): `alpha(t) x0 + sigma(t) eps`, with `t` of shape [B] (or scalar)."""
    t = jnp.asarray(t)
    shape = t.shape + (1,) * (x0.ndim - t.ndim)
    return self.alpha(t).reshape(shape) * x0 + self.sigma(t).reshape(shape) * eps

  def prior_sample(self, key, shape, dtype=jnp.float32):
    """x_1 ~ N(0, prior_std² I): where samplers start."""
    return self.prior_std * jax.random.normal(key, shape, dtype)

  # --- the SDE view: dx = f(t) x dt + g(t) dW has exactly the marginals q(x_t | x0) --------
  def drift_coefficient(self, t):
    """f(t) = d log alpha / dt, from E[x_t | x0] = alpha x0 and dE/dt = f E."""
    return _time_derivative(self.log_alpha, t)[1]

  def diffusion_squared(self, t):
    """g²(t) = d sigma²/dt - 2 f sigma², from dVar/dt = 2 f Var + g² (Song et al. 2021, Eq. 5).

    Differentiates `sigma_squared`, not `sigma`: sqrt has an infinite slope where sigma = 0.
    """
    f = self.drift_coefficient(t)
    var, d_var = _time_derivative(self.sigma_squared, t)
    return d_var - 2.0 * f * var


@dataclasses.dataclass(frozen=True, eq=False)
class _LinearBeta(Process):
  """The linear `beta(t) = beta_min + t (beta_max - beta_min)` shared by the VP and sub-VP SDEs
  (Song et al. 2021, App. B), with its integral `B(t)`."""
  beta_min: float = 0.1
  beta_max: float = 20.0
  t_min: float = 1e-3

  def __post_init__(self):
    _floats(self, 'beta_min', 'beta_max', 't_min')
    _check(0 < self.beta_min <= self.beta_max, type(self), 'need 0 < beta_min <= beta_max, got '
           f'beta_min={self.beta_min}, beta_max={self.beta_max}')

  def _integrated_beta(self, t):
    """B(t) = beta_min t + (beta_max - beta_min) t² / 2."""
    return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2


@dataclasses.dataclass(frozen=True, eq=False)
class VPLinear(_LinearBeta):
  """VP SDE with beta(t) = beta_min + t (beta_max - beta_min) (Song et al. 2021, Eq. 11, App. B).

  `log alpha(t) = -t² (beta_max - beta_min) / 4 - t beta_min / 2`, `sigma² = 1 - alpha²`.
  Song et al. sample down to `t_min = 1e-3` and evaluate likelihoods from 1e-5. Prior N(0, I)
  (alpha(1) = 6.57e-3 with the defaults).
  """
  def _log_alpha(self, t, xp):
    return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

  def _sigma_squared(self, t, xp):
    # 1 - alpha² without cancellation where alpha is close to 1.
    return -xp.expm1(2.0 * self._log_alpha(t, xp))

  def _log_snr(self, t, xp):
    la = self._log_alpha(t, xp)
    return 2.0 * la - xp.log(-xp.expm1(2.0 * la))

  def _t_of_log_snr(self, lam, xp):
    """Root t >= 0 of `a t² + b t + c = 0`, a = (beta_max - beta_min)/4, b = beta_min/2,

    c = log alpha = -softplus(-lambda)/2 (alpha² = sigmoid(lambda)), in the cancellation-free
    form `t = -2c / (b + sqrt(b² - 4ac))`.
    """
    c = -0.5 * softplus(-lam, xp)
    a, b = 0.25 * (self.beta_max - self.beta_min), 0.5 * self.beta_min
    t = -2.0 * c / (b + xp.sqrt(b * b - 4.0 * a * c))
    return xp.where(xp.isneginf(lam), xp.inf, t)   # inf / inf above


@dataclasses.dataclass(frozen=True, eq=False)
class SubVP(_LinearBeta):
  """Sub-VP SDE (Song et al. 2021, "Score-Based Generative Modeling through SDEs", §3.4, Eq. 12;
  its perturbation kernel, App. B, Eq. 29): the VP SDE's drift with a smaller diffusion.

  With `B(t) = int_0^t beta = beta_min t + (beta_max - beta_min) t² / 2` (the VP's linear
  beta): `alpha = exp(-B / 2)` and `sigma = 1 - exp(-B)` (not a square root), so
  `sigma² = (1 - e^{-B})² < 1 - e^{-B}`, the VP's variance, at every t > 0. The derived SDE is
  `f = -beta / 2`, `g² = beta (1 - e^{-2B})`. Song et al. sample down to `t_min = 1e-3`.
  Prior N(0, I), as for `VPLinear`: sigma(1) = 1 - e^{-10.05} = 0.99996 with the defaults.
  """
  def _log_alpha(self, t, xp):
    return -0.5 * self._integrated_beta(t)

  def _sigma(self, t, xp):
    # 1 - e^{-B} without cancellation where B is small.
    return -xp.expm1(-self._integrated_beta(t))

  def _sigma_squared(self, t, xp):
    return xp.expm1(-self._integrated_beta(t)) ** 2

  def _log_snr(self, t, xp):
    """lambda = log(e^{-B} / (1 - e^{-B})²) = -B - 2 log(1 - e^{-B}); +inf at t = 0."""
    b = self._integrated_beta(t)
    return -b - 2.0 * xp.log(-xp.expm1(-b))

  def _t_of_log_snr(self, lam, xp):
    """Closed-form inverse. With `u = e^{-B}` and `s = e^lambda`, `u / (1 - u)² = s` is
    `s u² - (2s + 1) u + s = 0`, whose root in (0, 1) is
    `u = 2s / (2s + 1 + sqrt(4s + 1))` (the other root is 1 / u). Hence, without overflow or
    cancellation on either side of lambda = 0:

    - lambda < 0: `B = -log u = -lambda + log((2s + 1 + sqrt(4s + 1)) / 2)`;
    - lambda >= 0, `q = e^{-lambda}`: `1 - u = (q + r) / (2 + q + r)`, `r = sqrt(q (q + 4))`,
      and `B = -log1p(-(1 - u))`.

    Then `t` is the root t >= 0 of `(beta_max - beta_min) t² / 2 + beta_min t - B = 0`, in the
    form `t = 2B / (beta_min + sqrt(beta_min² + 2 (beta_max - beta_min) B))`.
    """
    neg = xp.minimum(lam, 0.0)   # each branch sees only its own side: no inf / nan anywhere
    s = xp.exp(neg)
    b_neg = -neg + xp.log(0.5 * (2.0 * s + 1.0 + xp.sqrt(4.0 * s + 1.0)))
    q = xp.exp(-xp.maximum(lam, 0.0))
    r = xp.sqrt(q * (q + 4.0))
    b_pos = -xp.log1p(-(q + r) / (2.0 + q + r))
    b = xp.where(lam < 0, b_neg, b_pos)
    t = 2.0 * b / (self.beta_min + xp.sqrt(self.beta_min**2
                                            + 2.0 * (self.beta_max - self.beta_min) * b))
    return xp.where(xp.isneginf(lam), xp.inf, t)   # inf / inf above


def _angle(lam: float) -> float:
  """atan(exp(-lam / 2)) without overflow: the angle at which -2 log tan(angle) = lam."""
  if lam >= 0:
    return math.atan(math.exp(-0.5 * lam))
  return 0.5 * math.pi - math.atan(math.exp(0.5 * lam))


@dataclasses.dataclass(frozen=True, eq=False)
class VPCosine(Process):
  """Cosine schedule in log-SNR form (Nichol & Dhariwal 2021 with s -> 0; Hoogeboom et al. 2023).

  `lambda(t) = -2 log tan(theta(t)) + shift(t)` with `theta = theta_0 + t (theta_1 - theta_0)`
  clipped so that the unshifted lambda runs from `logsnr_max` at t = 0 to `logsnr_min` at
  t = 1 (Hoogeboom et al. 2023, §3.1; the whole range, alpha = cos(pi t / 2), with
  `logsnr_min = -inf, logsnr_max = inf`); `alpha² = sigmoid(lambda)`, `sigma² = sigmoid(-lambda)`.

  `shift` adds `2 log(base_resolution / resolution)` for higher-resolution data ("shifted
  schedule", `VPCosine.shifted`). With `shift_end`, the shift moves linearly from `shift` at
  t = 0 to `shift_end` at t = 1 ("interpolated schedule", `VPCosine.interpolated`); that
  schedule has no closed-form inverse, so `t_of_log_snr` bisects. Prior N(0, I); t_min = 0.
  """
  logsnr_min: float = -15.0
  logsnr_max: float = 15.0
  shift: float = 0.0
  shift_end: float | None = None
  t_min: float = 0.0

  def __post_init__(self):
    _floats(self, 'logsnr_min', 'logsnr_max', 'shift', 'shift_end', 't_min')
    _check(self.logsnr_min < self.logsnr_max, type(self),
           f'need logsnr_min < logsnr_max, got {self.logsnr_min} >= {self.logsnr_max}')
    # |d lambda_cos / dt| = 4 (theta_1 - theta_0) / sin(2 theta) >= 4 (theta_1 - theta_0), so
    # a shift growing slower than that keeps lambda strictly decreasing.
    theta_0, theta_1 = self._angles
    _check(self.shift_end is None or self.shift_end - self.shift < 4 * (theta_1 - theta_0),
           type(self), f'shift_end - shift = {self.shift_end} - {self.shift} is too large for '
           'a strictly decreasing log-SNR')

  @classmethod
  def shifted(cls, resolution: float = 256.0, base_resolution: float = 64.0,
              logsnr_min: float = -15.0, logsnr_max: float = 15.0, t_min: float = 0.0):
    """Hoogeboom et al. 2023, §3.1: lambda + 2 log(base_resolution / resolution)."""
    return cls(logsnr_min, logsnr_max, 2.0 * math.log(base_resolution / resolution), None, t_min)

  @classmethod
  def interpolated(cls, resolution: float = 512.0, base_resolution_low: float = 32.0,
                   base_resolution_high: float = 256.0, logsnr_min: float = -15.0,
                   logsnr_max: float = 15.0, t_min: float = 0.0):
    """Hoogeboom et al. 2023, §3.1: `t lambda_low(t) + (1 - t) lambda_high(t)`, where

    `lambda_low` / `lambda_high` are shifted to `base_resolution_low` / `_high`: the low
    resolution's shift rules at high noise (t = 1). The defaults are an example, not the paper's.
    """
    return cls(logsnr_min, logsnr_max, 2.0 * math.log(base_resolution_high / resolution),
               2.0 * math.log(base_resolution_low / resolution), t_min)

  @property
  def _angles(self) -> tuple[float, float]:
    return _angle(self.logsnr_max), _angle(self.logsnr_min)

  def _log_snr(self, t, xp):
    theta_0, theta_1 = self._angles
    # log tan(theta) = log sin(theta) - log sin(pi/2 - theta), with pi/2 - theta formed from
    # its own end point: no cancellation near theta = pi/2, and -inf exactly there.
    theta = theta_0 + t * (theta_1 - theta_0)
    psi = (0.5 * math.pi - theta_1) + (1.0 - t) * (theta_1 - theta_0)
    lam = 2.0 * (xp.log(xp.sin(psi)) - xp.log(xp.sin(theta)))
    if self.shift_end is None:
      return lam + self.shift
    return lam + self.shift + t * (self.shift_end - self.shift)

  def _log_alpha(self, t, xp):
    return 0.5 * log_sigmoid(self._log_snr(t, xp), xp)

  def _sigma_squared(self, t, xp):
    return sigmoid(-self._log_snr(t, xp), xp)

  def _sigma(self, t, xp):
    # exp(log_sigmoid / 2) stays accurate where sigma is tiny (sigmoid -> 0 loses digits).
    return xp.exp(0.5 * log_sigmoid(-self._log_snr(t, xp), xp))

  def _t_of_log_snr(self, lam, xp):
    """Closed form `theta = atan(exp(-(lambda - shift) / 2))` for a constant shift; bisection
    for the interpolated one. Not clipped: lambda outside the range gives t outside [0, 1]."""
    if self.shift_end is not None:
      return super()._t_of_log_snr(lam, xp)
    x = lam - self.shift
    theta_0, theta_1 = self._angles
    acute = xp.arctan(xp.exp(-0.5 * xp.abs(x)))   # atan(e^{-x/2}) = pi/2 - atan(e^{x/2})
    theta = xp.where(x >= 0, acute, 0.5 * math.pi - acute)
    return (theta - theta_0) / (theta_1 - theta_0)


@dataclasses.dataclass(frozen=True, eq=False)
class VE(Process):
  """VE SDE (NCSN, Song et al. 2021, Eq. 9): alpha = 1, sigma = sigma_min (sigma_max/sigma_min)^t.

  sigma(0) = sigma_min > 0, so even t = 0 is slightly noisy. Defaults are the CIFAR-10 values;
  Song et al.'s VE samplers stop at t_min = 1e-5. Prior N(0, sigma_max² I).
  """
  sigma_min: float = 0.01
  sigma_max: float = 50.0
  t_min: float = 1e-5

  def __post_init__(self):
    _floats(self, 'sigma_min', 'sigma_max', 't_min')
    _check(0 < self.sigma_min < self.sigma_max, type(self), 'need 0 < sigma_min < sigma_max, got '
           f'sigma_min={self.sigma_min}, sigma_max={self.sigma_max}')

  @property
  def prior_std(self) -> float:
    return self.sigma_max

  @property
  def _log_ratio(self) -> float:
    return math.log(self.sigma_max / self.sigma_min)

  def _log_sigma(self, t):
    return math.log(self.sigma_min) + t * self._log_ratio

  def _log_alpha(self, t, xp):
    return xp.zeros_like(t)

  def _alpha(self, t, xp):
    return xp.ones_like(t)

  def _sigma(self, t, xp):
    return xp.exp(self._log_sigma(t))

  def _sigma_squared(self, t, xp):
    return xp.exp(2.0 * self._log_sigma(t))

  def _log_snr(self, t, xp):
    return -2.0 * self._log_sigma(t)

  def _t_of_log_snr(self, lam, xp):
    return (-0.5 * lam - math.log(self.sigma_min)) / self._log_ratio


@dataclasses.dataclass(frozen=True, eq=False)
class EDM(Process):
  """EDM (Karras et al. 2022, Table 1): alpha = 1 and sigma is time, here sigma(t) = sigma_max t.

  t_min = sigma_min / sigma_max; prior N(0, sigma_max² I). log_snr(0) = +inf (sigma = 0).
  The preconditioning's `sigma_data` and the training law of ln sigma (`P_mean`, `P_std`)
  belong to the EDM objective (`objectives.edm`, `objectives.log_normal_t`), not to the process.
  """
  sigma_min: float = 0.002
  sigma_max: float = 80.0

  def __post_init__(self):
    _floats(self, 'sigma_min', 'sigma_max')
    _check(0 < self.sigma_min < self.sigma_max, type(self), 'need 0 < sigma_min < sigma_max, got '
           f'sigma_min={self.sigma_min}, sigma_max={self.sigma_max}')

  @property
  def t_min(self) -> float:
    return self.sigma_min / self.sigma_max

  @property
  def prior_std(self) -> float:
    return self.sigma_max

  def _log_alpha(self, t, xp):
    return xp.zeros_like(t)

  def _alpha(self, t, xp):
    return xp.ones_like(t)

  def _sigma(self, t, xp):
    return self.sigma_max * t

  def _sigma_squared(self, t, xp):
    return self._sigma(t, xp) ** 2

  def _log_snr(self, t, xp):
    return -2.0 * xp.log(self._sigma(t, xp))

  def _t_of_log_snr(self, lam, xp):
    return xp.exp(-0.5 * lam) / self.sigma_max


@dataclasses.dataclass(frozen=True, eq=False)
class LinearInterpolant(Process):
  """Rectified flow / linear interpolant (Liu et al. 2022, Eq. 1; Lipman et al. 2022, Eq. 20).

  alpha = 1 - t, sigma = t (Lipman's OT path with sigma_min = 0, time reversed), lambda =
  2 log((1 - t) / t), t(lambda) = sigmoid(-lambda / 2). log_snr is +inf at t = 0 (sigma = 0)
  and -inf at t = 1 (alpha = 0), where f = -1 / (1 - t) and g² = 2t / (1 - t) are -inf and
  +inf. t_min = 0; prior N(0, I).
  """
  t_min: float = 0.0

  def __post_init__(self):
    _floats(self, 't_min')

  def _alpha(self, t, xp):
    return 1.0 - t

  def _log_alpha(self, t, xp):
    return xp.log1p(-t)

  def _sigma(self, t, xp):
    return t

  def _sigma_squared(self, t, xp):
    return t**2

  def _log_snr(self, t, xp):
    return 2.0 * (xp.log1p(-t) - xp.log(t))

  def _t_of_log_snr(self, lam, xp):
    return sigmoid(-0.5 * lam, xp)


@dataclasses.dataclass(frozen=True, eq=False)
class TrigFlow(Process):
  """TrigFlow (Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency
  Models", §3): `x_tau = cos(tau) x0 + sin(tau) z`, `z ~ N(0, sigma_data² I)`, tau in [0, pi/2].

  On the library's convention `tau = pi t / 2` and `eps = z / sigma_data`: `alpha = cos(pi t/2)`
  (written `sin(pi (1 - t) / 2)`, so that `alpha(1) = 0` exactly in floating point), `sigma =
  sigma_data sin(pi t / 2)`, `lambda = 2 log(cot(pi t / 2) / sigma_data)` and
  `t(lambda) = (2 / pi) atan(exp(-lambda / 2) / sigma_data)`. With `sigma_data = 1` it is the
  full-range cosine VP schedule; otherwise it is not variance preserving
  (`alpha² + sigma² / sigma_data² = 1`). t_min = 0; prior N(0, sigma_data² I).
  The sCM objectives and the 'trigflow' prediction kind live in `diffusion_jax.distill.trigflow`.
  """
  sigma_data: float = 0.5
  t_min: float = 0.0

  def __post_init__(self):
    _floats(self, 'sigma_data', 't_min')
    _check(self.sigma_data > 0, type(self), f'need sigma_data > 0, got {self.sigma_data}')

  @property
  def prior_std(self) -> float:
    return self.sigma_data

  def _alpha(self, t, xp):
    return xp.sin(0.5 * math.pi * (1.0 - t))

  def _log_alpha(self, t, xp):
    return xp.log(self._alpha(t, xp))

  def _sigma(self, t, xp):
    return self.sigma_data * xp.sin(0.5 * math.pi * t)

  def _sigma_squared(self, t, xp):
    return self._sigma(t, xp) ** 2

  def _log_snr(self, t, xp):
    return 2.0 * (xp.log(self._alpha(t, xp)) - xp.log(self._sigma(t, xp)))

  def _t_of_log_snr(self, lam, xp):
    """`(2 / pi) atan(exp(-x / 2))` with `x = lambda + 2 log sigma_data`, as `VPCosine` does it:
    the acute angle from `exp(-|x| / 2)`, so neither side overflows."""
    x = lam + 2.0 * math.log(self.sigma_data)
    acute = xp.arctan(xp.exp(-0.5 * xp.abs(x)))
    return xp.where(x >= 0, acute, 0.5 * math.pi - acute) / (0.5 * math.pi)
