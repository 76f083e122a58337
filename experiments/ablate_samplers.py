r"""Every sampler at every NFE on one trained model: a table and a metric-vs-NFE figure.

  python -m experiments.ablate_samplers --config=configs/digits.py --workdir=runs/digits \
      [--samplers=euler,heun,dpm_solver_pp_2m] [--nfes=5,10,20,50] [--num_samples=1000]

`--config` is the run's config; its newest checkpoint is restored read-only and sampled from
the EMA parameters, each (sampler, NFE) from the same prior noise (the key the run samples
with). A sampler's steps are the most whose exact NFE fits the budget; samplers that do not
apply to the run's process or prediction kind (DDPM / DDIM on a continuous process,
consistency sampling of a diffusion model) are skipped, and `adaptive` (no fixed NFE) is not
in the default list. Cells are cached as `eval_<sampler>_nfe<N>.json` in the work dir (shared
with `ablate_objectives`). Writes `sampler_ablation.md`, `.csv` and `.png` there.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'The run\'s config.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The trained run\'s work dir.')
_SAMPLERS = flags.DEFINE_string('samplers', '', 'Comma-separated (default: every fixed-NFE one).')
_NFES = flags.DEFINE_string('nfes', '5,10,20,50', 'NFE budgets, comma-separated.')
_NUM = flags.DEFINE_integer('num_samples', 1000, 'Samples per cell.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  config, workdir = cli.begin(argv, _CONFIG, _WORKDIR)
  # pylint: disable=g-import-not-at-top
  from diffusion_jax import samplers
  from diffusion_jax import run_config
  from experiments import ablation_lib as lib
  from experiments import ablation_report as report
  # pylint: enable=g-import-not-at-top
  cache_dir = config.eval.cache_dir or cli.default_cache_dir()
  with cli.user_errors():
    names = (lib.split_list(_SAMPLERS.value, 'samplers') if _SAMPLERS.value
             else [s for s in samplers.SAMPLERS
                   if s != 'adaptive' and s not in samplers.FLOW_MAP_SAMPLERS])
    nfes = lib.split_list(_NFES.value, 'nfes', int)
    setup = run_config.build(config)
    cells = [(s, n, *lib.steps_for_nfe(s, setup, n)) for s in names for n in nfes
             if s in samplers.SAMPLERS]
    is_cm = setup.objective.kind == 'consistency'
    cells = [c for c in cells if c[2] and (c[0] == 'consistency') == is_cm]
    if not cells:
      cli.fail(f'no sampler of {names} applies to this run at NFE {nfes}')
    progress = lib.SweepProgress(sum(lib.sample_units(e, _NUM.value, config) for *_, e in cells),
                                 f'samplers ({len(cells)} cells)')
    rows = []
    final = lib.latest_step(workdir)
    for sampler, nfe, steps, exact in cells:
      result = lib.cached(os.path.join(workdir, f'eval_{sampler}_nfe{nfe}.json'), final,
                          lambda: lib.measure(workdir, config, sampler, steps, _NUM.value,
                                              cache_dir))
      rows.append({'sampler': sampler, 'nfe_budget': nfe, **result})
      progress.done(lib.sample_units(exact, _NUM.value, config), f'{sampler}@{exact}')
    progress.close()
  metric = lib.metric_name(config)
  lib.write_csv(os.path.join(workdir, 'sampler_ablation.csv'), rows)
  with open(os.path.join(workdir, 'sampler_ablation.md'), 'w', encoding='utf-8') as f:
    f.write(report.pivot(rows, 'sampler', 'nfe_budget', metric,
                         title=f'{report.LABELS.get(metric, metric)} by sampler and NFE budget '
                               f'(cell: value, exact NFE)', show='nfe'))
  report.metric_vs_nfe([dict(r, objective=r['sampler'], sampler='all samplers') for r in rows],
                       metric, os.path.join(workdir, 'sampler_ablation.png'))
  print(f'Wrote {workdir}/sampler_ablation.md, .csv and .png', flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
  sys.exit(0)
