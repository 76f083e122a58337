"""Every objective as a weighting of the eps-MSE over log-SNR (Kingma & Gao 2023, Eq. 7).

Kingma & Gao write a diffusion loss as `L_w = ½ ∫ w(lambda) E||eps - eps_hat||² d lambda`; the
ELBO is `w ≡ 1`. An objective here draws `t ~ p_t` and weights the eps-MSE by `e(t)`
(`aux['eps_weight']`), so its implied weighting is

  `w(lambda) = 2 e(t(lambda)) p_t(t(lambda)) |dt / d lambda|`,

which is what lets a paper state "objective A = objective B with weighting w". The t-sampler's
density enters through `p_lambda = p_t |dt/d lambda|`. DDPM's discrete `n ~ U{1..T}` is treated
as uniform on (0, 1] (exact in the T -> inf limit).
"""

import functools

import jax
import jax.numpy as jnp
import jax.scipy.stats as jstats

from diffusion_jax import objectives as obj_lib


def _dt_dlambda(process, lam):
  _, dt = jax.jvp(process.t_of_log_snr, (lam,), (jnp.ones_like(lam),))
  return jnp.abs(dt)


def log_snr_density(t_sampler, process, lam):
  """Density of `lambda = log_snr(t)` when `t` is drawn by `t_sampler` (a `T_SAMPLERS` entry,
  possibly a `functools.partial` of one)."""
  fn = t_sampler.func if isinstance(t_sampler, functools.partial) else t_sampler
  kw = t_sampler.keywords if isinstance(t_sampler, functools.partial) else {}
  t = process.t_of_log_snr(lam)
  if fn is obj_lib.log_normal_t:
    # ln sigma~ = -lambda / 2 ~ N(p_mean, p_std²)  =>  p(lambda) = ½ N(-lambda/2; ...).
    return 0.5 * jstats.norm.pdf(-0.5 * lam, kw.get('p_mean', -1.2), kw.get('p_std', 1.2))
  if fn is obj_lib.logit_normal_t:
    u = jnp.log(t) - jnp.log1p(-t)
    p_t = jstats.norm.pdf(u, kw.get('mean', 0.0), kw.get('std', 1.0)) / (t * (1 - t))
    return p_t * _dt_dlambda(process, lam)
  if fn is obj_lib.discrete_uniform_t:
    return _dt_dlambda(process, lam)
  if fn is obj_lib.uniform_t:
    t_min = kw.get('t_min')
    t_min = process.t_min if t_min is None else t_min
    inside = (t >= t_min) & (t <= 1.0)
    return jnp.where(inside, _dt_dlambda(process, lam) / (1.0 - t_min), 0.0)
  raise ValueError(f'no density known for t-sampler {fn!r}')


def implied_weighting(name: str, process, lam, **objective_kwargs):
  """Kingma & Gao's `w(lambda)` of the named objective on `process`, at log-SNRs `lam`.

  Defined for the weighted-MSE objectives (`denoising_loss` presets) and the VDM ELBO (which
  gives exactly 1). The discrete VLB and consistency objectives are not weighted eps-MSEs.
  """
  lam = jnp.asarray(lam, jnp.float32)
  if name == 'vdm_elbo':
    return jnp.ones_like(lam)
  objective = obj_lib.make_objective(name, process, **objective_kwargs)
  if not (isinstance(objective, functools.partial)
          and objective.func is obj_lib.denoising_loss):
    raise ValueError(f'objective {name!r} is not a weighted eps-MSE; no w(lambda) is defined')
  kw = objective.keywords
  t = process.t_of_log_snr(lam)
  e = kw['weighting'](process, t, kw['kind']) * obj_lib.eps_mse_factor(
      kw['kind'], process, t, kw.get('sigma_data', 0.5))
  return 2.0 * e * log_snr_density(kw['t_sampler'], process, lam)


# The objectives `implied_weighting` covers, each on the process its paper uses.
WEIGHTED_OBJECTIVES = {
    'ddpm_eps': ('vp_discrete', {}),
    'ddpm_x0': ('vp_discrete', {}),
    'v_prediction': ('vp_cosine', {}),
    'dsm': ('vp_linear', {}),
    'edm': ('edm', {}),
    'flow_matching': ('linear', {}),
    'vdm_elbo': ('vp_cosine', {}),
}
