"""The README's library example runs as printed (so the README stays true to the API)."""

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
