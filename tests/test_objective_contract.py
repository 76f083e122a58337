"""The `Objective` record is the one place a trained network's meaning lives (issue 16).

Regression: EDM with `sigma_data = 1.0` trained with that preconditioning while sampling,
evaluation and likelihood built their denoiser with the default 0.5. Here the denoiser every
consumer builds (`make_denoiser(model_fn, process, objective)`) is checked against EDM's
Table 1 written out in the test, and a real training run's sampling and likelihood are checked
to use the objective's `sigma_data`.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ablation_toy2d
from diffusion_jax import generation
from diffusion_jax import objectives
from diffusion_jax import parameterization
from diffusion_jax import processes
from diffusion_jax import samplers
from diffusion_jax import train_loop
from diffusion_jax import training
from diffusion_jax.samplers import likelihood

MU = np.array([0.3, -0.7])
S2 = np.array([0.5, 2.0])


def _oracle_network(sigma_data):
  """The raw EDM network `F` whose preconditioned output (Karras et al. 2022, Eq. 7, Table 1,
  with `sigma_data`) is the exact denoiser of `N(MU, diag(S2))` on EDM's process (alpha = 1):
  `D(x; s) = MU + S2 / (S2 + s²) (x - MU)`, and `F = (D - c_skip x) / c_out`."""
  def model_fn(x_in, c_noise, cond):
    del cond
    s = jnp.exp(4.0 * c_noise)[:, None]                      # c_noise = ln(s) / 4
    norm = s**2 + sigma_data**2
    x = x_in * jnp.sqrt(norm)                               # c_in = 1 / sqrt(s² + sd²)
    d = MU + S2 / (S2 + s**2) * (x - MU)
    c_skip, c_out = sigma_data**2 / norm, s * sigma_data / jnp.sqrt(norm)
    return (d - c_skip * x) / c_out
  return model_fn


@pytest.mark.parametrize('sigma_data', [0.5, 1.0])
def test_denoiser_from_the_objective_uses_its_sigma_data(sigma_data):
  with jax.enable_x64(True):
    proc = processes.EDM()
    objective = objectives.make_objective('edm', proc, sigma_data=sigma_data)
    assert objective.sigma_data == sigma_data and objective.kind == 'edm'
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 2)) * 3.0)
    t = jnp.asarray(np.random.default_rng(1).uniform(proc.t_min, 1.0, 64))
    s = np.asarray(t)[:, None] * proc.sigma_max
    exact = MU + S2 / (S2 + s**2) * (np.asarray(x) - MU)
    den = parameterization.make_denoiser(_oracle_network(sigma_data), proc, objective)
    np.testing.assert_allclose(den(x, t)[0], exact, rtol=1e-10, atol=1e-10)
    # The other preconditioning is far off: the check can fail.
    other = parameterization.make_denoiser(_oracle_network(sigma_data), proc, 'edm',
                                           sigma_data=1.5 - sigma_data)
    assert np.max(np.abs(np.asarray(other(x, t)[0]) - exact)) > 0.1


def test_objective_carries_what_the_loop_and_samplers_need():
  vp = processes.make_process('vp_discrete')
  edm = processes.EDM()
  assert objectives.make_objective('ddpm_eps', vp).kind == 'eps'
  assert objectives.make_objective('ddpm_hybrid', vp).learned_variance
  assert objectives.make_objective('ddpm_vlb', vp, variance='learned').learned_variance
  assert not objectives.make_objective('ddpm_vlb', vp).learned_variance
  ct = objectives.make_objective('consistency_training', edm, total_steps=10)
  assert ct.kind == 'consistency' and ct.takes_step
  assert objectives.make_objective('rectified_flow', processes.make_process('linear')).name \
      == 'rectified_flow'
  with pytest.raises(ValueError, match='sigma_data and learned_variance come from the objective'):
    parameterization.make_denoiser(lambda *a: a[0], edm, objectives.make_objective('edm', edm),
                                   sigma_data=1.0)


def test_train_step_passes_the_step_only_to_objectives_that_take_it():
  seen = []

  def loss(model_fn, x0, key, cond=None, **kw):
    seen.append(sorted(kw))
    return jnp.sum(model_fn(x0, jnp.zeros(x0.shape[:1]), cond)), {}
  apply_fn = lambda v, x, t, c, **kw: v['params']['w'] * x
  opt, ema = training.make_optimizer(training.OptimConfig(), 10), training.ema(0.9)
  for takes_step in (False, True):
    objective = objectives.Objective('toy', loss, None, 'eps', takes_step=takes_step)
    state = training.init_train_state({'w': jnp.ones(())}, opt, ema, jax.random.key(0))
    training.make_train_step(objective, apply_fn, opt, ema)(state, {'image': jnp.ones((2, 2))})
  assert seen == [[], ['step']]


@pytest.mark.slow   # ~8-16 s; moved out of the default run (its 10-minute budget)
def test_trained_edm_run_samples_and_measures_likelihood_with_its_sigma_data(tmp_path):
  """Train EDM (sigma_data = 1.0) on the 2-D mixture through the loop, restore it, and check
  that the run's sampler and the likelihood see the sigma_data = 1.0 denoiser (they used 0.5)."""
  config = ablation_toy2d.get_config()
  del config.ablation            # a plain training run of the ablation's 2-D set-up
  config.process = dict(name='edm')
  config.objective = dict(name='edm', sigma_data=1.0)
  config.model = dict(name='mlp', hidden=32, depth=2)
  config.train.update(num_steps=6, batch_size=32, checkpoint_every=3, log_every=3)
  config.sample.update(sampler='heun', steps=4, grid_size=0)
  config.eval.enabled = False
  train_loop.train_and_evaluate(config, str(tmp_path))
  setup, state, step = train_loop.load_checkpoint(config, str(tmp_path))
  assert step == 6 and setup.objective.sigma_data == 1.0
  params = state.ema_params
  # A trained MLP's last layer is not zero, so the preconditioning shows in its outputs.
  model_fn = lambda x, t, c: setup.model.apply({'params': params}, x, t, c)

  def manual(sigma_data):
    return parameterization.make_denoiser(model_fn, setup.process, 'edm', sigma_data=sigma_data)

  z = jax.random.normal(jax.random.key(3), (16, 2))
  key = jax.random.key(4)
  got = generation.make_sample_fn(setup)(params, z, key)
  x_T = setup.process.prior_std * z
  want = samplers.heun_sample(manual(1.0), setup.process, x_T, key, steps=4)[0]
  wrong = samplers.heun_sample(manual(0.5), setup.process, x_T, key, steps=4)[0]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.max(np.abs(np.asarray(got) - np.asarray(wrong))) > 1e-2

  # The likelihood is a deterministic function of the denoiser it is given: the one evaluate's
  # NLL builds is the sigma_data = 1.0 denoiser (and not the 0.5 one) wherever it is evaluated.
  run_den = generation.make_model_denoiser(setup, params)
  x = 3.0 * jax.random.normal(jax.random.key(5), (64, 2))
  t = jax.random.uniform(jax.random.key(6), (64,), minval=setup.process.t_min, maxval=1.0)
  np.testing.assert_allclose(run_den(x, t)[0], manual(1.0)(x, t)[0], rtol=1e-6, atol=1e-6)
  assert np.max(np.abs(np.asarray(run_den(x, t)[0] - manual(0.5)(x, t)[0]))) > 1e-2
  logp = likelihood.log_likelihood(run_den, setup.process, x[:8], rtol=1e-4, atol=1e-4)[0]
  assert math.isfinite(float(np.sum(logp)))
