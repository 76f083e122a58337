"""A run's config, validated and turned into typed pieces before anything compiles.

`build(config)` checks every section (a wrong key, type or value is a one-line `ConfigError`
naming it), opens the training data, builds the process, objective, model and sampler options
and traces the model and the sampler abstractly, so a bad combination fails in seconds.
"""

import dataclasses
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from diffusion_jax import configuration
from diffusion_jax import evaluation
from diffusion_jax import objectives
from diffusion_jax import parameterization
from diffusion_jax import parallel
from diffusion_jax import processes
from diffusion_jax import samplers
from diffusion_jax import training
from diffusion_jax.configuration import ConfigError
from diffusion_jax.data import sources
from diffusion_jax.models import MODELS

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
  keep_checkpoints: int = 3      # the newest N checkpoints are kept ...
  keep_every: int = 0            # ... and every step that is a multiple of this (0: none)
  # Gradient accumulation: the batch is split into this many micro-batches per update.
  grad_accum_steps: int = 1
  # 'replicated' (every device holds params and optimizer state) or 'fsdp' (large leaves split
  # over the data axis; parallel.state_shardings).
  param_sharding: str = 'replicated'
  fsdp_min_size: int = parallel.FSDP_MIN_SIZE   # smaller leaves stay replicated under FSDP
  # Updates with a non-finite loss or gradient are skipped; this many in a row stop the run.
  max_consecutive_skips: int = 10
  prefetch: int = 2              # batches loaded ahead on a background thread


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
  grid_size: int = 100          # images in samples.png (0, with eval off: no sampling)


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
  objective: objectives.Objective
  model: Any
  conditional: bool
  data: sources.DataConfig = sources.DataConfig()
  image_shape: tuple = ()
  source: Any = None             # the training data (None when built for a given image_shape)

  @property
  def num_classes(self) -> int:
    return getattr(self.model, 'num_classes', 0)


def build_model(model_config) -> Any:
  """The Flax module named by `model_config.name` (a `MODELS` key), its fields checked."""
  model_cfg = dict(model_config)
  model_name = configuration.choice('model.name', model_cfg.pop('name', None), MODELS)
  return configuration.from_section(MODELS[model_name], 'model', model_cfg)


def build(config: ml_collections.ConfigDict, *, image_shape=None, source=None) -> Setup:
  """Validates `config` and builds the pieces; raises `ConfigError` naming the bad key.

  The data section opens its source (`data.sources`; for TFDS that reads one example), whose
  image shape the model is checked against. `source` replaces the configured one (any object
  with the `sources.ArraySource` interface). `image_shape` (`[H, W, C]`) instead validates a
  config for data that is not at hand (the reference configs): nothing is opened.
  """
  known = {'seed', 'data', 'process', 'objective', 'model', 'optim', 'train', 'sample', 'eval'}
  for k in config:
    if k not in known:
      raise ConfigError(f'config.{k}: unknown section; valid sections are {sorted(known)}')
  if not isinstance(config.get('seed'), int):
    raise ConfigError(f'config.seed={config.get("seed")!r}: expected int')
  data_cfg = dict(config.data)
  data_name = data_cfg.pop('name', None)
  if not isinstance(data_name, str):
    raise ConfigError(f'config.data.name={data_name!r}: expected a dataset name (str)')
  data = configuration.from_section(sources.DataConfig, 'data', data_cfg, name=data_name)
  if image_shape is None:
    if source is None:
      configuration.choice('data.name', data.name, sources.DATASETS)
      try:
        source = sources.make_source(data)
      except ValueError as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    image_shape = source.image_shape
  image_shape = tuple(image_shape)

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
  channels = image_shape[-1]
  want = 2 * channels if objective.learned_variance else channels
  got = getattr(model, 'out_channels', None)
  if (got or channels) != want:
    what = ('a prediction and a learned variance' if objective.learned_variance
            else 'one prediction')
    raise ConfigError(f'config.model.out_channels={got}: objective {name!r} needs {want} output '
                      f'channels ({what} per image channel)')

  train = configuration.from_section(TrainConfig, 'train', config.train)
  for k in ('num_steps', 'batch_size', 'log_every', 'checkpoint_every', 'keep_checkpoints',
            'grad_accum_steps', 'max_consecutive_skips', 'fsdp_min_size'):
    configuration.positive(f'train.{k}', getattr(train, k))
  configuration.positive('train.keep_every', train.keep_every, allow_zero=True)
  configuration.positive('train.prefetch', train.prefetch, allow_zero=True)
  if not 0 <= train.ema_decay < 1:
    raise ConfigError(f'config.train.ema_decay={train.ema_decay}: must lie in [0, 1)')
  configuration.choice('train.param_sharding', train.param_sharding, parallel.PARAM_SHARDINGS)
  if train.batch_size % train.grad_accum_steps:
    raise ConfigError(f'config.train.batch_size={train.batch_size}: must be divisible by '
                      f'train.grad_accum_steps={train.grad_accum_steps}')

  optim = configuration.from_section(training.OptimConfig, 'optim', config.optim)
  configuration.positive('optim.lr', optim.lr)
  configuration.choice('optim.schedule', optim.schedule, ('constant', 'cosine'))

  sample = configuration.from_section(SampleConfig, 'sample', config.sample)
  configuration.choice('sample.sampler', sample.sampler, samplers.SAMPLERS)
  configuration.positive('sample.batch_size', sample.batch_size)
  configuration.positive('sample.grid_size', sample.grid_size, allow_zero=True)
  check_sampler(sample, process, objective, image_shape)

  conditional = getattr(model, 'num_classes', 0) > 0
  if conditional and source is not None:
    have = getattr(source, 'num_classes', 0)
    if not have:
      raise ConfigError(f'config.model.num_classes={model.num_classes}: data {data.name!r} has '
                        f'no labels to condition on')
    if have > model.num_classes:
      raise ConfigError(f'config.model.num_classes={model.num_classes}: data {data.name!r} has '
                        f'{have} classes')
  if sample.guidance_scale != 1.0 and not conditional:
    raise ConfigError(f'config.sample.guidance_scale={sample.guidance_scale}: guidance needs a '
                      f'class-conditional model (set config.model.num_classes)')

  ev = configuration.from_section(EvalConfig, 'eval', config.eval)
  configuration.positive('eval.num_samples', ev.num_samples)
  if ev.enabled and source is not None and data.name not in evaluation.EVALUATED:
    raise ConfigError(f'config.eval.enabled=True: the in-loop evaluation measures digits and '
                      f'2-D toys (data.name={data.name!r}); set --config.eval.enabled=False')
  return Setup(train=train, sample=sample, eval=ev, optim=optim, process=process,
               objective=objective, model=model, conditional=conditional,
               data=data, image_shape=image_shape, source=source)


def sampler_options(sample: SampleConfig) -> dict:
  """The sampler keyword options set in `config.sample` (those not None)."""
  return {k: getattr(sample, k) for k in SAMPLER_OPTIONS if getattr(sample, k) is not None}


def check_sampler(sample: SampleConfig, process, objective: objectives.Objective, image_shape):
  """Checks the options against the sampler's signature, then traces it abstractly with a
  stand-in denoiser (no compile) so that bad grids, step counts or processes fail now."""
  fn = samplers.SAMPLERS[sample.sampler]
  options = sampler_options(sample)
  accepted = [k for k in SAMPLER_OPTIONS if k in inspect.signature(fn).parameters]
  for k, v in options.items():
    if k not in accepted:
      raise ConfigError(f'config.sample.{k}={v!r}: sampler {sample.sampler!r} takes no {k!r}; '
                        f'its options are {accepted}')

  denoiser = parameterization.Denoiser(
      lambda x, t, cond=None: (x, x), kind=objective.kind,
      with_variance=(lambda x, t, cond=None: (x, x, x)) if objective.learned_variance else None)
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
