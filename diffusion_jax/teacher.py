"""A trained run as the teacher of a distillation: `config.teacher`.

A distillation objective (`objectives.NEEDS_TEACHER`: consistency distillation, progressive
distillation, sCD, reflow, DMD) learns from a trained model's denoiser. `config.teacher.workdir`
names that run; its `config.json` says its network, process and objective, and its checkpoint
holds the EMA parameters the teacher uses (`step`, or the newest; `best` for the in-loop
evaluation's best step).

The teacher enters the objective as an ordinary `parameterization.Denoiser` (frozen: it is a
function of `(x_t, t, cond)` only, and the loss calls it under `stop_gradient`), built from the
teacher run's own objective record, so a teacher trained with any objective serves. Its
parameters are read when the train step is first traced, not when the config is built, so
validating a config never touches the teacher's checkpoints; they are constants of the compiled
step (fine for the models this library trains on one host; a teacher too large for that would be
passed as an argument instead).

A distillation needs the teacher's process: `config.process` must equal the teacher run's,
key by key, else a one-line `ConfigError` names the first difference (reflow, which uses only
the teacher's whole noise -> data map, solves the teacher on its own process instead). A
student that starts from the teacher's weights (`config.base.workdir` = the teacher's) must
also predict what the teacher predicts (the same prediction kind).
"""

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from diffusion_jax import configuration
from diffusion_jax import finetune
from diffusion_jax import objectives
from diffusion_jax import parameterization
from diffusion_jax.configuration import ConfigError


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  workdir: str = ''     # the trained teacher run (its config.json and checkpoints/)
  best: bool = False    # read checkpoints_best/ (the in-loop evaluation's best step)
  step: int = -1        # a given checkpoint step (-1: the newest readable one)


@dataclasses.dataclass(frozen=True)
class TeacherParts:
  """A validated `config.teacher`: the teacher run's config and the pieces built from it
  (`process`, `objective`, `model`), and `load() -> (params, step)`, its EMA parameters read on
  the first call and kept."""
  config: TeacherConfig
  run_config: ml_collections.ConfigDict
  workdir: str
  process: Any
  objective: Any
  model: Any
  _cache: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def load(self):
    if 'params' not in self._cache:
      step = None if self.config.step < 0 else self.config.step
      with jax.ensure_compile_time_eval():    # read eagerly, also when first called in a trace
        _, params, got = finetune.load_base(self.workdir, best=self.config.best, step=step)
      self._cache['params'], self._cache['step'] = params, got
    return self._cache['params'], self._cache['step']

  @property
  def loaded_step(self) -> int | None:
    return self._cache.get('step')

  @property
  def kind(self) -> str:
    return self.objective.kind

  def denoiser(self) -> parameterization.Denoiser:
    """The teacher's sampling denoiser; its parameters are read at the first call (trace)."""
    template = parameterization.make_denoiser(lambda x, t, c: x, self.process, self.objective)

    def fn(x_t, t, cond=None):
      params, _ = self.load()

      def model_fn(x, s, c):
        return self.model.apply({'params': params}, x, s, c)
      return parameterization.make_denoiser(model_fn, self.process, self.objective)(x_t, t, cond)
    return dataclasses.replace(template, fn=fn, with_variance=None)


def build_teacher(section, config, defaults: dict, build_parts) -> TeacherParts:
  """Validates `config.teacher` against the run's `config`; `build_parts(run_config) ->
  (process, objective, model)` builds the teacher's own pieces (run_config's builders).
  `defaults` (dotted key -> value an absent key means) as for `finetune.check_same_network`.
  The teacher's process must be the run's unless the run's objective is in
  `objectives.ANY_TEACHER_PROCESS` (reflow, sCD: they solve the teacher on its own process)."""
  teacher = configuration.from_section(TeacherConfig, 'teacher', section)
  if not teacher.workdir:
    raise ConfigError('config.teacher.workdir is empty: name the trained run to distil from')
  workdir = os.path.abspath(os.path.expanduser(teacher.workdir))
  if not os.path.isdir(workdir):
    raise ConfigError(f'config.teacher.workdir={teacher.workdir!r}: no such directory')
  if teacher.step < -1:
    raise ConfigError(f'config.teacher.step={teacher.step}: a checkpoint step, or -1 for the '
                      f'newest')
  try:
    run_config = finetune.read_run_config(workdir)
  except ConfigError as e:
    raise ConfigError(str(e).replace('config.base.workdir', 'config.teacher.workdir')) from None
  # A plain fine-tune (config.base alone) or an earlier distillation is a whole network.
  for name in ('lora', 'control', 'superres', 'mel', 'text', 'latent'):
    if name in run_config:
      raise ConfigError(f'config.teacher.workdir={teacher.workdir!r} is a run with '
                        f'config.{name}: a teacher must be a whole class-conditional or '
                        f'unconditional network (no adapter, no text encoder)')
  kind_of = run_config.get('objective', {}).get('name')
  if kind_of in objectives.FEW_STEP_MAPS:
    raise ConfigError(f'config.teacher.workdir={teacher.workdir!r} trained {kind_of!r}, a '
                      f'few-step map from noise to data, not a denoiser of the probability-flow '
                      f'ODE: a teacher must be a diffusion or flow model')
  if config.get('objective', {}).get('name') not in objectives.ANY_TEACHER_PROCESS:
    check_same_process(config, run_config, workdir, defaults)
  process, objective, model = build_parts(run_config)
  return TeacherParts(teacher, run_config, workdir, process, objective, model)


def objective_values(name: str, parts: TeacherParts | None) -> dict:
  """The arguments a distillation objective `name` takes from its teacher (`{}` for one that
  learns from data alone): `teacher`, the teacher's denoiser; `teacher_process` where the
  objective solves the teacher on its own process (or, for DMD, scores on it); `fake_objective`,
  the teacher's objective, which DMD's fake score trains with. One-line errors for a
  distillation without a teacher and a teacher without a distillation."""
  if name not in objectives.NEEDS_TEACHER:
    if parts is not None:
      raise ConfigError(f'config.teacher is set but config.objective.name={name!r} learns from '
                        f'data alone; distillations are {sorted(objectives.NEEDS_TEACHER)}')
    return {}
  if parts is None:
    raise ConfigError(f'config.objective.name={name!r} distils a trained model: set '
                      f'config.teacher.workdir to the teacher run')
  values = {'teacher': parts.denoiser()}
  if name in objectives.ANY_TEACHER_PROCESS | objectives.TAKES_TEACHER_OBJECTIVE:
    values['teacher_process'] = parts.process
  if name in objectives.TAKES_TEACHER_OBJECTIVE and not parts.objective.learned_variance:
    values['fake_objective'] = parts.objective
  return values


def check_same_process(config, teacher_config, workdir: str, defaults: dict) -> None:
  """The first key of `config.process` that differs from the teacher run's is a one-line
  `ConfigError`: a distillation follows the teacher's own noising process."""
  diff = finetune.first_difference(config, teacher_config, 'process', defaults)
  if diff is not None:
    key, a, b = diff
    raise ConfigError(f'config.{key}={a!r} but the teacher run in {workdir} has {b!r}: a '
                      f'distillation needs the teacher\'s own process')


# (teacher kind, student kind) whose network outputs mean the same but for the output's
# combination: a consistency model's `c_in`, `c_noise` are EDM's, and Song et al. 2023 (§6)
# start consistency distillation from the EDM teacher's weights.
CARRY_OVER = frozenset({('edm', 'consistency')})


def check_student_kind(student_kind: str, parts: TeacherParts, base_workdir: str | None):
  """A student that starts from the teacher's weights must predict the teacher's kind (or a
  kind in `CARRY_OVER` with it)."""
  if base_workdir is None:
    return
  if os.path.abspath(os.path.expanduser(base_workdir)) != parts.workdir:
    return
  if student_kind != parts.kind and (parts.kind, student_kind) not in CARRY_OVER:
    raise ConfigError(f'config.objective predicts {student_kind!r} but the teacher in '
                      f'{parts.workdir} (also config.base) predicts {parts.kind!r}: a student '
                      f'that starts from the teacher\'s weights must predict the same kind')


def teacher_meta(parts: TeacherParts | None) -> dict:
  """What a checkpoint's meta records of the teacher: its work dir and step."""
  if parts is None:
    return {}
  return {'teacher': {'workdir': parts.workdir, 'step': parts.loaded_step}}
