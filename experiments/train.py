r"""Train, sample and evaluate a diffusion model: the main entry point.

  python -m experiments.train --config=configs/digits.py --workdir=runs/digits \
      [--config.train.num_steps=200 ...]

Re-running with the same --workdir resumes from its latest readable checkpoint (the config must
be that of its config.json, but for train.num_steps, sample.* and eval.*; one run per work dir).

Several processes (one per host, or per GPU) run the same command; `launch/multiprocess.sh`
passes --coordinator_address / --num_processes / --process_id, and under SLURM (`srun`) they
are read from SLURM's variables. Exit status: 0 done, 2 a user error (one line), 3 training
diverged (non-finite updates), 74 a checkpoint could not be written (disk full; the earlier
ones are kept), 75 preempted after saving a checkpoint (SIGTERM, SIGUSR1 or Ctrl-C; requeue to
resume), 130 a second Ctrl-C (exit at once) or a Ctrl-C before training started.
"""

import os
import sys

# Before jax is imported: keep TensorFlow (pulled in by tfds) off any GPU, and quiet its logs.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Path to an ml_collections config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and samples.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for a multi-process run.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, in [0, num_processes).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  config, workdir = cli.begin(argv, _CONFIG, _WORKDIR)
  cli.start_processes(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from diffusion_jax import train_loop  # pylint: disable=g-import-not-at-top
  if not config.eval.cache_dir:
    with config.unlocked():
      config.eval.cache_dir = cli.default_cache_dir()
  with cli.user_errors():
    result = train_loop.train_and_evaluate(config, workdir)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    print(train_loop.format_eval_line(result), flush=True)
  logging.flush()


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
  sys.exit(0)
