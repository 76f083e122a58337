r"""Encodes a data set into autoencoder latents for latent diffusion (`data.name='latents'`).

With an autoencoder trained here (an `objective.name='autoencoder'` run):
  python -m experiments.encode_latents --config=configs/autoencoder_digits.py \
      --workdir=runs/ae --out=runs/ae/latents
encodes the config's data (`data.*`, every example of its split, in order) with the run's EMA
parameters; the scale factor is measured, 1 / std of the latents.

With Stable Diffusion's VAE from a local `.safetensors` file (diffusers' `vae/` weights or an
original LDM / SD checkpoint; `weights.load_autoencoder_kl`):
  python -m experiments.encode_latents --config=configs/dit.py \
      --config.data.name=imagenet64 --weights=/path/to/vae.safetensors --out=latents/
the scale factor is the published one (0.18215; `--sdxl` for SDXL's VAE, 0.13025) unless
`--measure_scale`; either way the measured one is stored too (`--vae_config=file.json`: another
AutoencoderKL configuration). Then train on them with
`--config.data.name=latents --config.data.path=latents/`.

Batches of `--batch_size` are split over every device; the output is written under a temporary
name and renamed when complete, with `latents.json` (`data/latents.py`).
"""

import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'The config whose data is encoded.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'An autoencoder run\'s work dir (or --weights).')
_WEIGHTS = flags.DEFINE_string('weights', None, 'A Stable Diffusion VAE .safetensors file.')
_SDXL = flags.DEFINE_bool('sdxl', False, 'The weights are SDXL\'s VAE (scale 0.13025).')
_VAE_CONFIG = flags.DEFINE_string('vae_config', None, 'With --weights: a JSON file of '
                                  'AutoencoderKL fields (default: SD_VAE_CONFIG).')
_MEASURE = flags.DEFINE_bool('measure_scale', False, 'With --weights: use 1 / std of the '
                             'latents instead of the published scale factor.')
_OUT = flags.DEFINE_string('out', None, 'The latents directory to write.')
_BATCH = flags.DEFINE_integer('batch_size', 256, 'Images per encoder call.')
flags.mark_flags_as_required(['config', 'out'])


def main(argv):
  if (_WORKDIR.value is None) == (_WEIGHTS.value is None):
    cli.fail('encode_latents: give exactly one of --workdir (an autoencoder run) and --weights '
             '(a Stable Diffusion VAE .safetensors file)')
  if _BATCH.value <= 0:
    cli.fail(f'--batch_size={_BATCH.value}: must be > 0')
  config, out = cli.begin(argv, _CONFIG, _OUT)
  # pylint: disable=g-import-not-at-top
  from diffusion_jax import latent
  from diffusion_jax import latent_pipeline
  from diffusion_jax import run_config
  from diffusion_jax.configuration import ConfigError
  from diffusion_jax.data import latents as latents_lib
  # pylint: enable=g-import-not-at-top
  with cli.user_errors():
    if os.path.exists(os.path.join(out, latents_lib.INFO_NAME)) and _WEIGHTS.value:
      raise ConfigError(f'--out={out} already holds latents; remove it or choose another')
    if _WORKDIR.value:
      if not latent.is_autoencoder_config(config):
        raise ConfigError("--workdir: --config must be the autoencoder run's (objective.name="
                          "'autoencoder'), e.g. configs/autoencoder_digits.py")
      info = latent_pipeline.encode_dataset(config, os.path.abspath(_WORKDIR.value), out,
                                            batch_size=_BATCH.value)
    else:
      info = _encode_with_sd_vae(config, out, run_config, latent, latent_pipeline)
  print(f'Wrote {info["num_examples"]} latents {info["latent_shape"]} to {out} (scale factor '
        f'{info["scale_factor"]:.5f}; measured 1/std {info["measured_scale_factor"]:.5f})',
        flush=True)


def _encode_with_sd_vae(config, out, run_config, latent, latent_pipeline):
  # pylint: disable=g-import-not-at-top
  from diffusion_jax import weights
  from diffusion_jax.configuration import ConfigError
  from diffusion_jax.models import autoencoder
  # pylint: enable=g-import-not-at-top
  data = run_config.build_data(config.data)
  source = run_config.open_source(data)
  vae_config = dict(autoencoder.SD_VAE_CONFIG)
  if _VAE_CONFIG.value:
    try:
      with open(os.path.expanduser(_VAE_CONFIG.value), encoding='utf-8') as f:
        vae_config = json.load(f)
    except (OSError, ValueError) as e:
      raise ConfigError(f'--vae_config={_VAE_CONFIG.value}: cannot read a JSON object ({e})') \
          from None
  if _SDXL.value:
    vae_config['scaling_factor'] = autoencoder.SDXL_SCALING_FACTOR
  try:
    model = autoencoder.AutoencoderKL(**vae_config)
    _ = model.f
  except TypeError as e:
    raise ConfigError(f'--vae_config: {e}') from None
  h, w, c = source.image_shape
  if c != model.in_channels or h % model.f or w % model.f:
    raise ConfigError(f'config.data: the {h}x{w}x{c} images of {data.name!r} do not fit the SD '
                      f'VAE (3 channels, sides divisible by f={model.f})')
  try:
    variables = weights.load_autoencoder_kl(os.path.expanduser(_WEIGHTS.value), vae_config)
  except ValueError as e:
    raise ConfigError(f'--weights: {str(e).splitlines()[0]}') from None

  def encode(x):
    return model.apply(variables, x, method='encode').mean

  return latent_pipeline.encode_source(
      encode, source, (h // model.f, w // model.f, model.latent_channels), out,
      batch_size=_BATCH.value, scale_factor=None if _MEASURE.value else model.scaling_factor,
      info={'autoencoder': {'weights': os.path.abspath(_WEIGHTS.value), 'step': None,
                            'model': vae_config},
            'data': config.data.to_dict(), 'latent': 'posterior mean'})


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
  sys.exit(0)
