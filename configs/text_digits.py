"""Text-to-image on the embedded digits: captions -> Transformer text encoder -> U-Net.

  python -m experiments.train --config=configs/text_digits.py --workdir=runs/text_digits

The digits carry captions made from their label and attributes measured on each image
(`data/captions.py`: "a thin, slanted seven", "bold 3 on the left", ...), re-drawn from the
training templates every epoch. A small Transformer (`models.text.TextEncoder`, trained with
the denoiser) encodes them; the digits U-Net cross-attends to its states at 8x8 and 4x4 and
has no class embedding, so the class comes from the text alone. 10 % of captions are dropped to
the empty prompt, and samples are guided (scale 2) against it. Evaluation prompts use the
held-out templates: class accuracy, attribute accuracy and the digits-CLIP score beside FD.

Variants (comma-separated): `smoke` (seconds, for tests) and the model variants of
`configs/digits.py` (e.g. `dit`). For a frozen CLIP text tower instead of the trained encoder:
`--config.text.encoder=clip --config.text.weights=<text_encoder dir>
--config.text.tokenizer=<tokenizer dir> --config.text.freeze=True
--config.model.context_dim=<its hidden_size>`.
"""

import ml_collections

from configs import digits
from diffusion_jax.text.conditioning import TextConfig

CONTEXT_WIDTH = 64


def text_section(**values) -> dict:
  """Every `config.text` key (the fields of `TextConfig`) at its default, then `values`."""
  return digits.typed_section(TextConfig, 'text', **values)


def add_text(c: ml_collections.ConfigDict, smoke: bool = False) -> ml_collections.ConfigDict:
  """Makes the digits config `c` text-conditioned (in place)."""
  c.text = text_section(width=CONTEXT_WIDTH, depth=2, num_heads=4, caption_dropout=0.1)
  c.model.context_dim = CONTEXT_WIDTH
  if c.model.name == 'unet':     # cross-attention at every attention site: 8x8 and 4x4
    c.model.update(attn_resolutions=(8, 4), num_heads=2)
  elif c.model.name != 'dit':
    raise ValueError(f'configs/text_digits.py: model {c.model.name!r} has no cross-attention; '
                     f'use the U-Net or `dit`')
  c.sample.guidance_scale = 2.0
  if smoke:
    c.text.update(width=16, depth=1, num_heads=2)
    c.model.context_dim = 16
    c.eval.digits_clip_steps = 30      # a rough digits-CLIP, trained in seconds
  return c


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  variants = [v for v in (variant or '').split(',') if v]
  if 'cond' in variants:
    raise ValueError('configs/text_digits.py: the class comes from the caption; no `cond`')
  c = digits.get_config(','.join(['eps', *variants]))
  return ml_collections.ConfigDict(add_text(c, smoke='smoke' in variants))
