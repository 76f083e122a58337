"""The objective ablation of `ablation_digits.py` on a 2-D mixture of 8 Gaussians.

`python -m experiments.ablate_objectives --config=configs/ablation_toy2d.py --workdir=DIR`.
The same six objectives train the same MLP (3 x 128) for 3,000 steps at batch 512 on fresh
points keyed by (seed, step); quality is the sliced Wasserstein distance (512 projections)
between 5,000 samples and 5,000 exact draws, beside the floor of one exact draw against another.
A few minutes on 2 CPU cores.
"""

import ml_collections

from configs import ablation_digits
from configs import digits


def get_config() -> ml_collections.ConfigDict:
  c = digits.get_config('eps')
  c.data = digits.data_section(name='toy2d', toy='eight_gaussians')
  c.model = digits.model_section(name='mlp', hidden=128, depth=3)
  c.train.update(num_steps=3000, batch_size=512, log_every=250, checkpoint_every=500)
  # Points are not images: no clipping of x0_hat to [-1, 1].
  c.sample.update(clip_x0=0.0, batch_size=5000, grid_size=2000)
  c.eval.num_samples = 5000
  c.ablation = ablation_digits.get_config().ablation
  c.ablation.num_samples = 5000
  return c
