"""The objective-ablation driver end to end on tiny settings (2-D mixture, two objectives, one
sampler): its files and table rows, the skip-if-done path, and the equal-compute guarantee."""

import csv
import json
import os

import numpy as np
import pytest

from configs import ablation_digits
from configs import ablation_toy2d
from diffusion_jax import run_config
from experiments import ablation_lib as lib
from experiments import ablation_report as report


def _tiny():
  config = ablation_toy2d.get_config()
  config.train.update(num_steps=40, log_every=20)
  config.ablation.update(objectives='eps,flow', samplers='euler', nfes='3', curve_every=20,
                         num_samples=256)
  config.sample.update(batch_size=256, grid_size=64)
  return config


@pytest.mark.slow   # ~8-16 s; moved out of the default run (its 10-minute budget)
def test_runs_share_model_data_optimizer_seed_and_budget():
  """Equal compute: every run of the digits ablation has the same model, data, optimizer,
  training and seed sections; only process, objective and sampling differ. The data order is
  a function of (seed, step, batch): every run reads the very same batches."""
  config = ablation_digits.get_config()
  config.ablation.seeds = '0,1'
  runs = lib.make_runs(config)
  assert [r.name for r in runs] == [f'{o}_s{s}' for o in ablation_digits.RUNS for s in (0, 1)]
  for seed in (0, 1):
    group = [r for r in runs if r.seed == seed]
    for section in ('model', 'data', 'optim', 'train'):
      assert len({json.dumps(r.config[section].to_dict(), sort_keys=True) for r in group}) == 1
    assert {r.config.seed for r in group} == {seed}
    sources = [run_config.build(r.config).source for r in group[:3]]
    for step in (0, 7, 2999):
      batches = [s.batch(seed, step, 128)['image'] for s in sources]
      for b in batches[1:]:
        np.testing.assert_array_equal(b, batches[0])
  assert {r.config.train.num_steps * r.config.train.batch_size for r in runs} == {384_000}
  assert {r.objective: r.config.objective.name for r in runs}['ct'] == 'consistency_training'
  assert [r for r in runs if r.objective == 'ct'][0].config.objective.total_steps == 3000


def test_unknown_run_is_a_one_line_error():
  config = ablation_digits.get_config()
  config.ablation.objectives = 'eps,nope'
  with pytest.raises(lib.ConfigError, match=r"unknown run 'nope'; choose from"):
    lib.make_runs(config)


@pytest.mark.slow
def test_driver_end_to_end_and_skips_what_is_done(tmp_path):
  config = _tiny()
  runs = lib.make_runs(config)
  rows, curve, losses = lib.run_ablation(runs, config, str(tmp_path), str(tmp_path / 'cache'))
  report.write_all(str(tmp_path), runs, rows, curve, losses, lib.metric_name(config))

  for name in ('results.csv', 'results.md', 'curve.csv', 'metric_vs_nfe.png',
               'metric_vs_step.png', 'loss_vs_logsnr.png', 'samples.png'):
    assert (tmp_path / name).exists(), name
  with open(tmp_path / 'results.csv', encoding='utf-8') as f:
    table = list(csv.DictReader(f))
  assert [(r['objective'], r['sampler'], r['nfe']) for r in table] == [
      ('eps', 'euler', '3'), ('flow', 'euler', '3')]
  assert all(float(r['sw']) > 0 and float(r['sw_floor']) > 0 for r in table)
  md = (tmp_path / 'results.md').read_text()
  assert '| eps |' in md and '| flow |' in md and 'euler 3' in md
  assert sorted({(r['objective'], r['step']) for r in curve}) == [
      ('eps', 20), ('eps', 40), ('flow', 20), ('flow', 40)]
  # Equal compute, as the runs' own checkpoints record it.
  seen = {json.loads((tmp_path / 'runs' / r.name / 'checkpoints' / '40' / 'meta' /
                      'metadata').read_text())['data']['examples_seen'] for r in runs}
  assert seen == {40 * 512}

  # A rerun trains nothing and measures nothing: every cached file is left as it was.
  stamps = {p: os.stat(p).st_mtime_ns for p in _files(tmp_path / 'runs')}
  again, _, _ = lib.run_ablation(runs, config, str(tmp_path), str(tmp_path / 'cache'))
  assert [r['sw'] for r in again] == [r['sw'] for r in rows]
  assert {p: os.stat(p).st_mtime_ns for p in _files(tmp_path / 'runs')} == stamps


def _files(root):
  return [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]


def test_emit_sweep_writes_configs_the_training_cli_accepts(tmp_path):
  config = _tiny()
  runs = lib.make_runs(config)
  sweep = tmp_path / 'sweep.txt'
  lib.emit_sweep(runs, str(sweep), str(tmp_path / 'runs'))
  lines = [ln for ln in sweep.read_text().splitlines() if not ln.startswith('#')]
  assert [ln.split()[0] for ln in lines] == ['eps_s0', 'flow_s0']
  from configs import json_config  # pylint: disable=g-import-not-at-top
  path = lines[1].split('--config=configs/json_config.py:')[1]
  loaded = json_config.get_config(path)
  assert loaded.objective.name == 'flow_matching' and loaded.process.name == 'linear'
  assert run_config.build(loaded).image_shape == (2,)


def test_table_gives_mean_and_spread_over_seeds_and_names_a_diverged_seed():
  """Two seeds: the cell is mean ± sample std; a non-finite seed is counted, not averaged away,
  and a sampler that diverged on a seed is not called the best."""
  def row(o, s, n, seed, fd):
    return {'objective': o, 'sampler': s, 'nfe': n, 'nfe_budget': n, 'seed': seed, 'fd': fd,
            'fd_floor': 2.0}
  rows = [row('eps', 'euler', 10, 0, 4.0), row('eps', 'euler', 10, 1, 6.0),
          row('eps', 'heun', 10, 0, 3.0), row('eps', 'heun', 10, 1, float('nan')),
          row('v', 'euler', 10, 0, 5.0), row('v', 'euler', 10, 1, 5.5)]
  md = report.results_table(rows, 'fd')
  assert '2 seed(s) [0, 1]: mean ± std' in md
  lines = md.splitlines()
  eps = next(ln for ln in lines if ln.startswith('| eps | 5 ± 1.4'))   # std([4, 6], ddof=1)
  assert '3 (1/2 non-finite)' in eps
  assert '| v | 5.25 ± 0.35 |' in md
  best = [ln for ln in lines if ln.startswith('| eps |')][1]
  assert best == '| eps | 5 (euler) |'      # heun's finite seed (3) is lower, but it diverged
  assert 'Floor (real data against the reference, same n): 2.' in md
