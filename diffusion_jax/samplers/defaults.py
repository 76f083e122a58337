"""The few-step default grid, `grid='auto'`: where a sampler with no options puts its steps.

With few steps the uniform log-SNR grid (DPM-Solver's default) wastes evaluations at both ends:

* at high noise, where `x0_hat` hardly moves (for data of unit scale, `sigma / alpha` above ~7,
  log-SNR below -4), a data-prediction step is exact whatever its length, yet a uniform grid
  from the prior's log-SNR (about -10 on DDPM's linear schedule) spends a third of its points
  there;
* at low noise, a grid ending at the process's `t_min` (log-SNR ~9 on DDPM's schedule) spends
  its last steps on noise levels far below what the few earlier steps resolve; the final step
  to data (`x0_hat` at the last grid time, the first-order step every sampler here ends with)
  costs less than those steps do.

So 'auto' takes, for `steps < AUTO_MAX_STEPS` with `final='data'` (`n = steps` grid times):

  lambda_0 = lambda(t_max);  then n - 1 times uniform in log-SNR from
  lambda_a = max(lambda_0, AUTO_JUMP_LOG_SNR) to lambda_end = min(lambda(t_min),
  AUTO_END_OFFSET + AUTO_END_SLOPE * n),

i.e. one first step straight down to log-SNR -4 (none if the process starts above it), then a
uniform log-SNR grid ending at a log-SNR that grows with the step count (3.5 at 5 steps, 5.5 at
10), before the step to data. From `AUTO_MAX_STEPS` steps on, and with `final='t_min'` (the
convergence setting, which must end at `t_min`), 'auto' is 'log_snr'. An explicit `t_min` is kept
as the end point.

The constants are a rule fitted once, not a per-problem tuning: on three exact Gaussian-mixture
problems (2-D three-component and 8-D six-component sharp mixtures on DDPM's linear schedule, the
2-D mixture on the cosine VP), DPM-Solver++ 2M and 3M at 4-10 steps, the best first-jump level
was -3 to -5 (-4 within 1.00-1.23x of each problem's optimum) and the best end log-SNR rose from
~3 at 4-5 steps to 5-7 at 10 on the 2-D problems (2.5 on the sharp 8-D one); the error is flat
near the optimum (within ~1.2x over +-1). `experiments/benchmark_samplers.py` reports what the
rule gives on the benchmark mixture for every sampler against the old defaults and the best
hand-picked options.
"""

import numpy as np

AUTO_JUMP_LOG_SNR = -4.0
AUTO_END_OFFSET, AUTO_END_SLOPE = 1.5, 0.4
AUTO_MAX_STEPS = 20


def auto_log_snr(lam_start: float, lam_min_end: float, steps: int, *,
                 end_given: bool = False) -> np.ndarray:
  """The 'auto' grid's `steps` log-SNR values (float64, increasing), from `lam_start`
  (the log-SNR at `t_max`) to `lam_min_end` (at `t_min`) or, unless `end_given`, the rule's
  smaller end point."""
  n = int(steps)
  if n >= AUTO_MAX_STEPS or n == 1:
    return np.linspace(lam_start, lam_min_end, n)
  lam_end = lam_min_end if end_given else min(lam_min_end, AUTO_END_OFFSET + AUTO_END_SLOPE * n)
  if lam_end <= lam_start:                 # a run started at low noise: uniform to t_min
    return np.linspace(lam_start, lam_min_end, n)
  lam_a = max(lam_start, AUTO_JUMP_LOG_SNR)
  if lam_start < lam_a < lam_end:          # one step straight down to lam_a, then uniform
    return np.concatenate([[lam_start], np.linspace(lam_a, lam_end, n - 1)])
  return np.linspace(lam_start, lam_end, n)


def auto_times(process, steps: int, *, t_min=None, t_max: float = 1.0, final: str = 'data',
               log_snr_clip: float = 20.0, dtype=None) -> np.ndarray:
  """The times of the 'auto' grid (see the module docstring), decreasing; with
  `final='t_min'` those of 'log_snr'. Infinite end log-SNRs are clipped to +-`log_snr_clip`,
  as `grids.time_grid` does."""
  del dtype     # float64 numpy throughout; the sampler's grid rounds the times to its dtype
  end_given = t_min is not None
  t_lo = float(process.t_min if t_min is None else t_min)
  if not 0.0 <= t_lo < t_max <= 1.0:
    raise ValueError(f'need 0 <= t_min < t_max <= 1, got t_min={t_lo}, t_max={t_max}')
  raw = np.asarray(process.log_snr_np(np.array([t_max, t_lo])), np.float64)
  ends = np.clip(raw, -log_snr_clip, log_snr_clip)
  n = int(steps) if final == 'data' else int(steps) + 1
  if final == 'data':
    lam = auto_log_snr(float(ends[0]), float(ends[1]), n, end_given=end_given)
  else:
    lam = np.linspace(ends[0], ends[1], n)
  t = np.array(process.t_of_log_snr_np(lam), np.float64)
  if abs(raw[0]) <= log_snr_clip:          # the end points exactly, not through the inverse
    t[0] = t_max
  if n > 1 and lam[-1] == ends[1] and abs(raw[1]) <= log_snr_clip:
    t[-1] = t_lo
  return t
