"""Train state, optimizer, EMA and one pure `train_step(state, batch) -> (state, metrics)`.

The objective is passed in, not hard-wired (DESIGN §5). Randomness: one root key lives in the
state; each step uses `fold_in(key, step)` split by role, so a resumed run draws exactly what an
uninterrupted one would. A step whose loss or gradients are not finite changes nothing but the
step counter and the skip counters (the data position still moves on, past the bad batch).
"""

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax


class TrainingDiverged(RuntimeError):
  """Too many consecutive updates had a non-finite loss or gradient; the run stopped."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: number of updates applied
  params: Any
  ema_params: Any          # the EMA copy samplers use by default
  opt_state: Any
  key: jax.Array           # uint32 [2] raw key data (plain array: checkpoints stay portable)
  skipped: jax.Array       # int32: updates skipped for a non-finite loss or gradient, in all
  consecutive_skips: jax.Array  # int32: skipped in a row up to now (0 after a good update)
  # Non-gradient model state the loss updates (a VQ autoencoder's EMA codebook); {} if none.
  model_state: Any = flax.struct.field(default_factory=dict)
  # The power-function EMAs tracked for post-hoc EMA (`ema.power_ema_tracker`): a tuple of
  # parameter trees, one per profile; () when off (no leaves: checkpoints are unchanged).
  posthoc_ema: Any = flax.struct.field(default_factory=tuple)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 2e-3
  warmup_steps: int = 100
  schedule: str = 'cosine'       # 'constant' or 'cosine' decay after warm-up
  decay_steps: int = 0           # cosine decay length (defaults to the run length)
  final_lr_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.999
  weight_decay: float = 0.0
  grad_clip: float = 1.0         # global-norm clipping; 0 disables


def learning_rate_schedule(cfg: OptimConfig, num_steps: int) -> optax.Schedule:
  """Linear warm-up to `lr`, then constant or cosine decay to `final_lr_fraction * lr`."""
  if cfg.schedule == 'constant':
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, max(cfg.warmup_steps, 1)),
         optax.constant_schedule(cfg.lr)], [max(cfg.warmup_steps, 1)])
  if cfg.schedule == 'cosine':
    decay = cfg.decay_steps or num_steps
    return optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(cfg.warmup_steps, 1), max(decay, cfg.warmup_steps + 1),
        end_value=cfg.lr * cfg.final_lr_fraction)
  raise ValueError(f"optim.schedule={cfg.schedule!r}; choose 'constant' or 'cosine'")


def make_optimizer(cfg: OptimConfig, num_steps: int,
                   frozen: tuple[str, ...] = ()) -> optax.GradientTransformation:
  """AdamW with warm-up, optional cosine decay and global-norm gradient clipping.

  `frozen` names top-level parameter subtrees (e.g. 'encoder', a pretrained text encoder) whose
  updates are zero: neither the gradient step nor the weight decay touches them, and they hold
  no Adam moments."""
  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  parts.append(optax.adamw(learning_rate_schedule(cfg, num_steps), b1=cfg.b1, b2=cfg.b2,
                           weight_decay=cfg.weight_decay))
  optimizer = optax.chain(*parts)
  if not frozen:
    return optimizer

  def labels(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: 'frozen' if path[0].key in frozen else 'train', params)
  return optax.multi_transform({'train': optimizer, 'frozen': optax.set_to_zero()}, labels)


class EMA(NamedTuple):
  """Exponential moving average of parameters as an `(init, update)` pair.

  `update(ema, params, step)` is called after each applied update with `step` the number of
  updates before it (0 first). Kinds: `ema` (a fixed decay), `ema_halflife` (EDM's half-life
  in images), `diffusion_jax.ema.power_ema` (EDM2's power function).
  """
  init: Callable[[Any], Any]
  update: Callable[[Any, Any, jax.Array], Any]


def ema(decay: float, warmup: bool = True) -> EMA:
  """Decay `min(decay, (1 + step) / (10 + step))` when `warmup` is on (so early averages are
  not dominated by the random initialisation), else `decay`."""
  if not 0.0 <= decay < 1.0:
    raise ValueError(f'EMA decay={decay} must lie in [0, 1)')

  def init(params):
    return jax.tree.map(jnp.array, params)

  def update(ema_params, params, step):
    d = jnp.asarray(decay, jnp.float32)
    if warmup:
      step = jnp.asarray(step, jnp.float32)
      d = jnp.minimum(d, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema_params, params)

  return EMA(init, update)


def ema_halflife(halflife_images: float, batch_size: int,
                 rampup_ratio: float | None = None) -> EMA:
  """EMA with a half-life in training images, so its length does not depend on the batch
  size (Karras et al. 2022, EDM: half-life 500 kimg with ramp-up ratio 0.05 in the released
  training loop).

  Decay per update `beta = 0.5^(batch_size / h)`: after `n` more updates a parameter's weight
  has shrunk by `0.5^(n batch_size / h)`, i.e. halved every `h` images. With `rampup_ratio`,
  `h = min(halflife_images, rampup_ratio * images_seen)` where `images_seen = step *
  batch_size` counts the images before this update (as EDM does): early in training the
  average spans a fixed fraction of the run, and the first update copies the parameters.
  """
  if not halflife_images > 0:
    raise ValueError(f'EMA halflife_images={halflife_images} must be > 0')
  if not batch_size >= 1:
    raise ValueError(f'EMA batch_size={batch_size} must be >= 1')
  if rampup_ratio is not None and not rampup_ratio > 0:
    raise ValueError(f'EMA rampup_ratio={rampup_ratio} must be > 0 (or None: no ramp-up)')

  def init(params):
    return jax.tree.map(jnp.array, params)

  def update(ema_params, params, step):
    halflife = jnp.asarray(halflife_images, jnp.float32)
    if rampup_ratio is not None:
      seen = jnp.asarray(step, jnp.float32) * batch_size
      halflife = jnp.minimum(halflife, rampup_ratio * seen)
    # log(beta); the floor keeps h = 0 (the first update of a ramp-up) finite: beta = 0.
    log_beta = -math.log(2.0) * batch_size / jnp.maximum(halflife, 1e-8)
    beta, one_minus_beta = jnp.exp(log_beta), -jnp.expm1(log_beta)
    return jax.tree.map(lambda e, p: (beta * e + one_minus_beta * p).astype(e.dtype),
                        ema_params, params)

  return EMA(init, update)


def init_train_state(params, optimizer: optax.GradientTransformation, ema_fn: EMA,
                     key: jax.Array, model_state=None, posthoc_fn=None) -> TrainState:
  """The state before the first update; `posthoc_fn` (an `ema.power_ema_tracker`, or None)
  fills `posthoc_ema`."""
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, ema_params=ema_fn.init(params),
                    opt_state=optimizer.init(params), key=jax.random.key_data(key),
                    skipped=zero, consecutive_skips=zero,
                    model_state={} if model_state is None else model_state,
                    posthoc_ema=() if posthoc_fn is None else posthoc_fn.init(params))


def make_train_step(objective, apply_fn, optimizer: optax.GradientTransformation, ema_fn: EMA,
                    *, conditional: bool = False, cond_key: str | None = None,
                    grad_accum_steps: int = 1, batch_constraint=None, posthoc_fn=None,
                    frozen: tuple[str, ...] = ()):
  """Builds the pure `train_step(state, batch) -> (state, metrics)` of a diffusion objective;
  jit it at the call site.

  `objective` is an `objectives.Objective` (called as `objective(model_fn, x0, key, cond)`);
  `apply_fn` is a Flax `Module.apply`. `batch` holds 'image' `[B, ...]` and, if
  `conditional`, 'label' `[B]` (the model's `cond`). `cond_key='tokens'` conditions on the
  caption `{'tokens': batch['tokens']}` instead (`models.text.TextConditioned`); any other key
  (an image-derived condition: 'control', 'low_res') passes `batch[cond_key]` itself. An
  objective with `takes_step` (consistency training's curriculum) receives the step. The update
  itself is `make_loss_train_step`'s (`frozen`: see there).
  """
  takes_step = objective.takes_step
  key_name = cond_key or ('label' if conditional else None)

  def loss_fn(params, model_state, batch, key, step):
    key_obj, key_dropout = jax.random.split(key)
    cond = None if key_name is None else (
        {key_name: batch[key_name]} if key_name == 'tokens' else batch[key_name])

    def model_fn(x_t, t, c, **kw):   # kw: a multi-part model's part (DMD's 'generator', 'fake')
      return apply_fn({'params': params}, x_t, t, c, train=True, rngs={'dropout': key_dropout},
                      **kw)
    extra = {'step': step} if takes_step else {}
    loss, _ = objective(model_fn, batch['image'], key_obj, cond, **extra)
    return loss, ({}, model_state)

  return make_loss_train_step(loss_fn, optimizer, ema_fn, grad_accum_steps=grad_accum_steps,
                              batch_constraint=batch_constraint, posthoc_fn=posthoc_fn,
                              frozen=frozen)


def _keep_frozen(averaged, params, frozen):
  """`averaged` with its `frozen` top-level subtrees replaced by `params`' own: the average of
  a constant is that constant, where `d e + (1 - d) p` with `e = p` may round an ulp away."""
  if not frozen:
    return averaged
  return {**averaged, **{k: params[k] for k in frozen}}


def make_loss_train_step(loss_fn, optimizer: optax.GradientTransformation, ema_fn: EMA, *,
                         grad_accum_steps: int = 1, batch_constraint=None, posthoc_fn=None,
                         frozen: tuple[str, ...] = ()):
  """`train_step(state, batch) -> (state, metrics)` for any loss (diffusion objectives, the
  autoencoders of `diffusion_jax.latent`); jit it at the call site.

  `loss_fn(params, model_state, batch, key, step) -> (loss, (metrics, new_model_state))`:
  `metrics` a dict of scalars reported beside the loss (batch means), `new_model_state` the
  non-gradient state after this batch (`state.model_state` in, e.g. an EMA codebook; `{}` if
  none). `key` is this step's (and micro-batch's) key.

  `grad_accum_steps = A > 1` splits the batch into A micro-batches of B / A examples, run one
  after another (`lax.scan`), and applies the mean of their gradients once: the update of a
  batch of B in the memory of B / A. Micro-batch a takes examples a, a + A, a + 2A, ..., so
  when the batch is sharded in contiguous blocks each device holds an equal part of every
  micro-batch (`batch_constraint`, a sharding for `[A, B / A, ...]` arrays, keeps it there).
  Micro-batch a draws its randomness from `fold_in(key, a)`; the model state passes through
  the micro-batches in order.

  `posthoc_fn` (an `ema.power_ema_tracker`, or None) updates `state.posthoc_ema` after each
  applied update, as `ema_fn` does `state.ema_params`.

  An update whose loss or any gradient is not finite is skipped: parameters, EMAs, optimizer
  and model state stay as they were, `skipped` and `consecutive_skips` count it (metrics
  `skipped` = 1).

  `frozen` names top-level parameter subtrees the optimizer leaves alone
  (`make_optimizer(frozen=...)`): their averages are kept equal to the parameters themselves.
  """
  if grad_accum_steps < 1:
    raise ValueError(f'grad_accum_steps={grad_accum_steps} must be >= 1')

  def loss_and_grad(params, model_state, batch, key, step):
    (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, model_state, batch, key, step)
    return loss, metrics, model_state, grads

  def accumulated(params, model_state, batch, key, step):
    def split(x):   # [B, ...] -> [A, B / A, ...], micro-batch a = rows a, a + A, ...
      if x.shape[0] % grad_accum_steps:
        raise ValueError(f'batch of {x.shape[0]} is not divisible by '
                         f'grad_accum_steps={grad_accum_steps}')
      x = x.reshape((x.shape[0] // grad_accum_steps, grad_accum_steps) + x.shape[1:])
      x = jnp.swapaxes(x, 0, 1)
      if batch_constraint is not None:
        x = jax.lax.with_sharding_constraint(x, batch_constraint)
      return x
    micro = {k: split(v) for k, v in batch.items() if v is not None}

    def body(carry, inputs):
      a, mb = inputs
      total_loss, total_metrics, model_state, total_grads = carry
      loss, metrics, model_state, grads = loss_and_grad(
          params, model_state, mb, jax.random.fold_in(key, a), step)
      return (total_loss + loss, jax.tree.map(jnp.add, total_metrics, metrics), model_state,
              jax.tree.map(jnp.add, total_grads, grads)), None
    zeros = jax.tree.map(jnp.zeros_like, params)
    first = jax.tree.map(lambda x: x[0], micro)
    metric_shapes = jax.eval_shape(lambda: loss_and_grad(params, model_state, first, key,
                                                         step)[1])
    no_metrics = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
    (loss, metrics, model_state, grads), _ = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), no_metrics, model_state, zeros),
        (jnp.arange(grad_accum_steps), micro))
    scale = 1.0 / grad_accum_steps
    return (loss * scale, jax.tree.map(lambda m: m * scale, metrics), model_state,
            jax.tree.map(lambda g: g * scale, grads))

  def train_step(state: TrainState, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    if grad_accum_steps == 1:
      loss, extra, model_state, grads = loss_and_grad(state.params, state.model_state, batch,
                                                      key, state.step)
    else:
      loss, extra, model_state, grads = accumulated(state.params, state.model_state, batch, key,
                                                    state.step)
    grad_norm = optax.global_norm(grads)
    # A NaN or inf anywhere in the gradients makes their norm non-finite.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(state):
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      ema = _keep_frozen(ema_fn.update(state.ema_params, params, state.step), params, frozen)
      state = state.replace(params=params, opt_state=opt_state, model_state=model_state,
                            ema_params=ema)
      if posthoc_fn is not None:
        posthoc = posthoc_fn.update(state.posthoc_ema, params, state.step)
        state = state.replace(posthoc_ema=tuple(_keep_frozen(p, params, frozen)
                                                for p in posthoc))
      return state
    # A conditional, not a select per leaf: one branch runs, and the program stays small.
    new_state = jax.lax.cond(finite, apply, lambda state: state, state)
    bad = (~finite).astype(jnp.int32)
    new_state = new_state.replace(step=state.step + 1, skipped=state.skipped + bad,
                                  consecutive_skips=(state.consecutive_skips + 1) * bad)
    metrics = {**extra, 'loss': loss, 'grad_norm': grad_norm, 'skipped': bad,
               'skipped_total': new_state.skipped,
               'consecutive_skips': new_state.consecutive_skips}
    return new_state, metrics

  return train_step
