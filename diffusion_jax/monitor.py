"""What the training loop shows while it trains: sample grids, in-loop evaluations with the best
checkpoint, device memory (`Monitor`, `memory_scalars`), a profiler window (`Trace`), and the
autoencoder's held-out reconstructions (`reconstruct`, `reconstruction_grid`) that both the
grids and the final evaluation use.

`run` is the loop's `train_loop._Run`: the setup, mesh, work dir, writer (process 0), preemption
watcher, checkpoint meta and the latent decoder.
"""

import dataclasses
import logging
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from diffusion_jax import checkpointing
from diffusion_jax import evaluation
from diffusion_jax import finetune
from diffusion_jax import generation
from diffusion_jax import images as images_lib
from diffusion_jax import latent
from diffusion_jax import parallel
from diffusion_jax.data import sources
from diffusion_jax.generation import generate
from diffusion_jax.generation import make_sample_fn

log = logging.getLogger(__name__)


class Trace:
  """A `jax.profiler` trace of train steps `[start, stop)` into `directory` (each process
  writes its own host's file under `plugins/profile/<time>/`, as TensorBoard reads them)."""

  def __init__(self, steps, directory: str):
    self.window = tuple(steps) if steps else None
    self.directory = directory
    self.active = False

  def before(self, step: int) -> None:
    if self.window and step == self.window[0]:
      jax.profiler.start_trace(self.directory)
      self.active = True

  def after(self, done: int) -> None:
    if self.active and done >= self.window[1]:   # `done` waited for the step's results
      self.close()
      log.info('profile of steps %d..%d written to %s', *self.window, self.directory)

  def close(self) -> None:
    if self.active:
      self.active = False
      jax.profiler.stop_trace()


def memory_scalars() -> dict:
  """Device memory of this process's first device, in GiB, where the backend reports it (GPU,
  TPU; the CPU backend reports none)."""
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except  # a backend without the call
    return {}
  out = {}
  for key, name in (('bytes_in_use', 'memory_gib'), ('peak_bytes_in_use', 'peak_memory_gib')):
    if key in stats:
      out[name] = stats[key] / 2**30
  return out


class Monitor:
  """What the loop shows while it trains: every `log.sample_every` steps a grid of samples from
  the EMA parameters with one fixed key (an autoencoder: reconstructions of the first held-out
  images), to `grids/step_<N>.png` and the writers; every `eval.every` steps the sample metric
  (`evaluation.SampleMetric`; an autoencoder: held-out PSNR) of `eval.every_num_samples`
  samples, also with one fixed key, logged as `in_loop/<metric>`, and with `eval.keep_best` the
  state saved to `checkpoints_best/` where orbax keeps the best step. `seconds` is the time
  spent here (left out of steps/s)."""

  def __init__(self, run, k_sample):
    self.run = run
    setup = run.setup
    self.grid_every = setup.log.sample_every
    self.eval_every = setup.eval.every if setup.eval.enabled else 0
    self.k_grid = jax.random.fold_in(k_sample, 1)
    self.k_eval = jax.random.fold_in(k_sample, 2)
    self.seconds = 0.0
    self.train_seconds = 0.0
    self.autoencoder = isinstance(setup, latent.AutoencoderSetup)
    self._metric = None
    self._sample_fn = None
    self.best = None
    if self.eval_every and setup.eval.keep_best:
      name, mode = (('reconstruction_psnr', 'max') if self.autoencoder
                    else (evaluation.metric_name(setup.data.name), 'min'))
      self.best = checkpointing.Checkpointer(os.path.join(run.workdir, 'checkpoints_best'),
                                             max_to_keep=1, best_metric=name, best_mode=mode,
                                             view=finetune.setup_view(setup))

  @property
  def metric(self):
    """The sample metric (built once; on process 0 only unless it is a collective, FID)."""
    if self._metric is None:
      setup = self.run.setup
      ev = setup.eval
      self._metric = evaluation.SampleMetric(
          setup.data.name, setup.source, ev.cache_dir or os.path.join(self.run.workdir, 'cache'),
          reference_stats=ev.reference_stats, inception_weights=ev.inception_weights,
          inception_sha256=ev.inception_sha256, mesh=self.run.mesh,
          digits_clip_steps=ev.digits_clip_steps)
    return self._metric

  @property
  def sample_fn(self):
    """The configured sampler, compiled once for the grids, the evaluations and the final
    samples (`generation.make_sample_fn`)."""
    if self._sample_fn is None:
      self._sample_fn = make_sample_fn(self.run.setup)
    return self._sample_fn

  def due(self, done: int) -> bool:
    return bool((self.grid_every and done % self.grid_every == 0)
                or (self.eval_every and done % self.eval_every == 0))

  def __call__(self, done: int, state) -> str:
    """Writes the grid and / or the evaluation due at step `done`; returns a line to show."""
    t0 = time.perf_counter()
    line = ''
    try:
      if self.grid_every and done % self.grid_every == 0:
        self._grid(done, state)
      if self.eval_every and done % self.eval_every == 0:
        line = self._evaluate(done, state)
    except generation.Interrupted:
      line = f'step {done}: sampling interrupted by {self.run.watcher.signal_name}'
    self.seconds += time.perf_counter() - t0
    return line

  def _samples(self, state, key, num: int):
    setup = self.run.setup
    conditions = generation.sample_conditions(setup, num)
    x = generate(self.sample_fn, state.ema_params, key, num, min(setup.sample.batch_size, num),
                 setup.image_shape, conditions.cond, mesh=self.run.mesh,
                 interrupt=self.run.watcher.should_stop)
    if self.run.decode is not None:
      x = parallel.map_batches(self.run.decode, x, setup.sample.batch_size, self.run.mesh)
    return x, conditions

  def _grid(self, done: int, state) -> None:
    run = self.run
    if self.autoencoder:
      x, x_hat = reconstruct(run, state, min(self.run.setup.log.grid_size, 50))
      grid = reconstruction_grid(x, x_hat)
    else:   # 2-D points: a scatter of 1,000
      num = run.setup.log.grid_size if len(run.setup.image_shape) > 1 else 1000
      x, conditions = self._samples(state, self.k_grid, num)
    if not run.is_main:
      return
    save = getattr(getattr(run.setup, 'condition', None), 'save', None)
    if save is not None and not self.autoencoder:    # audio: grids/step_<N>/audio/*.wav, *.png
      save(os.path.join(run.workdir, 'grids', f'step_{done:07d}'), x, conditions.references)
      return
    os.makedirs(os.path.join(run.workdir, 'grids'), exist_ok=True)
    path = os.path.join(run.workdir, 'grids', f'step_{done:07d}.png')
    if self.autoencoder:
      images_lib.save_png(path, images_lib.make_grid(grid, ncol=10))
    elif len(run.setup.image_shape) == 1:
      images_lib.save_scatter_png(path, x, title=f'step {done}')
    else:
      images_lib.save_png(path, images_lib.make_grid(x, ncol=int(np.ceil(np.sqrt(len(x))))))
    run.writer.write_images(done, {'samples': images_lib.read_png(path)})

  def _evaluate(self, done: int, state) -> str:
    run, setup = self.run, self.run.setup
    t0 = time.perf_counter()
    num = setup.eval.every_num_samples or setup.eval.num_samples
    if self.autoencoder:
      x, x_hat = reconstruct(run, state, num)
      result = {f'reconstruction_{k}': v
                for k, v in latent.reconstruction_metrics(x, x_hat).items()}
      name = 'reconstruction_psnr'
    else:
      samples, conditions = self._samples(state, self.k_eval, num)
      name = evaluation.metric_name(setup.data.name)
      result = (self.metric(samples, conditions.labels, prompts=conditions.prompts)
                if run.is_main or self._collective else {})
    value = result.get(name, float('nan'))
    if jax.process_count() > 1:       # every process saves the best step with the same value
      value = float(multihost_utils.broadcast_one_to_all(np.float64(value)))
    seconds = time.perf_counter() - t0
    if self.best is not None:
      self.best.save(done, state, run.meta(done), metrics={self.best.best_metric: value})
    if not run.is_main:
      return ''
    scalars = {f'in_loop/{k}': v for k, v in result.items()
               if isinstance(v, (int, float, np.floating)) and not isinstance(v, bool)}
    scalars['in_loop/seconds'] = seconds
    run.writer.write(done, scalars)
    return (f'eval step {done}: {name}={value:.4g} ({num} samples, {seconds:.1f} s)'
            + (f', best so far: step {self.best_step()}' if self.best is not None else ''))

  @property
  def _collective(self) -> bool:
    """Whether every process computes the metric (FID's Inception runs over the whole mesh)."""
    setup = self.run.setup
    return bool(setup.eval.reference_stats and setup.eval.inception_weights)

  def best_step(self):
    if self.best is None:
      return None
    self.best.wait()
    steps = self.best.all_steps()
    return steps[-1] if steps else None

  def close(self, timeout: float | None = None) -> None:
    if self.best is not None:
      self.best.close(timeout=timeout)


def reconstruct(run, state, num: int):
  """`(x, x_hat)`: the first `num` held-out images (the training data if there is no test
  split) and their reconstructions by the autoencoder's EMA parameters."""
  setup = run.setup
  held_out = dataclasses.replace(setup.data, split='test')
  try:
    test = sources.make_source(held_out)
  except ValueError:   # no test split: the training data
    test = setup.source
  n = min(num, len(test))
  x = test.examples(np.arange(n))['image']
  encode = latent.encoder(setup, state.ema_params, state.model_state)
  decode = latent.decoder(setup, state.ema_params, state.model_state)
  return x, parallel.map_batches(lambda x: decode(encode(x)), x, 256, run.mesh)


def reconstruction_grid(x, x_hat) -> np.ndarray:
  """Up to 50 originals (odd rows) above their reconstructions (even rows), 10 per row."""
  m = min(len(x), 50)
  if m < 10:
    return x_hat[:m]
  return np.concatenate([np.stack([x[i:i + 10], x_hat[i:i + 10]]).reshape(-1, *x.shape[1:])
                         for i in range(0, m - m % 10, 10)])
