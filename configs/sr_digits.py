"""Super-resolution stage of an 8x8 -> 16x16 cascade on the embedded digits (SR3 + Gaussian
conditioning augmentation; `diffusion_jax/models/superres.py`).

  python -m experiments.train --config=configs/sr_digits.py --workdir=runs/sr_aug
  python -m experiments.train --config=configs/sr_digits.py:noaug --workdir=runs/sr_noaug
  python -m experiments.cascade --base=runs/digits --sr=aug=runs/sr_aug,noaug=runs/sr_noaug

The data are the 16x16 digits (`data.image_size=16`: each 8x8 pixel repeated 2 x 2); each
training image's condition is its 2 x 2 block mean, which is exactly the 8x8 digit the base
model (`configs/digits.py`) learns. So the high resolution here adds no new detail: a perfect
SR stage is nearest upsampling of its condition, and what the cascade measures is how the SR
stage treats the base model's imperfect 8x8 samples (the compounding error conditioning
augmentation is for, Ho et al. 2021 §4.3). The final evaluation conditions sample i on held-out
test digit i (cycled) and reports digits FD at 8x8 (`digits.to_native`) beside
`sr_consistency_l2` (how far each sample's block mean is from its condition).

16x16 rather than 32x32: at batch 64 one train step of this U-Net costs 0.18 s (5.5 GFLOP) on
2 CPU cores, 3.7x the 8x8 base U-Net's, and at 32x32 (bilinear x4 data) 0.97 s (24.6 GFLOP),
another 5.4x (docs/superres/results.md): 1,500 steps take ~4.5 min at 16x16 on idle cores,
~25 min at 32x32. Measured (docs/superres/results.md): the cascade's FD equals the base's with
or without augmentation at sampling level 0; on this data, where the 16x16 image is a copy of
its condition, higher sampling levels only cost fidelity.

Variants (comma-separated): `noaug` (no conditioning augmentation: the plain SR3 concat
model), `smoke` (seconds, for tests), and any model variant of `configs/digits.py`.
"""

import ml_collections

from configs import digits

OWN_VARIANTS = ('noaug',)


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  variants = [v for v in (variant or '').split(',') if v]
  c = digits.get_config(','.join(['eps'] + [v for v in variants if v not in OWN_VARIANTS]))
  c.data.image_size = 16
  if c.model.name == 'unet':
    c.model.attn_resolutions = ()   # attention only in the middle block, at 8 x 8
  # The condition's time `s` of the augmentation process (alpha = cos(pi s / 2)): training
  # draws s ~ U[0, aug_max] per example; sampling corrupts the condition at sample_aug_level.
  c.superres = dict(factor=2, upsample='nearest', augment='gaussian', aug_max=0.5,
                    sample_aug_level=0.1)
  if 'smoke' not in variants:
    c.train.update(num_steps=1500, batch_size=64, checkpoint_every=500)
  if 'noaug' in variants:
    c.superres.update(augment='none', sample_aug_level=0.0)
  return ml_collections.ConfigDict(c)
