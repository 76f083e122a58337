"""TFDS image datasets by index, with the data order a pure function of (seed, step).

`tfds.data_source` gives random access to ArrayRecord-prepared datasets without TensorFlow, so a
batch is `[source[i] for i in batch_indices(seed, step, ...)]`: a run resumed at step k sees the
same batches as one that never stopped, and each process reads only its slice of the global
batch. Per-example randomness (horizontal flip, dequantization noise) is keyed by (seed, global
example position), so it too is independent of the process count and of restarts.

Images come out as float32 `[B, H, W, C]` in [-1, 1] (`x / 127.5 - 1`); with `dequantize`,
`(x + u) / 128 - 1`, `u ~ U[0, 1)`, the uniform dequantization used for likelihoods in bits/dim.
"""

import dataclasses
import os

import numpy as np
from PIL import Image

from diffusion_jax.data import sampler as data_sampler


@dataclasses.dataclass(frozen=True)
class Preset:
  tfds_name: str
  image_size: int                  # output H = W
  label_key: str | None = 'label'  # None: unlabelled
  num_classes: int = 0
  crop: int | None = None          # centre crop to this square before resizing (CelebA: 140)
  flip: bool = True                # random horizontal flips (training)
  image_key: str = 'image'
  note: str = ''


PRESETS = {
    'mnist': Preset('mnist', 28, num_classes=10, flip=False),
    'fashion_mnist': Preset('fashion_mnist', 28, num_classes=10, flip=False),
    'cifar10': Preset('cifar10', 32, num_classes=10),
    # The usual CelebA 64x64 of NCSN / DDPM / DDIM: centre 140x140 crop, then resize.
    'celeb_a': Preset('celeb_a', 64, label_key=None, crop=140),
    'imagenet32': Preset('downsampled_imagenet/32x32', 32, label_key=None, flip=False),
    'imagenet64': Preset('downsampled_imagenet/64x64', 64, label_key=None, flip=False),
    'lsun_church': Preset('lsun/church_outdoor', 256, label_key=None,
                          note='LSUN needs a manual download; prepare it into data_dir'),
}


def crop_and_resize(image, size: int, crop: int | None = None) -> np.ndarray:
  """uint8 `[size, size, C]`: the centre square of `image` `[H, W, C]` (side `crop`, None = the
  shorter side) resized to `size` (bicubic up, box-filtered down)."""
  x = np.asarray(image, np.uint8)                                    # [H, W, C]
  h, w = x.shape[:2]
  side = min(h, w) if crop is None else min(crop, h, w)
  top, left = (h - side) // 2, (w - side) // 2
  x = x[top:top + side, left:left + side]
  if side != size:
    img = Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x)
    img = img.resize((size, size), Image.BICUBIC if side < size else Image.BOX)
    x = np.asarray(img).reshape(size, size, -1)
  return x


def to_model_range(image: np.ndarray, seed: int, position: int, flip: bool,
                   dequantize: bool) -> np.ndarray:
  """float32 `[H, W, C]` in [-1, 1] from uint8 pixels: `x / 127.5 - 1`, or with `dequantize`
  `(x + u) / 128 - 1`, `u ~ U[0, 1)`; with `flip`, mirrored left-right with probability 1/2.
  The coin and the noise are drawn from Philox keyed by (seed, position), in that order."""
  x = np.asarray(image).astype(np.float32)
  rng = np.random.Generator(np.random.Philox(key=[seed, int(position)]))
  if flip and rng.random() < 0.5:
    x = x[:, ::-1]
  if dequantize:
    return (x + rng.random(x.shape).astype(np.float32)) / 128.0 - 1.0
  return x / 127.5 - 1.0


def stack_examples(source, indices, seed: int = 0, positions=None) -> dict:
  """`source.example(i, seed, position)` for each index, stacked into one batch (positions
  default to the indices)."""
  indices = np.asarray(indices)
  positions = indices if positions is None else np.asarray(positions)
  rows = [source.example(int(i), seed, int(p)) for i, p in zip(indices, positions, strict=True)]
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _prepare_hint(name: str, data_dir: str | None) -> str:
  where = data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
  # `tfds build` needs TensorFlow, which this project does not install: a separate env does.
  return (f'TFDS dataset {name!r} is not readable in data_dir={where}: prepare it on a machine '
          f'with internet, in an environment with TensorFlow: `python3 -m venv tfds-env && '
          f'tfds-env/bin/pip install tensorflow-cpu tensorflow-datasets && tfds-env/bin/tfds '
          f'build {name} --data_dir={where} --file_format=array_record` (random access needs '
          f'ArrayRecord), then copy the folder here')


class ImageSource:
  """Random-access images (and labels) of one TFDS split, preprocessed to a fixed size."""

  def __init__(self, preset: Preset | str, split: str = 'train', data_dir: str | None = None,
               dequantize: bool = False, flip: bool | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if isinstance(preset, str):
      if preset not in PRESETS:
        raise ValueError(f'tfds_images: unknown preset {preset!r}; choose from {sorted(PRESETS)} '
                         f'or pass a Preset(tfds_name, image_size, ...)')
      preset = PRESETS[preset]
    self.preset = preset
    self.dequantize = dequantize
    self.flip = preset.flip if flip is None else flip
    try:
      self._source = tfds.data_source(preset.tfds_name, split=split, data_dir=data_dir,
                                      download=False)
      self._len = len(self._source)
    except Exception as e:  # noqa: BLE001  (tfds raises many types; all mean "not readable")
      raise ValueError(_prepare_hint(preset.tfds_name, data_dir)
                       + f' ({type(e).__name__})') from None
    first = self._source[0]
    for key in (preset.image_key, preset.label_key):
      if key is not None and key not in first:
        raise ValueError(f'tfds_images: {preset.tfds_name!r} examples have no key {key!r}; '
                         f'they have {sorted(first)}')
    channels = np.asarray(first[preset.image_key]).shape[-1]
    self.image_shape = (preset.image_size, preset.image_size, channels)

  def __len__(self) -> int:
    return self._len

  def example(self, index: int, seed: int = 0, position: int | None = None) -> dict:
    """The preprocessed example at dataset `index`, from one read of the source (image and
    label together); `position` (default: the index) keys its flip and dequantization noise."""
    raw = self._source[int(index)]
    x = crop_and_resize(raw[self.preset.image_key], self.preset.image_size, self.preset.crop)
    out = {'image': to_model_range(x, seed, index if position is None else position,
                                   self.flip, self.dequantize)}
    if self.preset.label_key is not None:
      out['label'] = np.int32(raw[self.preset.label_key])
    return out

  def examples(self, indices, seed: int = 0, positions=None) -> dict:
    """Preprocessed examples at dataset `indices`, stacked; `positions` (default: the indices)
    key the per-example flip and dequantization noise."""
    return stack_examples(self, indices, seed, positions)

  def batch(self, seed: int, step: int, global_batch: int, process_index: int = 0,
            process_count: int = 1) -> dict:
    """This process's slice of global batch `step`: a pure function of its arguments.

    The global batch is `data.sampler.batch_indices(seed, step, global_batch, N)` (shuffled
    epochs); process p takes rows `[p B/P, (p+1) B/P)`, so the processes' slices are disjoint
    and their union is the batch a single process would read.
    """
    idx, positions = data_sampler.batch_rows(seed, step, global_batch, len(self),
                                             process_index, process_count)
    return self.examples(idx, seed=seed, positions=positions)
