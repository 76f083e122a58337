"""Training data sources behind one interface, and the `data` config section that picks one.

A source has `image_shape`, `num_classes`, `len()` and
`batch(seed, step, global_batch, process_index, process_count) -> {'image', ['label']}`: this
process's rows of global batch `step`, a pure function of its arguments (shuffled epochs from
`data.sampler.batch_indices`). So a resumed run reads exactly the batches an uninterrupted one
would, and P processes together read exactly what one process would.

  digits      the embedded 8x8 scikit-learn digits (no download)
  npy         an array file `[N, H, W, C]`, optional labels file `[N]`
  latents     a directory of autoencoder latents (`data.path`; `data/latents.py`), scaled by the
              factor stored with them
  <preset>    a TFDS dataset by index (`tfds_images.PRESETS`: mnist, cifar10, celeb_a, ...)
  tfds        any other TFDS image dataset: `tfds_name`, `image_size` and its keys
  toy2d       2-D points drawn on the fly (`data.toy`: a `toy2d.TOYS` name), `[B, 2]`
  folder      your own PNG / JPEG files under `data.path` (`data/folder.py`): one class per
              sub-folder, or unlabelled if the files lie in `data.path` itself
  synth_audio the embedded synthetic speech-like clips (`data/audio.py`), waveforms `[4096, 1]`
              at 8 kHz; speech_commands (TFDS, needs TensorFlow to decode) and tfds_audio (any
              TFDS dataset with int16 Tensor audio, `data.tfds_name`) by index (`tfds_audio.py`)

Sources of examples also have `example(index, seed, position)`: one example as a batch row, read
once; `batch` stacks them, and `data.loader` reads them in grain worker processes.
"""

import dataclasses
import mmap
import os
import queue
import threading

import jax
import numpy as np

from diffusion_jax.data import digits
from diffusion_jax.data import folder
from diffusion_jax.data import sampler as data_sampler
from diffusion_jax.data import tfds_images
from diffusion_jax.data import toy2d


@dataclasses.dataclass(frozen=True)
class DataConfig:
  name: str = 'digits'
  split: str = 'train'
  image_size: int = 0           # 0: the data's own; digits: 8, 16 (pixels repeated 2 x 2) or
                                # 32 (bilinear x 4); tfds, folder: the side after crop + resize
  data_dir: str = ''            # TFDS data_dir ('' = $TFDS_DATA_DIR or ~/tensorflow_datasets)
  path: str = ''                # npy: the images file; latents, folder: the directory
  labels_path: str = ''         # npy: optional labels file
  flip: bool | None = None      # TFDS, folder: random horizontal flips (None = the preset's
                                # default; folder: no flips)
  dequantize: bool = False      # TFDS, folder: uniform dequantization (for likelihoods)
  # name='tfds': any TFDS image dataset (prepared as ArrayRecord), centre-cropped to a square
  # (of side `crop`, 0 = the shorter side) and resized to `image_size`.
  tfds_name: str = ''
  image_key: str = 'image'
  label_key: str = 'label'      # '' = unlabelled
  num_classes: int = 0
  crop: int = 0                 # tfds, folder: centre square's side (0 = the shorter side)
  toy: str = 'eight_gaussians'  # name='toy2d': which of toy2d.TOYS
  # Audio (`data/audio.py`): examples are waveforms `[clip_length, 1]` in [-1, 1]. `sample_rate`
  # is the rate the run expects (0: the data's own; a different one is refused, nothing is
  # resampled); `clip_length` the samples per clip (0: the data's own; TFDS clips are centre
  # cropped or zero padded to it).
  sample_rate: int = 0
  clip_length: int = 0
  # digits: keep only these labels (() = all; e.g. a held-out subset to fine-tune on); the
  # labels keep their values.
  classes: tuple[int, ...] = ()


AUDIO_DATASETS = ('synth_audio', 'speech_commands', 'tfds_audio')   # `data/audio.py`
DATASETS = ('digits', 'npy', 'latents', 'tfds', 'folder', 'toy2d', *tfds_images.PRESETS,
            *AUDIO_DATASETS)

process_rows = data_sampler.process_rows


class ArraySource:
  """Examples held in (or memory-mapped from) arrays: images `[N, H, W, C]` (or any examples
  `[N, ...]` of rank >= 1 given `rank`: waveforms `[N, L, 1]`), labels `[N]`."""

  def __init__(self, images: np.ndarray, labels: np.ndarray | None = None,
               num_classes: int = 0, *, rank: int = 3):
    if images.ndim != rank + 1:
      what = '[N, H, W, C]' if rank == 3 else f'[N, ...] with {rank} axes per example'
      raise ValueError(f'data: images must be {what}; got shape {images.shape}')
    if labels is not None and labels.shape != images.shape[:1]:
      raise ValueError(f'data: labels of shape {labels.shape} do not match {len(images)} images')
    self.images, self.labels = images, labels
    self.image_shape = tuple(images.shape[1:])
    self.num_classes = num_classes

  def __len__(self) -> int:
    return len(self.images)

  def batch(self, seed: int, step: int, global_batch: int, process_index: int = 0,
            process_count: int = 1) -> dict:
    rows = process_rows(global_batch, process_index, process_count)
    return self.examples(data_sampler.batch_indices(seed, step, global_batch, len(self))[rows])

  def examples(self, indices) -> dict:
    """The examples at `indices` (in order), as `batch` returns them."""
    idx = np.asarray(indices)
    out = {'image': np.asarray(self.images[idx], np.float32)}
    if self.labels is not None:
      out['label'] = np.asarray(self.labels[idx], np.int32)
    return out

  def example(self, index: int, seed: int = 0, position: int = 0) -> dict:
    """The example at `index` as one row of `examples` (arrays have no per-example
    randomness: `seed` and `position` are unused)."""
    del seed, position
    return {k: v[0] for k, v in self.examples([index]).items()}

  # Worker processes receive the source pickled: a memory-mapped file travels as its name and
  # layout and is mapped again there, not copied whole.
  def __getstate__(self):
    return {k: _MappedFile.of(v) for k, v in self.__dict__.items()}

  def __setstate__(self, state):
    self.__dict__.update({k: v.open() if isinstance(v, _MappedFile) else v
                          for k, v in state.items()})


@dataclasses.dataclass(frozen=True)
class _MappedFile:
  """How to map a read-only `np.memmap` again in another process."""
  filename: str
  dtype: np.dtype
  shape: tuple
  offset: int
  order: str

  @classmethod
  def of(cls, value):
    """`value` itself, or a `_MappedFile` if it is a whole memory-mapped file."""
    # A slice of a map is a memmap too, with its parent's filename and offset: only a map whose
    # base is the mmap itself describes its whole file.
    if not isinstance(value, np.memmap) or not isinstance(value.base, mmap.mmap):
      return value
    order = 'C' if value.flags.c_contiguous else 'F'
    return cls(value.filename, value.dtype, value.shape, value.offset, order)

  def open(self) -> np.memmap:
    return np.memmap(self.filename, self.dtype, 'r', self.offset, self.shape, self.order)


class ToySource:
  """2-D points from a `toy2d.TOYS` sampler: batch `step` is a fresh draw keyed by
  (seed, step), so every run with the same seed and batch size sees the same points, and process
  p takes rows `[p B / P, (p + 1) B / P)` of it. An endless data set: `len()` is the number of
  points an epoch would count, for reporting only."""

  image_shape = (2,)
  num_classes = 0

  def __init__(self, name: str):
    if name not in toy2d.TOYS:
      raise ValueError(f'config.data.toy={name!r}: unknown; choose from {sorted(toy2d.TOYS)}')
    self.name = name
    self.sampler = jax.jit(toy2d.TOYS[name], static_argnums=1)

  def __len__(self) -> int:
    return 2 ** 31 - 1

  # Toys of one name are the same distribution: equal and hashable by name (evaluation caches
  # its exact reference draws per toy).
  def __eq__(self, other):
    return isinstance(other, ToySource) and other.name == self.name

  def __hash__(self):
    return hash(('ToySource', self.name))

  def sample(self, key, n: int) -> np.ndarray:
    return np.asarray(self.sampler(key, n), np.float32)

  def batch(self, seed: int, step: int, global_batch: int, process_index: int = 0,
            process_count: int = 1) -> dict:
    rows = process_rows(global_batch, process_index, process_count)
    key = jax.random.fold_in(jax.random.key(seed), step)
    return {'image': self.sample(key, global_batch)[rows]}


def make_source(cfg: DataConfig):
  """The source named by `cfg.name`; a one-line ValueError naming the file or data_dir."""
  if cfg.image_size and cfg.name not in ('digits', 'tfds', 'folder'):
    raise ValueError(f'config.data.image_size={cfg.image_size}: only digits and '
                     f"data.name='tfds' or 'folder' are resized (a preset has its size)")
  if cfg.classes and cfg.name != 'digits':
    raise ValueError(f'config.data.classes={list(cfg.classes)}: only digits are filtered by '
                     f'class (data.name={cfg.name!r})')
  if cfg.name == 'digits':
    try:
      x, y = digits.load_digits(cfg.split, cfg.image_size or digits.IMAGE_SHAPE[0])
    except ValueError as e:
      raise ValueError(f'config.data.image_size={cfg.image_size}: {e}') from None
    if cfg.classes:
      if (len(set(cfg.classes)) != len(cfg.classes)
          or not all(c in range(digits.NUM_CLASSES) for c in cfg.classes)):
        raise ValueError(f'config.data.classes={list(cfg.classes)}: distinct digit classes in '
                         f'0..{digits.NUM_CLASSES - 1}')
      keep = np.isin(y, cfg.classes)
      x, y = x[keep], y[keep]
    return ArraySource(x, y, digits.NUM_CLASSES)
  if cfg.name == 'npy':
    return _npy_source(cfg)
  if cfg.name == 'latents':
    from diffusion_jax.data import latents  # pylint: disable=g-import-not-at-top (a cycle)
    if not cfg.path:
      raise ValueError("config.data.path: data.name='latents' needs the directory that "
                       'experiments.encode_latents wrote')
    return latents.load_latents(cfg.path)[0]
  if cfg.name == 'toy2d':
    return ToySource(cfg.toy)
  if cfg.name in AUDIO_DATASETS:
    from diffusion_jax.data import audio  # pylint: disable=g-import-not-at-top (tfds on demand)
    return audio.make_audio_source(cfg)
  if cfg.sample_rate or cfg.clip_length:
    key = 'sample_rate' if cfg.sample_rate else 'clip_length'
    raise ValueError(f'config.data.{key}={getattr(cfg, key)}: only audio data '
                     f'({", ".join(AUDIO_DATASETS)}) has a {key}')
  if cfg.name == 'folder':
    return _folder_source(cfg)
  if cfg.name in tfds_images.PRESETS or cfg.name == 'tfds':
    if cfg.data_dir and not os.path.isdir(cfg.data_dir):
      raise ValueError(f'config.data.data_dir={cfg.data_dir}: no such directory (the folder that '
                       f'holds the prepared TFDS data; see "Preparing TFDS data" in the README)')
    preset = cfg.name
    if cfg.name == 'tfds':
      if not cfg.tfds_name or cfg.image_size <= 0:
        raise ValueError("config.data: name='tfds' needs data.tfds_name and data.image_size")
      preset = tfds_images.Preset(cfg.tfds_name, cfg.image_size, cfg.label_key or None,
                                  cfg.num_classes, cfg.crop or None, image_key=cfg.image_key)
    source = tfds_images.ImageSource(preset, split=cfg.split, data_dir=cfg.data_dir or None,
                                     dequantize=cfg.dequantize, flip=cfg.flip)
    source.num_classes = source.preset.num_classes
    return source
  raise ValueError(f'config.data.name={cfg.name!r}: unknown; choose from {sorted(DATASETS)}')


def _folder_source(cfg: DataConfig) -> folder.FolderSource:
  if not cfg.path:
    raise ValueError("config.data.path: data.name='folder' needs the directory of your images")
  if cfg.split != 'train':
    raise ValueError(f"config.data.split={cfg.split!r}: data.name='folder' has one split, "
                     f"'train' (point data.path at another folder for held-out images)")
  for key in ('image_size', 'crop'):
    if getattr(cfg, key) < 0:
      raise ValueError(f'config.data.{key}={getattr(cfg, key)}: must be >= 0 (0 = the shorter '
                       f'side of the image)')
  return folder.FolderSource(cfg.path, cfg.image_size, cfg.crop, flip=bool(cfg.flip),
                             dequantize=cfg.dequantize)


def _npy_source(cfg: DataConfig) -> ArraySource:
  if not cfg.path:
    raise ValueError("config.data.path: data.name='npy' needs the path of an [N, H, W, C] .npy")
  images = _load_npy(cfg.path, 'config.data.path')
  labels = _load_npy(cfg.labels_path, 'config.data.labels_path') if cfg.labels_path else None
  num_classes = int(labels.max()) + 1 if labels is not None else 0
  return ArraySource(images, labels, num_classes)


def _load_npy(path: str, key: str) -> np.ndarray:
  path = os.path.expanduser(path)
  try:
    return np.load(path, mmap_mode='r')
  except (OSError, ValueError) as e:
    raise ValueError(f'{key}={path!r}: cannot read a .npy array ({e})') from None


class Prefetcher:
  """Iterates `make(step)` for `step` in `[start, stop)`, computing up to `depth` batches ahead
  on a background thread (host loading and the copy to devices overlap the train step). An
  exception in `make` is raised by the iterator at that step."""

  def __init__(self, make, start: int, stop: int, depth: int = 2):
    self._queue = queue.Queue(maxsize=max(depth, 1))
    self._stop = threading.Event()
    self._remaining = max(stop - start, 0)

    def work():
      for step in range(start, stop):
        try:
          item = (step, make(step), None)
        except Exception as e:  # pylint: disable=broad-except  # re-raised in the consumer
          item = (step, None, e)
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
        if item[2] is not None or self._stop.is_set():
          return
    self._thread = threading.Thread(target=work, daemon=True)
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    if self._remaining == 0:
      raise StopIteration
    self._remaining -= 1
    step, value, error = self._queue.get()
    if error is not None:
      raise error
    return step, value

  def close(self):
    self._stop.set()
    self._thread.join(timeout=5)
