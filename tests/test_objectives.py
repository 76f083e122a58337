"""Objectives against closed forms on Gaussian data, stated equivalences, gradients (DESIGN §6)."""

import itertools

import jax
import jax.test_util  # noqa: F401  (check_grads)
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from diffusion_jax import analytic
from diffusion_jax import objectives
from diffusion_jax import parameterization as param
from diffusion_jax import processes

MU = jnp.array([0.8, -0.4, 0.3])
S2 = jnp.array([0.05, 0.3, 1.5])


def _process(name, **kwargs):
  if name not in processes.PROCESSES:
    pytest.skip(f'process {name!r} not implemented yet')
  return processes.make_process(name, **kwargs)


def _data(key, n):
  return MU + jnp.sqrt(S2) * jax.random.normal(key, (n, 3))


# (objective, kwargs, process name, process kwargs): each objective on the processes it is
# used with in its paper and at least one other.
CASES = [
    ('ddpm_eps', {}, 'vp_discrete', {'schedule': 'linear'}),
    ('ddpm_eps', {}, 'vp_discrete', {'schedule': 'cosine'}),
    ('ddpm_eps', {'min_snr_gamma': 5.0}, 'vp_discrete', {'schedule': 'linear'}),
    ('ddpm_x0', {}, 'vp_discrete', {'schedule': 'cosine'}),
    ('v_prediction', {}, 'vp_discrete', {'schedule': 'cosine'}),
    ('v_prediction', {'min_snr_gamma': 5.0}, 'vp_cosine', {}),
    ('ddpm_x0', {'min_snr_gamma': 5.0}, 'vp_linear', {}),
    ('dsm', {'t_min': 0.02}, 'vp_linear', {}),
    ('dsm', {'t_min': 0.02}, 've', {}),
    ('dsm', {'weighting': 'likelihood', 't_min': 0.02}, 'vp_linear', {}),
    ('dsm', {'weighting': 'likelihood', 't_min': 0.02}, 've', {}),
    ('edm', {}, 'edm', {}),
    ('edm', {}, 'vp_discrete', {'schedule': 'linear'}),
    ('flow_matching', {}, 'linear', {}),
    ('flow_matching', {'t_sampling': 'logit_normal'}, 'linear', {}),
    ('flow_matching', {}, 'vp_cosine', {}),
]


def _case_id(case):
  obj, kw, proc, pkw = case
  parts = [obj] + [f'{k}={v}' for k, v in kw.items()] + [proc] + list(map(str, pkw.values()))
  return '-'.join(parts)


@pytest.mark.parametrize('case', CASES, ids=_case_id)
def test_loss_at_optimal_model_is_closed_form_minimum(case):
  """At the exact E[target | x_t], the loss equals E_t[w(t) mean_d Var(target | x_t)].

  The Monte-Carlo mean over 100,000 examples must match the closed form (evaluated at the drawn
  t, so only the (x0, eps) noise remains) within 5 standard errors of the paired difference; a
  perturbed model (output + 0.1) must be worse by more than 5 standard errors.
  """
  obj_name, kwargs, proc_name, proc_kwargs = case
  proc = _process(proc_name, **proc_kwargs)
  objective = objectives.make_objective(obj_name, proc, **kwargs)
  kind = objective.kind
  optimal = analytic.gaussian_optimal_model(kind, MU, S2, proc)
  perturbed = lambda x, t, c: optimal(x, t, c) + 0.1
  k_data, k_obj = jax.random.split(jax.random.key(0))
  x0 = _data(k_data, 100_000)

  # w(t) is written out per preset in _weight_of, not read from the objective's aux.
  loss, aux, loss_p, aux_p = jax.jit(lambda k: (*objective(optimal, x0, k),
                                                *objective(perturbed, x0, k)))(k_obj)
  t = aux['t']
  weight = _weight_of(obj_name, kwargs, proc, kind, t)
  expected = weight * analytic.gaussian_target_min_mse(kind, S2, proc, t)
  diff = np.asarray(aux['loss_per_example'] - expected, np.float64)
  se = diff.std() / np.sqrt(diff.size)
  assert abs(diff.mean()) < 5 * se + 1e-6 * float(jnp.mean(expected)), (diff.mean(), se)
  gap = np.asarray(aux_p['loss_per_example'] - aux['loss_per_example'], np.float64)
  assert gap.mean() > 5 * gap.std() / np.sqrt(gap.size) and float(loss_p) > float(loss)


def _weight_of(obj_name, kwargs, proc, kind, t):
  """The paper's weight w(t) on the kind-MSE, written out per preset (not read from aux)."""
  if obj_name in ('ddpm_eps', 'ddpm_x0', 'v_prediction') and 'min_snr_gamma' in kwargs:
    snr = jnp.exp(proc.log_snr(t))
    per_kind = {'eps': jnp.minimum(snr, 5.0) / snr, 'x0': jnp.minimum(snr, 5.0),
                'v': jnp.minimum(snr, 5.0) / (snr + 1.0)}   # Hang et al. 2023, Eqs. 8-10 (VP)
    return per_kind[kind]
  if obj_name == 'dsm':
    if kwargs.get('weighting') == 'likelihood':
      return proc.diffusion_squared(t)
    return proc.sigma(t) ** 2
  return jnp.ones_like(t)


def test_min_snr_v_weight_is_papers_form_on_vp():
  """Our generic min-SNR (eps weight / kind factor) equals Hang et al.'s v form on VP."""
  proc = processes.DiscreteVP.from_name('cosine', 1000)
  t = jnp.linspace(0.01, 0.99, 50)
  snr = jnp.exp(proc.log_snr(t))
  np.testing.assert_allclose(objectives.min_snr_weighting(proc, t, 'v', gamma=5.0),
                             jnp.minimum(snr, 5.0) / (snr + 1.0), rtol=2e-5)
  np.testing.assert_allclose(objectives.min_snr_weighting(proc, t, 'x0', gamma=5.0),
                             jnp.minimum(snr, 5.0), rtol=2e-5)


PROCESS_NAMES = [('vp_discrete', {'schedule': 'linear'}), ('vp_discrete', {'schedule': 'cosine'}),
                 ('vp_linear', {}), ('vp_cosine', {}), ('ve', {}), ('edm', {}), ('linear', {})]


@pytest.mark.parametrize('proc_name, proc_kwargs', PROCESS_NAMES,
                         ids=[f'{n}-{"-".join(map(str, k.values()))}' for n, k in PROCESS_NAMES])
def test_stated_equivalences_per_example(proc_name, proc_kwargs):
  """For one (x0, eps, t) and a consistent prediction (x_t = alpha x0^ + sigma eps^):
  VP: v-MSE = (1 + 1/SNR) eps-MSE, x0-MSE = eps-MSE / SNR; any process: sigma² score-MSE =
  eps-MSE; linear interpolant: velocity-MSE = eps-MSE / (1 - t)²; and every kind's MSE is
  `eps_mse_factor` times the eps-MSE. Checked per example in float64."""
  proc = _process(proc_name, **proc_kwargs)
  with jax.enable_x64(True):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(1), 4)
    x0 = jax.random.normal(k1, (64, 5), jnp.float64)
    eps = jax.random.normal(k2, (64, 5), jnp.float64)
    t_lo = max(float(proc.t_min), 1e-3)
    t = jax.random.uniform(k3, (64,), jnp.float64, t_lo, 0.999)
    x_t = proc.marginal(x0, eps, t)
    eps_hat = eps + 0.3 * jax.random.normal(k4, eps.shape, jnp.float64)
    x0_hat = (x_t - param.expand_like(proc.sigma(t), x_t) * eps_hat) / param.expand_like(
        proc.alpha(t), x_t)

    def mse(kind):
      diff = param.target(kind, x0_hat, eps_hat, proc, t) - param.target(kind, x0, eps, proc, t)
      return jnp.mean(diff**2, axis=-1)

    eps_mse = mse('eps')
    snr = jnp.exp(proc.log_snr(t))
    for kind in param.KINDS:
      np.testing.assert_allclose(mse(kind), objectives.eps_mse_factor(kind, proc, t) * eps_mse,
                                 rtol=1e-8, err_msg=kind)
    np.testing.assert_allclose(proc.sigma(t) ** 2 * mse('score'), eps_mse, rtol=1e-10)
    if proc_name.startswith('vp'):
      np.testing.assert_allclose(mse('v'), (1 + 1 / snr) * eps_mse, rtol=1e-8)
      np.testing.assert_allclose(mse('x0'), eps_mse / snr, rtol=1e-8)
    if proc_name == 'linear':
      np.testing.assert_allclose(mse('velocity'), eps_mse / (1 - t) ** 2, rtol=1e-8)


ALL_OBJECTIVES = [('ddpm_eps', {}), ('ddpm_x0', {}), ('v_prediction', {'min_snr_gamma': 5.0}),
                  ('dsm', {}), ('dsm', {'weighting': 'likelihood'}), ('edm', {}),
                  ('flow_matching', {}), ('ot_flow_matching', {}), ('vdm_elbo', {}),
                  ('ddpm_vlb', {}), ('ddpm_vlb', {'variance': 'large'})]


@pytest.mark.parametrize('obj_name, kwargs', ALL_OBJECTIVES,
                         ids=[f'{n}-{"-".join(map(str, k.values()))}' for n, k in ALL_OBJECTIVES])
def test_gradients_are_finite_and_match_finite_differences(obj_name, kwargs):
  """Parameter gradients of each objective on a tiny model agree with central differences."""
  proc_name = {'dsm': 'vp_linear', 'edm': 'edm', 'flow_matching': 'linear',
               'ot_flow_matching': 'linear', 'vdm_elbo': 'vp_linear'}.get(obj_name, 'vp_discrete')
  proc = _process(proc_name)
  with jax.enable_x64(True):
    objective = objectives.make_objective(obj_name, proc, **kwargs)
    x0 = _data(jax.random.key(2), 16).astype(jnp.float64)
    params = {'w': 0.1 * jax.random.normal(jax.random.key(3), (3, 3), jnp.float64),
              'b': jnp.zeros((3,), jnp.float64), 'c': jnp.ones((3,), jnp.float64)}

    def loss(p):
      model = lambda x, t, c: x @ p['w'] + p['b'] + jnp.tanh(t)[:, None] * p['c']
      return objective(model, x0, jax.random.key(4))[0]

    grads = jax.grad(loss)(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    jax.test_util.check_grads(loss, (params,), order=1, modes=['rev'], atol=1e-6, rtol=1e-5)


def test_t_samplers_follow_their_distributions():
  """KS tests (n = 20,000) against the intended law of each t sampler."""
  n, key = 20_000, jax.random.key(5)
  disc = processes.DiscreteVP.from_name('linear', 1000)
  t = np.asarray(objectives.discrete_uniform_t(disc, key, n)) * 1000
  assert np.allclose(t, np.round(t), atol=1e-3) and t.min() >= 1 and t.max() <= 1000
  assert stats.chisquare(np.bincount(np.round(t).astype(int) // 100 - (t == 1000),
                                     minlength=10)).pvalue > 1e-4
  u = np.asarray(objectives.uniform_t(disc, key, n, t_min=0.2))
  assert stats.kstest(u, stats.uniform(0.2, 0.8).cdf).pvalue > 1e-4
  ln = np.asarray(objectives.logit_normal_t(disc, key, n, mean=0.5, std=0.8))
  assert stats.kstest(np.log(ln / (1 - ln)), stats.norm(0.5, 0.8).cdf).pvalue > 1e-4
  # EDM's log-normal sigma~ through log-SNR, on a discrete VP (in its representable range).
  with jax.enable_x64(True):
    tl = objectives.log_normal_t(disc, key, n, p_mean=-1.2, p_std=0.5)
    log_sigma = np.asarray(-0.5 * disc.log_snr(tl))
  assert stats.kstest(log_sigma, stats.norm(-1.2, 0.5).cdf).pvalue > 1e-4


def test_ot_pairing_is_the_exact_minimum_cost_permutation():
  x0 = jax.random.normal(jax.random.key(6), (6, 4))
  eps = jax.random.normal(jax.random.key(7), (6, 4))
  paired = jax.jit(objectives.ot_pairing)(x0, eps)
  cost = lambda e: float(jnp.sum((x0 - e) ** 2))
  best = min(cost(eps[np.array(p)]) for p in itertools.permutations(range(6)))
  assert cost(paired) == pytest.approx(best, rel=1e-6)
  assert sorted(map(tuple, np.asarray(paired).round(6))) == sorted(
      map(tuple, np.asarray(eps).round(6)))


def test_aux_reports_t_on_ddpm_grid_and_log_snr():
  proc = processes.DiscreteVP.from_name('linear', 1000)
  objective = objectives.make_objective('ddpm_eps', proc)
  x0 = _data(jax.random.key(1), 4096)
  loss, aux = objective(lambda x, t, c: jnp.zeros_like(x), x0, jax.random.key(2))
  n = np.asarray(aux['t']) * 1000
  np.testing.assert_allclose(n, np.round(n), atol=1e-3)
  assert n.min() >= 1 and n.max() <= 1000 and len(np.unique(np.round(n))) > 900
  np.testing.assert_allclose(aux['log_snr'], proc.log_snr(aux['t']), rtol=1e-6)
  np.testing.assert_allclose(aux['eps_weight'], 1.0)
  assert aux['loss_per_example'].shape == (4096,)
  # With a zero model the loss is E||eps||²/d = 1.
  assert abs(float(loss) - 1.0) < 5 * np.sqrt(2 / (3 * 4096))


def test_bad_names_and_arguments():
  with pytest.raises(ValueError, match='unknown objective'):
    objectives.make_objective('ddpm_noise', None)
  proc = processes.DiscreteVP.from_name('linear', 1000)
  with pytest.raises(ValueError, match="objective 'edm'.*unexpected keyword"):
    objectives.make_objective('edm', proc, p_men=1.0)
  with pytest.raises(ValueError, match='weighting'):
    objectives.make_objective('dsm', proc, weighting='sigma')


GMM_W = jnp.array([0.5, 0.3, 0.2])
GMM_MEANS = jnp.array([[1.0, -0.5], [-1.0, 0.8], [0.2, 1.5]])
GMM_S2 = jnp.array([[0.05, 0.1], [0.2, 0.02], [0.1, 0.1]])


def _gmm_data(key, n):
  k1, k2 = jax.random.split(key)
  comp = jax.random.choice(k1, 3, (n,), p=GMM_W)
  return GMM_MEANS[comp] + jnp.sqrt(GMM_S2[comp]) * jax.random.normal(k2, (n, 2))


@pytest.mark.parametrize('case', [c for c in CASES if c[0] in (
    'ddpm_eps', 'ddpm_x0', 'v_prediction', 'edm', 'flow_matching')][:6] + [CASES[7]],
    ids=_case_id)
def test_loss_at_optimal_gmm_model_is_its_expected_minimum(case):
  """Gaussian-mixture data: at the exact E[target | x_t], the loss equals
  E[w(t) mean_d (A - B alpha/sigma)² Var(x0_d | x_t)] (target = A x0 + B eps, with the mixture's
  closed-form posterior variance). The right side is estimated on an independent draw at the
  same t's; the two means agree within 5 combined standard errors. A perturbed model is worse."""
  obj_name, kwargs, proc_name, proc_kwargs = case
  proc = _process(proc_name, **proc_kwargs)
  objective = objectives.make_objective(obj_name, proc, **kwargs)
  kind = objective.kind
  optimal = analytic.optimal_model(kind, analytic.gmm_denoiser(GMM_W, GMM_MEANS, GMM_S2, proc),
                                   proc)
  x0 = _gmm_data(jax.random.key(10), 100_000)
  loss, aux, loss_p, _ = jax.jit(lambda k: (*objective(optimal, x0, k), *objective(
      lambda x, t, c: optimal(x, t, c) + 0.1, x0, k)))(jax.random.key(11))
  t = aux['t']

  @jax.jit
  def expected_min(key):
    x0b = _gmm_data(key, t.shape[0])
    eps = jax.random.normal(jax.random.fold_in(key, 1), x0b.shape)
    x_t = proc.marginal(x0b, eps, t)
    _, var = analytic.gmm_posterior(x_t, t, GMM_W, GMM_MEANS, GMM_S2, proc)
    a, b = analytic._target_coefficients(kind, proc, t, 0.5)  # pylint: disable=protected-access
    coef = (a - b * proc.alpha(t) / proc.sigma(t))[:, None]
    return _weight_of(obj_name, kwargs, proc, kind, t) * jnp.mean(coef**2 * var, axis=-1)

  lhs = np.asarray(aux['loss_per_example'], np.float64)
  rhs = np.asarray(expected_min(jax.random.key(12)), np.float64)
  se = np.sqrt(lhs.var() / lhs.size + rhs.var() / rhs.size)
  assert abs(lhs.mean() - rhs.mean()) < 5 * se, (lhs.mean(), rhs.mean(), se)
  assert float(loss_p) > float(loss)
