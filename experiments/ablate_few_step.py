r"""Few-step generation compared at NFE 1, 2, 4, 8: distillations from one shared teacher and
one-step models from data, at equal student compute (issue 22).

  python -m experiments.ablate_few_step --config=configs/ablation_few_step.py --workdir=DIR \
      [--config.ablation.methods=cd,ct] [--config.ablation.seeds=0,1,2] [--report_only]

DIR/runs/teacher is the shared teacher (an ordinary training run of the base config); each
method and seed is DIR/runs/<method>_s<seed> (progressive distillation: one run per round,
`<method>_s<seed>_r<k>`, each the teacher of the next). Every run is an ordinary training run
(checkpoints, exact resume), so a killed sweep resumes: rerunning skips the trained runs and
the measured cells. Outputs in DIR: results.csv, results.md (metric / floor, mean ± std over
seeds, per method and NFE, beside the teacher), metric_vs_nfe.png. `--report_only` tabulates
what is already measured (e.g. while another seed still trains) and trains nothing.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A few-step ablation config.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The ablation\'s work dir.')
_REPORT_ONLY = flags.DEFINE_bool('report_only', False, 'Train and measure nothing: tabulate '
                                 'the runs and cells already measured.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  config, workdir = cli.begin(argv, _CONFIG, _WORKDIR)
  from experiments import few_step_lib as lib  # pylint: disable=g-import-not-at-top
  with cli.user_errors():
    plan = lib.make_plan(config, workdir)
    rows = lib.run_plan(plan, config, config.eval.cache_dir or cli.default_cache_dir(),
                        report_only=_REPORT_ONLY.value)
  lib.write_report(workdir, rows, config)
  print(f'Wrote {workdir}/results.md, results.csv and metric_vs_nfe.png', flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
  sys.exit(0)
