r"""Evaluate a trained run: restore its checkpoint, sample, measure, write eval_<name>.json.

  python -m experiments.evaluate --workdir=runs/digits \
      [--config.sample.sampler=dpm_solver_pp_2m --config.sample.steps=20] \
      [--num_samples=1000] [--params=ema] [--nll_examples=450]

The config is the run's own, `<workdir>/config.json` (`configs/json_config.py`; old ones, with
flat `sample.eta` keys, too), with any overrides on top, sampler options included
(`--config.sample.sampler=ddim --config.sample.options.eta=0.5`); `--config=...` names another
file instead. The newest readable checkpoint of `--workdir` (`--checkpoint=best`: the in-loop
evaluation's best step; `--checkpoint=N`: step N) is restored read-only onto this machine's
devices, whatever topology wrote it. Samples come from the EMA parameters unless `--params=raw`
or `--params=ema_008.npz`, parameters rebuilt by `experiments.posthoc_ema`. Digits runs are
measured in the digits classifier's features against the test digits (FD with its floor, KID,
precision, recall; class accuracy for conditional models) and, with `--nll_examples=N`, by the
NLL of N test digits in bits/dim through the probability-flow ODE. Other data is measured by
FID / IS with the FID InceptionV3: `--inception_weights=fid_inception.npz --reference_stats=ref.npz`
(see docs/fid_inception.md). A latent diffusion run's samples are decoded by its autoencoder
(`<workdir>/autoencoder`, at the step that encoded its latents) before they are measured.
Writes `eval_<sampler>_<steps>[_<tag>].json` and a grid `.png`.
"""

import json
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'The run\'s ml_collections config (default: '
    'configs/json_config.py:<workdir>/config.json, the config the run saved).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The run\'s work dir (its checkpoints/).')
_NUM = flags.DEFINE_integer('num_samples', None, 'Samples to draw (default: eval.num_samples).',
                            lower_bound=1)
_PARAMS = flags.DEFINE_string('params', 'ema', 'Which parameters sample: ema, raw, or an .npz '
                               'of experiments.posthoc_ema (any EMA width, rebuilt).')
_CHECKPOINT = flags.DEFINE_string('checkpoint', 'latest', 'latest, best (the in-loop best of '
                                  'eval.every, checkpoints_best/) or a step number.')
_NLL = flags.DEFINE_integer('nll_examples', 0, 'Held-out examples for the NLL (0: no NLL).',
                            lower_bound=0)
_TAG = flags.DEFINE_string('tag', '', 'Suffix of the output names.')
_SEED = flags.DEFINE_integer('seed', None, 'Seed of the prior noise and the sampler (default: '
                             'the key the training run sampled with, so its EVAL is reproduced).')
_INCEPTION = flags.DEFINE_string('inception_weights', '', 'Converted FID Inception .npz.')
_REFERENCE = flags.DEFINE_string('reference_stats', '', 'FID reference statistics .npz.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  config, workdir = cli.begin(argv, _CONFIG, _WORKDIR)
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  import tqdm
  from diffusion_jax import evaluation
  from diffusion_jax import generation
  from diffusion_jax import images as images_lib
  from diffusion_jax import train_loop
  from diffusion_jax.data import digits
  from diffusion_jax.latent import is_autoencoder_config as latent_config
  from diffusion_jax.metrics import digits_classifier
  from diffusion_jax.metrics import frechet
  from diffusion_jax.metrics import inception
  # pylint: enable=g-import-not-at-top
  is_latent = 'latent' in config      # samples are decoded by its autoencoder before the metrics
  if is_latent and _NLL.value:
    cli.fail('--nll_examples: a latent diffusion run has a likelihood of latents, not of the '
             'images; the held-out NLL is for pixel-space runs')
  if latent_config(config):
    cli.fail('evaluate: an autoencoder run is evaluated by rerunning experiments.train with its '
             'work dir (held-out reconstruction PSNR)')
  is_digits = config.data.name == 'digits'
  if not is_digits and not (_INCEPTION.value and _REFERENCE.value):
    cli.fail(f'config.data.name={config.data.name!r}: FID needs --inception_weights and '
             f'--reference_stats (docs/fid_inception.md)')
  if is_digits and (_INCEPTION.value or _REFERENCE.value):   # they would be ignored
    cli.fail('--inception_weights / --reference_stats are for FID on image data; digits are '
             'measured with the digits classifier (FD), so leave them out')
  if _NLL.value and not is_digits:   # before sampling, not after it
    cli.fail('--nll_examples: the held-out NLL is implemented for digits')
  for flag in (_INCEPTION, _REFERENCE):
    if flag.value and not os.path.isfile(flag.value):
      cli.fail(f'--{flag.name}={flag.value}: no such file')
  which = _CHECKPOINT.value
  if which not in ('latest', 'best') and not which.isdigit():
    cli.fail(f'--checkpoint={which}: expected latest, best or a step number')
  with cli.user_errors():
    setup, state, step = train_loop.load_checkpoint(
        config, workdir, step=int(which) if which.isdigit() else None, best=which == 'best')
    decode = cli.latent_decoder(config, workdir) if is_latent else None
  if _PARAMS.value in ('ema', 'raw'):
    params = state.ema_params if _PARAMS.value == 'ema' else state.params
  else:
    from diffusion_jax import ema as ema_lib  # pylint: disable=g-import-not-at-top
    if not os.path.isfile(_PARAMS.value):
      cli.fail(f'--params={_PARAMS.value}: not ema, raw, or an existing .npz')
    with cli.user_errors():
      params = ema_lib.read_params_like(_PARAMS.value, state.params)
  s = setup.sample
  num = setup.eval.num_samples if _NUM.value is None else _NUM.value
  name = f'{s.sampler}_{s.steps}' + (f'_{_TAG.value}' if _TAG.value else '')
  print(f'Evaluating {workdir} at step {step} ({_PARAMS.value} parameters): {num} samples with '
        f'{s.sampler}, {s.steps} steps', flush=True)

  conditions = generation.sample_conditions(setup, num)
  inception_metrics = None
  if not is_digits:
    try:
      variables = inception.load_inception_params(_INCEPTION.value)
      reference = frechet.load_stats(_REFERENCE.value)
    except ValueError as e:
      cli.fail(str(e))
    inception_metrics = evaluation.InceptionMetrics(variables, reference)
  # The training loop samples with the second half of split(key(config.seed)).
  key = (jax.random.split(jax.random.key(config.seed))[1] if _SEED.value is None
         else jax.random.key(_SEED.value))
  t0 = time.time()
  kept, grid = [], []
  bar = tqdm.tqdm(total=num, desc='sample', unit='img', dynamic_ncols=True, mininterval=1.0)
  for _, x in generation.generate_batches(generation.make_sample_fn(setup), params, key, num,
                                          s.batch_size, setup.image_shape, conditions.cond):
    if decode is not None:
      x = decode(x)
    if inception_metrics is not None:
      inception_metrics.update(x)        # streamed: the samples are not kept
    else:
      kept.append(x)
    if sum(len(g) for g in grid) < s.grid_size:
      grid.append(x[:s.grid_size - sum(len(g) for g in grid)])
    bar.update(len(x))
  bar.close()
  result = {'step': int(step), 'params': _PARAMS.value, 'sampler': s.sampler, 'steps': s.steps,
            'sample_seconds': time.time() - t0}
  if inception_metrics is not None:
    result.update(inception_metrics.result())
  else:
    cls_params, cls_info = digits_classifier.load_or_train_digits_classifier(
        setup.eval.cache_dir or cli.default_cache_dir(), seed=0)
    samples = np.concatenate(kept)
    result.update(evaluation.digits_metrics(cls_params, cls_info, samples, conditions.labels))
    if conditions.prompts is not None:
      result.update(evaluation.text_metrics(
          cls_params, samples, conditions.prompts,
          setup.eval.cache_dir or cli.default_cache_dir(),
          digits_clip_steps=setup.eval.digits_clip_steps))
  if _NLL.value:
    test_x, _ = digits.load_digits('test', setup.image_shape[0])
    t1 = time.time()
    with cli.user_errors():
      result.update(evaluation.heldout_bits_per_dim(
          generation.make_model_denoiser(setup, params), setup.process,
          jax.random.fold_in(key, 1), test_x[:_NLL.value], num_bins=17,
          data_range=(-1.0, 1.125)))
    result['nll_seconds'] = time.time() - t1

  if jax.process_index() == 0:
    with open(os.path.join(workdir, f'eval_{name}.json'), 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=2)
    if grid:
      images_lib.save_png(os.path.join(workdir, f'eval_{name}.png'),
                          images_lib.make_grid(np.concatenate(grid), ncol=10))
    print(format_result(result), flush=True)


def format_result(result: dict) -> str:
  keys = ['fd', 'fd_floor', 'fid', 'inception_score', 'kid', 'kid_floor', 'precision',
          'precision_floor', 'recall', 'recall_floor', 'class_accuracy', 'attribute_accuracy',
          'joint_accuracy', 'clip_score', 'clip_score_real', 'bits_per_dim']
  parts = [f'{k}={result[k]:.4g}' for k in keys if k in result]
  return f'EVAL step={result["step"]} {result["sampler"]}/{result["steps"]}: ' + ' '.join(parts)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_with_run_config)
  sys.exit(0)
