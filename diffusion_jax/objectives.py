"""Training objectives as pure functions: `loss, aux = objective(model_fn, x0, key, cond=None)`.

An objective is three small choices (DESIGN §3): which `t` to draw (`T_SAMPLERS`), what the
network predicts (a kind from `parameterization`), and how errors are weighted (`WEIGHTINGS`).
Per example it is `w(t) * mean_dims (out - target_kind(x0, eps))²`; the batch mean is the loss.

Every objective reports `aux['eps_weight']`: its weight expressed on the eps-MSE of a
consistent prediction, `w(t) * (kind-MSE / eps-MSE)(t)`, so objectives can be compared on one
axis (log-SNR) in ablations. `aux` also carries `loss_per_example`, `t` and `log_snr`.

Convention: errors are averaged over dimensions (as DDPM's `L_simple`). Papers that sum over
dimensions (score SDE's `reduce_mean=False`, EDM's loss) differ by the constant factor `d`,
which only rescales the learning rate.

An objective never touches devices, optimizers or checkpoints.
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import jax.scipy.stats as jstats
import numpy as np

from diffusion_jax import consistency
from diffusion_jax import elbo
from diffusion_jax import parameterization as param

# --- which t ------------------------------------------------------------------------------
# Each law is a sampler `(process, key, batch_size) -> t [B]` and, beside it, the density of
# `lambda = log_snr(t)` it implies (for Kingma & Gao's weighting view, `weighting.py`).


def _dt_dlambda(process, lam):
  _, dt = jax.jvp(process.t_of_log_snr, (lam,), (jnp.ones_like(lam),))
  return jnp.abs(dt)


def discrete_uniform_t(process, key, batch_size):
  """DDPM's `n ~ Uniform{1, ..., T}` (Ho et al. 2020, Alg. 1), returned as `t = n / T`."""
  n = jax.random.randint(key, (batch_size,), 1, process.num_steps + 1)
  return process.t_of_step(n)


def discrete_uniform_density(process, lam):
  """`p(lambda)` of `discrete_uniform_t`, treating `n / T` as uniform on (0, 1] (T -> inf)."""
  return _dt_dlambda(process, lam)


def uniform_t(process, key, batch_size, t_min=None):
  """`t ~ U(t_min, 1)` (Song et al. 2021, Eq. 7), `t_min` defaulting to the process's."""
  t_min = process.t_min if t_min is None else t_min
  return jax.random.uniform(key, (batch_size,), jnp.float32, t_min, 1.0)


def uniform_density(process, lam, t_min=None):
  """`p(lambda)` of `uniform_t`: `|dt / d lambda| / (1 - t_min)` inside `[t_min, 1]`."""
  t_min = process.t_min if t_min is None else t_min
  t = process.t_of_log_snr(lam)
  inside = (t >= t_min) & (t <= 1.0)
  return jnp.where(inside, _dt_dlambda(process, lam) / (1.0 - t_min), 0.0)


def logit_normal_t(process, key, batch_size, mean=0.0, std=1.0):
  """`t = sigmoid(u)`, `u ~ N(mean, std²)` (Esser et al. 2024, SD3, Eq. 19)."""
  del process
  return jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch_size,)))


def logit_normal_density(process, lam, mean=0.0, std=1.0):
  """`p(lambda)` of `logit_normal_t`: `N(logit t; mean, std²) / (t (1 - t)) |dt / d lambda|`."""
  t = process.t_of_log_snr(lam)
  u = jnp.log(t) - jnp.log1p(-t)
  return jstats.norm.pdf(u, mean, std) / (t * (1 - t)) * _dt_dlambda(process, lam)


def log_normal_t(process, key, batch_size, p_mean=-1.2, p_std=1.2):
  """EDM's `ln sigma~ ~ N(P_mean, P_std²)` (Karras et al. 2022, Table 1), on any process.

  `sigma~ = sigma / alpha = exp(-lambda / 2)`, so `t = t(lambda = -2 ln sigma~)`; for EDM's own
  process (`alpha = 1`, `sigma = sigma_max t`) this is `t = sigma / sigma_max`.
  """
  log_sigma = p_mean + p_std * jax.random.normal(key, (batch_size,))
  return process.t_of_log_snr(-2.0 * log_sigma)


def log_normal_density(process, lam, p_mean=-1.2, p_std=1.2):
  """`p(lambda)` of `log_normal_t`: `ln sigma~ = -lambda/2` gives `½ N(-lambda/2; P_mean, P_std²)`.
  """
  del process
  return 0.5 * jstats.norm.pdf(-0.5 * lam, p_mean, p_std)


@dataclasses.dataclass(frozen=True)
class TimeLaw:
  """How an objective draws `t`: `sample(process, key, batch_size) -> t [B]` and the density
  `log_snr_density(process, lam)` of `lambda = log_snr(t)` that this implies."""
  name: str
  sample: Callable
  log_snr_density: Callable


def time_law(name: str, **kwargs) -> TimeLaw:
  """The named law of `t` (a `T_SAMPLERS` key) with its parameters, sampler and density alike."""
  if name not in T_SAMPLERS:
    raise ValueError(f'unknown t-sampler {name!r}; choose from {sorted(T_SAMPLERS)}')
  sample, density = T_SAMPLERS[name]
  return TimeLaw(name, functools.partial(sample, **kwargs), functools.partial(density, **kwargs))


T_SAMPLERS = {
    'discrete_uniform': (discrete_uniform_t, discrete_uniform_density),
    'uniform': (uniform_t, uniform_density),
    'logit_normal': (logit_normal_t, logit_normal_density),
    'log_normal': (log_normal_t, log_normal_density),
}

# --- how errors are weighted ---------------------------------------------------------------


def eps_mse_factor(kind, process, t, sigma_data=param.SIGMA_DATA):
  """`kind-MSE / eps-MSE` for a consistent prediction (one with `x_t = alpha x0^ + sigma eps^`).

  From `e_x0 = -(sigma / alpha) e_eps`: x0 `1/SNR`; v `(alpha² + sigma²)² / alpha²` (= 1 + 1/SNR
  for VP); score `1 / sigma²`; velocity `(sigma' - alpha' sigma / alpha)²` (= 1/(1-t)² for the
  linear interpolant); edm `(sigma / alpha)² / c_out²`.
  """
  alpha, sigma, d_alpha, d_sigma = param.path_coefficients(process, t)
  if kind == 'eps':
    return jnp.ones_like(t)
  if kind == 'x0':
    return (sigma / alpha) ** 2
  if kind == 'v':
    return (alpha**2 + sigma**2) ** 2 / alpha**2
  if kind == 'score':
    return 1.0 / sigma**2
  if kind == 'velocity':
    return (d_sigma - d_alpha * sigma / alpha) ** 2
  if kind == 'edm':
    _, c_out, _, _ = param.edm_coefficients(process, t, sigma_data)
    return (sigma / alpha) ** 2 / c_out**2
  raise ValueError(f'unknown prediction kind {kind!r}')


def no_weighting(process, t, kind):
  del process, kind
  return jnp.ones_like(t)


def min_snr_weighting(process, t, kind, gamma=5.0):
  """Min-SNR-γ (Hang et al. 2023, Eq. 8): eps-MSE weight `min(SNR, γ) / SNR`, on any kind.

  Gives their per-kind forms: eps `min(SNR, γ)/SNR`, x0 `min(SNR, γ)`, v `min(SNR, γ)/(SNR+1)`.
  """
  snr = jnp.exp(process.log_snr(t))
  return jnp.minimum(snr, gamma) / snr / eps_mse_factor(kind, process, t)


def sigma2_weighting(process, t, kind):
  """DSM's `lambda(t) = sigma(t)²` (Song et al. 2021, Eq. 7 and §3.3) on the score-MSE."""
  del kind
  return process.sigma(t) ** 2


def likelihood_weighting(process, t, kind):
  """`lambda(t) = g(t)²` (Song et al. 2021b, Thm. 1): DSM then bounds the negative log-lik."""
  del kind
  return process.diffusion_squared(t)


WEIGHTINGS = {
    'none': no_weighting,
    'min_snr': min_snr_weighting,
    'sigma2': sigma2_weighting,
    'likelihood': likelihood_weighting,
}

# --- couplings ------------------------------------------------------------------------------


def _assignment(cost):
  from scipy import optimize  # pylint: disable=g-import-not-at-top
  _, cols = optimize.linear_sum_assignment(np.asarray(cost, np.float64))
  return cols.astype(np.int32)


def ot_pairing(x0, eps):
  """Reorders `eps` to the exact minibatch OT plan against `x0` (Tong et al. 2023, Alg. 3).

  With uniform weights on equal batches the optimal plan for the squared Euclidean cost is a
  permutation: an exact linear assignment (scipy's, through `jax.pure_callback`, so it runs
  under `jit`; it is not differentiated, as in the paper).

  Deviation from torchcfm: it draws the pairs as a sample from the plan (`pi` as a categorical
  over index pairs, with replacement); here the whole optimal permutation is used, so every
  `x0` and every `eps` appears exactly once per batch.
  """
  if x0.shape != eps.shape:
    raise ValueError(f'ot_pairing: x0 {x0.shape} and eps {eps.shape} must have one shape (the '
                     'plan between equal batches is a permutation)')
  a, b = x0.reshape(x0.shape[0], -1), eps.reshape(eps.shape[0], -1)
  cost = jnp.sum(a**2, 1)[:, None] + jnp.sum(b**2, 1)[None, :] - 2.0 * a @ b.T
  cols = jax.pure_callback(_assignment, jax.ShapeDtypeStruct((x0.shape[0],), jnp.int32),
                           jax.lax.stop_gradient(cost))
  return eps[cols]


# --- the objective --------------------------------------------------------------------------


def _mean_per_example(x):
  return jnp.mean(x.reshape(x.shape[0], -1), axis=-1)


def denoising_loss(model_fn, x0, key, cond=None, *, process, kind='eps',
                   t_sampler=discrete_uniform_t, weighting=no_weighting,
                   sigma_data=param.SIGMA_DATA, ot_coupling=False):
  """`E_{t, eps} w(t) mean_d (model(x_t, t) - target_kind(x0, eps))²` over the batch.

  `model_fn(x_in, t_in, cond)` sees `param.network_input(kind, ...)`: `(x_t, t)` for every kind
  but `edm`. Returns the batch mean and `aux` (per-example losses, `t`, `log_snr`,
  `eps_weight`).
  """
  key_t, key_eps = jax.random.split(key)
  t = t_sampler(process, key_t, x0.shape[0])                 # [B]
  eps = jax.random.normal(key_eps, x0.shape, x0.dtype)       # [B, ...]
  if ot_coupling:
    eps = ot_pairing(x0, eps)
  x_t = process.marginal(x0, eps, t)
  out = model_fn(*param.network_input(kind, x_t, t, process, sigma_data), cond)
  tgt = param.target(kind, x0, eps, process, t, sigma_data)
  w = weighting(process, t, kind)                            # [B]
  per_example = w * _mean_per_example(jnp.square(out - tgt))
  aux = {'loss_per_example': per_example, 't': t, 'log_snr': process.log_snr(t),
         'eps_weight': w * eps_mse_factor(kind, process, t, sigma_data)}
  return jnp.mean(per_example), aux


# --- the objective record -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Objective:
  """A configured objective: its loss and every fact the rest of the code needs about it.

  `loss(model_fn, x0, key, cond=None, **kw) -> (loss, aux)` is the pure function (calling the
  record calls it); `kind` says what the network outputs (`parameterization`), with
  `sigma_data` for the preconditioned kinds ('edm', 'consistency'); `learned_variance` means
  the network outputs `2C` channels (a prediction and Nichol & Dhariwal's `v`); `takes_step`
  means the loss takes the training step as `step=` (consistency training's curriculum).
  For objectives that are a weighted eps-MSE (Kingma & Gao 2023), `time` is the law of `t`
  and `eps_weight(t)` the weight on the per-dimension eps-MSE; both are None otherwise.
  `make_denoiser(model_fn, process, objective)` builds the sampling denoiser from this record,
  so training and sampling cannot disagree.
  """
  name: str
  loss: Callable
  process: Any
  kind: str
  sigma_data: float = param.SIGMA_DATA
  learned_variance: bool = False
  takes_step: bool = False
  time: TimeLaw | None = None
  eps_weight: Callable | None = None

  def __post_init__(self):
    if not self.sigma_data > 0:    # also refuses NaN
      raise ValueError(f'objective {self.name!r}: sigma_data={self.sigma_data!r} must be > 0 '
                       '(the data standard deviation of the EDM preconditioning)')

  def __call__(self, model_fn, x0, key, cond=None, **kwargs):
    for leaf in jax.tree_util.tree_leaves(cond):   # one condition per example
      if jnp.ndim(leaf) and jnp.shape(leaf)[0] != jnp.shape(x0)[0]:
        raise ValueError(f'objective {self.name!r}: cond has {jnp.shape(leaf)[0]} rows for a '
                         f'batch of {jnp.shape(x0)[0]} examples')
    return self.loss(model_fn, x0, key, cond, **kwargs)


def _weighted_mse(name, process, kind, time: TimeLaw, weighting=no_weighting,
                  sigma_data=param.SIGMA_DATA, ot_coupling=False) -> Objective:
  loss = functools.partial(denoising_loss, process=process, kind=kind, t_sampler=time.sample,
                           weighting=weighting, sigma_data=sigma_data, ot_coupling=ot_coupling)

  def eps_weight(t):
    return weighting(process, t, kind) * eps_mse_factor(kind, process, t, sigma_data)
  return Objective(name, loss, process, kind, sigma_data=sigma_data, time=time,
                   eps_weight=eps_weight)


# --- named presets: each reproduces its paper ------------------------------------------------


def _default_time(process) -> TimeLaw:
  return time_law('discrete_uniform' if hasattr(process, 'num_steps') else 'uniform')


def _weighting(min_snr_gamma):
  if min_snr_gamma is None:
    return no_weighting
  return functools.partial(min_snr_weighting, gamma=float(min_snr_gamma))


def ddpm_eps(process, min_snr_gamma=None) -> Objective:
  """DDPM `L_simple`: eps-MSE, `n ~ U{1..T}` (Ho et al. 2020, Eq. 14)."""
  return _weighted_mse('ddpm_eps', process, 'eps', _default_time(process),
                       _weighting(min_snr_gamma))


def ddpm_x0(process, min_snr_gamma=None) -> Objective:
  """x0-MSE, `n ~ U{1..T}` (Ho et al. 2020, §3.2 "predicting x0" ablation)."""
  return _weighted_mse('ddpm_x0', process, 'x0', _default_time(process),
                       _weighting(min_snr_gamma))


def v_prediction(process, min_snr_gamma=None) -> Objective:
  """v-MSE, v = alpha eps - sigma x0 (Salimans & Ho 2022, §4 and App. D)."""
  return _weighted_mse('v_prediction', process, 'v', _default_time(process),
                       _weighting(min_snr_gamma))


def dsm(process, weighting='sigma2', t_min=None) -> Objective:
  """Denoising score matching on an SDE (Song et al. 2021, Eq. 7): `lambda(t) E||s - grad||²`.

  `weighting='sigma2'` is `lambda = sigma²` (their default); `'likelihood'` is `lambda = g²`
  (Song et al. 2021b). `t ~ U(t_min, 1)`, `t_min` defaulting to the process's.
  """
  if weighting not in ('sigma2', 'likelihood'):
    raise ValueError(f"dsm: weighting={weighting!r}; choose 'sigma2' or 'likelihood'")
  return _weighted_mse('dsm', process, 'score', time_law('uniform', t_min=t_min),
                       WEIGHTINGS[weighting])


def edm(process, p_mean=-1.2, p_std=1.2, sigma_data=param.SIGMA_DATA) -> Objective:
  """EDM (Karras et al. 2022, Eq. 8, Table 1): `lambda(s) ||D(x; s) - x0||²`, ln s ~ N(-1.2, 1.2²).

  With `lambda = 1 / c_out²` the loss on the raw network `F` has weight 1, which is how it is
  computed here (kind 'edm'). `sigma_data` travels with the record to the sampling denoiser.
  """
  return _weighted_mse('edm', process, 'edm',
                       time_law('log_normal', p_mean=p_mean, p_std=p_std),
                       sigma_data=float(sigma_data))


def _flow_time(t_sampling, logit_mean, logit_std) -> TimeLaw:
  if t_sampling == 'uniform':
    return time_law('uniform', t_min=0.0)
  if t_sampling == 'logit_normal':
    return time_law('logit_normal', mean=logit_mean, std=logit_std)
  raise ValueError(f"t_sampling={t_sampling!r}; choose 'uniform' or 'logit_normal'")


def flow_matching(process, t_sampling='uniform', logit_mean=0.0, logit_std=1.0) -> Objective:
  """Conditional flow matching / rectified flow (Lipman et al. 2023, Eq. 23; Liu et al. 2023).

  Regresses the path velocity `alpha' x0 + sigma' eps` (= eps - x0 on the linear interpolant),
  `t ~ U(0, 1)` or logit-normal (`t_sampling='logit_normal'`, Esser et al. 2024).
  """
  return _weighted_mse('flow_matching', process, 'velocity',
                       _flow_time(t_sampling, logit_mean, logit_std))


def ot_flow_matching(process, t_sampling='uniform', logit_mean=0.0,
                     logit_std=1.0) -> Objective:
  """OT-CFM (Tong et al. 2023, Alg. 3): flow matching on minibatch-OT-paired (x0, eps)."""
  return _weighted_mse('ot_flow_matching', process, 'velocity',
                       _flow_time(t_sampling, logit_mean, logit_std), ot_coupling=True)


def vdm_elbo(process, t_min=None, t_max: float = 1.0) -> Objective:
  """VDM's continuous-time negative ELBO (`elbo.vdm_elbo`): eps-prediction, Kingma & Gao's
  `w(lambda) = 1` (uniform t on `[t0, t_max]`, eps weight `½ (t_max - t0) (-lambda'(t))`)."""
  t0 = elbo.vdm_t0(process, t_min)

  def eps_weight(t):
    _, d_lambda = jax.jvp(process.log_snr, (t,), (jnp.ones_like(t),))
    return 0.5 * (t_max - t0) * (-d_lambda)
  time = TimeLaw('uniform', functools.partial(uniform_t, t_min=t0),
                 functools.partial(_uniform_between_density, t_lo=t0, t_hi=t_max))
  return Objective('vdm_elbo', elbo.vdm_elbo(process, t0, t_max), process, 'eps', time=time,
                   eps_weight=eps_weight)


def _uniform_between_density(process, lam, t_lo, t_hi):
  t = process.t_of_log_snr(lam)
  inside = (t >= t_lo) & (t <= t_hi)
  return jnp.where(inside, _dt_dlambda(process, lam) / (t_hi - t_lo), 0.0)


def ddpm_vlb(process, variance: str = 'small') -> Objective:
  """DDPM's `L_vlb` (`elbo.ddpm_vlb`); `variance='learned'` makes the network output `2C`."""
  return Objective('ddpm_vlb', elbo.ddpm_vlb(process, variance), process, 'eps',
                   learned_variance=variance == 'learned')


def ddpm_hybrid(process, vlb_weight: float = 0.001) -> Objective:
  """Nichol & Dhariwal's `L_hybrid` (`elbo.ddpm_hybrid`): `2C` outputs, (eps, v)."""
  return Objective('ddpm_hybrid', elbo.ddpm_hybrid(process, vlb_weight), process, 'eps',
                   learned_variance=True)


def consistency_training(process, total_steps: int, sigma_data: float = param.SIGMA_DATA,
                         **kwargs) -> Objective:
  """Consistency training (`consistency.consistency_training`); the loss takes `step=`."""
  loss = consistency.consistency_training(process, total_steps, sigma_data=sigma_data, **kwargs)
  return Objective('consistency_training', loss, process, 'consistency',
                   sigma_data=float(sigma_data), takes_step=True)


def consistency_distillation(process, teacher, sigma_data: float = param.SIGMA_DATA,
                             **kwargs) -> Objective:
  """Consistency distillation (`consistency.consistency_distillation`) from a `teacher`
  denoiser; the loss takes `step=` (unused) and an optional EMA `target_model_fn`."""
  loss = consistency.consistency_distillation(process, teacher, sigma_data=sigma_data,
                                              **kwargs)
  return Objective('consistency_distillation', loss, process, 'consistency',
                   sigma_data=float(sigma_data), takes_step=True)


def make_objective(name: str, process, **kwargs) -> Objective:
  """Builds the configured `Objective` named `name` in `OBJECTIVES`."""
  if name not in OBJECTIVES:
    raise ValueError(f'unknown objective {name!r}; choose from {sorted(OBJECTIVES)}')
  try:
    objective = OBJECTIVES[name](process, **kwargs)
  except TypeError as e:
    raise ValueError(f'objective {name!r}: {e}') from None
  return dataclasses.replace(objective, name=name)


# name -> constructor(process, **kwargs) -> Objective.
OBJECTIVES = {
    'ddpm_eps': ddpm_eps,
    'ddpm_x0': ddpm_x0,
    'v_prediction': v_prediction,
    'dsm': dsm,
    'edm': edm,
    'flow_matching': flow_matching,
    'rectified_flow': flow_matching,
    'ot_flow_matching': ot_flow_matching,
    'vdm_elbo': vdm_elbo,
    'ddpm_vlb': ddpm_vlb,
    'ddpm_hybrid': ddpm_hybrid,
    'consistency_training': consistency_training,
    'consistency_distillation': consistency_distillation,
}

# The objectives that learn from a trained model: their constructors take the teacher's
# `parameterization.Denoiser` as `teacher=` (a run gets it from `config.teacher`).
NEEDS_TEACHER = frozenset({'consistency_distillation', 'progressive_distillation', 'reflow',
                           'scm_distillation', 'dmd'})
# Of those, the ones that use only the teacher's whole noise -> data map (not its denoiser on
# the student's path) or convert it exactly by log-SNR (sCD), so the teacher may come from
# another process; they take that process as `teacher_process=`.
ANY_TEACHER_PROCESS = frozenset({'reflow', 'scm_distillation'})
# Objectives whose networks map noise to data in one or a few jumps (consistency models, DMD
# generators, MeanFlow, shortcut models): not denoisers of the probability-flow ODE, so no
# distillation can learn from them as a teacher.
FEW_STEP_MAPS = frozenset({'consistency_training', 'consistency_distillation', 'scm_training',
                           'scm_distillation', 'dmd', 'meanflow', 'shortcut'})
# DMD trains a fake score beside its generator with the teacher's own objective
# (`fake_objective=`), and checks the teacher's process itself (`teacher_process=`).
TAKES_TEACHER_OBJECTIVE = frozenset({'dmd'})

# The few-step methods (`diffusion_jax.distill`) build on the record above, so they register
# here, after it exists.
from diffusion_jax.distill import dmd as _dmd  # noqa: E402
from diffusion_jax.distill import meanflow as _meanflow  # noqa: E402
from diffusion_jax.distill import progressive as _progressive  # noqa: E402
from diffusion_jax.distill import reflow as _reflow  # noqa: E402
from diffusion_jax.distill import shortcut as _shortcut  # noqa: E402
from diffusion_jax.distill import trigflow as _trigflow  # noqa: E402

OBJECTIVES.update({
    'progressive_distillation': _progressive.progressive_distillation,
    'reflow': _reflow.reflow,
    'scm_training': _trigflow.scm_training,
    'scm_distillation': _trigflow.scm_distillation,
    'dmd': _dmd.dmd,
    'meanflow': _meanflow.meanflow,
    'shortcut': _shortcut.shortcut,
})
