"""Stable Diffusion's VAE weights (`.safetensors`) -> the variables of `models.AutoencoderKL`.

Two layouts of the same tensors are published, and both are read (the layout is told from the
keys):
  diffusers: `encoder.down_blocks.{i}.resnets.{j}.norm1.weight`, `…downsamplers.0.conv…`,
    `encoder.mid_block.attentions.0.to_q.weight` (linear, [C, C]; older files name the
    attention `query` / `key` / `value` / `proj_attn`), `…conv_shortcut…`, `encoder.conv_norm_out…`,
    `decoder.up_blocks.{k}…` with k = 0 at the lowest resolution;
  LDM / CompVis (the original code and the single-file SD checkpoints): `encoder.down.{i}.block.
    {j}.norm1.weight`, `…downsample.conv…`, `encoder.mid.block_1…`, `encoder.mid.attn_1.q.weight`
    (1x1 conv, [C, C, 1, 1]), `…nin_shortcut…`, `encoder.norm_out…`, `decoder.up.{i}…` with i the
    resolution level (i = 0 at full resolution: the reverse of diffusers' k). A full SD checkpoint
    prefixes the VAE with `first_stage_model.`; its other keys (U-Net, text encoder) are ignored.
Torch layouts become ours: conv [O, I, kh, kw] -> [kh, kw, I, O], linear [out, in] -> [in, out];
every tensor becomes float32. The file must hold exactly the tensors the config needs, each of
the shape it needs: anything else is a one-line ValueError naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import jax
import numpy as np
import safetensors.flax
import safetensors.numpy
from flax import traverse_util

from diffusion_jax.models.autoencoder import AutoencoderKL

_PREFIX = 'first_stage_model.'  # the VAE's keys in a full Stable Diffusion checkpoint
_LEAF_TO_TORCH = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias'}
# Our attention layer -> (diffusers, LDM) name.
_ATTENTION = {'norm': ('group_norm', 'norm'), 'query': ('to_q', 'q'), 'key': ('to_k', 'k'),
              'value': ('to_v', 'v'), 'out': ('to_out.0', 'proj_out')}
_OLD_DIFFUSERS_ATTENTION = {'query': 'to_q', 'key': 'to_k', 'value': 'to_v',
                            'proj_attn': 'to_out.0'}
_RESNET_LDM = {'conv_shortcut': 'nin_shortcut'}  # the other ResNet layers keep their names


def _reference_names(path: str, num_levels: int) -> tuple[str, str]:
  """Our module path (e.g. 'decoder/up_0_res_1/conv1') -> its (diffusers, LDM) name."""
  if re.fullmatch(r'(encoder|decoder)/(conv_in|conv_out)|(post_)?quant_conv', path):
    return (path.replace('/', '.'),) * 2
  if m := re.fullmatch(r'(encoder|decoder)/norm_out', path):
    return f'{m[1]}.conv_norm_out', f'{m[1]}.norm_out'
  if m := re.fullmatch(r'(encoder/down|decoder/up)_(\d+)_res_(\d+)/(\w+)', path):
    net, kind = m[1].split('/')
    level, block, layer = int(m[2]), m[3], m[4]
    index = level if kind == 'down' else num_levels - 1 - level
    return (f'{net}.{kind}_blocks.{index}.resnets.{block}.{layer}',
            f'{net}.{kind}.{level}.block.{block}.{_RESNET_LDM.get(layer, layer)}')
  if m := re.fullmatch(r'(encoder/down|decoder/up)_(\d+)_(down|up)sample', path):
    net, kind = m[1].split('/')
    level = int(m[2])
    index = level if kind == 'down' else num_levels - 1 - level
    return (f'{net}.{kind}_blocks.{index}.{kind}samplers.0.conv',
            f'{net}.{kind}.{level}.{kind}sample.conv')
  if m := re.fullmatch(r'(encoder|decoder)/mid/res_(\d)/(\w+)', path):
    block, layer = int(m[2]), m[3]
    return (f'{m[1]}.mid_block.resnets.{block}.{layer}',
            f'{m[1]}.mid.block_{block + 1}.{_RESNET_LDM.get(layer, layer)}')
  if m := re.fullmatch(r'(encoder|decoder)/mid/attn/(\w+)', path):
    diffusers, ldm = _ATTENTION[m[2]]
    return f'{m[1]}.mid_block.attentions.0.{diffusers}', f'{m[1]}.mid.attn_1.{ldm}'
  raise AssertionError(f'no reference name for the AutoencoderKL layer {path!r}')


def _torch_shape(shape: tuple[int, ...], ldm: bool) -> tuple[int, ...]:
  if len(shape) == 4:  # conv [kh, kw, I, O] -> [O, I, kh, kw]
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:  # dense [in, out] -> linear [out, in], or LDM's 1x1 conv [out, in, 1, 1]
    return (shape[1], shape[0], 1, 1) if ldm else (shape[1], shape[0])
  return shape


def _from_torch(value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """A torch tensor -> our parameter of `shape`, float32."""
  value = np.asarray(value, np.float32)
  if len(shape) == 4:  # conv
    return value.transpose(2, 3, 1, 0)
  if len(shape) == 2:  # linear [out, in] or 1x1 conv [out, in, 1, 1] -> dense [in, out]
    return value.reshape(shape[::-1]).T
  return value


def _expected(model: AutoencoderKL, layout: str) -> dict[str, tuple[str, tuple, tuple]]:
  """Reference name -> (our parameter path, our shape, torch shape) of `model`'s parameters."""
  x = jax.ShapeDtypeStruct((1, model.f, model.f, model.in_channels), np.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)['params']
  expected = {}
  for path, leaf in traverse_util.flatten_dict(shapes, sep='/').items():
    module, _, name = path.rpartition('/')
    diffusers, ldm = _reference_names(module, len(model.block_out_channels))
    key = f'{ldm if layout == "ldm" else diffusers}.{_LEAF_TO_TORCH[name]}'
    expected[key] = (path, leaf.shape, _torch_shape(leaf.shape, layout == 'ldm'))
  return expected


def state_dict_shapes(config: AutoencoderKL | Mapping, layout: str = 'diffusers'):
  """Key -> torch shape of every tensor `AutoencoderKL(**config)` reads, in `layout` ('diffusers'
  or 'ldm'; without the `first_stage_model.` prefix)."""
  if layout not in ('diffusers', 'ldm'):
    raise ValueError(f"state_dict_shapes: layout={layout!r}; choose 'diffusers' or 'ldm'")
  return {k: torch_shape for k, (_, _, torch_shape) in _expected(_model(config), layout).items()}


def _model(config: AutoencoderKL | Mapping) -> AutoencoderKL:
  if isinstance(config, AutoencoderKL):
    return config
  fields = {f.name for f in dataclasses.fields(AutoencoderKL)} - {'parent', 'name'}
  unknown = sorted(set(config) - fields)
  if unknown:
    raise ValueError(f'load_autoencoder_kl: unknown AutoencoderKL config keys {unknown}; the '
                     f'fields are {sorted(fields)}')
  return AutoencoderKL(**config)


def _layout(keys: list[str], source: str) -> str:
  if any(k.startswith(('encoder.down_blocks.', 'encoder.mid_block.')) for k in keys):
    return 'diffusers'
  if any(k.startswith(('encoder.down.', 'encoder.mid.')) for k in keys):
    return 'ldm'
  raise ValueError(f'load_autoencoder_kl: {source} has neither the diffusers nor the LDM '
                   f'AutoencoderKL layout (keys {_some(sorted(keys))})')


def _some(keys: list[str], n: int = 3) -> str:
  more = f' and {len(keys) - n} more' if len(keys) > n else ''
  return ', '.join(repr(k) for k in keys[:n]) + more


def autoencoder_kl_variables(state_dict: Mapping[str, np.ndarray],
                             config: AutoencoderKL | Mapping, source: str = 'state dict'):
  """A diffusers- or LDM-layout state dict -> `{'params': …}` of `AutoencoderKL(**config)`.

  `config` is the model (or its fields) the weights are for; `source` names the weights in
  errors. See the module docstring for the layouts.
  """
  model = _model(config)
  prefix = _PREFIX if any(k.startswith(_PREFIX) for k in state_dict) else ''
  file_keys = {}  # reference name -> the key in the file
  for key in state_dict:
    if not key.startswith(prefix):
      continue  # a full SD checkpoint's U-Net, text encoder, ...
    name = key[len(prefix):]
    if m := re.fullmatch(r'(\w+\.mid_block\.attentions\.0)\.(\w+)\.(weight|bias)', name):
      if m[2] in _OLD_DIFFUSERS_ATTENTION:
        name = f'{m[1]}.{_OLD_DIFFUSERS_ATTENTION[m[2]]}.{m[3]}'
    file_keys[name] = key
  layout = _layout(list(file_keys), source)
  expected = _expected(model, layout)

  where = f'{source} ({"LDM" if layout == "ldm" else "diffusers"} layout)'
  hint = 'do the config\'s block_out_channels / layers_per_block match the file?'
  for name, (_, _, torch_shape) in expected.items():
    if name in file_keys and tuple(state_dict[file_keys[name]].shape) != torch_shape:
      raise ValueError(f'load_autoencoder_kl: {where}: {file_keys[name]!r} has shape '
                       f'{tuple(state_dict[file_keys[name]].shape)}, the config expects '
                       f'{torch_shape}; {hint}')
  missing = [prefix + k for k in expected if k not in file_keys]
  if missing:
    raise ValueError(f'load_autoencoder_kl: {where} lacks {len(missing)} tensors the config '
                     f'needs: {_some(missing)}; {hint}')
  extra = [file_keys[k] for k in file_keys if k not in expected]
  if extra:
    raise ValueError(f'load_autoencoder_kl: {where} has {len(extra)} tensors the config does '
                     f'not use: {_some(extra)}; {hint}')
  flat = {path: _from_torch(state_dict[file_keys[name]], shape)
          for name, (path, shape, _) in expected.items()}
  return {'params': traverse_util.unflatten_dict(flat, sep='/')}


def load_autoencoder_kl(path: str, config: AutoencoderKL | Mapping):
  """A local `.safetensors` file (diffusers or LDM layout, or a full SD checkpoint) -> the
  variables of `AutoencoderKL(**config)` (e.g. `models.autoencoder.SD_VAE_CONFIG`), float32."""
  try:
    state_dict = safetensors.numpy.load_file(path)
  except TypeError:
    # numpy has no bfloat16: such files are read through JAX, which has.
    state_dict = {k: np.asarray(v, np.float32) for k, v in safetensors.flax.load_file(path).items()}
  except Exception as e:  # pylint: disable=broad-except  # missing file, not safetensors, ...
    text = ' '.join(str(e).split())
    raise ValueError(f'load_autoencoder_kl: cannot read {path} as .safetensors '
                     f'({type(e).__name__}: {text[:120]})') from None
  return autoencoder_kl_variables(state_dict, config, source=path)
