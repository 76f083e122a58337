"""CLIP's text and image towers (Radford et al. 2021, arXiv:2103.00020) in Flax, laid out as
Hugging Face's `transformers` CLIP so that its weights load by renaming (`weights/clip.py`).

Both towers are pre-LN transformers; layer l of width D, h heads, MLP width F does
  x <- x + out_proj(attention(layer_norm1(x)))      softmax(q k^T / sqrt(D / h)) v per head,
  x <- x + fc2(act(fc1(layer_norm2(x))))            act: quick_gelu z sigmoid(1.702 z) or gelu.
Text (`CLIPTextTransformer`): ids [B, L] -> token + learned position embedding (L <= max
  positions) -> layers with a causal mask (token i attends to j <= i) -> final_layer_norm ->
  last_hidden_state [B, L, D]; pooled [B, D] is the state at the end-of-text token (see
  `pooled_positions`: HF's rule for legacy `eos_token_id == 2` configs is argmax(ids), since EOS
  has the largest id of CLIP's vocabulary; otherwise the first position equal to eos_token_id).
  There is no padding mask: the mask is causal, so tokens up to the first EOS (and the pooled
  state) never see padding; states after it do (HF's `attention_mask` would hide the padding
  from them; Stable Diffusion passes none either).
Vision (`CLIPVisionTransformer`): images [B, S, S, C] (NHWC, normalised as `preprocess_images`)
  -> p x p patches by a stride-p conv without bias [B, (S/p)^2, D], a learned class embedding in
  front, + position embeddings [(S/p)^2 + 1, D] -> pre_layrnorm (HF's spelling) -> layers (no
  mask) -> last_hidden_state [B, 1 + (S/p)^2, D] (not normed); pooled = post_layernorm(state 0).
`CLIPModel`: text_projection / visual_projection (linear, no bias) map the pooled states to
  `projection_dim`; `logits_per_image = exp(logit_scale) * normalize(img) @ normalize(txt)^T`.

Stable Diffusion 2.x's text encoder (OpenCLIP ViT-H/14) is this text tower with config changes
only: `hidden_act='gelu'` (exact, erf-based) and the penultimate layer's output, which diffusers
ships as a checkpoint with `num_hidden_layers=23` (of OpenCLIP's 24) whose last_hidden_state is
final_layer_norm(output of layer 23): load its `text_encoder/` as is. To take layer n-1 of a
full n-layer file instead, set `num_hidden_layers` one lower and drop the last layer's keys.
SD 1.x uses OpenAI's ViT-L/14 text tower (quick_gelu, 12 layers, last layer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# OpenAI CLIP's image normalisation (RGB), as in HF's CLIPImageProcessor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ACTIVATIONS = {
    'quick_gelu': lambda z: z * jax.nn.sigmoid(1.702 * z),
    'gelu': lambda z: jax.nn.gelu(z, approximate=False),
}
# HF `architectures[0]` -> the towers its file holds and whether it has their projections.
ARCHITECTURES = {
    'CLIPModel': ('text', 'vision'),
    'CLIPTextModel': ('text',),
    'CLIPTextModelWithProjection': ('text',),
    'CLIPVisionModel': ('vision',),
    'CLIPVisionModelWithProjection': ('vision',),
}
_MODEL_TYPES = {'clip': 'CLIPModel', 'clip_text_model': 'CLIPTextModel',
                'clip_vision_model': 'CLIPVisionModel'}


def _check_tower(name: str, c) -> None:
  for field in ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
                'projection_dim'):
    if not (isinstance(getattr(c, field), int) and getattr(c, field) > 0):
      raise ValueError(f'{name}: {field}={getattr(c, field)!r} must be a positive int')
  if c.hidden_size % c.num_attention_heads:
    raise ValueError(f'{name}: hidden_size={c.hidden_size} is not a multiple of '
                     f'num_attention_heads={c.num_attention_heads}')
  if c.hidden_act not in ACTIVATIONS:
    raise ValueError(f'{name}: hidden_act={c.hidden_act!r}; choose one of {list(ACTIVATIONS)}')


def _hf_fields(cls, d: Mapping[str, Any], nested: str, name: str) -> dict:
  """The fields of `cls` in a HF config dict: the `nested` sub-dict of a CLIPModel config (whose
  projection_dim is the top-level one), else the flat dict of a single-tower config."""
  if nested in d:
    sub = dict(d[nested] or {})
    sub['projection_dim'] = d.get('projection_dim', 512)
  else:
    sub = d
  model_type = sub.get('model_type')
  if model_type not in (None, name):
    raise ValueError(f'{cls.__name__}.from_hf_dict: model_type={model_type!r} holds no '
                     f'{name} config (nor a {nested!r} entry)')
  return {f.name: sub[f.name] for f in dataclasses.fields(cls) if f.name in sub}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """HF `CLIPTextConfig`'s fields that shape the network; defaults are HF's (config.json files
  omit fields at their default). `eos_token_id == 2` selects the legacy pooling (argmax)."""
  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  projection_dim: int = 512

  def __post_init__(self):
    _check_tower('CLIPTextConfig', self)
    for field in ('vocab_size', 'max_position_embeddings'):
      if not (isinstance(getattr(self, field), int) and getattr(self, field) > 0):
        raise ValueError(f'CLIPTextConfig: {field}={getattr(self, field)!r} must be a positive int')

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any]) -> CLIPTextConfig:
    """A HF config.json dict: a CLIPModel's (`text_config`) or a flat CLIPTextModel's."""
    return cls(**_hf_fields(cls, d, 'text_config', 'clip_text_model'))


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """HF `CLIPVisionConfig`'s fields that shape the network; defaults are HF's."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512

  def __post_init__(self):
    _check_tower('CLIPVisionConfig', self)
    if self.patch_size <= 0 or self.image_size % self.patch_size:
      raise ValueError(f'CLIPVisionConfig: image_size={self.image_size} is not a multiple of '
                       f'patch_size={self.patch_size}')

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any]) -> CLIPVisionConfig:
    """A HF config.json dict: a CLIPModel's (`vision_config`) or a flat CLIPVisionModel's."""
    return cls(**_hf_fields(cls, d, 'vision_config', 'clip_vision_model'))


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """A HF CLIP checkpoint's architecture (a key of `ARCHITECTURES`) and its towers' configs (None
  for a tower the architecture lacks). `module()` is the Flax module its weights are for."""
  architecture: str
  text: CLIPTextConfig | None = None
  vision: CLIPVisionConfig | None = None
  logit_scale_init_value: float = 2.6592

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f'CLIPConfig: architecture={self.architecture!r}; choose one of '
                       f'{list(ARCHITECTURES)}')
    towers = ARCHITECTURES[self.architecture]
    for tower in ('text', 'vision'):
      if (getattr(self, tower) is not None) != (tower in towers):
        raise ValueError(f'CLIPConfig: {self.architecture} has towers {towers}, but '
                         f'{tower}={getattr(self, tower)!r}')

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any]) -> CLIPConfig:
    """A HF config.json dict -> its architecture (`architectures[0]`, else from `model_type`)."""
    names = d.get('architectures') or [_MODEL_TYPES.get(d.get('model_type'))]
    architecture = names[0]
    if architecture not in ARCHITECTURES:
      raise ValueError(f'CLIPConfig.from_hf_dict: architectures={d.get("architectures")!r}, '
                       f'model_type={d.get("model_type")!r}; supported: {list(ARCHITECTURES)}')
    towers = ARCHITECTURES[architecture]
    return cls(architecture,
               CLIPTextConfig.from_hf_dict(d) if 'text' in towers else None,
               CLIPVisionConfig.from_hf_dict(d) if 'vision' in towers else None,
               d.get('logit_scale_init_value', 2.6592))

  def module(self) -> nn.Module:
    """CLIPTextModel -> `CLIPTextTransformer(text)`, CLIPVisionModel -> `CLIPVisionTransformer(
    vision)`; CLIPModel and the *WithProjection ones -> `CLIPModel(self)`."""
    if self.architecture == 'CLIPTextModel':
      return CLIPTextTransformer(self.text)
    if self.architecture == 'CLIPVisionModel':
      return CLIPVisionTransformer(self.vision)
    return CLIPModel(self)


def _layer_norm(eps: float, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)


class _Attention(nn.Module):
  """Multi-head self-attention, q/k/v/out projections with bias; `mask` [L, L] True = attend."""
  hidden_size: int
  num_heads: int

  @nn.compact
  def __call__(self, x, mask=None):  # x [B, L, D]
    b, n, d = x.shape
    head = d // self.num_heads
    split = lambda y: y.reshape(b, n, self.num_heads, head)
    q = split(nn.Dense(d, name='q_proj')(x))
    k = split(nn.Dense(d, name='k_proj')(x))
    v = split(nn.Dense(d, name='v_proj')(x))
    logits = jnp.einsum('bqhc,bkhc->bhqk', q, k) * head ** -0.5  # [B, h, L, L]
    if mask is not None:
      logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum('bhqk,bkhc->bqhc', weights, v).reshape(b, n, d)
    return nn.Dense(d, name='out_proj')(out)


class _EncoderLayer(nn.Module):
  """One pre-LN transformer layer (module docstring); HF `CLIPEncoderLayer`."""
  config: Any  # CLIPTextConfig | CLIPVisionConfig

  @nn.compact
  def __call__(self, x, mask=None):
    c = self.config
    h = _layer_norm(c.layer_norm_eps, 'layer_norm1')(x)
    x = x + _Attention(c.hidden_size, c.num_attention_heads, name='self_attn')(h, mask)
    h = _layer_norm(c.layer_norm_eps, 'layer_norm2')(x)
    return x + _MLP(c, name='mlp')(h)


class _MLP(nn.Module):
  config: Any

  @nn.compact
  def __call__(self, x):
    c = self.config
    x = ACTIVATIONS[c.hidden_act](nn.Dense(c.intermediate_size, name='fc1')(x))
    return nn.Dense(c.hidden_size, name='fc2')(x)


class _Encoder(nn.Module):
  config: Any

  @nn.compact
  def __call__(self, x, mask=None):
    for i in range(self.config.num_hidden_layers):
      x = _EncoderLayer(self.config, name=f'layers_{i}')(x, mask)
    return x


class _TextEmbeddings(nn.Module):
  config: CLIPTextConfig

  @nn.compact
  def __call__(self, input_ids):  # [B, L] -> [B, L, D]
    c = self.config
    init = nn.initializers.normal(0.02)
    tokens = nn.Embed(c.vocab_size, c.hidden_size, embedding_init=init,
                      name='token_embedding')(input_ids)
    positions = nn.Embed(c.max_position_embeddings, c.hidden_size, embedding_init=init,
                         name='position_embedding')(jnp.arange(input_ids.shape[1]))
    return tokens + positions[None]


def pooled_positions(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
  """The end-of-text position per row [B] that the pooled text state is read at, HF's rule:
  legacy configs (`eos_token_id == 2`, before transformers PR #24773) take argmax(ids) (EOS is
  CLIP's largest id; the first one if padding repeats it); others the first position equal to
  eos_token_id (0 if a row has none)."""
  if eos_token_id == 2:
    return jnp.argmax(input_ids, axis=-1)
  return jnp.argmax(input_ids == eos_token_id, axis=-1)


class CLIPTextTransformer(nn.Module):
  """CLIP's text tower (module docstring): `(input_ids [B, L] int) -> (last_hidden_state
  [B, L, D], pooled [B, D])`, L <= max_position_embeddings. Params: HF `CLIPTextModel`'s
  `text_model.*` (embeddings, encoder.layers.{i}, final_layer_norm)."""
  config: CLIPTextConfig

  @nn.compact
  def __call__(self, input_ids):
    c = self.config
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise ValueError(f'CLIPTextTransformer: input_ids must be int [B, L], got '
                       f'{input_ids.dtype} {tuple(input_ids.shape)}')
    if input_ids.shape[1] > c.max_position_embeddings:
      raise ValueError(f'CLIPTextTransformer: {input_ids.shape[1]} tokens > '
                       f'max_position_embeddings={c.max_position_embeddings}')
    x = _TextEmbeddings(c, name='embeddings')(input_ids)
    n = input_ids.shape[1]
    causal = jnp.tril(jnp.ones((n, n), bool))  # [L, L]: query i sees keys j <= i
    x = _Encoder(c, name='encoder')(x, causal)
    x = _layer_norm(c.layer_norm_eps, 'final_layer_norm')(x)
    pooled = jnp.take_along_axis(x, pooled_positions(input_ids, c.eos_token_id)[:, None, None],
                                 axis=1)[:, 0]
    return x, pooled


class CLIPVisionTransformer(nn.Module):
  """CLIP's image tower (module docstring): `(pixels [B, S, S, C] float, normalised) ->
  (last_hidden_state [B, 1 + (S/p)^2, D], pooled [B, D])`. Params: HF `CLIPVisionModel`'s
  `vision_model.*` (embeddings, pre_layrnorm, encoder.layers.{i}, post_layernorm)."""
  config: CLIPVisionConfig

  @nn.compact
  def __call__(self, pixels):
    c = self.config
    want = (c.image_size, c.image_size, c.num_channels)
    if jnp.ndim(pixels) != 4 or tuple(jnp.shape(pixels)[1:]) != want:
      raise ValueError(f'CLIPVisionTransformer: pixels must be [B, {want[0]}, {want[1]}, '
                       f'{want[2]}] (NHWC; see preprocess_images), got {tuple(jnp.shape(pixels))}')
    x = _VisionEmbeddings(c, name='embeddings')(jnp.asarray(pixels, jnp.float32))
    x = _layer_norm(c.layer_norm_eps, 'pre_layrnorm')(x)
    x = _Encoder(c, name='encoder')(x)
    return x, _layer_norm(c.layer_norm_eps, 'post_layernorm')(x[:, 0])


class _VisionEmbeddings(nn.Module):
  config: CLIPVisionConfig

  @nn.compact
  def __call__(self, pixels):  # [B, S, S, C] -> [B, 1 + (S/p)^2, D]
    c = self.config
    p = c.patch_size
    patches = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding='VALID', use_bias=False,
                      name='patch_embedding')(pixels)  # [B, S/p, S/p, D]
    b = patches.shape[0]
    patches = patches.reshape(b, -1, c.hidden_size)  # row-major (h, w), as torch's flatten(2)
    cls = self.param('class_embedding', nn.initializers.normal(c.hidden_size ** -0.5),
                     (c.hidden_size,))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c.hidden_size)), patches], axis=1)
    positions = nn.Embed(c.num_patches + 1, c.hidden_size, name='position_embedding')(
        jnp.arange(c.num_patches + 1))
    return x + positions[None]


class CLIPModel(nn.Module):
  """CLIP's towers with their projections (HF CLIPModel; for CLIPTextModelWithProjection /
  CLIPVisionModelWithProjection configs only the one tower). Methods:
    encode_text(input_ids [B, L]) -> text_projection(pooled) [B, projection_dim] (not normalised;
      HF's get_text_features), encode_image(pixels [B, S, S, C]) -> visual_projection(pooled),
    __call__(input_ids=None, pixels=None) -> {'text_embeds', 'image_embeds'} of those given and,
      with both towers, 'logits_per_image' [B_img, B_txt] = exp(logit_scale) cos-similarity.
  Params: text_model, vision_model, text_projection, visual_projection, logit_scale (a scalar,
  only with both towers)."""
  config: CLIPConfig

  def setup(self):
    c = self.config
    if c.text is not None:
      self.text_model = CLIPTextTransformer(c.text)
      self.text_projection = nn.Dense(c.text.projection_dim, use_bias=False)
    if c.vision is not None:
      self.vision_model = CLIPVisionTransformer(c.vision)
      self.visual_projection = nn.Dense(c.vision.projection_dim, use_bias=False)
    if c.text is not None and c.vision is not None:
      self.logit_scale = self.param('logit_scale', nn.initializers.constant(
          c.logit_scale_init_value), ())

  def _tower(self, tower: str):
    if getattr(self.config, tower) is None:
      raise ValueError(f'CLIPModel: a {self.config.architecture} has no {tower} tower')

  def encode_text(self, input_ids):
    self._tower('text')
    return self.text_projection(self.text_model(input_ids)[1])

  def encode_image(self, pixels):
    self._tower('vision')
    return self.visual_projection(self.vision_model(pixels)[1])

  def __call__(self, input_ids=None, pixels=None):
    out = {}
    if input_ids is not None:
      out['text_embeds'] = self.encode_text(input_ids)
    if pixels is not None:
      out['image_embeds'] = self.encode_image(pixels)
    if len(out) == 2:
      unit = lambda e: e / jnp.linalg.norm(e, axis=-1, keepdims=True)
      out['logits_per_image'] = (jnp.exp(self.logit_scale) *
                                 unit(out['image_embeds']) @ unit(out['text_embeds']).T)
    return out


def preprocess_images(images: jax.Array, image_size: int) -> jax.Array:
  """Images in [-1, 1] [N, H, W, C] (C = 1 or 3) -> the image tower's input [N, S, S, 3].

  Grey is repeated to RGB; x -> (x + 1) / 2 in [0, 1]; the shorter side is resized to S =
  image_size (the longer to int(S * long / short)) by jax.image.resize's antialiased bicubic
  (Keys, a = -0.5), then centre-cropped to S x S (top = (h - S) // 2); clipped to [0, 1]; and
  normalised by CLIP_MEAN / CLIP_STD. HF's CLIPImageProcessor does the same steps on 8-bit
  images with PIL's bicubic resampling, so for square inputs the results differ only by the
  resampling kernel's implementation and the 8-bit rounding.
  """
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'preprocess_images: images must be [N, H, W, 1 or 3] in [-1, 1], got '
                     f'{tuple(images.shape)}')
  n, h, w, _ = images.shape
  x = (jnp.broadcast_to(images, (n, h, w, 3)) + 1) / 2
  short, long = min(h, w), max(h, w)
  size_long = int(image_size * long / short)
  new = (image_size, size_long) if h <= w else (size_long, image_size)
  if new != (h, w):
    x = jax.image.resize(x, (n, *new, 3), method='bicubic', antialias=True)
  top, left = (new[0] - image_size) // 2, (new[1] - image_size) // 2
  x = jnp.clip(x[:, top:top + image_size, left:left + image_size], 0, 1)
  return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
