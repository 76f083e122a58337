"""LoRA on the digits U-Net: a base trained on digits 0-7, adapters fine-tuned to the 8s and 9s.

  python -m experiments.finetune_lora --workdir=runs/lora   # both runs, FD before / after
or the two runs by hand:
  python -m experiments.train --config=configs/lora_digits.py:base --workdir=runs/lora/base
  python -m experiments.train --config=configs/lora_digits.py \
      --config.base.workdir=runs/lora/base --workdir=runs/lora/lora

Variants (comma-separated):
  base   the base run: configs/digits.py's unconditional U-Net on classes 0-7 (1,500 steps);
  ''     the LoRA run on the held-out classes 8-9 (600 steps): `config.base` names the trained
         base run (its EMA parameters are frozen; set `base.workdir`), `config.lora` the
         adapters (`models.lora.LoraConfig`: rank 4 on the attention projections and the
         ResBlocks' 3x3 convs);
  smoke  seconds (for tests), with either.
The in-loop evaluation is off (its FD is against all ten classes); experiments.finetune_lora
measures FD against the test split's 8s and 9s instead.
"""

import ml_collections

from configs import digits

BASE_CLASSES = (0, 1, 2, 3, 4, 5, 6, 7)
HELD_OUT = (8, 9)
# Attention projections (the LoRA default) and the ResBlocks' 3x3 convs.
TARGETS = (r'attn[^/]*/(query|key|value|out)/kernel$', r'res_\d/conv_[01]/kernel$')


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  variants = [v for v in (variant or '').split(',') if v]
  for v in variants:
    if v not in ('base', 'smoke'):
      raise ValueError(f'configs/lora_digits.py: unknown variant {v!r}; choose from '
                       f"['base', 'smoke']")
  smoke = 'smoke' in variants
  c = digits.get_config('eps,smoke' if smoke else 'eps')
  c.eval.enabled = False
  c.sample.grid_size = 0 if smoke else 64
  if 'base' in variants:
    c.data.classes = BASE_CLASSES
    c.train.num_steps = 20 if smoke else 1500
    return c
  c.data.classes = HELD_OUT
  c.base = dict(workdir='', best=False, step=-1)
  c.lora = dict(rank=4, alpha=4.0, targets=TARGETS, convs=True)
  c.train.update(num_steps=10 if smoke else 600, ema_decay=0.995, checkpoint_every=10 if smoke
                 else 600)
  c.optim.update(lr=5e-3, warmup_steps=5 if smoke else 50)
  return c
