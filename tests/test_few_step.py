"""The few-step methods as runs: configs, refusals and the ablation's plan (`ablate_few_step`).

The methods' math is tested against closed forms in tests/test_distill_*.py; here, what a run
of each is made of, and that a bad combination fails in one line when the config is built.
"""

import os

import numpy as np
import pytest

from configs import ablation_few_step
from diffusion_jax import run_config
from diffusion_jax.models import layers
from diffusion_jax import workdir as workdir_lib
from diffusion_jax.configuration import ConfigError
from diffusion_jax.distill import dmd
from diffusion_jax.distill import progressive
from diffusion_jax.distill import trigflow
from experiments import few_step_lib


def _toy():
  c = ablation_few_step.get_config('toy2d')
  del c['ablation']
  return c


def test_a_flow_map_model_sampled_with_a_plain_sampler_is_a_one_line_error():
  c = _toy()
  c.process = dict(name='linear')
  c.objective = dict(name='meanflow')
  c.model.delta_input = True
  c.sample.sampler = 'dpm_solver_pp_2m'
  with pytest.raises(ConfigError, match=r"sampler='dpm_solver_pp_2m'.*a 'mean_velocity' model "
                     r"is a flow map .* sample it with samplers.flow_map_sample"):
    run_config.build(c)
  c.sample.sampler = 'flow_map'
  assert run_config.build(c).objective.kind == 'mean_velocity'
  # And the other way round: a denoiser's run with the flow-map sampler.
  c = _toy()
  c.sample.sampler = 'flow_map'
  with pytest.raises(ConfigError, match=r'flow_map_sample needs a parameterization.FlowMap'):
    run_config.build(c)


def test_a_two_time_network_needs_its_delta_input():
  c = _toy()
  c.process = dict(name='linear')
  c.objective = dict(name='shortcut')
  c.sample.sampler = 'flow_map'
  with pytest.raises(ConfigError, match=r"config.objective.name='shortcut' feeds the network a "
                     r"second time .*: set config.model.delta_input=True"):
    run_config.build(c)
  c.model.delta_input = True
  cond = layers.example_cond(run_config.build(c).model)
  assert set(cond) == {'delta'} and cond['delta'].shape == (1,)


def test_dmd_refuses_a_teacher_of_another_process(tmp_path):
  teacher = _toy()
  teacher.process = dict(name='vp_cosine')
  workdir_lib.write_config(teacher, str(tmp_path))
  c = _toy()
  c.objective = dict(name='dmd')
  c.teacher = dict(workdir=str(tmp_path))
  with pytest.raises(ConfigError, match=r"config.process.name='edm' but the teacher run .* has "
                     r"'vp_cosine': a distillation needs the teacher's own process"):
    run_config.build(c)


def test_the_plan_chains_progressive_rounds_at_equal_student_steps(tmp_path):
  c = ablation_few_step.get_config('toy2d')
  c.ablation.methods = 'progressive,cd,dmd,scd,meanflow'
  c.ablation.seeds = '0,1'
  c.ablation.student_steps = 400
  plan = few_step_lib.make_plan(c, str(tmp_path))
  names = [s.name for s in plan]
  assert names[0] == 'teacher' and len(names) == 1 + 2 * (4 + 4)
  teacher_dir = os.path.join(str(tmp_path), 'runs', 'teacher')
  rounds = [s for s in plan if s.method == 'progressive' and s.seed == 1]
  # Four rounds of 100 steps: the same 400 student updates as every other method.
  assert [s.config.train.num_steps for s in rounds] == [100] * 4
  assert all(s.config.train.num_steps == 400 for s in plan
             if s.method not in ('teacher', 'progressive'))
  # Round r learns from round r - 1 (round 0 from the teacher) and starts from its weights.
  previous = teacher_dir
  edm = run_config.build_process(c.process)
  for r, (stage, steps) in enumerate(zip(rounds, [8, 4, 2, 1], strict=True)):
    assert stage.name == f'progressive_s1_r{r}'
    assert stage.config.teacher.workdir == stage.config.base.workdir == previous
    assert stage.config.objective.student_steps == steps
    # Each round is measured once, at its own steps, on the grid it was distilled on.
    (cell,) = stage.cells
    assert cell[:3] == ('euler', steps, steps)
    np.testing.assert_array_equal(cell[3]['grid'], progressive.student_times(edm, steps,
                                                                             'karras'))
    previous = stage.run_dir
  cd = next(s for s in plan if s.name == 'cd_s0')
  assert cd.config.teacher.workdir == cd.config.base.workdir == teacher_dir
  dmd_stage = next(s for s in plan if s.name == 'dmd_s0')
  assert [c[1] for c in dmd_stage.cells] == [1, 2, 4]
  assert dmd_stage.cells[2][3]['times'] == tuple(dmd.generator_times(edm, 4))
  scd = next(s for s in plan if s.name == 'scd_s0')
  assert scd.cells[1][3]['times'] == tuple(trigflow.sample_times(2))
  assert 'base' not in scd.config and scd.config.process.name == 'trigflow'
  meanflow = next(s for s in plan if s.name == 'meanflow_s0')
  assert 'teacher' not in meanflow.config and meanflow.config.model.delta_input


def test_unknown_methods_and_spec_keys_are_named(tmp_path):
  c = ablation_few_step.get_config('toy2d')
  c.ablation.methods = 'cd,nope'
  with pytest.raises(ConfigError, match=r"unknown method 'nope'"):
    few_step_lib.make_plan(c, str(tmp_path))
  c = ablation_few_step.get_config('toy2d')
  c.ablation.methods = 'cd'
  c.ablation.runs.cd.sampler = 'warp'
  with pytest.raises(ConfigError, match=r"runs.cd.sampler='warp': not a sampler name"):
    few_step_lib.make_plan(c, str(tmp_path))
