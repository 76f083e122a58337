"""LoRA: low-rank adapters as a transform of any model's parameter tree (no model rewrite).

Hu et al. 2021 (arXiv:2106.09685), eq. 3: a frozen weight `W0` gains a trainable low-rank
update, `h = W0 x + ΔW x = W0 x + (alpha / r) B A x`, with `A` Gaussian and `B = 0` at
initialisation (so training starts exactly at the base model) and the update scaled by
`alpha / r` (§4.1), so that changing `r` needs no retuning of the learning rate.

Flax kernels multiply from the right (`y = x W`, `W` `[in, out]`), so here a kernel's update is
`ΔW = (alpha / r) A B` with `A` `[fan_in, r]` (the paper's `Aᵀ`) and `B` `[r, fan_out]` (the
paper's `Bᵀ`). Every targeted kernel is read as a 2-D `[fan_in, fan_out]` matrix by a row-major
reshape; which leading axes are "in" and which trailing axes are "out" follows the module that
owns it, told apart by its sibling `bias` (Flax's Dense, DenseGeneral and Conv give the bias the
shape of the output features):

  rank 2  Dense `[in, out]`                                    -> `[in, out]`
  rank 3  DenseGeneral to heads, `[C, N, D]` (bias `[N, D]`)   -> `[C, N*D]`   (query/key/value)
          DenseGeneral from heads, `[N, D, C]` (bias `[C]`)     -> `[N*D, C]`   (attention out)
  rank 4  Conv `[kh, kw, in, out]` (bias `[out]`)               -> `[kh*kw*in, out]`
          DenseGeneral `[D, 3, N, D/N]` (bias `[3, N, D/N]`)    -> `[D, 3*N*D/N]` (DiT's qkv)

A kernel without a bias is read as one output axis (the last). A conv kernel (for
`LoraConfig.convs`) is a 4-D kernel with one output axis. The intercepted forward
(`apply_unmerged`) checks this split against the calling module's own convention.

Adapters are a nested dict mirroring the parameter tree, `{'down_1_attn_0': {'query':
{'kernel': {'a': [fan_in, r], 'b': [r, fan_out]}}}}`, which orbax checkpoints like any params.
`merge` / `unmerge` add / subtract the update in place of the kernel; `apply_unmerged` computes
`W0 x + (alpha / r) (x A) B` at every targeted call instead, without forming `W0 + ΔW`
(through `flax.linen.intercept_methods`), which is what the merged model is tested against.
`LoraModel` is the training wrapper (params `{'base', 'lora'}`), and `save_adapters` /
`load_adapters` a small self-describing safetensors file bound to its base by a fingerprint.
"""

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# The attention projections of the U-Net (self-attention blocks `*_attn*` and their
# `cross_attn`: query/key/value/out) and of the DiT (`block_i/qkv`, `block_i/proj`, and its
# `cross_attn`). One pattern, so that it matches on either family.
DEFAULT_TARGETS = (r'(attn[^/]*/(query|key|value|out)|block_\d+/(qkv|proj))/kernel$',)
FORMAT = 'diffusion_jax.lora/1'


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which kernels get adapters and how they are scaled.

  Attributes:
    rank: r, the rank of every update.
    alpha: the update is scaled by alpha / r (Hu et al. §4.1).
    targets: regular expressions, each matched with `re.search` against the '/'-joined paths
      of the kernels ('down_1_attn_0/query/kernel'); every pattern must match a kernel.
    convs: also adapt conv kernels (4-D, `[kh, kw, in, out]`) that the patterns match; without
      it they are skipped.
  """
  rank: int = 4
  alpha: float = 4.0
  targets: tuple[str, ...] = DEFAULT_TARGETS
  convs: bool = False

  def __post_init__(self):
    if isinstance(self.targets, str):
      object.__setattr__(self, 'targets', (self.targets,))
    object.__setattr__(self, 'targets', tuple(self.targets))
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f'LoraConfig: rank={self.rank!r} must be an integer >= 1.')
    if not self.alpha > 0:
      raise ValueError(f'LoraConfig: alpha={self.alpha!r} must be > 0 (the update is scaled by '
                       f'alpha / rank).')
    if not self.targets:
      raise ValueError('LoraConfig: targets is empty; give one or more patterns of kernel '
                       'paths (e.g. "attn.*/query/kernel$").')
    for pattern in self.targets:
      try:
        re.compile(pattern)
      except (re.error, TypeError) as e:
        raise ValueError(f'LoraConfig: target pattern {pattern!r} is not a regular expression '
                         f'({e}).') from None

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def to_dict(self) -> dict:
    return dict(rank=self.rank, alpha=self.alpha, targets=list(self.targets),
                convs=self.convs)


# ---------------------------------------------------------------------------------------------
# Paths and kernel shapes.


def _flatten(tree, prefix: str = '') -> dict:
  """`{'a/b/kernel': leaf}` of a nested mapping (dict, FrozenDict)."""
  out = {}
  for k, v in tree.items():
    path = f'{prefix}{k}'
    if isinstance(v, Mapping):
      out.update(_flatten(v, path + '/'))
    else:
      out[path] = v
  return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
  out = {}
  for path, v in flat.items():
    *parents, last = path.split('/')
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = v
  return out


def kernel_split(kernel_shape, bias_shape=None) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """`(in_shape, out_shape)` of a kernel: the out axes are the trailing ones its bias has
  (one, the last, without a bias); see the module docstring for every case."""
  kernel_shape = tuple(kernel_shape)
  n_out = 1
  if bias_shape is not None:
    bias_shape = tuple(bias_shape)
    if 0 < len(bias_shape) < len(kernel_shape) and kernel_shape[-len(bias_shape):] == bias_shape:
      n_out = len(bias_shape)
  return kernel_shape[:-n_out], kernel_shape[-n_out:]


def _is_conv(in_shape, out_shape) -> bool:
  return len(in_shape) + len(out_shape) == 4 and len(out_shape) == 1


def _kernel_splits(flat: Mapping[str, Any]) -> dict:
  """`{path: (in_shape, out_shape)}` of every 'kernel' leaf of at least 2 axes."""
  out = {}
  for path, leaf in flat.items():
    if path.rsplit('/', 1)[-1] != 'kernel' or np.ndim(leaf) < 2:
      continue
    bias = flat.get(path[:-len('kernel')] + 'bias')
    out[path] = kernel_split(np.shape(leaf), None if bias is None else np.shape(bias))
  return out


def lora_targets(params, config: LoraConfig) -> list[str]:
  """The '/'-joined paths of the kernels `config` adapts, in tree order.

  A pattern that matches no kernel (or only conv kernels while `config.convs` is off) is a
  one-line ValueError naming the pattern and a few of the tree's kernel paths.
  """
  flat = _flatten(params)
  splits = _kernel_splits(flat)
  chosen = set()
  for pattern in config.targets:
    hits = [p for p in splits if re.search(pattern, p)]
    kept = [p for p in hits if config.convs or not _is_conv(*splits[p])]
    if not kept:
      examples = list(splits)[:4]
      if hits:
        raise ValueError(f'LoRA target pattern {pattern!r} matches only conv kernels (e.g. '
                         f'{hits[0]!r} {tuple(np.shape(flat[hits[0]]))}); set convs=True to '
                         f'adapt them.')
      others = [p for p in flat if re.search(pattern, p)]
      what = f'only non-kernel parameters (e.g. {others[0]!r})' if others else 'nothing'
      raise ValueError(f'LoRA target pattern {pattern!r} matches {what}; kernel paths look like '
                       f'{examples}.')
    chosen.update(kept)
  return [p for p in splits if p in chosen]


# ---------------------------------------------------------------------------------------------
# Adapters: init, merge, unmerge.


def init_lora(key: jax.Array, base_params, config: LoraConfig) -> dict:
  """Adapters for every target of `config` in `base_params`: `A ~ N(0, 1/fan_in)` (the
  paper's Gaussian A, at the variance that keeps `x A` at the scale of `x`), `B = 0`, so the
  adapted model starts exactly at the base."""
  flat = _flatten(base_params)
  splits = _kernel_splits(flat)
  targets = lora_targets(base_params, config)
  fans = [(int(np.prod(splits[p][0])), int(np.prod(splits[p][1]))) for p in targets]
  # One draw for every A, cut in order (one RNG program, however many kernels).
  z = jax.random.normal(key, (sum(f * config.rank for f, _ in fans),), jnp.float32)
  out, start = {}, 0
  for path, (fan_in, fan_out) in zip(targets, fans, strict=True):
    dtype = jnp.result_type(flat[path])
    a = z[start:start + fan_in * config.rank].reshape(fan_in, config.rank)
    start += fan_in * config.rank
    out[path + '/a'] = (a / np.sqrt(fan_in)).astype(dtype)  # [fan_in, r]
    out[path + '/b'] = jnp.zeros((config.rank, fan_out), dtype)  # [r, fan_out]
  return _unflatten(out)


def adapter_pairs(adapters) -> dict:
  """`{kernel path: (A, B)}` of an adapter tree."""
  flat = _flatten(adapters)
  pairs = {}
  for path in flat:
    stem, _, leaf = path.rpartition('/')
    if leaf not in ('a', 'b') or not stem:
      raise ValueError(f'LoRA adapters: unexpected leaf {path!r}; every adapter is '
                       f'{{kernel path: {{"a": [fan_in, r], "b": [r, fan_out]}}}}.')
    if stem + '/a' not in flat or stem + '/b' not in flat:
      raise ValueError(f'LoRA adapters: {stem!r} needs both "a" and "b".')
    pairs[stem] = (flat[stem + '/a'], flat[stem + '/b'])
  return pairs


def _checked_pairs(flat_base: Mapping[str, Any], adapters, config: LoraConfig) -> dict:
  """`adapter_pairs`, each checked against the base kernel it adapts (one-line errors naming
  the path and both shapes: adapters made for another base model)."""
  splits = _kernel_splits(flat_base)
  pairs = adapter_pairs(adapters)
  for path, (a, b) in pairs.items():
    if path not in splits:
      raise ValueError(f'LoRA adapters for {path!r}: the base has no such kernel (adapters for '
                       f'another base model?).')
    in_shape, out_shape = splits[path]
    want_a = (int(np.prod(in_shape)), config.rank)
    want_b = (config.rank, int(np.prod(out_shape)))
    if tuple(np.shape(a)) != want_a or tuple(np.shape(b)) != want_b:
      raise ValueError(f'LoRA adapters for {path!r}: A {tuple(np.shape(a))}, B '
                       f'{tuple(np.shape(b))} do not fit the base kernel '
                       f'{tuple(np.shape(flat_base[path]))} at rank {config.rank} (want A '
                       f'{want_a}, B {want_b}).')
  return pairs


def delta(a: jax.Array, b: jax.Array, kernel_shape, config: LoraConfig) -> jax.Array:
  """`ΔW = (alpha / r) A B` `[fan_in, fan_out]`, reshaped (row-major) to the kernel's shape.
  The product is taken at full float32 precision (no TF32 / bf16 passes on accelerators)."""
  ab = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)  # [fan_in, fan_out]
  return (config.scale * ab).reshape(kernel_shape)


def _add_deltas(params, adapters, config: LoraConfig, sign: float) -> dict:
  flat = _flatten(params)
  pairs = _checked_pairs(flat, adapters, config)
  for path, (a, b) in pairs.items():
    w = flat[path]
    flat[path] = w + sign * delta(a, b, w.shape, config).astype(w.dtype)
  return _unflatten(flat)


def merge(base, adapters, config: LoraConfig) -> dict:
  """The base parameters with every adapted kernel replaced by `W0 + (alpha / r) A B`."""
  return _add_deltas(base, adapters, config, 1.0)


def unmerge(merged, adapters, config: LoraConfig) -> dict:
  """Inverse of `merge`: `W - (alpha / r) A B` (the base back to float32 rounding)."""
  return _add_deltas(merged, adapters, config, -1.0)


# ---------------------------------------------------------------------------------------------
# The unmerged forward, h = W0 x + (alpha / r) B A x, at every targeted call.

_ADAPTABLE = (nn.Dense, nn.DenseGeneral, nn.Conv)


def _module_out_ndim(module) -> int:
  features = module.features
  return len(features) if isinstance(features, (tuple, list)) else 1


def apply_unmerged(model: nn.Module, base_params, adapters, config: LoraConfig, *args,
                   **kwargs):
  """`model.apply({'params': base_params}, *args, **kwargs)` with `(alpha / r) (x A) B` added
  to the output of every adapted Dense / DenseGeneral / Conv call (eq. 3, without merging).

  `x A` is the module itself with `r` output features and kernel `A` (reshaped to the kernel's
  input axes), so it contracts exactly the axes the module does (a Conv keeps its strides and
  padding: its low-rank update is a `kh x kw` conv to `r` channels, then a 1x1 conv, `B`).
  """
  flat = _flatten(base_params)
  pairs = _checked_pairs(flat, adapters, config)
  splits = _kernel_splits(flat)
  by_module = {tuple(path.split('/')[:-1]): path for path in pairs}
  called, inside = set(), []

  def interceptor(next_fun, call_args, call_kwargs, context):
    module = context.module
    if (inside or context.method_name != '__call__' or not isinstance(module, _ADAPTABLE)
        or tuple(module.path) not in by_module):
      return next_fun(*call_args, **call_kwargs)
    path = by_module[tuple(module.path)]
    in_shape, out_shape = splits[path]
    if _module_out_ndim(module) != len(out_shape):
      raise ValueError(f'LoRA: {path!r} {tuple(flat[path].shape)} was split as in {in_shape} / '
                       f'out {out_shape}, but its {type(module).__name__} has features '
                       f'{module.features} (a bias-less kernel with several output axes).')
    if isinstance(module, nn.Conv) and module.feature_group_count != 1:
      raise ValueError(f'LoRA: {path!r} is a grouped conv (feature_group_count='
                       f'{module.feature_group_count}); its update is not one low-rank conv.')
    y = next_fun(*call_args, **call_kwargs)
    x = call_args[0] if call_args else call_kwargs['inputs']
    a, b = pairs[path]
    down = module.clone(parent=None, name=None, features=config.rank, use_bias=False,
                        precision=jax.lax.Precision.HIGHEST)
    inside.append(path)   # the down-projection's own call is not adapted again
    try:
      h = down.apply({'params': {'kernel': a.reshape(in_shape + (config.rank,))}}, x)  # [..., r]
    finally:
      inside.pop()
    h = jnp.matmul(h, b.astype(h.dtype), precision=jax.lax.Precision.HIGHEST)  # [..., fan_out]
    called.add(path)
    return y + (config.scale * h).reshape(y.shape).astype(y.dtype)

  with nn.intercept_methods(interceptor):
    out = model.apply({'params': base_params}, *args, **kwargs)
  unused = sorted(set(pairs) - called)
  if unused:
    raise ValueError(f'LoRA: the adapted kernel {unused[0]!r} was never called by '
                     f'{type(model).__name__} (its module is not a Dense, DenseGeneral or Conv?).')
  return out


# ---------------------------------------------------------------------------------------------
# The training wrapper.


@dataclasses.dataclass(frozen=True)
class LoraModel:
  """`base_model` with low-rank adapters: params `{'base': <base_model's>, 'lora': adapters}`.

  `apply` merges, then runs the base model: `base_model.apply(merge(stop_gradient(base), lora))`.
  Merge-then-apply works for any module without knowing its call structure, runs the base's
  own (fused) layers, and is numerically the deployed merged model. Its cost is one `A B`
  product and add per adapted kernel per call (`r * fan_in * fan_out` FLOPs, small beside the
  layer's own `tokens * fan_in * fan_out`), and in the backward pass one full-size kernel
  gradient per adapted kernel, from which `A` and `B`'s gradients follow (the memory of that
  gradient, not of Adam states for the base). `stop_gradient` makes the base's gradient exactly
  zero, on top of the optimizer freezing it. Public attributes the run reads on models
  (`num_classes`, `context_length`, `out_channels`, ...) are the base model's.
  """
  base_model: Any
  config: LoraConfig = LoraConfig()

  def __getattr__(self, name):
    # Only called for names the wrapper lacks: forward the base model's public fields.
    if name.startswith('_') or name in ('base_model', 'config'):
      raise AttributeError(name)
    return getattr(self.base_model, name)

  def init(self, rngs, *args, **kwargs) -> dict:
    """`{'params': {'base': base init, 'lora': init_lora(fold_in(params key, 1), ...)}}`."""
    variables = dict(self.base_model.init(rngs, *args, **kwargs))
    key = rngs['params'] if isinstance(rngs, Mapping) else rngs
    base = variables.pop('params')
    lora = init_lora(jax.random.fold_in(key, 1), base, self.config)
    return {**variables, 'params': {'base': base, 'lora': lora}}

  def merged_params(self, params) -> dict:
    """The base model's parameters with the adapters merged (for export or sampling)."""
    self._check_params(params)
    return merge(jax.lax.stop_gradient(params['base']), params['lora'], self.config)

  def apply(self, variables, *args, **kwargs):
    """`base_model.apply` on the merged parameters; other arguments (`train`, `rngs`,
    `method`) pass through."""
    merged = self.merged_params(variables['params'])
    return self.base_model.apply({**variables, 'params': merged}, *args, **kwargs)

  def apply_unmerged(self, variables, *args, **kwargs):
    """The same output computed as `W0 x + (alpha / r) (x A) B` per adapted call."""
    params = variables['params']
    self._check_params(params)
    return apply_unmerged(self.base_model, params['base'], params['lora'], self.config, *args,
                          **kwargs)

  def _check_params(self, params):
    if not isinstance(params, Mapping) or set(params) != {'base', 'lora'}:
      got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
      raise ValueError(f"LoraModel: params must be {{'base', 'lora'}}, got {got}.")


# ---------------------------------------------------------------------------------------------
# Adapter files.


def fingerprint(base_params, config: LoraConfig) -> dict:
  """What binds adapters to their base: `{'kernels': {path: shape}, 'sha256': hex}` over the
  targeted kernels (path, shape, dtype and bytes, in tree order)."""
  flat = _flatten(base_params)
  digest = hashlib.sha256()
  kernels = {}
  for path in lora_targets(base_params, config):
    w = np.ascontiguousarray(np.asarray(flat[path]))
    kernels[path] = list(w.shape)
    digest.update(f'{path}:{w.shape}:{w.dtype};'.encode())
    digest.update(w.tobytes())
  return {'kernels': kernels, 'sha256': digest.hexdigest()}


def save_adapters(path: str, adapters, config: LoraConfig, base_params) -> int:
  """Writes `adapters` (safetensors, float tensors named '<kernel path>/a|b'), `config` and the
  base's `fingerprint` (JSON metadata) to `path`; returns the file's size in bytes."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  _checked_pairs(_flatten(base_params), adapters, config)
  tensors = {k: np.ascontiguousarray(np.asarray(v)) for k, v in _flatten(adapters).items()}
  metadata = {'format': FORMAT, 'config': json.dumps(config.to_dict()),
              'base': json.dumps(fingerprint(base_params, config))}
  safetensors.numpy.save_file(tensors, path, metadata=metadata)
  return os.path.getsize(path)


def load_adapters(path: str, base_params, *, check_weights: bool = True):
  """`(adapters, config)` from `save_adapters`' file, checked against `base_params`: a
  different base is a one-line ValueError naming the first differing kernel path and shapes,
  or (`check_weights`) the same shapes with different weights."""
  import safetensors  # pylint: disable=g-import-not-at-top
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  try:
    with safetensors.safe_open(path, framework='numpy') as f:
      metadata = f.metadata() or {}
  except (OSError, safetensors.SafetensorError) as e:
    raise ValueError(f'load_adapters: {path} is not a readable safetensors file ({e}).') from None
  if metadata.get('format') != FORMAT:
    raise ValueError(f'load_adapters: {path} is not a LoRA adapter file (format '
                     f'{metadata.get("format")!r}, expected {FORMAT!r}).')
  config = LoraConfig(**json.loads(metadata['config']))
  saved = json.loads(metadata['base'])
  try:
    mine = fingerprint(base_params, config)
  except ValueError as e:   # a pattern that matches nothing in this base
    raise ValueError(f'load_adapters: {path} was made for another base model: '
                     f'{str(e).splitlines()[0]}') from None
  theirs, ours = saved['kernels'], mine['kernels']
  for p in sorted(set(theirs) | set(ours)):
    if p not in ours:
      raise ValueError(f'load_adapters: {path} adapts {p!r} {tuple(theirs[p])}, which this base '
                       f'does not have (adapters for another base model).')
    if p not in theirs:
      raise ValueError(f'load_adapters: this base has a target kernel {p!r} {tuple(ours[p])} '
                       f'that {path} does not adapt (adapters for another base model).')
    if list(theirs[p]) != list(ours[p]):
      raise ValueError(f'load_adapters: {path} was made for {p!r} of shape {tuple(theirs[p])}; '
                       f'this base has {tuple(ours[p])} (adapters for another base model).')
  if check_weights and saved['sha256'] != mine['sha256']:
    raise ValueError(f'load_adapters: {path} was made for a base with the same shapes but '
                     f'different weights (sha256 {saved["sha256"][:12]} vs this base\'s '
                     f'{mine["sha256"][:12]}).')
  tensors = safetensors.numpy.load_file(path)
  adapters = _unflatten({k: jnp.asarray(v) for k, v in tensors.items()})
  _checked_pairs(_flatten(base_params), adapters, config)
  return adapters, config


def num_bytes(tree) -> int:
  """Bytes of a tree's arrays (for adapter size vs base size)."""
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))
