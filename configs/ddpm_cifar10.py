"""CIFAR-10 U-Nets at their published sizes.

  ''       DDPM (Ho et al. 2020, App. B): 35.7 M parameters; linear betas 1e-4..0.02 over
           T = 1000, L_simple (eps), Adam 2e-4 with 5000 warm-up steps, batch 128, dropout 0.1,
           EMA 0.9999, 800k steps, ancestral sampling with T steps.
  ddpmpp   DDPM++ cont. (VP) (Song et al. 2021, App. H): BigGAN resampling blocks, skip
           rescale, 4 blocks per level: 61.8 M parameters; VP SDE (beta 0.1..20), denoising
           score matching, 1.3M steps, Euler–Maruyama with 1000 steps.

Data: TFDS `cifar10` by index, prepared once with `tfds build cifar10 --file_format=array_record`
(`--config.data.data_dir=...`; a missing dataset is a one-line error saying how to prepare it).
Compute in bfloat16 (`model.dtype`), parameters, optimizer state and EMA in float32: the
mixed precision these U-Nets train in on GPUs and TPUs (`--config.model.dtype=float32` for full
precision). Evaluation (FID) needs reference statistics and the Inception weights, so it is off:
`python -m experiments.fid_stats --config=configs/ddpm_cifar10.py --out=cifar10_train.npz
--inception_weights=fid_inception.npz`, then `--config.eval.enabled=True --config.eval.every=50000
--config.eval.reference_stats=cifar10_train.npz --config.eval.inception_weights=...`. Model,
process, objective and sampler are checked by `tests/test_reference_configs.py`.
"""

import ml_collections

from configs import digits

IMAGE_SHAPE = (32, 32, 3)  # [H, W, C] the model is built for


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  c = digits.get_config()
  c.data = digits.data_section(name='cifar10')
  c.process = dict(name='vp_discrete', schedule='linear', num_steps=1000)
  c.objective = dict(name='ddpm_eps')
  c.model = digits.model_section(name='unet', ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                                 attn_resolutions=(16,), num_heads=1, dropout=0.1, num_groups=32,
                                 dtype='bfloat16')
  c.optim.update(lr=2e-4, warmup_steps=5000, schedule='constant', grad_clip=1.0)
  c.train.update(num_steps=800_000, batch_size=128, ema_decay=0.9999, log_every=100,
                 checkpoint_every=10_000)
  c.sample.update(sampler='ddpm', steps=1000, batch_size=256, grid_size=64)
  c.eval.update(num_samples=50_000, enabled=False)
  if variant == 'ddpmpp':
    c.process = dict(name='vp_linear', beta_min=0.1, beta_max=20.0)
    c.objective = dict(name='dsm')
    c.model.update(num_res_blocks=4, resblock_updown=True, resample_shortcut_conv=True,
                   skip_rescale=True, decoder_attn_per_level=True)
    c.train.num_steps = 1_300_000
    c.sample.update(sampler='euler_maruyama', steps=1000)
  elif variant not in (None, ''):
    raise ValueError(f"configs/ddpm_cifar10.py: unknown variant {variant!r}; use '' or 'ddpmpp'")
  return c
