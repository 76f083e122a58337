"""Sharded training through the real loop: 1 device and 8 devices with the same global batch
agree, so do FSDP and gradient accumulation, and a checkpoint written on 8 devices restores and
continues on 1 (and the reverse). Subprocesses, since the device count is fixed when JAX starts.

Tolerance. The runs differ only in the order XLA sums per-example gradients (per device, then
across devices): float32 reassociation, ~1e-7 relative, which Adam turns into parameter
differences of about one ulp of an O(1) parameter per step. The bound 1e-5 is 100x the measured
figures (1 vs 8 devices 8.9e-8, FSDP vs replicated 1.5e-7, accumulation 1 vs 8 devices 3.7e-7,
continuing on another device count 3e-8) and 1/200 of one Adam step (lr = 2e-3): a dropped or
double-counted shard moves parameters by O(lr) in the first update.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import sharded_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def _run(root, devices, *jobs):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
             JAX_COMPILATION_CACHE_DIR=os.path.join(ROOT, '.jax_cache'))
  done = subprocess.run([sys.executable, os.path.join(ROOT, 'tests', 'sharded_runs.py'),
                         str(root), *jobs], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=900)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
  return done.stdout


def _fork(root, name, new):
  """A copy of run `name` whose newest checkpoint is removed: it resumes from the one before."""
  shutil.copytree(root / name, root / new)
  shutil.rmtree(root / new / 'checkpoints' / str(sharded_runs.NUM_STEPS))


def _load(root, name, devices):
  with np.load(root / f'{name}.{devices}.npz') as f:
    return {k: f[k] for k in f.files}


def _max_diff(a, b):
  assert a.keys() == b.keys()
  d = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
  print(f'max |param diff| = {d:.3g}')   # the figures, with `pytest -s`
  return d


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """1 device: r1 (replicated), a1 (2 micro-batches). 8 devices: r8, f8 (FSDP), a8, and r1to8
  (r1's half-way checkpoint continued on 8 devices). Here (1 device): r8to1 (r8's half-way
  continued). Each run's final parameters are dumped by the process that holds them."""
  root = tmp_path_factory.mktemp('sharded')
  out = _run(root, 1, 'train:r1:replicated', 'train:a1:accum', 'dump:r1', 'dump:a1',
             'sample:r1')
  _fork(root, 'r1', 'r1to8')
  out += _run(root, 8, 'train:r8:replicated', 'train:f8:fsdp', 'train:a8:accum',
              'continue:r1to8', 'dump:r8', 'dump:f8', 'dump:a8', 'dump:r1to8', 'dump:r1',
              'sample:r1')
  _fork(root, 'r8', 'r8to1')
  sharded_runs.main(str(root), ['continue:r8to1', 'dump:r8to1', 'dump:r8'])
  return root, out


def test_one_and_eight_devices_agree(runs):
  root, _ = runs
  d = _max_diff(_load(root, 'r1', 1), _load(root, 'r8', 8))
  assert d < TOL, f'1 vs 8 devices: max |param diff| = {d:.3g}'


def test_fsdp_agrees_with_replicated_and_really_shards(runs):
  root, out = runs
  d = _max_diff(_load(root, 'f8', 8), _load(root, 'r8', 8))
  assert d < TOL, f'FSDP vs replicated on 8 devices: {d:.3g}'
  marker = f'DUMP f8 step={sharded_runs.NUM_STEPS} devices=8 sharded_leaves='
  sharded = int(out.split(marker)[1].split()[0])
  assert sharded >= 10, f'only {sharded} parameter leaves were sharded under FSDP'
  assert f'DUMP r8 step={sharded_runs.NUM_STEPS} devices=8 sharded_leaves=0' in out


def test_gradient_accumulation_agrees_across_device_counts(runs):
  root, _ = runs
  d = _max_diff(_load(root, 'a1', 1), _load(root, 'a8', 8))
  assert d < TOL, f'accumulated (2 micro-batches), 1 vs 8 devices: {d:.3g}'


def test_checkpoint_restores_exactly_across_topologies(runs):
  root, _ = runs
  # Written on 8 devices, restored on 1 (and the reverse): the same bits.
  assert _max_diff(_load(root, 'r8', 8), _load(root, 'r8', 1)) == 0.0
  assert _max_diff(_load(root, 'r1', 1), _load(root, 'r1', 8)) == 0.0


def test_training_continues_on_another_device_count(runs):
  root, _ = runs
  # Half the steps on 8 devices, the rest on 1, against all on 8 devices (and the reverse).
  d = _max_diff(_load(root, 'r8to1', 1), _load(root, 'r8', 8))
  assert d < TOL, f'8 -> 1 devices at step 4: {d:.3g}'
  d = _max_diff(_load(root, 'r1to8', 8), _load(root, 'r1', 1))
  assert d < TOL, f'1 -> 8 devices half-way: {d:.3g}'


def test_sampling_sharded_over_8_devices_matches_one_device(runs):
  """The same model (r1) sampled with DDIM on 1 and 8 devices (batches of 4 padded to 8 there):
  the padding rows are dropped and each sample's noise depends only on its index."""
  root, _ = runs
  one, eight = (np.load(root / f'r1.samples.{n}.npy') for n in (1, 8))
  assert one.shape == eight.shape == (10, 8, 8, 1)
  d = float(np.max(np.abs(one - eight)))
  print(f'samples, 1 vs 8 devices: max |diff| = {d:.3g}')
  # 5 deterministic steps of float32 arithmetic on values of scale 1; no reduction across rows.
  assert d < 1e-5, d
