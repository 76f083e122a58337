"""pytorch-fid's FID Inception weights <-> the variables of `metrics.inception.InceptionV3`.

pytorch-fid's release `pt_inception-2015-12-05-6726825d.pth` is a `torch.save` state dict,
read here without torch (`torch_files.load_torch_state_dict`), renamed and transposed to the
Flax layout, and written as the `.npz` that `metrics.inception.load_inception_params` reads
(docs/fid_inception.md). The reverse direction (`variables_to_state_dict`) writes test files.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping

import jax
import numpy as np
from flax import traverse_util

from diffusion_jax.metrics import inception
from diffusion_jax.weights.torch_files import load_torch_state_dict


# ---------------------------------------------------------------------------------------------
# State-dict names <-> our variables. The Flax module path is the torch attribute path; leaves
# and layouts differ: conv [O, I, kh, kw] -> [kh, kw, I, O], linear [out, in] -> [in, out].

_LEAF_TO_TORCH = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
                  'var': 'running_var'}


def _torch_name(key: str) -> str:
  # 'params/Mixed_5b/branch1x1/conv/kernel' -> 'Mixed_5b.branch1x1.conv.weight'
  _, *modules, leaf = key.split('/')
  return '.'.join(modules + [_LEAF_TO_TORCH[leaf]])


# conv [kh, kw, I, O] -> [O, I, kh, kw]; dense [in, out] -> [out, in]
_TO_TORCH_AXES = {4: (3, 2, 0, 1), 2: (1, 0)}


def _to_torch_layout(key: str, value: np.ndarray) -> np.ndarray:
  return value.transpose(_TO_TORCH_AXES[value.ndim]) if key.endswith('/kernel') else value


def _from_torch_layout(key: str, value: np.ndarray) -> np.ndarray:
  if not key.endswith('/kernel'):
    return value
  return value.transpose(np.argsort(_TO_TORCH_AXES[value.ndim]))


def _torch_shape(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(shape[i] for i in _TO_TORCH_AXES[len(shape)]) if key.endswith('/kernel') else shape


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
  """pytorch-fid state-dict name -> torch shape of every tensor the network uses (the BatchNorm
  `num_batches_tracked` counters, which inference ignores, are left out)."""
  shapes = {_torch_name(k): _torch_shape(k, s) for k, s in inception.variable_shapes().items()}
  return {name: shapes[name] for name in sorted(shapes, key=_torch_sort_key)}


def _torch_sort_key(name: str):
  # Layers alphabetically; within one, torch's order: conv, then bn; weight, bias, statistics.
  module, leaf = name.rsplit('.', 1)
  layer, _, sub = module.rpartition('.')
  if sub not in ('conv', 'bn'):
    layer, sub = module, 'conv'
  return (layer, sub == 'bn', ['weight', 'bias', 'running_mean', 'running_var'].index(leaf))


def variables_to_state_dict(variables) -> collections.OrderedDict[str, np.ndarray]:
  """Our variables -> pytorch-fid's state dict (float32, torch layouts), with the BatchNorm
  `num_batches_tracked` counters (int64 zeros) that `torch.nn.BatchNorm2d.state_dict` holds.
  Modules come in alphabetical order (torch's is registration order; loading ignores it)."""
  flat = traverse_util.flatten_dict(jax.device_get(variables), sep='/')
  inception.check_variables(flat, 'variables_to_state_dict: the variables')
  by_torch = {_torch_name(k): k for k in inception.variable_shapes()}
  out = collections.OrderedDict()
  for name in state_dict_shapes():
    key = by_torch[name]
    out[name] = np.ascontiguousarray(_to_torch_layout(key, np.asarray(flat[key], np.float32)))
    if name.endswith('.bn.running_var'):
      out[name[:-len('running_var')] + 'num_batches_tracked'] = np.zeros((), np.int64)
  return out


def state_dict_to_variables(state_dict: Mapping[str, np.ndarray], source: str = 'state dict'):
  """pytorch-fid's state dict -> our variables; fails on the first missing, unexpected or
  mis-shaped key (naming it and `source`), ignoring the `num_batches_tracked` counters."""
  shapes = state_dict_shapes()
  by_torch = {_torch_name(k): k for k in inception.variable_shapes()}
  for name, shape in shapes.items():
    if name not in state_dict:
      raise ValueError(f'{source}: missing {name!r} {shape}; not the pytorch-fid FID Inception '
                       'weights?')
    got = tuple(np.shape(state_dict[name]))
    if got != shape:
      raise ValueError(f'{source}: {name!r} has shape {got}, the FID Inception expects {shape}')
  for name in state_dict:
    if name not in shapes and not name.endswith('.num_batches_tracked'):
      raise ValueError(f'{source}: unexpected {name!r} (torchvision weights, with AuxLogits and '
                       '1000 classes, are not the FID Inception)')
  flat = {by_torch[name]: _from_torch_layout(by_torch[name], np.asarray(state_dict[name],
                                                                         np.float32))
          for name in shapes}
  return traverse_util.unflatten_dict(flat, sep='/')


def convert_pytorch_fid_weights(pth_path: str, npz_path: str):
  """`pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's release) -> our `.npz`; no torch.

  Returns:
    The converted variables, as `load_inception_params(npz_path)` will return them.
  """
  variables = state_dict_to_variables(load_torch_state_dict(pth_path), source=pth_path)
  inception.save_inception_params(npz_path, variables)
  return variables
