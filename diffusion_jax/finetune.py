"""Starting from a trained run: its EMA parameters as the base of a fine-tune or an adapter.

A run with a `config.base` section (`BaseConfig`: the trained run's work dir, and which of its
checkpoints) begins from that run's EMA parameters instead of a random initialisation:

  * with no adapter, the whole network is fine-tuned (the base replaces every parameter);
  * with an adapter (`config.lora`, `config.control`, ...) the configured model is a wrapper
    whose parameter tree is `{'base': <the base network's parameters>, '<adapter>': ...}`; the
    base is loaded into `'base'` and frozen (`training.make_optimizer(frozen=('base',))`: no
    update, no weight decay, no Adam moments), and the wrapper's optional
    `attach_base(params, base_params) -> params` runs once after loading (ControlNet copies the
    base encoder into its trainable copy there).

The run must describe the same network and process as the base: `config.model`,
`config.process`, `config.objective` and `config.text` (but for how captions are drawn and
prompts sampled) are compared key by key with the base run's `config.json` (defaults filled
in), and the first difference is a one-line `ConfigError`.
The parameters are read when the run initialises (`BaseParts.load`), not when the config is
built, so validating a config never touches the base's checkpoints.
"""

import dataclasses
import json
import os

import ml_collections

from diffusion_jax import configuration
from diffusion_jax.configuration import ConfigError

CONFIG_NAME = 'config.json'
COMPARED = ('model', 'process', 'objective', 'text')
# How a text-conditioned run is sampled, evaluated or captioned may change in a fine-tune.
MAY_DIFFER = ('text.negative_prompt', 'text.eval_templates', 'text.caption_dropout',
              'text.templates', 'text.freeze')


@dataclasses.dataclass(frozen=True)
class BaseConfig:
  workdir: str = ''     # the trained run (its config.json and checkpoints/)
  best: bool = False    # read checkpoints_best/ (the in-loop evaluation's best step)
  step: int = -1        # a given checkpoint step (-1: the newest readable one)


@dataclasses.dataclass(frozen=True)
class BaseParts:
  """A validated `config.base`: the base run's own config, its absolute work dir, and
  `load(step=None) -> (params, step)`, its EMA parameters read on the first call for that step
  (`None`: the step `config.base` names, or the newest / best) and kept for later calls.
  `step` is the checkpoint step they came from, recorded in the adapter's checkpoints."""
  config: BaseConfig
  run_config: ml_collections.ConfigDict
  workdir: str
  _cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def load(self, step: int | None = None):
    key = 'configured' if step is None else int(step)
    if key not in self._cache:
      if step is None:
        step = None if self.config.step < 0 else self.config.step
        best = self.config.best
      else:
        best = False
      base_config, params, got = load_base(self.workdir, best=best, step=step)
      del base_config
      self._cache[key] = self._cache[got] = (params, got)
      self._cache['last'] = got
    return self._cache[key]

  @property
  def loaded_step(self) -> int | None:
    """The checkpoint step of the parameters loaded last (None before any load)."""
    return self._cache.get('last')


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The `config.json` of a run's work dir as a ConfigDict (one-line error if missing)."""
  path = os.path.join(workdir, CONFIG_NAME)
  try:
    with open(path, encoding='utf-8') as f:
      values = json.load(f)
  except FileNotFoundError:
    raise ConfigError(f'config.base.workdir={workdir!r}: no {CONFIG_NAME} there (is it a '
                      f'trained run\'s work dir?)') from None
  except (OSError, ValueError) as e:
    raise ConfigError(f'config.base.workdir={workdir!r}: {path} is unreadable ({e})') from None
  sample = values.get('sample') or {}
  sample['options'] = {k: v for k, v in (sample.get('options') or {}).items() if v is not None}
  return ml_collections.ConfigDict(values)


def _flat(d, prefix='') -> dict:
  out = {}
  for k, v in dict(d).items():
    if isinstance(v, (dict, ml_collections.ConfigDict)) and v:
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _jsonable(v):
  return json.loads(json.dumps(v, default=list))


def first_difference(config, other_config, section: str, defaults: dict, skip=()):
  """`(dotted key, mine, theirs)` of the first key (sorted) of `section` whose value differs
  between two run configs, an absent key read as `defaults` says (else 'absent'); keys in
  `skip` are not compared. None when the sections agree."""
  mine = _flat(config.get(section, {}), f'{section}.')
  theirs = _flat(other_config.get(section, {}), f'{section}.')
  for key, value in defaults.items():
    if key.startswith(section + '.'):
      mine.setdefault(key, value)
      theirs.setdefault(key, value)
  for key in sorted(set(mine) | set(theirs)):
    if key in skip:
      continue
    a = _jsonable(mine[key]) if key in mine else 'absent'
    b = _jsonable(theirs[key]) if key in theirs else 'absent'
    if a != b:
      return key, a, b
  return None


def check_same_network(config, base_config, workdir: str, defaults: dict,
                       compared=COMPARED) -> None:
  """The first key of the `compared` sections (model, process, objective, text) that differs
  from the base run's (`defaults`: dotted key -> what an absent key means) is a one-line
  `ConfigError`."""
  for section in compared:
    diff = first_difference(config, base_config, section, defaults, skip=MAY_DIFFER)
    if diff is not None:
      key, a, b = diff
      raise ConfigError(f'config.{key}={a!r} but the base run in {workdir} has {b!r}: an '
                        f'adapter or fine-tune needs the base\'s own network and process')


def build_base(section, config, defaults: dict, compared=COMPARED) -> BaseParts:
  """Validates `config.base` against the run's config (`defaults` and `compared` as for
  `check_same_network`); the returned parts load the parameters lazily."""
  base = configuration.from_section(BaseConfig, 'base', section)
  if not base.workdir:
    raise ConfigError('config.base.workdir is empty: name the trained run to start from')
  workdir = os.path.abspath(os.path.expanduser(base.workdir))
  if not os.path.isdir(workdir):
    raise ConfigError(f'config.base.workdir={base.workdir!r}: no such directory')
  if base.step < -1:
    raise ConfigError(f'config.base.step={base.step}: a checkpoint step, or -1 for the newest')
  base_config = read_run_config(workdir)
  # An adapter run's checkpoints hold the adapter only; a whole-network fine-tune (config.base
  # alone, e.g. a distillation round started from its teacher) holds a whole network.
  for section_name in ('lora', 'control'):
    if section_name in base_config:
      raise ConfigError(f'config.base.workdir={base.workdir!r} is itself an adapter run '
                        f'(config.{section_name}); start from the plain run it was built on')
  check_same_network(config, base_config, workdir, defaults, compared)
  return BaseParts(base, base_config, workdir)


def load_base(workdir: str, *, best: bool = False, step: int | None = None):
  """`(base_config, ema_params, step)` of a trained run, read from its checkpoints onto this
  process's devices (the newest readable step, `step`, or with `best` the best one)."""
  from diffusion_jax import train_loop  # pylint: disable=g-import-not-at-top (a cycle)
  base_config = read_run_config(workdir)
  _, state, got = train_loop.load_checkpoint(base_config, workdir, step=step, best=best)
  return base_config, state.ema_params, int(got)


def _without_base(tree):
  return {k: v for k, v in tree.items() if k != 'base'}


def checkpoint_view(parts: BaseParts):
  """`(strip, fill)` for `checkpointing.Checkpointer(view=...)`: an adapter's checkpoints
  hold the adapter (parameters, averages, optimizer state) but not the frozen base, which is
  read again from the base run's checkpoint step recorded in the step's meta
  (`meta['base']['step']`, written by `base_meta`)."""
  def strip(state):
    return state.replace(params=_without_base(state.params),
                         ema_params=_without_base(state.ema_params),
                         posthoc_ema=tuple(_without_base(p) for p in state.posthoc_ema))

  def fill(restored, target, meta):
    import jax  # pylint: disable=g-import-not-at-top
    step = (meta.get('base') or {}).get('step')
    if step is None:
      raise ConfigError(f'config.base: the checkpoint does not say which step of '
                        f'{parts.workdir} it was trained on (meta["base"]["step"] is missing)')
    try:
      params, _ = parts.load(int(step))
    except Exception as e:  # pylint: disable=broad-except  # any unreadable base is the same error
      raise ConfigError(f'config.base: this run was started from checkpoint step {step} of '
                        f'{parts.workdir}, which cannot be read now '
                        f'({str(e).splitlines()[0]})') from None
    def placed():      # a buffer of its own per copy: the train step donates the state
      return jax.tree.map(lambda p, t: jax.device_put(p, getattr(t, 'sharding', None),
                                                      may_alias=False),
                          params, target.params['base'])
    return restored.replace(params={**restored.params, 'base': placed()},
                            ema_params={**restored.ema_params, 'base': placed()},
                            posthoc_ema=tuple({**p, 'base': placed()}
                                              for p in restored.posthoc_ema))
  return strip, fill


def setup_view(setup):
  """The checkpoint view of a run's setup: an adapter run saves its adapter, not its frozen
  base (`checkpoint_view`); None for every other run."""
  if 'base' in getattr(setup, 'frozen', ()):
    return checkpoint_view(setup.base)
  return None


def base_meta(parts: BaseParts | None) -> dict:
  """What a checkpoint's meta records of the base: its work dir and step."""
  if parts is None:
    return {}
  return {'base': {'workdir': parts.workdir, 'step': parts.loaded_step}}


def attach(model, params, base_params):
  """`params` with the base loaded: the whole tree for a plain fine-tune, else the
  wrapper's `attach_base` (default: `{**params, 'base': base_params}`). The base must have
  the shapes the model expects (a one-line error names the first that does not)."""
  import jax  # pylint: disable=g-import-not-at-top
  is_wrapper = isinstance(params, dict) and 'base' in params
  expected = params['base'] if is_wrapper else params
  got_paths = dict(jax.tree_util.tree_flatten_with_path(base_params)[0])
  want_paths = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
  for path in want_paths:
    name = jax.tree_util.keystr(path)
    if path not in got_paths:
      raise ConfigError(f'config.base: the base run has no parameter {name}')
    if got_paths[path].shape != want_paths[path].shape:
      raise ConfigError(f'config.base: parameter {name} has shape {got_paths[path].shape} in '
                        f'the base run but {want_paths[path].shape} here')
  if len(got_paths) != len(want_paths):
    extra = sorted(jax.tree_util.keystr(p) for p in set(got_paths) - set(want_paths))
    raise ConfigError(f'config.base: the base run has parameters this model lacks: {extra[:3]}')
  if not is_wrapper:
    return base_params
  hook = getattr(model, 'attach_base', None)
  return hook(params, base_params) if hook is not None else {**params, 'base': base_params}
