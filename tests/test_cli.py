"""The real CLI end to end: a short run, resume, and one-line errors for user mistakes."""

import hashlib
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import digits as digits_config
from diffusion_jax import ema as ema_lib
from diffusion_jax import run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = 'configs/digits.py:smoke'
# The finished run (and the evaluation of it) uses the MLP: the CLI's outputs do not depend on
# the network, and the U-Net's compile would cost a minute of CI; test_train_loop_models
# trains and samples every model family. It is the DDPM eps setup (the `eps` variant), the
# setup of the old-style config.json (OLD_CONFIG_JSON) that must still evaluate it; the default
# (EDM) runs through the CLI in test_reliability and test_multiprocess.
RUN = 'configs/digits.py:smoke,mlp,eps'
PROFILE = '--config.profile.steps=(2,5)'    # a 3-step jax.profiler trace of the finished run
# The research cockpit on the finished run: TensorBoard and (offline) W&B beside the JSONL, a
# sample grid every 5 steps, an in-loop FD of 100 samples every 10 steps and the best checkpoint;
# EDM's EMA half-life with ramp-up, and EDM2's post-hoc EMA profiles saved every 10 steps.
COCKPIT = ('--config.log.writers=jsonl,tensorboard,wandb', '--config.log.sample_every=5',
           '--config.eval.every=10', '--config.eval.every_num_samples=100',
           '--config.train.ema_halflife_kimg=0.5', '--config.train.ema_rampup_ratio=0.05',
           '--config.train.posthoc_sigma_rels=(0.05,0.1)', '--config.train.posthoc_every=10')


@pytest.fixture(scope='module')
def cache_dir(subprocess_cache):
  """The test run's classifier / XLA cache (conftest): the classifier is trained once."""
  return subprocess_cache


def _train(workdir, *overrides, cache_dir, config=SMOKE):
  env = dict(os.environ, DIFFUSION_JAX_CACHE=cache_dir, PYTHONUNBUFFERED='1')
  cmd = [sys.executable, '-m', 'experiments.train', f'--config={config}', f'--workdir={workdir}',
         *overrides]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _error_line(proc):
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(lines) == 1, proc.stderr[-2000:]   # one line, no traceback wall
  assert lines[0].startswith('error: ')
  return lines[0]


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory, cache_dir):
  workdir = tmp_path_factory.mktemp('run')
  proc = _train(workdir, PROFILE, *COCKPIT, cache_dir=cache_dir, config=RUN)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_short_run_leaves_all_outputs(finished_run):
  workdir, proc = finished_run
  for name in ('config.json', 'metrics.jsonl', 'samples.png', 'eval.json', 'checkpoints'):
    assert os.path.exists(workdir / name), name
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['10', '20']
  config = json.loads((workdir / 'config.json').read_text())
  assert config['train']['num_steps'] == 20 and config['objective']['name'] == 'ddpm_eps'
  records = [json.loads(ln) for ln in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records if 'loss' in r] == [5, 10, 15, 20]
  assert all(r['loss'] == r['loss'] for r in records if 'loss' in r)  # finite, not NaN
  # steps_per_sec is each interval's own rate: the intervals' times (steps / rate) add up to no
  # more than the whole training time the run printed (a stale tqdm rate of 0.016 would not).
  trained = float(re.search(r'Trained steps 0\.\.20 in ([0-9.]+) s', proc.stdout).group(1))
  rates = [r['steps_per_sec'] for r in records if 'steps_per_sec' in r]
  assert len(rates) == 4 and all(r > 0 for r in rates)
  assert sum(5 / r for r in rates) <= trained + 0.1, (rates, trained)
  # Examples/s is steps/s times the global batch (32); the learning rate is that of the last
  # update of each interval, in optax's linear warm-up from 0 over 100 updates to 2e-3:
  # lr = 2e-3 * count / 100, count = the updates applied before it (4 at step 5).
  for r in records:
    if 'loss' in r:
      assert r['examples_per_sec'] == pytest.approx(32 * r['steps_per_sec'], rel=1e-12)
      assert r['lr'] == pytest.approx(2e-3 * (r['step'] - 1) / 100, rel=1e-6), r
  result = json.loads((workdir / 'eval.json').read_text())
  assert result['fd'] > 0 and result['fd_floor'] > 0 and result['num_generated'] == 100
  last = proc.stdout.strip().splitlines()[-1]
  assert last.startswith('EVAL step=20: FD=') and 'floor=' in last
  assert 'step/s' in proc.stderr  # the progress bar reports speed
  # The smoke config warms up for 100 steps of a 20-step run: allowed, but said.
  assert ('Note: optim.warmup_steps=100 > train.num_steps=20: the learning rate peaks at '
          '0.0004, 20% of optim.lr') in proc.stdout, proc.stdout
  # run.json: one record of this start, with the command line, the code version this checkout
  # is at (the suite runs in a git clone), the installed JAX and the devices.
  record = json.loads((workdir / 'run.json').read_text())[0]   # this start's
  assert record['argv'][1:] == [f'--config={RUN}', f'--workdir={workdir}', PROFILE, *COCKPIT]
  head = subprocess.run(['git', '-C', ROOT, 'rev-parse', 'HEAD'], capture_output=True,
                        text=True, check=False).stdout.strip()
  if head:
    assert record['git']['commit'] == head and isinstance(record['git']['dirty'], bool)
  assert record['packages']['jax'] == jax.__version__
  assert record['devices']['platform'] == 'cpu' and record['devices']['process_count'] == 1
  # The profiler window: one TensorBoard-readable trace (plugins/profile/<time>/<host>.xplane.pb).
  traces = list((workdir / 'profile' / 'plugins' / 'profile').glob('*/*.xplane.pb'))
  assert len(traces) == 1 and traces[0].stat().st_size > 0, traces
  assert json.loads((workdir / 'config.json').read_text())['profile']['steps'] == [2, 5]


def _tensorboard_events(directory):
  """`[(step, tag, value)]` of every summary value in the event files under `directory`, read
  from the TFRecord framing (u64 length, u32 CRC, payload, u32 CRC) with tensorboardX's protos:
  scalars as floats, images as decoded uint8 arrays."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out = []
  for path in sorted(directory.glob('events.out.tfevents.*')):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        if v.HasField('image'):
          out.append((event.step, v.tag, np.asarray(Image.open(io.BytesIO(
              v.image.encoded_image_string)))))
        else:
          out.append((event.step, v.tag, v.simple_value))
  return out


def test_writers_grids_in_loop_evaluation_and_best_checkpoint(finished_run):
  workdir, proc = finished_run
  records = [json.loads(ln) for ln in (workdir / 'metrics.jsonl').read_text().splitlines()]
  events = _tensorboard_events(workdir / 'tensorboard')
  scalars = {(step, tag): v for step, tag, v in events if not isinstance(v, np.ndarray)}
  # Every JSONL scalar of the training intervals is in the event file, at its step (float32).
  for r in records:
    if 'loss' in r:
      for tag in ('loss', 'lr', 'grad_norm', 'skipped', 'steps_per_sec', 'examples_per_sec'):
        assert scalars[(r['step'], tag)] == pytest.approx(r[tag], rel=1e-6), (r['step'], tag)
  # Two in-loop FD evaluations (steps 10 and 20, 100 samples each) in both writers.
  evals = {r['step']: r for r in records if 'in_loop/fd' in r}
  assert sorted(evals) == [10, 20]
  for step, r in evals.items():
    assert r['in_loop/num_generated'] == 100 and r['in_loop/fd'] > 0 and r['in_loop/fd_floor'] > 0
    assert scalars[(step, 'in_loop/fd')] == pytest.approx(r['in_loop/fd'], rel=1e-6)
  # The best checkpoint is the step with the lower FD (orbax best_fn keeps one).
  best = min(evals, key=lambda s: evals[s]['in_loop/fd'])
  assert os.listdir(workdir / 'checkpoints_best') == [str(best)]
  assert json.loads((workdir / 'eval.json').read_text())['best_step'] == best
  # Four sample grids (steps 5, 10, 15, 20): PNG files, and the same pixels in TensorBoard.
  images = [(step, v) for step, tag, v in events if tag == 'samples']
  assert [s for s, _ in images] == [5, 10, 15, 20]
  for step, image in images:
    png = np.asarray(Image.open(workdir / 'grids' / f'step_{step:07d}.png'))   # grey
    grey = image if image.ndim == 2 else image[..., 0]   # TensorBoard may store it as RGB
    np.testing.assert_array_equal(grey, png)
    if image.ndim == 3:
      assert (image[..., :3] == grey[..., None]).all()
  # 36 digits of 8x8 (upscaled x4, 1-pixel borders) in a 6 x 6 grid.
  assert images[0][1].shape[:2] == (6 * 33 + 1, 6 * 33 + 1)
  # W&B, offline: the run's record holds the scalars, and its media the four grids.
  runs = list((workdir / 'wandb').glob('offline-run-*'))
  assert len(runs) == 1, runs
  record = next(runs[0].glob('run-*.wandb')).read_bytes()
  for tag in (b'loss', b'lr', b'steps_per_sec', b'in_loop/fd', b'eval/fd'):
    assert tag in record, tag
  assert len(list((runs[0] / 'files' / 'media' / 'images').glob('samples_*.png'))) == 4
  # Post-hoc EMA: both profiles (gamma 16.97 and 6.94) saved at steps 10 and 20.
  snapshots = ema_lib.load_snapshots(str(workdir / ema_lib.SNAPSHOT_SUBDIR))
  assert sorted((s.step, round(s.gamma, 2)) for s in snapshots) == [
      (10, 6.94), (10, 16.97), (20, 6.94), (20, 16.97)]
  # The cost of the in-loop work is reported, apart from the training time.
  assert re.search(r'in-loop grids and evaluations took [0-9.]+ s, [0-9.]+% of the training',
                   proc.stdout), proc.stdout


@pytest.mark.slow  # the resume path is also run by test_reliability.py's SIGKILL and SIGTERM tests
def test_rerun_resumes_instead_of_retraining(finished_run, cache_dir):
  workdir, _ = finished_run
  proc = _train(workdir, cache_dir=cache_dir, config=RUN)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Resuming from checkpoint step 20' in proc.stdout
  assert 'Trained steps' not in proc.stdout


# The fallback itself is tested in test_training.py (default suite); this end-to-end copy
# through the CLI costs ~26 s of a worker, so it is `slow` to keep CI under 10 minutes.
@pytest.mark.slow
def test_corrupted_latest_checkpoint_falls_back(finished_run, cache_dir, tmp_path):
  workdir = tmp_path / 'copy'
  shutil.copytree(finished_run[0], workdir)
  for root, _, files in os.walk(workdir / 'checkpoints' / '20'):
    for f in files:
      if 'METADATA' not in f and 'commit' not in f:
        with open(os.path.join(root, f), 'wb') as fh:
          fh.write(b'garbage')
  proc = _train(workdir, cache_dir=cache_dir, config=RUN)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'Resuming from checkpoint step 10' in proc.stdout
  assert 'checkpoint step 20' in proc.stderr and 'unreadable' in proc.stderr
  assert 'Trained steps 10..20' in proc.stdout
  assert '20' in os.listdir(workdir / 'checkpoints')


# Each case is a subprocess (~6 s of interpreter and JAX start-up), so the CLI path is checked
# on one case per kind of error: flag parsing (unknown key, bad type) and build (ConfigError).
# The other build-time errors are checked in-process by test_build_errors_name_the_key.
@pytest.mark.parametrize('override, expected', [
    ('--config.train.num_step=3', "unknown config key 'num_step' in --config.train.num_step"),
    pytest.param('--config.train.num_steps=abc', '--config.train.num_steps=abc',
                 marks=pytest.mark.slow),
    pytest.param('--config.trains.lr=1', "unknown config key 'trains'", marks=pytest.mark.slow),
    ('--config.model.ch=10', 'config.model: UNet: num_groups=4 must divide'),
])
def test_config_errors_are_one_line(tmp_path, cache_dir, override, expected):
  line = _error_line(_train(tmp_path / 'w', override, cache_dir=cache_dir))
  assert expected in line, line


@pytest.mark.parametrize('section, values, expected', [
    ('sample', dict(sampler='dpm_solver_9'), "config.sample.sampler='dpm_solver_9': unknown"),
    ('sample', dict(steps=5000), 'steps=5000 must lie in [1, 1000]'),
    # It used to run all 1000 ancestral steps while the log said "0 steps".
    ('sample', dict(steps=0), 'config.sample.steps=0: must be > 0'),
    ('sample', dict(options=dict(eta=0.5)),
     "config.sample.options.eta=0.5: sampler 'ddpm' takes no 'eta'; its options are "
     "['grid', 'spacing', 'variance']"),
    ('sample', dict(options=dict(grid='karras')),
     "ddpm_sample: grid='karras'; a discrete sampler takes a spacing"),
    ('sample', dict(options=dict(etta=0.5)), "config.sample.options.etta=0.5: sampler 'ddpm'"),
    ('train', dict(batch_size=0), 'config.train.batch_size=0: must be > 0'),
    # Found by tests/bad_input_check.py (docs/bad_inputs.txt); each used to run silently
    # (or crash with a traceback):
    ('sample', dict(clip_x0=-1.0), 'config.sample.clip_x0=-1.0: must be >= 0'),
    ('process', dict(num_steps=0), 'config.process: num_steps=0: the discrete process needs'),
    ('train', dict(grad_accum_steps=3), 'config.train.batch_size=32: must be divisible by '
     'train.grad_accum_steps=3'),
    ('model', dict(num_classes=-1), 'UNet: num_classes=-1 must be >= 0'),
    ('model', dict(attn_resolutions=(3,)), 'UNet: attn_resolutions=(3,): [3] is not among the '
     'resolutions [8, 4]'),
    ('model', dict(ch_mult=('1', 'x')), "config.model.ch_mult=('1', 'x'): expected "
     'tuple[int, ...]'),
    ('model', dict(ch_mult=()), 'UNet: ch_mult=() must be one or more positive integers'),
    ('log', dict(writers='jsonl,tb'), "config.log.writers='jsonl,tb': unknown writer 'tb'"),
    ('log', dict(sample_every=-1), 'config.log.sample_every=-1: must be >= 0'),
    ('log', dict(wandb_mode='cloud'), "config.log.wandb_mode='cloud'"),
    ('eval', dict(every=10, enabled=False), 'config.eval.every=10: in-loop evaluation needs '
     'eval.enabled=True'),
    ('eval', dict(reference_stats='/no/ref.npz'), "config.eval.reference_stats='/no/ref.npz': "
     'no such file'),
    ('train', dict(ema_rampup_ratio=0.05), 'config.train.ema_rampup_ratio=0.05: a ramp-up of '
     'the half-life needs train.ema_halflife_kimg > 0'),
    ('train', dict(posthoc_sigma_rels=(0.05,)), 'config.train.posthoc_sigma_rels=[0.05]: '),
    ('train', dict(posthoc_sigma_rels=(0.5, 0.1)), 'sigma_rel=0.5: must lie in (0, 0.2887]'),
])
def test_build_errors_name_the_key(section, values, expected):
  # The DDPM cases (steps <= T, the 'ddpm' sampler's options, the discrete process) need the
  # discrete eps setup, the `eps` variant; the other cases do not depend on it.
  config = digits_config.get_config('smoke,eps')
  config[section].update(values)
  with pytest.raises(run_config.ConfigError) as e:
    run_config.build(config)
  assert expected in str(e.value) and '\n' not in str(e.value)


def test_sampler_option_of_the_wrong_type_names_the_key():
  config = digits_config.get_config('smoke,eps')   # DDIM needs the discrete process
  config.sample.sampler = 'ddim'
  config.sample.options = {'spacing': 1}   # a file's config may replace the placeholders
  with pytest.raises(run_config.ConfigError, match=r'^config.sample.options.spacing=1: expected '
                     r'str, got int$'):
    run_config.build(config)
  values = config.to_dict()
  values['sample']['options'] = 0.5          # e.g. in a hand-edited config.json
  config = ml_collections.ConfigDict(values)
  with pytest.raises(run_config.ConfigError, match=r'^config.sample.options=0.5: expected a '):
    run_config.build(config)


# A run's config.json from before `sample.options`: the sampler options sat flat in `sample`.
OLD_CONFIG_JSON = {
    'data': {'image_size': 0, 'name': 'digits'},
    'eval': {'cache_dir': '', 'enabled': True, 'num_samples': 100},
    'model': {'depth': 3, 'hidden': 32, 'name': 'mlp'},
    'objective': {'name': 'ddpm_eps'},
    'optim': {'b1': 0.9, 'b2': 0.999, 'final_lr_fraction': 0.1, 'grad_clip': 1.0, 'lr': 0.002,
              'schedule': 'cosine', 'warmup_steps': 100, 'weight_decay': 0.0},
    'process': {'name': 'vp_discrete', 'num_steps': 1000, 'schedule': 'linear'},
    'sample': {'atol': None, 'batch_size': 100, 'clip_x0': 1.0, 'corrector_steps': None,
               'eta': None, 'grid': None, 'grid_size': 20, 'guidance_scale': 1.0,
               'method': None, 'order': None, 'rho': None, 'rtol': None, 's_churn': None,
               'sampler': 'ddpm', 'snr': None, 'solver': None, 'spacing': None, 'steps': 10,
               't_min': None, 'variance': 'small', 'variant': None},
    'seed': 0,
    'train': {'batch_size': 32, 'checkpoint_every': 10, 'ema_decay': 0.999,
              'keep_checkpoints': 3, 'log_every': 5, 'num_steps': 20},
}


def test_old_config_json_moves_flat_sampler_options_into_options(tmp_path):
  from configs import json_config
  path = tmp_path / 'config.json'
  path.write_text(json.dumps(OLD_CONFIG_JSON))
  config = json_config.get_config(str(path))
  assert not {'eta', 'variance', 'grid'} & set(config.sample)
  setup = run_config.build(config)
  assert dict(setup.sample.options) == {'variance': 'small'}
  new = digits_config.get_config('smoke,mlp,eps')     # the old config.json's setup
  new.sample.options.variance = 'small'
  assert setup.sample == run_config.build(new).sample
  # The unset options are typed placeholders again, so overrides on them work.
  config.sample.sampler = 'ddim'
  config.sample.options.update(variance=None, eta=0.5)
  assert dict(run_config.build(config).sample.options) == {'eta': 0.5}


@pytest.mark.slow  # suite time
def test_evaluate_an_old_config_json(finished_run, tmp_path, cache_dir):
  """A run's old-style config.json still evaluates (and gives the run's own samples)."""
  workdir, _ = finished_run
  path = tmp_path / 'old_config.json'
  path.write_text(json.dumps(OLD_CONFIG_JSON))
  done = _evaluate(workdir, '--tag=old', cache_dir=cache_dir,
                   config=f'configs/json_config.py:{path}')
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads((workdir / 'eval_ddpm_10_old.json').read_text())
  assert result['fd'] == json.loads((workdir / 'eval.json').read_text())['fd']


def test_missing_config_file_is_one_line(tmp_path, cache_dir):
  line = _error_line(_train(tmp_path / 'w', cache_dir=cache_dir, config='configs/nope.py'))
  assert 'configs/nope.py' in line


def test_config_file_without_get_config_names_the_file(tmp_path, cache_dir):
  bad = tmp_path / 'not_a_config.py'
  bad.write_text('x = 1\n')
  line = _error_line(_train(tmp_path / 'w', cache_dir=cache_dir, config=str(bad)))
  assert str(bad) in line and 'get_config()' in line


def test_empty_workdir_is_refused(tmp_path, cache_dir):
  """`--workdir=` used to train into the current directory."""
  line = _error_line(_train('', cache_dir=cache_dir))
  assert '--workdir is empty' in line


def test_unwritable_workdir_is_one_line(tmp_path, cache_dir):
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  line = _error_line(_train(blocker / 'sub', cache_dir=cache_dir))
  assert str(blocker / 'sub') in line and 'not writable' in line


def _evaluate(workdir, *args, cache_dir, config=RUN):
  env = dict(os.environ, DIFFUSION_JAX_CACHE=cache_dir, PYTHONUNBUFFERED='1')
  cmd = [sys.executable, '-m', 'experiments.evaluate', f'--workdir={workdir}', *args]
  if config is not None:
    cmd.insert(3, f'--config={config}')
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_evaluate_reproduces_the_run_and_adds_kid_precision_recall_nll(finished_run, cache_dir):
  workdir, _ = finished_run
  # No --config: the run's own config.json.
  done = _evaluate(workdir, '--nll_examples=8', '--tag=check', cache_dir=cache_dir, config=None)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads((workdir / 'eval_ddpm_10_check.json').read_text())
  trained = json.loads((workdir / 'eval.json').read_text())
  # Same checkpoint, same key as the loop's evaluation: the same samples, the same FD.
  assert result['fd'] == trained['fd'] and result['step'] == 20
  for k in ('kid', 'kid_floor', 'precision', 'recall', 'precision_floor', 'recall_floor'):
    assert np.isfinite(result[k]), k
  assert 0 <= result['precision'] <= 1 and 0 <= result['recall'] <= 1
  assert result['nll_examples'] == 8 and np.isfinite(result['bits_per_dim'])
  assert (workdir / 'eval_ddpm_10_check.png').exists()
  assert done.stdout.strip().splitlines()[-1].startswith('EVAL step=20 ddpm/10: fd=')


def test_evaluate_with_the_wrong_config_is_one_line_and_moves_nothing(finished_run, cache_dir):
  workdir, _ = finished_run
  done = _evaluate(workdir, '--config.model.hidden=16', cache_dir=cache_dir)
  errors = [ln for ln in done.stderr.splitlines() if ln.startswith('error: ')]
  assert done.returncode == 2 and len(errors) == 1 and 'Traceback' not in done.stderr
  assert errors[0].startswith(f'error: checkpoint step 20 in {workdir / "checkpoints"} holds a '
                             'different state: ')
  assert 'Dense_0/bias is (32,) float32 there, this config expects (16,) float32' in errors[0]
  assert f'--config=configs/json_config.py:{workdir / "config.json"}' in errors[0]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['10', '20']   # read-only: nothing moved


def _digest(root) -> dict:
  """`{relative path: sha256}` of every file under `root`."""
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      path = os.path.join(dirpath, f)
      with open(path, 'rb') as fh:
        out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def test_rerun_with_another_model_refuses_and_changes_nothing(finished_run, cache_dir, tmp_path):
  """The lost-work case: another model in a work dir with checkpoints is exit 2 before anything
  is built, and every file (checkpoints, config.json) is byte-identical afterwards."""
  workdir = tmp_path / 'copy'
  shutil.copytree(finished_run[0], workdir)
  before = _digest(workdir)
  line = _error_line(_train(workdir, '--config.model.hidden=16', cache_dir=cache_dir,
                            config=RUN))
  assert line.startswith('error: config.model.hidden is 16 here but 32 in the config this work '
                         f'dir was started with ({workdir / "config.json"})'), line
  assert f'--config=configs/json_config.py:{workdir / "config.json"}' in line
  assert _digest(workdir) == before


def test_a_checkpoint_of_another_model_is_an_error_naming_the_leaf(finished_run, cache_dir,
                                                                   tmp_path):
  """Without config.json to compare with, the checkpoints themselves refuse the other model:
  exit 2 naming the leaf, nothing renamed (they are not damaged) and no config.json written."""
  workdir = tmp_path / 'copy'
  shutil.copytree(finished_run[0], workdir)
  os.remove(workdir / 'config.json')
  before = _digest(workdir)
  line = _error_line(_train(workdir, '--config.model.hidden=16', cache_dir=cache_dir,
                            config=RUN))
  assert line.startswith(f'error: checkpoint step 20 in {workdir / "checkpoints"} holds a '
                         'different state: '), line
  assert 'Dense_0/bias is (32,) float32 there, this config expects (16,) float32' in line
  assert line.endswith('nothing was moved')
  assert _digest(workdir) == before


def test_a_second_run_in_a_busy_work_dir_is_refused(tmp_path, cache_dir):
  workdir = tmp_path / 'busy'
  workdir.mkdir()
  lock = workdir / 'run.lock'
  # A live process (this one) on this host holds the lock.
  lock.write_text(json.dumps({'pid': os.getpid(), 'host': socket.gethostname()}))
  before = lock.read_bytes()
  line = _error_line(_train(workdir, cache_dir=cache_dir, config=RUN))
  assert (f'is in use by another run (pid {os.getpid()} on host {socket.gethostname()})'
          in line), line
  assert lock.read_bytes() == before and sorted(os.listdir(workdir)) == ['run.lock']


@pytest.mark.slow  # suite time; test_workdir.py takes over stale locks in-process
def test_a_stale_lock_is_taken_over_and_released_at_the_end(tmp_path, cache_dir):
  workdir = tmp_path / 'stale'
  workdir.mkdir()
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  (workdir / 'run.lock').write_text(json.dumps({'pid': dead.pid, 'host': socket.gethostname()}))
  proc = _train(workdir, '--config.train.num_steps=2', '--config.eval.enabled=False',
                '--config.sample.grid_size=0', cache_dir=cache_dir, config=RUN)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (f'Took over the lock of a run that is gone (pid {dead.pid} on '
          f'{socket.gethostname()})') in proc.stderr
  assert not (workdir / 'run.lock').exists()


@pytest.mark.slow   # ~30 s: grain worker processes start in 2-3 s each
def test_data_workers_train_on_the_same_batches(finished_run, cache_dir, tmp_path):
  """Two grain worker processes decode the examples: the losses are those of the finished run
  (in-process reads), step for step, bit for bit."""
  workdir = tmp_path / 'workers'
  proc = _train(workdir, PROFILE, *COCKPIT, '--config.train.data_workers=2',
                cache_dir=cache_dir, config=RUN)
  assert proc.returncode == 0, proc.stderr[-3000:]
  losses = lambda w: [(r['step'], r['loss']) for r in map(
      json.loads, (w / 'metrics.jsonl').read_text().splitlines()) if 'loss' in r]
  assert losses(workdir) == losses(finished_run[0])


@pytest.mark.slow   # ~8-16 s; moved out of the default run (its 10-minute budget)
def test_evaluate_the_best_checkpoint_with_a_post_hoc_ema(finished_run, cache_dir, tmp_path):
  """`--checkpoint=best` restores the in-loop best step; `--params` samples with parameters
  rebuilt by experiments.posthoc_ema (here sigma_rel 0.1 at step 20: the stored profile)."""
  workdir, _ = finished_run
  rebuilt = tmp_path / 'ema_010.npz'
  env = dict(os.environ, DIFFUSION_JAX_CACHE=cache_dir)
  proc = subprocess.run([sys.executable, '-m', 'experiments.posthoc_ema', f'--workdir={workdir}',
                         '--sigma_rel=0.1', f'--out={rebuilt}'], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  done = _evaluate(workdir, '--checkpoint=best', f'--params={rebuilt}', '--tag=best',
                   cache_dir=cache_dir, config=None)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads((workdir / 'eval_ddpm_10_best.json').read_text())
  best = json.loads((workdir / 'eval.json').read_text())['best_step']
  assert result['step'] == best and result['params'] == str(rebuilt) and result['fd'] > 0


def test_post_hoc_parameters_of_another_model_are_refused_in_one_line(tmp_path):
  like = {'Dense_0': {'kernel': np.zeros((3, 4), np.float32), 'bias': np.zeros(4, np.float32)}}
  path = str(tmp_path / 'p.npz')
  ema_lib.write_params(path, {'Dense_0': {'kernel': np.ones((3, 4)), 'bias': np.ones(4)}},
                       step=5, gamma=6.94)
  got = ema_lib.read_params_like(path, like)
  assert got['Dense_0']['kernel'].dtype == np.float32 and got['Dense_0']['bias'].sum() == 4
  ema_lib.write_params(path, {'Dense_0': {'kernel': np.ones((3, 5)), 'bias': np.ones(4)}},
                       step=5, gamma=6.94)
  with pytest.raises(ValueError, match=r'p.npz: Dense_0/kernel is \(3, 5\) there, this model '
                                       r'has \(3, 4\)$'):
    ema_lib.read_params_like(path, like)
  ema_lib.write_params(path, {'Dense_1': {'bias': np.ones(4)}}, step=5, gamma=6.94)
  with pytest.raises(ValueError, match=r"p.npz: no parameter 'Dense_0/(bias|kernel)'"):
    ema_lib.read_params_like(path, like)
