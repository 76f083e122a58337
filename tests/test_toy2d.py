"""2-D toys: every sampler's geometry, and the mixture's exact density and score."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import processes
from diffusion_jax.analytic import gmm_denoiser
from diffusion_jax.data import toy2d


@pytest.mark.parametrize('name', sorted(toy2d.TOYS))
def test_samplers_shape_determinism_and_spread(name):
  fn = toy2d.TOYS[name]
  x = np.asarray(fn(jax.random.key(0), 2000))
  assert x.shape == (2000, 2) and x.dtype == np.float32 and np.all(np.isfinite(x))
  np.testing.assert_array_equal(x, np.asarray(fn(jax.random.key(0), 2000)))
  assert 0.2 < x.std() < 2.0 and np.abs(x.mean(0)).max() < 0.5


def test_geometry():
  key = jax.random.key(1)
  board = np.asarray(toy2d.checkerboard(key, 4000))
  cell = np.floor((board + 2.0) / 1.0).astype(int)
  assert np.all((cell.sum(1) % 2) == 0) and np.all(np.abs(board) <= 2.0)
  r = np.linalg.norm(np.asarray(toy2d.rings(key, 4000, noise=0.0)), axis=1)
  assert np.allclose(np.min(np.abs(r[:, None] - np.array([0.5, 1.0, 1.5])), 1), 0, atol=1e-5)
  moons = np.asarray(toy2d.two_moons(key, 4000, noise=0.0)) + [0.5, 0.25]
  d_upper = np.abs(np.linalg.norm(moons, axis=1) - 1)
  d_lower = np.abs(np.linalg.norm(moons - [1.0, 0.5], axis=1) - 1)
  assert np.all(np.minimum(d_upper, d_lower) < 1e-5)
  roll = np.asarray(toy2d.swiss_roll(key, 4000, noise=0.0))
  u = np.linalg.norm(roll, axis=1) * 3 * np.pi  # r = u / (3 pi) and the angle is u mod 2 pi
  np.testing.assert_allclose(np.cos(u), roll[:, 0] / np.linalg.norm(roll, axis=1), atol=1e-4)


def test_mixture_density_integrates_to_one_and_score_is_its_gradient():
  gmm = toy2d.default_mixture()
  # Midpoint rule on [-4, 4]^2 with h = 0.02: error O(h^2 * max|p''|) << 1e-3; the tails
  # outside the box carry < 1e-12 of the mass.
  h = 0.02
  g = np.arange(-4 + h / 2, 4, h, dtype=np.float32)
  xx, yy = np.meshgrid(g, g)
  pts = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], 1))
  mass = float(jnp.sum(jnp.exp(gmm.log_prob(pts))) * h * h)
  assert abs(mass - 1) < 1e-3, mass
  x = gmm.sample(jax.random.key(2), 64)
  auto = jax.vmap(jax.grad(lambda p: gmm.log_prob(p[None])[0]))(x)
  np.testing.assert_allclose(np.asarray(gmm.score(x)), np.asarray(auto), rtol=1e-4, atol=1e-4)


def test_mixture_samples_have_the_mixture_moments():
  gmm = toy2d.default_mixture()
  n = 200_000
  x = np.asarray(gmm.sample(jax.random.key(3), n), np.float64)
  w, m, s = (np.asarray(a, np.float64) for a in gmm)
  mean = w @ m
  var = w @ (s ** 2 + m ** 2) - mean ** 2
  # CLT: the sample mean errs by ~sqrt(var / n) <= 0.003; allow 5 standard errors.
  np.testing.assert_allclose(x.mean(0), mean, atol=5 * np.sqrt(var.max() / n))
  np.testing.assert_allclose(x.var(0), var, rtol=0.02)


def test_diffused_score_matches_the_optimal_denoiser():
  """At time t the score of x_t is -E[eps | x_t] / sigma: the diffused mixture's closed form
  must agree with analytic.gmm_denoiser (independently written)."""
  gmm = toy2d.default_mixture()
  process = processes.make_process('vp_cosine')
  t = 0.4
  alpha, sigma = float(process.alpha(jnp.array(t))), float(process.sigma(jnp.array(t)))
  x_t = gmm.diffused(alpha, sigma).sample(jax.random.key(4), 32)
  _, eps = gmm_denoiser(gmm.weights, gmm.means, gmm.stds ** 2, process)(x_t, jnp.full((32,), t))
  np.testing.assert_allclose(np.asarray(gmm.diffused(alpha, sigma).score(x_t)),
                             np.asarray(-eps / sigma), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # suite time
def test_the_training_loop_trains_on_toy_data_and_measures_sliced_wasserstein(tmp_path):
  """`data.name='toy2d'` through the loop: batches keyed by (seed, step), a scatter PNG, and
  sliced Wasserstein beside its exact-vs-exact floor (a few steps: the numbers exist and are
  sane; quality bars are test_train2d.py's)."""
  from configs import digits as digits_config  # pylint: disable=g-import-not-at-top
  from diffusion_jax import train_loop  # pylint: disable=g-import-not-at-top
  from diffusion_jax.data import sources  # pylint: disable=g-import-not-at-top
  src = sources.ToySource('eight_gaussians')
  np.testing.assert_array_equal(src.batch(0, 3, 8)['image'], src.batch(0, 3, 8)['image'])
  np.testing.assert_array_equal(src.batch(0, 3, 8, 1, 2)['image'], src.batch(0, 3, 8)['image'][4:])
  config = digits_config.get_config('smoke,mlp')
  config.data = dict(name='toy2d', toy='eight_gaussians')
  config.sample.update(clip_x0=0.0, grid_size=200)
  config.eval.num_samples = 200
  result = train_loop.train_and_evaluate(config, str(tmp_path))
  assert (tmp_path / 'samples.png').exists() and np.load(tmp_path / 'samples.npy').shape == (200, 2)
  assert 0.0 < result['sw_floor'] < result['sw'] and result['sw_ratio'] > 1.0   # 20 steps: bad
  assert train_loop.format_eval_line(result).startswith('EVAL step=20: SW=')
