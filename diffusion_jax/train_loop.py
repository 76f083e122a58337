"""One explicit loop: init → restore → {train step, log, checkpoint} → sample → evaluate.

The same loop trains an autoencoder (a config with `objective.name='autoencoder'`; `latent`):
its step is the autoencoder's loss, and instead of sampling it reports the reconstruction of the
held-out split (`reconstructions.png`, PSNR in `eval.json`). A config with a `latent` section
runs latent diffusion's three stages (`latent_pipeline`).

`train_and_evaluate(config, workdir)` is what `python -m experiments.train` runs, in every
process of a run. Re-running it with the same work dir resumes from the newest readable
checkpoint; a finished run skips straight to sampling and evaluation. Everything the run leaves
is in `workdir` (written by process 0; every process takes part in checkpointing):

  run.lock          while a run is going: its pid and host (a second run refuses)
  config.json       the resolved config, written once when the run starts
  run.json          one record per start or resume: command line, git commit and dirty flag,
                    package versions, Python, host, devices and processes
  checkpoints/      orbax checkpoints (keep-N and keep-every-K, async), each with its `meta`
  metrics.jsonl     per interval: loss, grad_norm, lr, skipped, steps_per_sec, examples_per_sec
                    (device memory where the backend reports it); in-loop evaluations
                    (`in_loop/<metric>`); then the final evaluation (`eval/<metric>`)
  tensorboard/      the same scalars and the sample grids as TensorBoard event files, and
  wandb/            as a W&B run (offline by default), when `log.writers` names them
  grids/            step_<N>.png: samples with one fixed key every `log.sample_every` steps
  checkpoints_best/ with `eval.every`, the step with the best in-loop metric (orbax `best_fn`)
  samples.png       a grid of samples from the EMA parameters
  eval.json         the final evaluation (FD, its floor, classifier accuracy)

Sharding (DESIGN §5): one mesh over all devices of all processes; the global batch is split on
its `data` axis, each process loading only its rows; the state is replicated or FSDP-sharded
(`train.param_sharding`). The same global batch gives the same numbers on 1 or N devices.
Reliability: a non-finite update is skipped and counted (`train.max_consecutive_skips` in a row
stop the run with `training.TrainingDiverged`); SIGTERM / SIGUSR1 / SIGINT save the current step
and raise `preemption.Preempted`. One run per work dir (`workdir.WorkdirLock`); a rerun must have
the config of `config.json` (`workdir.check_config`: only `train.num_steps`, `sample.*` and
`eval.*` may differ), checked before anything is built, and a checkpoint of another config is a
`checkpointing.CheckpointMismatch`: nothing in the work dir is moved or rewritten. A failed save
raises `checkpointing.CheckpointSaveError` (the earlier steps are kept).
"""

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import tqdm

from diffusion_jax import checkpointing
from diffusion_jax import ema as ema_lib
from diffusion_jax import evaluation
from diffusion_jax import finetune
from diffusion_jax import generation
from diffusion_jax import images as images_lib
from diffusion_jax import latent
from diffusion_jax import metric_writer
from diffusion_jax import monitor as monitor_lib
from diffusion_jax import parallel
from diffusion_jax import preemption
from diffusion_jax import progressive
from diffusion_jax import run_config
from diffusion_jax import teacher as teacher_lib
from diffusion_jax import training
from diffusion_jax import workdir as workdir_lib
from diffusion_jax.configuration import ConfigError
from diffusion_jax.data import loader as data_loader
from diffusion_jax.generation import generate
from diffusion_jax.run_config import Setup
# The run's state (also reached through this module by experiments and tests).
from diffusion_jax.run_state import _checkpointer
from diffusion_jax.run_state import _optimizer_and_ema
from diffusion_jax.run_state import _step_fn
from diffusion_jax.run_state import abstract_state
from diffusion_jax.run_state import base_params
from diffusion_jax.run_state import build_setup
from diffusion_jax.run_state import init_state_fn
from diffusion_jax.run_state import posthoc_tracker
from diffusion_jax.run_state import pretrained_params
from diffusion_jax.run_state import teacher_params

log = logging.getLogger(__name__)

def prepare_workdir(workdir: str) -> str:
  """Creates `workdir` and checks it is writable; a one-line `ConfigError` otherwise."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  probe = os.path.join(workdir, f'.write_test_{os.getpid()}')
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, 'w', encoding='utf-8') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f'work dir {workdir} is not writable: {e.strerror or e}') from None
  return workdir


def load_checkpoint(config: ml_collections.ConfigDict, workdir: str, *, mesh=None, source=None,
                    step: int | None = None, best: bool = False):
  """`(setup, state, step)` from the newest readable checkpoint (or `step`) of a work dir, restored
  onto `mesh` (default: every device of this process group); with `best`, from
  `checkpoints_best/` (the in-loop evaluation's best step). Read-only: a step that does not
  match the config is skipped, never moved. Raises `CheckpointError` if none can be read.
  A latent diffusion run's setup is built on its latents (`<workdir>/latents`)."""
  if 'latent' in config and source is None:
    from diffusion_jax.data import latents as latents_lib  # pylint: disable=g-import-not-at-top
    try:
      source = latents_lib.load_latents(os.path.join(workdir, 'latents'))[0]
    except ValueError as e:
      raise ConfigError(str(e)) from None
  setup = build_setup(config, source=source)
  mesh = parallel.make_mesh() if mesh is None else mesh
  optimizer, ema_fn = _optimizer_and_ema(setup)
  init = init_state_fn(setup, optimizer, ema_fn)
  target = abstract_state(setup, mesh, init, jax.random.key(0))
  workdir = os.path.abspath(workdir)
  with _checkpointer(setup, workdir, read_only=True,
                    subdir='checkpoints_best' if best else 'checkpoints') as ckpt:
    with _pointing_at_the_run_config(workdir):
      if step is not None:
        return setup, ckpt.restore(step, target), int(step)
      state, step = ckpt.restore_latest(target)
    if state is None:
      raise checkpointing.CheckpointError(f'no checkpoint in {ckpt.directory}')
  return setup, state, step


class _pointing_at_the_run_config:  # pylint: disable=invalid-name
  """Adds to a `CheckpointMismatch` where the run's own config is."""

  def __init__(self, workdir: str):
    self.workdir = workdir

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None or not issubclass(exc_type, checkpointing.CheckpointMismatch):
      return False
    path = os.path.join(self.workdir, workdir_lib.CONFIG_NAME)
    hint = (f'it was written with another config: use the run\'s own, '
            f'{workdir_lib.json_config_flag(self.workdir)}' if os.path.exists(path) else
            'it was written with another config (its own is in the step\'s meta item; this work '
            'dir has no config.json)')
    raise checkpointing.CheckpointMismatch(f'{exc}; {hint}; nothing was moved',
                                           exc.step) from None


def checkpoint_meta(config, setup: Setup, step: int, mesh) -> dict:
  """What is saved beside the state: the resolved config, the data position and topology."""
  return {
      'step': int(step),
      'seed': int(config.seed),
      'data': {'name': setup.data.name, 'global_batch': setup.train.batch_size,
               'examples_seen': int(step) * setup.train.batch_size},
      'topology': {'process_count': jax.process_count(), 'device_count': int(mesh.devices.size),
                   'param_sharding': setup.train.param_sharding},
      'config': json.loads(config.to_json_best_effort()),
      **finetune.base_meta(getattr(setup, 'base', None)),
      **teacher_lib.teacher_meta(getattr(setup, 'teacher', None)),
  }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       source=None, decode=None) -> dict:
  """Trains, checkpoints, samples and evaluates; returns the evaluation dict.

  `source` replaces the configured training data (an object with `sources.ArraySource`'s
  interface); `decode(samples) -> images` maps samples to the configured data's images before
  the grid and the evaluation (latent diffusion's decoder; `latent_pipeline`). An autoencoder
  config (`objective.name='autoencoder'`) trains the autoencoder and reports its reconstruction
  of the held-out split instead of sampling. Raises `preemption.Preempted` after saving on
  SIGTERM / SIGUSR1, and `training.TrainingDiverged` after too many non-finite updates in a
  row.
  """
  if 'latent' in config and source is None:
    from diffusion_jax import latent_pipeline  # pylint: disable=g-import-not-at-top (a cycle)
    return latent_pipeline.run(config, workdir)
  workdir = prepare_workdir(workdir)
  is_main = jax.process_index() == 0
  lock = workdir_lib.WorkdirLock(workdir) if is_main else None
  if lock is not None:
    lock.acquire()
  try:
    workdir_lib.check_config(config, workdir,
                             run_config.section_defaults(config.model.get('name')))
    return _train_and_evaluate(config, workdir, source, lock, decode)
  finally:
    if lock is not None:
      lock.release()


def _train_and_evaluate(config, workdir: str, source, lock, decode) -> dict:
  setup = build_setup(config, source=source)
  train = setup.train
  mesh = parallel.make_mesh()
  width = mesh.devices.size
  if train.batch_size % (width * train.grad_accum_steps):
    raise ConfigError(f'config.train.batch_size={train.batch_size}: must be divisible by the '
                      f'{width} devices x train.grad_accum_steps={train.grad_accum_steps}')

  optimizer, ema_fn = _optimizer_and_ema(setup)
  root = jax.random.key(config.seed)
  k_init, k_sample = jax.random.split(root)
  init = init_state_fn(setup, optimizer, ema_fn)
  target = abstract_state(setup, mesh, init, k_init)

  ckpt = _checkpointer(setup, workdir)
  try:
    return _resume_and_run(config, setup, mesh, workdir, ckpt, lock, init, target, k_init,
                           k_sample, decode)
  except BaseException:
    # Failing already: orbax gets a bounded time (a failed save must not hang the exit).
    ckpt.close(timeout=checkpointing.CLOSE_AFTER_FAILURE_S)
    raise


def _resume_and_run(config, setup: Setup, mesh, workdir, ckpt, lock, init, target, k_init,
                    k_sample, decode) -> dict:
  """Restores (or initialises), trains, closes the checkpointer, samples and evaluates."""
  is_main = lock is not None
  train, num_steps = setup.train, setup.train.num_steps
  optimizer, ema_fn = _optimizer_and_ema(setup)
  state_sh = jax.tree.map(lambda a: a.sharding, target)
  with _pointing_at_the_run_config(workdir):
    state, restored_step = ckpt.restore_latest(target)   # onto this run's shardings
  if is_main:
    workdir_lib.write_config(config, workdir)   # a fresh run's (an existing one is kept)
    workdir_lib.append_run_record(workdir, workdir_lib.run_record(mesh))  # code, versions, host
  if state is None:
    base = base_params(setup)
    pretrained = None if base is not None else pretrained_params(setup)
    extra = {k: v for k, v in (('pretrained', pretrained), ('base', base),
                               ('teacher', teacher_params(setup))) if v is not None}
    state = jax.jit(init, out_shardings=state_sh)(k_init, **extra)
    if getattr(setup, 'base', None) is not None and is_main:
      print(f'Starting from the trained run {setup.base.config.workdir}', flush=True)
  else:
    _check_resume_meta(ckpt.read_meta(restored_step), config, setup)
    log.info('resumed from checkpoint step %d in %s', restored_step, ckpt.directory)
    if is_main:
      print(f'Resuming from checkpoint step {restored_step} ({ckpt.directory})', flush=True)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  start = int(parallel.local_value(state.step))
  if start > num_steps:
    raise ConfigError(f'config.train.num_steps={num_steps} is below the checkpointed step '
                      f'{start} in {ckpt.directory}; raise it or use a new work dir')
  writer = (metric_writer.make_writers(
      metric_writer.parse_writers(setup.log.writers), workdir,
      resume_step=start if restored_step is not None else 0,
      config=json.loads(config.to_json_best_effort()), wandb_project=setup.log.wandb_project,
      wandb_mode=setup.log.wandb_mode) if is_main else None)

  rows = parallel.batch_sharding(mesh)
  micro = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, parallel.DATA_AXIS))
  step_fn = _step_fn(setup, optimizer, ema_fn, micro)
  train_step = jax.jit(step_fn, in_shardings=(state_sh, rows),
                       out_shardings=(state_sh, parallel.replicated(mesh)), donate_argnums=(0,))
  cond_key = getattr(setup, 'cond_key', None)
  keys = ('image', cond_key) if cond_key else ('image',)

  def place(local):      # this process's rows -> the global batch on the mesh
    return parallel.global_batch({k: local[k] for k in keys}, rows, train.batch_size)

  def load(start, stop):
    """The batches of steps [start, stop), read by grain (`train.data_workers` processes, 0:
    in this process) and placed on the devices on a background thread, `train.prefetch`
    steps ahead; the same arrays as `source.batch(seed, step, ...)`."""
    source = progressive.stage_source(setup.source, train.resolution_schedule, train.batch_size)
    return data_loader.batches(source, config.seed, train.batch_size, start, stop,
                               jax.process_index(), jax.process_count(),
                               num_workers=train.data_workers, prefetch=train.prefetch,
                               finish=place)

  if is_main:
    print(f'Model: {type(setup.model).__name__}, {n_params / 1e6:.2f} M parameters; '
          f'{num_steps} steps at batch {train.batch_size} on {parallel.describe(mesh)}',
          flush=True)
    warmup = setup.optim.warmup_steps
    if warmup > num_steps:        # allowed (the run may be extended later), but said
      peak = training.learning_rate_schedule(setup.optim, num_steps)(num_steps)
      print(f'Note: optim.warmup_steps={warmup} > train.num_steps={num_steps}: the learning '
            f'rate peaks at {float(peak):.3g}, {float(peak) / setup.optim.lr:.0%} of optim.lr',
            flush=True)

  force_exit = lock.release if lock is not None else None
  with preemption.PreemptionWatcher(on_force_exit=force_exit) as watcher:
    run = _Run(setup, mesh, workdir, ckpt, writer, watcher,
               lambda step: checkpoint_meta(config, setup, step, mesh), decode)
    monitor = monitor_lib.Monitor(run, k_sample)
    try:
      state = _train(run, state, train_step, load, start, monitor)
      ckpt.close()
      monitor.close()
      if isinstance(setup, latent.AutoencoderSetup):
        result = _evaluate_autoencoder(run, state, n_params)
      else:
        result = _sample_and_evaluate(run, state, k_sample, n_params, monitor)
      return result
    except BaseException:
      monitor.close(timeout=checkpointing.CLOSE_AFTER_FAILURE_S)
      raise
    finally:
      if writer is not None:
        writer.close()


def _check_resume_meta(meta, config, setup: Setup) -> None:
  """Warns when the checkpoint was written with another seed or batch: the data order (a
  function of both) then differs from that of an uninterrupted run."""
  if not meta:
    return
  saved = (meta.get('seed'), meta.get('data', {}).get('global_batch'))
  if saved != (config.seed, setup.train.batch_size):
    log.warning('checkpoint was written with seed=%s, batch=%s; this run has seed=%s, batch=%s: '
                'the data order differs from an uninterrupted run', *saved, config.seed,
                setup.train.batch_size)


@dataclasses.dataclass(frozen=True)
class _Run:
  """What the loop's phases share: the setup, where it runs and what it writes to."""
  setup: Setup
  mesh: Any
  workdir: str
  ckpt: checkpointing.Checkpointer
  writer: metric_writer.MultiWriter | None    # process 0 only
  watcher: preemption.PreemptionWatcher
  meta: Callable[[int], dict]                 # step -> the checkpoint's `meta` item
  decode: Callable | None = None              # samples -> images (latent diffusion)

  @property
  def is_main(self) -> bool:
    return self.writer is not None


def _train(run: _Run, state, train_step, load, start: int, monitor: monitor_lib.Monitor):
  setup, ckpt, writer, watcher, meta = run.setup, run.ckpt, run.writer, run.watcher, run.meta
  is_main = run.is_main
  train = setup.train
  num_steps = train.num_steps
  t0 = time.time()
  bar = tqdm.tqdm(total=num_steps, initial=start, desc='train', unit='step', dynamic_ncols=True,
                  mininterval=1.0, disable=not is_main)
  running, last_saved = [], None
  interval_monitor = monitor.seconds
  # steps/s over each logging interval, timed here: tqdm's smoothed rate went stale (it read
  # 0.016 while the run did ~2 steps/s).
  interval_start = time.perf_counter()
  schedule = training.learning_rate_schedule(setup.optim, num_steps)
  batches = load(start, num_steps)
  trace = monitor_lib.Trace(setup.profile.steps, os.path.join(run.workdir, 'profile'))
  try:
    for step, batch in batches:
      ckpt.poll()                 # a failed background save stops the run now
      switch = progressive.switch_message(train.resolution_schedule, step, start)
      if switch and is_main:      # a new resolution: the train step compiles for it, once
        bar.write(switch)
      trace.before(step)
      state, metrics = train_step(state, batch)
      # Wait for the step: the progress bar's rate and ETA then measure compute, not dispatch.
      m = parallel.local_value(metrics)
      done = step + 1
      trace.after(done)
      if m['skipped']:
        log.warning('step %d: non-finite loss or gradient (loss=%s); update skipped', done,
                    m['loss'])
        streak = int(m['consecutive_skips'])
        if streak >= train.max_consecutive_skips:
          ckpt.wait()
          saved = ckpt.all_steps()
          raise training.TrainingDiverged(
              f'training stopped at step {done}: {streak} consecutive updates had a non-finite '
              f'loss or gradient (train.max_consecutive_skips={train.max_consecutive_skips}); '
              f'parameters are those of the last finite update at step {done - streak}; '
              f'newest checkpoint: {f"step {saved[-1]}" if saved else "none"} in '
              f'{ckpt.directory}')
      running.append(m)
      if done % train.log_every == 0 or done == num_steps:
        now = time.perf_counter()
        scalars = _interval_scalars(running)
        # Training alone: the time of grids and evaluations in the interval is left out.
        busy = now - interval_start - (monitor.seconds - interval_monitor)
        scalars['steps_per_sec'] = len(running) / max(busy, 1e-9)
        scalars['examples_per_sec'] = scalars['steps_per_sec'] * train.batch_size
        # The rate of the interval's last applied update: optax counts applied updates only
        # (a skipped step leaves the optimizer state as it was).
        applied = done - int(m['skipped_total'])
        scalars['lr'] = float(schedule(max(applied - 1, 0)))
        scalars.update(monitor_lib.memory_scalars())
        running, interval_start, interval_monitor = [], now, monitor.seconds
        if writer is not None:
          writer.write(done, scalars)
        bar.set_postfix(loss=f'{scalars["loss"]:.4f}', refresh=False)
      if done % train.checkpoint_every == 0 or done == num_steps:
        ckpt.save(done, state, meta(done))
        last_saved = done
      if train.posthoc_sigma_rels and (done % train.posthoc_every == 0 or done == num_steps):
        _save_posthoc_snapshot(run, done, state)
      if monitor.due(done):
        line = monitor(done, state)
        if line and is_main:
          bar.write(line)
      bar.update(1)
      if watcher.should_stop():
        if last_saved != done:
          ckpt.save(done, state, meta(done))
        ckpt.wait()
        raise preemption.Preempted(
            f'{watcher.signal_name} received: checkpoint saved at step {done} in '
            f'{ckpt.directory}; rerun (or requeue) to resume', step=done)
  finally:
    trace.close()
    batches.close()
    bar.close()
  ckpt.wait()
  seconds = time.time() - t0
  monitor.train_seconds = seconds - monitor.seconds
  if start < num_steps and is_main:
    print(f'Trained steps {start}..{num_steps} in {seconds:.1f} s '
          f'({(num_steps - start) / max(seconds - monitor.seconds, 1e-9):.2f} steps/s)'
          + (f'; in-loop grids and evaluations took {monitor.seconds:.1f} s, '
             f'{monitor.seconds / max(seconds - monitor.seconds, 1e-9):.1%} of the training '
             f'time' if monitor.seconds else ''), flush=True)
  return state


def _save_posthoc_snapshot(run: _Run, step: int, state) -> None:
  """The tracked power-function EMAs at `step`, one file per profile in
  `<workdir>/posthoc_ema/` (a collective gather; process 0 writes)."""
  tracked = parallel.to_host(state.posthoc_ema)
  gammas = posthoc_tracker(run.setup).gammas
  ema_lib.save_snapshot(os.path.join(run.workdir, ema_lib.SNAPSHOT_SUBDIR), step, gammas,
                        tracked)


def _interval_scalars(running) -> dict:
  """Means over the interval's finite updates of every metric the step reports (loss,
  grad_norm, and a loss's own terms); `skipped` counts the others."""
  good = [m for m in running if not m['skipped']]
  counters = ('skipped', 'skipped_total', 'consecutive_skips')
  scalars = {k: float(np.mean([m[k] for m in good])) if good else float('nan')
             for k in running[-1] if k not in counters}
  scalars['skipped'] = int(sum(int(m['skipped']) for m in running))
  scalars['skipped_total'] = int(running[-1]['skipped_total'])
  return scalars


def _sample_and_evaluate(run: _Run, state, k_sample, n_params,
                         monitor: monitor_lib.Monitor) -> dict:
  """Samples from the EMA parameters, saves the grid, and evaluates (process 0)."""
  setup, mesh, workdir, writer, watcher = run.setup, run.mesh, run.workdir, run.writer, run.watcher
  is_main = run.is_main
  s = setup.sample
  num = max(setup.eval.num_samples if setup.eval.enabled else 0, s.grid_size)
  result = {'step': setup.train.num_steps, 'num_params': int(n_params)}
  if num == 0:
    return result
  t1 = time.time()
  sample_fn = monitor.sample_fn   # compiled once, shared with the in-loop grids and evaluations
  conditions = generation.sample_conditions(setup, num)
  try:
    samples = generate(sample_fn, state.ema_params, k_sample, num, s.batch_size,
                       setup.image_shape, conditions.cond, mesh=mesh,
                       interrupt=watcher.should_stop)
  except generation.Interrupted as e:
    raise preemption.Preempted(f'{watcher.signal_name} received: {e}; training is checkpointed, '
                               f'rerun to sample', step=setup.train.num_steps) from None
  if run.decode is not None:
    samples = parallel.map_batches(run.decode, samples, s.batch_size, mesh)
  sample_seconds = time.time() - t1
  if is_main:
    what = 'clips' if len(setup.image_shape) == 2 else 'images'
    print(f'Sampled {num} {what} with {s.sampler} ({s.steps} steps) in {sample_seconds:.1f} s',
          flush=True)
    path = os.path.join(workdir, 'samples.png')
    save = getattr(setup.condition, 'save', None)
    if save is not None:                         # audio: WAV files and spectrograms
      save(workdir, samples[:s.grid_size], conditions.head(s.grid_size).references)
    elif len(setup.image_shape) == 1:                            # 2-D points
      images_lib.save_scatter_png(path, samples[:s.grid_size],
                                  title=f'{s.sampler}, {s.steps} steps')
    else:
      images_lib.save_png(path, images_lib.make_grid(samples[:s.grid_size], ncol=10))
    np.save(os.path.join(workdir, 'samples.npy'), samples[:s.grid_size])
    if conditions.prompts is not None:      # the grid's prompts, row by row
      with open(os.path.join(workdir, 'prompts.txt'), 'w', encoding='utf-8') as f:
        f.writelines(f'{i}: {t}\n' for i, t in enumerate(conditions.prompts.texts[:s.grid_size]))

  result['sample_seconds'] = sample_seconds
  if monitor.train_seconds:
    result['train_seconds'] = monitor.train_seconds
  if monitor.seconds:
    result['in_loop_eval_seconds'] = monitor.seconds
  best = monitor.best_step()
  if best is not None:
    result['best_step'] = best
  n = setup.eval.num_samples
  if setup.eval.enabled and setup.data.name not in evaluation.EVALUATED:   # FID (collective)
    result.update(monitor.metric(samples[:n]))
  elif setup.eval.enabled and is_main:
    head = conditions.head(n)
    result.update(evaluation.evaluate_samples(
        setup.data.name, setup.source, samples[:n], head.labels,
        setup.eval.cache_dir or os.path.join(workdir, 'cache'), prompts=head.prompts,
        digits_clip_steps=setup.eval.digits_clip_steps))
    if 'fd' in result:
      result['fd_ratio'] = result['fd'] / result['fd_floor']
  condition = getattr(setup, 'condition', None)
  if setup.eval.enabled and is_main and condition is not None and condition.metrics is not None:
    head = conditions.head(n)     # samples scored against the conditions they were given
    result.update(condition.metrics(samples[:n], head.cond))
  if (setup.eval.enabled and is_main and condition is not None
      and condition.reference_metrics is not None):
    head = conditions.head(n)     # samples scored against the held-out examples themselves
    result.update(condition.reference_metrics(samples[:n], head.references))
  if is_main:
    writer.write(setup.train.num_steps,
                 {f'eval/{k}': v for k, v in result.items() if k != 'step'})
    with open(os.path.join(workdir, 'eval.json'), 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=2)
  return result


def _evaluate_autoencoder(run: _Run, state, n_params) -> dict:
  """Reconstructions of the held-out split (`eval.num_samples` images, the first of the
  split) by the EMA parameters: PSNR, MSE, MAE; `reconstructions.png` shows originals (odd
  rows) above their reconstructions (even rows)."""
  setup, workdir, writer = run.setup, run.workdir, run.writer
  result = {'step': setup.train.num_steps, 'num_params': int(n_params)}
  if not setup.eval.enabled:
    return result
  x, x_hat = monitor_lib.reconstruct(run, state, setup.eval.num_samples)
  n = len(x)
  result.update({f'reconstruction_{k}': v
                 for k, v in latent.reconstruction_metrics(x, x_hat).items()})
  result['num_reconstructed'] = n
  if run.is_main:
    images_lib.save_png(os.path.join(workdir, 'reconstructions.png'),
                        images_lib.make_grid(monitor_lib.reconstruction_grid(x, x_hat), ncol=10))
    writer.write(setup.train.num_steps,
                 {f'eval/{k}': v for k, v in result.items() if k != 'step'})
    with open(os.path.join(workdir, 'eval.json'), 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=2)
  return result


def format_eval_line(result: dict) -> str:
  """The run's one-line evaluation summary (`evaluation.format_eval_line`)."""
  return evaluation.format_eval_line(result)
