"""Shared test set-up: a persistent compilation cache keeps repeated compiles cheap."""

import os

import jax

jax.config.update('jax_compilation_cache_dir',
                  os.environ.get('JAX_COMPILATION_CACHE_DIR',
                                 os.path.join(os.path.dirname(__file__), '..', '.jax_cache')))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
