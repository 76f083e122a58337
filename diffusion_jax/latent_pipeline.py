"""Latent diffusion as three resumable stages of one run (Rombach et al. 2022).

A config with a `latent` section (`configs/latent_digits.py`) is a latent diffusion run;
`train_loop.train_and_evaluate` hands it here. In its work dir W:

  1. autoencoder  `W/autoencoder/`: the config's `data` and `seed` with the sections of
                  `latent.autoencoder` (objective 'autoencoder', an `AUTOENCODERS` model,
                  optim, train, eval) trained by the same loop: checkpoints, resume,
                  metrics.jsonl, eval.json with the held-out reconstruction PSNR.
  2. encode       `W/latents/` (`data/latents.py`): every training example encoded by the
                  autoencoder's EMA parameters, streamed in batches split over the mesh, with
                  the scale factor 1 / std of the latents and the autoencoder's step.
  3. diffusion    W itself: the config's process, objective, model, sampler on the scaled
                  latents; samples are decoded (`decode(z / scale)`) before `samples.png` and the
                  evaluation, so FD is measured on images, in the pixel data's feature space.

Each stage is skipped when done (a finished autoencoder is restored, existing latents are
reused if the same autoencoder step made them), so rerunning the command resumes wherever it
stopped. The diffusion stage's `sample.clip_x0` must be 0: latents are not bounded to [-1, 1].
"""

import json
import os

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tqdm

from diffusion_jax import latent
from diffusion_jax import parallel
from diffusion_jax import run_config
from diffusion_jax import train_loop
from diffusion_jax import workdir as workdir_lib
from diffusion_jax.configuration import ConfigError
from diffusion_jax.data import latents as latents_lib

LATENT_KEYS = ('autoencoder', 'encode_batch_size')
AUTOENCODER_DIR = 'autoencoder'
LATENTS_DIR = 'latents'


def autoencoder_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The first stage's run config: `seed` and `data` of `config`, then `latent.autoencoder`."""
  section = config.latent
  for k in section:
    if k not in LATENT_KEYS:
      raise ConfigError(f'config.latent.{k}: unknown key; valid keys are {list(LATENT_KEYS)}')
  stage = section.get('autoencoder')
  if not isinstance(stage, ml_collections.ConfigDict):
    raise ConfigError('config.latent.autoencoder: expected the autoencoder run\'s sections '
                      '(objective, model, optim, train, eval)')
  out = ml_collections.ConfigDict({'seed': config.seed, 'data': config.data.to_dict()})
  for k, v in stage.items():
    if k in ('seed', 'data'):
      raise ConfigError(f'config.latent.autoencoder.{k}: the autoencoder uses the run\'s own '
                        f'config.{k}')
    out[k] = v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v
  if 'log' in config and 'log' not in out:    # the run's writers log the first stage too
    out['log'] = config.log.to_dict()
  if not latent.is_autoencoder_config(out):
    raise ConfigError(f"config.latent.autoencoder.objective.name must be '{latent.OBJECTIVE}'")
  return out


def _check(config) -> None:
  batch = config.latent.get('encode_batch_size', 256)
  if not isinstance(batch, int) or batch <= 0:
    raise ConfigError(f'config.latent.encode_batch_size={batch!r}: expected a positive int')
  clip = config.sample.get('clip_x0', 0.0)
  if clip:
    raise ConfigError(f'config.sample.clip_x0={clip}: latents are not bounded to [-1, 1]; set '
                      f'--config.sample.clip_x0=0 for latent diffusion')


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The three stages in `workdir`; returns the diffusion stage's evaluation (with the
  autoencoder's reconstruction numbers under `autoencoder/`)."""
  workdir = train_loop.prepare_workdir(workdir)
  _check(config)
  ae_config = autoencoder_config(config)
  # The whole run's config first: a changed diffusion section fails now, not after stage 2.
  workdir_lib.check_config(config, workdir, run_config.section_defaults(config.model.get('name')))
  ae_dir = os.path.join(workdir, AUTOENCODER_DIR)
  is_main = jax.process_index() == 0
  if is_main:
    print(f'Stage 1/3: autoencoder in {ae_dir}', flush=True)
  ae_result = train_loop.train_and_evaluate(ae_config, ae_dir)
  if is_main:
    print(train_loop.format_eval_line(ae_result), flush=True)
    print(f'Stage 2/3: latents in {os.path.join(workdir, LATENTS_DIR)}', flush=True)
  latents_dir = os.path.join(workdir, LATENTS_DIR)
  info = encode_dataset(ae_config, ae_dir, latents_dir,
                        batch_size=config.latent.get('encode_batch_size', 256))
  if is_main:
    print(f'Stage 3/3: latent diffusion on {info["num_examples"]} latents '
          f'{info["latent_shape"]}, scale factor {info["scale_factor"]:.4f}', flush=True)
  source, info = latents_lib.load_latents(latents_dir)
  decode = latent_decoder(ae_config, ae_dir, info)
  result = train_loop.train_and_evaluate(config, workdir, source=source, decode=decode)
  result.update({f'autoencoder/{k}': v for k, v in ae_result.items()
                 if k.startswith('reconstruction') or k == 'num_params'})
  result['scale_factor'] = info['scale_factor']
  return result


def latent_decoder(ae_config, ae_dir: str, info: dict):
  """`decode(scaled latents) -> images` with the autoencoder that made the latents."""
  setup, state, step = train_loop.load_checkpoint(ae_config, ae_dir)
  if step != info['autoencoder'].get('step'):
    raise ConfigError(f'the latents were encoded by the autoencoder at step '
                      f'{info["autoencoder"].get("step")}, but {ae_dir} holds step {step}; '
                      f'remove the latents directory to re-encode')
  decode = latent.decoder(setup, state.ema_params, state.model_state)
  scale = float(info['scale_factor'])
  return lambda z: decode(z / scale)


def encode_dataset(ae_config, ae_dir: str, out_dir: str, *, batch_size: int = 256,
                   mesh=None) -> dict:
  """Encodes every example of the autoencoder's training data with the EMA parameters of the
  autoencoder run in `ae_dir` into `out_dir` (`encode_source`), the scale factor measured.
  Latents already there from the same autoencoder step are kept; from another step, a
  `ConfigError` (nothing is overwritten)."""
  mesh = parallel.make_mesh() if mesh is None else mesh
  setup, state, step = train_loop.load_checkpoint(ae_config, ae_dir, mesh=mesh)
  made_by = {'workdir': os.path.abspath(ae_dir), 'step': int(step),
             'model': ae_config.model.to_dict()}
  if os.path.exists(os.path.join(out_dir, latents_lib.INFO_NAME)):
    info = latents_lib.read_info(out_dir)
    old = info.get('autoencoder', {})
    if (old.get('step'), old.get('model')) != (made_by['step'], json.loads(json.dumps(
        made_by['model']))):
      raise ConfigError(f'latents {out_dir} were encoded by another autoencoder (step '
                        f'{old.get("step")}); this one is at step {step}: remove {out_dir} to '
                        f're-encode, or use a new work dir')
    return info
  return encode_source(
      latent.encoder(setup, state.ema_params, state.model_state), setup.source,
      setup.latent_shape, out_dir, batch_size=batch_size, mesh=mesh,
      info={'autoencoder': made_by, 'data': ae_config.data.to_dict(),
            'latent': 'posterior mean' if setup.kind == 'kl' else 'encoder output (unquantized)'})


def encode_source(encode, source, latent_shape, out_dir: str, *, batch_size: int = 256,
                  mesh=None, scale_factor: float | None = None, info: dict | None = None) -> dict:
  """`encode(images) -> latents` over every example of `source` (in order), streamed in batches
  of `batch_size` split over `mesh`'s `data` axis, into `out_dir` (`data/latents.py`'s layout).
  `scale_factor` None measures 1 / std of all latent elements (float64 sums); `info` is stored
  beside it. Returns the `latents.json` written (by process 0)."""
  mesh = parallel.make_mesh() if mesh is None else mesh
  n = len(source)
  shape = tuple(latent_shape)
  os.makedirs(out_dir, exist_ok=True)
  is_main = jax.process_index() == 0
  # Written to a temporary name and renamed when complete: a killed encode leaves no latents.
  tmp = os.path.join(out_dir, f'.{latents_lib.LATENTS_NAME}.partial.npy')
  out = np.lib.format.open_memmap(tmp, mode='w+', dtype=np.float32, shape=(n,) + shape) \
      if is_main else None
  labels = []
  total = total_sq = 0.0
  for start in tqdm.trange(0, n, batch_size, desc='encode', unit='batch', disable=not is_main):
    batch = source.examples(np.arange(start, min(start + batch_size, n)))
    z = parallel.map_batches(encode, batch['image'], batch_size, mesh)
    if z.shape[1:] != shape:
      raise ValueError(f'encode_source: the encoder gave latents {z.shape[1:]}, not {shape}')
    total += float(np.sum(z, dtype=np.float64))
    total_sq += float(np.sum(np.square(z, dtype=np.float64)))
    if out is not None:
      out[start:start + len(z)] = z
    if 'label' in batch:
      labels.append(batch['label'])
  measured = latent.measure_scale_factor(n * int(np.prod(shape)), total, total_sq)
  info = {'scale_factor': measured if scale_factor is None else float(scale_factor),
          'measured_scale_factor': measured, 'latent_shape': list(shape), 'num_examples': n,
          'num_classes': int(getattr(source, 'num_classes', 0) or 0), **(info or {})}
  if is_main:
    out.flush()
    del out
    os.replace(tmp, os.path.join(out_dir, latents_lib.LATENTS_NAME))
    if labels:
      np.save(os.path.join(out_dir, latents_lib.LABELS_NAME),
              np.concatenate(labels).astype(np.int32))
    latents_lib.write_info(out_dir, info)
  if jax.process_count() > 1:   # the others read what process 0 wrote
    multihost_utils.sync_global_devices('latents written')
  return info
