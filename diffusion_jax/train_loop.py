"""One explicit loop: init → restore → {train step, log, checkpoint} → sample → evaluate.

`train_and_evaluate(config, workdir)` is what `python -m experiments.train` runs. Re-running it
with the same work dir resumes from the newest readable checkpoint; a finished run skips
straight to sampling and evaluation. Everything the run leaves is in `workdir`:

  config.json       the resolved config
  checkpoints/      orbax checkpoints (keep-N, async)
  metrics.jsonl     training scalars and the final evaluation
  samples.png       a grid of samples from the EMA parameters
  eval.json         the final evaluation (FD, its floor, classifier accuracy)
"""

import dataclasses
import inspect
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from diffusion_jax import checkpointing
from diffusion_jax import configuration
from diffusion_jax import guidance
from diffusion_jax import images as images_lib
from diffusion_jax import metric_writer
from diffusion_jax import objectives
from diffusion_jax import parameterization
from diffusion_jax import processes
from diffusion_jax import samplers
from diffusion_jax import training
from diffusion_jax.configuration import ConfigError
from diffusion_jax.data import digits
from diffusion_jax.data import sampler as data_sampler
from diffusion_jax.metrics import digits_classifier
from diffusion_jax.models import MODELS

log = logging.getLogger(__name__)

DATASETS = ('digits',)
# Sampler keyword options `config.sample` may set (None = the sampler's own default). Only the
# ones the chosen sampler accepts may be set; others are a ConfigError naming the key.
SAMPLER_OPTIONS = ('grid', 'spacing', 'variance', 'eta', 'rho', 't_min', 's_churn', 'order',
                   'method', 'variant', 'rtol', 'atol', 'solver', 'snr', 'corrector_steps')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  num_steps: int = 3000
  batch_size: int = 128
  ema_decay: float = 0.999
  log_every: int = 50
  checkpoint_every: int = 500
  keep_checkpoints: int = 3


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """`sampler` names an entry of `samplers.SAMPLERS`; the optional fields are its keyword
  options (None = the sampler's default; in configs, `ml_collections.config_dict.placeholder`)."""
  sampler: str = 'ddpm'
  steps: int = 100
  grid: str | None = None
  spacing: str | None = None
  variance: str | None = None
  eta: float | None = None
  rho: float | None = None
  t_min: float | None = None
  s_churn: float | None = None
  order: int | None = None
  method: str | None = None
  variant: str | None = None
  rtol: float | None = None
  atol: float | None = None
  solver: str | None = None
  snr: float | None = None
  corrector_steps: int | None = None
  clip_x0: float = 1.0          # clip x0_hat to the data range; 0 disables
  # Class-conditional models: sample i gets label i % num_classes; the classifier-free guidance
  # scale (1 = the conditional model, 0 = the unconditional one, > 1 guides; Ho & Salimans 2022
  # with w = scale - 1).
  guidance_scale: float = 1.0
  batch_size: int = 500
  grid_size: int = 100          # images in samples.png


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  num_samples: int = 1000       # generated digits for the Fréchet distance
  cache_dir: str = ''           # where the feature classifier is cached ('' = workdir/cache)
  enabled: bool = True


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything built from a validated config; no side effects on disk."""
  train: TrainConfig
  sample: SampleConfig
  eval: EvalConfig
  optim: training.OptimConfig
  process: Any
  objective: Any
  kind: str
  model: Any
  conditional: bool
  learned_variance: bool = False

  @property
  def num_classes(self) -> int:
    return getattr(self.model, 'num_classes', 0)


def build_model(model_config) -> Any:
  """The Flax module named by `model_config.name` (a `MODELS` key), its fields checked."""
  model_cfg = dict(model_config)
  model_name = configuration.choice('model.name', model_cfg.pop('name', None), MODELS)
  return configuration.from_section(MODELS[model_name], 'model', model_cfg)


def build(config: ml_collections.ConfigDict, *, image_shape=None) -> Setup:
  """Validates `config` and builds the pieces; raises `ConfigError` naming the bad key.

  `image_shape` (`[H, W, C]`) validates a config for data the loop cannot read yet (the
  reference configs): the data section is then not checked against the registered datasets.
  """
  known = {'seed', 'data', 'process', 'objective', 'model', 'optim', 'train', 'sample', 'eval'}
  for k in config:
    if k not in known:
      raise ConfigError(f'config.{k}: unknown section; valid sections are {sorted(known)}')
  if not isinstance(config.get('seed'), int):
    raise ConfigError(f'config.seed={config.get("seed")!r}: expected int')
  if image_shape is None:
    configuration.choice('data.name', config.data.name, DATASETS)
    configuration.check_keys('data', config.data, {'name': str})
    image_shape = digits.IMAGE_SHAPE

  process_cfg = dict(config.process)
  configuration.choice('process.name', process_cfg.pop('name'), processes.PROCESSES)
  try:
    process = processes.make_process(config.process.name, **process_cfg)
  except (TypeError, ValueError) as e:
    raise ConfigError(f'config.process: {str(e).splitlines()[0]}') from None

  objective_cfg = dict(config.objective)
  name = configuration.choice('objective.name', objective_cfg.pop('name'), objectives.OBJECTIVES)
  if name == 'consistency_distillation':
    # It needs a trained teacher's denoiser, which a from-scratch run does not have.
    raise ConfigError("config.objective.name='consistency_distillation' needs a teacher "
                      'denoiser; call objectives.make_objective from the library with one')
  try:
    objective = objectives.make_objective(name, process, **objective_cfg)
  except (TypeError, ValueError) as e:
    raise ConfigError(f'config.objective: {str(e).splitlines()[0]}') from None

  model = build_model(config.model)
  _check_model(model, image_shape)
  # Nichol & Dhariwal's learned variances: the network outputs 2C channels (prediction, v).
  learned_variance = name == 'ddpm_hybrid' or objective_cfg.get('variance') == 'learned'
  channels = image_shape[-1]
  want = 2 * channels if learned_variance else channels
  got = getattr(model, 'out_channels', None)
  if (got or channels) != want:
    what = 'a prediction and a learned variance' if learned_variance else 'one prediction'
    raise ConfigError(f'config.model.out_channels={got}: objective {name!r} needs {want} output '
                      f'channels ({what} per image channel)')

  train = configuration.from_section(TrainConfig, 'train', config.train)
  for k in ('num_steps', 'batch_size', 'log_every', 'checkpoint_every', 'keep_checkpoints'):
    configuration.positive(f'train.{k}', getattr(train, k))
  if not 0 <= train.ema_decay < 1:
    raise ConfigError(f'config.train.ema_decay={train.ema_decay}: must lie in [0, 1)')

  optim = configuration.from_section(training.OptimConfig, 'optim', config.optim)
  configuration.positive('optim.lr', optim.lr)
  configuration.choice('optim.schedule', optim.schedule, ('constant', 'cosine'))

  sample = configuration.from_section(SampleConfig, 'sample', config.sample)
  configuration.choice('sample.sampler', sample.sampler, samplers.SAMPLERS)
  configuration.positive('sample.batch_size', sample.batch_size)
  kind = objectives.PREDICTION_KIND[name]
  _check_sampler(sample, process, kind, image_shape, learned_variance)

  conditional = getattr(model, 'num_classes', 0) > 0
  if sample.guidance_scale != 1.0 and not conditional:
    raise ConfigError(f'config.sample.guidance_scale={sample.guidance_scale}: guidance needs a '
                      f'class-conditional model (set config.model.num_classes)')

  ev = configuration.from_section(EvalConfig, 'eval', config.eval)
  configuration.positive('eval.num_samples', ev.num_samples)
  return Setup(train=train, sample=sample, eval=ev, optim=optim, process=process,
               objective=objective, kind=kind, model=model,
               conditional=conditional, learned_variance=learned_variance)


def sampler_options(sample: SampleConfig) -> dict:
  """The sampler keyword options set in `config.sample` (those not None)."""
  return {k: getattr(sample, k) for k in SAMPLER_OPTIONS if getattr(sample, k) is not None}


def _check_sampler(sample: SampleConfig, process, kind: str, image_shape,
                   learned_variance: bool = False):
  """Checks the options against the sampler's signature, then traces it abstractly with a
  stand-in denoiser (no compile) so that bad grids, step counts or processes fail now."""
  fn = samplers.SAMPLERS[sample.sampler]
  options = sampler_options(sample)
  accepted = [k for k in SAMPLER_OPTIONS if k in inspect.signature(fn).parameters]
  for k, v in options.items():
    if k not in accepted:
      raise ConfigError(f'config.sample.{k}={v!r}: sampler {sample.sampler!r} takes no {k!r}; '
                        f'its options are {accepted}')

  def denoiser(x, t, cond=None):
    return x, x
  denoiser.kind = kind
  if learned_variance:
    denoiser.with_variance = lambda x, t, cond=None: (x, x, x)
  x = jax.ShapeDtypeStruct((2,) + tuple(image_shape), jnp.float32)
  try:
    jax.eval_shape(lambda x: fn(denoiser, process, x, jax.random.key(0), steps=sample.steps,
                                **options)[0], x)
  except (TypeError, ValueError) as e:
    raise ConfigError(f'config.sample (sampler={sample.sampler!r}, steps={sample.steps}): '
                      f'{str(e).splitlines()[0]}') from None


def _check_model(model, image_shape):
  """Traces `model.init` abstractly (no compile, no allocation) to surface config errors now."""
  x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  cond = jax.ShapeDtypeStruct((1,), jnp.int32) if getattr(model, 'num_classes', 0) > 0 else None
  try:
    jax.eval_shape(lambda x, t, c: model.init(jax.random.key(0), x, t, c), x, t, cond)
  except (ValueError, TypeError) as e:
    raise ConfigError(f'config.model: {str(e).splitlines()[0]}') from None


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


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the resolved config as JSON (and keeps the first one if a resumed run differs)."""
  path = os.path.join(workdir, 'config.json')
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      old = f.read()
    if old != text:
      stamp = time.strftime('%Y%m%d-%H%M%S')
      log.warning('config differs from the one this work dir was started with; keeping the '
                  'old one as config.%s.json', stamp)
      os.replace(path, os.path.join(workdir, f'config.{stamp}.json'))
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(text + '\n')
  os.replace(tmp, path)


def _init_state(setup: Setup, key, image_shape, optimizer, ema_fn):
  # Jitted: eager Flax init dispatches (and compiles) every op separately, ~30 s on CPU.
  @jax.jit
  def init(key):
    k_params, k_state = jax.random.split(key)
    x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.float32)
    cond = jnp.zeros((1,), jnp.int32) if setup.conditional else None
    params = setup.model.init({'params': k_params}, x, t, cond)['params']
    return training.init_train_state(params, optimizer, ema_fn, k_state)
  return init(key)


def make_sample_fn(setup: Setup):
  """`sample(params, x_T, key, cond) -> x0` compiled whole, for the configured sampler."""
  s = setup.sample
  clip = s.clip_x0 if s.clip_x0 > 0 else None
  options = sampler_options(s)
  sampler = samplers.SAMPLERS[s.sampler]

  @jax.jit
  def sample(params, x_T, key, cond=None):
    def model_fn(x, t, c):
      return setup.model.apply({'params': params}, x, t, c)
    if setup.learned_variance:   # every sampler works; ddpm can use variance='learned'
      den = samplers.learned_variance_denoiser(model_fn, setup.process, setup.kind, clip)
    else:
      den = parameterization.make_denoiser(
          model_fn, setup.process, setup.kind, clip_x0=clip,
          sigma_min=(parameterization.consistency_sigma_min(setup.process)
                     if setup.kind == 'consistency' else None))
    if setup.conditional and s.guidance_scale != 1.0:
      den = guidance.classifier_free_guidance(den, s.guidance_scale, null_cond=setup.num_classes)
    x0, _ = sampler(den, setup.process, x_T, key, steps=s.steps, cond=cond, **options)
    return x0

  return sample


def sample_labels(num: int, num_classes: int) -> np.ndarray | None:
  """The class of generated sample i, `i % num_classes` (None for an unconditional model)."""
  return np.arange(num) % num_classes if num_classes > 0 else None


def generate(sample_fn, params, key, num: int, batch_size: int, image_shape,
             labels: np.ndarray | None = None):
  """Draws `num` samples (of classes `labels[i]` if given); sample i's prior noise and sampler
  key derive from `fold_in(key, i)`, so results do not depend on the batch size."""
  k_noise, k_sampler = jax.random.split(key)
  prior = jax.jit(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(k_noise, i),
                                                       tuple(image_shape))))
  out = []
  for start in range(0, num, batch_size):
    idx = jnp.arange(start, min(start + batch_size, num))
    cond = None if labels is None else jnp.asarray(labels[start:start + len(idx)], jnp.int32)
    out.append(np.asarray(sample_fn(params, prior(idx), jax.random.fold_in(k_sampler, start),
                                    cond)))
  return np.concatenate(out, axis=0)


def evaluate_digits(generated: np.ndarray, cache_dir: str,
                    labels: np.ndarray | None = None) -> dict:
  """FD of `generated` vs the test split in the classifier's feature space, with its floor;
  given the intended `labels`, also the classifier's accuracy on them (`class_accuracy`).

  The feature classifier is trained once (seed 0, independent of the run's seed, so FDs of
  different runs share one feature space) and cached in `cache_dir`.
  """
  params, info = digits_classifier.load_or_train_digits_classifier(cache_dir, seed=0)
  result = digits_classifier.digits_fd_eval(
      params, generated, classifier_test_accuracy=float(info['test_accuracy']))
  result = dict(result)
  if labels is not None:
    result['class_accuracy'] = digits_classifier.classifier_accuracy(params, generated, labels)
  return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains, checkpoints, samples and evaluates; returns the evaluation dict."""
  setup = build(config)
  workdir = prepare_workdir(workdir)
  write_config(config, workdir)
  is_main = jax.process_index() == 0

  x_train, y_train = digits.load_digits('train')
  image_shape = x_train.shape[1:]
  num_steps = setup.train.num_steps
  optimizer = training.make_optimizer(setup.optim, num_steps)
  ema_fn = training.ema(setup.train.ema_decay)
  root = jax.random.key(config.seed)
  k_init, k_sample = jax.random.split(root)
  state = _init_state(setup, k_init, image_shape, optimizer, ema_fn)
  n_params = sum(x.size for x in jax.tree.leaves(state.params))

  ckpt = checkpointing.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                    max_to_keep=setup.train.keep_checkpoints)
  restored, restored_step = ckpt.restore_latest(state)
  if restored is not None:
    state = restored
    log.info('resumed from checkpoint step %d in %s', restored_step, ckpt.directory)
    print(f'Resuming from checkpoint step {restored_step} ({ckpt.directory})', flush=True)
  start = int(state.step)
  if start > num_steps:
    raise ConfigError(f'config.train.num_steps={num_steps} is below the checkpointed step '
                      f'{start} in {ckpt.directory}; raise it or use a new work dir')
  writer = metric_writer.JsonlWriter(os.path.join(workdir, 'metrics.jsonl'),
                                     resume_step=start if restored is not None else 0)

  train_step = jax.jit(training.make_train_step(setup.objective, setup.model.apply, optimizer,
                                                ema_fn, conditional=setup.conditional),
                       donate_argnums=(0,))
  print(f'Model: {type(setup.model).__name__}, {n_params / 1e6:.2f} M parameters; '
        f'{num_steps} steps at batch {setup.train.batch_size}', flush=True)

  t0 = time.time()
  bar = tqdm.tqdm(total=num_steps, initial=start, desc='train', unit='step', dynamic_ncols=True,
                  mininterval=1.0, disable=not is_main)
  running = []
  for step in range(start, num_steps):
    idx = data_sampler.batch_indices(config.seed, step, setup.train.batch_size, len(x_train))
    batch = {'image': x_train[idx], 'label': y_train[idx]}
    state, metrics = train_step(state, batch)
    # Wait for the step: the progress bar's rate and ETA then measure compute, not dispatch.
    running.append(jax.block_until_ready(metrics))
    done = step + 1
    if done % setup.train.log_every == 0 or done == num_steps:
      scalars = {k: float(np.mean([m[k] for m in running])) for k in running[0]}
      running = []
      scalars['steps_per_sec'] = bar.format_dict.get('rate') or 0.0
      if is_main:
        writer.write(done, scalars)
      bar.set_postfix(loss=f'{scalars["loss"]:.4f}', refresh=False)
    if done % setup.train.checkpoint_every == 0 or done == num_steps:
      ckpt.save(done, state)
    bar.update(1)
  bar.close()
  ckpt.wait()
  train_seconds = time.time() - t0
  if start < num_steps:
    print(f'Trained steps {start}..{num_steps} in {train_seconds:.1f} s '
          f'({(num_steps - start) / max(train_seconds, 1e-9):.2f} steps/s)', flush=True)

  # Sampling and evaluation always use the EMA parameters.
  t1 = time.time()
  sample_fn = make_sample_fn(setup)
  s = setup.sample
  num = max(setup.eval.num_samples if setup.eval.enabled else 0, s.grid_size)
  labels = sample_labels(num, setup.num_classes)
  samples = generate(sample_fn, state.ema_params, k_sample, num, s.batch_size, image_shape,
                     labels)
  sample_seconds = time.time() - t1
  print(f'Sampled {num} images with {s.sampler} ({s.steps} steps) in {sample_seconds:.1f} s',
        flush=True)
  if is_main:
    images_lib.save_png(os.path.join(workdir, 'samples.png'),
                        images_lib.make_grid(samples[:s.grid_size], ncol=10))
    np.save(os.path.join(workdir, 'samples.npy'), samples[:s.grid_size])

  result = {'step': num_steps, 'num_params': int(n_params), 'sample_seconds': sample_seconds}
  if setup.eval.enabled:
    n = setup.eval.num_samples
    result.update(evaluate_digits(samples[:n],
                                  setup.eval.cache_dir or os.path.join(workdir, 'cache'),
                                  None if labels is None else labels[:n]))
    result['fd_ratio'] = result['fd'] / result['fd_floor']
  if is_main:
    writer.write(num_steps, {f'eval/{k}': v for k, v in result.items() if k != 'step'})
    with open(os.path.join(workdir, 'eval.json'), 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=2)
  writer.close()
  ckpt.close()
  return result


def format_eval_line(result: dict) -> str:
  if 'fd' not in result:
    return f'EVAL step={result["step"]}: evaluation disabled'
  return (f'EVAL step={result["step"]}: FD={result["fd"]:.3f} '
          f'floor={result["fd_floor"]:.3f} (real train vs real test, n={result["num_generated"]}) '
          f'FD/floor={result["fd_ratio"]:.2f} '
          f'classifier_test_acc={result["classifier_test_accuracy"]:.4f}'
          + (f' class_accuracy={result["class_accuracy"]:.4f}' if 'class_accuracy' in result
             else ''))
