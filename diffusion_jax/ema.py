"""Power-function EMA and post-hoc EMA reconstruction (Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", EDM2, arXiv:2312.02696, Sec. 3 and App. C).

A power-function EMA of exponent `gamma` averages the parameters `theta_1 .. theta_t` seen so
far with the profile `p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1)` on `[0, t]`
(App. C.1): the same *relative* width at every `t`, measured by `sigma_rel`, the profile's
standard deviation over `t`. During training a tracker keeps a few such averages (EDM2 tracks
`sigma_rel` 0.05 and 0.10) and their values are stored every K steps. Because every profile is
a power function with a closed-form inner product, the average of *any* other `gamma` at a
stored step is reconstructed afterwards as the least-squares combination of the stored ones
(App. C.3): `posthoc_coefficients` then `reconstruct`.

Pure functions; the EMAs are `training.EMA` `(init, update)` pairs, so a power EMA can be a
train state's `ema_params` and a tracker its `posthoc_ema`. Snapshot files (`save_snapshot`,
`load_snapshots`) hold one profile at one step each, as `.npz` of the flattened tree.
"""

import dataclasses
import math
import os
from typing import Any, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.training import EMA

# Where a run keeps its snapshots, under its work dir.
SNAPSHOT_SUBDIR = 'posthoc_ema'
# `sigma_rel` of gamma = 0 (a plain running mean): the widest profile with gamma >= 0.
MAX_SIGMA_REL = 12 ** -0.5
_META = ('__step__', '__gamma__', '__sigma_rel__')


def gamma_to_sigma_rel(gamma: float) -> float:
  """`sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))` (EDM2 App. C.1, Eq. 123):
  the standard deviation of `p_{t,gamma}` divided by `t`."""
  gamma = float(gamma)
  if not (math.isfinite(gamma) and gamma >= 0):
    raise ValueError(f'gamma={gamma}: the power-function exponent must be finite and >= 0')
  return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
  """The exponent `gamma >= 0` of relative width `sigma_rel` (EDM2 App. C.1, Eq. 126 and
  Algorithm 2): with `s = sigma_rel^-2`, the largest real root of
  `gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0`."""
  sigma_rel = float(sigma_rel)
  if not 0 < sigma_rel <= MAX_SIGMA_REL:
    raise ValueError(f'sigma_rel={sigma_rel}: must lie in (0, {MAX_SIGMA_REL:.4f}] '
                     f'(0.2887 is a plain running mean, gamma = 0)')
  s = sigma_rel ** -2
  roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
  real = roots[np.abs(roots.imag) <= 1e-9 * np.maximum(1.0, np.abs(roots.real))].real
  return float(max(0.0, real.max()))


def _check_gamma(gamma) -> float:
  gamma_to_sigma_rel(gamma)  # validates
  return float(gamma)


def power_ema(gamma: float) -> EMA:
  """Power-function EMA (EDM2 App. C.2, Eq. 127): `update(ema, params, step)` with
  `beta_t = (1 - 1/t)^(gamma + 1)`, `t = step + 1` the number of updates including this one
  (`training.make_loss_train_step` passes the step counter before its increment).

  The betas telescope, `prod_{j=k+1..t} beta_j = (k / t)^(gamma + 1)`, so after t updates the
  average is `sum_k w_k theta_k` with `w_k = (k^(gamma+1) - (k-1)^(gamma+1)) / t^(gamma+1)`:
  `p_{t,gamma}` integrated over `[k - 1, k]`, close to proportional to `k^gamma`. The first
  update has `beta = 0`; the initial value never counts. `beta` and `1 - beta` are computed
  from `log1p` / `expm1` so that `1 - beta ~ (gamma + 1) / t` keeps its precision in float32
  late in training.
  """
  gamma = _check_gamma(gamma)

  def init(params):
    return jax.tree.map(jnp.array, params)

  def update(ema_params, params, step):
    t = jnp.asarray(step, jnp.float32) + 1.0
    log_beta = (gamma + 1.0) * jnp.log1p(-1.0 / t)
    beta, one_minus_beta = jnp.exp(log_beta), -jnp.expm1(log_beta)
    return jax.tree.map(lambda e, p: (beta * e + one_minus_beta * p).astype(e.dtype),
                        ema_params, params)

  return EMA(init, update)


class PowerEMATracker(NamedTuple):
  """Several power-function EMAs updated together; their state is a tuple of parameter trees,
  one per entry of `gammas` (an `EMA`-like `(init, update)` pair plus the exponents)."""
  init: Any
  update: Any
  gammas: tuple[float, ...]


def power_ema_tracker(gammas: Sequence[float]) -> PowerEMATracker:
  """Tracks `power_ema(g)` for each `g` in `gammas` (at least two distinct ones: post-hoc
  reconstruction needs them; EDM2 uses `sigma_rel` 0.05 and 0.10, gamma 16.97 and 6.94)."""
  gammas = tuple(_check_gamma(g) for g in gammas)
  if len(set(gammas)) != len(gammas):
    raise ValueError(f'power-EMA gammas={gammas}: each profile must be distinct')
  if len(gammas) < 2:
    raise ValueError(f'power-EMA gammas={gammas}: post-hoc EMA needs at least two profiles')
  emas = [power_ema(g) for g in gammas]

  def init(params):
    return tuple(e.init(params) for e in emas)

  def update(tracked, params, step):
    return tuple(e.update(x, params, step) for e, x in zip(emas, tracked, strict=True))

  return PowerEMATracker(init, update, gammas)


def profile_inner_product(t_a, gamma_a, t_b, gamma_b):
  """`<p_{t_a,gamma_a}, p_{t_b,gamma_b}> = int_0^min(t_a, t_b) p_a p_b dtau` (EDM2 App. C.3,
  Eq. 151), in float64 and broadcasting.

  With `m = min(t_a, t_b)`, `M = max(t_a, t_b)` and `gamma_M` the exponent of the profile that
  ends at M, the integral `(g_a + 1)(g_b + 1) m^(g_a + g_b + 1) / ((g_a + g_b + 1)
  t_a^(g_a + 1) t_b^(g_b + 1))` equals `(g_a + 1)(g_b + 1) / (g_a + g_b + 1) (m / M)^gamma_M / M`,
  written so that no power of a step count overflows.
  """
  t_a, gamma_a, t_b, gamma_b = (np.asarray(x, np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
  longer = np.maximum(t_a, t_b)
  gamma_longer = np.where(t_a < t_b, gamma_b, gamma_a)
  ratio = np.minimum(t_a, t_b) / longer
  return ((gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1)
          * ratio ** gamma_longer / longer)


def posthoc_coefficients(snapshot_steps: Sequence[int], snapshot_gammas: Sequence[float],
                         target_step: int, target_gamma: float) -> np.ndarray:
  """Coefficients `x` [N] (float64) with `sum_i x_i snapshot_i ~ power EMA of target_gamma at
  target_step` (EDM2 App. C.3, Algorithm 3).

  Least squares in function space: `x` minimises `|| sum_i x_i p_i - p_target ||^2` over the
  profiles `p_i = p_{step_i, gamma_i}`, i.e. solves `A x = b` with `A_ij = <p_i, p_j>`,
  `b_i = <p_i, p_target>` (`profile_inner_product`); then `x` is divided by its sum (as EDM2
  does), so a constant parameter reconstructs exactly. The discrete EMA's weights are the
  profiles integrated over unit steps (`power_ema`), a linear map, so the same `x` combines
  the tracked averages. `A` is a Gram matrix of near-parallel functions: its condition number
  grows to ~1e8 for 2 x 200 snapshots, so the solve is float64 numpy (float32 would lose
  every digit). Exact only in the limit of many snapshots; a target between the stored
  `gamma`s, at a step of a dense snapshot grid, comes closest.
  """
  steps = np.asarray(snapshot_steps, np.float64).reshape(-1)
  gammas = np.asarray(snapshot_gammas, np.float64).reshape(-1)
  if steps.shape != gammas.shape or not steps.size:
    raise ValueError(f'{steps.size} snapshot steps for {gammas.size} gammas: need one gamma '
                     f'per snapshot, and at least one snapshot')
  for g in (*set(gammas.tolist()), target_gamma):
    _check_gamma(g)
  if len(set(gammas.tolist())) < 2:
    raise ValueError(f'snapshots of one profile only (gamma={gammas[0]}): post-hoc EMA needs '
                     f'at least two (EDM2 tracks sigma_rel 0.05 and 0.10)')
  if not np.all(steps >= 1):
    raise ValueError(f'snapshot step {steps.min():.0f}: steps count updates and start at 1')
  if not 1 <= target_step <= steps.max():
    raise ValueError(f'target_step={target_step}: must lie in [1, {steps.max():.0f}] (the last '
                     f'snapshot step)')
  pairs = list(zip(steps.tolist(), gammas.tolist(), strict=True))
  if len(set(pairs)) != len(pairs):
    twice = next(p for p in pairs if pairs.count(p) > 1)
    raise ValueError(f'snapshot (step={twice[0]:.0f}, gamma={twice[1]}) appears twice')
  a = profile_inner_product(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
  b = profile_inner_product(steps, gammas, float(target_step), float(target_gamma))
  try:
    x = np.linalg.solve(a, b)
  except np.linalg.LinAlgError as e:
    raise ValueError(f'post-hoc EMA system of {steps.size} snapshots is singular ({e})') from e
  if not np.all(np.isfinite(x)):
    raise ValueError(f'post-hoc EMA coefficients of {steps.size} snapshots are not finite')
  return x / x.sum()


def reconstruct(snapshots: Iterable[Any], coefficients: Sequence[float]) -> Any:
  """`sum_i coefficients[i] * snapshots[i]` over parameter trees of one structure, accumulated
  in float64 and returned as numpy in each leaf's dtype. `snapshots` may be a generator (one
  tree in memory at a time)."""
  coefficients = np.asarray(coefficients, np.float64).reshape(-1)
  total, dtypes, count = None, None, 0
  for tree in snapshots:
    if count == len(coefficients):
      raise ValueError(f'more snapshots than the {len(coefficients)} coefficients')
    c = coefficients[count]
    if total is None:
      dtypes = jax.tree.map(lambda x: np.asarray(x).dtype, tree)
      total = jax.tree.map(lambda x: c * np.asarray(x, np.float64), tree)
    else:
      total = jax.tree.map(lambda s, x: s + c * np.asarray(x, np.float64), total, tree)
    count += 1
  if count != len(coefficients):
    raise ValueError(f'{count} snapshots for {len(coefficients)} coefficients')
  return jax.tree.map(lambda s, d: s.astype(d), total, dtypes)


# --- snapshot files ---------------------------------------------------------------------------

def _key_name(entry) -> str:
  for attr in ('key', 'idx', 'name'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def flatten(tree: Any) -> dict[str, np.ndarray]:
  """`{'a/b/c': array}` for a tree of nested dicts (a Flax parameter tree; lists and tuples
  give their index), as host numpy."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = '/'.join(_key_name(e) for e in path)
    if not name or name.startswith('__') or name in flat:
      raise ValueError(f'parameter path {name!r} cannot be stored (empty, reserved or repeated)')
    flat[name] = np.asarray(leaf)
  return flat


def unflatten(flat: dict[str, np.ndarray]) -> dict:
  """The nested dicts of `flatten`'s keys (metadata keys `__*__` left out)."""
  tree = {}
  for name, value in flat.items():
    if name.startswith('__'):
      continue
    *parents, last = name.split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = value
  return tree


def write_params(path: str, params: Any, *, step: int, gamma: float) -> None:
  """Writes `params` flattened (`flatten`) to the `.npz` `path`, with `__step__`, `__gamma__`
  and `__sigma_rel__`, atomically (a temporary file renamed into place)."""
  arrays = flatten(params)
  arrays.update(__step__=np.int64(step), __gamma__=np.float64(gamma),
                __sigma_rel__=np.float64(gamma_to_sigma_rel(gamma)))
  tmp = f'{path}.tmp{os.getpid()}'
  try:
    with open(tmp, 'wb') as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def read_params(path: str) -> dict:
  """The nested parameter dicts of a file `write_params` wrote."""
  with np.load(path) as z:
    return unflatten({k: z[k] for k in z.files})


def read_params_like(path: str, like: Any) -> Any:
  """The parameters in the `.npz` `path` (`write_params`, `experiments.posthoc_ema`) as a tree of
  `like`'s structure, shapes and dtypes; a one-line ValueError naming the file and the first
  missing, extra or mis-shaped leaf (parameters of another model)."""
  try:
    flat = {k: v for k, v in flatten_npz(path).items() if not k.startswith('__')}
  except (OSError, ValueError, EOFError) as e:
    raise ValueError(f'{path}: cannot read a parameters .npz ({e})') from None
  want = flatten(like)
  for k in want:
    if k not in flat:
      raise ValueError(f'{path}: no parameter {k!r}: not a reconstruction of this model')
    if tuple(flat[k].shape) != tuple(np.shape(want[k])):
      raise ValueError(f'{path}: {k} is {tuple(flat[k].shape)} there, this model has '
                       f'{tuple(np.shape(want[k]))}')
  extra = sorted(set(flat) - set(want))
  if extra:
    raise ValueError(f'{path}: unexpected parameter {extra[0]!r}: not a reconstruction of this '
                     f'model')
  with_paths, treedef = jax.tree_util.tree_flatten_with_path(like)
  return jax.tree_util.tree_unflatten(treedef, [
      flat['/'.join(_key_name(e) for e in path)].astype(np.asarray(leaf).dtype)
      for path, leaf in with_paths])


def flatten_npz(path: str) -> dict:
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def snapshot_filename(step: int, gamma: float) -> str:
  return f'{int(step):010d}_gamma{float(gamma):.6g}.npz'


def save_snapshot(directory: str, step: int, gammas: Sequence[float], tracked: Sequence[Any]
                  ) -> list[str]:
  """Stores each tracked profile at `step` as `<directory>/<step>_gamma<gamma>.npz`; returns
  the paths. Only process 0 writes (others return `[]`). `tracked` must hold host values
  (`parallel.to_host(state.posthoc_ema)`, a collective every process calls) or replicated
  arrays. A file of the same name (a resumed run passing the step again) is replaced."""
  if len(gammas) != len(tracked):
    raise ValueError(f'{len(tracked)} tracked profiles for gammas={tuple(gammas)}')
  if jax.process_index() != 0:
    return []
  os.makedirs(directory, exist_ok=True)
  paths = []
  for gamma, params in zip(gammas, tracked, strict=True):
    path = os.path.join(directory, snapshot_filename(step, gamma))
    write_params(path, params, step=step, gamma=gamma)
    paths.append(path)
  return paths


@dataclasses.dataclass(frozen=True)
class Snapshot:
  """One stored profile: the power EMA of `gamma` after `step` updates."""
  step: int
  gamma: float
  path: str

  @property
  def sigma_rel(self) -> float:
    return gamma_to_sigma_rel(self.gamma)

  def load(self) -> dict:
    return read_params(self.path)


def load_snapshots(directory: str) -> list[Snapshot]:
  """The snapshots in `directory` (step and gamma read from each file), sorted by step then
  gamma; the parameters are read by `Snapshot.load` when needed."""
  if not os.path.isdir(directory):
    raise ValueError(f'{directory}: no post-hoc EMA snapshots (not a directory)')
  found = []
  for name in sorted(os.listdir(directory)):
    if not name.endswith('.npz'):
      continue
    path = os.path.join(directory, name)
    try:
      with np.load(path) as z:
        found.append(Snapshot(int(z['__step__']), float(z['__gamma__']), path))
    except (OSError, ValueError, KeyError) as e:
      raise ValueError(f'{path}: not a post-hoc EMA snapshot ({e})') from e
  if not found:
    raise ValueError(f'{directory}: no post-hoc EMA snapshots (*.npz)')
  return sorted(found, key=lambda s: (s.step, s.gamma))


def reconstruct_from_directory(directory: str, target_gamma: float, target_step: int | None = None
                               ) -> tuple[dict, np.ndarray, list[Snapshot]]:
  """The power EMA of `target_gamma` at `target_step` (default: the last snapshot step) from
  the snapshots at steps up to `target_step`: `(params, coefficients, snapshots used)`."""
  snapshots = load_snapshots(directory)
  last = snapshots[-1].step
  if target_step is None:
    target_step = last
  if not 1 <= target_step <= last:
    raise ValueError(f'target_step={target_step}: must lie in [1, {last}] (the last snapshot '
                     f'step in {directory})')
  used = [s for s in snapshots if s.step <= target_step]
  coefficients = posthoc_coefficients([s.step for s in used], [s.gamma for s in used],
                                      target_step, target_gamma)
  params = reconstruct((s.load() for s in used), coefficients)
  return params, coefficients, used
