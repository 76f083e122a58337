"""Runs short training jobs through the real loop on this process's devices (a subprocess of
`test_sharded_training.py`, which fixes the device count with XLA_FLAGS before JAX starts).

  python tests/sharded_runs.py ROOT JOB [JOB ...]

JOB is `train:NAME:MODE` (train NAME from scratch; MODE = replicated | fsdp | accum),
`continue:NAME` (resume NAME's work dir to the end), `dump:NAME` (restore NAME's newest
checkpoint here and save its parameters to ROOT/NAME.<devices>.npz) or `sample:NAME` (draw 10
DDIM samples in batches of 4, which 8 devices pad to 8, to ROOT/NAME.samples.<devices>.npy).
"""

import json
import os
import sys

import jax
import numpy as np

from configs import digits as digits_config
from diffusion_jax import generation
from diffusion_jax import train_loop

NUM_STEPS = 4


def config(mode: str):
  c = digits_config.get_config('eps,smoke,mlp')   # few ops: compiles in about a second
  c.train.update(num_steps=NUM_STEPS, batch_size=16, checkpoint_every=NUM_STEPS // 2,
                 log_every=2,
                 keep_checkpoints=5)
  if mode == 'fsdp':
    # Shard every leaf of 64+ elements, so that the tiny model's kernels are all split.
    c.train.update(param_sharding='fsdp', fsdp_min_size=64)
  elif mode == 'accum':
    c.train.grad_accum_steps = 2
  c.optim.update(warmup_steps=2)
  c.eval.enabled = False
  c.sample.grid_size = 0
  return c


def main(root, jobs):
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  devices = jax.device_count()
  for job in jobs:
    kind, name, *rest = job.split(':')
    workdir = os.path.join(root, name)
    if kind == 'train':
      train_loop.train_and_evaluate(config(rest[0]), workdir)
    elif kind in ('continue', 'dump', 'sample'):
      with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
        import ml_collections  # pylint: disable=g-import-not-at-top
        cfg = ml_collections.ConfigDict(json.load(f))
      if kind == 'continue':
        train_loop.train_and_evaluate(cfg, workdir)
        continue
      if kind == 'sample':
        cfg.sample.update(sampler='ddim', steps=5)
      setup, state, step = train_loop.load_checkpoint(cfg, workdir)
      if kind == 'sample':
        x = generation.generate(generation.make_sample_fn(setup), state.ema_params,
                                jax.random.key(7), 10, 4, setup.image_shape)
        np.save(os.path.join(root, f'{name}.samples.{devices}.npy'), x)
        continue
      leaves, _ = jax.tree_util.tree_flatten_with_path(state.params)
      arrays = {jax.tree_util.keystr(k): np.asarray(jax.device_get(v)) for k, v in leaves}
      sharded = sum(any(p is not None for p in v.sharding.spec) for _, v in leaves)
      np.savez(os.path.join(root, f'{name}.{devices}.npz'), **arrays)
      print(f'DUMP {name} step={step} devices={devices} sharded_leaves={sharded}', flush=True)
    else:
      raise ValueError(f'unknown job {job!r}')


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2:])
