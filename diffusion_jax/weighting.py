"""Every objective as a weighting of the eps-MSE over log-SNR (Kingma & Gao 2023, Eq. 7).

Kingma & Gao write a diffusion loss as `L_w = ½ ∫ w(lambda) E||eps - eps_hat||² d lambda`; the
ELBO is `w ≡ 1`. An objective here draws `t ~ p_t` and weights the eps-MSE by `e(t)`
(`Objective.eps_weight`, also reported as `aux['eps_weight']`), so its implied weighting is

  `w(lambda) = 2 e(t(lambda)) p_lambda(lambda)`,  `p_lambda = p_t |dt / d lambda|`,

which is what lets a paper state "objective A = objective B with weighting w". The density of
lambda comes from the objective's `TimeLaw`. DDPM's discrete `n ~ U{1..T}` is treated as
uniform on (0, 1] (exact in the T -> inf limit).
"""

import jax.numpy as jnp

from diffusion_jax import objectives as obj_lib


def implied_weighting(name: str, process, lam, **objective_kwargs):
  """Kingma & Gao's `w(lambda)` of the named objective on `process`, at log-SNRs `lam`.

  Defined for the objectives that are a weighted eps-MSE (those whose `Objective` has `time`
  and `eps_weight`: the `denoising_loss` presets and the VDM ELBO, which gives 1). The discrete
  VLB and the consistency objectives are not.
  """
  lam = jnp.asarray(lam, jnp.float32)
  objective = obj_lib.make_objective(name, process, **objective_kwargs)
  if objective.time is None or objective.eps_weight is None:
    raise ValueError(f'objective {name!r} is not a weighted eps-MSE; no w(lambda) is defined')
  t = process.t_of_log_snr(lam)
  return 2.0 * objective.eps_weight(t) * objective.time.log_snr_density(process, lam)


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
