"""Metric networks trained once and cached on disk (the digits classifier, the digits-CLIP).

A cache file `<name>_v<version>_<recipe hash>_seed<seed>.npz` holds the flat parameters and a
JSON `info` record with the recipe hash, the seed and a SHA-256 of the parameters. A changed
recipe never loads stale weights (its hash names another file), and a damaged, mismatched or
non-finite file is logged, retrained and overwritten. Files are written beside their target and
renamed over it, so readers (concurrent runs included) see the old file or the whole new one.
"""

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

_LOG = logging.getLogger(__name__)


class CacheError(Exception):
  """A cache file that cannot be used (the message says why)."""


def resolve_recipe(defaults: Mapping[str, Any], overrides: Mapping[str, Any] | None,
                   what: str) -> dict[str, Any]:
  """`defaults` with `overrides` replacing some entries (not `version`); an unknown key is a
  ValueError naming `what`. Tuple-valued entries stay tuples (the hash lists them)."""
  recipe = dict(defaults)
  for k, v in (overrides or {}).items():
    if k not in recipe or k == 'version':
      raise ValueError(f'{what}: unknown recipe key {k!r}; expected one of '
                       f'{sorted(set(recipe) - {"version"})}')
    recipe[k] = tuple(v) if isinstance(defaults[k], tuple) else v
  return recipe


def recipe_hash(recipe: Mapping[str, Any]) -> str:
  canonical = json.dumps({k: list(v) if isinstance(v, tuple) else v
                          for k, v in recipe.items()}, sort_keys=True)
  return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def flat_digest(flat: Mapping[str, np.ndarray]) -> str:
  """SHA-256 over the sorted names, dtypes, shapes and bytes of flat parameters."""
  h = hashlib.sha256()
  for k in sorted(flat):
    a = np.ascontiguousarray(flat[k])
    h.update(f'{k}|{a.dtype.str}|{a.shape}|'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def params_digest(params) -> str:
  """`flat_digest` of a parameter pytree (or its flat dict)."""
  flat = traverse_util.flatten_dict(jax.device_get(params), sep='/')
  return flat_digest({k: np.asarray(v) for k, v in flat.items()})


def cache_path(cache_dir, name: str, recipe: Mapping[str, Any], seed: int) -> str:
  return os.path.join(os.fspath(cache_dir), f'{name}_v{recipe["version"]}_'
                      f'{recipe_hash(recipe)}_seed{seed}.npz')


def save(path: str, params, info: Mapping[str, Any]) -> None:
  """Writes `params` and `info` (plus the parameters' digest) to `path` atomically."""
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep='/').items()}
  arrays = {f'params/{k}': v for k, v in flat.items()}
  arrays['info'] = np.array(json.dumps(dict(info, params_sha256=flat_digest(flat)),
                                       sort_keys=True))
  fd, tmp = tempfile.mkstemp(prefix='.tmp_', suffix='.npz', dir=os.path.dirname(path))
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load(path: str, recipe: Mapping[str, Any], seed: int, abstract_params, required: str):
  """`(params, info)` from `path`, or `CacheError` saying why not. `abstract_params` is the
  model's parameter tree (shapes and dtypes, e.g. from `jax.eval_shape`); `required` a float
  `info` entry the file must have."""
  try:
    with np.load(path, allow_pickle=False) as z:
      info = json.loads(str(z['info']))
      flat = {k[len('params/'):]: z[k] for k in z.files if k.startswith('params/')}
  except Exception as e:  # pylint: disable=broad-except  # any damage means: do not use it
    raise CacheError(f'unreadable ({type(e).__name__}: {e})') from e
  if not isinstance(info, dict):
    raise CacheError('info record is not a JSON object')
  if info.get('recipe_hash') != recipe_hash(recipe) or info.get('seed') != seed:
    raise CacheError(f'written for recipe {info.get("recipe_hash")} seed {info.get("seed")}, '
                     f'expected {recipe_hash(recipe)} seed {seed}')
  if info.get('params_sha256') != flat_digest(flat):
    raise CacheError('parameter checksum mismatch')
  expected = traverse_util.flatten_dict(abstract_params, sep='/')
  want = {k: (v.shape, np.dtype(v.dtype)) for k, v in expected.items()}
  if {k: (v.shape, v.dtype) for k, v in flat.items()} != want:
    raise CacheError('parameter tree does not match the model')
  if not all(np.all(np.isfinite(v)) for v in flat.values()):
    raise CacheError('non-finite parameters')
  if not isinstance(info.get(required), float):
    raise CacheError(f'info has no {required}')
  return traverse_util.unflatten_dict(flat, sep='/'), info


def load_or_train(path: str, recipe: Mapping[str, Any], seed: int, *, what: str,
                  abstract_params: Callable[[], Any], train: Callable[[], tuple],
                  required: str):
  """The cached model at `path`, or `train() -> (params, info)` run and cached.

  Returns `(params, info)`; `info` gains `recipe`, `recipe_hash`, `seed`, `train_seconds`,
  `cache_path` and `loaded_from_cache`. A cache that cannot be written is logged, not raised:
  the weights are good, only the cache is lost.
  """
  if os.path.exists(path):
    try:
      params, info = load(path, recipe, seed, abstract_params(), required)
      return params, dict(info, cache_path=path, loaded_from_cache=True)
    except CacheError as e:
      _LOG.warning('%s cache %s is corrupt or stale (%s); retraining and overwriting it.',
                   what, path, e)
  start = time.perf_counter()
  params, measured = train()
  info = dict(measured, train_seconds=time.perf_counter() - start,
              recipe={k: list(v) if isinstance(v, tuple) else v for k, v in recipe.items()},
              recipe_hash=recipe_hash(recipe), seed=seed)
  try:
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    save(path, params, info)
  except OSError as e:
    _LOG.warning('could not write the %s cache %s (%s).', what, path, e)
  return params, dict(info, cache_path=path, loaded_from_cache=False)
