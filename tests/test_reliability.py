"""Runs survive what clusters do to them, through the real CLI and loop:

- SIGKILL at a random step, then a rerun: the final state is bit-identical to an uninterrupted
  run (data order and keys are functions of (seed, step); the key is in the checkpoint).
- SIGTERM, and Ctrl-C (SIGINT) alike: a checkpoint at the current step and exit status 75 (the
  requeue status); the rerun resumes from that step and again ends bit-identical.
- A save that cannot be written (the file size limit of a full disk): one line naming the
  directory and the OS error, exit 74 within seconds, the earlier checkpoints intact.
- A non-finite batch is skipped and counted; a persistent one stops the run with a one-line
  message and leaves a readable checkpoint.
"""

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from configs import digits as digits_config
from diffusion_jax import checkpointing
from diffusion_jax import preemption
from diffusion_jax import train_loop
from diffusion_jax import training
from diffusion_jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The MLP: what is tested (data order, keys, checkpoints, signals) does not depend on the
# network, and its few ops compile in seconds. Checkpoints every 10 steps keep the run long
# enough (~30 steps/s) for a kill to land mid-run.
STEPS = 200
ARGS = ['--config=configs/digits.py:smoke,mlp', f'--config.train.num_steps={STEPS}',
        '--config.train.checkpoint_every=10', '--config.eval.enabled=False',
        '--config.sample.grid_size=0']


@pytest.fixture(scope='module')
def env(subprocess_cache):
  return dict(os.environ, DIFFUSION_JAX_CACHE=subprocess_cache, PYTHONUNBUFFERED='1')


def _cmd(workdir, *extra):
  return [sys.executable, '-m', 'experiments.train', f'--workdir={workdir}', *ARGS, *extra]


def _train(workdir, env):
  return subprocess.run(_cmd(workdir), cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)


def _final_state(workdir):
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    config = ml_collections.ConfigDict(json.load(f))
  _, state, step = train_loop.load_checkpoint(config, str(workdir))
  return step, jax.tree.map(np.asarray, state)


def _assert_bit_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(u, v)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, env):
  workdir = tmp_path_factory.mktemp('straight')
  done = _train(workdir, env)
  assert done.returncode == 0, done.stderr[-3000:]
  step, state = _final_state(workdir)
  assert step == STEPS
  return state


def _start_and_wait(workdir, env, ready, *extra):
  """Starts a run and returns once `ready()` is true."""
  proc = subprocess.Popen(_cmd(workdir, *extra), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not ready():
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline, 'the run did not get going in 300 s'
    time.sleep(0.02)
  return proc


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tmp_path, env, uninterrupted):
  workdir = tmp_path / 'killed'
  proc = _start_and_wait(workdir, env, (workdir / 'checkpoints' / '10').exists)
  delay = random.Random().uniform(0.0, 1.5)   # anywhere in the next ~40 steps, or mid-save
  time.sleep(delay)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  steps = sorted(int(p) for p in os.listdir(workdir / 'checkpoints') if p.isdigit())
  assert steps and steps[-1] < STEPS, f'killed after {delay:.2f} s, checkpoints {steps}'
  done = _train(workdir, env)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'Resuming from checkpoint step' in done.stdout
  step, state = _final_state(workdir)
  assert step == STEPS
  _assert_bit_identical(state, uninterrupted)


@pytest.mark.parametrize('sig', [signal.SIGTERM,
                                 pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_sigterm_checkpoints_the_current_step_and_asks_for_a_requeue(tmp_path, env,
                                                                      uninterrupted, sig):
  workdir = tmp_path / 'preempted'
  metrics = workdir / 'metrics.jsonl'
  # Training is under way once step 5 is logged.
  proc = _start_and_wait(workdir, env, lambda: metrics.exists() and metrics.stat().st_size > 0)
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == preemption.EXIT_CODE, err[-3000:]
  assert 'Traceback' not in err, err[-3000:]
  line = [ln for ln in err.splitlines() if ln.startswith('preempted: ')]
  assert len(line) == 1, err[-2000:]
  assert f'{sig.name} received: checkpoint saved at step' in line[0], err[-2000:]
  saved = int(line[0].split('checkpoint saved at step ')[1].split()[0])
  assert 5 <= saved < STEPS
  steps = sorted(int(p) for p in os.listdir(workdir / 'checkpoints') if p.isdigit())
  assert steps[-1] == saved     # the current step, not the last periodic one

  done = _train(workdir, env)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f'Resuming from checkpoint step {saved}' in done.stdout
  assert f'Trained steps {saved}..{STEPS}' in done.stdout
  _, state = _final_state(workdir)
  _assert_bit_identical(state, uninterrupted)


def test_a_failed_save_is_one_line_exits_promptly_and_keeps_the_earlier_steps(tmp_path, env):
  """A full disk, as the process sees it: once step 10 is saved, the run's file size limit
  drops to 0 (root ignores permissions; RLIMIT_FSIZE binds it too), so the next save fails
  with EFBIG inside orbax's threads. No metrics are written in between (log_every)."""
  workdir = tmp_path / 'full'
  ckpts = workdir / 'checkpoints'
  proc = _start_and_wait(workdir, env, (ckpts / '10').exists, '--config.train.log_every=1000')
  resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (0, 0))
  saved_before = sorted(int(p) for p in os.listdir(ckpts) if p.isdigit())
  t0 = time.time()
  _, err = proc.communicate(timeout=120)
  seconds = time.time() - t0
  assert proc.returncode == 74, err[-3000:]
  assert seconds < 30, f'took {seconds:.0f} s to exit'
  assert 'Traceback' not in err, err[-3000:]
  errors = [ln for ln in err.splitlines() if 'error' in ln.lower()]
  assert len(errors) == 1, err[-3000:]
  line = errors[0]
  assert line.startswith('error: could not save checkpoint step ') and str(ckpts) in line, line
  assert '[Errno 27] File too large' in line, line
  failed = int(line.split('checkpoint step ')[1].split()[0])
  steps = sorted(int(p) for p in os.listdir(ckpts) if p.isdigit())
  assert failed not in steps and steps and steps[-1] == failed - 10, (steps, line)
  assert saved_before[-1] in steps    # the newest step saved before the failure is kept
  assert f'the earlier steps {", ".join(map(str, steps))} are kept' in line, line
  step, _ = _final_state(workdir)
  assert step == steps[-1]


class _Poisoned:
  """The digits with NaN images at the given steps."""

  def __init__(self, bad_steps):
    x, y = sources.make_source(sources.DataConfig()).images, None
    self._source = sources.ArraySource(x, y)
    self.image_shape, self.num_classes = self._source.image_shape, 0
    self.bad_steps = bad_steps

  def __len__(self):
    return len(self._source)

  def batch(self, seed, step, *args):
    out = self._source.batch(seed, step, *args)
    if self.bad_steps(step):
      out['image'] = out['image'] * np.nan
    return out


def _config(steps, **train):
  config = digits_config.get_config('smoke,mlp')
  config.train.update(num_steps=steps, checkpoint_every=4, log_every=4, **train)
  config.eval.enabled = False
  config.sample.grid_size = 0
  return config


def test_a_nan_batch_is_skipped_and_counted(tmp_path):
  train_loop.train_and_evaluate(_config(8), str(tmp_path), source=_Poisoned(lambda s: s == 5))
  records = [json.loads(ln) for ln in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  by_step = {r['step']: r for r in records if 'loss' in r}
  assert by_step[4]['skipped'] == 0 and by_step[8]['skipped'] == 1
  assert by_step[8]['skipped_total'] == 1 and np.isfinite(by_step[8]['loss'])
  # The skipped update did not advance the optimizer: step 8's update was its 7th, at count 6
  # of the smoke warm-up (2e-3 * count / 100), as step 4's was at count 3.
  assert by_step[4]['lr'] == pytest.approx(2e-3 * 3 / 100, rel=1e-6)
  assert by_step[8]['lr'] == pytest.approx(2e-3 * 6 / 100, rel=1e-6)
  _, state = _final_state(tmp_path)
  assert int(state.skipped) == 1 and int(state.step) == 8
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(state.params))


def test_persistent_nan_stops_the_run_with_a_readable_checkpoint(tmp_path):
  config = _config(20, max_consecutive_skips=3)
  with pytest.raises(training.TrainingDiverged) as e:
    train_loop.train_and_evaluate(config, str(tmp_path), source=_Poisoned(lambda s: s >= 6))
  message = str(e.value)
  # Steps 7, 8, 9 (0-based 6, 7, 8) are non-finite; the last finite update was step 6.
  assert 'training stopped at step 9: 3 consecutive updates' in message, message
  assert 'last finite update at step 6' in message and '\n' not in message
  with checkpointing.Checkpointer(tmp_path / 'checkpoints') as ckpt:
    assert ckpt.all_steps() == [4, 8]
  step, state = _final_state(tmp_path)
  assert step == 8 and int(state.consecutive_skips) == 2
  assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(state.params))


def test_a_second_ctrl_c_exits_at_once_after_releasing(tmp_path):
  """The first SIGINT asks for a save; a second one exits now (130), after `on_force_exit`."""
  script = (
      'import os, signal, time\n'
      'from diffusion_jax import preemption\n'
      'with preemption.PreemptionWatcher(on_force_exit=lambda: print("released", flush=True)):\n'
      '  os.kill(os.getpid(), signal.SIGINT)\n'
      '  os.kill(os.getpid(), signal.SIGINT)\n'
      '  time.sleep(60)\n')
  t0 = time.time()
  done = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True, text=True,
                        timeout=60)
  assert done.returncode == preemption.FORCE_EXIT_CODE, done.stderr[-2000:]
  assert time.time() - t0 < 30 and done.stdout == 'released\n'
  assert 'saving the current step' in done.stderr
  assert 'interrupted again: exiting now, without saving this step' in done.stderr
  assert 'Traceback' not in done.stderr
