"""A run's config, validated and turned into typed pieces before anything compiles.

`build(config)` checks every section (a wrong key, type or value is a one-line `ConfigError`
naming it), opens the training data, builds the process, objective, model and sampler options
(one small builder per section) and traces the model and the sampler abstractly, so a bad
combination fails in seconds.
"""

import dataclasses
import importlib
import inspect
import json
import os
import types
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections

from diffusion_jax import configuration
from diffusion_jax import distill
from diffusion_jax import ema as ema_lib
from diffusion_jax import evaluation
from diffusion_jax import finetune
from diffusion_jax import metric_writer
from diffusion_jax import objectives
from diffusion_jax import parameterization
from diffusion_jax import parallel
from diffusion_jax import processes
from diffusion_jax import progressive
from diffusion_jax import samplers
from diffusion_jax import teacher as teacher_lib
from diffusion_jax import training
from diffusion_jax.configuration import ConfigError
from diffusion_jax.data import derived
from diffusion_jax.data import sources
from diffusion_jax.models import MODELS
from diffusion_jax.models import layers
from diffusion_jax.models.autoencoder import AUTOENCODERS
from diffusion_jax.text import conditioning as text_conditioning

# Sections whose builder wraps the model and derives its condition from the image
# (`data.derived`): name -> 'module:function', called as
# `builder(section, model, image_shape) -> (model, ImageCondition)`, with the keywords `process`,
# `objective` and `data` (the built pieces) if its signature takes them.
CONDITION_BUILDERS = {
    'superres': 'diffusion_jax.models.superres:build_condition',
    'control': 'diffusion_jax.models.controlnet:build_condition',
    'mel': 'diffusion_jax.audio.conditioning:build_condition',
}

# `latent`: a latent diffusion run's autoencoder stage (`latent_pipeline`); `build` ignores it.
# `base`: the trained run a fine-tune or an adapter starts from (`finetune`); `lora`: low-rank
# adapters on it (`models.lora`); `teacher`: the trained run a distillation learns from
# (`teacher`).
SECTIONS = ('seed', 'data', 'process', 'objective', 'model', 'optim', 'train', 'sample',
            'eval', 'latent', 'profile', 'log', 'text', 'base', 'lora', 'teacher',
            *CONDITION_BUILDERS)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  num_steps: int = 3000
  batch_size: int = 128
  ema_decay: float = 0.999
  # EDM's EMA half-life in thousands of training images (batch-size invariant; > 0 replaces
  # ema_decay), with its ramp-up ratio (0: none; EDM used 500 kimg and 0.05).
  ema_halflife_kimg: float = 0.0
  ema_rampup_ratio: float = 0.0
  # Post-hoc EMA (Karras et al. 2024): power-function averages of these relative widths
  # (EDM2: (0.05, 0.10)) are tracked and saved every `posthoc_every` steps to
  # <workdir>/posthoc_ema/, from which experiments.posthoc_ema rebuilds any width; () = off.
  posthoc_sigma_rels: tuple[float, ...] = ()
  posthoc_every: int = 1000
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
  # grain worker processes decoding examples (0: in the training process). Two workers read
  # mock CIFAR-10 1.2x faster on 2 cores (docs/loader_benchmark.md); on many-core hosts with
  # JPEG/PNG decoding, more pay off. The batches are the same whatever the count.
  data_workers: int = 0
  # Progressive training (`progressive`): ((0, 8), (N, 16)) trains on the data average-pooled to
  # 8x8 for steps 0 .. N-1, then at 16x16 (the last stage at the data's size); () = off.
  resolution_schedule: tuple[tuple[int, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """`sampler` names an entry of `samplers.SAMPLERS`; `options` are keyword options of it
  (`samplers.SAMPLER_OPTIONS`; in configs, `config.sample.options.<name>`, placeholders unless
  set). Unset (None) options are dropped, so that they keep the sampler's defaults: `options`
  is a frozen mapping of exactly the keywords the sampler is called with."""
  sampler: str = 'ddpm'
  steps: int = 100
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  clip_x0: float = 1.0          # clip x0_hat to the data range; 0 disables
  # Class-conditional models: sample i gets label i % num_classes; the classifier-free guidance
  # scale (1 = the conditional model, 0 = the unconditional one, > 1 guides; Ho & Salimans 2022
  # with w = scale - 1).
  guidance_scale: float = 1.0
  # Guidance rescale phi (Lin et al. 2024; 0 = off) and the guidance interval (lo, hi) in t
  # (Kynkäänniemi et al. 2024; () = every step): `guidance.classifier_free_guidance`.
  guidance_rescale: float = 0.0
  guidance_interval: tuple[float, ...] = ()
  batch_size: int = 500
  grid_size: int = 100          # images in samples.png (0, with eval off: no sampling)

  def __post_init__(self):
    options = {k: v for k, v in dict(self.options).items() if v is not None}
    object.__setattr__(self, 'options', types.MappingProxyType(options))


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  num_samples: int = 1000       # generated samples for the final evaluation (digits: FD)
  cache_dir: str = ''           # where the feature classifier is cached ('' = workdir/cache)
  enabled: bool = True
  # In-loop evaluation every this many steps (0: only at the end): `every_num_samples` samples
  # (0: num_samples) from the EMA parameters with one fixed key, the metric (digits FD, toy SW,
  # FID, autoencoder PSNR) logged as `in_loop/<metric>` and, with `keep_best`, the best step's
  # checkpoint kept in <workdir>/checkpoints_best (beside the keep-N ones).
  every: int = 0
  every_num_samples: int = 0
  keep_best: bool = True
  # FID on image data other than digits and toys: statistics from `experiments.fid_stats` and
  # the converted Inception weights (docs/fid_inception.md).
  reference_stats: str = ''
  inception_weights: str = ''
  # The SHA-256 of the converted weights (`inception.weights_digest`, printed by
  # experiments.convert_inception): other weights are refused. '' = not pinned.
  inception_sha256: str = ''
  # Text runs: training steps of the digits-CLIP behind the CLIP score (0: its recipe's 1,200;
  # smoke configs use a few to stay fast; the number is part of the cached model's recipe).
  digits_clip_steps: int = 0


@dataclasses.dataclass(frozen=True)
class LogConfig:
  # Comma-separated writers: 'jsonl' (metrics.jsonl, always written), 'tensorboard'
  # (<workdir>/tensorboard; the [tb] extra), 'wandb' (<workdir>/wandb; the [wandb] extra).
  writers: str = 'jsonl'
  # Every this many steps (0: never), `grid_size` samples from the EMA parameters with one fixed
  # key (the same noise each time, so grids compare across steps) to the writers and
  # <workdir>/grids/step_<N>.png; an autoencoder shows reconstructions of fixed held-out images.
  sample_every: int = 0
  grid_size: int = 36
  wandb_project: str = 'diffusion_jax'
  wandb_mode: str = 'offline'   # 'offline' (no network: `wandb sync` later) or 'online'


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
  # (start, stop): a `jax.profiler` trace of train steps start .. stop - 1 (counted from 0) in
  # `<workdir>/profile` (TensorBoard's profile plugin reads it); () = no trace.
  steps: tuple[int, ...] = ()


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
  profile: ProfileConfig = ProfileConfig()
  log: LogConfig = LogConfig()
  text: Any = None               # text_conditioning.TextParts of a text-conditioned run
  base: Any = None               # finetune.BaseParts of a run that starts from a trained one
  teacher: Any = None            # teacher.TeacherParts of a distillation's teacher run
  condition: Any = None          # data.derived.ImageCondition (control map, low-res image)

  @property
  def num_classes(self) -> int:
    return getattr(self.model, 'num_classes', 0)

  @property
  def cond_key(self) -> str | None:
    """The batch key the model is conditioned on: 'tokens' (captions), an image-derived
    condition's key ('control', 'low_res', ...), 'label' or None."""
    if self.text is not None:
      return 'tokens'
    if self.condition is not None:
      return self.condition.key
    return 'label' if self.conditional else None

  @property
  def frozen(self) -> tuple[str, ...]:
    """Top-level parameter subtrees the optimizer leaves alone: an adapter's 'base', a frozen
    text encoder's 'encoder'."""
    if self.base is not None and getattr(self.model, 'base_model', None) is not None:
      return ('base',)          # a text encoder, if any, is inside the frozen base
    if self.text is not None and self.text.config.freeze:
      return ('encoder',)
    return ()


def section_defaults(model_name: str | None = None) -> dict:
  """`{'data.crop': 0, 'train.keep_every': 0, ...}`: what a key of a typed section (data,
  train, optim, eval, and the fields of model `model_name`) means when a config leaves it out,
  as `config.json` stores it (tuples as lists)."""
  sections = [('data', sources.DataConfig), ('train', TrainConfig),
              ('optim', training.OptimConfig), ('eval', EvalConfig), ('profile', ProfileConfig),
              ('log', LogConfig), ('text', text_conditioning.TextConfig),
              ('base', finetune.BaseConfig)]
  if model_name in MODELS or model_name in AUTOENCODERS:
    sections.append(('model', MODELS.get(model_name) or AUTOENCODERS[model_name]))
  out = {}
  for section, cls in sections:
    for f in dataclasses.fields(cls):
      if (f.default is not dataclasses.MISSING and f.init
          and not (section == 'model' and f.name in ('parent', 'name'))):
        try:
          out[f'{section}.{f.name}'] = json.loads(json.dumps(f.default))
        except TypeError:   # a default JSON cannot hold: no config.json spells it either
          pass
  return out


def build_model(model_config) -> Any:
  """The Flax module named by `model_config.name` (a `MODELS` key), its fields checked."""
  model_cfg = dict(model_config)
  model_name = configuration.choice('model.name', model_cfg.pop('name', None), MODELS)
  return configuration.from_section(MODELS[model_name], 'model', model_cfg)


def build(config: ml_collections.ConfigDict, *, image_shape=None, source=None) -> Setup:
  """Validates `config` and builds the pieces; raises `ConfigError` naming the bad key.

  Each section is built by its own builder, in order; the checks across sections are here.
  The data section opens its source (`data.sources`; for TFDS that reads one example), whose
  image shape the model is checked against. `source` replaces the configured one (any object
  with the `sources.ArraySource` interface). `image_shape` (`[H, W, C]`) instead validates a
  config for data that is not at hand (the reference configs): nothing is opened.
  """
  _check_sections(config)
  data = build_data(config.data)
  if image_shape is None:
    source = open_source(data) if source is None else source
    image_shape = source.image_shape
  image_shape = tuple(image_shape)
  process = build_process(config.process)
  teacher = None
  if 'teacher' in config:
    teacher = teacher_lib.build_teacher(config.teacher, config,
                                        section_defaults(config.model.get('name')), _teacher_parts)
  objective = _build_objective(config.objective, process, teacher)
  model = distill.network_for(build_model(config.model), objective)
  if objective.kind in parameterization.FLOW_MAP_KINDS and not getattr(model, 'delta_input',
                                                                         False):
    raise ConfigError(f'config.objective.name={objective.name!r} feeds the network a second '
                      f'time (cond["delta"]): set config.model.delta_input=True')
  base = None
  if 'base' in config:
    # A distillation's student may start from the teacher's weights with its own objective.
    compared = finetune.COMPARED if teacher is None else ('model', 'process', 'text')
    base = finetune.build_base(config.base, config, section_defaults(config.model.get('name')),
                               compared=compared)
    if teacher is not None:
      teacher_lib.check_student_kind(objective.kind, teacher, base.workdir)
  text = None
  if 'text' in config:
    text = text_conditioning.build_parts(text_conditioning.build_text(config.text))
    text_conditioning.check_model(text, model)
    model = text_conditioning.wrap_model(text, model)
    if source is not None:
      source = text_conditioning.caption_source(text, data, source)
  model, condition = _build_condition(config, model, image_shape, process=process,
                                      objective=objective, data=data)
  model = _build_adapter(config, model, base, image_shape, condition)   # outermost
  if condition is not None and base is None and getattr(model, 'base_model', None) is not None:
    raise ConfigError(f'config.{condition.key}: {type(model).__name__} trains beside a frozen, '
                      f'trained base: set config.base.workdir')
  if condition is not None and source is not None:
    source = derived.DerivedSource(source, condition)
  _check_model(model, image_shape, condition)
  _check_out_channels(model, objective, image_shape)
  train = build_train(config.train)
  progressive.check_schedule(train.resolution_schedule, image_shape,
                             lambda shape: _check_model(model, shape))
  optim = build_optim(config.optim)
  sample = _build_sample(config.sample)
  check_sampler(sample, process, objective, image_shape)
  conditional = getattr(model, 'num_classes', 0) > 0
  if conditional and source is not None:
    _check_labels(model, data, source)
  if sample.guidance_scale != 1.0 and not (conditional or text is not None):
    raise ConfigError(f'config.sample.guidance_scale={sample.guidance_scale}: guidance needs a '
                      f'class-conditional model (set config.model.num_classes) or a '
                      f'text-conditioned one (config.text)')
  ev = build_eval(config.eval)
  if ev.every and data.name in sources.AUDIO_DATASETS:
    raise ConfigError(f'config.eval.every={ev.every}: in-loop evaluation of audio is not '
                      f'supported; the final evaluation scores the samples (set eval.every=0)')
  if ev.enabled and source is not None and data.name not in evaluation.EVALUATED and not (
      ev.reference_stats and ev.inception_weights):
    raise ConfigError(f'config.eval.enabled=True: data.name={data.name!r} is measured by FID: '
                      f'set eval.reference_stats (experiments.fid_stats) and '
                      f'eval.inception_weights, or --config.eval.enabled=False')
  return Setup(train=train, sample=sample, eval=ev, optim=optim, process=process,
               objective=objective, model=model, conditional=conditional,
               data=data, image_shape=image_shape, source=source,
               profile=build_profile(config.get('profile', {})),
               log=build_log(config.get('log', {})), text=text, base=base,
               condition=condition, teacher=teacher)


def _teacher_parts(run_config):
  """`(process, objective, model)` of a teacher run's config, each one-line error naming
  the teacher. A teacher that was itself distilled (a progressive round) has its own teacher,
  whose parts are built the same way (its parameters are never read)."""
  try:
    process = build_process(run_config.process)
    grand = None
    if 'teacher' in run_config:
      grand = teacher_lib.build_teacher(run_config.teacher, run_config,
                                        section_defaults(run_config.model.get('name')),
                                        _teacher_parts)
    objective = _build_objective(run_config.objective, process, grand)
    return process, objective, distill.network_for(build_model(run_config.model), objective)
  except ConfigError as e:
    raise ConfigError(f'config.teacher: the teacher run\'s {e}') from None


def _build_adapter(config, model, base, image_shape, condition):
  """`model` (the network, text-conditioned or not) wrapped by the adapter its config names
  (`config.lora`), which needs a base; its target patterns are matched now (abstractly)."""
  if 'lora' not in config:
    return model
  if base is None:
    raise ConfigError('config.lora: low-rank adapters need a trained base run: set '
                      'config.base.workdir')
  if condition is not None and getattr(model, 'base_model', None) is not None:
    raise ConfigError(f'config.lora: {type(model).__name__} is already an adapter of the base '
                      f'(config.{condition.key}); use one or the other')
  from diffusion_jax.models import lora as lora_lib  # pylint: disable=g-import-not-at-top
  try:
    cfg = configuration.from_section(lora_lib.LoraConfig, 'lora', config.lora)
    wrapped = lora_lib.LoraModel(model, cfg)
    x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    cond = layers.example_cond(model, 1, condition, image_shape)
    abstract = jax.eval_shape(lambda x, t, c: model.init(jax.random.key(0), x, t, c), x, t, cond)
    lora_lib.lora_targets(abstract['params'], cfg)
  except ConfigError:
    raise
  except (TypeError, ValueError) as e:
    raise ConfigError(f'config.lora: {str(e).splitlines()[0]}') from None
  return wrapped


def _build_condition(config, model, image_shape, **pieces):
  """`(model, condition)`: the model wrapped by the image-derived condition's section
  (`CONDITION_BUILDERS`; at most one), or `(model, None)`. `pieces` (process, objective, data)
  go to a builder that takes them."""
  names = [n for n in CONDITION_BUILDERS if n in config]
  if not names:
    return model, None
  if len(names) > 1:
    raise ConfigError(f'config.{names[1]}: one image-derived condition per run; this config '
                      f'also has config.{names[0]}')
  module, fn = CONDITION_BUILDERS[names[0]].split(':')
  builder = getattr(importlib.import_module(module), fn)
  accepted = inspect.signature(builder).parameters
  kwargs = {k: v for k, v in pieces.items() if k in accepted}
  try:
    return builder(config[names[0]], model, tuple(image_shape), **kwargs)
  except (TypeError, ValueError) as e:
    if isinstance(e, ConfigError):
      raise
    line = str(e).splitlines()[0]
    raise ConfigError(line if line.startswith('config.') else f'config.{names[0]}: {line}') \
        from None


def build_log(section) -> LogConfig:
  log = configuration.from_section(LogConfig, 'log', section)
  try:
    metric_writer.parse_writers(log.writers)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  configuration.positive('log.sample_every', log.sample_every, allow_zero=True)
  configuration.positive('log.grid_size', log.grid_size)
  configuration.choice('log.wandb_mode', log.wandb_mode, ('offline', 'online'))
  return log


def build_profile(section) -> ProfileConfig:
  profile = configuration.from_section(ProfileConfig, 'profile', section)
  steps = profile.steps
  if steps and (len(steps) != 2 or not 0 <= steps[0] < steps[1]):
    raise ConfigError(f'config.profile.steps={list(steps)}: expected (start, stop) with '
                      f'0 <= start < stop, or () for no trace')
  return profile


def _check_sections(config) -> None:
  for k in config:
    if k not in SECTIONS:
      raise ConfigError(f'config.{k}: unknown section; valid sections are {sorted(SECTIONS)}')
  if not isinstance(config.get('seed'), int):
    raise ConfigError(f'config.seed={config.get("seed")!r}: expected int')


def build_data(section) -> sources.DataConfig:
  values = dict(section)
  name = values.pop('name', None)
  if not isinstance(name, str):
    raise ConfigError(f'config.data.name={name!r}: expected a dataset name (str)')
  return configuration.from_section(sources.DataConfig, 'data', values, name=name)


def open_source(data: sources.DataConfig):
  configuration.choice('data.name', data.name, sources.DATASETS)
  try:
    return sources.make_source(data)
  except ValueError as e:
    raise ConfigError(str(e).splitlines()[0]) from None


def build_process(section):
  values = dict(section)
  name = configuration.choice('process.name', values.pop('name'), processes.PROCESSES)
  try:
    return processes.make_process(name, **values)
  except (TypeError, ValueError) as e:
    raise ConfigError(f'config.process: {str(e).splitlines()[0]}') from None


def _build_objective(section, process, teacher=None) -> objectives.Objective:
  """The configured objective; a distillation (`objectives.NEEDS_TEACHER`) gets the
  `teacher` run's denoiser (`teacher.TeacherParts`) as `teacher=`."""
  values = dict(section)
  name = configuration.choice('objective.name', values.pop('name'), objectives.OBJECTIVES)
  values.update(teacher_lib.objective_values(name, teacher))
  try:
    return objectives.make_objective(name, process, **values)
  except (TypeError, ValueError) as e:
    raise ConfigError(f'config.objective: {str(e).splitlines()[0]}') from None


def build_train(section) -> TrainConfig:
  train = configuration.from_section(TrainConfig, 'train', section)
  for k in ('num_steps', 'batch_size', 'log_every', 'checkpoint_every', 'keep_checkpoints',
            'grad_accum_steps', 'max_consecutive_skips', 'fsdp_min_size'):
    configuration.positive(f'train.{k}', getattr(train, k))
  configuration.positive('train.keep_every', train.keep_every, allow_zero=True)
  configuration.positive('train.prefetch', train.prefetch, allow_zero=True)
  configuration.positive('train.data_workers', train.data_workers, allow_zero=True)
  if not 0 <= train.ema_decay < 1:
    raise ConfigError(f'config.train.ema_decay={train.ema_decay}: must lie in [0, 1)')
  configuration.positive('train.ema_halflife_kimg', train.ema_halflife_kimg, allow_zero=True)
  configuration.positive('train.ema_rampup_ratio', train.ema_rampup_ratio, allow_zero=True)
  if train.ema_rampup_ratio and not train.ema_halflife_kimg:
    raise ConfigError(f'config.train.ema_rampup_ratio={train.ema_rampup_ratio}: a ramp-up of '
                      f'the half-life needs train.ema_halflife_kimg > 0')
  configuration.positive('train.posthoc_every', train.posthoc_every)
  if train.posthoc_sigma_rels:
    try:
      ema_lib.power_ema_tracker([ema_lib.sigma_rel_to_gamma(s)
                                 for s in train.posthoc_sigma_rels])
    except (ValueError, TypeError) as e:
      raise ConfigError(f'config.train.posthoc_sigma_rels={list(train.posthoc_sigma_rels)}: '
                        f'{str(e).splitlines()[0]}') from None
  configuration.choice('train.param_sharding', train.param_sharding, parallel.PARAM_SHARDINGS)
  train = dataclasses.replace(
      train, resolution_schedule=progressive.parse_schedule(train.resolution_schedule))
  if train.batch_size % train.grad_accum_steps:
    raise ConfigError(f'config.train.batch_size={train.batch_size}: must be divisible by '
                      f'train.grad_accum_steps={train.grad_accum_steps}')
  return train


def build_optim(section) -> training.OptimConfig:
  optim = configuration.from_section(training.OptimConfig, 'optim', section)
  configuration.positive('optim.lr', optim.lr)
  configuration.choice('optim.schedule', optim.schedule, ('constant', 'cosine'))
  return optim


def _build_sample(section) -> SampleConfig:
  options = section.get('options', {})
  if not isinstance(options, (Mapping, ml_collections.ConfigDict)):
    raise ConfigError(f'config.sample.options={options!r}: expected a mapping of sampler '
                      f'options (config.sample.options.<name>)')
  sample = configuration.from_section(SampleConfig, 'sample', section)
  configuration.choice('sample.sampler', sample.sampler, samplers.SAMPLERS)
  configuration.positive('sample.steps', sample.steps)
  configuration.positive('sample.batch_size', sample.batch_size)
  configuration.positive('sample.grid_size', sample.grid_size, allow_zero=True)
  configuration.positive('sample.clip_x0', sample.clip_x0, allow_zero=True)
  if not 0.0 <= sample.guidance_rescale <= 1.0:
    raise ConfigError(f'config.sample.guidance_rescale={sample.guidance_rescale}: must lie in '
                      f'[0, 1] (phi of Lin et al. 2024)')
  interval = sample.guidance_interval
  if interval and (len(interval) != 2 or not interval[0] <= interval[1]):
    raise ConfigError(f'config.sample.guidance_interval={tuple(interval)}: expected (lo, hi) '
                      f'with lo <= hi, in t')
  return sample


def build_eval(section) -> EvalConfig:
  ev = configuration.from_section(EvalConfig, 'eval', section)
  configuration.positive('eval.num_samples', ev.num_samples)
  configuration.positive('eval.every', ev.every, allow_zero=True)
  configuration.positive('eval.every_num_samples', ev.every_num_samples, allow_zero=True)
  configuration.positive('eval.digits_clip_steps', ev.digits_clip_steps, allow_zero=True)
  if ev.every and not ev.enabled:
    raise ConfigError(f'config.eval.every={ev.every}: in-loop evaluation needs '
                      f'eval.enabled=True')
  for k in ('reference_stats', 'inception_weights'):
    path = getattr(ev, k)
    if path and not os.path.isfile(os.path.expanduser(path)):
      raise ConfigError(f'config.eval.{k}={path!r}: no such file')
  if bool(ev.reference_stats) != bool(ev.inception_weights):
    raise ConfigError('config.eval: FID needs both eval.reference_stats and '
                      'eval.inception_weights')
  return ev


def _check_out_channels(model, objective: objectives.Objective, image_shape) -> None:
  """Nichol & Dhariwal's learned variances: the network outputs 2C channels (prediction, v)."""
  channels = image_shape[-1]
  want = 2 * channels if objective.learned_variance else channels
  got = getattr(model, 'out_channels', None)
  if (got or channels) != want:
    what = ('a prediction and a learned variance' if objective.learned_variance
            else 'one prediction')
    raise ConfigError(f'config.model.out_channels={got}: objective {objective.name!r} needs '
                      f'{want} output channels ({what} per image channel)')


def _check_labels(model, data: sources.DataConfig, source) -> None:
  """A class-conditional model needs data with at most `num_classes` labels."""
  have = getattr(source, 'num_classes', 0)
  if not have:
    raise ConfigError(f'config.model.num_classes={model.num_classes}: data {data.name!r} has '
                      f'no labels to condition on')
  if have > model.num_classes:
    raise ConfigError(f'config.model.num_classes={model.num_classes}: data {data.name!r} has '
                      f'{have} classes')


def check_sampler(sample: SampleConfig, process, objective: objectives.Objective, image_shape):
  """Checks `sample.options` against the sampler's signature and their types
  (`samplers.SAMPLER_OPTIONS`), then traces it abstractly with a stand-in denoiser (no
  compile) so that bad grids, step counts or processes fail now."""
  fn = samplers.SAMPLERS[sample.sampler]
  accepted = [k for k in samplers.SAMPLER_OPTIONS if k in inspect.signature(fn).parameters]
  for k, v in sample.options.items():
    if k not in accepted:
      raise ConfigError(f'config.sample.options.{k}={v!r}: sampler {sample.sampler!r} takes no '
                        f'{k!r}; its options are {accepted}')
  configuration.check_keys('sample.options', sample.options, samplers.SAMPLER_OPTION_TYPES)

  if objective.kind in parameterization.FLOW_MAP_KINDS:     # MeanFlow, shortcut
    denoiser = parameterization.FlowMap(lambda x, t, s, cond=None: x, kind=objective.kind)
  else:
    denoiser = parameterization.Denoiser(
        lambda x, t, cond=None: (x, x), kind=objective.kind,
        with_variance=(lambda x, t, cond=None: (x, x, x)) if objective.learned_variance
        else None)
  x = jax.ShapeDtypeStruct((2,) + tuple(image_shape), jnp.float32)
  try:
    jax.eval_shape(lambda x: fn(denoiser, process, x, jax.random.key(0), steps=sample.steps,
                                **sample.options)[0], x)
  except (TypeError, ValueError) as e:
    raise ConfigError(f'config.sample (sampler={sample.sampler!r}, steps={sample.steps}): '
                      f'{str(e).splitlines()[0]}') from None


def _check_model(model, image_shape, condition=None):
  """Traces `model.init` abstractly (no compile, no allocation) to surface config errors now."""
  x = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  cond = layers.example_cond(model, 1, condition, image_shape)
  try:
    jax.eval_shape(lambda x, t, c: model.init(jax.random.key(0), x, t, c), x, t, cond)
  except (ValueError, TypeError) as e:
    raise ConfigError(f'config.model: {str(e).splitlines()[0]}') from None
