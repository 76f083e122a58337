"""EMA kinds: EDM's half-life in images and EDM2's power-function / post-hoc EMA.

Expected values are written from the papers' formulas in the tests themselves (weights of a
one-hot parameter sequence, numerical integrals of the profiles), never through the helpers
under test. The issue's test: a profile reconstructed post hoc from two stored ones equals the
same profile tracked directly along the same parameter sequence.
"""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax import ema
from diffusion_jax import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_ema(ema_fn, sequence, init=None):
  """The EMA after each step of `sequence` [T, D] (update with step 0, 1, ...): [T, ...]."""
  def body(e, inputs):
    step, p = inputs
    e = ema_fn.update(e, p, step)
    return e, e
  e0 = ema_fn.init(jnp.zeros_like(sequence[0]) if init is None else init)
  _, out = jax.jit(lambda e0, s: jax.lax.scan(body, e0, (jnp.arange(len(s)), s)))(
      e0, jnp.asarray(sequence))
  return jax.tree.map(np.asarray, out)


# --- EDM half-life --------------------------------------------------------------------------

def test_halflife_weight_of_a_step_k_updates_ago_is_half_to_the_k_batches_over_h():
  batch, halflife, n = 32, 1000.0, 40
  w = _run_ema(training.ema_halflife(halflife, batch), np.eye(n, dtype=np.float32))[-1]
  beta = 0.5 ** (batch / halflife)          # by hand: EDM's per-update decay
  k = np.arange(n)                           # updates ago
  np.testing.assert_allclose(w[n - 1 - k], (1 - beta) * 0.5 ** (k * batch / halflife),
                             rtol=2e-5)


def test_halflife_is_batch_size_invariant():
  # B images per update for n updates, or B / 2 for 2n: the weight of every block of B images
  # (and of the start, 1 - total) is the same.
  halflife, n = 600.0, 30
  w_big = _run_ema(training.ema_halflife(halflife, 32), np.eye(n, dtype=np.float32))[-1]
  w_small = _run_ema(training.ema_halflife(halflife, 16), np.eye(2 * n, dtype=np.float32))[-1]
  np.testing.assert_allclose(w_small.reshape(n, 2).sum(1), w_big, rtol=2e-5, atol=1e-8)
  np.testing.assert_allclose(w_small.sum(), w_big.sum(), rtol=1e-5)


def test_halflife_rampup_caps_it_at_a_fraction_of_the_images_seen():
  batch, halflife, ratio = 10, 1e6, 0.05
  fn = training.ema_halflife(halflife, batch, rampup_ratio=ratio)
  update = jax.jit(fn.update)
  for step in (0, 1, 100, 10_000, 10_000_000):
    got = float(update(jnp.zeros(()), jnp.ones(()), step))  # = 1 - beta
    h = min(halflife, ratio * step * batch)                  # images seen before this update
    want = 1.0 if h == 0 else 1 - 0.5 ** (batch / h)
    np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f'step {step}')


# --- power-function EMA -----------------------------------------------------------------------

def test_sigma_rel_and_gamma_match_the_papers_numbers():
  # EDM2 Sec. 3: sigma_rel 0.05 and 0.10 are the profiles of gamma 16.97 and 6.94.
  assert ema.sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
  assert ema.sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
  assert ema.gamma_to_sigma_rel(16.97) == pytest.approx(0.05, abs=1e-5)
  assert ema.gamma_to_sigma_rel(0.0) == pytest.approx(0.2886751, abs=1e-7)   # 1 / sqrt(12)
  for s in (0.01, 0.05, 0.08, 0.1, 0.2, 0.28, ema.MAX_SIGMA_REL):
    assert ema.gamma_to_sigma_rel(ema.sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-10)


@pytest.mark.parametrize('gamma', [0.0, 2.5, 6.94])
def test_sigma_rel_is_the_profiles_relative_standard_deviation(gamma):
  # Midpoint rule on p(tau) = (gamma + 1) tau^gamma on [0, 1] (t = 1).
  tau = (np.arange(200_000) + 0.5) / 200_000
  p = (gamma + 1) * tau ** gamma / 200_000
  mean = np.sum(p * tau)
  assert np.sum(p) == pytest.approx(1.0, abs=1e-6)
  assert ema.gamma_to_sigma_rel(gamma) == pytest.approx(
      math.sqrt(np.sum(p * (tau - mean) ** 2)), rel=1e-5)


@pytest.mark.parametrize('gamma', [3.0, 6.94])
def test_power_ema_weights_are_the_profile_over_each_step(gamma):
  # After t updates the weight of update k is (k^(g+1) - (k-1)^(g+1)) / t^(g+1) (the betas
  # (1 - 1/k)^(g+1) telescope); it lies between (g+1)(k-1)^g / t^(g+1) and (g+1) k^g / t^(g+1):
  # proportional to k^g up to where in the step the mean value falls.
  t = 60
  w = _run_ema(ema.power_ema(gamma), np.eye(t, dtype=np.float32))
  k = np.arange(1, t + 1, dtype=np.float64)
  for steps in (1, 2, 17, t):
    kk = k[:steps]
    want = (kk ** (gamma + 1) - (kk - 1) ** (gamma + 1)) / steps ** (gamma + 1)
    np.testing.assert_allclose(w[steps - 1][:steps], want, rtol=3e-5, atol=1e-9)
    assert not np.any(w[steps - 1][steps:])
  last = w[-1].astype(np.float64)
  scale = (gamma + 1) / t ** (gamma + 1)
  assert np.all(last >= scale * (k - 1) ** gamma * (1 - 1e-5))
  assert np.all(last <= scale * k ** gamma * (1 + 1e-5))


def test_power_ema_ignores_the_initial_value_and_tracker_equals_separate_emas():
  seq = np.random.default_rng(1).normal(size=(25, 3)).astype(np.float32)
  gammas = (ema.sigma_rel_to_gamma(0.05), ema.sigma_rel_to_gamma(0.10))
  tracker = ema.power_ema_tracker(gammas)
  tracked = _run_ema(tracker, seq, init=jnp.full((3,), 1e6))
  for g, got in zip(gammas, tracked, strict=True):
    np.testing.assert_array_equal(got, _run_ema(ema.power_ema(g), seq))
  np.testing.assert_array_equal(tracked[0][0], seq[0])


@pytest.mark.parametrize('t_a,g_a,t_b,g_b', [(1.0, 6.94, 1.0, 16.97), (0.4, 16.97, 1.0, 6.94),
                                             (1.0, 6.94, 0.3, 6.94), (0.7, 0.0, 0.5, 2.0)])
def test_profile_inner_product_is_the_integral(t_a, g_a, t_b, g_b):
  n = 400_000
  tau = (np.arange(n) + 0.5) / n * min(t_a, t_b)
  p_a = (g_a + 1) * tau ** g_a / t_a ** (g_a + 1)
  p_b = (g_b + 1) * tau ** g_b / t_b ** (g_b + 1)
  want = np.sum(p_a * p_b) * min(t_a, t_b) / n
  assert ema.profile_inner_product(t_a, g_a, t_b, g_b) == pytest.approx(want, rel=1e-6)
  # Steps or images: scaling every time by c scales every inner product by 1 / c.
  assert ema.profile_inner_product(256 * t_a, g_a, 256 * t_b, g_b) == pytest.approx(
      want / 256, rel=1e-6)


# --- post-hoc reconstruction ------------------------------------------------------------------

G05, G10, G08 = (ema.sigma_rel_to_gamma(s) for s in (0.05, 0.10, 0.08))
T = 2000


def _snapshot_grid(every, last=T):
  steps = np.arange(every, last + 1, every)
  return np.concatenate([steps, steps]), np.repeat([G05, G10], len(steps))


def test_stored_profile_at_a_snapshot_step_is_that_snapshot():
  steps, gammas = _snapshot_grid(100)
  for i in (len(steps) // 2 - 1, 7, len(steps) - 1):
    x = ema.posthoc_coefficients(steps, gammas, steps[i], gammas[i])
    np.testing.assert_allclose(x, np.eye(len(steps))[i], atol=1e-8)
  rng = np.random.default_rng(0)
  trees = [{'a': rng.normal(size=(3,)).astype(np.float32)} for _ in steps]
  x = ema.posthoc_coefficients(steps, gammas, steps[7], gammas[7])
  np.testing.assert_allclose(ema.reconstruct(trees, x)['a'], trees[7]['a'], rtol=1e-6)


def test_coefficients_sum_to_one_and_do_not_depend_on_the_time_unit():
  steps, gammas = _snapshot_grid(200)
  x = ema.posthoc_coefficients(steps, gammas, 1500, G08)
  assert x.sum() == pytest.approx(1.0, abs=1e-12)
  np.testing.assert_allclose(ema.posthoc_coefficients(256 * steps, gammas, 256 * 1500, G08), x,
                             atol=1e-9)


@pytest.fixture(scope='module')
def random_walk_tracks():
  """A random walk of a [64] parameter over T steps; the power EMAs of sigma_rel 0.05, 0.10
  and 0.08 after every step: ([T, 64] x 3)."""
  rng = np.random.default_rng(0)
  walk = (np.cumsum(rng.normal(size=(T, 64)), axis=0) / math.sqrt(T)).astype(np.float32)
  return _run_ema(ema.power_ema_tracker((G05, G10, G08)), walk)


def test_reconstructed_profile_equals_the_one_tracked_directly(random_walk_tracks):
  # Least squares in function space is exact only in the limit of many snapshots: the
  # reconstructed weights miss the target's by (L1) 3e-2, 7e-3, 1.8e-3 with snapshots every
  # 500, 200, 100 steps (two profiles, T = 2000). The parameters' error is bounded by that
  # times their range; measured against how far the two stored profiles are apart (what a
  # wrong combination would miss by) it is 5e-2, 2e-3, 3e-4, and falls ~K^2.
  track05, track10, direct = random_walk_tracks
  scale = np.abs(track05[-1] - track10[-1]).max()
  errors = []
  for every in (500, 200, 100):
    steps, gammas = _snapshot_grid(every)
    x = ema.posthoc_coefficients(steps, gammas, T, G08)
    snaps = [(track05 if g == G05 else track10)[s - 1] for s, g in zip(steps, gammas,
                                                                      strict=True)]
    errors.append(np.abs(ema.reconstruct(snaps, x) - direct[-1]).max() / scale)
  assert errors[-1] < 1e-3, errors
  assert errors[0] > 3 * errors[1] > 9 * errors[2], errors


def test_reconstructed_weights_equal_the_tracked_profile():
  # Parameters one-hot in the step: the EMA *is* the weight profile. Snapshots every 25 of
  # 500 steps (L1 1.8e-3 for 2 x 20 snapshots, the same ratio as above) against the profiles'
  # own L1 distance (0.58).
  t, every = 500, 25
  tracks = _run_ema(ema.power_ema_tracker((G05, G10, G08)), np.eye(t, dtype=np.float32))
  steps, gammas = _snapshot_grid(every, last=t)
  x = ema.posthoc_coefficients(steps, gammas, t, G08)
  snaps = [tracks[0 if g == G05 else 1][s - 1] for s, g in zip(steps, gammas, strict=True)]
  miss = np.abs(ema.reconstruct(snaps, x) - tracks[2][-1]).sum()
  apart = np.abs(tracks[0][-1] - tracks[1][-1]).sum()
  assert apart == pytest.approx(0.585, abs=0.01)
  assert miss < 3e-3, miss


def test_reconstruct_at_an_earlier_step_uses_snapshots_up_to_it(random_walk_tracks):
  track05, track10, direct = random_walk_tracks
  steps, gammas = _snapshot_grid(50, last=1000)
  x = ema.posthoc_coefficients(steps, gammas, 1000, G08)
  snaps = [(track05 if g == G05 else track10)[s - 1] for s, g in zip(steps, gammas, strict=True)]
  scale = np.abs(track05[999] - track10[999]).max()
  assert np.abs(ema.reconstruct(snaps, x) - direct[999]).max() < 1e-3 * scale


# --- the train step and snapshot files ----------------------------------------------------------

def _quadratic_step(posthoc_fn):
  def loss_fn(params, model_state, batch, key, step):
    del key, step
    return jnp.sum((params['w'] - batch['x']) ** 2), ({}, model_state)
  return jax.jit(training.make_loss_train_step(loss_fn, optax.sgd(0.1), training.ema(0.9),
                                               posthoc_fn=posthoc_fn))


def test_train_step_tracks_the_posthoc_profiles_and_skips_with_the_update():
  tracker = ema.power_ema_tracker((G05, G10))
  params = {'w': jnp.zeros((2,))}
  init = lambda fn: training.init_train_state(params, optax.sgd(0.1), training.ema(0.9),
                                              jax.random.key(0), posthoc_fn=fn)
  plain, tracked = init(None), init(tracker)
  assert plain.posthoc_ema == ()
  step_plain, step_tracked = _quadratic_step(None), _quadratic_step(tracker)
  want = tracker.init(params)
  xs = [1.0, 2.0, np.nan, -1.0]
  for i, x in enumerate(xs):
    batch = {'x': jnp.full((2,), x)}
    plain, _ = step_plain(plain, batch)
    tracked, _ = step_tracked(tracked, batch)
    if np.isfinite(x):
      want = tracker.update(want, tracked.params, i)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(tracked.posthoc_ema), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-6)
  assert int(tracked.skipped) == 1
  for a, b in zip(jax.tree.leaves((plain.params, plain.ema_params)),
                  jax.tree.leaves((tracked.params, tracked.ema_params)), strict=True):
    np.testing.assert_array_equal(a, b)


def _tiny_params(rng):
  return {'Dense_0': {'kernel': rng.normal(size=(3, 4)).astype(np.float32),
                      'bias': rng.normal(size=(4,)).astype(np.float32)},
          'Dense_1': {'kernel': rng.normal(size=(4, 2)).astype(np.float32)}}


def test_snapshot_files_round_trip_and_reconstruct(tmp_path):
  rng = np.random.default_rng(0)
  gammas = (G05, G10)
  directory = str(tmp_path / ema.SNAPSHOT_SUBDIR)
  stored = {}
  for step in (10, 20, 30):
    tracked = (_tiny_params(rng), _tiny_params(rng))
    paths = ema.save_snapshot(directory, step, gammas, tracked)
    assert len(paths) == 2
    stored.update({(step, g): p for g, p in zip(gammas, tracked, strict=True)})
  assert sorted(os.listdir(directory)) == sorted(
      ema.snapshot_filename(s, g) for s, g in stored)     # no temporary files left
  snapshots = ema.load_snapshots(directory)
  assert [(s.step, s.gamma) for s in snapshots] == sorted(stored)
  for s in snapshots:
    jax.tree.map(np.testing.assert_array_equal, s.load(), stored[(s.step, s.gamma)])
  params, x, used = ema.reconstruct_from_directory(directory, G08, target_step=20)
  assert [s.step for s in used] == [10, 10, 20, 20]
  want = ema.reconstruct([stored[(s.step, s.gamma)] for s in used],
                         ema.posthoc_coefficients([10, 10, 20, 20], [G10, G05] * 2, 20, G08))
  jax.tree.map(np.testing.assert_array_equal, params, want)
  with pytest.raises(ValueError, match='target_step=40'):
    ema.reconstruct_from_directory(directory, G08, target_step=40)


def test_posthoc_ema_command_writes_the_reconstruction(tmp_path):
  rng = np.random.default_rng(0)
  directory = str(tmp_path / ema.SNAPSHOT_SUBDIR)
  for step in (100, 200):
    ema.save_snapshot(directory, step, (G05, G10), (_tiny_params(rng), _tiny_params(rng)))
  out = str(tmp_path / 'ema.npz')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'DIFFUSION_JAX_CACHE': str(tmp_path / 'cache')}
  cmd = [sys.executable, '-m', 'experiments.posthoc_ema', f'--workdir={tmp_path}',
         '--sigma_rel=0.08', f'--out={out}']
  r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert 'sigma_rel 0.08 (gamma 9.45' in r.stdout and r.stdout.count('coefficient') == 4
  want, _, _ = ema.reconstruct_from_directory(directory, G08)
  jax.tree.map(np.testing.assert_array_equal, ema.read_params(out), want)
  with np.load(out) as z:
    assert int(z['__step__']) == 200 and float(z['__sigma_rel__']) == pytest.approx(0.08)
  r = subprocess.run(cmd[:-1] + ['--step=300', f'--out={out}'], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2 and r.stderr.strip().count('\n') == 0, r.stderr
  assert 'target_step=300' in r.stderr


@pytest.mark.parametrize('call,match', [
    (lambda: ema.sigma_rel_to_gamma(0.3), 'sigma_rel=0.3'),
    (lambda: ema.sigma_rel_to_gamma(0.0), 'sigma_rel=0.0'),
    (lambda: ema.power_ema(-0.5), 'gamma=-0.5'),
    (lambda: ema.power_ema_tracker((G05,)), 'at least two'),
    (lambda: ema.power_ema_tracker((G05, G05)), 'distinct'),
    (lambda: ema.posthoc_coefficients([10, 20], [G05, G05], 20, G08), 'one profile only'),
    (lambda: ema.posthoc_coefficients([10, 20], [G05, G10], 21, G08), 'target_step=21'),
    (lambda: ema.posthoc_coefficients([10, 10, 20], [G05, G05, G10], 20, G08), 'twice'),
    (lambda: ema.posthoc_coefficients([10, 20], [G05], 20, G08), '2 snapshot steps for 1'),
    (lambda: ema.reconstruct([{'a': 1.0}], [0.5, 0.5]), '1 snapshots for 2'),
    (lambda: training.ema_halflife(0, 32), 'halflife_images=0'),
    (lambda: training.ema_halflife(1000, 32, rampup_ratio=0), 'rampup_ratio=0'),
])
def test_bad_inputs_are_one_line_errors(call, match):
  with pytest.raises(ValueError, match=match) as e:
    call()
  assert '\n' not in str(e.value)
