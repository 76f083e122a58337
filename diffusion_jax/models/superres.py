"""Super-resolution denoisers for cascades: SR3 with noise-conditioning augmentation.

* **SR3** (Saharia et al. 2021, arXiv:2104.07636, §2.3): the low-resolution image `c`
  `[B, h, w, C']` is upsampled to the target size and concatenated to `x_t` along channels; any
  image network (`UNet`, `DiT`) then sees `[B, H, W, C + C']` and predicts for `x_t`'s `C`
  channels. Upsampling is `jax.image.resize` with `upsample='nearest'` (for an integer factor
  each pixel repeated `f x f`: the operator of the digits pipeline's `data.image_size=16`) or
  `'bilinear'` (half-pixel centres: `digits.bilinear_matrix`, the pipeline's 32 x 32).
* **Gaussian conditioning augmentation** (Ho et al. 2021, Cascaded Diffusion Models,
  arXiv:2106.15282, §3.2 / §4.3): in training the condition is corrupted as
  `z_s = alpha(s) c + sigma(s) eps`, `s ~ U[0, aug_max]` per example, by the VP cosine process
  with the whole log-SNR range (`processes.VPCosine(-inf, inf)`: `alpha(s) = cos(pi s / 2)`,
  `sigma(s) = sin(pi s / 2)`, so `s = 0` is the clean condition exactly), and the level `s` is
  given to the network. At sampling a fixed `s = sample_aug_level` (0 = off) corrupts the
  condition once per sample (`prepare_cond`), not at every sampler step. A model trained with
  augmentation learns to be robust to the base model's imperfect low-resolution samples, the
  compounding error of a cascade.

The level reaches the network as one more constant input channel (`s` everywhere), not as an
embedding added to the time embedding (Imagen's choice): a channel works with every network in
`MODELS` without touching it, and a network's first layer is linear in its input, so a
constant channel carries the same information as a learned bias per level. With
`augment='none'` there is no level channel: the plain SR3 concat model.

Randomness in training comes from the 'dropout' rng stream that `training.make_train_step`
passes; sampling draws the augmentation noise from the key given to `prepare_cond`.
`build_condition` is the `config.superres` section's builder: it wraps the configured network
and returns the `data.derived.ImageCondition` that makes each training image's condition, its
`factor x factor` block mean (the exact inverse of nearest upsampling).
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import configuration
from diffusion_jax import processes
from diffusion_jax.configuration import ConfigError

AUGMENTATIONS = ('none', 'gaussian')
UPSAMPLINGS = ('nearest', 'bilinear')
LOW_RES_KEY = 'low_res'


def augmentation_process():
  """The process that corrupts the condition: VP cosine over the whole log-SNR range,
  `alpha(s) = cos(pi s / 2)`, `sigma(s) = sin(pi s / 2)` (exactly 1 and 0 at s = 0)."""
  return processes.VPCosine(logsnr_min=-math.inf, logsnr_max=math.inf)


def augment_condition(low_res: jax.Array, level: jax.Array, eps: jax.Array) -> jax.Array:
  """`z_s = alpha(s) c + sigma(s) eps` (Ho et al. 2021, §4.3), `level` `s` `[B]` per example."""
  process = augmentation_process()
  s = jnp.broadcast_to(jnp.asarray(level, jnp.float32), low_res.shape[:1])[:, None, None, None]
  return process.alpha(s) * low_res + process.sigma(s) * eps  # [B, h, w, C']


def upsample_condition(low_res: jax.Array, factor: int, method: str = 'nearest') -> jax.Array:
  """`[B, h, w, C] -> [B, f h, f w, C]` by `jax.image.resize` ('nearest' repeats each pixel
  `f x f`; 'bilinear' is `digits.bilinear_matrix`'s half-pixel-centre interpolation)."""
  b, h, w, c = low_res.shape
  return jax.image.resize(low_res, (b, factor * h, factor * w, c), method)


def downsample(images: np.ndarray, factor: int) -> np.ndarray:
  """`[N, H, W, C] -> [N, H/f, W/f, C]` block means (host numpy): the exact inverse of nearest
  upsampling, so the 16x16 digits (each pixel repeated 2 x 2) give back the 8x8 digits."""
  images = np.asarray(images, np.float32)
  n, h, w, c = images.shape
  if h % factor or w % factor:
    raise ValueError(f'superres.downsample: images of shape {images.shape} are not divisible '
                     f'by factor={factor}')
  return images.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def consistency_metrics(samples: np.ndarray, conds: np.ndarray, factor: int) -> dict:
  """How well super-resolved samples keep their condition: the mean over samples of the L2
  norm `||downsample(x_i) - c_i||` and the per-pixel RMS of the same difference."""
  diff = downsample(samples, factor) - np.asarray(conds, np.float32)  # [N, h, w, C]
  per_sample = np.sqrt(np.sum(diff.reshape(len(diff), -1) ** 2, axis=1))
  return {'sr_consistency_l2': float(per_sample.mean()),
          'sr_consistency_rmse': float(np.sqrt(np.mean(diff ** 2)))}


class SuperResolution(nn.Module):
  """`net` conditioned on a low-resolution image (see the module docstring).

  `cond` is the low-resolution image `[B, H/f, W/f, C']`, or a dict with it under 'low_res'
  plus, optionally, 'aug_level' (`[B]` or a scalar: the condition is already augmented at that
  level, as `prepare_cond` returns it) and the keys `net` itself takes ('label', 'context',
  'context_mask'), which are passed on.
  """
  net: nn.Module
  factor: int = 2
  upsample: str = 'nearest'
  augment: str = 'none'
  aug_max: float = 0.5
  sample_aug_level: float = 0.0

  @property
  def out_channels(self) -> int | None:
    return getattr(self.net, 'out_channels', None)

  def _check_config(self):
    if self.factor < 1:
      raise ValueError(f'SuperResolution: factor={self.factor} must be a positive integer.')
    if self.upsample not in UPSAMPLINGS:
      raise ValueError(f'SuperResolution: upsample={self.upsample!r}; choose from {UPSAMPLINGS}.')
    if self.augment not in AUGMENTATIONS:
      raise ValueError(f'SuperResolution: augment={self.augment!r}; choose from '
                       f'{AUGMENTATIONS}.')
    if not 0.0 <= self.aug_max <= 1.0 or not 0.0 <= self.sample_aug_level <= 1.0:
      raise ValueError(f'SuperResolution: aug_max={self.aug_max} and sample_aug_level='
                       f'{self.sample_aug_level} must lie in [0, 1] (the time of the '
                       f'augmentation process).')

  def split_cond(self, cond: Any) -> tuple[jax.Array, Any, dict]:
    """`(low_res, aug_level or None, the rest of cond for net)`."""
    if isinstance(cond, dict):
      if LOW_RES_KEY not in cond:
        raise ValueError(f"SuperResolution: cond must hold '{LOW_RES_KEY}' (the low-resolution "
                         f'image), got keys {sorted(cond)}.')
      rest = {k: v for k, v in cond.items() if k not in (LOW_RES_KEY, 'aug_level')}
      return jnp.asarray(cond[LOW_RES_KEY]), cond.get('aug_level'), rest
    if cond is None:
      raise ValueError('SuperResolution: cond is None; a super-resolution model needs the '
                       'low-resolution image [B, h, w, C].')
    return jnp.asarray(cond), None, {}

  def check_low_res(self, low_res: jax.Array, shape: tuple) -> None:
    """A one-line error naming both shapes and the factor unless `low_res` is `shape / f`."""
    b, h, w = shape[:3]
    f = self.factor
    if (low_res.ndim != 4 or low_res.shape[0] != b or low_res.shape[1] * f != h
        or low_res.shape[2] * f != w):
      raise ValueError(f'SuperResolution: the low-res condition has shape {tuple(low_res.shape)} '
                       f'but x_t has shape {tuple(shape)}; with factor={f} it must be '
                       f'[{b}, {h / f:g}, {w / f:g}, C] (x_t size / {f}).')

  def prepare_cond(self, cond: Any, key: jax.Array) -> dict:
    """The sampling condition, augmented once per sample: `{'low_res': z_s, 'aug_level': [B]}`
    with `s = sample_aug_level` and noise from `key` (for `augment='none'`, `{'low_res': c}`).
    Every sampler step then sees the same `z_s`. Needs no parameters: call it on the module."""
    self._check_config()
    low_res, level, rest = self.split_cond(cond)
    if self.augment == 'none' or level is not None:
      return {LOW_RES_KEY: low_res, **({} if level is None else {'aug_level': level}), **rest}
    s = jnp.full(low_res.shape[:1], self.sample_aug_level, jnp.float32)
    eps = jax.random.normal(key, low_res.shape, jnp.float32)
    return {LOW_RES_KEY: augment_condition(low_res, s, eps), 'aug_level': s, **rest}

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, cond: Any = None, *,
               train: bool = False) -> jax.Array:
    self._check_config()
    low_res, level, rest = self.split_cond(cond)
    self.check_low_res(low_res, x.shape)
    b = x.shape[0]
    inputs = [x, upsample_condition(low_res.astype(x.dtype), self.factor, self.upsample)]
    if self.augment == 'gaussian':
      if level is None and train:
        key_s, key_eps = jax.random.split(self.make_rng('dropout'))
        level = jax.random.uniform(key_s, (b,), jnp.float32, 0.0, self.aug_max)
        eps = jax.random.normal(key_eps, low_res.shape, jnp.float32)
        inputs[1] = upsample_condition(augment_condition(low_res, level, eps).astype(x.dtype),
                                       self.factor, self.upsample)
      elif level is None:
        if self.sample_aug_level > 0 and not self.is_initializing():
          raise ValueError(f'SuperResolution: sample_aug_level={self.sample_aug_level} > 0 needs '
                           f'the condition augmented once per sample: pass '
                           f'prepare_cond(cond, key) as cond.')
        level = jnp.zeros((b,), jnp.float32)
      level = jnp.broadcast_to(jnp.asarray(level, x.dtype), (b,))
      inputs.append(jnp.broadcast_to(level[:, None, None, None], x.shape[:3] + (1,)))
    elif level is not None:
      raise ValueError("SuperResolution: cond has 'aug_level' but augment='none'.")
    h = jnp.concatenate(inputs, axis=-1)  # [B, H, W, C + C' (+ 1)]
    return self.net(h, t, rest or None, train=train)


@dataclasses.dataclass(frozen=True)
class SuperResConfig:
  """`config.superres`: the upsampling `factor`, the `upsample` operator, the augmentation
  (`'gaussian'` or `'none'`), its largest training level `aug_max` and the fixed sampling
  level `sample_aug_level` (0 = off), both times of `augmentation_process()` in [0, 1]."""
  factor: int = 2
  upsample: str = 'nearest'
  augment: str = 'gaussian'
  aug_max: float = 0.5
  sample_aug_level: float = 0.0


def build_config(section) -> SuperResConfig:
  cfg = configuration.from_section(SuperResConfig, 'superres', dict(section))
  configuration.positive('superres.factor', cfg.factor)
  configuration.choice('superres.upsample', cfg.upsample, UPSAMPLINGS)
  configuration.choice('superres.augment', cfg.augment, AUGMENTATIONS)
  for k in ('aug_max', 'sample_aug_level'):
    if not 0.0 <= getattr(cfg, k) <= 1.0:
      raise ConfigError(f'config.superres.{k}={getattr(cfg, k)}: must lie in [0, 1] (a time '
                        f'of the augmentation process)')
  return cfg


def build_condition(section, model, image_shape):
  """The `config.superres` builder: `(SuperResolution(model), ImageCondition('low_res', ...))`.

  The condition of a training image is its `factor x factor` block mean; the model's output
  channels default to the image's (the concatenated input has more). The condition's metrics
  are `consistency_metrics` (how far each sample's block mean is from its condition).
  """
  from diffusion_jax.data import derived  # pylint: disable=g-import-not-at-top
  cfg = build_config(section)
  h, w, c = image_shape
  if h % cfg.factor or w % cfg.factor:
    raise ConfigError(f'config.superres.factor={cfg.factor}: the images ({h} x {w}) are not '
                      f'divisible by it')
  if hasattr(model, 'out_channels') and model.out_channels is None:
    model = model.clone(out_channels=c)
  sr = SuperResolution(net=model, factor=cfg.factor, upsample=cfg.upsample, augment=cfg.augment,
                       aug_max=cfg.aug_max, sample_aug_level=cfg.sample_aug_level)
  factor = cfg.factor
  condition = derived.ImageCondition(
      LOW_RES_KEY, lambda images: downsample(images, factor),
      metrics=lambda samples, conds: consistency_metrics(samples, conds, factor))
  return sr, condition
