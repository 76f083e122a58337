"""ControlNet: spatial control of a trained, frozen U-Net (Zhang et al. 2023, arXiv:2302.05543).

§3.1, eq. 2 and Fig. 3: a neural block `F(x; Θ)` is locked and joined to a *trainable copy*
`F(.; Θc)` through zero-initialised convolutions `Z`:

    y_c = F(x; Θ) + Z(F(x + Z(c; Θz1); Θc); Θz2).

§3.2 applies this to the U-Net's encoder and middle block: the copy reads the noisy input, the
time (and class / text) embedding, and the condition `c` (a map, encoded by a small conv net `E`
whose last layer is zero-initialised, added after the copy's `conv_in`); one zero-initialised
1x1 conv per encoder skip and one on the middle block's output feed residuals that are added to
the locked U-Net's skips and middle output before its decoder consumes them. At initialisation
every zero conv outputs exactly zero, so the ControlNet's output equals the base model's exactly.

Parameters: `{'base': <the UNet's params>, 'control': {'hint': E, 'encoder': the copy (the
UNet's encoder / middle / embedding parameters, under the UNet's own names), 'zero_<i>' (one per
skip), 'zero_mid'}}`. `attach_base(params, base_params)` installs the trained base and copies its
encoder weights into the copy (the "trainable copy"). With `freeze_base` (default) the base's
parameters are read through `stop_gradient` (their gradient is exactly zero and the backward pass
skips it); the optimizer also freezes them (`training.make_optimizer(frozen=('base',))`).

`build_condition` is the `config.control` section's builder (`run_config.CONDITION_BUILDERS`): it
wraps the configured U-Net and returns the `data.derived.ImageCondition` 'control' whose `fn` is
the operator `control.operator` of `data.control` and whose metrics are its control fidelity
(`control_iou`, `control_l1`). The base comes from `config.base` (`finetune`).

How the U-Net is shared: `UNet._encode` runs the checks, the embedding, `conv_in`, the encoder
and the middle block; `UNet.__call__` calls it, then the decoder (adding `residuals` if given).
`UNetEncoder` is a `UNet` whose `__call__` calls only `_encode` (with the condition features as
`hint`), so the copy's parameters have the UNet's names and shapes without duplicated code.

`cond`: the control map `[B, H, W, control_channels]` (the image's H, W), or a dict
`{'control': map, 'control_strength': [B] or scalar, 'label': [B], 'context': ..., ...}`.
The control strength multiplies every residual (0: the base model exactly, 1: as trained; the
paper's sampling-time "control strength"). Without 'control_strength' it is 1 in training and
the module's `strength` field otherwise (`config.control.strength`, a sampling option).
Labels and contexts go to both the base and the copy (§3.2); their dropout (the base's
`label_dropout` / `context_dropout`) is drawn once here, so both see the same condition. The
locked base runs deterministically (no dropout); the copy with the base's `dropout` in training.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from diffusion_jax import configuration
from diffusion_jax.configuration import ConfigError
from diffusion_jax.models import initializers
from diffusion_jax.models import layers
from diffusion_jax.models import unet

CONTROL_KEY = 'control'
COND_KEYS = (CONTROL_KEY, 'control_strength', 'label', 'context', 'context_mask')


def _conv(features: int, kernel: int, dtype, name: str, zero_init: bool = False) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), dtype=dtype,
                 kernel_init=initializers.zeros if zero_init else initializers.lecun_normal(),
                 name=name)


class UNetEncoder(unet.UNet):
  """The embedding, `conv_in`, encoder and middle block of a `UNet` (same fields, same parameter
  names): `(x, t, cond, hint) -> [*skips, middle output]`, the activations the decoder reads."""

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, cond: Any = None, *, train: bool = False,
               hint: jax.Array | None = None) -> list[jax.Array]:
    h, skips, *_ = self._encode(x, t, cond, train, hint)
    return [*skips, h]


class HintEncoder(nn.Module):
  """`E(c)` of §3.2: 3x3 convs with SiLU from the control map to `features` channels, the last
  zero-initialised. At full resolution: pixel-space U-Nets need no 8x down-sampling to latents."""
  channels: tuple[int, ...]
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, c: jax.Array) -> jax.Array:
    h = c.astype(self.dtype)  # [B, H, W, Cc]
    for i, ch in enumerate(self.channels):
      h = nn.silu(_conv(ch, 3, self.dtype, f'conv_{i}')(h))
    return _conv(self.features, 3, self.dtype, 'conv_out', zero_init=True)(h)  # [B, H, W, ch]


class ControlBranch(nn.Module):
  """`Z(F(x + Z(c; Θz1); Θc); Θz2)` for every skip and the middle output: the residuals."""
  encoder: UNetEncoder
  hint_channels: tuple[int, ...]

  @nn.compact
  def __call__(self, x, t, cond, control, *, train: bool) -> list[jax.Array]:
    dtype = layers.canonical_dtype('ControlNet', self.encoder.dtype)
    hint = HintEncoder(tuple(self.hint_channels), self.encoder.ch, dtype, name='hint')(control)
    feats = self.encoder(x, t, cond, train=train, hint=hint)
    names = [f'zero_{i}' for i in range(len(feats) - 1)] + ['zero_mid']
    return [_conv(f.shape[-1], 1, dtype, name, zero_init=True)(f)
            for f, name in zip(feats, names, strict=True)]


def _stop_gradient(variables):
  return jax.tree.map(jax.lax.stop_gradient, variables)


def _unet_fields(net: unet.UNet, **overrides) -> dict:
  fields = {f.name: getattr(net, f.name) for f in dataclasses.fields(unet.UNet)
            if f.name not in ('parent', 'name')}
  return {**fields, **overrides}


class ControlNet(nn.Module):
  """A `UNet` (`base_model`, locked) with a ControlNet branch; see the module docstring.

  Attributes:
    base_model: the trained U-Net (its fields; its parameters live in params['base']).
    hint_channels: widths of the condition encoder's hidden 3x3 convs.
    control_channels: channels Cc of the control map.
    strength: the control strength outside training when `cond` gives none.
    freeze_base: read the base's parameters through `stop_gradient`.
  """
  base_model: unet.UNet
  hint_channels: tuple[int, ...] = (16, 16)
  control_channels: int = 1
  strength: float = 1.0
  freeze_base: bool = True

  @property
  def num_classes(self) -> int:
    return self.base_model.num_classes

  @property
  def context_dim(self) -> int:
    return self.base_model.context_dim

  def _check(self):
    if not isinstance(self.base_model, unet.UNet) or isinstance(self.base_model, UNetEncoder):
      raise ValueError(f'ControlNet: the base model must be a UNet (models/unet.py), got '
                       f'{type(self.base_model).__name__}.')
    if self.control_channels < 1 or any(c < 1 for c in self.hint_channels):
      raise ValueError(f'ControlNet: control_channels={self.control_channels} and hint_channels='
                       f'{tuple(self.hint_channels)} must be positive.')

  def _split_cond(self, x: jax.Array, cond: Any, train: bool):
    """`(control [B, H, W, Cc], strength [B] or scalar, rest)` of `cond` (see the docstring)."""
    if isinstance(cond, dict):
      unknown = set(cond) - set(COND_KEYS)
      if unknown or 'control' not in cond:
        raise ValueError(f'ControlNet: cond keys {sorted(cond)}: need "control", may have '
                         f'{list(COND_KEYS[1:])}.')
      control, strength = cond['control'], cond.get('control_strength')
      rest = {k: v for k, v in cond.items() if k not in ('control', 'control_strength')}
    else:
      control, strength, rest = cond, None, {}
    if control is None:
      raise ValueError('ControlNet: cond needs a control map [B, H, W, Cc] (the condition).')
    control = jnp.asarray(control)
    expected = (*x.shape[:3], self.control_channels)
    if control.shape != expected:
      raise ValueError(f'ControlNet: control map of shape {control.shape} does not match the '
                       f'image x of shape {x.shape}: expected [B, H, W, Cc] = {expected}.')
    if strength is None:
      strength = 1.0 if train else self.strength
    strength = jnp.asarray(strength, jnp.float32)
    if strength.shape not in ((), (x.shape[0],)):
      raise ValueError(f'ControlNet: control_strength must be a scalar or [B] = ({x.shape[0]},), '
                       f'got shape {strength.shape}.')
    return control, jnp.broadcast_to(strength, x.shape[:1]), rest

  def _conditioning(self, rest: dict, batch: int, train: bool):
    """Labels / context for both networks, dropped once here (the base's rates)."""
    base = self.base_model
    c = layers.parse_cond('ControlNet', rest or None, batch, base.num_classes, base.context_dim)
    out = {}
    if c.labels is not None:
      out['label'] = layers.drop_labels(self, c.labels, base.num_classes, base.label_dropout,
                                        train=train)
    c = layers.drop_context(self, c, base.context_dropout, train=train)
    if c.context is not None:
      out['context'] = c.context
      if c.context_mask is not None:
        out['context_mask'] = c.context_mask
    return out or None

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, cond: Any = None, *,
               train: bool = False) -> jax.Array:
    """`x` [B, H, W, C], `t` [B], `cond` the control map or a dict -> the base's output."""
    self._check()
    control, strength, rest = self._split_cond(x, cond, train)
    net_cond = self._conditioning(rest, x.shape[0], train)
    fields = _unet_fields(self.base_model, label_dropout=0.0, context_dropout=0.0)
    base_cls = unet.UNet
    if self.freeze_base:
      base_cls = nn.map_variables(unet.UNet, 'params', trans_in_fn=_stop_gradient, init=True)
    base = base_cls(**fields, name='base')
    # parent=None: the copy belongs to the branch (params['control']['encoder']), not to self.
    copy = UNetEncoder(**fields, parent=None)
    branch = ControlBranch(copy, tuple(self.hint_channels), name='control')
    residuals = branch(x, t, net_cond, control, train=train)
    residuals = [r * strength.astype(r.dtype)[:, None, None, None] for r in residuals]
    return base(x, t, net_cond, train=False, residuals=residuals)

  def attach_base(self, params: dict, base_params: dict) -> dict:
    """`params` with `base_params` (a trained UNet's, without the 'params' collection key) as
    the base and its encoder / middle / embedding weights copied into the trainable copy."""
    copy = params['control']['encoder']
    missing = sorted(set(copy) - set(base_params))
    if missing:
      raise ValueError(f'ControlNet.attach_base: the base parameters lack {missing} (is it a UNet '
                       f'of the same configuration?)')
    new_copy = {k: base_params[k] for k in copy}
    for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(copy)[0],
                                 jax.tree_util.tree_flatten_with_path(new_copy)[0], strict=True):
      if a.shape != b.shape:
        raise ValueError(f'ControlNet.attach_base: base parameter {jax.tree_util.keystr(path)} '
                         f'has shape {b.shape}, the copy {a.shape}.')
    return {**params, 'base': base_params, 'control': {**params['control'], 'encoder': new_copy}}


@dataclasses.dataclass(frozen=True)
class ControlConfig:
  operator: str = 'edges'            # `data.control.OPERATORS`: the map computed from the image
  threshold: float | None = None     # the operator's binarisation threshold (None: its default)
  hint_channels: tuple[int, ...] = (16, 16)
  strength: float = 1.0              # the control strength when sampling (training uses 1)


def build_config(section) -> ControlConfig:
  """The `control` section, checked; one-line `ConfigError`s name the key."""
  from diffusion_jax.data import control  # pylint: disable=g-import-not-at-top
  cfg = configuration.from_section(ControlConfig, 'control', section)
  configuration.choice('control.operator', cfg.operator, control.OPERATORS)
  configuration.positive('control.strength', cfg.strength, allow_zero=True)
  if not cfg.hint_channels or min(cfg.hint_channels) < 1:
    raise ConfigError(f'config.control.hint_channels={cfg.hint_channels}: one or more positive '
                      f'widths')
  return cfg


def build_condition(section, model, image_shape):
  """The `config.control` builder: `(ControlNet(model), ImageCondition('control', op))` with the
  control fidelity of `op` as the condition's metrics."""
  from diffusion_jax.data import control  # pylint: disable=g-import-not-at-top
  from diffusion_jax.data import derived  # pylint: disable=g-import-not-at-top
  cfg = build_config(section)
  if not isinstance(model, unet.UNet):
    raise ConfigError(f'config.control: ControlNet copies a U-Net\'s encoder (model.name='
                      f"'unet'); got {type(model).__name__}")
  op = control.make_operator(cfg.operator, cfg.threshold)
  condition = derived.ImageCondition(CONTROL_KEY, op, metrics=control.fidelity_metrics(op))
  channels = condition.shape(image_shape)[-1]
  net = ControlNet(model, hint_channels=tuple(cfg.hint_channels), control_channels=channels,
                   strength=cfg.strength)
  return net, condition
