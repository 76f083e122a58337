"""Every objective trains the same MLP on a 2-D Gaussian mixture to near the data floor (slow).

Quality is the sliced Wasserstein distance (SW, 512 projections) between 5,000 samples and
5,000 fresh data points; the floor is SW between two independent data draws of that size
(0.055). The bar is SW <= 2.5 x floor. Measured (3,000 Adam steps, batch 512, 100 NFE,
seed 0), in multiples of the floor: ddpm_eps 0.83, ddpm_eps+min-SNR 1.18, ddpm_x0 1.62,
v_prediction 1.13, dsm/vp_linear 1.30, dsm-likelihood 1.39, dsm/ve 2.00, edm 1.40,
flow_matching 1.46, flow_matching logit-normal 1.54, ot_flow_matching 1.26 (its exact 512 x 512
assignment per step makes it ~220 s alone), ddpm_vlb(large) 0.85, vdm_elbo 1.90; consistency
training with one-step sampling 1.63; consistency distillation from an EDM teacher, one step,
1.71.
An untrained model (zero output: its samples are the N(0, I) prior) scores 5.5 x floor, well
above the bar; the last test checks that the bar separates it.
"""


import jax
import jax.numpy as jnp
import optax
import pytest

from diffusion_jax import objectives
from diffusion_jax import parameterization as param
from diffusion_jax import processes
from diffusion_jax import samplers
from diffusion_jax.data import toy2d
from diffusion_jax.metrics.sliced import sliced_wasserstein
from diffusion_jax.models import MLP

pytestmark = pytest.mark.slow

BAR = 2.5
CASES = [
    ('ddpm_eps', {}, 'vp_discrete', 'ddpm'),
    ('ddpm_eps', {'min_snr_gamma': 5.0}, 'vp_discrete', 'ddpm'),
    ('ddpm_x0', {}, 'vp_discrete', 'ddpm'),
    ('v_prediction', {}, 'vp_discrete', 'ddpm'),
    ('dsm', {}, 'vp_linear', 'ddim_continuous'),
    ('dsm', {'weighting': 'likelihood'}, 'vp_linear', 'ddim_continuous'),
    ('dsm', {}, 've', 'ddim_continuous'),
    ('edm', {}, 'edm', 'ddim_continuous'),
    ('flow_matching', {}, 'linear', 'ddim_continuous'),
    ('flow_matching', {'t_sampling': 'logit_normal'}, 'linear', 'ddim_continuous'),
    ('ot_flow_matching', {}, 'linear', 'ddim_continuous'),
    ('ddpm_vlb', {'variance': 'large'}, 'vp_discrete', 'ddpm'),
    ('vdm_elbo', {}, 'vp_cosine', 'ddim_continuous'),
]


def _floor():
  ref = toy2d.eight_gaussians(jax.random.key(4), 5000)
  return ref, float(sliced_wasserstein(jax.random.key(6), toy2d.eight_gaussians(
      jax.random.key(5), 5000), ref))


def _sample_sw(model_fn, proc, kind, sampler):
  den = param.make_denoiser(model_fn, proc, kind)
  x_T = proc.prior_sample(jax.random.key(2), (5000, 2))
  if sampler == 'ddpm':
    xs, _ = jax.jit(lambda x: samplers.ddpm_sample(den, proc, x, jax.random.key(3), steps=100))(
        x_T)
  else:
    xs, _ = jax.jit(lambda x: samplers.euler_sample(den, proc, x, steps=100, grid='log_snr'))(x_T)
  ref, floor = _floor()
  return float(sliced_wasserstein(jax.random.key(6), xs, ref)), floor


def _case_id(c):
  return '-'.join([c[0], c[2]] + [str(v) for v in c[1].values()])


def _train(objective, num_steps=3000):
  """3,000 Adam steps (warm-up, cosine decay) of the shared MLP on fresh mixture batches."""
  model = MLP(hidden=128, depth=3)
  params = model.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros((1,)))['params']
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(
      optax.warmup_cosine_decay_schedule(0.0, 2e-3, 100, num_steps, 2e-4)))
  opt_state = opt.init(params)
  takes_step = objective.takes_step

  @jax.jit
  def step(params, opt_state, key, i):
    k_data, k_obj = jax.random.split(key)
    x0 = toy2d.eight_gaussians(k_data, 512)
    extra = {'step': i} if takes_step else {}
    loss_fn = lambda p: objective(lambda x, t, c: model.apply({'params': p}, x, t, c), x0,
                                  k_obj, **extra)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for i in range(num_steps):
    params, opt_state, loss = step(params, opt_state, jax.random.fold_in(jax.random.key(1), i), i)
  assert bool(jnp.isfinite(loss))
  return params


def _apply(params):
  model = MLP(hidden=128, depth=3)
  return lambda x, t, c: model.apply({'params': params}, x, t, c)


@pytest.mark.parametrize('case', CASES, ids=_case_id)
def test_objective_trains_to_near_the_data_floor(case):
  obj_name, kwargs, proc_name, sampler = case
  proc = processes.make_process(proc_name)
  objective = objectives.make_objective(obj_name, proc, **kwargs)
  params = _train(objective)
  sw, floor = _sample_sw(_apply(params), proc, objective.kind, sampler)
  assert sw <= BAR * floor, (sw, floor, sw / floor)


def test_consistency_training_one_step():
  """iCT (curriculum s0 = 10 -> s1 = 160 over the run) with one-step sampling."""
  proc = processes.make_process('edm')
  params = _train(objectives.make_objective('consistency_training', proc, total_steps=3000,
                                            s1=160))
  x_T = proc.prior_sample(jax.random.key(2), (5000, 2))
  xs, info = jax.jit(lambda x: samplers.consistency_multistep_sample(
      param.make_denoiser(_apply(params), proc, 'consistency'), proc, x, steps=1))(x_T)
  assert info['nfe'] == 1
  ref, floor = _floor()
  sw = float(sliced_wasserstein(jax.random.key(6), xs, ref))
  assert sw <= BAR * floor, (sw, floor, sw / floor)


def test_consistency_distillation_one_step():
  """CD (Heun teacher steps, N = 18) from an EDM teacher trained on the same task."""
  proc = processes.make_process('edm')
  teacher = param.make_denoiser(_apply(_train(objectives.make_objective('edm', proc))), proc,
                                'edm')
  params = _train(objectives.make_objective('consistency_distillation', proc,
                                            teacher_denoiser=teacher, num_timesteps=18))
  x_T = proc.prior_sample(jax.random.key(2), (5000, 2))
  xs, _ = jax.jit(lambda x: samplers.consistency_multistep_sample(
      param.make_denoiser(_apply(params), proc, 'consistency'), proc, x, steps=1))(x_T)
  ref, floor = _floor()
  sw = float(sliced_wasserstein(jax.random.key(6), xs, ref))
  assert sw <= BAR * floor, (sw, floor, sw / floor)


def test_untrained_model_fails_the_bar():
  proc = processes.make_process('linear')
  sw, floor = _sample_sw(lambda x, t, c: jnp.zeros_like(x), proc, 'velocity', 'ddim_continuous')
  assert sw > 1.5 * BAR * floor  # measured 5.5 x floor: the samples are the N(0, I) prior
