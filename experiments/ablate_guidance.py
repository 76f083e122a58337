r"""Classifier-free guidance sweep on a class- or text-conditioned model: FD and the
classifier's accuracy on the intended class against the guidance scale (the fidelity-diversity
trade-off); for text, also the digits-CLIP score and the attribute accuracy of the prompts.

  python -m experiments.ablate_guidance --config=configs/digits.py:cond --workdir=runs/cond \
      [--scales=0,1,1.5,2,3,4,6] [--num_samples=1000] [--config.sample.sampler=...]
  python -m experiments.ablate_guidance --config=configs/tiny_sd.py --workdir=runs/tiny_sd

A text-conditioned model samples the evaluation prompts (held-out caption templates, prompt i
of class i mod 10); scale 0 is its unconditional branch, the empty prompt.

Trains the model first if the work dir holds no finished run (an ordinary `experiments.train`
run). Scale 1 is the conditional model, 0 the unconditional one (the null label), > 1 guides
(Ho & Salimans 2022 with w = scale - 1; 2 NFE per step). Every scale samples the same prior
noise and labels (sample i has class i mod 10). Cells are cached in the work dir as
`eval_guidance_<scale>.json`; writes `guidance.md`, `.csv` and `.png` there.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A class-conditional config.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The run\'s work dir.')
_SCALES = flags.DEFINE_string('scales', '0,1,1.5,2,3,4,6', 'Guidance scales, comma-separated.')
_NUM = flags.DEFINE_integer('num_samples', 1000, 'Samples per scale.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  config, workdir = cli.begin(argv, _CONFIG, _WORKDIR)
  # pylint: disable=g-import-not-at-top
  import ml_collections
  from diffusion_jax import run_config
  from diffusion_jax import train_loop
  from experiments import ablation_lib as lib
  from experiments import ablation_report as report
  # pylint: enable=g-import-not-at-top
  cache_dir = config.eval.cache_dir or cli.default_cache_dir()
  with cli.user_errors():
    scales = lib.split_list(_SCALES.value, 'scales', float)
    text = 'text' in config
    if not text and run_config.build(config).num_classes == 0:
      cli.fail('ablate_guidance needs a class-conditional model (config.model.num_classes), '
               'e.g. --config=configs/digits.py:cond, or a text-conditioned one (config.text), '
               'e.g. --config=configs/tiny_sd.py')
    if not lib.is_trained(workdir, config):
      train_loop.train_and_evaluate(config, workdir)
    final = lib.latest_step(workdir)
    s = config.sample
    rows = []
    progress = lib.SweepProgress(len(scales) * lib.sample_units(2 * s.steps, _NUM.value, config),
                                 f'guidance ({len(scales)} scales)')
    for scale in scales:
      cfg = ml_collections.ConfigDict(config.to_dict())
      cfg.sample.guidance_scale = scale
      result = lib.cached(os.path.join(workdir, f'eval_guidance_{scale:g}.json'), final,
                          lambda: lib.measure(workdir, cfg, s.sampler, s.steps, _NUM.value,
                                              cache_dir, keep_options=True))
      rows.append({'scale': scale, **result})
      progress.done(lib.sample_units(result['nfe'], _NUM.value, config), f'scale {scale:g}')
    progress.close()
  lib.write_csv(os.path.join(workdir, 'guidance.csv'), rows)
  with open(os.path.join(workdir, 'guidance.md'), 'w', encoding='utf-8') as f:
    f.write(text_guidance_table(rows, s.sampler, s.steps) if text
            else guidance_table(rows, s.sampler, s.steps))
  if text:
    report.text_guidance_figure(rows, os.path.join(workdir, 'guidance.png'))
  else:
    report.guidance_figure(rows, os.path.join(workdir, 'guidance.png'))
  print(f'Wrote {workdir}/guidance.md, .csv and .png', flush=True)


def guidance_table(rows, sampler, steps) -> str:
  lines = [f'Guidance sweep ({sampler}, {steps} steps; FD vs the test digits, class accuracy of '
           f'the digits classifier on the intended labels)', '',
           '| scale | NFE | FD | precision | recall | class accuracy |',
           '|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["scale"]:g} | {r["nfe"]} | {r["fd"]:.3g} | {r["precision"]:.3f} | '
                 f'{r["recall"]:.3f} | {r["class_accuracy"]:.4f} |')
  lines += ['', f'Floor (real training digits): FD {rows[0]["fd_floor"]:.3g}, precision '
            f'{rows[0]["precision_floor"]:.3f}, recall {rows[0]["recall_floor"]:.3f}.']
  return '\n'.join(lines) + '\n'


def text_guidance_table(rows, sampler, steps) -> str:
  lines = [f'Guidance sweep on text prompts ({sampler}, {steps} steps; held-out caption '
           f'templates; scale 0 is the empty prompt). FD vs the test digits; class and '
           f'attribute accuracy measured on the samples; digits-CLIP score = mean '
           f'100 max(cos, 0)', '',
           '| scale | NFE | FD | CLIP score | class accuracy | attribute accuracy | '
           'class + attributes | recall |',
           '|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["scale"]:g} | {r["nfe"]} | {r["fd"]:.3g} | {r["clip_score"]:.2f} | '
                 f'{r["class_accuracy"]:.3f} | {r["attribute_accuracy"]:.3f} | '
                 f'{r["joint_accuracy"]:.3f} | {r["recall"]:.3f} |')
  lines += ['', f'Floors (real digits): FD {rows[0]["fd_floor"]:.3g} (training vs test digits); '
            f'CLIP score {rows[0]["clip_score_real"]:.2f} (test digits with their held-out-'
            f'template captions; the digits-CLIP retrieves the right caption for '
            f'{rows[0]["clip_retrieval_accuracy"]:.1%} of them).']
  return '\n'.join(lines) + '\n'


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
  sys.exit(0)
