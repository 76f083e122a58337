"""Training batches read by grain: examples decoded in worker processes, order unchanged.

`batches(source, seed, global_batch, start, stop, ...)` yields `(step, batch)` for steps
`[start, stop)`, where `batch` holds exactly the arrays of `source.batch(seed, step, global_batch,
process_index, process_count)`: the same (seed, step) -> examples order
(`sampler.batch_indices`), the same per-example flips and noise (keyed by the example's global
position), so a run may switch between the two paths, or resume at any step, and see the same
numbers. It is a drop-in for `sources.Prefetcher`: iterable, with `close()`, and an exception
while loading step k is raised by the iterator at step k, as a `LoadError` with a one-line
message.

Sources with `example(index, seed, position)` (arrays, TFDS images, image folders) become a
`grain.MapDataset` of per-example records: element e of this process is row `e mod b` of step
`start + e div b` (b = this process's rows), read once (image and label from one read) and
preprocessed by `source.example`, then `.batch(b)`. With `num_workers > 0`, `mp_prefetch` hands
whole batches round-robin to that many spawned worker processes (worker w builds batches
w, w + W, ...), each reading its examples on its own Python interpreter, and interleaves them
back in step order. Other sources (the endless toy2d draws, made by JAX per step) are a
MapDataset of steps mapped by `source.batch` in this process: JAX in worker processes would
start a backend per worker for a few microseconds of work.

Why MapDataset + `mp_prefetch` rather than `grain.DataLoader` with a custom sampler: the order
is already a pure function of the element number, which is what a MapDataset is; resuming is
choosing where the range starts, with no iterator state to checkpoint; and the per-example map
and the batching are plain functions testable without processes. A DataLoader would need a
sampler class re-deriving the same order, and records wrapped in grain's metadata.

Workers receive the source pickled (spawned, not forked): arrays travel as memory-mapped file
names where they are maps (`sources.ArraySource`), TFDS `data_source` objects pickle as their
file list and are reopened. Batches come back through shared memory and are copied into plain
arrays here. Measured on 2 cores (docs/loader_benchmark.md): in-process grain costs 5-8 % against
`source.batch` on a thread, read threads slow it down (the per-example work holds the GIL), one
worker is slower than none, two are about 1.2x faster, after 2-3 s of worker start-up.
"""

import numpy as np

from diffusion_jax.data import sampler as data_sampler
from diffusion_jax.data import sources


class LoadError(RuntimeError):
  """Loading the batch of a step failed; the message names the step and the cause."""


def dataset(source, seed: int, global_batch: int, start: int, stop: int,
            process_index: int = 0, process_count: int = 1):
  """This process's batches of steps `[start, stop)` as a `grain.MapDataset` (element k: the
  batch of step `start + k`, as `source.batch` gives it)."""
  import grain  # pylint: disable=g-import-not-at-top  (only the grain path needs it)
  if global_batch <= 0:
    raise ValueError(f'data loader: global_batch={global_batch} must be positive')
  rows = data_sampler.process_rows(global_batch, process_index, process_count)
  per = rows.stop - rows.start
  if not 0 <= start <= stop:
    raise ValueError(f'data loader: steps [{start}, {stop}) must have 0 <= start <= stop')
  if hasattr(source, 'example'):
    read = _ReadExample(source, seed, global_batch, process_index, per)
    return grain.MapDataset.range(start * per, stop * per).map(read).batch(per)
  step_batch = _StepBatch(source, seed, global_batch, process_index, process_count)
  return grain.MapDataset.range(start, stop).map(step_batch)


class _ReadExample:
  """Element e of this process -> its example: step `e // b`, row `p b + e % b` of that step's
  global batch, at global position `step B + row` (what `sampler.batch_rows` assigns)."""

  def __init__(self, source, seed: int, global_batch: int, process_index: int, per: int):
    self.source, self.seed, self.global_batch = source, seed, global_batch
    self.first_row, self.per = process_index * per, per
    self.size = len(source)
    if self.size <= 0:
      raise ValueError('data loader: the source has no examples')
    self._permutations = {}    # epoch -> its order; replaced whole, never mutated (threads)

  def __getstate__(self):
    return {**self.__dict__, '_permutations': {}}

  def _permutation(self, epoch: int) -> np.ndarray:
    cached = self._permutations.get(epoch)
    if cached is None:
      cached = data_sampler.epoch_permutation(self.seed, epoch, self.size)
      # Neighbouring epochs stay (batches may straddle two, and threads may work on both).
      self._permutations = {**{e: p for e, p in self._permutations.items()
                               if abs(e - epoch) <= 1}, epoch: cached}
    return cached

  def __call__(self, element: int) -> dict:
    step, row = divmod(int(element), self.per)
    position = step * self.global_batch + self.first_row + row
    epoch, offset = divmod(position, self.size)
    index = int(self._permutation(epoch)[offset])
    return self.source.example(index, self.seed, position)


class _StepBatch:
  """Step -> `source.batch(...)` of that step, for sources without per-example reads."""

  def __init__(self, source, seed, global_batch, process_index, process_count):
    self.source, self.args = source, (seed, global_batch, process_index, process_count)

  def __call__(self, step: int) -> dict:
    seed, global_batch, process_index, process_count = self.args
    return self.source.batch(seed, int(step), global_batch, process_index, process_count)


class Loader:
  """Iterates `(step, batch)` for `step` in `[start, stop)`; see `batches`."""

  def __init__(self, source, seed: int, global_batch: int, start: int, stop: int,
               process_index: int = 0, process_count: int = 1, *, num_workers: int = 0,
               prefetch: int = 2, num_threads: int = 0, finish=None):
    import grain  # pylint: disable=g-import-not-at-top
    for key, value in (('num_workers', num_workers), ('prefetch', prefetch),
                       ('num_threads', num_threads)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f'data loader: {key}={value!r}: expected an integer >= 0')
    ds = dataset(source, seed, global_batch, start, stop, process_index, process_count)
    per_example = hasattr(source, 'example')
    self.num_workers = num_workers if per_example else 0
    buffered = max(prefetch, 1)
    threads = num_threads if per_example else 0
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                   prefetch_buffer_size=buffered * bool(threads)))
    if self.num_workers:
      _let_grain_read_its_profiling_flag()
      iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.num_workers, per_worker_buffer_size=buffered))
    self._it = iter(iter_ds)
    finish = finish or (lambda batch: batch)
    copy = self.num_workers > 0   # out of grain's shared memory, which is then freed

    def make(step):
      try:
        batch = next(self._it)
      except StopIteration:
        raise LoadError(f'data: step {step}: the loader ended before step {stop}') from None
      except Exception as e:  # noqa: BLE001  (any failure to read is reported at its step)
        raise LoadError(f'data: step {step}: {type(e).__name__}: {_one_line(e)}') from e
      return finish({k: np.array(v) if copy else v for k, v in batch.items()})

    if prefetch > 0:
      self._steps = sources.Prefetcher(make, start, stop, prefetch)
    else:
      self._steps = ((step, make(step)) for step in range(start, stop))

  def __iter__(self):
    return self

  def __next__(self):
    return next(self._steps)

  def close(self) -> None:
    """Stops the prefetching thread and the worker processes."""
    if isinstance(self._steps, sources.Prefetcher):
      self._steps.close()
    it, self._it = self._it, None
    close = getattr(it, 'close', None)    # grain 0.2.13's have none: dropped, they are freed
    if close is not None:
      close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def batches(source, seed: int, global_batch: int, start: int, stop: int, process_index: int = 0,
            process_count: int = 1, *, num_workers: int = 0, prefetch: int = 2,
            num_threads: int = 0, finish=None) -> Loader:
  """`(step, finish(batch))` for `step` in `[start, stop)`: this process's rows of each global
  batch, equal to `source.batch(seed, step, global_batch, process_index, process_count)`.

  Args:
    source: a `sources` data source.
    seed, global_batch: the data order's seed and the global batch size.
    start, stop: the steps to load (a run resumed at step k passes `start=k`).
    process_index, process_count: this process's rows, `[p B / P, (p + 1) B / P)`.
    num_workers: grain worker processes reading examples; 0 reads them in this process
      (always so for sources without `example`, e.g. toy2d: `Loader.num_workers` says which).
    prefetch: batches made ahead by a background thread (0: each when asked for), and the
      depth of each worker's buffer.
    num_threads: grain threads reading batches ahead in this process (in each worker, with
      workers); 0 reads on the background thread only.
    finish: applied to each batch on the background thread (e.g. the copy to devices, which
      then overlaps the training step).
  """
  return Loader(source, seed, global_batch, start, stop, process_index, process_count,
                num_workers=num_workers, prefetch=prefetch, num_threads=num_threads,
                finish=finish)


def _one_line(e: BaseException) -> str:
  return ' '.join(str(e).split()) or repr(e)


def _let_grain_read_its_profiling_flag() -> None:
  # grain 0.2.18 reads the absl flag --grain_enable_multiprocess_worker_profiling when JAX is
  # imported and it starts a worker; absl refuses to read any flag before a command line was
  # parsed (a script without absl.app, pytest) and grain fails. Marking that one flag as given
  # lets grain read its default; a parsed command line is left alone. (google/grain#1355.)
  from absl import flags  # pylint: disable=g-import-not-at-top
  name = 'grain_enable_multiprocess_worker_profiling'
  if not flags.FLAGS.is_parsed() and name in flags.FLAGS and not flags.FLAGS[name].present:
    flags.FLAGS[name].present = 1
