"""Every model family trains and samples through the training loop (configs/digits.py variants).

The wiring of each variant is traced abstractly (config -> model -> train step and sampler,
`jax.eval_shape`, no compile); one class-conditional DiT run goes through the whole loop for
real (train, checkpoint, sample with guidance); the other full runs are `slow`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import digits as digits_config
from diffusion_jax import run_config
from diffusion_jax import generation
from diffusion_jax import train_loop
from diffusion_jax import training

VARIANTS = ('smoke', 'smoke,ddpmpp', 'smoke,adm', 'smoke,dit', 'smoke,mlp', 'smoke,dit,cond',
            'smoke,adm,cond')


def _config(variant, steps=4):
  config = digits_config.get_config(variant)
  config.train.update(num_steps=steps, batch_size=8, log_every=2, checkpoint_every=steps)
  config.sample.update(steps=4, batch_size=10, grid_size=10)
  config.eval.enabled = False
  return config


@pytest.mark.parametrize('variant', VARIANTS)
def test_variant_wiring(variant):
  setup = run_config.build(_config(variant))
  x = jax.ShapeDtypeStruct((8, 8, 8, 1), jnp.float32)
  labels = jax.ShapeDtypeStruct((8,), jnp.int32) if setup.conditional else None
  params = jax.eval_shape(lambda x, c: setup.model.init(jax.random.key(0), x[:1], jnp.zeros((1,)),
                                                        None if c is None else c[:1]),
                          x, labels)['params']
  optimizer = optax.adam(1e-3)
  state = jax.eval_shape(lambda p: training.init_train_state(
      p, optimizer, training.ema(0.99), jax.random.key(1)), params)
  step = training.make_train_step(setup.objective, setup.model.apply, optimizer,
                                  training.ema(0.99), conditional=setup.conditional)
  batch = {'image': x, 'label': jax.ShapeDtypeStruct((8,), jnp.int32)}
  new_state, metrics = jax.eval_shape(step, state, batch)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert metrics['loss'].shape == ()
  out = jax.eval_shape(generation.make_sample_fn(setup), params,
                       jax.ShapeDtypeStruct((4, 8, 8, 1), jnp.float32), jax.random.key(2),
                       None if labels is None else jax.ShapeDtypeStruct((4,), jnp.int32))
  assert out.shape == (4, 8, 8, 1)


def test_variants_select_the_model_family():
  names = {v: type(run_config.build(_config(v)).model).__name__ for v in VARIANTS}
  assert names['smoke,dit'] == 'DiT' and names['smoke,mlp'] == 'MLP'
  assert names['smoke,adm'] == 'UNet'
  setup = run_config.build(_config('smoke,dit,cond'))
  assert setup.conditional and setup.model.label_dropout == 0.1
  assert setup.sample.guidance_scale == 2.0


def test_guidance_needs_a_conditional_model():
  config = _config('smoke')
  config.sample.guidance_scale = 3.0
  with pytest.raises(run_config.ConfigError, match=r'guidance_scale=3.0: guidance needs a '
                                                    r'class-conditional model'):
    run_config.build(config)


def test_sample_labels_cycle_through_classes():
  np.testing.assert_array_equal(generation.sample_labels(12, 10), [*range(10), 0, 1])
  assert generation.sample_labels(5, 0) is None


def _run(tmp_path, variant):
  result = train_loop.train_and_evaluate(_config(variant), str(tmp_path))
  samples = np.load(tmp_path / 'samples.npy')
  assert samples.shape == (10, 8, 8, 1) and np.all(np.isfinite(samples))
  assert (tmp_path / 'samples.png').exists() and result['step'] == 4
  return result


# ~30 s: `slow`. A conditional run of the loop, sampled with guidance, stays in the default
# run through test_tfds_images.py (the MLP on mock CIFAR-10).
@pytest.mark.slow
def test_conditional_dit_trains_and_samples_with_guidance(tmp_path):
  _run(tmp_path, 'smoke,dit,cond')


@pytest.mark.slow
@pytest.mark.parametrize('variant', [v for v in VARIANTS if v != 'smoke,dit,cond'])
def test_every_variant_trains_and_samples(tmp_path, variant):
  _run(tmp_path, variant)


def test_out_of_range_class_label_is_an_error_not_nan_samples():
  """An embedding lookup past the table returns NaN: labels are checked before sampling."""
  setup = run_config.build(_config('smoke,mlp,cond'))
  sample = generation.make_sample_fn(setup)
  z = jnp.zeros((2, 8, 8, 1))
  with pytest.raises(ValueError, match=r'class labels must lie in \[0, 9\]'):
    sample(None, z, jax.random.key(0), jnp.array([3, 11]))
  with pytest.raises(ValueError, match='got min -1'):
    sample(None, z, jax.random.key(0), jnp.array([-1, 2]))
