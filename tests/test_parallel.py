"""The sharding layer's rules and the data path's pieces, on this process's one device (the
multi-device and multi-process behaviour is in test_sharded_training.py / test_multiprocess.py).
"""

import threading

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from diffusion_jax import parallel
from diffusion_jax import preemption
from diffusion_jax.data import sources


@pytest.mark.parametrize('shape, spec', [
    ((3, 3, 64, 128), P(None, None, None, 'data')),   # largest divisible dimension
    ((4096, 8), P('data')),
    ((24, 1001), P('data')),                          # 1001 is not divisible by 8: the next one
    ((7, 999), P()),                                  # nothing divisible: replicated
    ((256,), P()),                                    # small: replicated
    ((), P()),
])
def test_fsdp_spec(shape, spec):
  assert parallel.fsdp_spec(shape, 8, min_size=1024) == spec


def test_fsdp_on_one_device_is_replication():
  assert parallel.fsdp_spec((4096, 4096), 1) == P()


@pytest.mark.parametrize('kwargs, message', [
    (dict(coordinator_address='127.0.0.1:1234'), 'give all of'),
    (dict(coordinator_address='x:1', num_processes=2, process_id=2), 'process_id=2 must lie'),
])
def test_distributed_flags_are_checked(kwargs, message):
  with pytest.raises(ValueError, match=message):
    parallel.initialize(**kwargs)


def test_one_process_starts_nothing(monkeypatch):
  for k in ('SLURM_NTASKS', 'SLURM_STEP_NUM_TASKS', 'SLURM_PROCID'):
    monkeypatch.delenv(k, raising=False)
  assert parallel.initialize() is False
  assert parallel.initialize('127.0.0.1:1', 1, 0) is False
  monkeypatch.setenv('SLURM_NTASKS', '1')        # a one-task SLURM job: nothing to join
  monkeypatch.setenv('SLURM_PROCID', '0')
  assert parallel.initialize() is False


def test_prefetcher_yields_in_order_and_raises_at_the_failing_step():
  def make(step):
    if step == 7:
      raise RuntimeError('bad file at step 7')
    return step * 10
  it = sources.Prefetcher(make, 3, 10, depth=2)
  got = [next(it), next(it), next(it), next(it)]
  assert got == [(3, 30), (4, 40), (5, 50), (6, 60)]
  with pytest.raises(RuntimeError, match='bad file at step 7'):
    next(it)
  it.close()
  assert list(sources.Prefetcher(lambda s: s, 0, 3, depth=1)) == [(0, 0), (1, 1), (2, 2)]


def test_array_source_shards_are_disjoint_and_make_the_global_batch():
  x = np.arange(50, dtype=np.float32).reshape(50, 1, 1, 1)
  source = sources.ArraySource(x, np.arange(50) % 10, num_classes=10)
  whole = source.batch(3, 4, 12)
  parts = [source.batch(3, 4, 12, p, 3) for p in range(3)]
  np.testing.assert_array_equal(np.concatenate([p['image'] for p in parts]), whole['image'])
  np.testing.assert_array_equal(whole['label'], whole['image'][:, 0, 0, 0].astype(int) % 10)
  with pytest.raises(ValueError, match='global batch 12 is not divisible by process_count=5'):
    source.batch(3, 4, 12, 0, 5)


def test_npy_source_errors_name_the_key(tmp_path):
  with pytest.raises(ValueError, match=r"config.data.path='.*nope.npy': cannot read"):
    sources.make_source(sources.DataConfig(name='npy', path=str(tmp_path / 'nope.npy')))
  np.save(tmp_path / 'flat.npy', np.zeros((4, 8), np.float32))
  with pytest.raises(ValueError, match=r'images must be \[N, H, W, C\]; got shape \(4, 8\)'):
    sources.make_source(sources.DataConfig(name='npy', path=str(tmp_path / 'flat.npy')))


def test_preemption_watcher_records_a_signal_and_restores_the_handler():
  import os  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  before = signal.getsignal(signal.SIGUSR1)
  with preemption.PreemptionWatcher() as watcher:
    assert not watcher.should_stop()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert watcher.should_stop() and watcher.signal_name == 'SIGUSR1'
  assert signal.getsignal(signal.SIGUSR1) is before
  # Off the main thread no handler can be installed: it watches nothing, and says so by never
  # stopping (the training loop runs on the main thread).
  result = []
  t = threading.Thread(target=lambda: result.append(preemption.PreemptionWatcher().__enter__()))
  t.start()
  t.join()
  assert not result[0].should_stop()
