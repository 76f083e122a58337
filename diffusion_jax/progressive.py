"""Progressive training: the resolution grows on a schedule of training steps.

`config.train.resolution_schedule = ((0, 8), (N, 16))` trains on 8x8 images for steps
`0 .. N-1` and on 16x16 from step N on. ProGAN (Karras et al. 2018) grew the network with the
resolution; here a fully convolutional U-Net runs one parameter set at every size, and only the
data changes. A stage's images are the data's own (final-resolution) images average-pooled by the
integer factor `k = H / r`:
`x_r[i, j] = mean_{a, b < k} x[k i + a, k j + b]`, so every stage sees the same examples, in the
same order; for the 16x16 digits (each pixel repeated 2 x 2) the 8x8 stage is exactly the
native 8x8 digits.

Exact resumption: the resolution of step n is `resolution_at(schedule, n)`, a pure function of
the config and n, and the pooling is applied per example, keyed by the example's global position
(`position // global_batch` is its step, `data.sampler`). A run killed at any step, at a switch
included, resumes with the batches an uninterrupted run would have read. Parameter shapes do not
depend on the input size, so the optimizer and EMA state carry over a switch unchanged; the
jitted train step compiles once per resolution (the loop says when). Sampling and evaluation are
at the final resolution, which must be the data's.

Noise schedule across resolutions (not applied here): pooling k x k pixels of `alpha x + sigma
eps` divides the noise variance by k² and keeps a smooth image, so the pooled image has log-SNR
`lambda + 2 log k`. Hoogeboom et al. 2023, §3.1, shift the schedule by `2 log(64 / d)` at
resolution d for this reason (`processes_continuous.VPCosine.shifted`). Training each stage on
a process shifted by `+2 log(S / r)` (S the final size) would give the network, at a given t, the
information a final-size image at t has on the coarse scale. Every stage here uses the configured
process unchanged; the shift is documented, not implemented (docs/progressive/results.md).
"""

from typing import Callable, Sequence

import numpy as np

from diffusion_jax.configuration import ConfigError

KEY = 'config.train.resolution_schedule'


def parse_schedule(value: Sequence) -> tuple[tuple[int, int], ...]:
  """`((start_step, resolution), ...)` checked and as tuples; `()` (off) stays `()`.

  The first stage starts at step 0, starts are strictly increasing, resolutions are positive
  integers. A one-line `ConfigError` naming `train.resolution_schedule` otherwise.
  """
  stages = tuple(value or ())
  out = []
  for stage in stages:
    if (not isinstance(stage, (tuple, list)) or len(stage) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in stage)):
      raise ConfigError(f'{KEY}={_show(stages)}: expected (start_step, resolution) pairs of '
                        f'ints, got {stage!r}')
    out.append((int(stage[0]), int(stage[1])))
  if not out:
    return ()
  if out[0][0] != 0:
    raise ConfigError(f'{KEY}={_show(out)}: the first stage must start at step 0, not '
                      f'{out[0][0]}')
  for (s0, _), (s1, _) in zip(out[:-1], out[1:], strict=True):
    if s1 <= s0:
      raise ConfigError(f'{KEY}={_show(out)}: start steps must be strictly increasing '
                        f'({s1} after {s0})')
  for _, r in out:
    if r <= 0:
      raise ConfigError(f'{KEY}={_show(out)}: resolution {r} must be positive')
  return tuple(out)


def check_schedule(schedule, image_shape, check_model: Callable | None = None) -> None:
  """Checks each stage's resolution against the data (`image_shape` `[H, W, C]`, the final
  size) and, with `check_model(shape)` (raising `ValueError`), against the model.

  A resolution r must divide H (the pooling factor `k = H / r` an integer that divides W too),
  and the last stage must be at the data's H: sampling and evaluation run at that size.
  """
  schedule = parse_schedule(schedule)
  if not schedule:
    return
  if len(image_shape) != 3:
    raise ConfigError(f'{KEY}={_show(schedule)}: progressive training needs images [H, W, C]; '
                      f'the data has shape {tuple(image_shape)}')
  height, width, channels = image_shape
  if schedule[-1][1] != height:
    raise ConfigError(f'{KEY}={_show(schedule)}: the last stage must be at the data\'s '
                      f'resolution {height} (sampling and evaluation run there), not '
                      f'{schedule[-1][1]}')
  for _, r in schedule:
    if height % r or width % (height // r):
      raise ConfigError(f'{KEY}={_show(schedule)}: resolution {r} is not the data\'s '
                        f'{height} x {width} pooled by an integer factor')
  if check_model is not None:
    for r in sorted({r for _, r in schedule}):
      shape = stage_shape(image_shape, r)
      try:
        check_model(shape)
      except ValueError as e:
        raise ConfigError(f'{KEY}={_show(schedule)}: the model does not run at resolution {r} '
                          f'({str(e).splitlines()[0]})') from None
  del channels


def resolution_at(schedule, step: int) -> int:
  """The resolution of training step `step` (0-based): that of the last stage starting at or
  before it. `schedule` must be non-empty (`parse_schedule`)."""
  if not schedule:
    raise ValueError('resolution_at: the schedule is empty (progressive training is off)')
  if step < 0:
    raise ValueError(f'resolution_at: step {step} must be >= 0')
  current = schedule[0][1]
  for start, r in schedule:
    if start > step:
      break
    current = r
  return current


def stage_shape(image_shape, resolution: int) -> tuple[int, int, int]:
  """`[H, W, C]` of the data pooled to height `resolution`."""
  height, width, channels = image_shape
  k = height // resolution
  return (resolution, width // k, channels)


def pool(images: np.ndarray, factor: int) -> np.ndarray:
  """`[..., H, W, C]` -> `[..., H / k, W / k, C]`: means over k x k blocks (k = `factor`)."""
  if factor == 1:
    return images
  *lead, h, w, c = images.shape
  x = np.asarray(images).reshape(*lead, h // factor, factor, w // factor, factor, c)
  return x.mean(axis=(-4, -2), dtype=np.float32)  # [..., H/k, W/k, C]


def stage_source(source, schedule, global_batch: int):
  """`source` whose batch (and example) of step n is pooled to `resolution_at(schedule, n)`;
  `source` itself when the schedule is empty. `global_batch` maps an example's position to its
  step (the loader's per-example reads)."""
  schedule = parse_schedule(schedule)
  if not schedule:
    return source
  check_schedule(schedule, source.image_shape)
  cls = _StagedExamples if hasattr(source, 'example') else StagedSource
  return cls(source, schedule, global_batch)


class StagedSource:
  """A source's batches at the resolution of their step's stage (`stage_source`). Its
  `image_shape` is the final one; `len`, `num_classes` and labels are the source's."""

  def __init__(self, source, schedule, global_batch: int):
    if global_batch <= 0:
      raise ValueError(f'stage_source: global_batch={global_batch} must be positive')
    self.source, self.schedule, self.global_batch = source, parse_schedule(schedule), global_batch
    self.image_shape = tuple(source.image_shape)
    self.num_classes = getattr(source, 'num_classes', 0)

  def __len__(self) -> int:
    return len(self.source)

  def factor_at(self, step: int) -> int:
    """The pooling factor `H / r` of step `step`."""
    return self.image_shape[0] // resolution_at(self.schedule, step)

  def batch(self, seed: int, step: int, global_batch: int, process_index: int = 0,
            process_count: int = 1) -> dict:
    out = dict(self.source.batch(seed, step, global_batch, process_index, process_count))
    out['image'] = pool(out['image'], self.factor_at(step))  # [B, r, r', C]
    return out


class _StagedExamples(StagedSource):
  """For sources with per-example reads: an example's step is its global position divided by
  the global batch (`data.loader` assigns positions `step * B + row`)."""

  def example(self, index: int, seed: int = 0, position: int = 0) -> dict:
    out = dict(self.source.example(index, seed, position))
    out['image'] = pool(out['image'], self.factor_at(position // self.global_batch))
    return out


def switch_message(schedule, step: int, start: int) -> str | None:
  """What the loop says at `step` of a run (re)started at `start`: the resolution when it
  starts and at every stage boundary (each new resolution compiles the train step), else
  None."""
  if not schedule or not (step == start or any(s == step for s, _ in schedule)):
    return None
  r = resolution_at(schedule, step)
  nxt = next((s for s, _ in schedule if s > step), None)
  until = f' until step {nxt}' if nxt is not None else ''
  return f'progressive: training at resolution {r} from step {step}{until}'


def _show(stages) -> str:
  try:
    return '(' + ', '.join(f'({s}, {r})' for s, r in stages) + ')' if stages else '()'
  except (TypeError, ValueError):   # not pairs: as written
    return repr(tuple(stages))
