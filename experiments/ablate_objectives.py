r"""Compare objectives under equal compute: train each, sample each with every sampler at every
NFE, and write the tables and figures.

  python -m experiments.ablate_objectives --config=configs/ablation_digits.py --workdir=DIR \
      [--config.ablation.objectives=eps,flow] [--config.ablation.seeds=0,1,2] \
      [--config.train.num_steps=1000 ...] [--emit_sweep=sweep.txt]

Every run is an ordinary training run in DIR/runs/<objective>_s<seed> with the base config's
model, data, optimizer, seed and step budget (`ablation_lib.make_runs`). Rerunning skips the
trained runs and the measured (sampler, NFE) cells. `--emit_sweep=FILE` instead writes the runs'
resolved configs and a sweep file for a SLURM job array (`launch/slurm/sweep.sh FILE - DIR/runs`)
and exits; rerun this command afterwards to evaluate and tabulate.
Outputs in DIR: results.csv, results.md, curve.csv, metric_vs_nfe.png, metric_vs_step.png,
loss_vs_logsnr.png, samples.png.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'An ablation config.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The ablation\'s work dir.')
_EMIT = flags.DEFINE_string('emit_sweep', '', 'Write a SLURM sweep file of the runs and exit.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  config, workdir = cli.begin(argv, _CONFIG, _WORKDIR)
  # pylint: disable=g-import-not-at-top
  from experiments import ablation_lib as lib
  from experiments import ablation_report as report
  # pylint: enable=g-import-not-at-top
  with cli.user_errors():
    runs = lib.make_runs(config)
    if _EMIT.value:
      lib.emit_sweep(runs, _EMIT.value, os.path.join(workdir, 'runs'))
      return
    rows, curve, losses = lib.run_ablation(runs, config, workdir,
                                           config.eval.cache_dir or cli.default_cache_dir())
  report.write_all(workdir, runs, rows, curve, losses, lib.metric_name(config))
  print(f'Wrote {workdir}/results.md, results.csv, curve.csv and the figures', flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
  sys.exit(0)
