"""Default quick-start config: EDM (Karras et al. 2022) on scikit-learn's 8x8 digits.

The default recipe (docs/default_recipe/results.md): EDM's process, preconditioning and loss,
6,000 steps at batch 128, EMA 0.999, sampled with the stochastic DPM-Solver++ (2M SDE; Lu et
al. 2022b) on 100 log-SNR steps.

Variants, comma-separated (`--config=configs/digits.py:smoke,dit`):
  ''         the default, sized to train, sample and evaluate in under 10 minutes on 2 CPU cores;
  eps        the earlier default: DDPM (eps, L_simple; Ho et al. 2020) on the linear 1000-step
             schedule, 3,000 steps, ancestral DDPM on 100 respaced steps (FD 4.36);
  smoke      seconds (for tests);
  ddpmpp     a DDPM++-style U-Net (BigGAN resampling blocks, skip rescale; Song et al. 2021);
  adm        an ADM-style U-Net (adaptive GroupNorm, BigGAN blocks, 8-channel heads);
  dit        a DiT (patch 2 on 8x8, adaLN-Zero; Peebles & Xie 2023);
  mlp        the MLP on flattened 64-pixel digits (a no-convolution baseline);
  cond       class-conditional with 10 % label dropout, sampled with classifier-free guidance.
Override anything from the command line, e.g. `--config.train.num_steps=200`.
"""

import dataclasses
import typing

import ml_collections
from ml_collections import config_dict

from diffusion_jax.data.sources import DataConfig
from diffusion_jax.models import MODELS
from diffusion_jax.run_config import EvalConfig
from diffusion_jax.run_config import LogConfig
from diffusion_jax.run_config import ProfileConfig
from diffusion_jax.run_config import TrainConfig
from diffusion_jax.training import OptimConfig
from diffusion_jax.samplers import SAMPLER_OPTIONS


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # --config.data.image_size=16 repeats each pixel 2 x 2; then also
  # --config.model.attn_resolutions=(8,) (the U-Net's 4 x 4 level is at 8 x 8).
  # --config.data.image_size=32 upsamples bilinearly by 4 (for an f=4 autoencoder's 8 x 8
  # latents).
  c.data = data_section(name='digits')
  # EDM: sigma(t) = 80 t, ln sigma ~ N(-1.2, 1.2^2) in training, preconditioned network.
  c.process = dict(EDM_PROCESS)
  c.objective = dict(name='edm')
  # 177k parameters: ~11 steps/s at batch 128 on 2 CPU cores (experiments/benchmark_unet.py).
  c.model = model_section(**_UNET)
  c.optim = typed_section(OptimConfig, 'optim', lr=2e-3, warmup_steps=100, schedule='cosine',
                          final_lr_fraction=0.1, b1=0.9, b2=0.999, weight_decay=0.0,
                          grad_clip=1.0)
  # 6,000 steps: ~8-9 minutes in all on 2 idle cores (docs/default_recipe/results.md).
  c.train = typed_section(TrainConfig, 'train', num_steps=6000, batch_size=128, ema_decay=0.999,
                          log_every=50, checkpoint_every=500, keep_checkpoints=3)
  # The stochastic DPM-Solver++ (2M SDE), 100 steps (100 NFE): on this small model the
  # stochastic samplers beat the ODE solvers (DPM-Solver++ 2M levels off by 20 NFE).
  # Sampler options left as placeholders take the sampler's defaults; set those the chosen
  # sampler takes, e.g. --config.sample.sampler=heun --config.sample.options.s_churn=10.
  c.sample = dict(sampler='dpm_solver_pp_2m_sde', steps=100, clip_x0=1.0, batch_size=500,
                  grid_size=100,
                  guidance_scale=1.0,
                  options={k: config_dict.placeholder(t) for k, t in SAMPLER_OPTIONS.items()})
  # --config.eval.every=500: FD of eval.every_num_samples samples every 500 steps, and the best
  # step's checkpoint kept in <workdir>/checkpoints_best.
  c.eval = typed_section(EvalConfig, 'eval', num_samples=1000, cache_dir='', enabled=True)
  # --config.log.writers=jsonl,tensorboard --config.log.sample_every=500: TensorBoard scalars
  # and a sample grid (fixed noise) every 500 steps.
  c.log = typed_section(LogConfig, 'log')
  # --config.profile.steps=(100,105): a jax.profiler trace of 5 steps in <workdir>/profile.
  c.profile = typed_section(ProfileConfig, 'profile')

  variants = [v for v in (variant or '').split(',') if v]
  for v in variants:
    if v not in VARIANTS:
      raise ValueError(f'configs/digits.py: unknown variant {v!r}; choose from {list(VARIANTS)}')
  for v in variants:  # model swaps first, so that smoke shrinks whichever model was chosen
    if v in MODEL_VARIANTS:
      c.model = model_section(**MODEL_VARIANTS[v])
  if 'eps' in variants:
    c.process = dict(EPS_PROCESS)
    c.objective = dict(name='ddpm_eps')
    c.train.num_steps = 3000
    # Ancestral DDPM on 100 respaced steps: FD 4.36 vs 5.94 for DDIM-100 on the same model
    # (DDPM's defaults: 'small' variance, 'trailing' spacing).
    c.sample.sampler = 'ddpm'
  if 'cond' in variants:
    c.model.num_classes = 10
    c.model.label_dropout = 0.1
    c.sample.guidance_scale = 2.0
  if 'smoke' in variants:
    if c.model.name == 'unet':
      c.model.ch, c.model.num_groups = 8, 4
      if c.model.get('num_head_channels'):
        c.model.num_head_channels = 4
    elif c.model.name == 'dit':
      c.model.update(hidden_size=32, depth=2, num_heads=2)
    else:
      c.model.hidden = 32
    c.train.update(num_steps=20, batch_size=32, log_every=5, checkpoint_every=10)
    c.sample.update(steps=10, batch_size=100, grid_size=20)
    c.eval.num_samples = 100
  return ml_collections.ConfigDict(c)


def parse_variants(config_file: str, variant: str | None, allowed) -> list[str]:
  """The comma-separated variants of `--config=<config_file>:<variant>`, each checked against
  `allowed` (a one-line error names the file and the choices)."""
  variants = [v for v in (variant or '').split(',') if v]
  for v in variants:
    if v not in allowed:
      raise ValueError(f'{config_file}: unknown variant {v!r}; choose from {list(allowed)}')
  return variants


def typed_section(cls, section: str, skip=(), **values) -> dict:
  """Every key of the typed section `cls` (a dataclass: `DataConfig`, `TrainConfig`,
  `OptimConfig`, `EvalConfig`) at its default, then `values`, so that any of them can be
  overridden from the command line (`--config.train.grad_accum_steps=4`): ml_collections
  refuses a key the config file does not hold."""
  out = {}
  for f in dataclasses.fields(cls):
    if f.default is dataclasses.MISSING or f.name in skip or not f.init:
      continue
    if f.default is None:   # an optional field: a typed placeholder, so it can be set later
      kind = next(a for a in typing.get_args(typing.get_type_hints(cls)[f.name])
                  if a is not type(None))
      out[f.name] = config_dict.placeholder(kind)
    else:
      out[f.name] = f.default
  unknown = set(values) - set(out)
  if unknown:
    raise ValueError(f'{section} section: unknown keys {sorted(unknown)}')
  out.update(values)
  return out


def data_section(**values) -> dict:
  """Every `config.data` key (the fields of `DataConfig`) at its default, then `values`."""
  return typed_section(DataConfig, 'data', **values)


def model_section(name: str, **values) -> dict:
  """`config.model` for the model family `name` (a `MODELS` key): every field of that module
  at its default, then `values` (so `--config.model.num_classes=10` works on any config)."""
  if name not in MODELS:
    raise ValueError(f'model_section: unknown model {name!r}; choose from {sorted(MODELS)}')
  # A Flax module's own `parent` / `name` are not model settings (`name` here is the family).
  return {'name': name, **typed_section(MODELS[name], 'model', ('parent', 'name'), **values)}


EDM_PROCESS = dict(name='edm', sigma_min=0.002, sigma_max=80.0)
EPS_PROCESS = dict(name='vp_discrete', schedule='linear', num_steps=1000)
_UNET = dict(name='unet', ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
             num_heads=1, dropout=0.0, num_groups=8)
# Digits-sized members of each model family (`configs/ddpm_cifar10.py`, `adm_imagenet64.py` and
# `dit.py` hold the published sizes).
MODEL_VARIANTS = {
    'ddpmpp': dict(_UNET, resblock_updown=True, resample_shortcut_conv=True, skip_rescale=True,
                   decoder_attn_per_level=True),
    'adm': dict(_UNET, resblock_updown=True, scale_shift_norm=True, num_head_channels=8,
                num_heads=1),
    'dit': dict(name='dit', patch_size=2, hidden_size=96, depth=4, num_heads=4),
    'mlp': dict(name='mlp', hidden=256, depth=3),
}
VARIANTS = ('smoke', 'cond', 'eps', *MODEL_VARIANTS)
