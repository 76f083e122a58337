"""Progressive training on the 16x16 digits: 8x8 first, then 16x16 (`diffusion_jax.progressive`).

Variants, comma-separated (`--config=configs/progressive_digits.py:fixed`):
  ''       progressive: the data average-pooled to 8x8 (the native digits) for the first
           `PROGRESSIVE_8` steps, then 16x16 for `PROGRESSIVE_16`;
  fixed    the equal-compute baseline: 16x16 throughout, `FIXED_16` steps;
  constant a constant learning rate after the warm-up (the default decays it by a cosine over
           each arm's own length, so the progressive arm's 16x16 stage runs at its tail);
  smoke    seconds (tests): a ch-8 U-Net, a few steps on each side of the switch.
Both arms: the quick-start digits U-Net (ch 16, ch_mult (1, 2)) with attention in the middle
block only (it runs at the lowest level whatever the input size; attention by size, the digits
config's (4,), would sit at different levels at 8x8 and 16x16), DDPM eps / L_simple,
batch 64, the same EMA (a 4 kimg half-life), ancestral DDPM with 100 steps, FD at 16x16 mapped
back to 8x8.

Equal compute: an 8x8 step costs `1 / STEP_FLOP_RATIO` of a 16x16 one (XLA's count of the
compiled train step, experiments/ablate_progressive.py); the progressive arm spends half the
fixed arm's FLOPs at 8x8. By default each arm's learning rate decays over its own length (the
progressive arm's is longer); `constant` keeps it flat. Sampling and evaluation are the same for
both. Results: docs/progressive/results.md.
"""

import ml_collections

from configs import digits

# FLOPs of one train step at 16x16 over one at 8x8 (XLA's count of the compiled step at batch
# 64: 5.506 / 1.216 GFLOP; `experiments.ablate_progressive --probe_only` prints it): 4 x the
# positions, and the middle block's attention over 64 positions instead of 16.
STEP_FLOP_RATIO = 4.528
FIXED_16 = 800
PROGRESSIVE_16 = FIXED_16 // 2
PROGRESSIVE_8 = int(round((FIXED_16 - PROGRESSIVE_16) * STEP_FLOP_RATIO))
VARIANTS = ('fixed', 'constant', 'smoke')


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  variants = digits.parse_variants('configs/progressive_digits.py', variant, VARIANTS)
  c = digits.get_config('eps,smoke' if 'smoke' in variants else 'eps')
  c.data.image_size = 16
  c.model.attn_resolutions = ()
  # The same EMA for both arms, a half-life in images (62 steps at batch 64): the default
  # decay's warm-up (1 + n) / (10 + n) would average over ~10 % of each arm's own length.
  c.train.update(batch_size=64, ema_halflife_kimg=4.0)
  if 'smoke' in variants:
    switch, steps = 3, 6
    c.train.update(batch_size=16, log_every=1, checkpoint_every=1, keep_checkpoints=10)
  elif 'fixed' in variants:
    switch, steps = None, FIXED_16
  else:
    switch, steps = PROGRESSIVE_8, PROGRESSIVE_8 + PROGRESSIVE_16
  c.train.num_steps = steps
  c.train.resolution_schedule = () if switch is None or 'fixed' in variants else (
      (0, 8), (switch, 16))
  if 'constant' in variants:
    c.optim.schedule = 'constant'
  return c
