"""ControlNet (Zhang et al. 2023, arXiv:2302.05543, §3.1-3.2, eq. 2, Fig. 3) on a tiny U-Net.

A class-conditional U-Net (ch=8, one level, 8x8x1, 3 classes) with random, non-zero parameters
stands in for a trained base. All its skips and its middle output have one shape [B, 8, 8, 8], so
a residual fed to the wrong activation passes every shape check: only the values catch it.
Checks: zero convs make the output at initialisation equal the base's exactly; strength 0 is
the base exactly; `attach_base` copies the encoder; the residuals reach the decoder where the
paper adds them (an oracle that edits the base's own activations through `nn.intercept_methods`
/ `capture_intermediates`, not the `residuals` path); gradients and an optimizer step leave the
base unchanged; the bad-input errors. Programs are compiled at XLA optimisation level 0 and
shared between tests (CPU compiles dominate this file's time).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from diffusion_jax import run_config
from diffusion_jax import training
from diffusion_jax.configuration import ConfigError
from diffusion_jax.data import control
from diffusion_jax.models import MLP
from diffusion_jax.models import UNet
from diffusion_jax.models import controlnet
from diffusion_jax.models.controlnet import ControlNet

B = 2
SHAPE = (8, 8, 1)  # [H, W, C]
_FAST_COMPILE = {'xla_backend_optimization_level': 0}
BASE = UNet(ch=8, ch_mult=(1,), attn_resolutions=(), num_groups=4, num_classes=3,
            label_dropout=0.5)
CN = ControlNet(BASE, hint_channels=(4,))
# Skip i of the base (the output of SKIP_MODULES[i]) is read by the decoder block
# SKIP_READERS[i] (the decoder pops the skips last-first).
SKIP_READERS = ('up_0_res_1', 'up_0_res_0')
SKIP_MODULES = ('conv_in', 'down_0_res_0')


def _perturb(params, key, scale=0.2):
  """`params + N(0, scale²)`, drawn as one flat vector on the host (no per-leaf compiles)."""
  leaves, treedef = jax.tree.flatten(params)
  sizes = [x.size for x in leaves]
  flat = scale * np.asarray(jax.random.normal(key, (sum(sizes),)))
  chunks = np.split(flat, np.cumsum(sizes)[:-1])
  return jax.tree.unflatten(treedef, [np.asarray(x) + c.reshape(x.shape)
                                      for x, c in zip(leaves, chunks, strict=True)])


@functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
def _cn_apply(params, x, t, control, labels, strength):
  cond = {'control': control, 'label': labels, 'control_strength': strength}
  return CN.apply({'params': params}, x, t, cond)


@functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
def _base_apply(params, x, t, labels):
  return BASE.apply({'params': params}, x, t, labels)


@pytest.fixture(scope='module')
def setup():
  kx, kt, kc, kb, ki = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(kx, (B, *SHAPE))  # [B, H, W, C]
  t = jax.random.uniform(kt, (B,))
  control = (jax.random.uniform(kc, (B, *SHAPE)) > 0.5).astype(jnp.float32)  # [B, H, W, 1]
  labels = jnp.array([0, 2])
  init = jax.jit(CN.init, compiler_options=_FAST_COMPILE)
  params = init(ki, x, t, {'control': control, 'label': labels})['params']
  shapes = jax.eval_shape(BASE.init, ki, x, t, labels)['params']
  base_params = _perturb(jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes), kb)
  params = CN.attach_base(params, base_params)
  base_out = _base_apply(base_params, x, t, labels)
  return dict(x=x, t=t, control=control, labels=labels, params=params, base=base_params,
              base_out=base_out)


def test_init_output_equals_base_exactly(setup):
  s = setup
  out = _cn_apply(s['params'], s['x'], s['t'], s['control'], s['labels'], jnp.ones(B))
  # Every zero conv gives exactly 0 and `skip + 0` is `skip` bit for bit: no tolerance.
  assert np.abs(np.asarray(s['base_out'])).max() > 0.1   # a non-trivial base
  assert jnp.array_equal(out, s['base_out'])
  zero = [k for k in s['params']['control'] if k.startswith('zero_')]
  assert len(zero) == 3   # 2 skips + the middle block
  for k in [*zero, 'hint']:
    last = s['params']['control'][k]
    last = last['conv_out'] if k == 'hint' else last
    assert not np.any(np.asarray(last['kernel'])) and not np.any(np.asarray(last['bias']))


def test_attach_base_copies_the_encoder(setup):
  s = setup
  copy = s['params']['control']['encoder']
  assert set(copy) == {'temb_dense_0', 'temb_dense_1', 'class_embed', *SKIP_MODULES,
                       'mid_res_0', 'mid_attn', 'mid_res_1'}
  for k in copy:
    jax.tree.map(np.testing.assert_array_equal, copy[k], s['base'][k])
  assert s['params']['base'] is s['base']
  with pytest.raises(ValueError, match='lack'):
    CN.attach_base(s['params'], {k: v for k, v in s['base'].items() if k != 'mid_attn'})


def test_strength_zero_is_the_base_exactly(setup):
  s = setup
  params = dict(s['params'], control=_perturb(s['params']['control'], jax.random.key(7)))
  out0 = _cn_apply(params, s['x'], s['t'], s['control'], s['labels'], jnp.zeros(B))
  assert jnp.array_equal(out0, s['base_out'])   # 0 * residual = 0 exactly
  out1 = _cn_apply(params, s['x'], s['t'], s['control'], s['labels'], jnp.array([0.0, 1.0]))
  assert jnp.array_equal(out1[0], s['base_out'][0])   # strength is per sample
  assert np.abs(np.asarray(out1[1] - s['base_out'][1])).max() > 1e-3


@functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
def _residual_oracle(params, x, t, labels, residuals):
  """(output with `residuals`, the same by editing the decoder's inputs and the middle output)."""
  got = BASE.apply({'params': params}, x, t, labels, residuals=residuals)
  skips, mid = residuals[:-1], residuals[-1]

  def add(next_fun, args, kwargs, context):
    name = context.module.name
    if context.method_name == '__call__' and name == 'mid_res_1':
      return next_fun(*args, **kwargs) + mid
    if context.method_name == '__call__' and name in SKIP_READERS:
      r = skips[SKIP_READERS.index(name)]
      h = args[0]   # concat([decoder state, skip]) -> add r to the skip's channels only
      h = h + jnp.concatenate([jnp.zeros(h.shape[:3] + (h.shape[3] - r.shape[3],)), r], -1)
      return next_fun(h, *args[1:], **kwargs)
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(add):
    want = BASE.apply({'params': params}, x, t, labels)
  return got, want


def test_unet_residuals_reach_skips_and_middle(setup):
  s = setup
  shapes = [(B, 8, 8, 8)] * 3
  keys = jax.random.split(jax.random.key(3), len(shapes))
  residuals = [jax.random.normal(k, shape) for k, shape in zip(keys, shapes, strict=True)]
  got, want = _residual_oracle(s['base'], s['x'], s['t'], s['labels'], residuals)
  # concat([h, s + r]) == concat([h, s]) + concat([0, r]) in float32 up to XLA's fusion choices.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(got - s['base_out'])).max() > 1e-2
  with pytest.raises(ValueError, match='residuals must have the shapes'):
    jax.eval_shape(functools.partial(BASE.apply, residuals=residuals[:-1]),
                   {'params': s['base']}, s['x'], s['t'], s['labels'])


@functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
def _base_activations(params, x, t, labels, hint):
  """The base's skips and middle output with `hint` added to its conv_in output (§3.2: the
  condition features enter the copy there), captured from the base's own forward pass."""
  def add_hint(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    return out + hint if context.module.name == 'conv_in' else out
  with nn.intercept_methods(add_hint):
    _, inter = BASE.apply({'params': params}, x, t, labels, capture_intermediates=True,
                          mutable=['intermediates'])
  # (What is captured is the intercepted output: conv_in's includes the hint.)
  return [inter['intermediates'][m]['__call__'][0] for m in (*SKIP_MODULES, 'mid_res_1')]


def _conv3x3(h, kernel, bias):
  """A 'same' 3x3 convolution in numpy: `out[y, x] = sum_{a, b} h[y + a - 1, x + b - 1] k[a, b]`
  with zero padding; h: [B, H, W, Ci], kernel: [3, 3, Ci, Co]."""
  hp = np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros(h.shape[:3] + (kernel.shape[-1],))
  for a in range(3):
    for b in range(3):
      out += hp[:, a:a + h.shape[1], b:b + h.shape[2]] @ kernel[a, b]
  return out + bias


def test_copy_and_zero_convs_feed_the_matching_skips(setup):
  """Zero convs set to the identity and a random condition encoder E: residual i is the copy's
  activation i, which is the base's own (the copy is the base and sees the same labels) with
  E(c) added after conv_in. So the output is the base with `strength * skip_i` added to skip i,
  with E computed here in numpy and the skips read from the base's own forward pass."""
  s = setup
  control = dict(s['params']['control'])
  for k in [k for k in control if k.startswith('zero_')]:
    c = control[k]['kernel'].shape[-1]
    control[k] = {'kernel': np.eye(c, dtype=np.float32)[None, None], 'bias': np.zeros(c)}
  control['hint'] = _perturb(control['hint'], jax.random.key(11))
  params = dict(s['params'], control=control)
  strength = jnp.array([0.5, 1.5])
  got = _cn_apply(params, s['x'], s['t'], s['control'], s['labels'], strength)
  e = control['hint']
  h = _conv3x3(np.asarray(s['control']), e['conv_0']['kernel'], e['conv_0']['bias'])
  hint = _conv3x3(h / (1 + np.exp(-h)), e['conv_out']['kernel'], e['conv_out']['bias'])  # SiLU
  assert np.abs(hint).max() > 0.1
  feats = _base_activations(s['base'], s['x'], s['t'], s['labels'], hint.astype(np.float32))
  residuals = [f * strength[:, None, None, None] for f in feats]
  _, want = _residual_oracle(s['base'], s['x'], s['t'], s['labels'], residuals)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)   # float32, different fusions


@functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
def _train_step(params, x, t, control, labels, key):
  def loss(p):
    out = CN.apply({'params': p}, x, t, {'control': control, 'label': labels}, train=True,
                   rngs={'dropout': key})
    return jnp.mean((out - x) ** 2)
  grads = jax.grad(loss)(params)
  opt = training.make_optimizer(training.OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.5),
                                10, frozen=('base',))
  # Two steps: the warm-up makes the first step's learning rate 0.
  state = opt.init(params)
  for _ in range(2):
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return grads, params


def test_gradients_and_update_leave_the_base(setup):
  s = setup
  grads, new = _train_step(s['params'], s['x'], s['t'], s['control'], s['labels'],
                           jax.random.key(1))
  # The base is read through stop_gradient: its gradient is exactly zero.
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads['base']))
  # At initialisation only the zero convs get a gradient (§3.1: everything behind them is
  # multiplied by their zero weights), and their kernels' gradients are non-zero.
  for k, g in grads['control'].items():
    nonzero = any(np.any(np.asarray(v)) for v in jax.tree.leaves(g))
    assert nonzero == k.startswith('zero_'), k
  # The optimizer freezes the base (no step, no weight decay) and updates the control branch.
  jax.tree.map(np.testing.assert_array_equal, new['base'], s['base'])
  assert not np.array_equal(new['control']['zero_mid']['kernel'],
                            s['params']['control']['zero_mid']['kernel'])
  # (The copy's gradient is zero at initialisation: its change is the weight decay, which the
  # base, given the same decay, does not get.)
  assert not np.array_equal(new['control']['encoder']['conv_in']['kernel'],
                            s['params']['control']['encoder']['conv_in']['kernel'])


@pytest.mark.parametrize('cond, match', [
    ({'control': jnp.zeros((B, 4, 4, 1))}, r'\(2, 4, 4, 1\).*\(2, 8, 8, 1\)'),
    ({'control': jnp.zeros((B, 8, 8, 2))}, r'\(2, 8, 8, 2\).*\(2, 8, 8, 1\)'),
    ({'control': jnp.zeros((B + 1, 8, 8, 1))}, r'\(3, 8, 8, 1\).*\(2, 8, 8, 1\)'),
    (jnp.zeros((B, 8, 8)), r'\(2, 8, 8\).*\(2, 8, 8, 1\)'),
    (None, 'needs a control map'),
    ({'label': jnp.zeros(B, jnp.int32)}, 'need "control"'),
    ({'control': jnp.zeros((B, 8, 8, 1)), 'mask': 1}, 'need "control"'),
    ({'control': jnp.zeros((B, 8, 8, 1)), 'control_strength': jnp.ones(3)}, 'control_strength'),
])
def test_bad_inputs(setup, cond, match):
  s = setup
  with pytest.raises(ValueError, match=match) as e:
    jax.eval_shape(CN.apply, {'params': s['params']}, s['x'], s['t'], cond)
  assert '\n' not in str(e.value)


def test_base_must_be_a_unet():
  with pytest.raises(ValueError, match='must be a UNet'):
    jax.eval_shape(ControlNet(MLP()).init, jax.random.key(0), jnp.zeros((B, 8, 8, 1)),
                   jnp.zeros(B), jnp.zeros((B, 8, 8, 1)))


def test_forwards_the_base_fields():
  assert CN.num_classes == 3 and CN.context_dim == 0 and CN.base_model is BASE


# Control maps (data/control.py): expected values worked out by hand from the Sobel kernels.

def _image(u):
  """An image [1, H, W, 1] in [-1, 1] from grey values u in [0, 1]."""
  return (2.0 * np.asarray(u, np.float32) - 1.0)[None, :, :, None]


def test_edges_of_a_vertical_step():
  # Columns 0-1 black, 2-3 white. With replicated borders G_y = 0 everywhere; G_x at a column
  # sums (right - left neighbours) over rows with weights 1, 2, 1: 4 * (1 - 0) = 4 at columns 1
  # and 2 (they straddle the step), 0 at columns 0 and 3. Divided by 4: 0, 1, 1, 0.
  u = np.array([[0, 0, 1, 1]] * 4, np.float32)
  np.testing.assert_array_equal(control.edges(_image(u), threshold=None)[0, :, :, 0],
                                [[0, 1, 1, 0]] * 4)
  # A half-contrast step gives 0.5, which the default threshold (> 0.5) does not keep.
  soft = control.edges(_image(0.5 * u), threshold=None)[0, :, :, 0]
  np.testing.assert_allclose(soft, [[0, 0.5, 0.5, 0]] * 4, atol=1e-6)
  np.testing.assert_array_equal(control.edges(_image(0.5 * u))[0, :, :, 0], 0.0)
  np.testing.assert_array_equal(control.edges(_image(u))[0, :, :, 0], [[0, 1, 1, 0]] * 4)


def test_edges_of_a_single_pixel():
  # One white pixel at the centre of a black 3x3. At the centre both gradients cancel: 0.
  # Edge midpoints, e.g. (0, 1): G_y = 1*0 + 2*1 + 1*0 (row below) - 0 (row above, replicated
  # row 0) = 2, G_x = 0 -> |g| / 4 = 0.5. Corners, e.g. (0, 0): G_x = 1 (the pixel, weight 1,
  # in the right column), G_y = 1 (weight 1 in the row below) -> sqrt(2) / 4.
  u = np.zeros((3, 3), np.float32)
  u[1, 1] = 1.0
  c, m = np.sqrt(2.0) / 4.0, 0.5
  np.testing.assert_allclose(control.edges(_image(u), threshold=None)[0, :, :, 0],
                             [[c, m, c], [m, 0, m], [c, m, c]], atol=1e-6)
  # A constant image has no edges, borders included (replicated padding).
  assert not control.edges(np.full((2, 5, 5, 1), 0.3, np.float32)).any()


def test_ink_mask_and_fidelity_by_hand():
  x = np.array([[[1.0, 0.5], [-1.0, 0.0]], [[-1.0, -1.0], [-1.0, -1.0]]], np.float32)[..., None]
  np.testing.assert_array_equal(control.ink(x)[..., 0], [[[1, 1], [0, 0]], [[0, 0], [0, 0]]])
  conds = np.array([[[1, 0], [1, 0]], [[0, 0], [0, 0]]], np.float32)[..., None]
  fid = control.control_fidelity(x, conds, 'ink')
  # 0 (mid-grey) is not ink (the mask is x > 0). Sample 0: ink {(0,0), (0,1)} vs the map
  # {(0,0), (1,0)}: intersection 1, union 3 -> IoU 1/3; two of four pixels differ -> L1 0.5.
  # Sample 1: both maps empty -> IoU 1 by definition, L1 0.
  np.testing.assert_allclose(fid.iou, [1 / 3, 1.0])
  np.testing.assert_allclose(fid.l1, [0.5, 0.0])
  assert control.fidelity_metrics('ink')(x, conds) == pytest.approx(
      {'control_iou': (1 / 3 + 1) / 2, 'control_l1': 0.25})
  with pytest.raises(ValueError, match=r'\(2, 2, 2, 1\).*\(2, 3, 3, 1\)'):
    control.control_fidelity(np.zeros((2, 3, 3, 1)), conds, 'ink')
  with pytest.raises(ValueError, match="'sobel'"):
    control.make_operator('sobel')


def test_builder():
  net, condition = controlnet.build_condition(
      {'operator': 'edges', 'hint_channels': [4], 'strength': 0.5}, BASE, SHAPE)
  assert isinstance(net, ControlNet) and net.base_model is BASE
  assert (net.strength, net.hint_channels, net.control_channels) == (0.5, (4,), 1)
  assert condition.key == 'control' and condition.shape(SHAPE) == SHAPE
  u = np.array([[0, 0, 1, 1]] * 4, np.float32)
  np.testing.assert_array_equal(condition(_image(u)), control.edges(_image(u)))
  with pytest.raises(ConfigError, match='control.operator'):
    controlnet.build_condition({'operator': 'canny'}, BASE, SHAPE)
  with pytest.raises(ConfigError, match='control.strength'):
    controlnet.build_condition({'strength': -1.0}, BASE, SHAPE)
  with pytest.raises(ConfigError, match="ControlNet copies a U-Net's encoder"):
    controlnet.build_condition({}, MLP(), SHAPE)


def test_run_config_needs_a_base():
  from configs import controlnet_digits  # pylint: disable=g-import-not-at-top
  config = controlnet_digits.get_config('smoke')
  del config['base']
  with pytest.raises(ConfigError, match='config.control: ControlNet .* config.base.workdir'):
    run_config.build(config, image_shape=SHAPE)


@pytest.mark.slow
def test_smoke_experiment_end_to_end(tmp_path, subprocess_cache):
  """experiments.controlnet_strength --smoke: a base run, a ControlNet run on it (the loop's
  evaluation reports control fidelity), the strength sweep's files; then, in process, the
  ControlNet at strength 0 samples exactly what the base samples from the same noise."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, DIFFUSION_JAX_CACHE=subprocess_cache, PYTHONUNBUFFERED='1')
  cmd = [sys.executable, '-m', 'experiments.controlnet_strength', '--smoke',
         f'--workdir={tmp_path}/runs', f'--out={tmp_path}/out', '--num_samples=20',
         '--strengths=0,1', '--grid=4']
  proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  import json  # pylint: disable=g-import-not-at-top
  with open(tmp_path / 'out' / 'results.json', encoding='utf-8') as f:
    results = json.load(f)
  assert [r['strength'] for r in results['rows']] == [0.0, 1.0]
  assert all(0.0 <= r['iou'] <= 1.0 and r['fd'] > 0 for r in results['rows'])
  assert results['references']['own'] == {'iou': 1.0, 'l1': 0.0}
  assert {'control_iou', 'control_l1'} <= set(results['info']['run_eval'])
  assert (tmp_path / 'out' / 'controlnet.png').is_file()
  assert (tmp_path / 'out' / 'results.md').is_file()

  from configs import json_config  # pylint: disable=g-import-not-at-top
  from diffusion_jax import generation  # pylint: disable=g-import-not-at-top
  from diffusion_jax import train_loop  # pylint: disable=g-import-not-at-top
  runs = {}
  for name in ('base', 'control'):
    workdir = str(tmp_path / 'runs' / name)
    config = json_config.get_config(os.path.join(workdir, 'config.json'))
    setup, state, _ = train_loop.load_checkpoint(config, workdir)
    runs[name] = (setup, state.ema_params)
  setup, params = runs['control']
  conds = generation.sample_conditions(setup, 8).cond
  key = jax.random.key(3)
  at0 = dataclasses.replace(setup, model=setup.model.clone(strength=0.0))
  got = generation.generate(generation.make_sample_fn(at0), params, key, 8, 8,
                            setup.image_shape, conds)
  base_setup, base_params = runs['base']
  want = generation.generate(generation.make_sample_fn(base_setup), base_params, key, 8, 8,
                             setup.image_shape)
  # Same noise, same sampler keys, and at strength 0 every residual is exactly 0. (Two XLA
  # programs, so equal up to float32 fusion differences over 10 sampler steps.)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  at1 = generation.generate(generation.make_sample_fn(setup), params, key, 8, 8,
                            setup.image_shape, conds)
  assert np.abs(at1 - want).max() > 1e-4
