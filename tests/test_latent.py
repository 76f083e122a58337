"""Latent diffusion end to end: autoencoders trained by the loop, latents on disk, decoding.

The losses' terms are checked against closed forms in test_autoencoder_losses.py and the
quantizer in test_vq.py; here, what the loop adds: the EMA codebook update of a VQ step, exact
resume and checkpoint round trips of autoencoder states, the latents and scale factor the
encode stage writes, decoding before the evaluation, and the one-line refusals.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import autoencoder_digits
from configs import latent_digits
from diffusion_jax import checkpointing
from diffusion_jax import images as images_lib
from diffusion_jax import latent
from diffusion_jax import latent_pipeline
from diffusion_jax import train_loop
from diffusion_jax import training
from diffusion_jax.configuration import ConfigError
from diffusion_jax.data import digits
from diffusion_jax.data import latents as latents_lib
from diffusion_jax.data import sources


def _tiny_ae_config(variant='smoke,vq', **train):
  """The smoke autoencoder, two levels (f = 2: 4x4 latents) on 8x8 digits, a few steps."""
  c = autoencoder_digits.get_config(variant)
  c.data.image_size = 8
  c.model.block_out_channels = (8, 16)
  c.train.update(num_steps=4, batch_size=8, log_every=2, checkpoint_every=2, **train)
  c.eval.num_samples = 20
  return c


def test_vq_step_updates_the_ema_codebook_as_written_by_hand():
  """One train step of the VQ autoencoder: the codebook in `model_state` is the EMA update of
  VQ-VAE App. A.1 (then dead-code restarts) of the batch's encoder outputs, computed here from
  the model's own encoder and `quantize`, with the key the step derives for it."""
  c = _tiny_ae_config()
  c.objective.update(codebook_decay=0.5, restart_threshold=0.6)
  setup = latent.build_autoencoder(c)
  optimizer, ema_fn = training.make_optimizer(setup.optim, 4), training.ema(0.9)
  state = latent.init_fn(setup, optimizer, ema_fn)(jax.random.key(1))
  step = training.make_loss_train_step(latent.loss_fn(setup), optimizer, ema_fn)
  batch = {'image': jnp.asarray(setup.source.examples(np.arange(8))['image'])}
  new, metrics = jax.jit(step)(state, batch)

  variables = {'params': state.params, **state.model_state}

  @jax.jit
  def assign(variables, x):
    z = setup.model.apply(variables, x, method='encode')
    return z, setup.model.apply(variables, z, method='quantize')[1]
  z, indices = assign(variables, batch['image'])
  old = state.model_state['vq_ema']['quantizer']
  k, d = old['codebook'].shape
  zf = np.asarray(z, np.float64).reshape(-1, d)
  idx = np.asarray(indices).reshape(-1)
  counts = np.bincount(idx, minlength=k)
  sums = np.zeros((k, d))
  np.add.at(sums, idx, zf)
  cluster = 0.5 * np.asarray(old['cluster_size']) + 0.5 * counts        # N_i
  embed = 0.5 * np.asarray(old['embed_sum']) + 0.5 * sums               # m_i
  n = cluster.sum()
  codebook = embed / (((cluster + 1e-5) / (n + k * 1e-5) * n)[:, None])  # m_i / smoothed N_i
  got = new.model_state['vq_ema']['quantizer']
  live = cluster >= 0.6  # unused codes: 0.5 * 1 + 0.5 * 0
  assert live.any() and (~live).any(), 'the batch should leave some codes dead'
  np.testing.assert_allclose(np.asarray(got['cluster_size'])[live], cluster[live], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(got['codebook'])[live], codebook[live], rtol=2e-5,
                             atol=1e-6)
  # Dead codes restarted onto encoder outputs of this batch, with count 1.
  np.testing.assert_array_equal(np.asarray(got['cluster_size'])[~live], 1.0)
  for row in np.asarray(got['codebook'])[~live]:
    assert np.min(np.abs(zf - row).max(axis=1)) < 1e-5
  assert {'reconstruction', 'commitment', 'perplexity', 'usage', 'psnr'} <= set(metrics)
  assert 1.0 <= float(metrics['perplexity']) <= k


@pytest.mark.slow
def test_kl_step_metrics_are_the_loss_terms():
  """The KL autoencoder's step reports the loss = reconstruction + kl_weight * KL."""
  c = _tiny_ae_config('smoke')
  c.objective.kl_weight = 0.5
  setup = latent.build_autoencoder(c)
  optimizer, ema_fn = training.make_optimizer(setup.optim, 4), training.ema(0.9)
  state = latent.init_fn(setup, optimizer, ema_fn)(jax.random.key(0))
  step = training.make_loss_train_step(latent.loss_fn(setup), optimizer, ema_fn)
  _, m = jax.jit(step)(state, {'image': jnp.asarray(setup.source.examples(np.arange(8))['image'])})
  np.testing.assert_allclose(m['loss'], m['reconstruction'] + 0.5 * m['kl'], rtol=1e-5)
  assert m['kl'] > 0 and state.model_state == {}


def _leaves(state):
  return jax.tree_util.tree_leaves_with_path(jax.tree.map(np.asarray, state))


def _assert_identical(a, b):
  for (path, x), (_, y) in zip(_leaves(a), _leaves(b), strict=True):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def _assert_round_trips(state, directory: str, step: int):
  """`state` saved to an orbax checkpoint in `directory` and restored is `state`, bit for bit."""
  with checkpointing.Checkpointer(directory) as ckpt:
    ckpt.save(step, state)
    ckpt.wait()
    back = ckpt.restore(step, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                           state))
  _assert_identical(state, back)


def test_autoencoder_state_round_trips_through_a_checkpoint(tmp_path):
  """A VQ autoencoder's train state (parameters, optimizer state, and the EMA codebook in
  `model_state`) comes back from an orbax checkpoint on disk bit for bit."""
  setup = latent.build_autoencoder(_tiny_ae_config())
  optimizer, ema_fn = training.make_optimizer(setup.optim, 4), training.ema(0.9)
  state = jax.jit(latent.init_fn(setup, optimizer, ema_fn))(jax.random.key(3))
  assert set(state.model_state['vq_ema']['quantizer']) == {'cluster_size', 'embed_sum',
                                                            'codebook'}
  _assert_round_trips(state, str(tmp_path / 'ckpt'), 0)


@pytest.mark.slow
def test_vq_autoencoder_resume_is_exact_and_checkpoints_round_trip(tmp_path):
  """4 steps in one run == 2 steps, a restart, 2 more: parameters, EMA parameters, optimizer
  state and the EMA codebook agree bit for bit (the codebook lives in `model_state`)."""
  straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
  c = _tiny_ae_config()
  c.eval.enabled = False
  train_loop.train_and_evaluate(c, straight)
  first = _tiny_ae_config()
  first.train.num_steps = 2
  first.eval.enabled = False
  train_loop.train_and_evaluate(first, split)
  train_loop.train_and_evaluate(c, split)
  _, a, step_a = train_loop.load_checkpoint(c, straight)
  _, b, step_b = train_loop.load_checkpoint(c, split)
  assert step_a == step_b == 4
  assert a.model_state['vq_ema']['quantizer']['codebook'].shape == (128, 2)
  _assert_identical(a, b)
  _assert_round_trips(a, str(tmp_path / 'again'), 4)   # a checkpoint holds exactly the state


@pytest.fixture(scope='module')
def pipeline(tmp_path_factory, subprocess_cache):
  """The smoke latent diffusion run, three stages, in one work dir (the digits classifier
  shared with the rest of the suite)."""
  workdir = str(tmp_path_factory.mktemp('latent'))
  # The MLP denoiser: the pipeline's outputs do not depend on the network, and the U-Net's
  # compile would cost half a minute of CI (test_train_loop_models trains every family).
  config = latent_digits.get_config('smoke,mlp')
  config.eval.cache_dir = subprocess_cache
  # Grids every 10 steps in both stages; in-loop evaluation every 10: the autoencoder's held-out
  # PSNR (best = highest), the latent model's FD of decoded samples (best = lowest).
  config.log.sample_every = 10
  config.latent.autoencoder.eval.update(every=10, every_num_samples=50)
  config.eval.update(every=10, every_num_samples=100)
  result = train_loop.train_and_evaluate(config, workdir)
  return config, workdir, result


@pytest.mark.slow   # the pipeline fixture: ~70 s of the default run's budget
def test_latents_are_the_posterior_means_scaled_by_one_over_their_std(pipeline):
  config, workdir, _ = pipeline
  ae_config = latent_pipeline.autoencoder_config(config)
  setup, state, step = train_loop.load_checkpoint(ae_config, os.path.join(workdir,
                                                                          'autoencoder'))
  stored = np.load(os.path.join(workdir, 'latents', 'latents.npy'))
  x, y = digits.load_digits('train', 32)
  assert stored.shape == (len(x), 8, 8, 2)
  posterior = setup.model.apply({'params': state.ema_params}, jnp.asarray(x[:64]),
                                method='encode')
  np.testing.assert_allclose(stored[:64], posterior.mean, rtol=1e-5, atol=1e-5)
  info = json.load(open(os.path.join(workdir, 'latents', 'latents.json'), encoding='utf-8'))
  assert info['autoencoder']['step'] == step
  np.testing.assert_allclose(info['scale_factor'], 1.0 / np.std(stored.astype(np.float64)),
                             rtol=1e-6)
  np.testing.assert_array_equal(np.load(os.path.join(workdir, 'latents', 'labels.npy')), y)
  source, _ = latents_lib.load_latents(os.path.join(workdir, 'latents'))
  batch = source.batch(0, 3, 16)
  idx = sources.data_sampler.batch_indices(0, 3, 16, len(x))
  np.testing.assert_allclose(batch['image'], info['scale_factor'] * stored[idx], rtol=1e-6)


@pytest.mark.slow   # the pipeline fixture: ~70 s of the default run's budget
def test_samples_are_decoded_before_the_grid_and_the_evaluation(pipeline):
  config, workdir, result = pipeline
  samples = np.load(os.path.join(workdir, 'samples.npy'))
  assert samples.shape == (config.sample.grid_size, 32, 32, 1)
  assert {'fd', 'fd_floor', 'autoencoder/reconstruction_psnr', 'scale_factor'} <= set(result)
  ae_eval = json.load(open(os.path.join(workdir, 'autoencoder', 'eval.json'), encoding='utf-8'))
  assert ae_eval['reconstruction_psnr'] == result['autoencoder/reconstruction_psnr']
  # The decoder the evaluation used: decode(z / scale) of the autoencoder at the encoded step.
  ae_config = latent_pipeline.autoencoder_config(config)
  ae_dir = os.path.join(workdir, 'autoencoder')
  info = latents_lib.read_info(os.path.join(workdir, 'latents'))
  decode = latent_pipeline.latent_decoder(ae_config, ae_dir, info)
  setup, state, _ = train_loop.load_checkpoint(ae_config, ae_dir)
  z = jax.random.normal(jax.random.key(0), (3, 8, 8, 2))
  np.testing.assert_allclose(
      decode(z), setup.model.apply({'params': state.ema_params}, z / info['scale_factor'],
                                   method='decode'), rtol=1e-5, atol=1e-5)


@pytest.mark.slow   # the pipeline fixture: ~70 s of the default run's budget
def test_grids_and_in_loop_evaluations_of_both_stages(pipeline):
  _, workdir, _ = pipeline
  ae_dir = os.path.join(workdir, 'autoencoder')
  for where, name, best_is in ((ae_dir, 'reconstruction_psnr', max), (workdir, 'fd', min)):
    records = [json.loads(ln) for ln in open(os.path.join(where, 'metrics.jsonl'),
                                              encoding='utf-8')]
    values = {r['step']: r[f'in_loop/{name}'] for r in records if f'in_loop/{name}' in r}
    assert sorted(values) == [10, 20], (where, values)
    assert os.listdir(os.path.join(where, 'checkpoints_best')) == [
        str(best_is(values, key=values.get))]
    assert sorted(os.listdir(os.path.join(where, 'grids'))) == ['step_0000010.png',
                                                                'step_0000020.png']
  # The latent model's grid shows decoded 32x32 digits (6 x 6 tiles of 4x-upscaled pixels with
  # 1-pixel borders), not 8x8x2 latents; the autoencoder's shows originals over reconstructions.
  grid = images_lib.read_png(os.path.join(workdir, 'grids', 'step_0000020.png'))
  assert grid.shape == (6 * 129 + 1, 6 * 129 + 1, 1)


@pytest.mark.slow
def test_a_rerun_resumes_every_stage_without_retraining(pipeline):
  config, workdir, result = pipeline
  before = os.path.getmtime(os.path.join(workdir, 'latents', 'latents.npy'))
  again = train_loop.train_and_evaluate(config, workdir)
  assert again['fd'] == result['fd']
  assert os.path.getmtime(os.path.join(workdir, 'latents', 'latents.npy')) == before


@pytest.mark.slow   # the pipeline fixture: ~70 s of the default run's budget
def test_mismatched_autoencoder_checkpoint_and_latents_are_refused(pipeline, tmp_path):
  config, workdir, _ = pipeline
  ae_config = latent_pipeline.autoencoder_config(config)
  ae_config.model.latent_channels = 3
  with pytest.raises(checkpointing.CheckpointMismatch) as e:
    train_loop.load_checkpoint(ae_config, os.path.join(workdir, 'autoencoder'))
  assert '\n' not in str(e.value)
  changed = latent_digits.get_config('smoke,mlp')
  changed.latent.autoencoder.model.latent_channels = 3
  with pytest.raises(ConfigError, match='latent.autoencoder.model.latent_channels'):
    train_loop.train_and_evaluate(changed, workdir)
  # Latents written by another autoencoder step are not silently reused.
  copy = tmp_path / 'latents'
  copy.mkdir()
  info = latents_lib.read_info(os.path.join(workdir, 'latents'))
  info['autoencoder']['step'] = 7
  latents_lib.write_info(str(copy), info)
  with pytest.raises(ConfigError, match='step 7'):
    latent_pipeline.encode_dataset(latent_pipeline.autoencoder_config(config),
                                   os.path.join(workdir, 'autoencoder'), str(copy))


def test_latents_without_a_scale_factor_are_refused(tmp_path):
  np.save(tmp_path / 'latents.npy', np.zeros((4, 2, 2, 1), np.float32))
  cfg = sources.DataConfig(name='latents', path=str(tmp_path))
  with pytest.raises(ValueError, match='no latents.json'):
    sources.make_source(cfg)
  (tmp_path / 'latents.json').write_text(json.dumps({'latent_shape': [2, 2, 1]}))
  with pytest.raises(ValueError, match='scale_factor=None'):
    sources.make_source(cfg)
  (tmp_path / 'latents.json').write_text(json.dumps({'latent_shape': [2, 2, 1],
                                                     'scale_factor': 2.0}))
  np.testing.assert_array_equal(sources.make_source(cfg).batch(0, 0, 4)['image'], 0.0)


@pytest.mark.parametrize('edit, words', [
    (lambda c: c.model.update(block_out_channels=(8, 8, 8, 8, 8, 8)),
     ['model.block_out_channels', 'f=32', '8x8']),
    (lambda c: c.model.update(in_channels=3), ['model.in_channels=3', '1 channels']),
    (lambda c: c.objective.update(reconstruction='l3'), ['objective.reconstruction']),
    (lambda c: c.objective.update(codebook_decay=1.0), ['objective.codebook_decay']),
    (lambda c: c.model.update(name='unet'), ['model.name']),
])
def test_bad_autoencoder_configs_are_one_line_errors(edit, words):
  c = _tiny_ae_config()
  edit(c)
  with pytest.raises(ConfigError) as e:
    latent.build_autoencoder(c)
  assert '\n' not in str(e.value)
  for w in words:
    assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize('edit, words', [
    (lambda c: c.sample.update(clip_x0=1.0), ['sample.clip_x0=1.0']),
    (lambda c: c.latent.update(encode_batch_size=0), ['latent.encode_batch_size']),
    (lambda c: c.latent.update(scale=1.0), ['config.latent.scale']),
])
def test_bad_latent_configs_fail_before_any_stage(edit, words, tmp_path):
  c = latent_digits.get_config('smoke')
  edit(c)
  with pytest.raises(ConfigError) as e:
    train_loop.train_and_evaluate(c, str(tmp_path))
  for w in words:
    assert w in str(e.value), (w, str(e.value))
  assert not os.path.exists(tmp_path / 'autoencoder')


def test_scale_factor_is_one_over_the_std():
  z = np.random.default_rng(0).normal(0.3, 2.5, 10_000)
  got = latent.measure_scale_factor(z.size, z.sum(), np.square(z).sum())
  np.testing.assert_allclose(got, 1.0 / z.std(), rtol=1e-12)
  with pytest.raises(ValueError, match='variance'):
    latent.measure_scale_factor(4, 4.0, 4.0)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, 'tests', 'fixtures', 'sd_vae')


def _encode_cli(cache_dir, *args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', DIFFUSION_JAX_CACHE=cache_dir)
  return subprocess.run([sys.executable, '-m', 'experiments.encode_latents', *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)


def _encode_args(tmp_path):
  """Six random 16x16 RGB images as npy data, and the encode_latents flags for the fixture."""
  images = np.random.default_rng(0).uniform(-1, 1, (6, 16, 16, 3)).astype(np.float32)
  np.save(tmp_path / 'x.npy', images)
  out = tmp_path / 'latents'
  args = ['--config=configs/digits.py', '--config.data.name=npy',
          f'--config.data.path={tmp_path / "x.npy"}',
          f'--weights={FIXTURE}/ldm.safetensors', f'--vae_config={FIXTURE}/config.json',
          f'--out={out}', '--batch_size=4']
  return images, out, args


@pytest.mark.slow  # suite time: a subprocess; encode_source runs in the pipeline test
def test_encode_latents_with_pretrained_sd_vae_weights(tmp_path, subprocess_cache):
  """The command that encodes a user's data with Stable Diffusion's VAE, here with the tiny
  reference fixture: the latents are the posterior means of the loaded model, the scale factor
  the published 0.18215 (the measured 1 / std stored beside it)."""
  images, out, args = _encode_args(tmp_path)
  proc = _encode_cli(subprocess_cache, *args)
  assert proc.returncode == 0, proc.stderr[-2000:]
  source, info = latents_lib.load_latents(str(out))
  assert info['scale_factor'] == 0.18215 and info['latent_shape'] == [4, 4, 4]
  from diffusion_jax import weights  # pylint: disable=g-import-not-at-top
  from diffusion_jax.models import AutoencoderKL  # pylint: disable=g-import-not-at-top
  vae_config = json.load(open(f'{FIXTURE}/config.json', encoding='utf-8'))
  variables = weights.load_autoencoder_kl(f'{FIXTURE}/diffusers.safetensors', vae_config)
  mean = AutoencoderKL(**vae_config).apply(variables, jnp.asarray(images), method='encode').mean
  np.testing.assert_allclose(source.examples(np.arange(6))['image'], 0.18215 * np.asarray(mean),
                             rtol=1e-5, atol=1e-6)
  stored = np.load(out / 'latents.npy').astype(np.float64)
  np.testing.assert_allclose(info['measured_scale_factor'], 1 / stored.std(), rtol=1e-6)


@pytest.mark.slow
def test_encode_latents_refuses_an_existing_output_and_a_mismatched_file(tmp_path,
                                                                           subprocess_cache):
  _, _, args = _encode_args(tmp_path)
  assert _encode_cli(subprocess_cache, *args).returncode == 0
  # A second encode into the same directory is refused; so is a file whose tensors do not
  # match the configuration (here SD's, the default, against the tiny file).
  again = _encode_cli(subprocess_cache, *args)
  assert again.returncode == 2 and 'already holds latents' in again.stderr
  bad = _encode_cli(subprocess_cache, *args[:3], f'--weights={FIXTURE}/ldm.safetensors',
                    f'--out={tmp_path}/o2')
  assert bad.returncode == 2, bad.stderr[-500:]
  assert len(bad.stderr.strip().splitlines()) == 1 and '--weights' in bad.stderr, bad.stderr


def test_mask_downsampling_keeps_a_latent_known_only_if_its_whole_block_is():
  mask = np.ones((1, 8, 8, 1), bool)
  mask[0, :, 4:] = False                        # right half unknown
  mask[0, 1, 1] = False                         # one unknown pixel in the top-left block
  got = np.asarray(latent.downsample_mask(mask, 4))
  np.testing.assert_array_equal(got[0, :, :, 0], [[False, False], [True, False]])
  assert got.shape == (1, 2, 2, 1)
  with pytest.raises(ValueError, match='f=3'):
    latent.downsample_mask(mask, 3)


@pytest.mark.slow   # the pipeline fixture: ~70 s of the default run's budget
def test_inpainting_in_latent_space_with_the_trained_model(pipeline):
  """The latent run's own denoiser, any sampler, `inpainting.inpaint_sample`, and a pixel mask
  downsampled by f: the known latents come back exactly, the rest is sampled."""
  from diffusion_jax import generation  # pylint: disable=g-import-not-at-top
  from diffusion_jax import inpainting  # pylint: disable=g-import-not-at-top
  from diffusion_jax import samplers  # pylint: disable=g-import-not-at-top
  config, workdir, _ = pipeline
  source, _ = latents_lib.load_latents(os.path.join(workdir, 'latents'))
  setup, state, _ = train_loop.load_checkpoint(config, workdir, source=source)
  known = jnp.asarray(source.examples(np.arange(2))['image'])      # [2, 8, 8, 2], scaled
  pixels = np.zeros((2, 32, 32, 1), bool)
  pixels[:, :, :16] = True                                          # left half known
  mask = latent.downsample_mask(pixels, 4)
  den = generation.make_model_denoiser(setup, state.ema_params)
  x_T = jax.random.normal(jax.random.key(1), known.shape)
  out, _ = inpainting.inpaint_sample(samplers.SAMPLERS['ddim'], den, setup.process, x_T,
                                     jax.random.key(2), known, mask, steps=5)
  np.testing.assert_array_equal(np.asarray(out)[:, :, :4], np.asarray(known)[:, :, :4])
  assert np.all(np.isfinite(out)) and not np.allclose(out[:, :, 4:], known[:, :, 4:])


@pytest.mark.parametrize('sampler', [pytest.param(s, marks=pytest.mark.slow) for s in
                                     ('ddim', 'heun', 'dpm_solver_pp_2m', 'unipc_bh2', 'ddpm')])
def test_guided_latent_config_builds_and_traces_every_sampler(pipeline, sampler):
  """A class-conditional latent run (`:cond`, guidance 2) on the latents, traced abstractly
  with a few samplers: the sampler, guidance and latent shape fit together without a change."""
  from diffusion_jax import generation  # pylint: disable=g-import-not-at-top
  from diffusion_jax import run_config  # pylint: disable=g-import-not-at-top
  _, workdir, _ = pipeline
  source, _ = latents_lib.load_latents(os.path.join(workdir, 'latents'))
  config = latent_digits.get_config('smoke,cond,mlp')
  config.sample.sampler = sampler
  setup = run_config.build(config, source=source)
  assert setup.image_shape == (8, 8, 2) and setup.sample.guidance_scale == 2.0
  params = jax.eval_shape(lambda: setup.model.init(
      jax.random.key(0), jnp.zeros((1, 8, 8, 2)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)))
  fn = generation.make_sample_fn(setup)
  out = jax.eval_shape(fn, params['params'], jax.ShapeDtypeStruct((4, 8, 8, 2), jnp.float32),
                       jax.random.key(0), jax.ShapeDtypeStruct((4,), jnp.int32))
  assert out.shape == (4, 8, 8, 2)


@pytest.mark.slow  # a subprocess
def test_evaluate_decodes_a_latent_run_and_reproduces_its_fd(pipeline, subprocess_cache):
  """`experiments.evaluate` of the latent run (its own config.json): the same checkpoint and key
  as the loop's evaluation, decoded by the same autoencoder, give the same FD."""
  _, workdir, result = pipeline
  env = dict(os.environ, DIFFUSION_JAX_CACHE=subprocess_cache, PYTHONUNBUFFERED='1')
  done = subprocess.run([sys.executable, '-m', 'experiments.evaluate', f'--workdir={workdir}',
                         '--tag=check'], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  got = json.load(open(os.path.join(workdir, 'eval_ddpm_10_check.json'), encoding='utf-8'))
  np.testing.assert_allclose(got['fd'], result['fd'], rtol=1e-4)
  nll = subprocess.run([sys.executable, '-m', 'experiments.evaluate', f'--workdir={workdir}',
                        '--nll_examples=8'], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
  assert nll.returncode == 2 and 'latent' in nll.stderr, nll.stderr[-500:]
