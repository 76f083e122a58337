"""Sampling a trained model as the run's config says, sharded over the mesh.

`make_sample_fn(setup)` compiles the configured sampler (with guidance and the right denoiser
for the objective family) whole; `generate` draws N samples batch by batch with each batch's
rows split over the `data` axis. Sample i's prior noise is `normal(fold_in(k_noise, i))`, so the
noise does not depend on the batch size or the device count.
"""

import jax
import numpy as np

from diffusion_jax import guidance
from diffusion_jax import parallel
from diffusion_jax import parameterization
from diffusion_jax import samplers
from diffusion_jax.run_config import Setup


def make_sample_fn(setup: Setup):
  """`sample(params, z, key, cond) -> x0` compiled whole, for the configured sampler.

  `z` is standard normal noise; the sampler starts from `x_T = prior_std * z`, the process's
  prior `N(0, prior_std² I)` (1 for VP and the linear interpolant, sigma_max for EDM and VE).
  """
  s = setup.sample
  clip = s.clip_x0 if s.clip_x0 > 0 else None
  options = dict(s.options)
  sampler = samplers.SAMPLERS[s.sampler]

  @jax.jit
  def compiled(params, z, key, cond=None):
    x_T = setup.process.prior_std * z
    den = make_model_denoiser(setup, params, clip_x0=clip)
    if setup.conditional and s.guidance_scale != 1.0:
      den = guidance.classifier_free_guidance(den, s.guidance_scale, null_cond=setup.num_classes)
    x0, _ = sampler(den, setup.process, x_T, key, steps=s.steps, cond=cond, **options)
    return x0

  def sample(params, z, key, cond=None):
    check_labels(cond, setup.num_classes)
    return compiled(params, z, key, cond)

  return sample


def check_labels(labels, num_classes: int) -> None:
  """Refuses class labels outside `[0, num_classes]` (`num_classes` is the null class): an
  embedding lookup out of range returns NaN, which would come back as NaN samples."""
  if labels is None or num_classes == 0 or isinstance(labels, jax.core.Tracer):
    return
  values = np.asarray(labels)
  if values.size and (values.min() < 0 or values.max() > num_classes):
    raise ValueError(f'class labels must lie in [0, {num_classes - 1}] (or {num_classes}, the '
                     f'null class); got min {values.min()}, max {values.max()}')


def make_model_denoiser(setup: Setup, params, clip_x0: float | None = None):
  """The denoiser of the run's network at `params`, built from the run's `Objective` (so its
  prediction kind, `sigma_data` and learned variance are the ones training used)."""
  def model_fn(x, t, c):
    return setup.model.apply({'params': params}, x, t, c)
  return parameterization.make_denoiser(model_fn, setup.process, setup.objective, clip_x0)


def sample_labels(num: int, num_classes: int) -> np.ndarray | None:
  """The class of generated sample i, `i % num_classes` (None for an unconditional model)."""
  return np.arange(num) % num_classes if num_classes > 0 else None


def generate_batches(sample_fn, params, key, num: int, batch_size: int, image_shape,
                     labels: np.ndarray | None = None, mesh=None, interrupt=None):
  """Yields `(start, samples)` batches of `num` samples (of classes `labels[i]` if given), as
  numpy on every process, so N samples never need to sit in memory at once.

  Sample i's prior noise (standard normal; `sample_fn` scales it to the prior) derives from
  `fold_in(key, i)`; the sampler's own key is folded with the batch's first index. With a
  `mesh`, each batch (rounded up to a multiple of the device count; the extra rows are
  dropped) is split over its `data` axis. `interrupt()` is called between batches; if it
  returns true, generation stops with `Interrupted`.
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  rows = parallel.batch_sharding(mesh)
  width = mesh.devices.size
  batch_size = -(-batch_size // width) * width
  k_noise, k_sampler = jax.random.split(key)
  prior = jax.jit(jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(k_noise, i),
                                                       tuple(image_shape))),
                  out_shardings=rows)
  for start in range(0, num, batch_size):
    if interrupt is not None and interrupt():
      raise Interrupted(f'sampling interrupted after {start} of {num} samples')
    n = min(batch_size, num - start)
    size = -(-n // width) * width
    idx = parallel.from_host(np.arange(start, start + size, dtype=np.int32), rows)
    cond = None
    if labels is not None:
      padded = np.resize(np.asarray(labels[start:start + n], np.int32), size)
      cond = parallel.from_host(padded, rows)
    x = sample_fn(params, prior(idx), jax.random.fold_in(k_sampler, start), cond)
    yield start, parallel.to_host(x)[:n]


def generate(sample_fn, params, key, num: int, batch_size: int, image_shape,
             labels: np.ndarray | None = None, mesh=None, interrupt=None) -> np.ndarray:
  """All of `generate_batches` as one array `[num, ...]`."""
  return np.concatenate([x for _, x in generate_batches(
      sample_fn, params, key, num, batch_size, image_shape, labels, mesh, interrupt)], axis=0)


class Interrupted(RuntimeError):
  """Generation was stopped between batches (e.g. by a preemption signal)."""
