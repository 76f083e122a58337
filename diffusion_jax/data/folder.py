"""Your own images: a directory of PNG / JPEG files as a training source (`data.name='folder'`).

Two layouts, never mixed:
  root/a.png, root/b.jpg, ...              unlabelled
  root/<class>/x.png, root/<class>/y.jpg   labelled: one class per sub-folder (files below it at
                                           any depth), labels 0..K-1 in sorted class-name order
Files are taken in sorted path order (other files and names starting with '.' are skipped), so
example `i` is the same file on every machine. Each image is read once per use, centre-cropped
to a square (side `crop`, 0 = the shorter side), resized to `image_size` (0 = the shorter side of
the first image) as TFDS images are (`tfds_images.crop_and_resize`), and mapped to float32 in
[-1, 1] with the same flips and dequantization keyed by (seed, example position). Images are RGB,
or greyscale when the first image is (every image is converted to that mode).
"""

import os

import numpy as np
from PIL import Image

from diffusion_jax.data import sampler as data_sampler
from diffusion_jax.data import tfds_images

EXTENSIONS = ('.png', '.jpg', '.jpeg')
_GREY_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'F')
_KEY = 'config.data.path'


def scan(root: str) -> tuple[list[str], np.ndarray | None, list[str]]:
  """`(files, labels, classes)` of the image directory `root`; labels is None if it is flat."""
  if not os.path.isdir(root):
    raise ValueError(f'{_KEY}={root!r}: no such directory (a folder of PNG / JPEG images, '
                     f'or of one sub-folder of them per class)')
  with os.scandir(root) as entries:
    entries = sorted((e for e in entries if not e.name.startswith('.')), key=lambda e: e.name)
  flat = [e.name for e in entries if e.is_file() and _is_image(e.name)]
  dirs = [e.name for e in entries if e.is_dir()]
  if flat and dirs:
    raise ValueError(f'{_KEY}={root!r}: mixes image files ({flat[0]!r}, ...) and sub-folders '
                     f'({dirs[0]!r}, ...); put every image in a class sub-folder, or none')
  if flat:
    return [os.path.join(root, n) for n in flat], None, []
  files, labels = [], []
  for label, name in enumerate(dirs):
    found = _images_below(os.path.join(root, name))
    if not found:
      raise ValueError(f'{_KEY}={root!r}: class folder {name!r} holds no '
                       f'{"/".join(EXTENSIONS)} files')
    files += found
    labels += [label] * len(found)
  if not files:
    raise ValueError(f'{_KEY}={root!r}: no {"/".join(EXTENSIONS)} files in it or its '
                     f'sub-folders')
  return files, np.asarray(labels, np.int32), dirs


def _is_image(name: str) -> bool:
  return not name.startswith('.') and name.lower().endswith(EXTENSIONS)


def _images_below(folder: str) -> list[str]:
  out = []
  for parent, dirs, names in os.walk(folder):
    dirs[:] = [d for d in dirs if not d.startswith('.')]
    out += [os.path.join(parent, n) for n in names if _is_image(n)]
  return sorted(out)


class FolderSource:
  """The images under `root` (see the module docstring), by index."""

  def __init__(self, root: str, image_size: int = 0, crop: int = 0, flip: bool = False,
               dequantize: bool = False):
    self.root = os.path.expanduser(root)
    self.files, self.labels, self.classes = scan(self.root)
    self.num_classes = len(self.classes)
    self.crop = crop or None
    self.flip, self.dequantize = bool(flip), bool(dequantize)
    with self._open(0) as img:
      self.mode = 'L' if img.mode in _GREY_MODES else 'RGB'
      side = min(img.size) if self.crop is None else min(self.crop, *img.size)
    size = image_size or side
    self.image_shape = (size, size, 1 if self.mode == 'L' else 3)

  def __len__(self) -> int:
    return len(self.files)

  def _open(self, index: int) -> Image.Image:
    path = self.files[index]
    try:
      img = Image.open(path)
      img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
      reason = ' '.join(str(e).split())
      raise ValueError(f'{_KEY}={self.root!r}: cannot read image {path} '
                       f'({type(e).__name__}: {reason})') from None
    return img

  def pixels(self, index: int) -> np.ndarray:
    """uint8 `[H, W, C]`: file `index` as stored, in the source's colour mode."""
    with self._open(index) as img:
      x = np.asarray(img.convert(self.mode))
    return x.reshape(*x.shape[:2], -1)

  def example(self, index: int, seed: int = 0, position: int | None = None) -> dict:
    """The preprocessed image at `index` (and its label), from one read of its file;
    `position` (default: the index) keys its flip and dequantization noise."""
    x = tfds_images.crop_and_resize(self.pixels(index), self.image_shape[0], self.crop)
    out = {'image': tfds_images.to_model_range(x, seed, index if position is None else position,
                                               self.flip, self.dequantize)}
    if self.labels is not None:
      out['label'] = self.labels[index]
    return out

  def examples(self, indices, seed: int = 0, positions=None) -> dict:
    """Preprocessed examples at `indices`, stacked; `positions` (default: the indices) key
    the per-example flip and dequantization noise."""
    return tfds_images.stack_examples(self, indices, seed, positions)

  def batch(self, seed: int, step: int, global_batch: int, process_index: int = 0,
            process_count: int = 1) -> dict:
    """This process's rows of global batch `step` (`sampler.batch_rows`)."""
    idx, positions = data_sampler.batch_rows(seed, step, global_batch, len(self),
                                             process_index, process_count)
    return self.examples(idx, seed=seed, positions=positions)
