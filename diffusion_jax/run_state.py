"""A run's train state, built from its validated setup: initialisation (with pretrained text
weights or a trained base), the optimizer and the sampling EMA, the pure train step, the
checkpointer and the abstract state checkpoints restore onto. `train_loop` runs them."""

import os

import jax
import ml_collections

from diffusion_jax import checkpointing
from diffusion_jax import ema as ema_lib
from diffusion_jax import finetune
from diffusion_jax import latent
from diffusion_jax import parallel
from diffusion_jax import training
from diffusion_jax.models import layers
from diffusion_jax.run_config import Setup
from diffusion_jax.run_config import build
from diffusion_jax.text import conditioning as text_conditioning


def init_state_fn(setup: Setup, optimizer, ema_fn):
  """`init(key) -> TrainState` for the setup's model (jit it, with the state's shardings),
  with the post-hoc EMA profiles of `train.posthoc_sigma_rels` if any."""
  posthoc_fn = posthoc_tracker(setup)
  if isinstance(setup, latent.AutoencoderSetup):
    return latent.init_fn(setup, optimizer, ema_fn, posthoc_fn=posthoc_fn)

  def init(key, pretrained=None, base=None, teacher=None):
    k_params, k_state = jax.random.split(key)
    x = jax.numpy.zeros((1,) + tuple(setup.image_shape), jax.numpy.float32)
    t = jax.numpy.zeros((1,), jax.numpy.float32)
    cond = layers.example_cond(setup.model, 1, getattr(setup, 'condition', None),
                                   setup.image_shape)
    params = setup.model.init({'params': k_params}, x, t, cond)['params']
    if pretrained is not None and base is None:   # pretrained text weights replace random ones
      # (with a base run, its own encoder, pretrained or trained, comes with the base)
      params = {**params, 'encoder': text_conditioning.check_pretrained(params['encoder'],
                                                                         pretrained)}
    if base is not None:            # a trained run's EMA parameters (`config.base`)
      params = finetune.attach(setup.model, params, base)
    if teacher is not None:         # DMD: generator and fake score start as the teacher
      from diffusion_jax.distill import dmd  # pylint: disable=g-import-not-at-top
      params = dmd.init_from_teacher(params, teacher)
    return training.init_train_state(params, optimizer, ema_fn, k_state, posthoc_fn=posthoc_fn)
  return init


def pretrained_params(setup: Setup):
  """The text encoder's pretrained parameters, read now (text.encoder='clip'), else None."""
  load = getattr(getattr(setup, 'text', None), 'pretrained', None)
  return None if load is None else load()


def _is_dmd(model) -> bool:
  from diffusion_jax.distill import dmd  # pylint: disable=g-import-not-at-top
  return isinstance(model, dmd.DMDModel)


def teacher_params(setup: Setup):
  """The teacher's EMA parameters, read now, for a model that starts from them (DMD's two
  parts); else None."""
  teacher = getattr(setup, 'teacher', None)
  if teacher is None or not _is_dmd(setup.model):
    return None
  return teacher.load()[0]


def base_params(setup: Setup):
  """The base run's EMA parameters, read now (`config.base`), else None."""
  base = getattr(setup, 'base', None)
  return None if base is None else base.load()[0]


def posthoc_tracker(setup: Setup):
  """The power-function EMA tracker of `train.posthoc_sigma_rels` (None when off)."""
  rels = setup.train.posthoc_sigma_rels
  return ema_lib.power_ema_tracker([ema_lib.sigma_rel_to_gamma(s) for s in rels]) if rels \
      else None


def build_setup(config: ml_collections.ConfigDict, *, source=None):
  """The run's validated setup: an autoencoder's (`latent.build_autoencoder`, for
  `objective.name='autoencoder'`) or a diffusion model's (`run_config.build`)."""
  if latent.is_autoencoder_config(config):
    return latent.build_autoencoder(config, source=source)
  return build(config, source=source)


def _step_fn(setup, optimizer, ema_fn, micro):
  """The pure train step of the setup's task (diffusion objective or autoencoder loss)."""
  if isinstance(setup, latent.AutoencoderSetup):
    return training.make_loss_train_step(latent.loss_fn(setup), optimizer, ema_fn,
                                         grad_accum_steps=setup.train.grad_accum_steps,
                                         batch_constraint=micro,
                                         posthoc_fn=posthoc_tracker(setup))
  return training.make_train_step(setup.objective, setup.model.apply, optimizer, ema_fn,
                                  cond_key=setup.cond_key, frozen=setup.frozen,
                                  grad_accum_steps=setup.train.grad_accum_steps,
                                  batch_constraint=micro, posthoc_fn=posthoc_tracker(setup))


def _optimizer_and_ema(setup: Setup):
  """AdamW, and the sampling EMA: EDM's half-life in images (`train.ema_halflife_kimg`, per
  global batch) or a fixed decay (`train.ema_decay`)."""
  t = setup.train
  ema_fn = (training.ema_halflife(t.ema_halflife_kimg * 1000, t.batch_size,
                                  rampup_ratio=t.ema_rampup_ratio or None)
            if t.ema_halflife_kimg > 0 else training.ema(t.ema_decay))
  frozen = getattr(setup, 'frozen', ())
  if _is_dmd(getattr(setup, 'model', None)):
    # DMD2's two time-scale update: the generator's optimizer moves only on its own steps.
    from diffusion_jax.distill import dmd  # pylint: disable=g-import-not-at-top
    parts = [training.make_optimizer(setup.optim, setup.train.num_steps) for _ in range(2)]
    return dmd.ttur_optimizer(*parts), ema_fn
  return training.make_optimizer(setup.optim, setup.train.num_steps, frozen=frozen), ema_fn


def _checkpointer(setup: Setup, workdir: str, subdir: str = 'checkpoints',
                  **kwargs) -> checkpointing.Checkpointer:
  return checkpointing.Checkpointer(os.path.join(workdir, subdir),
                                    max_to_keep=setup.train.keep_checkpoints,
                                    keep_every=setup.train.keep_every,
                                    view=finetune.setup_view(setup), **kwargs)


def abstract_state(setup: Setup, mesh, init, key):
  """The train state's shapes and dtypes with this run's shardings (`train.param_sharding`),
  the target that checkpoints restore onto, whatever topology wrote them."""
  abstract = jax.eval_shape(init, key)
  shardings = parallel.state_shardings(mesh, abstract, setup.train.param_sharding,
                                       setup.train.fsdp_min_size)
  return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                      abstract, shardings)
