"""Bad input to library functions and config files: a one-line error naming the argument or key,
never a silent result. The library cases are those of tests/bad_input_check.py (which also runs
every CLI case as a subprocess; docs/bad_inputs.txt); here they run in-process, by default."""

import dataclasses

import ml_collections
import pytest

from configs import ablation_digits
from configs import ablation_toy2d
from configs import adm_imagenet64
from configs import autoencoder_digits
from configs import ddpm_cifar10
from configs import digits as digits_config
from configs import dit as dit_config
from configs import latent_digits
from diffusion_jax import latent
from diffusion_jax import run_config
from diffusion_jax import training
from diffusion_jax.data import sources
from diffusion_jax.models import AUTOENCODERS
from diffusion_jax.models import MODELS

import bad_input_check

LIBRARY = bad_input_check._library_cases()  # pylint: disable=protected-access


@pytest.mark.parametrize('name, thunk, words', LIBRARY, ids=[c[0] for c in LIBRARY])
def test_library_refuses_bad_input_naming_it(name, thunk, words):
  with pytest.raises((ValueError, TypeError)) as e:
    thunk()
  message = str(e.value)
  assert '\n' not in message.strip(), (name, message)
  for word in words:
    assert word.lower() in message.lower(), (name, word, message)


CONFIGS = {
    'digits': digits_config.get_config, 'digits:smoke,mlp': lambda: digits_config.get_config(
        'smoke,mlp'), 'digits:dit': lambda: digits_config.get_config('dit'),
    'ddpm_cifar10': ddpm_cifar10.get_config, 'adm_imagenet64': adm_imagenet64.get_config,
    'dit': dit_config.get_config, 'ablation_digits': ablation_digits.get_config,
    'ablation_toy2d': ablation_toy2d.get_config,
    'autoencoder_digits': autoencoder_digits.get_config,
    'autoencoder_digits:vq': lambda: autoencoder_digits.get_config('vq'),
    'latent_digits': latent_digits.get_config,
}


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_every_typed_key_can_be_overridden_in_every_config(name):
  """ml_collections refuses `--config.<section>.<key>` for a key the file does not hold: every
  field of the data, train, optim and eval sections, and of the configured model, is there
  (e.g. `--config.train.grad_accum_steps=4` and `--config.model.num_classes=10` used to fail as
  unknown keys)."""
  config = CONFIGS[name]()
  stages = [config]
  if 'latent' in config:   # a latent diffusion run's autoencoder stage, too
    stages.append(ml_collections.ConfigDict({'data': config.data, **config.latent.autoencoder}))
  for c in stages:
    sections = {'data': sources.DataConfig, 'train': run_config.TrainConfig,
                'optim': training.OptimConfig, 'eval': run_config.EvalConfig,
                'model': MODELS.get(c.model.name) or AUTOENCODERS[c.model.name]}
    if latent.is_autoencoder_config(c):
      sections['objective'] = latent.AutoencoderObjective
    for section, cls in sections.items():
      fields = {f.name for f in dataclasses.fields(cls) if f.init} - {'parent'}
      if section == 'model':
        fields -= {'name'}
      missing = fields - set(c[section])
      assert not missing, (name, section, sorted(missing))


def test_tfds_data_dir_that_does_not_exist_is_named():
  cfg = sources.DataConfig(name='cifar10', data_dir='/nonexistent/tfds')
  with pytest.raises(ValueError, match=r'^config.data.data_dir=/nonexistent/tfds: no such '):
    sources.make_source(cfg)


@pytest.mark.parametrize('steps', [(5,), (3, 3), (-1, 2), (1, 2, 3)])
def test_profile_window_must_be_start_before_stop(steps):
  with pytest.raises(run_config.ConfigError) as e:
    run_config.build_profile({'steps': steps})
  assert 'config.profile.steps' in str(e.value) and '\n' not in str(e.value)
