"""A data set of autoencoder latents on disk, as `experiments.encode_latents` writes it.

A latents directory holds
  latents.npy    `[N, h, w, c]` float32, the encoder's latents as they come out (unscaled);
  labels.npy     `[N]` int32 (only for labelled data);
  latents.json   what the latents are: `scale_factor` (latent diffusion trains on
                 `scale_factor * z`; measured as 1 / std of all latent elements, or the
                 pretrained VAE's published value), `latent_shape`, `num_examples`, `num_classes`,
                 the autoencoder that made them (`autoencoder`: its work dir and step, or its
                 weights file) and the pixel data they encode (`data`: the config's data section).
`load_latents(path)` opens it as a training source whose images are the scaled latents. A
directory without `latents.json`, or whose `latents.json` has no positive `scale_factor`, is
refused: unscaled latents would train silently at the wrong noise level.
"""

import json
import os

import numpy as np

from diffusion_jax.data import sources

INFO_NAME = 'latents.json'
LATENTS_NAME = 'latents.npy'
LABELS_NAME = 'labels.npy'


class ScaledArraySource(sources.ArraySource):
  """An `ArraySource` whose images are `scale * stored`, scaled batch by batch."""

  def __init__(self, latents: np.ndarray, labels, num_classes: int, scale: float):
    super().__init__(latents, labels, num_classes)
    self.scale = float(scale)

  def examples(self, indices) -> dict:
    out = super().examples(indices)
    out['image'] = out['image'] * np.float32(self.scale)
    return out


def read_info(path: str) -> dict:
  """`latents.json` of the latents directory `path`; a one-line ValueError naming what is wrong."""
  info_path = os.path.join(os.path.expanduser(path), INFO_NAME)
  if not os.path.isdir(os.path.expanduser(path)):
    raise ValueError(f'latents {path}: no such directory (experiments.encode_latents writes '
                     f'one)')
  try:
    with open(info_path, encoding='utf-8') as f:
      info = json.load(f)
  except FileNotFoundError:
    raise ValueError(f'latents {path}: no {INFO_NAME} beside the latents, so no stored scale '
                     f'factor; re-encode with experiments.encode_latents') from None
  except (OSError, ValueError) as e:
    raise ValueError(f'latents {info_path}: unreadable ({e})') from None
  scale = info.get('scale_factor') if isinstance(info, dict) else None
  if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
    raise ValueError(f'latents {info_path}: scale_factor={scale!r}, expected a positive number '
                     f'(1 / std of the latents); re-encode with experiments.encode_latents')
  return info


def load_latents(path: str) -> tuple[ScaledArraySource, dict]:
  """`(source, info)`: the latents of directory `path` (memory-mapped), scaled by the stored
  factor, with their labels if any."""
  info = read_info(path)
  path = os.path.expanduser(path)
  try:
    latents = np.load(os.path.join(path, LATENTS_NAME), mmap_mode='r')
  except (OSError, ValueError) as e:
    raise ValueError(f'latents {path}: cannot read {LATENTS_NAME} ({e})') from None
  shape = tuple(info.get('latent_shape', ()))
  if latents.ndim != 4 or tuple(latents.shape[1:]) != shape:
    raise ValueError(f'latents {path}: {LATENTS_NAME} has shape {latents.shape}, but '
                     f'{INFO_NAME} says latent_shape={list(shape)}')
  labels = None
  labels_path = os.path.join(path, LABELS_NAME)
  if os.path.exists(labels_path):
    labels = np.load(labels_path, mmap_mode='r')
    if labels.shape != latents.shape[:1]:
      raise ValueError(f'latents {path}: {LABELS_NAME} has shape {labels.shape} for '
                       f'{len(latents)} latents')
  source = ScaledArraySource(latents, labels, int(info.get('num_classes', 0)),
                             info['scale_factor'])
  return source, info


def write_info(path: str, info: dict) -> None:
  """Writes `latents.json` atomically (a reader sees the old file or the whole new one)."""
  tmp = os.path.join(path, f'.{INFO_NAME}.{os.getpid()}')
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(info, f, indent=2)
  os.replace(tmp, os.path.join(path, INFO_NAME))
