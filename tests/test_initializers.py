"""The flat-draw initializers give exactly the values of the `jax.nn.initializers` / Flax ones.

`diffusion_jax.models.initializers` draws every random parameter on `(prod(shape),)` and
reshapes (multi-dimensional draws compile very slowly on CPU). Checked here, byte for byte:
each initializer against its `jax.nn.initializers` / Flax original on dense, conv,
DenseGeneral-style (several in/out/batch axes) and embedding shapes; whole-model `init` of the
smoke U-Net, a small DiT and the MLP (conditioned, so class embeddings and cross-attention are
included) against the same `init` traced under `reference_draws()`, which hands every draw to
the original initializers (the parameters the models had before the flat draws); and, from the
traced programs, that no model layer (nor the AutoencoderKL's) makes a multi-dimensional draw
(so none falls back to a Flax default). Programs compile at LLVM optimisation level 0, as in
test_unet.py.
"""

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits
from diffusion_jax import run_config
from diffusion_jax.models import AutoencoderKL, initializers

_FAST_COMPILE = {'xla_backend_optimization_level': 0}


def _assert_bytes_equal(a, b):
  """Same dtype, shape and bits (assert_array_equal alone would accept -0.0 == 0.0)."""
  a, b = np.asarray(a), np.asarray(b)
  assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
  np.testing.assert_array_equal(a, b)
  assert a.tobytes() == b.tobytes()


def _draw_all(pairs, key):
  """Both initializers of every `(new, original, shape, dtype)`, in one O0-compiled program."""
  @functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
  def draw(key):
    keys = jax.random.split(key, len(pairs))
    return [(new(k, shape, dtype), orig(k, shape, dtype))
            for k, (new, orig, shape, dtype) in zip(keys, pairs, strict=True)]
  return draw(key)


# (name, new, original): the original is what Flax / jax.nn.initializers give.
_VS = jax.nn.initializers.variance_scaling
INITIALIZERS = [
    ('lecun_normal', initializers.lecun_normal(), nn.linear.default_kernel_init),
    ('xavier_uniform', initializers.xavier_uniform(), nn.initializers.xavier_uniform()),
    ('embed_normal', initializers.embed_normal(), nn.linear.default_embed_init),
    ('normal_0.02', initializers.normal(0.02), nn.initializers.normal(0.02)),
    ('fan_out_normal', initializers.variance_scaling(2.0, 'fan_out', 'normal'),
     _VS(2.0, 'fan_out', 'normal')),
    ('fan_geo_avg_truncated', initializers.variance_scaling(0.5, 'fan_geo_avg', 'truncated_normal'),
     _VS(0.5, 'fan_geo_avg', 'truncated_normal')),
]
SHAPES = [
    (17, 5),        # Dense [in, out]; also the flattened kernel nn.DenseGeneral draws
    (3, 3, 4, 6),   # Conv [kh, kw, in, out]
    (11, 7),        # Embed [num_embeddings, features]
]
# variance_scaling's in/out/batch axes on a 4-D weight (DenseGeneral-style layouts).
AXES = [
    dict(in_axis=0, out_axis=(1, 2)),                  # [in, heads, head_dim] (q/k/v)
    dict(in_axis=(0, 1), out_axis=-1),                 # [heads, head_dim, out] (out proj)
    dict(in_axis=(0, 1), out_axis=(2, 3)),             # [in1, in2, out1, out2]
    dict(in_axis=-2, out_axis=-1, batch_axis=0),       # a batched (stacked) kernel
    dict(in_axis=1, out_axis=0),                       # transposed layout
]


def test_each_initializer_matches_the_original():
  pairs = [(new, orig, shape, jnp.float32) for _, new, orig in INITIALIZERS for shape in SHAPES]
  pairs.append((initializers.lecun_normal(), nn.linear.default_kernel_init, (3, 3, 4, 6),
                jnp.bfloat16))
  for axes, (scale, mode, dist) in zip(AXES, [
      (1.0, 'fan_in', 'truncated_normal'), (1.0, 'fan_avg', 'uniform'), (3.0, 'fan_out', 'normal'),
      (1.0, 'fan_geo_avg', 'uniform'), (2.0, 'fan_in', 'normal')], strict=True):
    pairs.append((initializers.variance_scaling(scale, mode, dist, **axes),
                  _VS(scale, mode, dist, **axes), (2, 3, 4, 5), jnp.float32))
  for new, orig in _draw_all(pairs, jax.random.key(0)):
    _assert_bytes_equal(new, orig)


def test_compute_fans():
  assert initializers.compute_fans((3, 3, 4, 6)) == (36, 54)        # conv: 3*3*4, 3*3*6
  # nn.Embed's [num, features] with out_axis=0: both fans are `features`.
  assert initializers.compute_fans((11, 7), out_axis=0) == pytest.approx((7, 7))
  assert initializers.compute_fans((2, 3, 4, 5), in_axis=(0, 1), out_axis=(2, 3)) == (6, 20)
  assert initializers.compute_fans((4, 5, 6), batch_axis=0) == (5, 6)
  with pytest.raises(ValueError, match='in_axis'):
    initializers.compute_fans((5,))


def test_values_agree_without_partitionable_threefry():
  pairs = [(initializers.lecun_normal(), nn.linear.default_kernel_init, (3, 3, 4, 6),
            jnp.float32)]
  with jax.threefry_partitionable(False):
    drawn = _draw_all(pairs, jax.random.key(2))
  for new, orig in drawn:
    _assert_bytes_equal(new, orig)


# Smoke U-Net (with class labels and a cross-attended context), a small DiT, the MLP.
MODEL_CASES = {
    'unet': ('smoke,cond', dict(context_dim=5)),
    'dit': ('smoke,dit,cond', dict(context_dim=5)),
    'mlp': ('smoke,mlp,cond', {}),
}


def _model_and_inputs(name):
  variant, extra = MODEL_CASES[name]
  config = digits.get_config(variant).model
  config.update(extra)
  model = run_config.build_model(config)
  x, t = jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,))
  cond = {'label': jnp.array([0, 3], jnp.int32)}
  if extra.get('context_dim'):
    cond['context'] = jnp.ones((2, 3, extra['context_dim']))
  return model, (x, t, cond)


def _init(model, inputs, reference: bool):
  # A fresh jit per call: `reference_draws()` is read when `init` is traced.
  init = jax.jit(model.init, compiler_options=_FAST_COMPILE)
  with initializers.reference_draws() if reference else contextlib.nullcontext():
    return init(jax.random.key(3), *inputs)


# The U-Net's whole-model comparison is `slow` (13 s of CI): its layers' initializers (conv,
# dense, attention, embeddings) are those the DiT and MLP cases and the per-initializer tests
# above compare by default.
@pytest.mark.parametrize('name', [pytest.param('unet', marks=pytest.mark.slow), 'dit', 'mlp'])
def test_model_init_is_bit_identical_to_the_original_draws(name):
  model, inputs = _model_and_inputs(name)
  new, ref = _init(model, inputs, False), _init(model, inputs, True)
  assert jax.tree.structure(new) == jax.tree.structure(ref)
  jax.tree.map(_assert_bytes_equal, new, ref)
  # Not vacuous: the parameters are random (not all zero) and differ between leaves.
  kernels = [leaf for leaf in jax.tree.leaves(new) if leaf.ndim >= 2 and np.any(leaf)]
  assert len(kernels) >= 3


def _random_draw_shapes(jaxpr) -> list[tuple[int, ...]]:
  """Output shapes of every `random_bits` in a (closed) jaxpr, sub-jaxprs included."""
  shapes = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'random_bits':
      shapes.append(tuple(eqn.outvars[0].aval.shape))
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          shapes += _random_draw_shapes(sub)
  return shapes


@pytest.mark.parametrize('name', list(MODEL_CASES))
def test_no_model_layer_draws_multidimensionally(name):
  model, inputs = _model_and_inputs(name)
  trace = lambda: jax.make_jaxpr(model.init)(jax.random.key(0), *inputs).jaxpr
  flat = _random_draw_shapes(trace())
  assert len(flat) >= 3 and all(len(s) <= 1 for s in flat), flat
  with initializers.reference_draws():  # the check can fail: the original draws are N-D
    assert any(len(s) > 1 for s in _random_draw_shapes(trace()))


def test_no_autoencoder_layer_draws_multidimensionally():
  model = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
  jaxpr = jax.make_jaxpr(model.init)(jax.random.key(0), jnp.zeros((1, 4, 4, 3))).jaxpr
  flat = _random_draw_shapes(jaxpr)
  assert len(flat) >= 20 and all(len(s) <= 1 for s in flat), flat
