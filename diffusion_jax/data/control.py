"""Control maps computed from images, and how faithfully generated images follow them.

ControlNet (Zhang et al. 2023, arXiv:2302.05543, §3.3-4) conditions a diffusion model on a
spatial map computed from the image by a fixed operator (Canny edges, depth, pose, ...); the
generated image should have the same map. Here the operators are host numpy, deterministic, on
images `[N, H, W, C]` in [-1, 1] (the embedded digits), and give maps `[N, H, W, 1]` in [0, 1]:

  edges  Sobel gradient magnitude of the grey image `u = (x + 1) / 2` in [0, 1] (channels
         averaged), with replicated borders (a constant image has no edges, and neither has the
         image border), divided by 4, the magnitude of a full-contrast step edge (black to white:
         the Sobel column weights sum to 1 + 2 + 1 = 4); clipped to [0, 1]. With `threshold`
         (default 0.5, a half-contrast step) the map is binarised to {0, 1}, like the Canny
         edge maps of the paper; `threshold=None` keeps the soft magnitude.
  ink    the binarised ink mask `x > threshold` (default 0, mid-grey), {0, 1}.

`control_fidelity(samples, conds, op)` applies the same operator to generated samples and
compares with the maps they were conditioned on: IoU of the binarised maps (`> 0.5`; 1 where
both are empty) and the mean absolute difference (L1) of the maps, per sample and on average.
"""

import functools
from typing import Callable, NamedTuple

import numpy as np

# Sobel kernels (cross-correlation, rows = y, columns = x): d/dx and d/dy.
SOBEL_X = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], np.float32)
SOBEL_Y = SOBEL_X.T
STEP_MAGNITUDE = 4.0  # |Sobel| of a unit step edge: 1 + 2 + 1


def _grey(images, name: str) -> np.ndarray:
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ValueError(f'{name}: images must be [N, H, W, C], got shape {images.shape}')
  return (images.mean(axis=-1) + 1.0) / 2.0  # [N, H, W] in [0, 1]


def _correlate3x3(u: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """`sum_{a, b} kernel[a, b] u[y + a - 1, x + b - 1]` with replicated borders; u: [N, H, W]."""
  h, w = u.shape[1:]
  padded = np.pad(u, ((0, 0), (1, 1), (1, 1)), mode='edge')  # [N, H + 2, W + 2]
  out = np.zeros_like(u)
  for a in range(3):
    for b in range(3):
      out += kernel[a, b] * padded[:, a:a + h, b:b + w]
  return out


def edges(images, threshold: float | None = 0.5) -> np.ndarray:
  """Sobel edge map `[N, H, W, 1]`: `|grad u| / 4` clipped to [0, 1], binarised at `threshold`
  (None: the soft map). See the module docstring."""
  u = _grey(images, 'edges')
  gx, gy = _correlate3x3(u, SOBEL_X), _correlate3x3(u, SOBEL_Y)
  magnitude = np.clip(np.sqrt(gx**2 + gy**2) / STEP_MAGNITUDE, 0.0, 1.0)
  if threshold is not None:
    magnitude = (magnitude > threshold).astype(np.float32)
  return magnitude[..., None].astype(np.float32)  # [N, H, W, 1]


def ink(images, threshold: float = 0.0) -> np.ndarray:
  """Binarised ink mask `[N, H, W, 1]`: 1 where the (channel-mean) pixel exceeds `threshold`."""
  x = 2.0 * _grey(images, 'ink') - 1.0
  return (x > threshold).astype(np.float32)[..., None]  # [N, H, W, 1]


OPERATORS = {'edges': edges, 'ink': ink}


def make_operator(name: str, threshold: float | None = None) -> Callable[[np.ndarray], np.ndarray]:
  """The operator `name` (an `OPERATORS` key) with `threshold` (None: its default)."""
  if name not in OPERATORS:
    raise ValueError(f'control operator {name!r}: choose from {sorted(OPERATORS)}')
  if threshold is None:
    return OPERATORS[name]
  return functools.partial(OPERATORS[name], threshold=threshold)


class Fidelity(NamedTuple):
  iou: np.ndarray    # [N] IoU of the binarised maps (1 where both are empty)
  l1: np.ndarray     # [N] mean |op(sample) - cond| over the map's pixels

  def summary(self, prefix: str = 'control_') -> dict[str, float]:
    return {f'{prefix}iou': float(self.iou.mean()), f'{prefix}l1': float(self.l1.mean())}


def control_fidelity(samples, conds, op: str | Callable = 'edges') -> Fidelity:
  """How closely `op(samples)` matches `conds` (`[N, H, W, Cc]`, the maps the samples were
  conditioned on): per-sample IoU of the maps binarised at 0.5 and L1 of the maps."""
  fn = make_operator(op) if isinstance(op, str) else op
  maps = np.asarray(fn(samples), np.float32)
  conds = np.asarray(conds, np.float32)
  if maps.shape != conds.shape:
    raise ValueError(f'control_fidelity: the control maps have shape {conds.shape} but the '
                     f'operator gives {maps.shape} on samples of shape {np.shape(samples)}')
  a = (maps > 0.5).reshape(len(maps), -1)
  b = (conds > 0.5).reshape(len(conds), -1)
  inter = (a & b).sum(axis=1)
  union = (a | b).sum(axis=1)
  iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
  l1 = np.abs(maps - conds).reshape(len(maps), -1).mean(axis=1)
  return Fidelity(iou.astype(np.float64), l1.astype(np.float64))


def fidelity_metrics(op: str | Callable = 'edges', prefix: str = 'control_'):
  """`metrics(samples, conds) -> {'<prefix>iou': mean IoU, '<prefix>l1': mean L1}` (the
  `metrics` of a `data.derived.ImageCondition`)."""
  def metrics(samples, conds):
    return control_fidelity(samples, conds, op).summary(prefix)
  return metrics
