"""Hugging Face CLIP checkpoints (a local directory: config.json + model.safetensors) -> the
variables of our Flax CLIP modules (`models/clip.py`).

The architecture is config.json's `architectures[0]` (else its `model_type`), and it picks the
module the variables are for (`CLIPConfig.module()`):
  CLIPModel                      -> CLIPModel: `text_model.*`, `vision_model.*`,
                                    `text_projection.weight`, `visual_projection.weight`,
                                    `logit_scale`;
  CLIPTextModelWithProjection    -> CLIPModel without a vision tower: `text_model.*`,
                                    `text_projection.weight` (SDXL's text_encoder_2);
  CLIPTextModel                  -> CLIPTextTransformer: `text_model.*` (SD 1.x / 2.x
                                    `text_encoder/`);
  CLIPVisionModelWithProjection, CLIPVisionModel: likewise with `vision_model.*`.
A tower's keys are `{text,vision}_model.embeddings.{token,position,patch}_embedding.weight`,
`…embeddings.class_embedding`, `…encoder.layers.{i}.{layer_norm1,layer_norm2}.{weight,bias}`,
`…encoder.layers.{i}.self_attn.{q,k,v,out}_proj.{weight,bias}`, `…mlp.fc{1,2}.{weight,bias}`,
`text_model.final_layer_norm.*`, `vision_model.{pre_layrnorm,post_layernorm}.*`: our module
paths with '.' for '/' and `layers.{i}` for `layers_{i}`. Single-tower files written by
transformers >= 5 drop the `text_model.` / `vision_model.` prefix; both forms are read. The
`…embeddings.position_ids` buffers that older files carry are ignored.
Torch layouts become ours: linear [out, in] -> [in, out], conv [O, I, kh, kw] -> [kh, kw, I, O];
every tensor becomes float32. Anything missing, unexpected or of another shape than config.json
implies is a one-line ValueError naming the file and the key.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

import jax
import numpy as np
import safetensors.flax
import safetensors.numpy
from flax import traverse_util

from diffusion_jax.models.clip import CLIPConfig

_LEAF = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight', 'bias': 'bias',
         'class_embedding': 'class_embedding', 'logit_scale': 'logit_scale'}
_TOWER_PREFIX = {'CLIPTextModel': 'text_model.', 'CLIPVisionModel': 'vision_model.'}


def _reference_name(path: str, prefix: str) -> str:
  """Our parameter path ('encoder/layers_0/self_attn/q_proj/kernel') -> its HF key."""
  *modules, leaf = path.split('/')
  name = '.'.join(modules + [_LEAF[leaf]])
  return prefix + re.sub(r'layers_(\d+)', r'layers.\1', name)


def _torch_shape(path: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(shape) == 4:  # conv [kh, kw, I, O] -> [O, I, kh, kw]
    return (shape[3], shape[2], shape[0], shape[1])
  if path.endswith('/kernel'):  # dense [in, out] -> linear [out, in]
    return shape[::-1]
  return shape  # embeddings [N, D], LayerNorm and bias vectors, logit_scale []


def expected_tensors(config: CLIPConfig) -> dict[str, tuple[str, tuple, tuple]]:
  """HF key -> (our parameter path, our shape, torch shape) of every tensor `config.module()`
  reads."""
  module = config.module()
  args = []
  if config.text is not None:
    args.append(jax.ShapeDtypeStruct((1, config.text.max_position_embeddings), np.int32))
  else:
    args.append(None)
  if config.vision is not None:
    v = config.vision
    args.append(jax.ShapeDtypeStruct((1, v.image_size, v.image_size, v.num_channels), np.float32))
  if config.architecture == 'CLIPVisionModel':
    args = args[1:]
  shapes = jax.eval_shape(module.init, jax.random.key(0), *args)['params']
  prefix = _TOWER_PREFIX.get(config.architecture, '')
  expected = {}
  for path, leaf in traverse_util.flatten_dict(shapes, sep='/').items():
    shape = tuple(leaf.shape)
    expected[_reference_name(path, prefix)] = (path, shape, _torch_shape(path, shape))
  return expected


def _from_torch(value: np.ndarray, path: str, shape: tuple[int, ...]) -> np.ndarray:
  """A torch tensor -> our parameter at `path` of `shape`, float32."""
  value = np.asarray(value, np.float32)
  if len(shape) == 4:  # conv
    return value.transpose(2, 3, 1, 0)
  if path.endswith('/kernel'):  # linear
    return value.T
  return value


def _some(keys: list[str], n: int = 3) -> str:
  more = f' and {len(keys) - n} more' if len(keys) > n else ''
  return ', '.join(repr(k) for k in keys[:n]) + more


def clip_variables(state_dict: Mapping[str, np.ndarray], config: CLIPConfig,
                   source: str = 'state dict') -> dict:
  """A HF CLIP state dict -> `{'params': …}` of `config.module()` (see the module docstring);
  `source` names the weights in errors."""
  expected = expected_tensors(config)
  prefix = _TOWER_PREFIX.get(config.architecture, '')
  file_keys = {}  # HF key -> the key in the file
  bare = prefix and not any(k.startswith(prefix) for k in state_dict)
  for key in state_dict:
    if key.endswith('embeddings.position_ids'):
      continue  # a buffer (arange) that transformers < 4.31 saved
    file_keys[prefix + key if bare else key] = key
  hint = f'does {source}\'s config.json ({config.architecture}) match its weights?'
  for name, (_, _, torch_shape) in expected.items():
    if name in file_keys:
      shape = tuple(np.shape(state_dict[file_keys[name]]))
      if shape != torch_shape:
        raise ValueError(f'load_clip: {source}: {file_keys[name]!r} has shape {shape}, '
                         f'config.json expects {torch_shape}; {hint}')
  missing = [k for k in expected if k not in file_keys]
  if missing:
    raise ValueError(f'load_clip: {source} lacks {len(missing)} tensors the config needs: '
                     f'{_some(missing)}; {hint}')
  extra = [file_keys[k] for k in file_keys if k not in expected]
  if extra:
    raise ValueError(f'load_clip: {source} has {len(extra)} tensors the config does not use: '
                     f'{_some(extra)}; {hint}')
  flat = {path: _from_torch(state_dict[file_keys[name]], path, shape)
          for name, (path, shape, _) in expected.items()}
  return {'params': traverse_util.unflatten_dict(flat, sep='/')}


def load_clip_config(path: str) -> CLIPConfig:
  """The `CLIPConfig` of a local HF CLIP directory (its config.json; model.safetensors must be
  there too), without reading the weights."""
  config_file = os.path.join(path, 'config.json')
  weights_file = os.path.join(path, 'model.safetensors')
  for file in (config_file, weights_file):
    if not os.path.isfile(file):
      raise ValueError(f'load_clip: no {file} (a HF CLIP directory holds config.json and '
                       f'model.safetensors)')
  try:
    with open(config_file, encoding='utf-8') as f:
      return CLIPConfig.from_hf_dict(json.load(f))
  except (ValueError, TypeError) as e:
    text = ' '.join(str(e).split())
    raise ValueError(f'load_clip: {config_file}: {text[:200]}') from None


def load_clip(path: str) -> tuple[CLIPConfig, dict]:
  """A local HF CLIP directory (config.json + model.safetensors) -> `(config, variables)`:
  `config.module().apply(variables, …)` runs it (the module per architecture: module
  docstring); float32. Sharded or `.bin` checkpoints are not read."""
  config = load_clip_config(path)
  weights_file = os.path.join(path, 'model.safetensors')
  try:
    state_dict = safetensors.numpy.load_file(weights_file)
  except TypeError:
    # numpy has no bfloat16: such files are read through JAX, which has.
    state_dict = {k: np.asarray(v, np.float32)
                  for k, v in safetensors.flax.load_file(weights_file).items()}
  except Exception as e:  # pylint: disable=broad-except  # not safetensors, truncated, ...
    text = ' '.join(str(e).split())
    raise ValueError(f'load_clip: cannot read {weights_file} as .safetensors '
                     f'({type(e).__name__}: {text[:120]})') from None
  return config, clip_variables(state_dict, config, source=weights_file)
