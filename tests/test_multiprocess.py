"""Two real processes on localhost (`launch/multiprocess.sh`, jax.distributed with CPU
collectives over gloo) train the same steps as one process holding both shards, and a
preemption signal that reaches only one of them stops both at the same checkpointed step."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from diffusion_jax import preemption
from diffusion_jax import train_loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The MLP: the runs' time goes to process start-up and the collectives, not to compiling.
ARGS = ['--config.train.num_steps=12', '--config.train.checkpoint_every=6',
        '--config.train.log_every=2', '--config.eval.enabled=False',
        '--config.sample.grid_size=0']
# Both runs sum the same per-device gradients across 2 devices, once through gloo and once
# in-process. Measured: bit-identical. The bound is that of test_sharded_training.py (float32
# reassociation, if a reduction were split differently), far below one Adam step of 2e-3.
TOL = 1e-5


@pytest.fixture(scope='module')
def env(subprocess_cache):
  return dict(os.environ, DIFFUSION_JAX_CACHE=subprocess_cache,
              PYTHONUNBUFFERED='1', JAX_PLATFORMS='cpu', XLA_FLAGS='')


def _launch(n, workdir, env, *args):
  return subprocess.Popen(['bash', 'launch/multiprocess.sh', str(n), 'configs/digits.py:smoke,mlp',
                           str(workdir), *ARGS, *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _state(workdir):
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    config = ml_collections.ConfigDict(json.load(f))
  _, state, step = train_loop.load_checkpoint(config, str(workdir))
  return step, jax.tree.map(np.asarray, state)


def test_two_processes_agree_with_one_process_holding_both_shards(tmp_path, env):
  two = _launch(2, tmp_path / 'two', env)
  out, err = two.communicate(timeout=600)
  assert two.returncode == 0, err[-3000:]
  assert 'on 2 process(es), 2 device(s) (1 local, cpu)' in out
  one = subprocess.run(
      [sys.executable, '-m', 'experiments.train', '--config=configs/digits.py:smoke,mlp',
       f'--workdir={tmp_path / "one"}', *ARGS], cwd=ROOT, capture_output=True, text=True,
      env=dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=2'), timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  assert 'on 1 process(es), 2 device(s) (2 local, cpu)' in one.stdout

  (s2, two_state), (s1, one_state) = _state(tmp_path / 'two'), _state(tmp_path / 'one')
  assert s1 == s2 == 12
  diff = max(float(np.max(np.abs(a - b))) for a, b in
             zip(jax.tree.leaves(two_state.params), jax.tree.leaves(one_state.params), strict=True))
  print(f'2 processes vs 1 process with 2 devices: max |param diff| {diff:.3g}')
  assert diff < TOL, f'2 processes vs 1 process with 2 devices: max |param diff| {diff:.3g}'
  # Only process 0 writes logs: one line per logged step, none twice.
  logged = [json.loads(ln)['step'] for ln in (tmp_path / 'two' / 'metrics.jsonl').open()]
  assert logged == list(range(2, 13, 2))


def _pid_of(workdir, process_id):
  for pid in os.listdir('/proc'):
    if not pid.isdigit():
      continue
    try:
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        args = f.read().split(b'\0')
    except OSError:
      continue
    if f'--workdir={workdir}'.encode() in args and f'--process_id={process_id}'.encode() in args:
      return int(pid)
  return None


# The single-process SIGTERM path is in test_reliability.py's default run; this two-process
# copy (~40 s of a CI worker) is `slow`.
@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_saved_step(tmp_path, env):
  workdir = tmp_path / 'pre'
  run = _launch(2, workdir, env, '--config.train.num_steps=100000',
                '--config.train.checkpoint_every=100000')
  deadline = time.time() + 300
  metrics = workdir / 'metrics.jsonl'
  while not (metrics.exists() and metrics.stat().st_size > 0):   # training is under way
    assert run.poll() is None and time.time() < deadline, run.communicate()[1][-3000:]
    time.sleep(0.05)
  os.kill(_pid_of(workdir, 1), signal.SIGTERM)        # only process 1 is told
  _, err = run.communicate(timeout=300)
  assert run.returncode == preemption.EXIT_CODE, err[-3000:]
  line = next(ln for ln in err.splitlines() if ln.startswith('preempted: '))
  assert 'a preemption signal (on another process) received' in line     # process 0's words
  saved = int(line.split('checkpoint saved at step ')[1].split()[0])
  log1 = (workdir / 'logs' / 'process_1.log').read_text()
  assert f'SIGTERM received: checkpoint saved at step {saved} ' in log1
  step, _ = _state(workdir)
  assert step == saved < 100000
