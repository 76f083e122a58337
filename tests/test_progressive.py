"""Progressive training (`diffusion_jax.progressive`, `configs/progressive_digits.py`).

- The schedule: parsing, each listed error (one line naming `train.resolution_schedule`), the
  resolution of every step written out by hand.
- The data of a stage is the final-resolution batch of the same step average-pooled, written
  out here as the mean of the k x k block; for the 16x16 digits the 8x8 stage is exactly the
  native 8x8 digits at the same indices. The loader (per-example reads, an example's step from
  its position) serves the same batches on both sides of the switch.
- Across the switch with a tiny convolutional denoiser: 3 steps at 8x8 + 3 at 16x16 from a
  loader resumed at the switch == 6 straight steps, bit for bit; the jitted step compiles once
  per resolution.
- End to end through `train_and_evaluate` (`slow`): a run stopped right at the switch (3 steps
  at 8x8, then extended to 6) ends with parameters, EMA and optimizer state bit-identical to an
  uninterrupted run, and the loop really read 8x8 batches before the switch and 16x16 after.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import progressive_digits
from diffusion_jax import objectives
from diffusion_jax import processes
from diffusion_jax import progressive
from diffusion_jax import run_config
from diffusion_jax import train_loop
from diffusion_jax import training
from diffusion_jax.configuration import ConfigError
from diffusion_jax.data import digits
from diffusion_jax.data import loader
from diffusion_jax.data import sampler
from diffusion_jax.data import sources

KEY = r'config\.train\.resolution_schedule='


def test_parse_normalises_lists_and_keeps_off_as_empty():
  assert progressive.parse_schedule([[0, 8], [300, 16]]) == ((0, 8), (300, 16))
  assert progressive.parse_schedule(()) == ()
  assert progressive.parse_schedule(None) == ()


@pytest.mark.parametrize('schedule, message', [
    (((1, 8), (3, 16)), 'the first stage must start at step 0, not 1'),
    (((0, 8), (0, 16)), r'start steps must be strictly increasing \(0 after 0\)'),
    (((0, 4), (5, 8), (4, 16)), r'start steps must be strictly increasing \(4 after 5\)'),
    (((0, 0), (3, 16)), 'resolution 0 must be positive'),
    (((0, 8.0), (3, 16)), r'expected \(start_step, resolution\) pairs of ints'),
    ((8, 16), r'expected \(start_step, resolution\) pairs of ints, got 8'),
    (((0, 8, 1),), r'pairs of ints'),
])
def test_schedule_errors_name_the_key(schedule, message):
  with pytest.raises(ConfigError, match=KEY + r'.*' + message) as e:
    progressive.parse_schedule(schedule)
  assert '\n' not in str(e.value)


def test_resolution_of_every_step_by_hand():
  two = ((0, 8), (3, 16))
  assert [progressive.resolution_at(two, n) for n in range(6)] == [8, 8, 8, 16, 16, 16]
  three = ((0, 4), (2, 8), (5, 16))
  assert [progressive.resolution_at(three, n) for n in range(7)] == [4, 4, 8, 8, 8, 16, 16]
  assert progressive.resolution_at(((0, 16),), 10 ** 9) == 16
  with pytest.raises(ValueError, match='step -1 must be >= 0'):
    progressive.resolution_at(two, -1)


def _config(**train):
  config = progressive_digits.get_config('smoke')
  config.train.update(**train)
  return config


@pytest.mark.parametrize('schedule, message', [
    (((0, 12), (3, 16)), r'resolution 12 is not the data\'s 16 x 16 pooled by an integer factor'),
    (((0, 16), (3, 8)), r'the last stage must be at the data\'s resolution 16 .*not 8'),
    # The smoke U-Net halves once (ch_mult (1, 2)): a 1x1 input cannot be halved.
    (((0, 1), (3, 16)), r'the model does not run at resolution 1 \(config\.model: UNet: H and W'),
])
def test_build_checks_the_schedule_against_data_and_model(schedule, message):
  with pytest.raises(ConfigError, match=KEY + r'.*' + message) as e:
    run_config.build(_config(resolution_schedule=schedule))
  assert '\n' not in str(e.value)


def test_images_only_and_the_config_builds():
  with pytest.raises(ConfigError, match=KEY + r'.*needs images \[H, W, C\]; the data has shape '
                                              r'\(2,\)'):
    progressive.check_schedule(((0, 2),), (2,))
  with pytest.raises(ConfigError, match=KEY + r'.*resolution 4 is not the data\'s 8 x 5 pooled'):
    progressive.check_schedule(((0, 4), (3, 8)), (8, 5, 1))    # 5 columns: no 2 x 2 blocks
  setup = run_config.build(_config())
  assert setup.train.resolution_schedule == ((0, 8), (3, 16))
  assert setup.image_shape == (16, 16, 1)     # sampled and evaluated at the final size


def _block_mean_2x2(x):
  """The 2 x 2 average pool written out: out[n, i, j] = (x[2i, 2j] + x[2i+1, 2j] + x[2i, 2j+1]
  + x[2i+1, 2j+1]) / 4."""
  return (x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2]) / 4


def test_a_stage_reads_the_final_batch_of_its_step_average_pooled():
  rng = np.random.default_rng(0)
  source = sources.ArraySource(rng.normal(size=(40, 16, 16, 2)).astype(np.float32),
                               rng.integers(0, 3, 40), num_classes=3)
  staged = progressive.stage_source(source, ((0, 4), (2, 8), (5, 16)), 6)
  assert staged.image_shape == (16, 16, 2) and len(staged) == 40 and staged.num_classes == 3
  for step, pools in ((0, 2), (1, 2), (2, 1), (4, 1), (5, 0), (9, 0)):
    full = source.batch(3, step, 6)
    got = staged.batch(3, step, 6)
    want = full['image']
    for _ in range(pools):
      want = _block_mean_2x2(want)
    assert got['image'].shape == want.shape and got['image'].dtype == np.float32
    # A mean of 4 or 16 float32 numbers summed in another order: a few ulp apart.
    np.testing.assert_allclose(got['image'], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got['label'], full['label'])
  assert progressive.stage_source(source, (), 6) is source


def test_the_8x8_stage_of_the_16x16_digits_is_the_native_digits():
  source = sources.make_source(sources.DataConfig(image_size=16))
  staged = progressive.stage_source(source, ((0, 8), (3, 16)), 32)
  x8, y8 = digits.load_digits('train', 8)
  idx = sampler.batch_indices(0, 2, 32, len(x8))
  got = staged.batch(0, 2, 32)
  # Pixels are multiples of 1/8 in [-1, 1]: sums of four are exact in float32.
  np.testing.assert_array_equal(got['image'], x8[idx])
  np.testing.assert_array_equal(got['label'], y8[idx])
  np.testing.assert_array_equal(staged.batch(0, 3, 32)['image'], source.batch(0, 3, 32)['image'])


def test_the_loader_serves_each_step_at_its_stage():
  """Per-example reads: an example's step is its position // global batch, across the switch
  and on a resumed loader."""
  rng = np.random.default_rng(1)
  source = sources.ArraySource(rng.normal(size=(20, 8, 8, 1)).astype(np.float32))
  staged = progressive.stage_source(source, ((0, 4), (3, 8)), 4)
  assert hasattr(staged, 'example')
  for start in (0, 3):
    with loader.batches(staged, 7, 4, start, 6, prefetch=0) as it:
      got = dict(it)
    assert sorted(got) == list(range(start, 6))
    for step, batch in got.items():
      want = staged.batch(7, step, 4)['image']
      assert batch['image'].shape == ((4, 4, 4, 1) if step < 3 else (4, 8, 8, 1))
      np.testing.assert_array_equal(batch['image'], want)


def test_the_switch_is_announced_once_per_stage():
  s = ((0, 8), (3, 16))
  said = [progressive.switch_message(s, n, 0) for n in range(6)]
  assert said[0] == 'progressive: training at resolution 8 from step 0 until step 3'
  assert said[3] == 'progressive: training at resolution 16 from step 3'
  assert said[1] is said[2] is said[4] is said[5] is None
  assert progressive.switch_message(s, 4, 4) == 'progressive: training at resolution 16 from ' \
                                                'step 4'
  assert progressive.switch_message((), 0, 0) is None


class _TinyConv(nn.Module):
  """A fully convolutional denoiser that compiles in a fraction of a second: a 3x3 conv of x_t,
  a per-channel function of t, a 3x3 conv back."""

  @nn.compact
  def __call__(self, x, t, cond=None, *, train=False):
    del cond, train
    h = nn.Conv(4, (3, 3))(x)  # [B, H, W, 4]
    h = nn.silu(h + nn.Dense(4)(jnp.reshape(t, (-1, 1)))[:, None, None, :])
    return nn.Conv(x.shape[-1], (3, 3))(h)  # [B, H, W, C]


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_state_carries_over_the_switch_and_each_resolution_compiles_once():
  source = sources.make_source(sources.DataConfig(image_size=16))
  staged = progressive.stage_source(source, ((0, 8), (3, 16)), 8)
  model = _TinyConv()
  objective = objectives.make_objective('ddpm_eps', processes.make_process('vp_discrete'))
  optimizer, ema_fn = optax.adam(1e-2), training.ema(0.9)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)), jnp.zeros((1,)))['params']
  state0 = training.init_train_state(params, optimizer, ema_fn, jax.random.key(1))
  inner = training.make_train_step(objective, model.apply, optimizer, ema_fn)
  traced = []                 # shapes this step was traced (and so compiled) for

  def counted(state, batch):
    traced.append(batch['image'].shape)
    return inner(state, batch)
  step_fn = jax.jit(counted)

  def run(state, start, stop):
    with loader.batches(staged, 0, 8, start, stop, prefetch=0) as it:
      for _, batch in it:
        state, _ = step_fn(state, batch)
    return state

  straight = run(state0, 0, 6)
  assert [s[1] for s in traced] == [8, 16]   # one program at 8x8, one at 16x16
  resumed = run(run(state0, 0, 3), 3, 6)     # a loader restarted at the switch
  assert len(traced) == 2
  _assert_trees_equal(resumed, straight)
  assert int(straight.step) == 6


def _loop_config(steps):
  c = _config(num_steps=steps, batch_size=8, checkpoint_every=3)
  # The learning rate must not depend on num_steps for a run to be extended exactly.
  c.optim.decay_steps = 6
  c.eval.enabled = False
  c.sample.grid_size = 0
  return c


# The loop's wiring (the staged source, the switch message) is checked only here: three runs of
# the loop with two resolutions each take 36 s on 2 cores (up to 90 s when they are shared).
@pytest.mark.slow
def test_resume_right_at_the_switch_is_bit_identical(tmp_path, monkeypatch, capsys):
  """6 steps (3 at 8x8, 3 at 16x16) straight == 3 steps, a restart, 3 more."""
  factors = []
  real_pool = progressive.pool
  monkeypatch.setattr(progressive, 'pool', lambda x, k: factors.append(k) or real_pool(x, k))
  straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
  train_loop.train_and_evaluate(_loop_config(6), straight)
  batch = _loop_config(6).train.batch_size
  # One pooled read per example: factor 2 (8x8) for steps 0-2, 1 (16x16) for steps 3-5.
  assert factors == [2] * 3 * batch + [1] * 3 * batch
  train_loop.train_and_evaluate(_loop_config(3), split)
  train_loop.train_and_evaluate(_loop_config(6), split)
  out = capsys.readouterr().out
  assert out.count('progressive: training at resolution 16 from step 3') == 2
  assert 'Resuming from checkpoint step 3' in out
  _, a, step_a = train_loop.load_checkpoint(_loop_config(6), straight)
  _, b, step_b = train_loop.load_checkpoint(_loop_config(6), split)
  assert step_a == step_b == 6
  _assert_trees_equal(a, b)
