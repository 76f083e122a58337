"""WaveGrad's noise schedules as explicit sampler grids (`audio.schedules`, issue 23).

A schedule of betas defines levels abar_n = prod_{i<=n} (1 - b_i); `times` must find the times at
which the process has exactly those levels. The closed forms: on the process WaveGrad trains
(1000 linear betas 1e-6 .. 0.01), its own training schedule lands on the integer steps t = n / T;
any other schedule's alpha(t_n)^2 equals its abar_n.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import processes
from diffusion_jax.audio import schedules


@pytest.fixture(scope='module')
def proc():
  return processes.make_process('vp_discrete', schedule='linear', num_steps=1000,
                                beta_start=1e-6, beta_end=1e-2)


def test_training_schedule_lands_on_the_integer_steps(proc):
  t = np.asarray(schedules.times(proc, np.linspace(1e-6, 1e-2, 1000)))
  np.testing.assert_allclose(t, np.arange(1000, 0, -1) / 1000, rtol=0, atol=2e-6)


@pytest.mark.parametrize('betas', [np.linspace(1e-4, 0.05, 50),
                                   np.geomspace(1e-5, 0.5, 6)])
def test_levels_of_any_schedule_are_the_products_of_one_minus_beta(proc, betas):
  t = np.asarray(schedules.times(proc, betas), np.float32)
  # abar_n = exp(sum_{i<=n} log(1 - b_i)), noisiest first.
  want = np.exp(np.cumsum(np.log1p(-betas)))[::-1]
  got = np.asarray(proc.alpha(jnp.asarray(t))) ** 2
  np.testing.assert_allclose(got, want, rtol=2e-4)
  assert np.all(np.diff(t) < 0)


def test_schedule_outside_the_process_is_refused(proc):
  with pytest.raises(ValueError, match='leave this process range') as e:
    schedules.times(proc, np.geomspace(1e-8, 0.5, 6))      # first level cleaner than t_min
  assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match='non-decreasing'):
    schedules.times(proc, [0.5, 0.1])
  with pytest.raises(ValueError, match=r'in \(0, 1\)'):
    schedules.times(proc, [0.0, 0.1])


def test_search_picks_the_best_fitting_candidate_deterministically(proc):
  target = np.asarray(schedules.times(proc, schedules.geometric_betas(1e-4, 0.5, 6)))
  score = lambda t: float(np.sum((np.asarray(t) - target) ** 2))
  a = schedules.search(score, proc, 6)
  assert a['name'] == 'geometric(0.0001, 0.5)' and a['score'] == 0.0
  assert a == schedules.search(score, proc, 6)
  # A candidate with a level the process does not reach is skipped, not scored.
  grid = [('unreachable', np.geomspace(1e-8, 0.5, 6)),
          ('reachable', schedules.geometric_betas(1e-4, 0.5, 6))]
  b = schedules.search(score, proc, 6, grid)
  assert [name for name, _ in b['table']] == ['reachable'] and b['name'] == 'reachable'


def test_stored_schedule_is_refused_for_another_process_or_count(proc, tmp_path):
  cfg = dict(name='vp_discrete', schedule='linear', num_steps=1000, beta_start=1e-6,
             beta_end=1e-2)
  best = schedules.search(lambda t: t[0], proc, 6)
  path = str(tmp_path / 'wavegrad_6.json')
  schedules.save(path, best, cfg)
  assert schedules.load(path, cfg, 6)['times'] == best['times']
  with pytest.raises(ValueError, match='found for process'):
    schedules.load(path, dict(cfg, beta_end=0.02), 6)
  with pytest.raises(ValueError, match='has 6 iterations, not 50'):
    schedules.load(path, cfg, 50)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump({'bad': 1}, f)
  with pytest.raises(ValueError, match='found for process'):
    schedules.load(path, cfg, 6)
