"""Training objectives as pure functions: `loss, aux = objective(model_fn, x0, key, cond=None)`.

An objective is configured once (process, prediction kind, how `t` is drawn) and then never
touches devices, optimizers or checkpoints (DESIGN §3). `aux` carries the per-example losses
and the drawn `t` and `log_snr`, so ablations can plot loss against log-SNR.
"""

import functools

import jax
import jax.numpy as jnp

from diffusion_jax import parameterization


def discrete_uniform_t(process, key, batch_size):
  """DDPM's `n ~ Uniform{1, ..., T}` (Ho et al. 2020, Alg. 1), returned as `t = n / T`."""
  n = jax.random.randint(key, (batch_size,), 1, process.num_steps + 1)
  return process.t_of_step(n)


def _mean_per_example(x):
  return jnp.mean(x.reshape(x.shape[0], -1), axis=-1)


def denoising_mse(model_fn, x0, key, cond=None, *, process, kind='eps',
                  t_sampler=discrete_uniform_t):
  """`E_{t, eps} || target_kind(x0, eps) - model(x_t, t) ||²`, mean over dimensions.

  With `kind='eps'` and discrete-uniform `t` this is DDPM's `L_simple` (Ho et al. 2020, Eq. 14).
  Returns the batch mean and `aux = {'loss_per_example', 't', 'log_snr'}`.
  """
  key_t, key_eps = jax.random.split(key)
  t = t_sampler(process, key_t, x0.shape[0])                 # [B]
  eps = jax.random.normal(key_eps, x0.shape, x0.dtype)       # [B, ...]
  x_t = process.marginal(x0, eps, t)
  out = model_fn(x_t, t, cond)
  per_example = _mean_per_example(
      jnp.square(out - parameterization.target(kind, x0, eps, process, t)))
  aux = {'loss_per_example': per_example, 't': t, 'log_snr': process.log_snr(t)}
  return jnp.mean(per_example), aux


def ddpm_eps(process):
  """DDPM `L_simple`: eps-prediction, unweighted, `n ~ U{1..T}` (Ho et al. 2020, Eq. 14)."""
  return functools.partial(denoising_mse, process=process, kind='eps')


def make_objective(name: str, process, **kwargs):
  """Builds a configured objective from its name in `OBJECTIVES`."""
  if name not in OBJECTIVES:
    raise ValueError(f'unknown objective {name!r}; choose from {sorted(OBJECTIVES)}')
  return OBJECTIVES[name](process, **kwargs)


# name -> constructor(process, **kwargs) -> objective(model_fn, x0, key, cond=None).
# The prediction kind the trained network outputs is `PREDICTION_KIND[name]`.
OBJECTIVES = {
    'ddpm_eps': ddpm_eps,
}

PREDICTION_KIND = {
    'ddpm_eps': 'eps',
}
