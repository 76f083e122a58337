"""Noise schedules for few-iteration waveform sampling, as explicit sampler grids (WaveGrad).

WaveGrad (Chen et al. 2021) trains one network on a 1000-step linear beta schedule
(`TRAIN_BETAS`: 1e-6 to 0.01) conditioned on the continuous noise level sqrt(abar) (§3.2), so
that inference may walk any other schedule: betas `b_1..b_N` define the levels
`abar_n = prod_{i<=n} (1 - b_i)` and the sampler makes DDPM's ancestral step between
consecutive levels (Ho et al. 2020, Eq. 6-7; here `dpm_solver_pp_2m_sde` with `order=1`, which
is exactly that posterior step, started from white noise at the noisiest level as WaveGrad
does). The paper's 50-iteration schedule is linear from 1e-4 to 0.05 (`WAVEGRAD_50`); few
iterations need a searched schedule (§4: a grid search over schedules scored by a spectral
distance to real audio), which `search` runs on a trained model.

`times(process, betas)` maps a schedule to the decreasing times of the process that has those
noise levels (`t = t_of_log_snr(log(abar / (1 - abar)))`), the `grid=` every continuous sampler
takes. A schedule found by search is stored as JSON (`save` / `load`) with the process it was
found for; loading it for another process or another iteration count is refused.
"""

import itertools
import json
import math
import os

import jax.numpy as jnp
import numpy as np

TRAIN_BETAS = (1e-6, 1e-2, 1000)           # WaveGrad's training schedule: linear, start, end, T
WAVEGRAD_50 = (1e-4, 0.05, 50)             # its 50-iteration inference schedule (linear)
SAMPLER = 'dpm_solver_pp_2m_sde'           # with order=1: DDPM's ancestral (posterior) step
SAMPLER_OPTIONS = {'order': 1}


def linear_betas(start: float, end: float, n: int) -> np.ndarray:
  """`n` betas linear from `start` to `end` (float64)."""
  return np.linspace(start, end, int(n), dtype=np.float64)


def geometric_betas(start: float, end: float, n: int) -> np.ndarray:
  """`n` betas geometric from `start` to `end` (equal ratios; float64)."""
  return np.geomspace(start, end, int(n), dtype=np.float64)


def check_betas(betas) -> np.ndarray:
  b = np.asarray(betas, np.float64)
  if b.ndim != 1 or b.size == 0 or not np.all((b > 0) & (b < 1)):
    raise ValueError(f'schedule: betas must be a non-empty 1-D sequence in (0, 1), got {b}')
  if np.any(np.diff(b) < 0):
    raise ValueError(f'schedule: betas must be non-decreasing (noise grows with n), got {b}')
  return b


def alphas_cumprod(betas) -> np.ndarray:
  """`abar_n = prod_{i<=n} (1 - b_i)`, n = 1..N (float64)."""
  return np.cumprod(1.0 - check_betas(betas))


def times(process, betas) -> tuple[float, ...]:
  """The decreasing times `t_N > ... > t_1` at which `process` has the schedule's levels
  `abar_n` (`alpha(t_n)^2 = abar_n`): the explicit `grid=` of `N` sampler steps, the last of
  which goes to clean data. Levels outside the process's `[t_min, 1]` are refused."""
  abar = alphas_cumprod(betas)[::-1]
  lam = np.log(abar) - np.log1p(-abar)
  t = np.asarray(process.t_of_log_snr(jnp.asarray(lam, jnp.float32)), np.float64)
  lo = float(process.t_min)
  lam_range = np.asarray(process.log_snr(jnp.asarray([1.0, lo], jnp.float32)), np.float64)
  if lam[0] < lam_range[0] - 1e-4 or lam[-1] > lam_range[1] + 1e-4:
    raise ValueError(f'schedule: levels abar in [{abar[0]:.4g}, {abar[-1]:.4g}] leave this '
                     f'process range [{1 / (1 + math.exp(-lam_range[0])):.4g}, '
                     f'{1 / (1 + math.exp(-lam_range[1])):.4g}] (t_min = {lo:.4g} .. 1)')
  t = np.clip(t, lo, 1.0)
  if np.any(np.diff(t) >= 0):
    raise ValueError(f'schedule: two levels map to the same time ({t.tolist()}); the betas '
                     f'are too close for this process')
  return tuple(float(x) for x in t)


def candidates(n: int, starts=(1e-6, 1e-5, 1e-4, 1e-3),
               ends=(0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9)) -> list[tuple[str, np.ndarray]]:
  """The grid searched for an `n`-iteration schedule: linear and geometric betas between every
  start and end point, as `(name, betas)`."""
  out = []
  for (start, end), family in itertools.product(itertools.product(starts, ends),
                                                ('linear', 'geometric')):
    if start < end:
      fn = linear_betas if family == 'linear' else geometric_betas
      out.append((f'{family}({start:g}, {end:g})', fn(start, end, n)))
  return out


def search(score, process, n: int, grid=None, *, progress=None) -> dict:
  """Grid search for an `n`-iteration schedule (WaveGrad §4): `score(times) -> float` (lower
  is better, e.g. the log-mel MSE of samples against real clips) for every candidate of
  `grid` (default `candidates(n)`) that fits the process. Returns
  `{'name', 'betas', 'times', 'score', 'table': [(name, score)]}` of the best."""
  table, best = [], None
  for name, betas in (grid if grid is not None else candidates(n)):
    try:
      t = times(process, betas)
    except ValueError:
      continue                       # levels outside what the model was trained on
    value = float(score(t))
    table.append((name, value))
    if progress is not None:
      progress(name, value)
    if np.isfinite(value) and (best is None or value < best['score']):
      best = {'name': name, 'betas': [float(b) for b in betas], 'times': list(t),
              'score': value}
  if best is None:
    raise ValueError(f'search: no candidate {n}-iteration schedule fits this process')
  best['table'] = table
  return best


def save(path: str, result: dict, process_config: dict) -> None:
  """Writes a searched schedule with the process it is for (`load` checks it)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  record = {'iterations': len(result['betas']), 'process': dict(process_config),
            **{k: result[k] for k in ('name', 'betas', 'times', 'score')}}
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=2)


def load(path: str, process_config: dict, iterations: int | None = None) -> dict:
  """A schedule `save` wrote, refused (one line) if it was found for another process or has
  another number of iterations than `iterations`."""
  try:
    with open(path, encoding='utf-8') as f:
      record = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'schedule {path}: cannot read it ({e})') from None
  if record.get('process') != json.loads(json.dumps(dict(process_config))):
    raise ValueError(f'schedule {path}: found for process {record.get("process")}, not for '
                     f'{dict(process_config)}')
  if iterations is not None and record.get('iterations') != iterations:
    raise ValueError(f'schedule {path}: has {record.get("iterations")} iterations, not '
                     f'{iterations}')
  check_betas(record['betas'])
  return record
