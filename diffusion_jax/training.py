"""Train state, optimizer, EMA and one pure `train_step(state, batch) -> (state, metrics)`.

The objective is passed in, not hard-wired (DESIGN §5). Randomness: one root key lives in the
state; each step uses `fold_in(key, step)` split by role, so a resumed run draws exactly what an
uninterrupted one would.
"""

import dataclasses
import inspect
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 scalar: number of updates applied
  params: Any
  ema_params: Any          # the EMA copy samplers use by default
  opt_state: Any
  key: jax.Array           # uint32 [2] raw key data (plain array: checkpoints stay portable)


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


def make_optimizer(cfg: OptimConfig, num_steps: int) -> optax.GradientTransformation:
  """AdamW with warm-up, optional cosine decay and global-norm gradient clipping."""
  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  parts.append(optax.adamw(learning_rate_schedule(cfg, num_steps), b1=cfg.b1, b2=cfg.b2,
                           weight_decay=cfg.weight_decay))
  return optax.chain(*parts)


class EMA(NamedTuple):
  """Exponential moving average of parameters as an `(init, update)` pair.

  `update(ema, params, step)` uses decay `min(decay, (1 + step) / (10 + step))` when `warmup`
  is on, so early averages are not dominated by the random initialisation.
  """
  init: Callable[[Any], Any]
  update: Callable[[Any, Any, jax.Array], Any]


def ema(decay: float, warmup: bool = True) -> EMA:
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


def init_train_state(params, optimizer: optax.GradientTransformation, ema_fn: EMA,
                     key: jax.Array) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema_fn.init(params),
                    opt_state=optimizer.init(params), key=jax.random.key_data(key))


def make_train_step(objective, apply_fn, optimizer: optax.GradientTransformation, ema_fn: EMA,
                    *, conditional: bool = False):
  """Builds the pure `train_step(state, batch) -> (state, metrics)`; jit it at the call site.

  `objective(model_fn, x0, key, cond)` as in `diffusion_jax.objectives`; `apply_fn` is a Flax
  `Module.apply`. `batch` holds 'image' `[B, ...]` and, if `conditional`, 'label' `[B]`.
  Objectives with a `step` argument (consistency training's curriculum) receive the step.
  """
  takes_step = 'step' in inspect.signature(objective).parameters

  def train_step(state: TrainState, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    key_obj, key_dropout = jax.random.split(key)
    cond = batch['label'] if conditional else None

    def loss_fn(params):
      def model_fn(x_t, t, c):
        return apply_fn({'params': params}, x_t, t, c, train=True, rngs={'dropout': key_dropout})
      extra = {'step': state.step} if takes_step else {}
      loss, aux = objective(model_fn, batch['image'], key_obj, cond, **extra)
      return loss, aux

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        ema_params=ema_fn.update(state.ema_params, params, state.step))
    metrics = {'loss': loss, 'grad_norm': optax.global_norm(grads)}
    return new_state, metrics

  return train_step
