"""The `text` config section: a tokenizer, a text encoder and captioned data for a run.

A run with a `config.text` section is text-conditioned: `run_config.build` wraps the configured
network (a U-Net or DiT with `model.context_dim` equal to the encoder's width) in
`models.text.TextConditioned`, the training data in `data.captions.CaptionedSource` (batches gain
'tokens'), and sampling reads prompts (`prompt_conditions`) instead of class labels.

  encoder='transformer'  `models.text.TextEncoder`, trained with the denoiser from scratch, over
                         the captions' word vocabulary (`text.words.WordTokenizer`).
  encoder='clip'         the CLIP text tower (`models.clip`) with the weights and BPE vocabulary
                         of a local Hugging Face directory `text.weights` (config.json,
                         model.safetensors, vocab.json, merges.txt), frozen with `freeze=True`.
"""

import dataclasses
import os

import numpy as np

from diffusion_jax import configuration
from diffusion_jax.configuration import ConfigError

ENCODERS = ('transformer', 'clip')
TEMPLATES = ('train', 'heldout')


@dataclasses.dataclass(frozen=True)
class TextConfig:
  encoder: str = 'transformer'
  weights: str = ''             # encoder='clip': the text encoder's Hugging Face directory
                                # (config.json, model.safetensors; a CLIPTextModel as SD ships
                                # in text_encoder/, or a whole CLIPModel)
  tokenizer: str = ''           # encoder='clip': the directory of vocab.json and merges.txt
                                # (and tokenizer_config.json); '' = `weights`
  freeze: bool = False          # leave the encoder's parameters as initialised / loaded
  width: int = 128              # encoder='transformer': model width (= model.context_dim)
  depth: int = 2
  num_heads: int = 4
  length: int = 0               # tokens per caption (0: the tokenizer's context_length)
  caption_dropout: float = 0.1  # the empty prompt replaces a caption w.p. this (for guidance)
  templates: str = 'train'      # the caption templates training reads ('heldout' for ablations)
  mask_padding: bool = True     # the denoiser attends to BOS .. EOS only
  # Prompts for sampling and evaluation: `data.captions.evaluation_prompts` of these templates.
  eval_templates: str = 'heldout'
  negative_prompt: str = ''     # the unconditional branch of guidance ('' = the empty prompt)


def build_text(section) -> TextConfig:
  """The `text` section, checked; one-line `ConfigError`s name the key."""
  cfg = configuration.from_section(TextConfig, 'text', section)
  configuration.choice('text.encoder', cfg.encoder, ENCODERS)
  configuration.choice('text.templates', cfg.templates, TEMPLATES)
  configuration.choice('text.eval_templates', cfg.eval_templates, TEMPLATES)
  configuration.positive('text.length', cfg.length, allow_zero=True)
  if not 0.0 <= cfg.caption_dropout < 1.0:
    raise ConfigError(f'config.text.caption_dropout={cfg.caption_dropout}: must lie in [0, 1)')
  if cfg.encoder == 'clip':
    if not cfg.weights:
      raise ConfigError("config.text.weights: encoder='clip' needs the directory holding the "
                        'Hugging Face config.json, model.safetensors, vocab.json and merges.txt')
    if not os.path.isdir(os.path.expanduser(cfg.weights)):
      raise ConfigError(f'config.text.weights={cfg.weights!r}: no such directory')
    if cfg.tokenizer and not os.path.isdir(os.path.expanduser(cfg.tokenizer)):
      raise ConfigError(f'config.text.tokenizer={cfg.tokenizer!r}: no such directory')
  elif cfg.weights or cfg.tokenizer:
    key = 'weights' if cfg.weights else 'tokenizer'
    raise ConfigError(f"config.text.{key}={getattr(cfg, key)!r}: only encoder='clip' loads "
                      f'weights and a tokenizer')
  for k in ('width', 'depth', 'num_heads'):
    configuration.positive(f'text.{k}', getattr(cfg, k))
  return cfg


@dataclasses.dataclass(frozen=True)
class TextParts:
  """What a text-conditioned run is built from."""
  config: TextConfig
  tokenizer: object
  encoder: object                   # a Flax module: tokens [B, L] -> states [B, L, width]
  width: int
  length: int
  # encoder='clip': `pretrained() -> params` reads the encoder's weights (only when a run
  # initialises, not whenever a config is built).
  pretrained: object = None

  def tokens(self, texts, *, truncate: bool = False) -> np.ndarray:
    """`[N, length]` int32 token ids of `texts` (one-line errors for unknown words or a prompt
    longer than `length` unless `truncate`)."""
    return self.tokenizer.encode(list(texts), self.length, truncate=truncate)

  @property
  def empty_tokens(self) -> tuple[int, ...]:
    return tuple(int(i) for i in self.tokens([''])[0])


def build_parts(cfg: TextConfig) -> TextParts:
  """Tokenizer and encoder of `cfg` (for 'clip', read from `cfg.weights`)."""
  if cfg.encoder == 'transformer':
    from diffusion_jax.models import text as text_models  # pylint: disable=g-import-not-at-top
    from diffusion_jax.text import words  # pylint: disable=g-import-not-at-top
    tokenizer = words.WordTokenizer.for_captions()
    length = cfg.length or tokenizer.context_length
    encoder = text_models.TextEncoder(tokenizer.vocab_size, length, tokenizer.eos_id,
                                      width=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads)
    return TextParts(cfg, tokenizer, encoder, cfg.width, length)
  return _clip_parts(cfg)


def _clip_parts(cfg: TextConfig) -> TextParts:
  from diffusion_jax.models import text as text_models  # pylint: disable=g-import-not-at-top
  from diffusion_jax.text import clip_tokenizer  # pylint: disable=g-import-not-at-top
  from diffusion_jax.weights import clip as clip_weights  # pylint: disable=g-import-not-at-top
  root = os.path.expanduser(cfg.weights)
  try:
    config = clip_weights.load_clip_config(root)
  except ValueError as e:
    raise ConfigError(f'config.text.weights={cfg.weights!r}: {str(e).splitlines()[0]}') from None
  if config.text is None:
    raise ConfigError(f'config.text.weights={cfg.weights!r}: {config.architecture} has no text '
                      f'tower')

  def pretrained():
    try:
      params = clip_weights.load_clip(root)[1]['params']
    except ValueError as e:
      raise ConfigError(f'config.text.weights={cfg.weights!r}: '
                        f'{str(e).splitlines()[0]}') from None
    return {'transformer': params if config.architecture == 'CLIPTextModel'
            else params['text_model']}
  text = config.text
  tok_dir = os.path.expanduser(cfg.tokenizer or cfg.weights)
  try:
    tokenizer = clip_tokenizer.CLIPTokenizer.from_directory(tok_dir)
    tokenizer.check_matches(text.vocab_size, os.path.join(root, 'config.json'))
  except (ValueError, OSError) as e:
    raise ConfigError(f'config.text.tokenizer={tok_dir!r}: {str(e).splitlines()[0]}') from None
  length = cfg.length or min(tokenizer.context_length, text.max_position_embeddings)
  if length > text.max_position_embeddings:
    raise ConfigError(f'config.text.length={length}: the CLIP text tower has '
                      f'{text.max_position_embeddings} positions')
  encoder = text_models.CLIPTextStates(text)
  return TextParts(cfg, tokenizer, encoder, text.hidden_size, length, pretrained=pretrained)


def check_model(parts: TextParts, model) -> None:
  """The network must cross-attend to contexts of the encoder's width, and not drop them."""
  got = getattr(model, 'context_dim', None)
  if got is None:
    raise ConfigError(f'config.text: model {type(model).__name__} takes no context; use a '
                      f'U-Net or DiT with model.context_dim={parts.width}')
  if got != parts.width:
    raise ConfigError(f'config.model.context_dim={got}: the text encoder gives states of width '
                      f'{parts.width} (text.width, or the CLIP tower\'s hidden_size)')
  if getattr(model, 'context_dropout', 0.0):
    raise ConfigError(f'config.model.context_dropout={model.context_dropout}: captions are '
                      f'dropped to the empty prompt by text.caption_dropout; set it to 0')
  if getattr(model, 'num_classes', 0):
    raise ConfigError(f'config.model.num_classes={model.num_classes}: a text-conditioned model '
                      f'reads the class from the caption; set it to 0')


def wrap_model(parts: TextParts, net):
  from diffusion_jax.models import text as text_models  # pylint: disable=g-import-not-at-top
  return text_models.TextConditioned(
      net=net, encoder=parts.encoder, empty_tokens=parts.empty_tokens,
      eos_id=int(parts.tokenizer.eos_id), caption_dropout=parts.config.caption_dropout,
      mask_padding=parts.config.mask_padding, freeze_encoder=parts.config.freeze)


def caption_source(parts: TextParts, data, source):
  """`source` (the digits of `data`, as pixels or as their latents, in the split's order) with
  captions: attributes measured on the native 8x8 digits of `data.split`."""
  from diffusion_jax.data import captions  # pylint: disable=g-import-not-at-top
  from diffusion_jax.data import digits  # pylint: disable=g-import-not-at-top
  if isinstance(source, captions.CaptionedSource):
    return source
  if data.name != 'digits':
    raise ConfigError(f"config.text: captions exist for the embedded digits (data.name="
                      f"'digits', in pixels or as latents); got data.name={data.name!r}")
  images, _ = digits.load_digits(data.split, digits.IMAGE_SHAPE[0])
  attributes = captions.measure_attributes(images)
  if len(attributes) != len(source):
    raise ConfigError(f'config.text: the data has {len(source)} examples but the digits '
                      f"split {data.split!r} has {len(attributes)}: captions cannot be matched")
  return captions.CaptionedSource(source, parts.tokenizer, attributes=attributes,
                                  templates=parts.config.templates, length=parts.length)


@dataclasses.dataclass(frozen=True)
class Prompts:
  """Sampling conditions: `texts[i]` is sample i's prompt, `tokens` its ids, with the class
  and attribute values the prompt names (for class and attribute accuracy)."""
  texts: list
  tokens: np.ndarray        # [N, L] int32
  labels: np.ndarray        # [N] int32
  attributes: np.ndarray    # [N, A] int32, -1 where the prompt names no value


def prompt_conditions(parts: TextParts, num: int, *, seed: int = 0) -> Prompts:
  """`num` evaluation prompts (`data.captions.evaluation_prompts` of `text.eval_templates`)."""
  from diffusion_jax.data import captions  # pylint: disable=g-import-not-at-top
  texts, labels, attributes = captions.evaluation_prompts(
      num, seed=seed, templates=parts.config.eval_templates)
  return Prompts(list(texts), parts.tokens(texts), np.asarray(labels, np.int32),
                 np.asarray(attributes, np.int32))


def check_pretrained(initialised, loaded):
  """`loaded` (the encoder's pretrained parameters), after checking it has the structure,
  shapes and dtypes of the `initialised` ones."""
  import jax  # pylint: disable=g-import-not-at-top
  want = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), initialised)
  got = jax.tree.map(lambda a: (tuple(jax.numpy.shape(a)), str(jax.numpy.result_type(a))),
                     loaded)
  if jax.tree.structure(want) != jax.tree.structure(got) or want != got:
    raise ConfigError('config.text.weights: the loaded text encoder does not have the '
                      'parameters of the configured one (structure or shapes differ)')
  return loaded
