"""Starting from a trained run (`config.base`) and image-derived conditions (`data.derived`)."""

import os

import jax
import numpy as np
import pytest

from configs import digits as digits_config
from diffusion_jax import checkpointing
from diffusion_jax import finetune
from diffusion_jax import run_config
from diffusion_jax import train_loop
from diffusion_jax import training
from diffusion_jax import workdir as workdir_lib
from diffusion_jax.configuration import ConfigError
from diffusion_jax.data import derived
from diffusion_jax.data import sources


def _smoke(steps=4):
  c = digits_config.get_config('eps,smoke')
  c.train.update(num_steps=steps, checkpoint_every=steps, log_every=1)
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


class _Parts:
  """A stand-in for `finetune.BaseParts` whose base is an array tree in memory."""

  def __init__(self, params):
    self.params, self.workdir, self.asked = params, '/base/run', []

  def load(self, step=None):
    self.asked.append(step)
    if step != 7:
      raise FileNotFoundError(f'no checkpoint step {step}')
    return self.params, 7


def test_an_adapters_checkpoint_leaves_out_the_base_and_reads_it_back():
  base = {'w': np.arange(3.0, dtype=np.float32)}
  tree = lambda b, a: {'base': b, 'adapter': a}
  state = training.TrainState(
      step=np.int32(5), params=tree(base, {'a': np.ones(2)}),
      ema_params=tree(base, {'a': np.full(2, 0.5)}), opt_state=(), key=np.zeros(2, np.uint32),
      skipped=np.int32(0), consecutive_skips=np.int32(0),
      posthoc_ema=(tree(base, {'a': np.zeros(2)}),))
  parts = _Parts({'w': np.arange(3.0, dtype=np.float32) + 1})
  strip, fill = finetune.checkpoint_view(parts)
  saved = strip(state)
  assert 'base' not in saved.params and 'base' not in saved.ema_params
  assert 'base' not in saved.posthoc_ema[0] and saved.params['adapter'] is state.params['adapter']
  back = fill(saved, state, {'base': {'workdir': '/base/run', 'step': 7}})
  assert parts.asked == [7]                 # the recorded step, not the newest
  for got in (back.params, back.ema_params, back.posthoc_ema[0]):
    np.testing.assert_array_equal(got['base']['w'], [1.0, 2.0, 3.0])
  np.testing.assert_array_equal(back.ema_params['adapter']['a'], [0.5, 0.5])
  with pytest.raises(ConfigError, match=r'started from checkpoint step 3 of /base/run, which '
                                        r'cannot be read now \(no checkpoint step 3\)'):
    fill(saved, state, {'base': {'step': 3}})
  with pytest.raises(ConfigError, match='does not say which step'):
    fill(saved, state, {})


def _lora(base_run, steps):
  c = _smoke(steps)
  c.train.checkpoint_every = 2
  c.base = dict(workdir=base_run, best=False, step=-1)
  c.lora = dict(rank=2, alpha=2.0)
  return c


@pytest.mark.slow
def test_a_lora_run_checkpoints_only_its_adapters_and_resumes_exactly(base_run, tmp_path):
  whole, split = str(tmp_path / 'whole'), str(tmp_path / 'split')
  train_loop.train_and_evaluate(_lora(base_run, 4), whole)
  train_loop.train_and_evaluate(_lora(base_run, 2), split)
  train_loop.train_and_evaluate(_lora(base_run, 4), split)        # resumed at step 2
  with checkpointing.Checkpointer(os.path.join(whole, 'checkpoints'), read_only=True) as ckpt:
    saved = ckpt._manager.item_metadata(4)['state']  # pylint: disable=protected-access
    assert sorted(saved['params']) == ['lora'] and sorted(saved['ema_params']) == ['lora']
    assert ckpt.read_meta(4)['base']['step'] == 4
  _, a, _ = train_loop.load_checkpoint(_lora(base_run, 4), whole)
  _, b, _ = train_loop.load_checkpoint(_lora(base_run, 4), split)
  _, base, _ = train_loop.load_checkpoint(_smoke(), base_run)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for got in (a.params['base'], a.ema_params['base']):   # frozen, bit for bit
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(base.ema_params), strict=True):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_frozen_subtrees_average_is_the_subtree_itself():
  # d e + (1 - d) p with e = p rounds an ulp away for some p; a frozen base must not drift.
  rng = np.random.default_rng(0)
  params = {'base': {'w': rng.normal(size=256).astype(np.float32)},
            'adapter': {'w': np.zeros(4, np.float32)}}

  def loss_fn(p, model_state, batch, key, step):
    del key, step
    return jax.numpy.sum((p['adapter']['w'] - batch) ** 2) + jax.numpy.sum(p['base']['w']), (
        {}, model_state)

  cfg = training.OptimConfig(lr=0.1, warmup_steps=0, grad_clip=0.0)
  opt = training.make_optimizer(cfg, 10, frozen=('base',))
  ema = training.ema(0.9, warmup=False)
  step = jax.jit(training.make_loss_train_step(loss_fn, opt, ema, frozen=('base',)))
  state = training.init_train_state(params, opt, ema, jax.random.key(0))
  for _ in range(3):
    state, _ = step(state, np.ones(4, np.float32))
  np.testing.assert_array_equal(state.params['base']['w'], params['base']['w'])
  np.testing.assert_array_equal(state.ema_params['base']['w'], params['base']['w'])
  assert np.all(np.asarray(state.ema_params['adapter']['w']) > 0)


def test_lora_sections_fail_on_the_lora_key(tmp_path):
  workdir_lib.write_config(_smoke(), str(tmp_path))
  c = _smoke()
  c.base = dict(workdir=str(tmp_path))
  c.lora = dict(rank=0)
  with pytest.raises(ConfigError, match=r'^config.lora: .*rank'):
    run_config.build(c)
  c.lora = dict(rank=2, targets=('no_such_layer/kernel',))
  with pytest.raises(ConfigError, match=r"^config.lora: .*'no_such_layer/kernel' matches nothing"):
    run_config.build(c)
  c.lora = dict(rank=2)
  setup = run_config.build(c)
  assert type(setup.model).__name__ == 'LoraModel' and setup.frozen == ('base',)


def test_lora_wraps_a_text_conditioned_network(tmp_path):
  from configs import text_digits  # pylint: disable=g-import-not-at-top
  workdir_lib.write_config(text_digits.get_config('smoke'), str(tmp_path))
  c = text_digits.get_config('smoke')
  c.base = dict(workdir=str(tmp_path))
  c.lora = dict(rank=2)
  c.text.negative_prompt = 'a thin digit'          # sampling choices may differ from the base
  setup = run_config.build(c)
  assert setup.frozen == ('base',) and setup.cond_key == 'tokens'
  assert setup.model.context_length == setup.text.length
  c.text.width = 2 * c.text.width
  with pytest.raises(ConfigError, match=r'config.text.width=.* but the base run'):
    run_config.build(c)
