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

  def _image(self, raw) -> np.ndarray:
    x = np.asarray(raw, np.uint8)                                    # [H, W, C]
    h, w = x.shape[:2]
    side = min(h, w) if self.preset.crop is None else min(self.preset.crop, h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[top:top + side, left:left + side]
    size = self.preset.image_size
    if side != size:
      img = Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x)
      img = img.resize((size, size), Image.BICUBIC if side < size else Image.BOX)
      x = np.asarray(img).reshape(size, size, -1)
    return x

  def examples(self, indices, seed: int = 0, positions=None) -> dict:
    """Preprocessed examples at dataset `indices`; `positions` (default: the indices) key the
    per-example flip and dequantization noise."""
    indices = np.asarray(indices)
    positions = indices if positions is None else np.asarray(positions)
    images = np.stack([self._image(self._source[int(i)][self.preset.image_key])
                       for i in indices]).astype(np.float32)                 # [B, H, W, C]
    noise = np.empty_like(images)
    flips = np.zeros(len(indices), bool)
    for j, pos in enumerate(positions):
      rng = np.random.Generator(np.random.Philox(key=[seed, int(pos)]))
      flips[j] = self.flip and rng.random() < 0.5
      if self.dequantize:
        noise[j] = rng.random(images.shape[1:])
    images[flips] = images[flips][:, :, ::-1]
    if self.dequantize:
      images = (images + noise) / 128.0 - 1.0
    else:
      images = images / 127.5 - 1.0
    out = {'image': images}
    if self.preset.label_key is not None:
      out['label'] = np.array([self._source[int(i)][self.preset.label_key] for i in indices],
                              np.int32)
    return out

  def batch(self, seed: int, step: int, global_batch: int, process_index: int = 0,
            process_count: int = 1) -> dict:
    """This process's slice of global batch `step`: a pure function of its arguments.

    The global batch is `data.sampler.batch_indices(seed, step, global_batch, N)` (shuffled
    epochs); process p takes rows `[p B/P, (p+1) B/P)`, so the processes' slices are disjoint
    and their union is the batch a single process would read.
    """
    if global_batch % process_count:
      raise ValueError(f'tfds_images: global batch {global_batch} is not divisible by '
                       f'process_count={process_count}')
    per = global_batch // process_count
    rows = slice(process_index * per, (process_index + 1) * per)
    idx = data_sampler.batch_indices(seed, step, global_batch, len(self))[rows]
    positions = step * global_batch + np.arange(global_batch)[rows]
    return self.examples(idx, seed=seed, positions=positions)
