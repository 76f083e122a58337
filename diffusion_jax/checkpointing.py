"""Orbax checkpoints that resume from the newest *readable* step.

Each step folder holds two items: `state` (the train state's arrays, sharded as they were in
memory) and `meta` (JSON: the resolved config, the data position, the topology it was written
on). Restoring takes the shardings of the *target*, so a checkpoint written on N devices or
processes restores onto M.

`orbax.checkpoint.CheckpointManager` saves asynchronously and atomically and keeps the last N
steps. What it does not do is distrust its own directory: a damaged or empty latest step is
still listed and a plain restore of it can silently return an empty tree. `Checkpointer`
restores newest-first against the expected tree structure, shapes and dtypes, and tells apart
two failures that need opposite answers:

* a step of *another config* (its metadata reads, but a leaf is missing, extra, or of another
  shape or dtype) is an error, `CheckpointMismatch`, naming the leaf; nothing is moved: the
  checkpoints are fine, the config is wrong;
* a *damaged* step (empty, truncated, half-written data) is renamed aside (never deleted) and
  the next older one is restored, with a warning saying so, but only when an older step does
  restore: if none does, nothing is moved and `CheckpointError` lists what each step raised.

A failed save (disk full, no permission) is one `CheckpointSaveError` naming the directory and
the OS error, raised at the next `save`, `poll` or `wait`; the steps saved before are kept, and
`close` after a failure gives orbax's threads a bounded time, so a failing run cannot hang.
orbax's own error logs (a traceback per failing thread) are not printed; they are what these
errors report in one line (and are logged at DEBUG level by this module). So is TensorStore's
"Event loop is closed" from callbacks that complete after a failed save.
"""

import errno
import logging
import os
import re
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """No checkpoint in the directory could be restored."""


class CheckpointMismatch(CheckpointError):
  """A readable checkpoint holds another state than the config's (another model, say)."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written (disk full, permissions); earlier steps are kept."""


class _Mismatch(ValueError):
  """The step's state is readable but has another structure, shape or dtype."""


# Seconds `close` waits for orbax's threads after a failed save before giving up on them.
CLOSE_AFTER_FAILURE_S = 20.0


class _OrbaxErrorFilter(logging.Filter):
  """Drops orbax's ERROR records (with their tracebacks): the Checkpointer reports the failure
  itself, in one line. Each dropped message is logged at DEBUG level instead."""

  def filter(self, record):
    if record.levelno >= logging.ERROR and f'{os.sep}orbax{os.sep}' in (record.pathname or ''):
      log.debug('orbax: %s', str(record.getMessage()).splitlines()[0][:500])
      return False
    return True


_FILTER = _OrbaxErrorFilter()


def _quiet_orbax_errors():
  absl_logger = logging.getLogger('absl')
  if _FILTER not in absl_logger.filters:
    absl_logger.addFilter(_FILTER)
  # After a failed save, TensorStore's late completion callbacks may find orbax's event loop
  # closed; TensorStore reports that as an unraisable exception, a traceback with nothing to act
  # on. Only that exact error is dropped.
  previous = sys.unraisablehook
  if not getattr(previous, 'drops_closed_loop_errors', False):
    def hook(unraisable):
      if (unraisable.exc_type is RuntimeError
          and str(unraisable.exc_value) == 'Event loop is closed'):
        log.debug('a late callback after a failed save: %s', unraisable.exc_value)
        return
      previous(unraisable)
    hook.drops_closed_loop_errors = True
    sys.unraisablehook = hook


def os_error_text(e: BaseException) -> str:
  """The OS error inside `e` (an OSError, or the `os_error_code` of a TensorStore error), else
  the exception's first line."""
  for x in (e, e.__cause__, e.__context__):
    if isinstance(x, OSError) and x.errno:
      return f'[Errno {x.errno}] {os.strerror(x.errno)}' + (f': {x.filename}' if x.filename
                                                           else '')
  text = str(e)
  m = re.search(r"os_error_code='?(\d+)", text)
  if m:
    code = int(m.group(1))
    where = re.search(r'(?:writing|opening|creating)[^"]*"([^"]+)"', text)
    return (f'[Errno {code}] {os.strerror(code)}' + (f': {where.group(1)}' if where else '')
            + (' (disk full)' if code in (errno.ENOSPC, errno.EDQUOT) else ''))
  first = text.splitlines()[0][:300] if text else ''
  return f'{type(e).__name__}: {first}'


class Checkpointer:
  """Keep-N async checkpoints of a pytree under `directory/<step>`; with `keep_every=K`, steps
  that are multiples of K are kept as well, forever.

  With `best_metric`, the N kept are instead the best by that metric (orbax's `best_fn`;
  `best_mode` 'min' or 'max'), each saved with `save(..., metrics={best_metric: value})`: the
  training loop keeps its best evaluated step so in a directory of its own, beside the keep-N
  one. A non-finite value ranks last."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3,
               keep_every: int | None = None, async_save: bool = True, read_only: bool = False,
               best_metric: str | None = None, best_mode: str = 'min', view=None):
    """`read_only` (evaluation): never writes, and an unreadable step is skipped, not moved.

    `view = (strip, fill)` saves `strip(state)` instead of the state (e.g. without a frozen
    base the run can read again elsewhere) and restores `fill(restored, target, meta)` from a
    step's stripped tree, `target` the full state's abstract and `meta` the step's meta."""
    self.directory = os.path.abspath(os.fspath(directory))
    self._strip, self._fill = view if view is not None else (lambda s: s, None)
    self.read_only = read_only
    self.best_metric, self.best_mode = best_metric, best_mode
    _quiet_orbax_errors()
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(f'no checkpoint directory {self.directory}')
    best = {}
    if best_metric is not None:
      if best_mode not in ('min', 'max'):
        raise ValueError(f"best_mode={best_mode!r}: choose 'min' or 'max'")
      best = dict(best_fn=lambda metrics: float(metrics[best_metric]), best_mode=best_mode,
                  keep_checkpoints_without_metrics=False)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, keep_period=keep_every or None,
                                           create=not read_only,
                                           enable_async_checkpointing=async_save, **best)
    # Named items (not the default one) let orbax read a step without inferring handlers
    # from the folder's contents, which fails for every step once any step folder is empty.
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})
    self._closed = False
    self._pending = None          # the step of the save in flight, if any
    self._failed = None           # the CheckpointSaveError raised, once a save failed

  def save(self, step: int, state: Any, meta: dict | None = None,
           metrics: dict | None = None) -> None:
    """Starts an (async) save of `state` (and the JSON-able `meta`) at `step`; returns before
    the write finishes. Every process calls it (orbax writes each process's shards), with the
    same `metrics` (which rank the steps of a `best_metric` checkpointer). Raises
    `CheckpointSaveError` if this save, or the one before, failed."""
    self.wait()
    items = {'state': ocp.args.StandardSave(self._strip(state))}
    if meta is not None:
      items['meta'] = ocp.args.JsonSave(meta)
    if self.best_metric is not None:
      value = float((metrics or {})[self.best_metric])
      if not np.isfinite(value):
        value = float('inf') if self.best_mode == 'min' else float('-inf')
      metrics = {**metrics, self.best_metric: value}
    self._pending = int(step)
    try:
      self._manager.save(int(step), args=ocp.args.Composite(**items), metrics=metrics)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(e) from None

  def poll(self) -> None:
    """Raises `CheckpointSaveError` if a save in flight has failed (does not wait)."""
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self.wait()

  def _save_failed(self, e: BaseException) -> 'CheckpointSaveError':
    if self._failed is None:
      kept = [s for s in self.all_steps() if s != self._pending] if os.path.isdir(
          self.directory) else []
      self._failed = CheckpointSaveError(
          f'could not save checkpoint step {self._pending} in {self.directory}: '
          f'{os_error_text(e)}; '
          + (f'the earlier steps {", ".join(map(str, kept))} are kept (rerun to resume)' if kept
             else 'no earlier step was saved'))
    return self._failed

  def read_meta(self, step: int) -> dict | None:
    """The `meta` saved with `step` (None if that step has none)."""
    try:
      return dict(self._manager.restore(
          int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'])
    except Exception:  # pylint: disable=broad-except  # a step saved without meta
      return None

  def wait(self) -> None:
    """Waits for the save in flight; `CheckpointSaveError` if it (or an earlier one) failed."""
    if self._failed is not None:
      raise self._failed
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(e) from None
    self._pending = None

  def close(self, timeout: float | None = None) -> None:
    """Waits for the save in flight and releases orbax's threads. Raises `CheckpointSaveError`
    if that save failed (once). After a failure, or with `timeout` (seconds; used when the run
    is already failing), orbax gets that long and is then left behind, and nothing is raised."""
    if self._closed:
      return
    self._closed = True
    if self._failed is None and timeout is None:
      try:
        self._manager.close()
        return
      except Exception as e:  # pylint: disable=broad-except
        raise self._save_failed(e) from None
    _bounded(self._manager.close,
             CLOSE_AFTER_FAILURE_S if timeout is None else timeout)

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, exc_type, *exc) -> None:
    self.close(timeout=CLOSE_AFTER_FAILURE_S if exc_type is not None else None)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore_latest(self, target: Any) -> tuple[Any, int | None]:
    """Restores the newest step that matches `target`'s structure; `(None, None)` if none exist.

    `target` is a pytree of arrays or `jax.ShapeDtypeStruct`s (with shardings, if any) giving
    the expected structure. A readable step of another structure raises `CheckpointMismatch`
    (nothing moved). Damaged steps newer than the one restored are renamed to
    `<step>.unreadable-<time>`, with a warning; if steps exist but none restores, nothing is
    moved and `CheckpointError` lists each step's error.
    """
    self._manager.reload()
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None, None
    abstract = jax.tree.map(_abstract, self._strip(target))
    failures = []
    for step in steps:
      try:
        restored = self._restore(step, abstract)
      except _Mismatch as e:
        self._set_aside(failures, step)
        raise CheckpointMismatch(f'checkpoint step {step} in {self.directory} {e}', step) from None
      except Exception as e:  # pylint: disable=broad-except  # any damage means "try older"
        failures.append((step, _reason(e)))
        continue
      self._set_aside(failures, step)
      self._manager.reload()
      return self._filled(restored, target, step), step
    raise CheckpointError(
        f'no readable checkpoint in {self.directory} (nothing was moved): tried steps '
        + ', '.join(f'{s} ({r})' for s, r in failures))

  def _set_aside(self, failures, good_step: int) -> None:
    """Renames the damaged steps newer than `good_step`, a step that reads (the damage is then
    theirs, not the environment's), and says so."""
    for step, reason in failures:
      moved = self._quarantine(step)
      log.warning('checkpoint step %d in %s is unreadable (%s); %s', step, self.directory,
                  reason, f'moved it to {moved}' if moved else 'skipped it (read-only)')
    if failures:
      log.warning('resuming from checkpoint step %d instead of the newer unreadable step(s) %s',
                  good_step, ', '.join(str(s) for s, _ in failures))
      failures.clear()

  def restore(self, step: int, target: Any) -> Any:
    """The state saved at `step`, onto `target`'s structure and shardings (no fallback)."""
    self._manager.reload()
    if int(step) not in self._manager.all_steps():
      raise CheckpointError(f'no checkpoint step {step} in {self.directory}; it has '
                            f'{self.all_steps()}')
    try:
      restored = self._restore(int(step), jax.tree.map(_abstract, self._strip(target)))
    except _Mismatch as e:
      raise CheckpointMismatch(f'checkpoint step {step} in {self.directory} {e}',
                               int(step)) from None
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'checkpoint step {step} in {self.directory} is unreadable: '
                            f'{_reason(e)}') from None
    return self._filled(restored, target, int(step))

  def _filled(self, restored, target, step: int):
    return restored if self._fill is None else self._fill(restored, target,
                                                          self.read_meta(step) or {})

  def _restore(self, step: int, abstract: Any) -> Any:
    # Shapes and dtypes from the step's metadata first: a checkpoint of another config is then
    # named precisely, and no doomed array read is started.
    _check_matches(self._manager.item_metadata(step)['state'], abstract)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))['state']
    try:
      _check_matches(restored, abstract)
    except _Mismatch as e:  # the metadata matched: what was read is damaged
      raise ValueError(f'the data read back {e}') from None
    return restored

  def _quarantine(self, step: int) -> str | None:
    if self.read_only:
      return None
    src = os.path.join(self.directory, str(step))
    dst = f'{src}.unreadable-{time.strftime("%Y%m%d-%H%M%S")}'
    if jax.process_index() == 0 and os.path.exists(src):
      os.replace(src, dst)
    return dst


def _reason(e: BaseException) -> str:
  return f'{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}'


def _bounded(fn, timeout: float) -> None:
  """Runs `fn` on a daemon thread for at most `timeout` seconds; its errors are logged."""
  def target():
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      log.debug('after a failed save: %s', _reason(e))
  thread = threading.Thread(target=target, name='checkpointer_close', daemon=True)
  thread.start()
  thread.join(timeout)
  if thread.is_alive():
    log.warning('orbax did not finish within %.0f s after a failed save; leaving it', timeout)


def _abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  x = jax.numpy.asarray(x) if not hasattr(x, 'shape') else x
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None))


def _leaf_table(tree) -> dict:
  """`{path: (shape, dtype)}` with paths as tuples of key names, the same for a dataclass state
  and for orbax's metadata of it."""
  def names(path):
    return tuple(str(next(getattr(k, a) for a in ('key', 'name', 'idx') if hasattr(k, a)))
                 for k in path)
  return {names(p): (tuple(x.shape), np.dtype(x.dtype))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_matches(restored, abstract):
  """Raises a one-line ValueError naming the first leaf where `restored` (arrays or orbax
  metadata) differs from `abstract` in presence, shape or dtype."""
  if restored is None:
    raise ValueError('the step has no state item')
  have, want = _leaf_table(restored), _leaf_table(abstract)
  for path in sorted(set(have) | set(want)):
    name = '/'.join(path)
    if path not in have:
      raise _Mismatch(f'holds a different state: {name} is missing')
    if path not in want:
      raise _Mismatch(f'holds a different state: it has {name}, which this config does not')
    if have[path] != want[path]:
      (s1, d1), (s2, d2) = have[path], want[path]
      raise _Mismatch(f'holds a different state: {name} is {s1} {d1} there, this config '
                       f'expects {s2} {d2}')
