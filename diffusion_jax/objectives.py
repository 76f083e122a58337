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

import functools

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import consistency
from diffusion_jax import elbo
from diffusion_jax import parameterization as param

# --- which t ------------------------------------------------------------------------------


def discrete_uniform_t(process, key, batch_size):
  """DDPM's `n ~ Uniform{1, ..., T}` (Ho et al. 2020, Alg. 1), returned as `t = n / T`."""
  n = jax.random.randint(key, (batch_size,), 1, process.num_steps + 1)
  return process.t_of_step(n)


def uniform_t(process, key, batch_size, t_min=None):
  """`t ~ U(t_min, 1)` (Song et al. 2021, Eq. 7 with `t_min = 1e-5`)."""
  t_min = process.t_min if t_min is None else t_min
  return jax.random.uniform(key, (batch_size,), jnp.float32, t_min, 1.0)


def logit_normal_t(process, key, batch_size, mean=0.0, std=1.0):
  """`t = sigmoid(u)`, `u ~ N(mean, std²)` (Esser et al. 2024, SD3, Eq. 19)."""
  del process
  return jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch_size,)))


def log_normal_t(process, key, batch_size, p_mean=-1.2, p_std=1.2):
  """EDM's `ln sigma~ ~ N(P_mean, P_std²)` (Karras et al. 2022, Table 1), on any process.

  `sigma~ = sigma / alpha = exp(-lambda / 2)`, so `t = t(lambda = -2 ln sigma~)`; for EDM's own
  process (`alpha = 1`, `sigma = sigma_max t`) this is `t = sigma / sigma_max`.
  """
  log_sigma = p_mean + p_std * jax.random.normal(key, (batch_size,))
  return process.t_of_log_snr(-2.0 * log_sigma)


T_SAMPLERS = {
    'discrete_uniform': discrete_uniform_t,
    'uniform': uniform_t,
    'logit_normal': logit_normal_t,
    'log_normal': log_normal_t,
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
  """
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


# --- named presets: each reproduces its paper ------------------------------------------------


def _default_t_sampler(process):
  return discrete_uniform_t if hasattr(process, 'num_steps') else uniform_t


def _weighting(min_snr_gamma):
  if min_snr_gamma is None:
    return no_weighting
  return functools.partial(min_snr_weighting, gamma=float(min_snr_gamma))


def _preset(kind):
  def make(process, min_snr_gamma=None):
    return functools.partial(denoising_loss, process=process, kind=kind,
                             t_sampler=_default_t_sampler(process),
                             weighting=_weighting(min_snr_gamma))
  return make


ddpm_eps = _preset('eps')
ddpm_eps.__doc__ = 'DDPM `L_simple`: eps-MSE, `n ~ U{1..T}` (Ho et al. 2020, Eq. 14).'
ddpm_x0 = _preset('x0')
ddpm_x0.__doc__ = 'x0-MSE, `n ~ U{1..T}` (Ho et al. 2020, §3.2 "predicting x0" ablation).'
v_prediction = _preset('v')
v_prediction.__doc__ = 'v-MSE, v = alpha eps - sigma x0 (Salimans & Ho 2022, §4 and App. D).'


def dsm(process, weighting='sigma2', t_min=None):
  """Denoising score matching on an SDE (Song et al. 2021, Eq. 7): `lambda(t) E||s - grad||²`.

  `weighting='sigma2'` is `lambda = sigma²` (their default); `'likelihood'` is `lambda = g²`
  (Song et al. 2021b). `t ~ U(t_min, 1)`, `t_min` defaulting to the process's.
  """
  if weighting not in ('sigma2', 'likelihood'):
    raise ValueError(f"dsm: weighting={weighting!r}; choose 'sigma2' or 'likelihood'")
  return functools.partial(denoising_loss, process=process, kind='score',
                           t_sampler=functools.partial(uniform_t, t_min=t_min),
                           weighting=WEIGHTINGS[weighting])


def edm(process, p_mean=-1.2, p_std=1.2, sigma_data=param.SIGMA_DATA):
  """EDM (Karras et al. 2022, Eq. 8, Table 1): `lambda(s) ||D(x; s) - x0||²`, ln s ~ N(-1.2, 1.2²).

  With `lambda = 1 / c_out²` the loss on the raw network `F` has weight 1, which is how it is
  computed here (kind 'edm').
  """
  return functools.partial(denoising_loss, process=process, kind='edm',
                           t_sampler=functools.partial(log_normal_t, p_mean=p_mean, p_std=p_std),
                           weighting=no_weighting, sigma_data=sigma_data)


def flow_matching(process, t_sampling='uniform', logit_mean=0.0, logit_std=1.0):
  """Conditional flow matching / rectified flow (Lipman et al. 2023, Eq. 23; Liu et al. 2023).

  Regresses the path velocity `alpha' x0 + sigma' eps` (= eps - x0 on the linear interpolant),
  `t ~ U(0, 1)` or logit-normal (`t_sampling='logit_normal'`, Esser et al. 2024).
  """
  return functools.partial(denoising_loss, process=process, kind='velocity',
                           t_sampler=_flow_t_sampler(t_sampling, logit_mean, logit_std),
                           weighting=no_weighting)


def ot_flow_matching(process, t_sampling='uniform', logit_mean=0.0, logit_std=1.0):
  """OT-CFM (Tong et al. 2023, Alg. 3): flow matching on minibatch-OT-paired (x0, eps)."""
  return functools.partial(denoising_loss, process=process, kind='velocity',
                           t_sampler=_flow_t_sampler(t_sampling, logit_mean, logit_std),
                           weighting=no_weighting, ot_coupling=True)


def _flow_t_sampler(t_sampling, logit_mean, logit_std):
  if t_sampling == 'uniform':
    return functools.partial(uniform_t, t_min=0.0)
  if t_sampling == 'logit_normal':
    return functools.partial(logit_normal_t, mean=logit_mean, std=logit_std)
  raise ValueError(f"t_sampling={t_sampling!r}; choose 'uniform' or 'logit_normal'")


def make_objective(name: str, process, **kwargs):
  """Builds a configured objective from its name in `OBJECTIVES`."""
  if name not in OBJECTIVES:
    raise ValueError(f'unknown objective {name!r}; choose from {sorted(OBJECTIVES)}')
  try:
    return OBJECTIVES[name](process, **kwargs)
  except TypeError as e:
    raise ValueError(f'objective {name!r}: {e}') from None


# name -> constructor(process, **kwargs) -> objective(model_fn, x0, key, cond=None).
OBJECTIVES = {
    'ddpm_eps': ddpm_eps,
    'ddpm_x0': ddpm_x0,
    'v_prediction': v_prediction,
    'dsm': dsm,
    'edm': edm,
    'flow_matching': flow_matching,
    'rectified_flow': flow_matching,
    'ot_flow_matching': ot_flow_matching,
    'vdm_elbo': elbo.vdm_elbo,
    'ddpm_vlb': elbo.ddpm_vlb,
    'ddpm_hybrid': elbo.ddpm_hybrid,
    # These two take `step=` (the discretisation curriculum) and, optionally, an EMA
    # `target_model_fn`; distillation also needs a `teacher_denoiser` (not config-buildable).
    'consistency_training': consistency.consistency_training,
    'consistency_distillation': consistency.consistency_distillation,
}

# The prediction kind each named objective's network outputs (what samplers must be told).
PREDICTION_KIND = {
    'ddpm_eps': 'eps', 'ddpm_x0': 'x0', 'v_prediction': 'v', 'dsm': 'score', 'edm': 'edm',
    'flow_matching': 'velocity', 'rectified_flow': 'velocity', 'ot_flow_matching': 'velocity',
    'vdm_elbo': 'eps', 'ddpm_vlb': 'eps', 'ddpm_hybrid': 'eps',  # hybrid: 2C outputs (eps, v)
    'consistency_training': 'consistency', 'consistency_distillation': 'consistency',
}
