"""Parameter initializers that draw their random numbers flat: fast to compile, same values.

Each initializer here gives bit-identical values to its `jax.nn.initializers` / Flax
counterpart (`lecun_normal` is Flax's default kernel init of `nn.Dense`, `nn.DenseGeneral` and
`nn.Conv`; `embed_normal` is `nn.Embed`'s default), but makes its random draw on the flat shape
`(prod(shape),)` and reshapes. The fans (and so the scale) still come from the true shape,
with the `in_axis` / `out_axis` / `batch_axis` semantics of `jax.nn.initializers.
variance_scaling`.

Why: with `jax_threefry_partitionable` (the default), the random bits of element `i` hash its
linear index, so a flat draw reshaped equals the multi-dimensional draw — but XLA on CPU
compiles the multi-dimensional index arithmetic far more slowly (a `[3, 3, 8, 9]` draw took
~20 s vs 0.3 s flat), and a model's `init` compiles one such draw per parameter. (Without
partitionable threefry the bits are generated flat and reshaped anyway, so the values agree
under either setting.)

Every model layer that draws random parameters passes one of these explicitly, so no layer
falls back to a Flax default that draws multi-dimensionally. `reference_draws()` switches all
of them, while the model's `init` is traced, to the `jax.nn.initializers` originals on the true
shape — the values every model had before — for tests and compile-time benchmarks.
"""

import contextlib
import math
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]
Axes = int | Sequence[int]

zeros = jax.nn.initializers.zeros

# Read when an initializer is called (i.e. when `init` is traced): False means draw as
# `jax.nn.initializers` does. Changed only through `reference_draws()`.
_flat = True


@contextlib.contextmanager
def reference_draws():
  """Within this context, initializers draw on the parameter's own shape (the originals).

  Values are the same either way; only the compiled program (and its compile time) differ.
  The switch is read at trace time: a function jitted inside the context and called outside
  keeps the draws it was traced with. Not thread-safe (a module-level switch).
  """
  global _flat
  previous, _flat = _flat, False
  try:
    yield
  finally:
    _flat = previous


def _axis_size(shape: tuple[int, ...], axes: Axes) -> int:
  if isinstance(axes, int):
    return shape[axes]
  return math.prod(shape[a] for a in axes)


def compute_fans(shape: Sequence[int], in_axis: Axes = -2, out_axis: Axes = -1,
                 batch_axis: Axes = ()) -> tuple[float, float]:
  """`(fan_in, fan_out)` of a weight of `shape`, as `jax.nn.initializers.variance_scaling`.

  Axes in none of `in_axis`, `out_axis`, `batch_axis` form the receptive field (a conv's
  spatial axes); it multiplies both fans, and `batch_axis` is ignored. E.g. a conv kernel
  `[kh, kw, c_in, c_out]` has `fan_in = kh kw c_in`; `nn.Embed`'s `[num, features]` with
  `out_axis=0` has `fan_in = features`. The arithmetic (float division in this order) is the
  reference's, so the resulting scale is the same float.
  """
  shape = tuple(int(d) for d in shape)
  if isinstance(in_axis, int) and in_axis == -2 and len(shape) <= 1:
    raise ValueError(f'compute_fans: a {len(shape)}-D weight {shape} has no default input axis; '
                     f'pass in_axis explicitly.')
  in_size = _axis_size(shape, in_axis)
  out_size = _axis_size(shape, out_axis)
  batch_size = _axis_size(shape, batch_axis)
  receptive_field = math.prod(shape) / in_size / out_size / batch_size
  return in_size * receptive_field, out_size * receptive_field


def _default_dtype(dtype):
  return jax.dtypes.canonicalize_dtype(jnp.float_) if dtype is None else jnp.dtype(dtype)


def _flat_shape(shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int]]:
  shape = tuple(int(d) for d in shape)
  return shape, (math.prod(shape),)


def variance_scaling(scale: float, mode: str, distribution: str, in_axis: Axes = -2,
                     out_axis: Axes = -1, batch_axis: Axes = (), dtype=None) -> Initializer:
  """`jax.nn.initializers.variance_scaling` with the random draw made flat.

  Standard deviation `sqrt(scale / n)`, `n` = fan_in, fan_out, their mean ('fan_avg') or
  geometric mean ('fan_geo_avg'); distribution 'truncated_normal' (at ±2 standard deviations,
  rescaled to keep the variance), 'normal' or 'uniform'. Real dtypes only draw flat; a complex
  dtype goes to the reference.
  """
  if mode not in ('fan_in', 'fan_out', 'fan_avg', 'fan_geo_avg'):
    raise ValueError(f'variance_scaling: invalid mode {mode!r}')
  if distribution not in ('truncated_normal', 'normal', 'uniform'):
    raise ValueError(f'variance_scaling: invalid distribution {distribution!r}')
  reference = jax.nn.initializers.variance_scaling(scale, mode, distribution, in_axis, out_axis,
                                                   batch_axis, dtype)

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = dtype) -> jax.Array:
    dtype = _default_dtype(dtype)
    if not _flat or not jnp.issubdtype(dtype, jnp.floating):
      return reference(key, shape, dtype)
    shape, flat = _flat_shape(shape)
    fan_in, fan_out = compute_fans(shape, in_axis, out_axis, batch_axis)
    denominator = {'fan_in': fan_in, 'fan_out': fan_out, 'fan_avg': (fan_in + fan_out) / 2,
                   'fan_geo_avg': (fan_in * fan_out) ** 0.5}[mode]
    variance = jnp.array(scale / denominator, dtype=dtype)
    if distribution == 'truncated_normal':
      # .8796... is the standard deviation of a standard normal truncated to (-2, 2).
      stddev = jnp.sqrt(variance) / jnp.array(.87962566103423978, dtype)
      return jax.random.truncated_normal(key, -2, 2, flat, dtype).reshape(shape) * stddev
    if distribution == 'normal':
      # JAX's own scaled-normal draw, on the flat shape: its arithmetic changed in jax 0.11
      # (one fused scale of erf_inv(u) instead of normal() * scale), so delegating keeps the
      # values bit-identical to the original's on every JAX version.
      return _flat_normal(key, flat, dtype, jnp.sqrt(variance)).reshape(shape)
    return jax.random.uniform(key, flat, dtype, -1).reshape(shape) * jnp.sqrt(3 * variance)

  return init


def _flat_normal(key, flat, dtype, stddev):
  """`N(0, stddev^2)` on the 1-D shape `flat`, drawn by `jax.nn.initializers.normal` itself
  (the same arithmetic as the originals' scaled-normal draw, whatever the JAX version)."""
  return jax.nn.initializers.normal(stddev, dtype)(key, flat, dtype)


def lecun_normal(in_axis: Axes = -2, out_axis: Axes = -1, batch_axis: Axes = (),
                 dtype=None) -> Initializer:
  """Truncated normal with variance `1 / fan_in`: Flax's default kernel init
  (`nn.linear.default_kernel_init`, of `nn.Dense`, `nn.DenseGeneral`, `nn.Conv`)."""
  return variance_scaling(1.0, 'fan_in', 'truncated_normal', in_axis, out_axis, batch_axis,
                          dtype)


def xavier_uniform(in_axis: Axes = -2, out_axis: Axes = -1, batch_axis: Axes = (),
                   dtype=None) -> Initializer:
  """Glorot / Xavier uniform: variance `2 / (fan_in + fan_out)` (`jax.nn.initializers.
  xavier_uniform`)."""
  return variance_scaling(1.0, 'fan_avg', 'uniform', in_axis, out_axis, batch_axis, dtype)


def embed_normal(dtype=None) -> Initializer:
  """`nn.Embed`'s default: normal with variance `1 / features` (`out_axis=0` on the
  `[num_embeddings, features]` table)."""
  return variance_scaling(1.0, 'fan_in', 'normal', out_axis=0, dtype=dtype)


def normal(stddev: float = 1e-2, dtype=None) -> Initializer:
  """`jax.nn.initializers.normal(stddev)`: `N(0, stddev^2)`, drawn flat."""
  reference = jax.nn.initializers.normal(stddev, dtype)

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = dtype) -> jax.Array:
    dtype = _default_dtype(dtype)
    if not _flat or not jnp.issubdtype(dtype, jnp.floating):
      return reference(key, shape, dtype)
    shape, flat = _flat_shape(shape)
    return _flat_normal(key, flat, dtype, jnp.array(stddev, dtype)).reshape(shape)

  return init
