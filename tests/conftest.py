"""Shared test set-up: persistent caches keep repeated compiles (and the digits classifier)
cheap.

* In-process tests compile into `.jax_cache/` (or `$JAX_COMPILATION_CACHE_DIR`).
* Tests that start `experiments.*` in subprocesses pass `subprocess_cache` as their
  `DIFFUSION_JAX_CACHE`: one directory for the whole run and both xdist workers, so the digits
  classifier is trained once and a config's train step compiles once, whichever test file
  starts it first. Cache files are written atomically (temp file + rename), so concurrent
  writers are safe; the entries are keyed by content, so sharing cannot change a result.
"""

import os

# The suite compiles hundreds of small XLA programs and runs each a few times: compile time, not
# run time, dominates it. LLVM at optimisation level 0 compiles CPU programs ~25 % faster
# (tests/test_samplers_dpm, test_objectives, test_guidance, test_elbo: 94 -> 71 s cold). The
# numbers differ from -O2 only by rounding (e.g. FMA contraction), inside every tolerance here.
# Set before jax starts its backend; subprocesses inherit it unless they set XLA_FLAGS
# themselves. `XLA_FLAGS=--xla_backend_optimization_level=2 pytest` restores the default.
if '--xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_backend_optimization_level=0').strip()

import jax  # noqa: E402
import pytest  # noqa: E402

_ROOT_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '.jax_cache')

jax.config.update('jax_compilation_cache_dir',
                  os.environ.get('JAX_COMPILATION_CACHE_DIR', _ROOT_CACHE))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


@pytest.fixture(scope='session')
def subprocess_cache():
  path = os.path.abspath(os.environ.get('DIFFUSION_JAX_TEST_CACHE',
                                        os.path.join(_ROOT_CACHE, 'subprocess')))
  os.makedirs(path, exist_ok=True)
  return path


# `make test` runs each file whole on one of two workers (`--dist loadfile`), handing files out
# in collection order. The longest files go first, so that the run does not end with one worker
# idle while the other is still in a minute-long file collected late (alphabetically).
_LONGEST_FIRST = ('test_cli.py', 'test_reliability.py', 'test_samplers_all.py',
                  'test_sharded_training.py', 'test_samplers_sde.py', 'test_objectives.py',
                  'test_text_conditioning.py', 'test_samplers_dpm.py', 'test_processes.py',
                  'test_multiprocess.py', 'test_digits_classifier.py', 'test_likelihood.py',
                  'test_reference_configs.py', 'test_unet.py', 'test_samplers.py',
                  'test_elbo.py', 'test_consistency.py', 'test_grids.py', 'test_latent.py',
                  'test_inpainting.py', 'test_dit.py', 'test_samplers_ode.py',
                  'test_unet_variants.py', 'test_reference_updates.py', 'test_inception.py',
                  'test_audio_run.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  # A stable sort: each file's tests keep their order, and so do the other files.
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))
