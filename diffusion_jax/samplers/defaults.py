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

Samplers that step in stages take the jump with one call (`auto_jumps`): there `x0_hat` hardly
moves, so a first-order step is exact up to its change, and the higher stages would cost calls
for a correction of about zero.

* Heun (`ode.heun_sample`) has its own rule, `rule='heun'`: one Euler step from t_max straight
  down to log-SNR -3 (-4 from 15 steps on), then Heun steps on uniform log-SNR up to `steps - 2`
  (`2 steps - 2` calls). Heun's trapezoid over the jump would be worse than Euler (it weights
  the slope at the low end by half): 0.39 against 0.06 at 6 steps on the benchmark. The
  constants were chosen on the same three problems (Euler jump, then Heun, 3-19 steps): within
  1.0-1.2x of each problem's best (jump, end) at 3-6 steps; -3 is the best jump up to 12 steps
  on all three, -4 from 15 on two of them (the Euler jump's own error, ~0.05 to -3 and ~5e-3 to
  -4 on the benchmark, is a floor). Benchmark mixture: 0.21 / 0.062 at 4 / 10 calls against
  4.3 / 1.8 at 5 / 9 for the old Karras default and 0.44 / 0.21 for the best hand-picked old
  option.
* Singlestep DPM-Solver-3 takes the jump as one DDIM step with at most
  `DPM3_DDIM_JUMP_MAX_STEPS` grid times (5 calls instead of 7 at 3): benchmark mixture at 5
  calls 0.28, against 0.98 (the third-order jump and x0_hat at -4 is all 4 calls buy). With
  more steps the third-order jump is kept: its first-order error would stay as a floor.
"""

import numpy as np

AUTO_JUMP_LOG_SNR = -4.0
AUTO_END_OFFSET, AUTO_END_SLOPE = 1.5, 0.4
AUTO_MAX_STEPS = 20
# Heun's 'auto' (`heun_sample`; the jump is one Euler step, then Heun): jump to log-SNR -3 (-4
# from `HEUN_SHORT_JUMP_STEPS` steps on), end at log-SNR `steps - 2`.
HEUN_JUMP_LOG_SNR = -3.0
HEUN_SHORT_JUMP_STEPS, HEUN_SHORT_JUMP_LOG_SNR = 15, -4.0
HEUN_END_OFFSET, HEUN_END_SLOPE = -2.0, 1.0
# Singlestep DPM-Solver-3 takes the 'auto' jump as one DDIM step up to this many grid times.
DPM3_DDIM_JUMP_MAX_STEPS = 3


def _constants(rule: str, steps: int):
  """`(jump, end_offset, end_slope)` of a rule: 'auto' (the module docstring) or 'heun'.

  Heun's jump is one Euler step, whose first-order error (~0.05 to log-SNR -3 on the benchmark
  mixture, ~5e-3 to -4) stays as a floor: below 15 steps the Heun steps' own error is larger and
  the longer jump leaves them a shorter range (best on the three study problems), from 15 steps
  on the shorter jump is the better one (benchmark mixture at 19 steps: 9e-3 against 4e-2)."""
  if rule == 'heun':
    jump = HEUN_JUMP_LOG_SNR if steps < HEUN_SHORT_JUMP_STEPS else HEUN_SHORT_JUMP_LOG_SNR
    return jump, HEUN_END_OFFSET, HEUN_END_SLOPE
  if rule == 'auto':
    return AUTO_JUMP_LOG_SNR, AUTO_END_OFFSET, AUTO_END_SLOPE
  raise ValueError(f"rule={rule!r}; choose 'auto' or 'heun'")


def auto_log_snr(lam_start: float, lam_min_end: float, steps: int, *,
                 end_given: bool = False, rule: str = 'auto') -> np.ndarray:
  """The 'auto' grid's `steps` log-SNR values (float64, increasing), from `lam_start`
  (the log-SNR at `t_max`) to `lam_min_end` (at `t_min`) or, unless `end_given`, the rule's
  smaller end point. `rule='heun'` takes Heun's constants (`HEUN_*`)."""
  n = int(steps)
  jump, end_offset, end_slope = _constants(rule, n)
  if n >= AUTO_MAX_STEPS or n == 1:
    return np.linspace(lam_start, lam_min_end, n)
  lam_end = lam_min_end if end_given else min(lam_min_end, end_offset + end_slope * n)
  if lam_end <= lam_start:                 # a run started at low noise: uniform to t_min
    return np.linspace(lam_start, lam_min_end, n)
  lam_a = max(lam_start, jump)
  if lam_start < lam_a < lam_end:          # one step straight down to lam_a, then uniform
    return np.concatenate([[lam_start], np.linspace(lam_a, lam_end, n - 1)])
  return np.linspace(lam_start, lam_end, n)


def auto_times(process, steps: int, *, t_min=None, t_max: float = 1.0, final: str = 'data',
               log_snr_clip: float = 20.0, dtype=None, rule: str = 'auto') -> np.ndarray:
  """The times of the 'auto' grid (see the module docstring), decreasing; with
  `final='t_min'` those of 'log_snr'. Infinite end log-SNRs are clipped to +-`log_snr_clip`,
  as `grids.time_grid` does. `rule='heun'`: Heun's constants."""
  del dtype     # float64 numpy throughout; the sampler's grid rounds the times to its dtype
  end_given = t_min is not None
  t_lo = float(process.t_min if t_min is None else t_min)
  if not 0.0 <= t_lo < t_max <= 1.0:
    raise ValueError(f'need 0 <= t_min < t_max <= 1, got t_min={t_lo}, t_max={t_max}')
  raw = np.asarray(process.log_snr_np(np.array([t_max, t_lo])), np.float64)
  ends = np.clip(raw, -log_snr_clip, log_snr_clip)
  n = int(steps) if final == 'data' else int(steps) + 1
  if final == 'data':
    lam = auto_log_snr(float(ends[0]), float(ends[1]), n, end_given=end_given, rule=rule)
  else:
    lam = np.linspace(ends[0], ends[1], n)
  t = np.array(process.t_of_log_snr_np(lam), np.float64)
  if abs(raw[0]) <= log_snr_clip:          # the end points exactly, not through the inverse
    t[0] = t_max
  if n > 1 and lam[-1] == ends[1] and abs(raw[1]) <= log_snr_clip:
    t[-1] = t_lo
  return t


def auto_jumps(process, steps: int, *, t_min=None, t_max: float = 1.0, final: str = 'data',
               log_snr_clip: float = 20.0, rule: str = 'auto') -> bool:
  """Whether the 'auto' grid of these arguments starts with the jump: one step from `t_max`
  straight down to the rule's jump level (few steps, `final='data'`, and `t_max` below that
  level). The samplers that step in stages (Heun, singlestep DPM-Solver-3) take that step with
  one call (first order): `x0_hat` hardly moves there, so the higher stages would cost calls for
  a correction of about zero."""
  n = int(steps)
  if final != 'data' or n < 2 or n >= AUTO_MAX_STEPS:
    return False
  t_lo = float(process.t_min if t_min is None else t_min)
  ends = np.clip(np.asarray(process.log_snr_np(np.array([t_max, t_lo])), np.float64),
                 -log_snr_clip, log_snr_clip)
  lam = auto_log_snr(float(ends[0]), float(ends[1]), n, end_given=t_min is not None, rule=rule)
  jump = _constants(rule, n)[0]
  return bool(lam[0] < jump and lam[1] == jump)
