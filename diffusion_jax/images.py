"""Sample grids as PNG: what a person looks at instead of reading numbers."""

import os

import numpy as np


def make_grid(images, ncol: int = 10, pad: int = 1, upscale: int = 4) -> np.ndarray:
  """Tiles `[N, H, W, C]` images in [-1, 1] into one uint8 `[H', W', C]` image.

  `upscale` enlarges pixels by nearest neighbour so 8x8 digits are visible; `pad` pixels of
  mid-grey separate the tiles.
  """
  x = np.asarray(images, np.float32)
  if x.ndim != 4:
    raise ValueError(f'make_grid expects [N, H, W, C] images, got shape {x.shape}')
  x = np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
  if upscale > 1:
    x = x.repeat(upscale, axis=1).repeat(upscale, axis=2)
  n, h, w, c = x.shape
  nrow = -(-n // ncol)
  grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 128, np.uint8)
  for i in range(n):
    r, q = divmod(i, ncol)
    top, left = pad + r * (h + pad), pad + q * (w + pad)
    grid[top:top + h, left:left + w] = x[i]
  return grid


def save_png(path: str | os.PathLike, grid: np.ndarray) -> None:
  """Writes a uint8 `[H, W, C]` array (C = 1 or 3) to `path` atomically."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  arr = grid[..., 0] if grid.shape[-1] == 1 else grid
  tmp = f'{os.fspath(path)}.tmp'
  Image.fromarray(arr).save(tmp, format='PNG')
  os.replace(tmp, path)


def read_png(path: str | os.PathLike) -> np.ndarray:
  """A PNG as a uint8 `[H, W, C]` array (C = 1, 3 or 4 as stored)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as img:
    x = np.asarray(img)
  return x[..., None] if x.ndim == 2 else x


def save_scatter_png(path: str | os.PathLike, points, reference=None, title: str = '') -> None:
  """2-D samples `[N, 2]` as a scatter plot PNG (over `reference` points in grey, if given)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  points = np.asarray(points)
  fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
  if reference is not None:
    reference = np.asarray(reference)
    ax.scatter(reference[:, 0], reference[:, 1], s=1, c='0.75', label='data')
  ax.scatter(points[:, 0], points[:, 1], s=1, c='C0', label='samples')
  ax.set_aspect('equal')
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  tmp = f'{os.fspath(path)}.tmp'
  fig.savefig(tmp, format='png')
  plt.close(fig)
  os.replace(tmp, path)
