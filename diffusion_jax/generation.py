"""Sampling a trained model as the run's config says, sharded over the mesh.

`make_sample_fn(setup)` compiles the configured sampler (with guidance and the right denoiser
for the objective family) whole; `generate` draws N samples batch by batch with each batch's
rows split over the `data` axis. Sample i's prior noise is `normal(fold_in(k_noise, i))`, so the
noise does not depend on the batch size or the device count.
"""

import dataclasses

import jax
import numpy as np

from diffusion_jax import guidance
from diffusion_jax import parallel
from diffusion_jax import parameterization
from diffusion_jax import run_config
from diffusion_jax import samplers
from diffusion_jax.data import derived
from diffusion_jax.run_config import Setup


def make_sample_fn(setup: Setup, *, guidance_scale: float | None = None,
                   negative_prompt: str | None = None):
  """`sample(params, z, key, cond) -> x0` compiled whole, for the configured sampler.

  `z` is standard normal noise; the sampler starts from `x_T = prior_std * z`, the process's
  prior `N(0, prior_std² I)` (1 for VP and the linear interpolant, sigma_max for EDM and VE).
  `cond` is class labels `[B]` for a class-conditional model, prompt token ids `[B, L]`
  (`setup.text.tokens(texts)`) for a text-conditioned one, None for an unconditional one.

  Guidance (`sample.guidance_scale`, or `guidance_scale` here; with `sample.guidance_rescale`
  and `sample.guidance_interval`) has the null label, or for text the encoding of
  `negative_prompt` (default `text.negative_prompt`, '' = the empty prompt), as its
  unconditional branch. Prompts are encoded once per call, before the sampler's loop; every
  step then cross-attends to the same context.
  """
  s = setup.sample
  scale = s.guidance_scale if guidance_scale is None else float(guidance_scale)
  clip = s.clip_x0 if s.clip_x0 > 0 else None
  options = dict(s.options)
  sampler = samplers.SAMPLERS[s.sampler]
  text = setup.text
  negative = None
  if text is not None:
    negative = text.tokens([text.config.negative_prompt if negative_prompt is None
                            else negative_prompt])                    # [1, L]
  interval = tuple(s.guidance_interval) or None

  def guide(den, null_cond):
    return guidance.classifier_free_guidance(
        den, scale, null_cond, rescale=s.guidance_rescale, interval=interval,
        process=setup.process)

  @jax.jit
  def compiled(params, z, key, cond=None):
    x_T = setup.process.prior_std * z
    den = make_model_denoiser(setup, params, clip_x0=clip)
    if text is not None:
      encode = lambda tokens: setup.model.apply({'params': params}, tokens, method='encode')
      cond = encode(cond)                       # once, outside the sampler's loop
      if scale != 1.0:
        den = guide(den, encode(negative))
    elif setup.conditional and scale != 1.0:
      den = guide(den, setup.num_classes)
    prepare = getattr(setup.model, 'prepare_cond', None)
    if prepare is not None:   # once per call: super-resolution's conditioning augmentation
      cond = prepare(cond, jax.random.fold_in(key, 1))
    x0, _ = sampler(den, setup.process, x_T, key, steps=s.steps, cond=cond, **options)
    return x0

  def sample(params, z, key, cond=None):
    if text is not None:
      check_tokens(cond, text.length)
    else:
      check_labels(cond, setup.num_classes)
    return compiled(params, z, key, cond)

  return sample


def check_tokens(tokens, length: int) -> None:
  """A text-conditioned model samples from prompts: token ids `[B, length]`."""
  if tokens is None:
    raise ValueError('this model is text-conditioned (config.text): sampling needs prompts, as '
                     "token ids [B, L] (setup.text.tokens(texts)); '' is the unconditional one")
  if isinstance(tokens, jax.core.Tracer):
    return
  shape = np.shape(tokens)
  if len(shape) != 2 or shape[1] != length:
    raise ValueError(f'prompt tokens must be [B, {length}] (the context length), got {shape}')


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


@dataclasses.dataclass(frozen=True)
class Conditions:
  """What `num` evaluation samples are conditioned on: `cond[i]` goes to sample i (labels
  `[N]`, prompt tokens `[N, L]` or image-derived conditions `[N, ...]`; None if
  unconditional), `labels` the intended classes, for text the `prompts`
  (`text.conditioning.Prompts`: texts and attribute values), and for an image-derived condition
  the held-out `references` it was computed from."""
  cond: np.ndarray | None
  labels: np.ndarray | None
  prompts: object = None
  references: np.ndarray | None = None

  def head(self, n: int) -> 'Conditions':
    """The first `n` samples' conditions."""
    cut = lambda a: None if a is None else a[:n]
    prompts = self.prompts
    if prompts is not None:
      prompts = dataclasses.replace(prompts, texts=prompts.texts[:n], tokens=prompts.tokens[:n],
                                    labels=prompts.labels[:n], attributes=prompts.attributes[:n])
    return Conditions(cut(self.cond), cut(self.labels), prompts, cut(self.references))


def sample_conditions(setup: Setup, num: int) -> Conditions:
  """Sample i's condition: class `i % num_classes`, or for text the i-th evaluation prompt
  (`text.conditioning.prompt_conditions`: class `i % 10`, held-out templates by default), or
  for an image-derived condition that of held-out image `i` (the data's test split, cycled)."""
  condition = getattr(setup, 'condition', None)
  if condition is not None:
    test = run_config.open_source(dataclasses.replace(setup.data, split='test'))
    conds, refs = derived.held_out(condition, test.images, num)
    return Conditions(conds, None, references=refs)
  if setup.text is not None:
    from diffusion_jax.text import conditioning  # pylint: disable=g-import-not-at-top
    prompts = conditioning.prompt_conditions(setup.text, num)
    return Conditions(prompts.tokens, prompts.labels, prompts)
  labels = sample_labels(num, setup.num_classes)
  return Conditions(labels, labels)


def generate_batches(sample_fn, params, key, num: int, batch_size: int, image_shape,
                     labels: np.ndarray | None = None, mesh=None, interrupt=None):
  """Yields `(start, samples)` batches of `num` samples (of classes `labels[i]` if given, or
  any per-sample condition `[num, ...]`, e.g. prompt tokens), as
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
    if labels is not None:    # repeated to fill the batch; the extra rows are dropped
      part = np.asarray(labels[start:start + n])
      part = part.astype(np.int32 if np.issubdtype(part.dtype, np.integer) else np.float32)
      cond = parallel.from_host(part[np.arange(size) % n], rows)
    x = sample_fn(params, prior(idx), jax.random.fold_in(k_sampler, start), cond)
    yield start, parallel.to_host(x)[:n]


def generate(sample_fn, params, key, num: int, batch_size: int, image_shape,
             labels: np.ndarray | None = None, mesh=None, interrupt=None) -> np.ndarray:
  """All of `generate_batches` as one array `[num, ...]`."""
  return np.concatenate([x for _, x in generate_batches(
      sample_fn, params, key, num, batch_size, image_shape, labels, mesh, interrupt)], axis=0)


class Interrupted(RuntimeError):
  """Generation was stopped between batches (e.g. by a preemption signal)."""
