"""Devices, sharding and processes: the outer layer around the math (DESIGN §5).

One `Mesh` over every device of every process with a single `data` axis. The global batch is
sharded on it; parameters and optimizer state are replicated, or (`'fsdp'`) each large leaf is
split over the same axis along its largest divisible dimension, so XLA all-gathers it for the
forward pass and reduce-scatters its gradient. The objectives, models and samplers never name a
device or an axis: shardings are applied around `jax.jit` by the training loop.

Multi-process runs start with `initialize(...)` (explicit coordinator, or SLURM's variables),
after which each process feeds only its own rows of every global batch (`global_batch`).
"""

import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'
PARAM_SHARDINGS = ('replicated', 'fsdp')
# Leaves smaller than this stay replicated under FSDP: splitting a bias saves nothing and
# costs a collective per use.
FSDP_MIN_SIZE = 2 ** 12


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts JAX's distributed runtime when the run spans several processes.

  Explicit arguments win (all three are needed: `launch/multiprocess.sh` passes them). Without
  them, a SLURM step of more than one task is detected from its variables
  (`SLURM_STEP_NUM_TASKS`, `SLURM_NTASKS`) and `jax.distributed.initialize()` reads the rest
  itself (coordinator from the node list, process id from `SLURM_PROCID`, and one local GPU per
  task when several tasks share a node). One process: nothing to start. Returns whether the
  distributed runtime was started.
  """
  given = [coordinator_address, num_processes, process_id]
  if any(v is not None for v in given):
    if any(v is None for v in given):
      raise ValueError('distributed: give all of coordinator_address, num_processes and '
                       f'process_id (got {coordinator_address!r}, {num_processes!r}, '
                       f'{process_id!r})')
    if not 0 <= process_id < num_processes:
      raise ValueError(f'distributed: process_id={process_id} must lie in [0, {num_processes})')
    if num_processes == 1:
      return False
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True
  tasks = os.environ.get('SLURM_STEP_NUM_TASKS') or os.environ.get('SLURM_NTASKS')
  if tasks and int(tasks) > 1 and 'SLURM_PROCID' in os.environ:
    jax.distributed.initialize()
    return True
  return False


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh with axis `data` over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,),
              axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`; the other axes whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def fsdp_spec(shape, num_shards: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """The FSDP partition of one leaf: its largest dimension divisible by `num_shards` goes on
  `data` (ties: the last such dimension); small or indivisible leaves are replicated."""
  if num_shards == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  best = None
  for d, n in enumerate(shape):
    if n % num_shards == 0 and (best is None or n >= shape[best]):
      best = d
  if best is None:
    return P()
  return P(*([None] * best + [DATA_AXIS]))


def state_shardings(mesh: Mesh, abstract_state: Any, mode: str = 'replicated',
                    min_size: int = FSDP_MIN_SIZE) -> Any:
  """Shardings for a train state (a pytree of arrays or `ShapeDtypeStruct`s).

  `'replicated'`: every leaf on every device. `'fsdp'`: parameters, EMA and optimizer moments
  of `min_size` or more elements are split per `fsdp_spec`; scalars (step, counters) and the
  key stay replicated.
  """
  if mode not in PARAM_SHARDINGS:
    raise ValueError(f'param_sharding={mode!r}: choose from {PARAM_SHARDINGS}')
  size = mesh.shape[DATA_AXIS]

  def leaf(x):
    spec = P() if mode == 'replicated' else fsdp_spec(tuple(x.shape), size, min_size)
    return NamedSharding(mesh, spec)
  return jax.tree.map(leaf, abstract_state)


def global_batch(local: Any, sharding: NamedSharding, global_size: int) -> Any:
  """A global array from this process's rows: `local` holds rows
  `[p * B / P, (p + 1) * B / P)` of the global batch of `global_size` rows, for process p of P.
  In one process this is a sharded `device_put`."""
  def leaf(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, (global_size,) + x.shape[1:])
  return jax.tree.map(leaf, local)


def process_rows(global_size: int) -> slice:
  """The rows of a global batch that this process loads (contiguous, equal per process)."""
  count, index = jax.process_count(), jax.process_index()
  if global_size % count:
    raise ValueError(f'global batch {global_size} is not divisible by the {count} processes')
  per = global_size // count
  return slice(index * per, (index + 1) * per)


def from_host(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array that every process holds whole (e.g. sample indices)."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def map_batches(fn, x: np.ndarray, batch_size: int, mesh: Mesh) -> Any:
  """`fn` (jitted here) over the rows of host array `x` in batches of `batch_size`, each batch
  split over the mesh's `data` axis; the result (an array, or a pytree of arrays with rows) as
  numpy on every process. Every chunk is zero-padded to one shape (`batch_size` rounded up to a
  multiple of the devices), so `fn` compiles once; the padding rows are dropped. Every process
  passes the same `x`."""
  rows = batch_sharding(mesh)
  width = mesh.devices.size
  size = -(-min(batch_size, max(len(x), 1)) // width) * width
  jitted = jax.jit(fn, in_shardings=rows, out_shardings=rows)
  out = []
  for start in range(0, len(x), batch_size):
    chunk = np.asarray(x[start:start + batch_size], np.float32)
    padded = np.concatenate([chunk, np.zeros((size - len(chunk),) + chunk.shape[1:],
                                             chunk.dtype)])
    n = len(chunk)
    out.append(jax.tree.map(lambda a, n=n: a[:n], to_host(jitted(from_host(padded, rows)))))
  return jax.tree.map(lambda *parts: np.concatenate(parts), *out)


def local_value(x: Any) -> Any:
  """Numpy values of replicated arrays (jit outputs such as metrics), in any process."""
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), x)


def to_host(x: Any) -> Any:
  """Every row of (possibly process-spanning) arrays as numpy, on every process."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, x)
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(x, tiled=True))


def any_process(flag: bool) -> bool:
  """True on every process if `flag` is true on any (a collective: all processes must call)."""
  if jax.process_count() == 1:
    return bool(flag)
  flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
  return bool(np.any(flags))


def describe(mesh: Mesh) -> str:
  return (f'{jax.process_count()} process(es), {mesh.devices.size} device(s) '
          f'({jax.local_device_count()} local, {jax.devices()[0].platform})')
