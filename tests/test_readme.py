"""The README's library example runs as printed (so the README stays true to the API)."""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'README.md')


def test_library_example_runs():
  text = open(README, encoding='utf-8').read()
  block = re.search(r'As a library.*?```python\n(.*?)```', text, re.S).group(1)
  x0 = jax.random.normal(jax.random.key(0), (4, 3))
  # A stand-in eps network: the example only needs model_fn(x_t, t, cond) -> eps.
  env = {'model_fn': lambda x, t, cond: 0.1 * x, 'x0': x0, 'key': jax.random.key(1)}
  exec(compile(block, 'README.md', 'exec'), env)   # pylint: disable=exec-used
  assert env['info']['nfe'] == 50
  assert env['x0_hat'].shape == x0.shape and bool(jnp.all(jnp.isfinite(env['x0_hat'])))
  assert np.isfinite(float(env['loss']))


def test_sd_vae_example_runs_on_the_tiny_fixture():
  """The README's SD-VAE snippet, with the committed tiny diffusers fixture standing in for the
  real weights (same code path: loader, encode, scale, decode)."""
  text = open(README, encoding='utf-8').read()
  block = re.search(r'Pretrained Stable Diffusion VAE.*?```python\n(.*?)```', text, re.S).group(1)
  fixture = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'sd_vae')
  with open(os.path.join(fixture, 'config.json'), encoding='utf-8') as f:
    tiny = dict(json.load(f), scaling_factor=0.18215)
  assert "'sd-vae-ft-mse/diffusion_pytorch_model.safetensors'" in block
  block = block.replace("'sd-vae-ft-mse/diffusion_pytorch_model.safetensors'",
                        repr(os.path.join(fixture, 'diffusers.safetensors')))
  block = block.replace('from diffusion_jax.models import AutoencoderKL, SD_VAE_CONFIG',
                        'from diffusion_jax.models import AutoencoderKL')
  images = jnp.tanh(jax.random.normal(jax.random.key(0), (2, 16, 16, 3)))
  env = {'SD_VAE_CONFIG': tiny, 'images': images}
  exec(compile(block, 'README.md', 'exec'), env)   # pylint: disable=exec-used
  assert env['z'].shape == (2, 4, 4, 4) and env['x'].shape == images.shape   # f = 4 here
  assert bool(jnp.all(jnp.isfinite(env['x'])))
