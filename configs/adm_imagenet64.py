"""ADM on class-conditional ImageNet 64x64 (Dhariwal & Nichol 2021): 295.9 M parameters.

192 base channels, multipliers (1, 2, 3, 4), 3 residual blocks per level, attention at 32, 16
and 8 with 64 channels per head, adaptive GroupNorm, BigGAN up/down blocks, dropout 0.1,
learned variances (6 output channels) trained with the hybrid loss on a cosine schedule, Adam
3e-4, batch 2048, EMA 0.9999. Data: TFDS `downsampled_imagenet/64x64` has no labels, so the
class-conditional model stops with a one-line error there; point `data.name='npy'` at
`[N, 64, 64, 3]` images in [-1, 1] and `[N]` labels instead. Compute in bfloat16, parameters,
optimizer state and EMA in float32. The model and the rest of the config are checked by
`tests/test_reference_configs.py`.
"""

import ml_collections

from configs import digits

IMAGE_SHAPE = (64, 64, 3)


def get_config() -> ml_collections.ConfigDict:
  c = digits.get_config()
  c.data = digits.data_section(name='imagenet64')
  c.process = dict(name='vp_discrete', schedule='cosine', num_steps=1000)
  c.objective = dict(name='ddpm_hybrid')
  c.model = digits.model_section(name='unet', ch=192, ch_mult=(1, 2, 3, 4), num_res_blocks=3,
                                 attn_resolutions=(32, 16, 8), num_head_channels=64, dropout=0.1,
                                 num_groups=32, resblock_updown=True, scale_shift_norm=True,
                                 out_channels=6, num_classes=1000, dtype='bfloat16')
  c.optim.update(lr=3e-4, warmup_steps=1, schedule='constant', grad_clip=0.0)
  c.train.update(num_steps=540_000, batch_size=2048, ema_decay=0.9999, log_every=100,
                 checkpoint_every=10_000)
  c.sample.update(sampler='ddpm', steps=250, options=dict(variance='learned'), batch_size=256,
                  grid_size=64)
  c.eval.update(num_samples=50_000, enabled=False)
  return c
