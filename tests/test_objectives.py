"""DDPM L_simple against its closed-form minimum on Gaussian data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import analytic
from diffusion_jax import objectives
from diffusion_jax import processes

MU = jnp.array([0.8, -0.4, 0.0, 0.3])
S2 = jnp.array([0.05, 0.3, 1.0, 2.0])


def _data(key, n):
  return MU + jnp.sqrt(S2) * jax.random.normal(key, (n, 4))


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_eps_loss_at_optimal_denoiser_is_closed_form_minimum(schedule):
  """At eps_hat = E[eps | x_t], L_simple = E_n mean_d alpha_n² s_d² / (alpha_n² s_d² + sigma_n²).

  The Monte-Carlo loss must agree with the exact expectation over n ~ U{1..T} within 5
  standard errors; a slightly wrong model (eps_hat scaled by 1.2) must be detectably worse.
  """
  proc = processes.DiscreteVP.from_name(schedule, 1000)
  truth = analytic.gaussian_denoiser(MU, S2, proc)
  optimal = lambda x, t, c: truth(x, t)[1]
  objective = objectives.make_objective('ddpm_eps', proc)
  k_data, k_obj = jax.random.split(jax.random.key(0))
  x0 = _data(k_data, 400_000)
  loss, aux = jax.jit(lambda k: objective(optimal, x0, k))(k_obj)

  t_all = proc.t_of_step(jnp.arange(1, 1001))
  exact = float(jnp.mean(analytic.gaussian_eps_mse_minimum(S2, proc, t_all)))
  se = float(jnp.std(aux['loss_per_example'])) / np.sqrt(x0.shape[0])
  assert abs(float(loss) - exact) < 5 * se, (float(loss), exact, se)

  worse, _ = jax.jit(lambda k: objective(lambda x, t, c: 1.2 * optimal(x, t, c), x0, k))(k_obj)
  assert float(worse) - float(loss) > 10 * se


def test_aux_reports_t_on_ddpm_grid_and_log_snr():
  proc = processes.DiscreteVP.from_name('linear', 1000)
  objective = objectives.make_objective('ddpm_eps', proc)
  x0 = _data(jax.random.key(1), 4096)
  loss, aux = objective(lambda x, t, c: jnp.zeros_like(x), x0, jax.random.key(2))
  n = np.asarray(aux['t']) * 1000
  np.testing.assert_allclose(n, np.round(n), atol=1e-3)
  assert n.min() >= 1 and n.max() <= 1000 and len(np.unique(np.round(n))) > 900
  np.testing.assert_allclose(aux['log_snr'], proc.log_snr(aux['t']), rtol=1e-6)
  assert aux['loss_per_example'].shape == (4096,)
  # With a zero model the loss is E||eps||²/d = 1.
  assert abs(float(loss) - 1.0) < 5 * np.sqrt(2 / (4 * 4096))


def test_unknown_objective():
  with pytest.raises(ValueError, match='unknown objective'):
    objectives.make_objective('ddpm_noise', None)
