"""Launch scripts: every one parses (`bash -n`), and the SLURM ones print, in dry-run mode,
the exact `srun` / `sbatch` commands they would run (no cluster here)."""

import glob
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, 'launch', '**', '*.sh'), recursive=True)
                 + glob.glob(os.path.join(ROOT, 'launch', '**', '*.sbatch'), recursive=True))


def _bash(*args, **env):
  return subprocess.run(['bash', *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                        env=dict(os.environ, **env))


def test_there_are_launch_scripts():
  names = {os.path.relpath(p, ROOT) for p in SCRIPTS}
  assert {'launch/local.sh', 'launch/multiprocess.sh', 'launch/slurm/train.sbatch',
          'launch/slurm/sweep.sh'} <= names


@pytest.mark.parametrize('script', SCRIPTS, ids=[os.path.relpath(p, ROOT) for p in SCRIPTS])
def test_script_parses(script):
  done = _bash('-n', script)
  assert done.returncode == 0, done.stderr


def test_sbatch_dry_run_prints_the_srun_command_and_the_requeue_rule(tmp_path):
  done = _bash('launch/slurm/train.sbatch', 'configs/digits.py', str(tmp_path / 'run'),
               '--config.train.num_steps=10', DRY_RUN='1', SLURM_JOB_ID='4242',
               SLURM_SUBMIT_DIR=ROOT, PYTHON='python3')
  assert done.returncode == 0, done.stderr
  srun, requeue = [ln.strip() for ln in done.stdout.strip().splitlines()]
  assert srun.split() == ['srun', '--kill-on-bad-exit=1', '--cpu-bind=none', 'python3', '-m',
                          'experiments.train', '--config=configs/digits.py',
                          f'--workdir={tmp_path / "run"}', '--config.train.num_steps=10']
  assert requeue == '# exit 75 (preempted, checkpoint saved) -> scontrol requeue 4242'
  assert not (tmp_path / 'run').exists()   # a dry run makes nothing


def test_sbatch_header_asks_for_requeue_and_the_pre_timeout_signal():
  with open(os.path.join(ROOT, 'launch', 'slurm', 'train.sbatch'), encoding='utf-8') as f:
    header = [ln.strip() for ln in f if ln.startswith('#SBATCH')]
  assert '#SBATCH --requeue' in header and '#SBATCH --signal=USR1@180' in header
  # The signal the script's processes take as "save and exit 75" (diffusion_jax.preemption).
  from diffusion_jax import preemption  # pylint: disable=g-import-not-at-top
  import signal  # pylint: disable=g-import-not-at-top
  assert signal.SIGUSR1 in preemption.SIGNALS and preemption.EXIT_CODE == 75


def test_sweep_dry_run_makes_one_array_task_per_run(tmp_path):
  sweep = tmp_path / 'objectives.txt'
  sweep.write_text('# objective sweep\n'
                   'eps  --config.objective.name=ddpm_eps\n\n'
                   'flow --config.objective.name=flow_matching --config.process.name=linear\n')
  done = _bash('launch/slurm/sweep.sh', str(sweep), 'configs/digits.py', 'runs/abl',
               '--time=2:00:00', DRY_RUN='1', PYTHON='python3')
  assert done.returncode == 0, done.stderr
  sbatch, task0, task1 = [ln.strip() for ln in done.stdout.strip().splitlines()]
  assert sbatch.startswith('sbatch --array=0-1 --job-name=sweep-objectives ')
  assert '--time=2:00:00 launch/slurm/train.sbatch configs/digits.py runs/abl' in sbatch
  assert task0.endswith('--workdir=runs/abl/eps --config.objective.name=ddpm_eps')
  assert task1.endswith('--workdir=runs/abl/flow --config.objective.name=flow_matching '
                        '--config.process.name=linear')


@pytest.mark.parametrize('content, expected', [
    ('', 'lists no runs'),
    ('a --config.seed=1\na --config.seed=2\n', 'repeats run names: a'),
])
def test_sweep_rejects_bad_files(tmp_path, content, expected):
  sweep = tmp_path / 's.txt'
  sweep.write_text(content)
  done = _bash('launch/slurm/sweep.sh', str(sweep), 'configs/digits.py', 'runs/x', DRY_RUN='1')
  assert done.returncode == 2 and expected in done.stderr


def test_multiprocess_rejects_a_bad_process_count():
  done = _bash('launch/multiprocess.sh', 'two', 'configs/digits.py', '/tmp/x')
  assert done.returncode == 2 and 'N=two is not a positive integer' in done.stderr
