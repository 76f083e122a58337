"""A tiny Stable Diffusion on the embedded digits: KL autoencoder + text encoder + U-Net.

  python -m experiments.train --config=configs/tiny_sd.py --workdir=runs/tiny_sd

Latent diffusion (`configs/latent_digits.py`: 32x32 digits, a KL-f4 autoencoder, 8x8x2
latents) conditioned on captions as in `configs/text_digits.py`: the captions' Transformer text
encoder, trained with the U-Net, whose states the U-Net cross-attends to at 8x8 and 4x4; 10 %
of captions dropped to the empty prompt; guidance scale 2 against it. Samples are decoded and
measured at 8x8: FD, class accuracy, attribute accuracy and the digits-CLIP score, for prompts
in held-out templates.

Variants (comma-separated): `smoke` (seconds, for tests), `vq` (LDM's VQ-reg autoencoder).
"""

import ml_collections

from configs import latent_digits
from configs import text_digits


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  variants = [v for v in (variant or '').split(',') if v]
  c = latent_digits.get_config(','.join(variants))
  return ml_collections.ConfigDict(text_digits.add_text(c, smoke='smoke' in variants))
