"""Starting from a trained run (`config.base`) and image-derived conditions (`data.derived`)."""

import jax
import numpy as np
import pytest

from configs import digits as digits_config
from diffusion_jax import finetune
from diffusion_jax import run_config
from diffusion_jax import train_loop
from diffusion_jax import workdir as workdir_lib
from diffusion_jax.configuration import ConfigError
from diffusion_jax.data import derived
from diffusion_jax.data import sources


def _smoke(steps=4):
  c = digits_config.get_config('smoke')
  c.train.update(num_steps=steps, checkpoint_every=steps, log_every=steps)
  c.eval.enabled = False
  c.sample.grid_size = 0
  return c


@pytest.fixture(scope='module')
def base_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('base'))
  train_loop.train_and_evaluate(_smoke(), workdir)
  return workdir


@pytest.mark.slow
def test_a_finetune_starts_from_the_base_runs_ema_parameters(base_run, tmp_path):
  _, state, _ = train_loop.load_checkpoint(_smoke(), base_run)
  c = _smoke(steps=1)
  c.base = dict(workdir=base_run, best=False, step=-1)
  setup = run_config.build(c)
  optimizer, ema_fn = train_loop._optimizer_and_ema(setup)  # pylint: disable=protected-access
  init = train_loop.init_state_fn(setup, optimizer, ema_fn)
  fresh = init(jax.random.key(1), base=train_loop.base_params(setup))
  for a, b in zip(jax.tree.leaves(fresh.params), jax.tree.leaves(state.ema_params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A plain fine-tune trains every parameter (no frozen subtree).
  assert setup.frozen == ()
  # And it runs through the loop.
  train_loop.train_and_evaluate(c, str(tmp_path))


def test_the_base_must_be_the_same_network(tmp_path):
  base_run = str(tmp_path)       # the comparison reads the base's config.json only
  workdir_lib.write_config(_smoke(), base_run)
  c = _smoke()
  c.model.ch = 16
  c.base = dict(workdir=base_run)
  with pytest.raises(ConfigError, match=r'config.model.ch=16 but the base run .* has 8'):
    run_config.build(c)
  c = _smoke()
  c.process.schedule = 'cosine'
  c.base = dict(workdir=base_run)
  with pytest.raises(ConfigError, match=r"config.process.schedule='cosine'"):
    run_config.build(c)


def test_bad_base_sections(tmp_path):
  c = _smoke()
  c.base = dict(workdir=str(tmp_path / 'nowhere'))
  with pytest.raises(ConfigError, match='no such directory'):
    run_config.build(c)
  c.base = dict(workdir=str(tmp_path))
  with pytest.raises(ConfigError, match='no config.json'):
    run_config.build(c)
  c.base = dict(workdir='')
  with pytest.raises(ConfigError, match='config.base.workdir is empty'):
    run_config.build(c)
  c = _smoke()
  c.lora = dict(rank=2)
  with pytest.raises(ConfigError, match='config.lora: .* set config.base.workdir'):
    run_config.build(c)


def test_attach_names_a_misshapen_parameter():
  params = {'conv': {'kernel': np.zeros((3, 3, 1, 8))}}
  with pytest.raises(ConfigError, match=r"\['conv'\]\['kernel'\] has shape \(3, 3, 1, 4\)"):
    finetune.attach(None, params, {'conv': {'kernel': np.zeros((3, 3, 1, 4))}})
  wrapped = {'base': params, 'adapter': {'a': np.ones(2)}}
  out = finetune.attach(None, wrapped, {'conv': {'kernel': np.ones((3, 3, 1, 8))}})
  assert out['adapter'] is wrapped['adapter'] and out['base']['conv']['kernel'].sum() == 72


def _halves(images):     # a toy condition: the 2x2 average-pooled image
  n, h, w, c = images.shape
  return images.reshape(n, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def test_derived_source_adds_the_condition_of_each_examples_image():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (10, 4, 4, 1)).astype(np.float32)
  base = sources.ArraySource(images, np.arange(10) % 3, num_classes=3)
  cond = derived.ImageCondition('low_res', _halves)
  src = derived.DerivedSource(base, cond)
  assert cond.shape((4, 4, 1)) == (2, 2, 1)
  batch = src.batch(seed=0, step=3, global_batch=4)
  np.testing.assert_array_equal(batch['image'], base.batch(0, 3, 4)['image'])
  expect = batch['image'].reshape(4, 2, 2, 2, 2, 1).mean(axis=(2, 4))
  np.testing.assert_allclose(batch['low_res'], expect, rtol=0, atol=1e-7)
  one = src.example(7)
  np.testing.assert_allclose(one['low_res'], images[7].reshape(2, 2, 2, 2, 1).mean(axis=(1, 3)),
                             rtol=0, atol=1e-7)
  assert src.num_classes == 3 and len(src) == 10 and src.images is images
  conds, refs = derived.held_out(cond, images[:3], 5)
  np.testing.assert_array_equal(refs, images[[0, 1, 2, 0, 1]])
  assert conds.shape == (5, 2, 2, 1)
  with pytest.raises(ValueError, match="would replace the batch's own 'label'"):
    derived.DerivedSource(base, derived.ImageCondition('label', _halves))
