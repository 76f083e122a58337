"""Autoencoders as a training task, and the maps between images and the latents diffused.

An autoencoder run is a config whose `objective.name` is 'autoencoder' and whose `model.name` is
a `models.AUTOENCODERS` key ('kl': LDM's KL-VAE, 'vq': its VQ-reg autoencoder). The training loop
(`train_loop.train_and_evaluate`) trains it like any model, through `loss_fn` below:

  kl   `autoencoder_losses.kl_vae_loss`: reconstruction through a posterior sample
       + `kl_weight` KL(q(z | x) || N(0, I)) (LDM's 1e-6 with per-example sums);
  vq   `autoencoder_losses.vq_vae_loss` with `commitment` (VQ-VAE's beta = 0.25); the EMA
       codebook (`model.ema_codebook`, the default) lives in the train state's `model_state`
       and is updated after each batch by `vq.ema_update` (decay `codebook_decay`), then codes
       whose EMA cluster size is below `restart_threshold` move onto random encoder outputs of
       the batch (`vq.restart_dead_codes`; 0 turns restarts off).

Latent diffusion works on `scale_factor * encode(x)` (`encoder`: the posterior mean for KL,
the unquantized encoder output for VQ, as LDM) and maps samples back with
`decode(z / scale_factor)` (`decoder`; VQ quantizes first). `scale_factor` is 1 / std of the
data's latents (`measure_scale_factor`), as LDM chose 0.18215 for Stable Diffusion.
"""

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from diffusion_jax import autoencoder_losses
from diffusion_jax import configuration
from diffusion_jax import run_config
from diffusion_jax import training
from diffusion_jax.configuration import ConfigError
from diffusion_jax.data import sources
from diffusion_jax.models import vq
from diffusion_jax.models.autoencoder import AUTOENCODERS

OBJECTIVE = 'autoencoder'
SECTIONS = ('seed', 'data', 'objective', 'model', 'optim', 'train', 'eval', 'profile', 'log')


@dataclasses.dataclass(frozen=True)
class AutoencoderObjective:
  """`config.objective` of an autoencoder run (`name='autoencoder'`)."""
  reconstruction: str = 'l1'       # 'l1' or 'l2', summed over each image's pixels
  kl_weight: float = 1e-6          # KL-VAE: beta of the KL term (LDM's kl_weight)
  commitment: float = 0.25         # VQ: beta of the commitment term (VQ-VAE Eq. 3)
  codebook_decay: float = 0.99     # VQ with ema_codebook: the EMA's gamma
  restart_threshold: float = 1.0   # VQ with ema_codebook: restart codes below this EMA count


@dataclasses.dataclass(frozen=True)
class AutoencoderSetup:
  """An autoencoder run's validated pieces (the loop reads `train`, `optim`, `eval`, `data`,
  `source`, `model` and `image_shape` as it does a diffusion `run_config.Setup`'s)."""
  train: run_config.TrainConfig
  optim: training.OptimConfig
  eval: run_config.EvalConfig
  objective: AutoencoderObjective
  model: Any
  kind: str                        # 'kl' or 'vq'
  data: sources.DataConfig
  image_shape: tuple
  source: Any = None
  profile: run_config.ProfileConfig = run_config.ProfileConfig()
  log: run_config.LogConfig = run_config.LogConfig()

  @property
  def latent_shape(self) -> tuple:
    h, w, _ = self.image_shape
    return (h // self.model.f, w // self.model.f, self.model.latent_channels)

  @property
  def ema_codebook(self) -> bool:
    return self.kind == 'vq' and self.model.ema_codebook


def is_autoencoder_config(config) -> bool:
  objective = config.get('objective') if hasattr(config, 'get') else None
  return bool(objective) and objective.get('name') == OBJECTIVE


def build_autoencoder(config: ml_collections.ConfigDict, *, source=None) -> AutoencoderSetup:
  """Validates an autoencoder run's config; a one-line `ConfigError` naming the bad key."""
  for k in config:
    if k not in SECTIONS:
      raise ConfigError(f'config.{k}: not a section of an autoencoder run (objective.name='
                        f"'{OBJECTIVE}'); valid sections are {sorted(SECTIONS)}")
  if not isinstance(config.get('seed'), int):
    raise ConfigError(f'config.seed={config.get("seed")!r}: expected int')
  data = run_config.build_data(config.data)
  source = run_config.open_source(data) if source is None else source
  image_shape = tuple(source.image_shape)
  objective_values = dict(config.objective)
  objective_values.pop('name')
  objective = configuration.from_section(AutoencoderObjective, 'objective', objective_values)
  configuration.choice('objective.reconstruction', objective.reconstruction,
                       autoencoder_losses.RECONSTRUCTIONS)
  for k in ('kl_weight', 'commitment', 'restart_threshold'):
    configuration.positive(f'objective.{k}', getattr(objective, k), allow_zero=True)
  if not 0 <= objective.codebook_decay < 1:
    raise ConfigError(f'config.objective.codebook_decay={objective.codebook_decay}: must lie in '
                      f'[0, 1)')
  model_values = dict(config.model)
  kind = configuration.choice('model.name', model_values.pop('name', None), AUTOENCODERS)
  model = configuration.from_section(AUTOENCODERS[kind], 'model', model_values)
  check_image_shape(model, image_shape, 'config.model', data.name)
  ev = run_config.build_eval(config.eval)
  return AutoencoderSetup(train=run_config.build_train(config.train),
                          optim=run_config.build_optim(config.optim), eval=ev,
                          objective=objective, model=model, kind=kind, data=data,
                          image_shape=image_shape, source=source,
                          profile=run_config.build_profile(config.get('profile', {})),
                          log=run_config.build_log(config.get('log', {})))


def check_image_shape(model, image_shape, where: str, data_name: str) -> None:
  """Images `[H, W, C]` the autoencoder takes: C = in_channels and H, W divisible by f; then
  traces `init` abstractly so any other bad field fails now."""
  if len(image_shape) != 3:
    raise ConfigError(f'{where}: an autoencoder needs [H, W, C] images; data {data_name!r} has '
                      f'shape {list(image_shape)}')
  h, w, c = image_shape
  try:
    f = model.f
  except (TypeError, ValueError) as e:
    raise ConfigError(f'{where}: {str(e).splitlines()[0]}') from None
  if h % f or w % f:
    raise ConfigError(f'{where}.block_out_channels={list(model.block_out_channels)}: f={f} does '
                      f'not divide the {h}x{w} images of data {data_name!r}')
  if c != model.in_channels:
    raise ConfigError(f'{where}.in_channels={model.in_channels}: data {data_name!r} has {c} '
                      f'channels')
  x = jax.ShapeDtypeStruct((1, h, w, c), jnp.float32)
  try:
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  except (TypeError, ValueError) as e:
    raise ConfigError(f'{where}: {str(e).splitlines()[0]}') from None


def init_fn(setup: AutoencoderSetup, optimizer, ema_fn, posthoc_fn=None):
  """`init(key) -> TrainState`: parameters, and for an EMA codebook its state in
  `model_state` (`{'vq_ema': ...}`)."""
  def init(key):
    k_params, k_state = jax.random.split(key)
    x = jnp.zeros((1,) + tuple(setup.image_shape), jnp.float32)
    variables = dict(setup.model.init({'params': k_params}, x))
    params = variables.pop('params')
    return training.init_train_state(params, optimizer, ema_fn, k_state, model_state=variables,
                                     posthoc_fn=posthoc_fn)
  return init


def loss_fn(setup: AutoencoderSetup):
  """`loss(params, model_state, batch, key, step) -> (loss, (metrics, model_state))` for
  `training.make_loss_train_step`; metrics: the loss's terms and the batch's PSNR (and for VQ
  the codebook's perplexity and usage)."""
  model, obj = setup.model, setup.objective

  if setup.kind == 'kl':
    def kl_loss(params, model_state, batch, key, step):
      del step
      k_sample, k_dropout = jax.random.split(key)

      def apply(variables, x, key, sample_posterior):
        return model.apply(variables, x, key, sample_posterior, train=True,
                           rngs={'dropout': k_dropout})
      loss, aux = autoencoder_losses.kl_vae_loss(
          apply, {'params': params, **model_state}, batch['image'], k_sample,
          beta=obj.kl_weight, reconstruction=obj.reconstruction)
      metrics = {k: aux[k] for k in ('reconstruction', 'kl', 'psnr')}
      return loss, (metrics, model_state)
    return kl_loss

  def vq_loss(params, model_state, batch, key, step):
    del step
    k_restart, k_dropout = jax.random.split(key)
    variables = {'params': params, **model_state}
    rngs = {'dropout': k_dropout}
    encode = lambda x: model.apply(variables, x, train=True, rngs=rngs, method='encode')
    decode = lambda z: model.apply(variables, z, quantize=False, train=True, rngs=rngs,
                                   method='decode')
    ema = setup.ema_codebook
    codebook = (model_state['vq_ema']['quantizer']['codebook'] if ema
                else params['quantizer']['codebook'])
    loss, aux = autoencoder_losses.vq_vae_loss(
        encode, decode, codebook, batch['image'], beta_commit=obj.commitment,
        reconstruction=obj.reconstruction, ema=ema)
    if ema:
      state = vq.EMAState(**model_state['vq_ema']['quantizer'])
      state = vq.ema_update(state, aux['z'], aux['indices'], obj.codebook_decay)
      if obj.restart_threshold > 0:
        state = vq.restart_dead_codes(state, aux['z'], k_restart, obj.restart_threshold)
      model_state = {**model_state, 'vq_ema': {'quantizer': state._asdict()}}
    metrics = {k: aux[k] for k in ('reconstruction', 'codebook', 'commitment', 'perplexity',
                                   'usage', 'psnr')}
    return loss, (metrics, model_state)
  return vq_loss


def encoder(setup: AutoencoderSetup, params, model_state=None):
  """`encode(x) -> z`: images to the latents diffused (KL: the posterior mean; VQ: z_e)."""
  variables = {'params': params, **(model_state or {})}

  def encode(x):
    z = setup.model.apply(variables, x, method='encode')
    return z.mean if setup.kind == 'kl' else z
  return encode


def decoder(setup: AutoencoderSetup, params, model_state=None):
  """`decode(z) -> x`: latents (unscaled) to images (VQ: quantized first)."""
  variables = {'params': params, **(model_state or {})}
  return lambda z: setup.model.apply(variables, z, method='decode')


def downsample_mask(mask, f: int) -> jax.Array:
  """A pixel inpainting mask `[B, H, W, C]` or `[B, H, W]` (1 / True = known) -> the latent
  mask `[B, H/f, W/f, 1]` (bool) for `inpainting.inpaint` in latent space: a latent position is
  known only if every pixel of its f x f block (in every channel) is, because its latent is a
  function of that block (conservative: no unknown pixel is ever treated as known)."""
  mask = jnp.asarray(mask)
  if mask.ndim == 3:
    mask = mask[..., None]
  if mask.ndim != 4 or mask.shape[1] % f or mask.shape[2] % f:
    raise ValueError(f'downsample_mask: mask of shape {mask.shape} is not [B, H, W(, C)] with H '
                     f'and W divisible by f={f}')
  known = mask if mask.dtype == jnp.bool_ else mask != 0
  b, h, w, c = known.shape
  blocks = known.reshape(b, h // f, f, w // f, f, c)
  return jnp.all(blocks, axis=(2, 4, 5))[..., None]


def measure_scale_factor(count: int, total: float, total_sq: float) -> float:
  """1 / std of latent elements from their count, sum and sum of squares (float64)."""
  mean = total / count
  var = max(total_sq / count - mean * mean, 0.0)
  if not math.isfinite(var) or var <= 0:
    raise ValueError(f'latents: variance {var} over {count} elements; the encoder maps every '
                     f'image to the same latent, so there is no scale to measure')
  return 1.0 / math.sqrt(var)


def reconstruction_metrics(x: np.ndarray, x_hat: np.ndarray) -> dict:
  """PSNR (dB, peak-to-peak 2 for [-1, 1]), MSE and mean absolute error over a set."""
  diff = np.asarray(x, np.float64) - np.asarray(x_hat, np.float64)
  mse = float(np.mean(diff**2))
  return {'psnr': 10.0 * math.log10(4.0 / mse) if mse > 0 else float('inf'), 'mse': mse,
          'mae': float(np.mean(np.abs(diff)))}
