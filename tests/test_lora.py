"""Tests for LoRA (models/lora.py; Hu et al. 2021, eq. 3: h = W0 x + (alpha / r) B A x).

Exact properties, each against an answer written here: B = 0 leaves the base bitwise; merged
weights and the unmerged forward (W0 x + (alpha/r) (x A) B per adapted call) agree to float32
rounding; `unmerge` inverts `merge`; `merge` of conv and DenseGeneral kernels equals the update
written index by index in numpy; the base gets exactly zero gradient. Plus the bad inputs the
issue lists (a pattern matching nothing, adapters for another base) and the digits class
filter the fine-tuning experiment uses.

Parameters come from `jax.eval_shape` shapes and numpy draws (no `init` compile); each model
compiles one forward program, at LLVM -O0 (tests/conftest.py).
"""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.data import digits
from diffusion_jax.data import sources
from diffusion_jax.models import DiT, UNet
from diffusion_jax.models import lora

X_SHAPE = (2, 8, 8, 1)   # [B, H, W, C]
EPS32 = np.finfo(np.float32).eps
# rank 2, alpha 3: the update's scale alpha / r = 1.5 is neither 1 nor alpha nor 1 / r, so a
# wrong factor shows. Attention projections (the default) plus the U-Net's ResBlock convs and
# the DiT's patchify conv.
CONFIG = lora.LoraConfig(rank=2, alpha=3.0, convs=True,
                         targets=lora.DEFAULT_TARGETS + (r'(res_\d/conv_\d|x_embedder)/kernel$',))
MODELS = {
    'unet': UNet(ch=8, ch_mult=(1,), num_groups=4, attn_resolutions=(8,)),
    'dit': DiT(patch_size=2, hidden_size=16, depth=1, num_heads=2, frequency_dim=16),
}


def _flat(tree, prefix=''):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}/'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _random_like(tree, seed, scale):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), jnp.float32),
                      tree)


def _inputs():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal(X_SHAPE), jnp.float32)
  t = jnp.asarray([0.3, 0.7], jnp.float32)
  return x, t


@pytest.fixture(scope='module', params=sorted(MODELS))
def setting(request):
  """(model, x, t, base params with every leaf ~ N(0, 0.3²) so nothing is zero-initialised,
  adapters with A ~ N(0, 1) and B ~ N(0, 0.5²))."""
  model = MODELS[request.param]
  x, t = _inputs()
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)['params']
  base = _random_like(shapes, 1, 0.3)
  adapters = _random_like(jax.eval_shape(lambda p: lora.init_lora(jax.random.key(0), p, CONFIG),
                                         base), 2, 0.5)
  return model, x, t, base, adapters


def test_default_targets_are_the_attention_projections():
  x, t = _inputs()
  unet = jax.eval_shape(MODELS['unet'].init, jax.random.key(0), x, t)['params']
  dit = jax.eval_shape(MODELS['dit'].init, jax.random.key(0), x, t)['params']
  cfg = lora.LoraConfig()
  attn = ('down_0_attn_0', 'mid_attn', 'up_0_attn_0', 'up_0_attn_1')
  assert lora.lora_targets(unet, cfg) == [f'{a}/{p}/kernel' for a in attn
                                          for p in ('key', 'out', 'query', 'value')]
  assert lora.lora_targets(dit, cfg) == ['block_0/proj/kernel', 'block_0/qkv/kernel']
  # convs=False skips conv kernels a pattern matches; convs=True takes them.
  both = lora.LoraConfig(targets=(r'mid_res_0/conv_0/kernel$|mid_attn/query/kernel$',))
  assert lora.lora_targets(unet, both) == ['mid_attn/query/kernel']
  assert len(lora.lora_targets(unet, lora.LoraConfig(targets=both.targets, convs=True))) == 2


def test_merge_is_w_plus_scaled_ab_index_by_index():
  """The oracle writes dW[...] = (alpha / r) sum_k A[row, k] B[k, col] with the row and column
  of each kernel entry spelled out per module convention, not through a reshape."""
  rng = np.random.default_rng(3)
  r, s = CONFIG.rank, CONFIG.alpha / CONFIG.rank
  kh, kw, c_in, c_out, n, d = 3, 3, 2, 5, 2, 3
  base = {'blk_attn': {'query': {'kernel': rng.standard_normal((4, n, d)),     # [C, N, D]
                                 'bias': np.zeros((n, d))},
                       'out': {'kernel': rng.standard_normal((n, d, 4)),       # [N, D, C]
                               'bias': np.zeros(4)}},
          'res_0': {'conv_0': {'kernel': rng.standard_normal((kh, kw, c_in, c_out)),
                               'bias': np.zeros(c_out)}}}
  base = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), base)
  cfg = lora.LoraConfig(rank=r, alpha=CONFIG.alpha, convs=True,
                        targets=(r'query/kernel', 'out/kernel', 'conv_0/kernel'))
  adapters = _random_like(jax.eval_shape(lambda p: lora.init_lora(jax.random.key(0), p, cfg),
                                         base), 4, 1.0)
  merged = _flat(jax.jit(lambda w, ab: lora.merge(w, ab, cfg))(base, adapters))
  w, ab = _flat(base), _flat(adapters)
  a = lambda p: np.asarray(ab[p + '/a'], np.float64)
  b = lambda p: np.asarray(ab[p + '/b'], np.float64)

  p = 'res_0/conv_0/kernel'
  want = np.array(w[p], np.float64)
  for i in range(kh):
    for j in range(kw):
      for ci in range(c_in):
        for co in range(c_out):
          want[i, j, ci, co] += s * a(p)[(i * kw + j) * c_in + ci] @ b(p)[:, co]
  np.testing.assert_allclose(merged[p], want, rtol=1e-6, atol=1e-6)  # float32 rounding

  p = 'blk_attn/query/kernel'
  want = np.array(w[p], np.float64)
  for ci in range(4):
    for hi in range(n):
      for di in range(d):
        want[ci, hi, di] += s * a(p)[ci] @ b(p)[:, hi * d + di]
  np.testing.assert_allclose(merged[p], want, rtol=1e-6, atol=1e-6)

  p = 'blk_attn/out/kernel'
  want = np.array(w[p], np.float64)
  for hi in range(n):
    for di in range(d):
      for co in range(4):
        want[hi, di, co] += s * a(p)[hi * d + di] @ b(p)[:, co]
  np.testing.assert_allclose(merged[p], want, rtol=1e-6, atol=1e-6)
  for p in ('blk_attn/query/bias', 'blk_attn/out/bias', 'res_0/conv_0/bias'):
    np.testing.assert_array_equal(merged[p], w[p])


def test_zero_b_and_unmerge(setting):
  """init_lora: A ~ N(0, 1/fan_in), B = 0, so merge gives the base bitwise (W + 0 == W);
  unmerge(merge(W)) is W to float32 rounding of the two additions."""
  model, x, t, base, adapters = setting

  @jax.jit   # one compile instead of an eager op per kernel shape
  def run(base, adapters):
    fresh = lora.init_lora(jax.random.key(5), base, CONFIG)
    merged = lora.merge(base, adapters, CONFIG)
    return fresh, lora.merge(base, fresh, CONFIG), merged, lora.unmerge(merged, adapters, CONFIG)

  fresh, merged_fresh, merged, back = (_flat(tree) for tree in run(base, adapters))
  for p, v in fresh.items():
    if p.endswith('/b'):
      assert not np.any(np.asarray(v))
    else:
      fan_in = v.shape[0]
      assert 0.5 < np.std(np.asarray(v)) * np.sqrt(fan_in) < 1.5 or v.size < 16
  w = _flat(base)
  for p, v in merged_fresh.items():
    np.testing.assert_array_equal(v, w[p])

  targets = set(lora.lora_targets(base, CONFIG))
  for p, v in back.items():
    if p in targets:
      d = np.asarray(merged[p]) - np.asarray(w[p])
      assert np.max(np.abs(d)) > 0.1   # the update is really there
      # Two float32 roundings, each within eps/2 of |W + dW| or |dW|.
      np.testing.assert_allclose(v, w[p], rtol=0,
                                 atol=2 * EPS32 * float(np.max(np.abs(w[p]) + np.abs(d))))
    else:
      np.testing.assert_array_equal(v, w[p])
      np.testing.assert_array_equal(merged[p], w[p])


def test_merged_equals_unmerged_forward_and_zero_b_is_the_base(setting):
  model, x, t, base, adapters = setting
  wrapped = lora.LoraModel(model, CONFIG)
  zero = jax.tree.map(jnp.zeros_like, adapters)

  # Three programs: the base, the merged wrapper (run with zero and with random B), unmerged.
  y_base = np.asarray(jax.jit(lambda p: model.apply({'params': p}, x, t))(base))
  merged_fn = jax.jit(lambda p: wrapped.apply({'params': p}, x, t))
  y_zero = np.asarray(merged_fn({'base': base, 'lora': zero}))
  y_merged = np.asarray(merged_fn({'base': base, 'lora': adapters}))
  y_unmerged = np.asarray(jax.jit(lambda p: wrapped.apply_unmerged({'params': p}, x, t))(
      {'base': base, 'lora': adapters}))
  np.testing.assert_array_equal(y_zero, y_base)     # W + (alpha/r) A 0 == W, bitwise
  scale = np.max(np.abs(y_merged))
  assert np.max(np.abs(y_merged - y_base)) > 0.1 * scale   # the adapters change the output
  # x (W0 + dW) and x W0 + (x A) B differ by float32 rounding only: ~eps * sqrt(fan_in) per
  # layer relative to its output, accumulated over ~15 layers (measured ~2e-6 of the output's
  # scale); 2e-5 leaves 10x margin and is 1e4 times below the adapters' effect.
  np.testing.assert_allclose(y_merged, y_unmerged, rtol=0, atol=2e-5 * scale)


def test_gradient_is_zero_on_base_and_nonzero_on_every_adapter():
  model, (x, t) = MODELS['dit'], _inputs()
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t)['params']
  base = _random_like(shapes, 1, 0.3)
  adapters = _random_like(jax.eval_shape(lambda p: lora.init_lora(jax.random.key(0), p, CONFIG),
                                         base), 2, 0.5)
  wrapped = lora.LoraModel(model, CONFIG)
  loss = lambda params: jnp.mean(wrapped.apply({'params': params}, x, t) ** 2)
  grads = jax.jit(jax.grad(loss))({'base': base, 'lora': adapters})
  for p, g in _flat(grads['base']).items():
    assert not np.any(np.asarray(g)), p
  for p, g in _flat(grads['lora']).items():
    assert np.all(np.isfinite(g)) and np.any(np.asarray(g)), p


def test_lora_model_init_and_forwarded_attributes():
  x, t = _inputs()
  model = UNet(ch=8, ch_mult=(1, 2), num_groups=4, attn_resolutions=(4,), num_classes=3)
  cfg = lora.LoraConfig(rank=3, convs=True,
                        targets=lora.DEFAULT_TARGETS + (r'mid_res_0/conv_0/kernel$',))
  wrapped = lora.LoraModel(model, cfg)
  assert wrapped.num_classes == 3 and wrapped.out_channels is None
  assert wrapped.base_model is model
  labels = jnp.zeros((2,), jnp.int32)
  params = jax.eval_shape(wrapped.init, {'params': jax.random.key(0)}, x, t, labels)['params']
  assert set(params) == {'base', 'lora'}
  base_shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, labels)['params']
  assert jax.tree.map(lambda s: s.shape, params['base']) == jax.tree.map(lambda s: s.shape,
                                                                        base_shapes)
  adapters = _flat(params['lora'])
  assert len(adapters) == 2 * 17      # 16 attention projections and one conv, A and B each
  assert adapters['mid_attn/query/kernel/a'].shape == (16, 3)   # [fan_in = C, r]
  assert adapters['mid_attn/out/kernel/b'].shape == (3, 16)     # [r, fan_out = C]
  assert adapters['mid_res_0/conv_0/kernel/a'].shape == (3 * 3 * 16, 3)  # [kh kw C_in, r]
  with pytest.raises(ValueError, match=r"params must be \{'base', 'lora'\}"):
    wrapped.apply({'params': base_shapes}, x, t, labels)


def test_bad_config_and_patterns_are_one_line_errors():
  x, t = _inputs()
  unet = jax.eval_shape(MODELS['unet'].init, jax.random.key(0), x, t)['params']
  for kwargs, msg in [(dict(rank=0), 'rank=0'), (dict(alpha=0.0), 'alpha=0.0'),
                      (dict(targets=('attn(',)), "'attn\\('"), (dict(targets=()), 'empty')]:
    with pytest.raises(ValueError, match=msg) as e:
      lora.LoraConfig(**kwargs)
    assert '\n' not in str(e.value)
  cases = [(('no_such_layer/kernel',), "pattern 'no_such_layer/kernel' matches nothing"),
           (('mid_attn/query/bias',), 'matches only non-kernel parameters'),
           ((r'mid_res_0/conv_0',), 'matches only conv kernels .* set convs=True')]
  for targets, msg in cases:
    with pytest.raises(ValueError, match=msg) as e:
      lora.lora_targets(unet, lora.LoraConfig(targets=lora.DEFAULT_TARGETS + targets))
    assert '\n' not in str(e.value)
  with pytest.raises(ValueError, match=r"kernel paths look like \['conv_in/kernel'"):
    lora.lora_targets(unet, lora.LoraConfig(targets=('no_such_layer',)))


def test_save_load_and_adapters_for_another_base(tmp_path, setting):
  model, x, t, base, adapters = setting
  path = str(tmp_path / 'adapters.safetensors')
  size = lora.save_adapters(path, adapters, CONFIG, base)
  # the tensors plus a small JSON header
  assert lora.num_bytes(adapters) < size < lora.num_bytes(adapters) + 8192
  loaded, cfg = lora.load_adapters(path, base)
  assert cfg == CONFIG
  for p, v in _flat(adapters).items():
    np.testing.assert_array_equal(_flat(loaded)[p], v)

  target = lora.lora_targets(base, CONFIG)[0]
  *parents, leaf = target.split('/')

  def edited(value):
    tree = jax.tree.map(lambda v: v, base)
    node = tree
    for k in parents:
      node = node[k]
    if value is None:
      del node[leaf]
    else:
      node[leaf] = value
    return tree

  kernel = _flat(base)[target]
  wider = jnp.zeros(kernel.shape[:-1] + (kernel.shape[-1] + 1,), kernel.dtype)
  cases = [(edited(kernel + 1.0), 'same shapes but different weights'),
           (edited(wider), re.escape(f"made for '{target}' of shape {tuple(kernel.shape)}")),
           (edited(None), f"adapts '{target}'.*which this base does not have")]
  for other, msg in cases:
    with pytest.raises(ValueError, match=msg) as e:
      lora.load_adapters(path, other)
    assert '\n' not in str(e.value)
  # merge refuses adapters whose shapes do not fit, naming the kernel and the shapes.
  with pytest.raises(ValueError, match=f"adapters for '{target}': A .* do not fit"):
    lora.merge(edited(wider), adapters, CONFIG)
  with open(path, 'rb') as f:   # safetensors: u64 header length, JSON header, tensor bytes
    header = json.loads(f.read(int.from_bytes(f.read(8), 'little')))
  assert json.loads(header['__metadata__']['config'])['rank'] == CONFIG.rank
  assert header[target + '/a']['shape'] == list(_flat(adapters)[target + '/a'].shape)


def test_digits_class_subset():
  cfg = sources.DataConfig(name='digits', classes=(8, 9))
  src = sources.make_source(cfg)
  _, y = digits.load_digits('train')
  assert set(np.unique(src.labels)) == {8, 9}
  assert len(src) == int(np.sum((y == 8) | (y == 9)))
  assert src.num_classes == 10
  for bad, msg in [((8, 10), r'classes=\[8, 10\]'), ((3, 3), r'classes=\[3, 3\]')]:
    with pytest.raises(ValueError, match=msg):
      sources.make_source(sources.DataConfig(name='digits', classes=bad))
  with pytest.raises(ValueError, match='only digits are filtered'):
    sources.make_source(sources.DataConfig(name='toy2d', classes=(1,)))


@pytest.mark.slow
def test_finetune_experiment_smoke(tmp_path, subprocess_cache):
  """configs/lora_digits.py's smoke variants through experiments.finetune_lora: base run on
  0-7, LoRA run on 8-9 from it (config.base + config.lora), adapters written, read back onto
  the base and measured."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, DIFFUSION_JAX_CACHE=subprocess_cache)
  proc = subprocess.run([sys.executable, '-m', 'experiments.finetune_lora',
                         f'--workdir={tmp_path}', '--variant=smoke', '--chunks=1'],
                        cwd=root, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = (tmp_path / 'results.md').read_text()
  assert '| base |' in text and '| lora |' in text and (tmp_path / 'samples.png').exists()
  from diffusion_jax import finetune  # pylint: disable=g-import-not-at-top
  base = finetune.load_base(str(tmp_path / 'base'))[1]
  adapters, cfg = lora.load_adapters(str(tmp_path / 'lora.safetensors'), base)
  assert cfg.rank == 4 and cfg.convs
  b = [v for p, v in _flat(adapters).items() if p.endswith('/b')]
  assert any(np.any(np.asarray(v)) for v in b)   # training moved B away from zero
