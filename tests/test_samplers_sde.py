"""Stochastic samplers (reverse SDE, predictor-corrector, DDPM/DDIM, Heun with churn) reproduce a
Gaussian mixture; learned-variance DDPM; DDIM and Euler inversion against their closed-form round
trip; consistency sampling against CM Alg. 1 written in sigma; exact NFE (DESIGN §4, §6)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import analytic
from diffusion_jax import consistency
from diffusion_jax import parameterization
from diffusion_jax import processes
from diffusion_jax import samplers
from diffusion_jax.samplers import consistency as cs
from diffusion_jax.samplers import discrete
from diffusion_jax.samplers import sde

import sampler_testing as st

DVP = processes.DiscreteVP.from_name('linear', 1000)
VP = processes.VPLinear()
MU, S2 = np.array([1.5, -0.5, 0.0]), np.array([0.04, 0.5, 2.0])

# --- a 2-D Gaussian mixture: three well-separated, narrow components -------------------------

W = np.array([0.5, 0.3, 0.2])
MEANS = np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])
STD = 0.15                                                    # every component, every dimension
NUM = 4000
Z = 4.0            # bound on every z-score (weights, means, spreads): a false alarm is < 1e-3
MEAN_BIAS = 0.005  # allowed discretisation bias of a component mean (1/30 of its std)

# name -> (process, sampler(denoiser, process, x_T, key), allowed relative bias of the
# within-component std (low, high)). The step counts are the smallest that keep every bias small;
# DDIM eta=1 on 100 respaced steps has DDPM's 'small' variance, whose plug-in posterior variance
# leaves out the spread of x0_hat: the narrow components come out ~15% too narrow (measured
# 0.82-0.89 of STD; 0.97-1.01 on all 1000 steps).
MIXTURE_CASES = {
    'ddpm_small_1000': (DVP, lambda d, p, x, k: samplers.ddpm_sample(d, p, x, k), (0.05, 0.05)),
    'ddim_eta1_100': (DVP, lambda d, p, x, k: samplers.ddim_sample(d, p, x, k, steps=100, eta=1.0),
                      (0.25, 0.05)),
    'euler_maruyama_100': (VP, lambda d, p, x, k: sde.euler_maruyama_sample(d, p, x, k, steps=100),
                           (0.05, 0.05)),
    'pc_100': (VP, lambda d, p, x, k: sde.pc_sample(d, p, x, k, steps=100), (0.05, 0.05)),
    'heun_churn_50': (VP, lambda d, p, x, k: samplers.heun_sample(d, p, x, k, steps=50,
                                                                  s_churn=10.0), (0.05, 0.05)),
}


def mixture_errors(x):
  """Per component: z-score of its weight, mean error, mean error / standard error, std / STD."""
  x = np.asarray(x, np.float64)
  dist = np.linalg.norm(x[:, None, :] - MEANS[None], axis=-1)           # [N, K]
  k = dist.argmin(1)
  out = []
  for c in range(len(W)):
    xs = x[k == c]
    n_k = xs.shape[0]
    z_weight = (n_k / x.shape[0] - W[c]) / np.sqrt(W[c] * (1 - W[c]) / x.shape[0])
    mean_err = np.abs(xs.mean(0) - MEANS[c]).max()
    out.append({'n': n_k, 'z_weight': z_weight, 'mean_err': mean_err,
                'mean_se': mean_err / (STD / np.sqrt(n_k)), 'std': xs.std(0) / STD})
  return out, int(np.sum(dist.min(1) > 6 * STD))


@pytest.mark.parametrize('name', sorted(MIXTURE_CASES))
def test_stochastic_samplers_reproduce_a_gaussian_mixture(name):
  """With the exact mixture denoiser (`analytic.gmm_denoiser`), 4000 samples assigned to their
  nearest component have (1) each weight within Z binomial standard errors, (2) each mean within
  Z standard errors `STD / sqrt(n_k)` plus `MEAN_BIAS`, (3) each spread within Z standard errors
  `1 / sqrt(2 n_k)` of the stated bias band, and (4) no sample stranded more than 6 std from
  every component (expected count for the true mixture: 6e-5)."""
  process, sample, (low, high) = MIXTURE_CASES[name]
  den = analytic.gmm_denoiser(W, MEANS, np.full((3, 2), STD**2), process)
  k_prior, k_sample = jax.random.split(jax.random.key(0))
  x_T = jax.random.normal(k_prior, (NUM, 2))
  x, _ = jax.jit(lambda x, k: sample(den, process, x, k))(x_T, k_sample)
  comps, stranded = mixture_errors(x)
  print(f'{name}: |z_weight| max {max(abs(c["z_weight"]) for c in comps):.2f}, mean error max '
        f'{max(c["mean_err"] for c in comps):.4f} (= {max(c["mean_se"] for c in comps):.2f} se), '
        f'std / STD in [{min(c["std"].min() for c in comps):.3f}, '
        f'{max(c["std"].max() for c in comps):.3f}]')
  assert stranded == 0, (name, stranded)
  for c in comps:
    assert abs(c['z_weight']) < Z, (name, comps)
    assert c['mean_err'] < Z * STD / np.sqrt(c['n']) + MEAN_BIAS, (name, comps)
    slack = Z / np.sqrt(2 * c['n'])
    assert np.all((c['std'] > 1 - low - slack) & (c['std'] < 1 + high + slack)), (name, comps)


# --- DDIM (eta = 1) is DDPM ---------------------------------------------------------------------


def _ddpm_respaced_moments(proc, steps, mu, s2):
  """Exact mean / variance of DDPM ('small') on respaced steps with the Gaussian denoiser: every
  step is affine in x plus independent Gaussian noise (float64 recursion)."""
  n = samplers.discrete_timesteps(proc.num_steps, steps, 'trailing')
  abar = np.concatenate([[1.0], proc.alphas_cumprod])
  m, v = np.zeros_like(mu), np.ones_like(mu)
  for a, b in zip(n, np.concatenate([n[1:], [0]]), strict=True):
    a_n, a_m = abar[a], abar[b]
    beta = 1 - a_n / a_m
    k = np.sqrt(a_n) * s2 / (a_n * s2 + 1 - a_n)        # x0_hat = mu + k (x - sqrt(a_n) mu)
    cx0, cx = np.sqrt(a_m) * beta / (1 - a_n), np.sqrt(1 - beta) * (1 - a_m) / (1 - a_n)
    var = beta * (1 - a_m) / (1 - a_n) if b > 0 else 0.0
    m, v = (cx0 * k + cx) * m + cx0 * (mu - k * np.sqrt(a_n) * mu), (cx0 * k + cx) ** 2 * v + var
  return m, v


def test_ddim_eta_one_is_ddpm_small_pathwise_and_in_law():
  """DDIM with eta = 1 draws exactly DDPM's posterior step (Song et al. 2021, Eq. 16): with the
  same key (the same noise) the two samplers agree path by path to float64 rounding; and their
  output law matches the exact law of DDPM on the same respaced steps (6 standard errors)."""
  proc = processes.DiscreteVP.from_name('cosine', 1000)
  with jax.enable_x64(True):
    den = analytic.gaussian_denoiser(jnp.asarray(MU), jnp.asarray(S2), proc)
    x_T = jax.random.normal(jax.random.key(4), (20_000, 3), jnp.float64)
    key = jax.random.key(5)
    a, _ = jax.jit(lambda x, k: samplers.ddim_sample(den, proc, x, k, steps=50, eta=1.0))(x_T, key)
    b, _ = jax.jit(lambda x, k: samplers.ddpm_sample(den, proc, x, k, steps=50))(x_T, key)
  np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
  m, v = _ddpm_respaced_moments(proc, 50, MU, S2)
  a = np.asarray(a)
  num = a.shape[0]
  np.testing.assert_array_less(np.abs(a.mean(0) - m), 6 * np.sqrt(v / num))
  np.testing.assert_array_less(np.abs(a.var(0) - v), 6 * v * np.sqrt(2 / num))


# --- learned variance (Nichol & Dhariwal 2021) -------------------------------------------------


def _learned_model(v_raw, process, counter=None):
  """An eps-model optimal for Gaussian data with a constant variance channel `v_raw` in [-1, 1]."""
  eps_model = analytic.gaussian_optimal_model('eps', MU, S2, process)

  def model_fn(x, t, cond=None):
    if counter is not None:
      jax.debug.callback(lambda: counter.append(1), ordered=False)
    eps = eps_model(x, t, cond)
    return jnp.concatenate([eps, jnp.broadcast_to(jnp.asarray(v_raw, x.dtype), eps.shape)], -1)
  return model_fn


def test_ddpm_learned_variance_interpolates_small_and_large():
  """`v = 1` is 'large' and `v = 0` is 'small' bit for bit (same key); `v = 1/2` gives the
  geometric mean `sqrt(beta beta~)` of the two variances; one network call per step."""
  steps, key = 20, jax.random.key(1)
  x_T = jax.random.normal(jax.random.key(0), (64, 3))
  plain = parameterization.make_denoiser(analytic.gaussian_optimal_model('eps', MU, S2, DVP), DVP,
                                         'eps')
  run = jax.jit(lambda den, variance: samplers.ddpm_sample(den, DVP, x_T, key, steps=steps,
                                                           variance=variance),
                static_argnums=(0, 1))
  large, small = run(plain, 'large')[0], run(plain, 'small')[0]
  calls = []
  one = parameterization.make_denoiser(_learned_model(1.0, DVP, calls), DVP, 'eps',
                                      learned_variance=True)
  x, info = run(one, 'learned')
  jax.effects_barrier()
  assert info['nfe'] == len(calls) == steps and one.evals_per_call == 1 and one.kind == 'eps'
  np.testing.assert_array_equal(x, large)
  zero = parameterization.make_denoiser(_learned_model(-1.0, DVP), DVP, 'eps',
                                       learned_variance=True)
  np.testing.assert_array_equal(run(zero, 'learned')[0], small)
  # v = 1/2, on the update 501 -> 1 ('leading' spacing), where beta~ / beta = 1.1e-4:
  # x_1 = mean + std z with the same mean and z in all three runs.
  with jax.enable_x64(True):
    x64 = jnp.asarray(x_T, jnp.float64)
    eps_model = analytic.gaussian_optimal_model('eps', MU, S2, DVP)
    plain = parameterization.make_denoiser(eps_model, DVP, 'eps')
    half = parameterization.make_denoiser(_learned_model(0.0, DVP), DVP, 'eps',
                                          learned_variance=True)
    first = {}
    for name, den, variance in [('small', plain, 'small'), ('large', plain, 'large'),
                                ('half', half, 'learned')]:
      _, info = samplers.ddpm_sample(den, DVP, x64, key, steps=2, spacing='leading',
                                     variance=variance, return_trajectory=True)
      first[name] = np.asarray(info['trajectory'][1])
  abar_n, abar_m = DVP.alphas_cumprod[500], DVP.alphas_cumprod[0]
  beta = 1 - abar_n / abar_m
  tilde = beta * (1 - abar_m) / (1 - abar_n)
  std_small, std_large, std_half = np.sqrt(tilde), np.sqrt(beta), (beta * tilde) ** 0.25
  ratio = (first['half'] - first['small']) / (first['large'] - first['small'])
  np.testing.assert_allclose(ratio, (std_half - std_small) / (std_large - std_small), rtol=1e-9)


def test_learned_variance_denoiser_is_a_plain_denoiser_and_required():
  """Called plainly it is the same denoiser as `make_denoiser` on the first C channels (so every
  sampler takes it); 'learned' without `.with_variance` is refused."""
  den = parameterization.make_denoiser(_learned_model(0.3, DVP), DVP, 'eps', clip_x0=3.0,
                                       learned_variance=True)
  ref = parameterization.make_denoiser(analytic.gaussian_optimal_model('eps', MU, S2, DVP), DVP,
                                       'eps', clip_x0=3.0)
  x_T = jax.random.normal(jax.random.key(0), (16, 3))
  a, _ = samplers.ddim_sample(den, DVP, x_T, steps=10)
  b, _ = samplers.ddim_sample(ref, DVP, x_T, steps=10)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match='with_variance'):
    samplers.ddpm_sample(ref, DVP, x_T, jax.random.key(0), steps=10, variance='learned')


# --- inversion ---------------------------------------------------------------------------------


def _round_trip_factor(s, iterations):
  """Exact `(x_rt - mu) / (x0 - mu)` per dimension for Gaussian data, `s` the increasing levels
  sigma / alpha (from 0 = data). In `y = x / alpha` the Euler/DDIM step from level n down to m
  is `y_m - mu = (1 - a)(y_n - mu)`, `a = (s_n - s_m) s_n / (S2 + s_n²)`; `k` fixed-point sweeps
  invert it as `(1 + a + ... + a^k)`, so the round trip multiplies by `prod (1 - a^(k+1))`."""
  s = np.asarray(s, np.float64)[:, None]
  a = (s[1:] - s[:-1]) * s[1:] / (S2[None] + s[1:] ** 2)
  return np.prod(1.0 - a ** (iterations + 1), axis=0)


def _x0_gaussian(num=256):
  return MU + np.sqrt(S2) * np.asarray(jax.random.normal(jax.random.key(1), (num, 3), jnp.float64))


@pytest.mark.parametrize('iterations', [1, 2])
def test_ddim_invert_round_trip_matches_closed_form_and_shrinks_with_steps(iterations):
  """`ddim_sample(ddim_invert(x0))` on Gaussian data equals its closed form `mu + f (x0 - mu)`
  (`_round_trip_factor`) to float64 rounding; `1 - f` is the inversion's only error and it
  shrinks as steps^-iterations (fitted order within ±0.25)."""
  steps_list = [100, 300, 1000]
  errors = []
  with jax.enable_x64(True):
    den = analytic.gaussian_denoiser(jnp.asarray(MU), jnp.asarray(S2), DVP)
    x0 = jnp.asarray(_x0_gaussian())
    for steps in steps_list:
      x_T, info = jax.jit(lambda x: discrete.ddim_invert(den, DVP, x, steps=steps,
                                                         iterations=iterations))(x0)
      assert info['nfe'] == steps * iterations
      back, _ = jax.jit(lambda x: samplers.ddim_sample(den, DVP, x, steps=steps))(x_T)
      n = samplers.discrete_timesteps(1000, steps, 'trailing')[::-1]
      abar = DVP.alphas_cumprod[n - 1]
      f = _round_trip_factor(np.concatenate([[0.0], np.sqrt((1 - abar) / abar)]), iterations)
      back, x0_np = np.asarray(back), np.asarray(x0)
      np.testing.assert_allclose(back, MU + f * (x0_np - MU), rtol=0, atol=1e-9)
      errors.append(float(np.max(np.abs(back - x0_np))))
  order = st.fitted_order(steps_list, errors)
  print(f'ddim_invert iterations={iterations}: max |round trip - x0| = {errors}, order {order:.2f}')
  assert abs(order - iterations) < 0.25, (order, errors)


def test_ddim_invert_round_trip_on_a_mixture():
  """Beyond Gaussian data: on the 2-D mixture, 1000 steps with 4 fixed-point sweeps bring the
  round trip to ~1e-7 (one sweep: errors of O(1), where a point's path flips component)."""
  with jax.enable_x64(True):
    den = analytic.gmm_denoiser(W, MEANS, np.full((3, 2), STD**2), DVP)
    comp = jax.random.choice(jax.random.key(2), 3, (256,), p=jnp.asarray(W))
    x0 = jnp.asarray(MEANS)[comp] + STD * jax.random.normal(jax.random.key(3), (256, 2))
    x_T, _ = jax.jit(lambda x: discrete.ddim_invert(den, DVP, x, steps=1000, iterations=4))(x0)
    back, _ = jax.jit(lambda x: samplers.ddim_sample(den, DVP, x, steps=1000))(x_T)
    err = float(np.max(np.abs(np.asarray(back) - np.asarray(x0))))
  print(f'ddim_invert on the mixture (1000 steps, 4 sweeps): {err:.2e}')
  assert err < 1e-5


@pytest.mark.parametrize('final', ['data', 't_min'])
def test_euler_invert_is_the_inverse_of_euler_sample(final):
  """Continuous processes: `euler_sample(euler_invert(x))` has the same closed form, on the
  Karras grid of VP linear (from data, or from a point at t_min)."""
  steps, iterations = 40, 3
  with jax.enable_x64(True):
    den = analytic.gaussian_denoiser(jnp.asarray(MU), jnp.asarray(S2), VP)
    x0 = jnp.asarray(_x0_gaussian())
    g = samplers.time_grid(VP, steps, 'karras', final=final, dtype=jnp.float64)
    s = np.asarray(g.s)[::-1]
    if final == 't_min':   # the input is a point at t_min: y = mu + sqrt(S2 + s²) z
      x0 = g.alpha[-1] * (MU + np.sqrt((S2 + s[0] ** 2) / S2) * (x0 - MU))
    else:
      s = np.concatenate([[0.0], s])
    x_T, info = jax.jit(lambda x: discrete.euler_invert(den, VP, x, steps=steps, final=final,
                                                        iterations=iterations, grid='karras'))(x0)
    back, _ = jax.jit(lambda x: samplers.euler_sample(den, VP, x, steps=steps, final=final,
                                                      grid='karras'))(x_T)
    back, x0 = np.asarray(back), np.asarray(x0)
    assert int(info['nfe']) == steps * iterations
  f = _round_trip_factor(s, iterations)
  scale = 1.0 if final == 'data' else g.alpha[-1]
  np.testing.assert_allclose(back, scale * (MU + f * (x0 / scale - MU)), rtol=0, atol=1e-9)
  print(f'euler_invert final={final} ({steps} steps, {iterations} sweeps): max |round trip - x| ='
        f' {np.max(np.abs(back - x0)):.2e}, max |1 - f| = {np.max(np.abs(1 - f)):.2e}')


# --- consistency sampling ----------------------------------------------------------------------


def _cm_model(x_in, c_noise, cond=None):
  """A fixed smooth network F(c_in x, c_noise): any function serves for comparing two samplers."""
  del cond
  return jnp.tanh(1.3 * x_in + 0.7 * c_noise[:, None]) - 0.2 * x_in


def _cm_algorithm_1(model_fn, sigma_min, x_T, key, sigmas):
  """CM Alg. 1 in sigma (alpha = 1), a plain loop on `consistency.consistency_fn`:
  `x <- f(x_T, tau_0)`, then `x <- f(x + sqrt(tau² - sigma_min²) z, tau)` for each later `tau`,
  `z = normal(split(key, M)[i])`."""
  f = lambda x, tau: consistency.consistency_fn(model_fn, x, tau, sigma_min=sigma_min)
  x = f(x_T, sigmas[0])
  keys = jax.random.split(key, len(sigmas)) if len(sigmas) > 1 else None
  for i, tau in enumerate(sigmas[1:], start=1):
    z = jax.random.normal(keys[i], x.shape, x.dtype)
    x = f(x + np.sqrt(tau**2 - sigma_min**2) * z, tau)
  return x


@pytest.mark.parametrize('sigmas', [(80.0,), (80.0, 2.0), (80.0, 10.0, 1.0, 0.2)])
def test_consistency_sampler_is_cm_algorithm_1(sigmas):
  """On EDM with the same key, the sampler on `make_denoiser(model, 'consistency')` agrees with
  CM Alg. 1 written in sigma to float32 rounding, one-step (no key needed) and multistep."""
  edm = processes.EDM()
  x_T = 80.0 * jax.random.normal(jax.random.key(0), (16, 3))
  key = jax.random.key(1) if len(sigmas) > 1 else None
  ref = _cm_algorithm_1(_cm_model, edm.sigma_min, x_T, key, sigmas)
  den, count = st.counting(parameterization.make_denoiser(_cm_model, edm, 'consistency',
                                                          sigma_min=edm.sigma_min))
  x, info = jax.jit(lambda x: cs.consistency_multistep_sample(
      den, edm, x, key, times=np.asarray(sigmas) / edm.sigma_max))(x_T)
  jax.effects_barrier()
  assert info['nfe'] == count() == len(sigmas)
  np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-6)


def test_consistency_sampler_renoises_to_each_level_on_any_process():
  """On VP (alpha != 1) with a plain denoiser (s_min = 0), the input at each later time is
  `alpha_i x0_hat + sigma_i z`: with x0_hat = 0 it is N(0, sigma_i²); default times are the
  Karras grid of steps + 1 points without t_min."""
  zero = lambda x, t, cond=None: (jnp.zeros_like(x), x / VP.sigma(t))
  x_T = jax.random.normal(jax.random.key(0), (20_000, 2))
  x, info = cs.consistency_multistep_sample(zero, VP, x_T, jax.random.key(1), steps=3,
                                             return_trajectory=True)
  times = samplers.time_grid(VP, 3, 'karras', final='t_min').t[:-1]
  np.testing.assert_allclose(info['times'], times)
  traj = np.asarray(info['trajectory'])
  assert traj.shape == (4, 20_000, 2) and info['nfe'] == 3     # x_T, 2 re-noised inputs, x0
  sigma = np.asarray(VP.sigma(jnp.asarray(times[1:])))
  np.testing.assert_allclose(traj[1:3].std(axis=(1, 2)), sigma, rtol=0.02)
  with pytest.raises(ValueError, match='key'):
    cs.consistency_multistep_sample(zero, VP, x_T, steps=2)
  with pytest.raises(ValueError, match='decreasing'):
    cs.consistency_multistep_sample(zero, VP, x_T, jax.random.key(0), times=[0.5, 0.8])


# --- the predictor's step is the paper's ---------------------------------------------------------


@pytest.mark.parametrize('name', ['ddpm', 've'])
def test_reverse_diffusion_predictor_is_song_et_al(name):
  """On DDPM's own levels the reverse-diffusion step is Alg. 3's `(2 - sqrt(1 - beta)) x +
  beta score + sqrt(beta) z`; on VE it is Alg. 2's `x + (sigma_i² - sigma_(i-1)²) score +
  sqrt(sigma_i² - sigma_(i-1)²) z` (one step, no corrector, same noise)."""
  proc = processes.DiscreteVP.from_name('cosine', 10) if name == 'ddpm' else processes.VE()
  grid, steps = ('trailing', 9) if name == 'ddpm' else ('log_snr', 4)   # all 10 DDPM levels
  den = analytic.gaussian_denoiser(jnp.asarray(MU), jnp.asarray(S2), proc)
  x_T = proc.prior_std * jax.random.normal(jax.random.key(0), (8, 3))
  key = jax.random.key(1)
  _, info = sde.pc_sample(den, proc, x_T, key, steps=steps, grid=grid, final='t_min',
                          corrector_steps=0, return_trajectory=True)
  x = info['trajectory'][1]
  g = samplers.time_grid(proc, steps, grid, final='t_min')
  score = -den(x_T, g.t[0])[1] / g.sigma[0]
  z = jax.random.normal(jax.random.split(key, (steps, 1))[0, 0], x_T.shape)
  if name == 'ddpm':
    beta = 1 - (g.alpha[0] / g.alpha[1]) ** 2
    np.testing.assert_allclose(beta, proc.betas[-1], rtol=1e-5)
    expect = (2 - np.sqrt(1 - beta)) * x_T + beta * score + np.sqrt(beta) * z
  else:
    d = g.sigma[0] ** 2 - g.sigma[1] ** 2
    expect = x_T + d * score + np.sqrt(d) * z
  np.testing.assert_allclose(x, expect, rtol=1e-5, atol=1e-5)


def test_euler_maruyama_predictor_is_song_et_al_eq_6():
  """PC's 'euler_maruyama' predictor on the VP SDE (Song et al. 2021, Eqs. 6 and 11): with
  `beta(t) = beta_min + t (beta_max - beta_min)`, `f = -beta / 2`, `g² = beta`, one step from
  t_0 = 1 down by h is `x - h (f x - g² score) + sqrt(g² h) z` (no corrector, same noise)."""
  proc, steps = processes.VPLinear(), 4
  den = analytic.gaussian_denoiser(jnp.asarray(MU), jnp.asarray(S2), proc)
  x_T = jax.random.normal(jax.random.key(0), (8, 3))
  key = jax.random.key(1)
  _, info = sde.pc_sample(den, proc, x_T, key, steps=steps, grid='t', final='t_min',
                          corrector_steps=0, predictor='euler_maruyama', return_trajectory=True)
  g = samplers.time_grid(proc, steps, 't', final='t_min')
  t0, h = float(g.t[0]), float(g.t[0] - g.t[1])
  beta = proc.beta_min + t0 * (proc.beta_max - proc.beta_min)
  score = -den(x_T, g.t[0])[1] / g.sigma[0]
  z = jax.random.normal(jax.random.split(key, (steps, 1))[0, 0], x_T.shape)
  expect = x_T - h * (-0.5 * beta * x_T - beta * score) + np.sqrt(beta * h) * z
  np.testing.assert_allclose(info['trajectory'][1], expect, rtol=1e-5, atol=1e-5)


# --- exact NFE and refusals ----------------------------------------------------------------------


NFE_CASES = {
    'euler_maruyama': (sde.euler_maruyama_sample, {}, lambda s: s),
    'pc_c0': (sde.pc_sample, {'corrector_steps': 0}, lambda s: s),
    'pc_c1': (sde.pc_sample, {}, lambda s: 2 * s),
    'pc_c2_em': (sde.pc_sample, {'corrector_steps': 2, 'predictor': 'euler_maruyama'},
                 lambda s: 3 * s),
    'pc_c1_example': (sde.pc_sample, {'snr_norm': 'example'}, lambda s: 2 * s),
}


@pytest.mark.parametrize('final', ['data', 't_min'])
@pytest.mark.parametrize('name', sorted(NFE_CASES))
def test_nfe_is_exact(name, final):
  """`info['nfe']` = the calls that really ran (a host callback per execution), as stated: EM
  `steps`, PC `steps (1 + corrector_steps)` for either `final`; a denoiser costing 2 evaluations
  per call (guidance) doubles it."""
  fn, kwargs, expected = NFE_CASES[name]
  for steps in (1, 5):
    den, count = st.counting(analytic.gaussian_denoiser(MU, S2, VP))
    den = parameterization.Denoiser(den, evals_per_call=2)
    x, info = jax.jit(lambda x, k: fn(den, VP, x, k, steps=steps, final=final, **kwargs))(
        jnp.ones((4, 3)), jax.random.key(0))
    jax.block_until_ready(x)
    jax.effects_barrier()
    assert info['nfe'] == 2 * count() == 2 * expected(steps), (name, final, steps, count())
    assert np.all(np.isfinite(np.asarray(x)))


def test_inversion_and_consistency_nfe_is_exact():
  x = jnp.ones((4, 3))
  for fn, kwargs, proc, expected in [
      (discrete.ddim_invert, {'steps': 7, 'iterations': 2}, DVP, 14),
      (discrete.euler_invert, {'steps': 5}, VP, 5),
      (discrete.euler_invert, {'steps': 5, 'final': 't_min', 'iterations': 3}, VP, 15),
      (cs.consistency_multistep_sample, {'steps': 4, 'key': jax.random.key(0)}, VP, 4)]:
    den, count = st.counting(analytic.gaussian_denoiser(MU, S2, proc))
    out, info = fn(den, proc, x, **kwargs)
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert info['nfe'] == count() == expected, (fn.__name__, kwargs, count())


def test_refusals():
  den = analytic.gaussian_denoiser(MU, S2, VP)
  x = jnp.ones((2, 3))
  with pytest.raises(ValueError, match='key'):
    sde.euler_maruyama_sample(den, VP, x, steps=4)
  with pytest.raises(ValueError, match='key'):
    sde.pc_sample(den, VP, x, steps=4)
  with pytest.raises(ValueError, match='predictor'):
    sde.pc_sample(den, VP, x, jax.random.key(0), steps=4, predictor='ode')
  line = processes.LinearInterpolant()
  with pytest.raises(ValueError, match='t_max < 1'):   # f = -1 / (1 - t) is infinite at t = 1
    sde.euler_maruyama_sample(analytic.gaussian_denoiser(MU, S2, line), line, x,
                              jax.random.key(0), steps=4)
  x_T, _ = sde.euler_maruyama_sample(analytic.gaussian_denoiser(MU, S2, line), line, x,
                                     jax.random.key(0), steps=4, t_max=0.99)
  assert np.all(np.isfinite(np.asarray(x_T)))
