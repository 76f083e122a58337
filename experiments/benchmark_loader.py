r"""Examples/s of the training data loader alone (no model): `source.batch` on the prefetching
thread (`sources.Prefetcher`, what the training loop uses with `train.data_workers=0`) against
grain (`data.loader.batches`) with 0, 1, 2 worker processes.

  python -m experiments.benchmark_loader [--examples=5000] [--batch=128] [--steps=40]
      [--warmup=4] [--repeats=3] [--workers=0,1,2] [--threads=0,2]
      [--datasets=mock_cifar10,png_folder] [--paths=thread,grain]
      [--output=docs/loader_benchmark.md]

Data sets of `--examples` 32x32x3 images:
  mock_cifar10  `tfds.testing.mock_data` behind `tfds.data_source` (preset cifar10, flips on):
                TFDS's mock hands out random examples already decoded, so a read costs the
                mock's generator, not a PNG decode.
  png_folder    that many random 32x32 PNG files in a temporary directory (`data.name='folder'`,
                flips on): each read opens and decodes a file, as with your own images.
Every configuration loads `--warmup` batches untimed (worker start-up and imports), then
`--steps` batches timed; the table gives the median examples/s of `--repeats` runs, their range,
and the seconds to the first batch. Each grain configuration's first timed batch is checked to
equal `source.batch` at that step.
`--paths=thread --datasets=mock_cifar10` runs without `data.loader` and `data.folder`, so the same
command measures an older checkout (before: two reads per example).
"""

import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from experiments import cli

_EXAMPLES = flags.DEFINE_integer('examples', 5000, 'Images per data set.')
_BATCH = flags.DEFINE_integer('batch', 128, 'Global batch size.')
_STEPS = flags.DEFINE_integer('steps', 40, 'Timed batches per run.', lower_bound=1)
_WARMUP = flags.DEFINE_integer('warmup', 4, 'Untimed batches before the timed ones.',
                               lower_bound=1)
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Runs per configuration (median reported).')
_WORKERS = flags.DEFINE_list('workers', ['0', '1', '2'], 'grain worker processes to try.')
_THREADS = flags.DEFINE_list('threads', ['0', '2'], 'grain read threads to try (0 workers).')
_DATASETS = flags.DEFINE_list('datasets', ['mock_cifar10', 'png_folder'], 'Data sets.')
_PATHS = flags.DEFINE_list('paths', ['thread', 'grain'], 'Loaders: thread, grain.')
_OUTPUT = flags.DEFINE_string('output', 'docs/loader_benchmark.md', 'Markdown ("" = none).')

SEED = 0


def machine() -> str:
  return f'{cli.cpu_name()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}'


def _png_folder(root: str, n: int) -> str:
  rng = np.random.default_rng(0)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for i in range(n):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(
        os.path.join(root, f'{i:06d}.png'))
  return root


def _thread_batches(source, stop):
  from diffusion_jax.data import sources  # pylint: disable=g-import-not-at-top
  return sources.Prefetcher(lambda step: source.batch(SEED, step, _BATCH.value), 0, stop, 2)


def _grain_batches(source, stop, workers, threads):
  from diffusion_jax.data import loader  # pylint: disable=g-import-not-at-top
  return loader.batches(source, SEED, _BATCH.value, 0, stop, num_workers=workers,
                        num_threads=threads, prefetch=2)


def _run(make, source, check: bool) -> tuple[float, float]:
  """`(examples/s over the timed batches, seconds to the first batch)` of one loader."""
  stop = _WARMUP.value + _STEPS.value
  t0 = time.perf_counter()
  it = make(stop)
  try:
    first = None
    for _ in range(_WARMUP.value):
      next(it)
      first = first or time.perf_counter() - t0
    t1 = time.perf_counter()
    kept = next(it)
    for _ in range(_STEPS.value - 1):
      next(it)
    elapsed = time.perf_counter() - t1
  finally:
    it.close()
  if check:     # after the timing, so that it does not compete with the loader
    step, batch = kept
    for k, v in source.batch(SEED, step, _BATCH.value).items():
      np.testing.assert_array_equal(batch[k], v, err_msg=f'step {step}, {k}')
  return _STEPS.value * _BATCH.value / elapsed, first


def _configs():
  out = []
  if 'thread' in _PATHS.value:
    out.append(('thread (source.batch)', 0, 0))
  if 'grain' in _PATHS.value:
    for w in map(int, _WORKERS.value):
      for t in (map(int, _THREADS.value) if w == 0 else (0,)):
        out.append(('grain', w, t))
  return out


def _open(name, tmp):
  from diffusion_jax.data import sources  # pylint: disable=g-import-not-at-top
  if name == 'mock_cifar10':
    from diffusion_jax.data import tfds_images  # pylint: disable=g-import-not-at-top
    return tfds_images.ImageSource('cifar10', flip=True)
  if name == 'png_folder':
    root = _png_folder(tempfile.mkdtemp(dir=tmp), _EXAMPLES.value)
    return sources.make_source(sources.DataConfig(name='folder', path=root, flip=True))
  raise app.UsageError(f'--datasets: unknown {name!r}; choose from mock_cifar10, png_folder')


def main(argv):
  del argv
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  rows = []
  with tempfile.TemporaryDirectory() as tmp, tfds.testing.mock_data(
      num_examples=_EXAMPLES.value):
    for name in _DATASETS.value:
      source = _open(name, tmp)
      for label, workers, threads in _configs():
        rates, firsts = [], []
        for _ in range(_REPEATS.value):
          if label == 'grain':
            make = lambda stop, w=workers, t=threads: _grain_batches(source, stop, w, t)
          else:
            make = lambda stop: _thread_batches(source, stop)
          rate, first = _run(make, source, check=label == 'grain')
          rates.append(rate)
          firsts.append(first)
        row = dict(data=name, path=label, workers=workers if label == 'grain' else '—',
                   threads=threads if label == 'grain' else '—',
                   rate=statistics.median(rates), lo=min(rates), hi=max(rates),
                   first=statistics.median(firsts))
        rows.append(row)
        print(f"{name:13s} {label:22s} workers {row['workers']} threads {row['threads']}: "
              f"{row['rate']:8.0f} examples/s ({row['lo']:.0f}-{row['hi']:.0f}), first batch "
              f"{row['first']:.2f} s", flush=True)
  text = table(rows)
  print(text)
  if _OUTPUT.value:
    os.makedirs(os.path.dirname(_OUTPUT.value) or '.', exist_ok=True)
    with open(_OUTPUT.value, 'w', encoding='utf-8') as f:
      f.write(f'# Data loader benchmark\n\n{datetime.date.today()}, {machine()}; batch '
              f'{_BATCH.value}, {_STEPS.value} timed batches after {_WARMUP.value} untimed, '
              f'median of {_REPEATS.value} runs.\n\n'
              f'    python -m experiments.benchmark_loader {" ".join(sys.argv[1:])}\n\n'
              f'{text}\n')


def table(rows) -> str:
  lines = ['| data | loader | workers | read threads | examples/s | range | first batch (s) |',
           '|---|---|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(f"| {r['data']} | {r['path']} | {r['workers']} | {r['threads']} | "
                 f"{r['rate']:.0f} | {r['lo']:.0f}–{r['hi']:.0f} | {r['first']:.2f} |")
  return '\n'.join(lines)


if __name__ == '__main__':
  app.run(main)
