"""An autoencoder for latent diffusion on the 32x32 digits: KL-f4 (LDM's KL-VAE) by default.

`--config=configs/autoencoder_digits.py` trains it alone (`python -m experiments.train`);
`configs/latent_digits.py` trains it as the first stage of latent diffusion. Variants:
  ''     KL-VAE, f = 4, 2 latent channels: 32x32x1 digits -> 8x8x2 latents;
  vq     LDM's VQ-reg autoencoder, f = 4, 2-dim codes, 128 EMA codes with dead-code restarts;
  smoke  seconds (for tests).
"""

import ml_collections

from configs import digits
from diffusion_jax.latent import AutoencoderObjective
from diffusion_jax.models.autoencoder import AUTOENCODERS
from diffusion_jax.run_config import EvalConfig
from diffusion_jax.run_config import LogConfig
from diffusion_jax.run_config import ProfileConfig
from diffusion_jax.run_config import TrainConfig
from diffusion_jax.training import OptimConfig

VARIANTS = ('vq', 'smoke')
# 0.24 M parameters; ~3.3 steps/s at batch 32 on 2 CPU cores (600 steps: PSNR 38 dB).
_KL = dict(in_channels=1, out_channels=1, block_out_channels=(16, 32, 32), layers_per_block=1,
           latent_channels=2, norm_num_groups=8, scaling_factor=1.0)
_VQ = dict(in_channels=1, out_channels=1, block_out_channels=(16, 32, 32), layers_per_block=1,
           latent_channels=2, num_codes=128, norm_num_groups=8)


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  variants = digits.parse_variants('configs/autoencoder_digits.py', variant, VARIANTS)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = digits.data_section(name='digits', image_size=32)
  c.profile = digits.typed_section(ProfileConfig, 'profile')
  c.log = digits.typed_section(LogConfig, 'log')
  c.update(stage(vq='vq' in variants))
  if 'smoke' in variants:
    c.model.update(block_out_channels=(8, 16, 16), norm_num_groups=4)
    c.train.update(num_steps=20, batch_size=16, log_every=5, checkpoint_every=10)
    c.optim.warmup_steps = 5
    c.eval.num_samples = 50
  return c


def stage(vq: bool = False) -> dict:
  """The autoencoder run's own sections (objective, model, optim, train, eval): what a latent
  diffusion config holds as `config.latent.autoencoder`."""
  kind = 'vq' if vq else 'kl'
  return dict(
      objective={'name': 'autoencoder',
                 **digits.typed_section(AutoencoderObjective, 'objective')},
      model={'name': kind, **digits.typed_section(AUTOENCODERS[kind], 'model',
                                                  ('parent', 'name'), **(_VQ if vq else _KL))},
      optim=digits.typed_section(OptimConfig, 'optim', lr=1e-3, warmup_steps=100,
                                 schedule='cosine', final_lr_fraction=0.1, grad_clip=1.0),
      train=digits.typed_section(TrainConfig, 'train', num_steps=600, batch_size=32,
                                 ema_decay=0.99, log_every=50, checkpoint_every=200),
      eval=digits.typed_section(EvalConfig, 'eval', num_samples=450, enabled=True),
  )
