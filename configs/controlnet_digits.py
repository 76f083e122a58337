"""ControlNet on the digits U-Net: edge-map control of a trained, frozen unconditional base.

  python -m experiments.train --config=configs/digits.py --workdir=runs/digits
  python -m experiments.train --config=configs/controlnet_digits.py \
      --config.base.workdir=runs/digits --workdir=runs/controlnet
  python -m experiments.controlnet_strength --workdir=runs/controlnet_strength   # all, measured

`config.base` names the trained run (`configs/digits.py`, same model / process / objective);
its EMA parameters are the frozen base, and the ControlNet's trainable copy of its encoder and
middle block starts from them (`models.controlnet`). `config.control` (`ControlConfig`): the
operator that computes each training image's control map (`data.control`: 'edges', Sobel edges
binarised at half contrast, or 'ink'), the widths of the condition encoder, and the control
strength used when sampling (training always uses 1). The final evaluation conditions sample i
on held-out test digit i's map (cycled) and reports digits FD beside the control fidelity
(`control_iou`, `control_l1`: the operator applied to the samples against their maps).

Variants (comma-separated): `smoke` (seconds, for tests); `ink` (ink-mask control).
"""

import ml_collections
from ml_collections import config_dict

from configs import digits

OWN_VARIANTS = ('smoke', 'ink')


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  variants = digits.parse_variants('configs/controlnet_digits.py', variant, OWN_VARIANTS)
  smoke = 'smoke' in variants
  # The base's own config (smoke: the smoke U-Net), so model / process / objective match it.
  c = digits.get_config('eps,smoke' if smoke else 'eps')
  c.base = dict(workdir='', best=False, step=-1)
  c.control = dict(operator='ink' if 'ink' in variants else 'edges',
                   threshold=config_dict.placeholder(float), hint_channels=(16, 16),
                   strength=1.0)
  if smoke:
    c.train.update(num_steps=10, checkpoint_every=10)
    c.control.hint_channels = (4,)
  else:
    # Measured on the shared 2-core machine under load: 808 s (1.86 steps/s; the digits base
    # trained at 3.94 steps/s under similar load, so a ControlNet step costs ~2 base steps:
    # the base forward, the copy, and the backward through the base's decoder and the copy).
    # docs/controlnet/results.md: control IoU 0.84 at strength 1 (0.44 uncontrolled).
    c.train.update(num_steps=1500, batch_size=128, ema_decay=0.995, checkpoint_every=500)
    c.optim.update(lr=1e-3, warmup_steps=50)
  return c
