"""WaveGrad (Chen et al. 2021) on the embedded synthetic speech-like audio: a vocoder that turns
a log-mel spectrogram into a waveform.

  python -m experiments.train --config=configs/wavegrad_synth.py --workdir=runs/wavegrad
  python -m experiments.audio_iterations --workdir=runs/wavegrad      # quality vs iterations

Data: `synth_audio` (`diffusion_jax/data/audio.py`), 0.512 s clips at 8 kHz (`[4096, 1]`)
rendered by a formant synthesizer, no download. Condition: the clip's log-mel spectrogram
(`config.mel`: 256-point frames, hop 64, 40 mel bands: 64 frames per clip), which the network
upsamples by its factors (4, 4, 2, 2) = the hop. Process and objective as the paper's: DDPM's
eps-prediction on a 1000-step linear beta schedule from 1e-6 to 0.01, with the network
conditioned on the continuous noise level sqrt(abar) = alpha(t) (the `mel` builder hands it
`process.alpha`). Sampling: the paper's 50-iteration schedule (linear betas 1e-4 to 0.05) as an
explicit grid, DDPM's ancestral step between its levels (`audio.schedules`). The final
evaluation conditions sample i on held-out clip i's spectrogram and reports LSD, MCD and
MR-STFT distance against the clip beside the real-data floor, and writes WAV files and
spectrograms of 8 samples to `<workdir>/audio/`.

Variants (comma-separated): `v` (v-prediction instead of eps), `smoke` (seconds, for tests).
"""

import ml_collections
from ml_collections import config_dict

from configs import digits
from diffusion_jax import processes
from diffusion_jax.audio import features
from diffusion_jax.audio import schedules
from diffusion_jax.models import MODELS
from diffusion_jax.samplers import SAMPLER_OPTIONS

VARIANTS = ('v', 'smoke')
PROCESS = dict(name='vp_discrete', schedule='linear', num_steps=schedules.TRAIN_BETAS[2],
               beta_start=schedules.TRAIN_BETAS[0], beta_end=schedules.TRAIN_BETAS[1])


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  variants = digits.parse_variants('configs/wavegrad_synth.py', variant, VARIANTS)
  c = digits.get_config()
  c.data = digits.data_section(name='synth_audio', sample_rate=8000)
  c.process = dict(PROCESS)
  c.objective = dict(name='v_prediction' if 'v' in variants else 'ddpm_eps')
  c.mel = digits.typed_section(features.MelConfig, 'mel', sample_rate=8000, n_fft=256, hop=64,
                               n_mels=40)
  c.model = {'name': 'wavegrad',
             **digits.typed_section(MODELS['wavegrad'], 'model',
                                    ('parent', 'name', 'noise_level'), factors=(4, 4, 2, 2),
                                    n_mels=40)}
  c.optim.update(lr=1e-3, warmup_steps=100, schedule='cosine', final_lr_fraction=0.1,
                 grad_clip=1.0)
  c.train.update(num_steps=2200, batch_size=16, ema_decay=0.999, log_every=50,
                 checkpoint_every=500)
  times = schedules.times(processes.make_process(**PROCESS),
                          schedules.linear_betas(*schedules.WAVEGRAD_50))
  options = {k: config_dict.placeholder(t) for k, t in SAMPLER_OPTIONS.items()
             if k not in ('grid', 'order')}
  c.sample = dict(sampler=schedules.SAMPLER, steps=len(times), clip_x0=1.0, batch_size=64,
                  grid_size=8, guidance_scale=1.0,
                  options=dict(options, grid=times, **schedules.SAMPLER_OPTIONS))
  c.eval.update(num_samples=128)
  if 'smoke' in variants:
    c.model.update(upsample_channels=(8, 8, 8, 8), downsample_channels=(8, 8, 8),
                   first_channels=8, mel_channels=8)
    c.train.update(num_steps=4, batch_size=4, log_every=2, checkpoint_every=2)
    c.sample.update(batch_size=4, grid_size=2)
    c.eval.num_samples = 4
  return ml_collections.ConfigDict(c)
