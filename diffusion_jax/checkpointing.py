"""Orbax checkpoints that resume from the newest *readable* step.

Each step folder holds two items: `state` (the train state's arrays, sharded as they were in
memory) and `meta` (JSON: the resolved config, the data position, the topology it was written
on). Restoring takes the shardings of the *target*, so a checkpoint written on N devices or
processes restores onto M.

`orbax.checkpoint.CheckpointManager` saves asynchronously and atomically and keeps the last N
steps. What it does not do is distrust its own directory: a damaged or empty latest step is
still listed and a plain restore of it can silently return an empty tree. `Checkpointer`
restores newest-first against the expected tree structure, shapes and dtypes, moves a step it
cannot read aside (renamed, never deleted: no work is lost) and says which step it fell back to.
"""

import logging
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """No checkpoint in the directory could be restored."""


class Checkpointer:
  """Keep-N async checkpoints of a pytree under `directory/<step>`; with `keep_every=K`, steps
  that are multiples of K are kept as well, forever."""

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3,
               keep_every: int | None = None, async_save: bool = True, read_only: bool = False):
    """`read_only` (evaluation): never writes, and an unreadable step is skipped, not moved."""
    self.directory = os.path.abspath(os.fspath(directory))
    self.read_only = read_only
    if read_only and not os.path.isdir(self.directory):
      raise CheckpointError(f'no checkpoint directory {self.directory}')
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, keep_period=keep_every or None,
                                           create=not read_only,
                                           enable_async_checkpointing=async_save)
    # Named items (not the default one) let orbax read a step without inferring handlers
    # from the folder's contents, which fails for every step once any step folder is empty.
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})
    self._closed = False

  def save(self, step: int, state: Any, meta: dict | None = None) -> None:
    """Starts an (async) save of `state` (and the JSON-able `meta`) at `step`; returns before
    the write finishes. Every process calls it (orbax writes each process's shards)."""
    items = {'state': ocp.args.StandardSave(state)}
    if meta is not None:
      items['meta'] = ocp.args.JsonSave(meta)
    self._manager.save(int(step), args=ocp.args.Composite(**items))

  def read_meta(self, step: int) -> dict | None:
    """The `meta` saved with `step` (None if that step has none)."""
    try:
      return dict(self._manager.restore(
          int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta'])
    except Exception:  # pylint: disable=broad-except  # a step saved without meta
      return None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    if not self._closed:
      self._manager.close()
      self._closed = True

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def restore_latest(self, target: Any) -> tuple[Any, int | None]:
    """Restores the newest step that matches `target`'s structure; `(None, None)` if none exist.

    `target` is a pytree of arrays or `jax.ShapeDtypeStruct`s (with shardings, if any) giving
    the expected structure. Unreadable steps are renamed to `<step>.unreadable-<time>` and
    reported with a warning; if steps exist but none is readable, raises `CheckpointError`.
    """
    self._manager.reload()
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None, None
    abstract = jax.tree.map(_abstract, target)
    failures = []
    for step in steps:
      try:
        restored = self._restore(step, abstract)
      except Exception as e:  # pylint: disable=broad-except  # any damage means "try older"
        reason = f'{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ""}'
        failures.append((step, reason))
        moved = self._quarantine(step)
        log.warning('checkpoint step %d in %s is unreadable (%s); %s and trying an older step',
                    step, self.directory, reason, f'moved it to {moved}' if moved else 'left it')
        continue
      if failures:
        log.warning('resumed from checkpoint step %d instead of the newer unreadable step(s) %s',
                    step, ', '.join(str(s) for s, _ in failures))
      self._manager.reload()
      return restored, step
    raise CheckpointError(
        f'no readable checkpoint in {self.directory}: tried steps '
        + ', '.join(f'{s} ({r})' for s, r in failures))

  def restore(self, step: int, target: Any) -> Any:
    """The state saved at `step`, onto `target`'s structure and shardings (no fallback)."""
    self._manager.reload()
    if int(step) not in self._manager.all_steps():
      raise CheckpointError(f'no checkpoint step {step} in {self.directory}; it has '
                            f'{self.all_steps()}')
    try:
      return self._restore(int(step), jax.tree.map(_abstract, target))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'checkpoint step {step} in {self.directory} is unreadable: '
                            f'{type(e).__name__}: {str(e).splitlines()[0][:200]}') from None

  def _restore(self, step: int, abstract: Any) -> Any:
    # Shapes and dtypes from the step's metadata first: a checkpoint of another config is then
    # named precisely, and no doomed array read is started.
    _check_matches(self._manager.item_metadata(step)['state'], abstract)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))['state']
    _check_matches(restored, abstract)
    return restored

  def _quarantine(self, step: int) -> str | None:
    if self.read_only:
      return None
    src = os.path.join(self.directory, str(step))
    dst = f'{src}.unreadable-{time.strftime("%Y%m%d-%H%M%S")}'
    if jax.process_index() == 0 and os.path.exists(src):
      os.replace(src, dst)
    return dst


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
      raise ValueError(f'holds a different state: {name} is missing')
    if path not in want:
      raise ValueError(f'holds a different state: it has {name}, which this config does not')
    if have[path] != want[path]:
      (s1, d1), (s2, d2) = have[path], want[path]
      raise ValueError(f'holds a different state: {name} is {s1} {d1} there, this config '
                       f'expects {s2} {d2}')
