"""A trained run as a distillation's teacher (`config.teacher`, `diffusion_jax.teacher`)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits as digits_config
from diffusion_jax import checkpointing
from diffusion_jax import parameterization
from diffusion_jax import run_config
from diffusion_jax import train_loop
from diffusion_jax import workdir as workdir_lib
from diffusion_jax.configuration import ConfigError


def _toy(steps=3, objective=None):
  """The default recipe (EDM) on the 2-D mixture with a tiny MLP: seconds to train."""
  c = digits_config.get_config('smoke')
  c.data = digits_config.data_section(name='toy2d', toy='eight_gaussians')
  c.model = digits_config.model_section(name='mlp', hidden=16, depth=1)
  c.train.update(num_steps=steps, checkpoint_every=steps, log_every=1, batch_size=16)
  c.eval.enabled = False
  c.sample.update(grid_size=0, clip_x0=0.0, steps=4, batch_size=16)
  c.eval.num_samples = 16
  if objective is not None:
    c.objective = objective
  return c


@pytest.fixture(scope='module')
def teacher_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('teacher'))
  train_loop.train_and_evaluate(_toy(), workdir)
  return workdir


def test_a_distillation_uses_the_teacher_runs_ema_denoiser(teacher_run, tmp_path):
  c = _toy(steps=2, objective=dict(name='consistency_distillation'))
  c.teacher = dict(workdir=teacher_run)
  setup = run_config.build(c)
  # The teacher the objective gets is the teacher run's own EMA network and objective record.
  _, state, step = train_loop.load_checkpoint(_toy(), teacher_run)
  teacher_setup = run_config.build(_toy())
  direct = parameterization.make_denoiser(
      lambda x, t, cond: teacher_setup.model.apply({'params': state.ema_params}, x, t, cond),
      teacher_setup.process, teacher_setup.objective)
  x = jax.random.normal(jax.random.key(0), (5, 2))
  t = jnp.linspace(0.1, 0.9, 5)
  got = setup.teacher.denoiser()(x, t)
  want = direct(x, t)
  for a, b in zip(got, want, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert setup.teacher.denoiser().kind == 'edm' and setup.teacher.loaded_step == step == 3
  # It trains through the loop, and every checkpoint says which teacher step it learnt from.
  train_loop.train_and_evaluate(c, str(tmp_path))
  ckpt = checkpointing.Checkpointer(os.path.join(str(tmp_path), 'checkpoints'))
  meta = ckpt.read_meta(2)
  ckpt.close()
  assert meta['teacher'] == {'workdir': teacher_run, 'step': 3}


def _written(tmp_path, config):
  os.makedirs(tmp_path, exist_ok=True)
  workdir_lib.write_config(config, str(tmp_path))
  return str(tmp_path)


def test_a_teacher_of_another_process_is_refused(tmp_path):
  teacher = _toy()
  teacher.process.sigma_max = 40.0
  c = _toy(objective=dict(name='consistency_distillation'))
  c.teacher = dict(workdir=_written(tmp_path, teacher))
  with pytest.raises(ConfigError, match=r"config.process.sigma_max=80.0 but the teacher run in "
                     r".* has 40.0: a distillation needs the teacher's own process"):
    run_config.build(c)


def test_teacher_sections_must_match_the_objective(tmp_path):
  c = _toy(objective=dict(name='consistency_distillation'))
  with pytest.raises(ConfigError, match=r"'consistency_distillation' distils a trained model: "
                     r"set config.teacher.workdir"):
    run_config.build(c)
  c = _toy()
  c.teacher = dict(workdir=_written(tmp_path, _toy()))
  with pytest.raises(ConfigError, match=r"config.teacher is set but config.objective.name='edm' "
                     r"learns from data alone"):
    run_config.build(c)
  c = _toy(objective=dict(name='consistency_distillation'))
  c.teacher = dict(workdir=str(tmp_path / 'nowhere'))
  with pytest.raises(ConfigError, match=r'config.teacher.workdir=.*nowhere.*: no such directory'):
    run_config.build(c)
  c.teacher = dict(workdir='')
  with pytest.raises(ConfigError, match=r'config.teacher.workdir is empty'):
    run_config.build(c)


def test_a_student_starting_from_the_teacher_must_predict_its_kind(tmp_path):
  teacher = _toy()
  teacher.objective = dict(name='dsm')       # a score network on the EDM process
  c = _toy(objective=dict(name='consistency_distillation'))
  c.teacher = c.base = dict(workdir=_written(tmp_path / 'score', teacher))
  with pytest.raises(ConfigError, match=r"config.objective predicts 'consistency' but the "
                     r"teacher .* predicts 'score'"):
    run_config.build(c)
  # An EDM teacher's weights carry over to a consistency student (CM's initialisation).
  c.teacher = c.base = dict(workdir=_written(tmp_path / 'edm', _toy()))
  assert run_config.build(c).base.workdir == str(tmp_path / 'edm')


def test_reflow_may_straighten_a_teacher_of_another_process(tmp_path):
  # Reflow uses only the teacher's noise -> data map (solved on the teacher's own process), so
  # an EDM teacher serves a student on the linear interpolant; progressive distillation, which
  # calls the teacher on the student's path, still refuses it.
  teacher = _written(tmp_path, _toy())
  c = _toy(objective=dict(name='reflow'))
  c.process = dict(name='linear')
  c.teacher = dict(workdir=teacher)
  setup = run_config.build(c)
  assert (setup.objective.name, setup.objective.kind) == ('reflow', 'velocity')
  assert type(setup.teacher.process).__name__ == 'EDM'
  c.objective = dict(name='progressive_distillation', student_steps=4)
  with pytest.raises(ConfigError, match=r"config.process.name='linear' but the teacher run .* "
                     r"has 'edm'"):
    run_config.build(c)


def test_a_few_step_map_cannot_teach(tmp_path):
  # A consistency model (or a DMD generator, a MeanFlow or shortcut model) maps noise to data
  # in jumps; its "denoiser" is not the PF-ODE's, so a distillation from it would be wrong.
  teacher = _toy(objective=dict(name='consistency_training', total_steps=3))
  c = _toy(objective=dict(name='consistency_distillation'))
  c.teacher = dict(workdir=_written(tmp_path, teacher))
  with pytest.raises(ConfigError, match=r"trained 'consistency_training', a few-step map from "
                     r"noise to data, not a denoiser of the probability-flow ODE"):
    run_config.build(c)
