"""Latent diffusion on the 32x32 digits: KL-f4 autoencoder -> latents -> DDPM -> decode -> FD.

One command runs the three stages (`diffusion_jax/latent_pipeline.py`), each resumable:
  python -m experiments.train --config=configs/latent_digits.py --workdir=runs/latent
The digits are rendered at 32x32 by bilinear upsampling (`data.image_size=32`); the autoencoder
(`configs/autoencoder_digits.py`, in `config.latent.autoencoder`) maps them to 8x8x2 latents;
the diffusion model is the default digits U-Net on those latents; samples are decoded and
measured in the digits classifier's 8x8 feature space (`digits.to_native` inverts the
upsampling exactly), so FD/floor compares with the pixel runs'.

Variants (comma-separated): `vq` (the VQ-reg autoencoder), `smoke` (seconds, for tests), and
any model variant of `configs/digits.py` (e.g. `dit`).
"""

import ml_collections

from configs import autoencoder_digits
from configs import digits


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  variants = [v for v in (variant or '').split(',') if v]
  own = [v for v in variants if v == 'vq']
  c = digits.get_config(','.join(['eps'] + [v for v in variants if v not in own]))
  c.data.image_size = 32
  c.sample.clip_x0 = 0.0          # latents are not bounded to [-1, 1]
  ae = autoencoder_digits.get_config(','.join(own + (['smoke'] if 'smoke' in variants else [])))
  c.latent = ml_collections.ConfigDict(
      {'autoencoder': {k: ae[k].to_dict() for k in autoencoder_digits.stage()},
       'encode_batch_size': 256})
  return ml_collections.ConfigDict(c)
