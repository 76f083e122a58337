"""DiT (Peebles & Xie 2023) on 32x32x4 latents (ImageNet 256x256 through the SD VAE).

`--config=configs/dit.py:XL/2` (the default), any of S, B, L, XL with patch 2, 4 or 8. Paper
sizes: S/2 33 M, B/2 130 M, L/2 458 M, XL/2 675 M parameters; 6.06 / 23.01 / 80.71 / 118.64
forward GFLOPs (a multiply-add counted once). Training as in the paper: linear betas over
T = 1000, L_simple plus the VLB term for the learned variances (`ddpm_hybrid`), AdamW 1e-4
without weight decay or warm-up, batch 256, EMA 0.9999, 10 % label dropout for guidance;
sampling with 250 DDPM steps. Data: the SD VAE's latents `[N, 32, 32, 4]` of 256x256 images, as
`experiments.encode_latents --weights=...` writes them (scaled by the stored 0.18215 when read):
`--config.data.path=latents/imagenet256` (README, "Latent diffusion"). Compute in bfloat16,
parameters, optimizer state and EMA in float32. FID needs the decoded images, reference
statistics and the Inception weights, so evaluation is off; model, process and objective are
checked by `tests/test_reference_configs.py`.
"""

import ml_collections

from configs import digits

IMAGE_SHAPE = (32, 32, 4)
# name -> (hidden size, depth, heads), Peebles & Xie 2023, Table 1.
SIZES = {'S': (384, 12, 6), 'B': (768, 12, 12), 'L': (1024, 24, 16), 'XL': (1152, 28, 16)}


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  variant = variant or 'XL/2'
  size, _, patch = variant.partition('/')
  if size not in SIZES or patch not in ('2', '4', '8'):
    raise ValueError(f'configs/dit.py: variant {variant!r} is not SIZE/PATCH with SIZE in '
                     f'{list(SIZES)} and PATCH in 2, 4, 8 (e.g. XL/2)')
  hidden, depth, heads = SIZES[size]
  c = digits.get_config()
  c.data = digits.data_section(name='latents')
  c.process = dict(name='vp_discrete', schedule='linear', num_steps=1000)
  c.objective = dict(name='ddpm_hybrid')
  c.model = digits.model_section(name='dit', patch_size=int(patch), hidden_size=hidden,
                                 depth=depth, num_heads=heads, num_classes=1000,
                                 label_dropout=0.1, out_channels=8, dtype='bfloat16')
  c.optim.update(lr=1e-4, warmup_steps=1, schedule='constant', weight_decay=0.0, grad_clip=0.0)
  c.train.update(num_steps=400_000, batch_size=256, ema_decay=0.9999, log_every=100,
                 checkpoint_every=10_000)
  c.sample.update(sampler='ddpm', steps=250, options=dict(variance='learned'), batch_size=64,
                  grid_size=64, guidance_scale=1.5)
  c.eval.update(num_samples=50_000, enabled=False)
  return c
