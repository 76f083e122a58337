"""CLIP score (Hessel et al. 2021) with a real CLIP model loaded from local weights.

CLIPScore(image, text) = w max(cos(E_I(image), E_T(text)), 0) with w = 100, as torchmetrics'
`CLIPScore` reports it (the paper uses w = 2.5 and the prompt prefix "A photo depicts"; neither
is applied here). The score of a set of pairs is the mean over pairs. `E_I`, `E_T` are the
projected embeddings of a `models.clip.CLIPModel` (`weights.clip.load_clip` of a Hugging Face
directory holding a whole CLIPModel, e.g. openai/clip-vit-large-patch14), images preprocessed by
`models.clip.preprocess_images` and prompts tokenized by `text.clip_tokenizer.CLIPTokenizer`.
The digits-CLIP of `metrics.digits_clip` is the same score in a space trained on the digits.
"""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax.models import clip

SCORE_WEIGHT = 100.0


def pair_scores(image_embeds, text_embeds, weight: float = SCORE_WEIGHT) -> np.ndarray:
  """`[N]`: `weight * max(cos(image_embeds[i], text_embeds[i]), 0)` for paired rows."""
  img = np.asarray(image_embeds, np.float64)
  txt = np.asarray(text_embeds, np.float64)
  if img.shape != txt.shape or img.ndim != 2:
    raise ValueError(f'pair_scores: image and text embeddings must be paired [N, D] arrays, got '
                     f'{img.shape} and {txt.shape}')
  cos = np.sum(img * txt, axis=1) / (np.linalg.norm(img, axis=1) * np.linalg.norm(txt, axis=1))
  return weight * np.maximum(cos, 0.0)


class CLIPScore:
  """`score(images, texts) -> float`: the mean CLIP score of images `[N, H, W, C]` in [-1, 1]
  and their prompts, in batches of `batch_size`, with a whole CLIP model
  (`weights.clip.load_clip(path)` -> `config, variables`) and its tokenizer."""

  def __init__(self, config, variables, tokenizer, batch_size: int = 64):
    if config.text is None or config.vision is None:
      raise ValueError(f'CLIPScore: needs both towers (a CLIPModel); {config.architecture} has '
                       f'{"no text" if config.text is None else "no vision"} tower')
    tokenizer.check_matches(config.text.vocab_size, 'the CLIP text tower')
    self.config, self.variables, self.tokenizer = config, variables, tokenizer
    self.batch_size = batch_size
    model = clip.CLIPModel(config)
    size = config.vision.image_size
    self._image = jax.jit(lambda v, x: model.apply(
        v, clip.preprocess_images(x, size), method='encode_image'))
    self._pixels = jax.jit(lambda v, p: model.apply(v, p, method='encode_image'))
    self._text = jax.jit(lambda v, ids: model.apply(v, ids, method='encode_text'))

  def text_embeds(self, texts) -> np.ndarray:
    length = min(self.tokenizer.context_length, self.config.text.max_position_embeddings)
    ids = self.tokenizer.encode(list(texts), length, truncate=True)
    return np.concatenate([np.asarray(self._text(self.variables, jnp.asarray(ids[i:i + self.
                                                                                batch_size])))
                           for i in range(0, len(ids), self.batch_size)])

  def image_embeds(self, images, *, preprocessed: bool = False) -> np.ndarray:
    fn = self._pixels if preprocessed else self._image
    images = np.asarray(images, np.float32)
    return np.concatenate([np.asarray(fn(self.variables, jnp.asarray(images[i:i + self.
                                                                          batch_size])))
                           for i in range(0, len(images), self.batch_size)])

  def __call__(self, images, texts, *, preprocessed: bool = False) -> float:
    if len(images) != len(texts):
      raise ValueError(f'CLIPScore: {len(images)} images but {len(texts)} prompts')
    return float(np.mean(pair_scores(self.image_embeds(images, preprocessed=preprocessed),
                                     self.text_embeds(texts))))
