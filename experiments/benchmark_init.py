r"""Compile time of model `init` on this machine: original (N-D) vs flat random draws.

  python -m experiments.benchmark_init [--models=digits:smoke,digits,digits:dit,digits:mlp] \
      [--repeats=1] [--opt_level=-1]

For each model (a config of `configs/`, `name[:variant]`), the seconds of
`jax.jit(model.init).lower(key, x, t).compile()` on a `[1, 8, 8, 1]` batch, with every
initializer drawing on the parameter's own shape as `jax.nn.initializers` / Flax do
(`initializers.reference_draws()`, the code before the flat draws) and drawing flat
(`diffusion_jax.models.initializers`, the default). Both programs are then run and their
parameters checked bit-identical. The persistent compilation cache is disabled and every
compile is of a freshly traced function, so the times are cold; `--repeats` > 1 reports the
minimum. Prints a Markdown table.
"""

import contextlib
import importlib
import platform
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import run_config
from diffusion_jax.models import initializers

DEFAULT_MODELS = ('digits:smoke', 'digits', 'digits:dit', 'digits:mlp')

_MODELS = flags.DEFINE_list('models', list(DEFAULT_MODELS), 'configs/<name>[:variant] list.')
_REPEATS = flags.DEFINE_integer('repeats', 1, 'Compiles per model and mode (the minimum).')
_OPT_LEVEL = flags.DEFINE_integer('opt_level', -1, 'xla_backend_optimization_level '
                                  '(-1: XLA\'s default).')


def load_model(spec: str):
  name, _, variant = spec.partition(':')
  module = importlib.import_module(f'configs.{name}')
  config = module.get_config(variant) if variant else module.get_config()
  return run_config.build_model(config.model)


def compile_init(model, args, *, reference: bool, options):
  """(seconds to lower and compile `init`, the compiled executable), traced afresh."""
  init = jax.jit(lambda key, x, t: model.init(key, x, t), compiler_options=options)
  with initializers.reference_draws() if reference else contextlib.nullcontext():
    start = time.perf_counter()
    compiled = init.lower(*args).compile()
    return time.perf_counter() - start, compiled


def main(argv):
  del argv
  jax.config.update('jax_enable_compilation_cache', False)
  options = None if _OPT_LEVEL.value < 0 else {
      'xla_backend_optimization_level': _OPT_LEVEL.value}
  args = (jax.random.key(0), jnp.zeros((1, 8, 8, 1), jnp.float32), jnp.zeros((1,), jnp.float32))
  print(f'# model init compile time, {platform.processor() or platform.machine()}, '
        f'{jax.device_count()} x {jax.devices()[0].platform}, jax {jax.__version__}, '
        f'threefry_partitionable={jax.config.jax_threefry_partitionable}, '
        f'opt level {"default" if options is None else _OPT_LEVEL.value}')
  print('| model | params | original draws (s) | flat draws (s) | speed-up | bit-identical |')
  print('|---|---:|---:|---:|---:|---|')
  for spec in _MODELS.value:
    model = load_model(spec)
    times, params = {}, {}
    for reference in (True, False):
      best = float('inf')
      for _ in range(_REPEATS.value):
        seconds, compiled = compile_init(model, args, reference=reference, options=options)
        best = min(best, seconds)
      times[reference], params[reference] = best, compiled(*args)
    same = jax.tree.structure(params[True]) == jax.tree.structure(params[False]) and all(
        np.asarray(a).tobytes() == np.asarray(b).tobytes()
        for a, b in zip(jax.tree.leaves(params[True]), jax.tree.leaves(params[False]),
                        strict=True))
    count = sum(leaf.size for leaf in jax.tree.leaves(params[False]))
    print(f'| {spec} | {count:,} | {times[True]:.2f} | {times[False]:.2f} | '
          f'{times[True] / times[False]:.1f}x | {"yes" if same else "NO"} |', flush=True)


if __name__ == '__main__':
  app.run(main)
