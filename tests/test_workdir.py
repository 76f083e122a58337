"""One run per work dir: the lock file, and config.json written once and compared on resume."""

import json
import os
import socket
import subprocess
import sys

import pytest

from configs import digits as digits_config
from diffusion_jax import workdir as workdir_lib


def _write_lock(path, pid, host=None):
  path.write_text(json.dumps({'pid': pid, 'host': host or socket.gethostname()}) + '\n')


def _dead_pid():
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait()
  return proc.pid


def test_lock_holds_pid_and_host_and_is_released_also_on_an_exception(tmp_path):
  lock_path = tmp_path / workdir_lib.LOCK_NAME
  with pytest.raises(ZeroDivisionError):
    with workdir_lib.WorkdirLock(str(tmp_path)):
      holder = json.loads(lock_path.read_text())
      assert holder == {'pid': os.getpid(), 'host': socket.gethostname()}
      raise ZeroDivisionError
  assert not lock_path.exists()


@pytest.mark.parametrize('host', [None, 'some-other-node'])
def test_a_second_run_is_refused_naming_the_holder(tmp_path, host):
  lock_path = tmp_path / workdir_lib.LOCK_NAME
  # This process is alive; on another host nothing can tell whether a pid is, so it is refused.
  pid = os.getpid() if host is None else _dead_pid()
  _write_lock(lock_path, pid, host)
  before = lock_path.read_bytes()
  with pytest.raises(workdir_lib.WorkdirBusy) as e:
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  message = str(e.value)
  assert f'in use by another run (pid {pid} on host {host or socket.gethostname()})' in message
  assert str(lock_path) in message and '\n' not in message
  assert lock_path.read_bytes() == before


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_said(tmp_path, capsys):
  lock_path = tmp_path / workdir_lib.LOCK_NAME
  dead = _dead_pid()
  _write_lock(lock_path, dead)
  with workdir_lib.WorkdirLock(str(tmp_path)):
    assert json.loads(lock_path.read_text())['pid'] == os.getpid()
  err = capsys.readouterr().err
  assert f'Took over the lock of a run that is gone (pid {dead} on {socket.gethostname()})' in err
  assert not lock_path.exists() and os.listdir(tmp_path) == []


def _config(**changes):
  config = digits_config.get_config('smoke,mlp')
  for key, value in changes.items():
    section, name = key.split('.')
    config[section][name] = value
  return config


def test_config_json_is_written_once_and_never_replaced(tmp_path):
  assert not workdir_lib.check_config(_config(), str(tmp_path))
  workdir_lib.write_config(_config(), str(tmp_path))
  path = tmp_path / 'config.json'
  before = path.read_bytes()
  assert json.loads(before)['model']['hidden'] == 32
  workdir_lib.write_config(_config(**{'model.hidden': 16}), str(tmp_path))
  assert path.read_bytes() == before
  assert sorted(os.listdir(tmp_path)) == ['config.json']     # no config.<time>.json copies


@pytest.mark.parametrize('changes', [
    {'train.num_steps': 40},                                 # extending the run
    {'sample.sampler': 'ddim', 'sample.steps': 5, 'sample.eta': 0.5},   # re-sampling
    {'eval.num_samples': 10, 'eval.cache_dir': '/elsewhere'},
])
def test_a_resume_may_change_num_steps_sampling_and_evaluation(tmp_path, changes):
  workdir_lib.write_config(_config(), str(tmp_path))
  assert workdir_lib.check_config(_config(**changes), str(tmp_path))


@pytest.mark.parametrize('changes, key, here, there', [
    ({'model.hidden': 16}, 'model.hidden', '16', '32'),
    ({'train.batch_size': 64}, 'train.batch_size', '64', '32'),
    ({'optim.lr': 0.1}, 'optim.lr', '0.1', '0.002'),
    ({'objective.name': 'ddpm_x0'}, 'objective.name', '"ddpm_x0"', '"edm"'),   # the default's
])
def test_any_other_change_is_refused_naming_the_key(tmp_path, changes, key, here, there):
  workdir_lib.write_config(_config(), str(tmp_path))
  with pytest.raises(workdir_lib.ConfigMismatch) as e:
    workdir_lib.check_config(_config(**changes), str(tmp_path))
  message = str(e.value)
  assert message.startswith(f'config.{key} is {here} here but {there} in the config this work '
                            f'dir was started with ({tmp_path / "config.json"})'), message
  assert f'--config=configs/json_config.py:{tmp_path / "config.json"}' in message
  assert '\n' not in message


def test_a_key_missing_from_config_json_is_a_difference(tmp_path):
  workdir_lib.write_config(_config(), str(tmp_path))
  config = _config()
  config.model.extra = 3
  with pytest.raises(workdir_lib.ConfigMismatch, match=r'config\.model\.extra is 3 here but '
                     r'absent in the config'):
    workdir_lib.check_config(config, str(tmp_path))


def test_a_key_left_out_at_its_default_is_no_difference(tmp_path):
  """Runs from before every `config.data` key was listed resume: a key absent from one side is
  its typed section's default (`run_config.section_defaults`), and only a real change differs."""
  from diffusion_jax import run_config  # pylint: disable=g-import-not-at-top
  old = _config()
  del old.data['crop']                      # as config.json files written before the change
  workdir_lib.write_config(old, str(tmp_path))
  defaults = run_config.section_defaults()
  assert defaults['data.crop'] == 0 and defaults['train.keep_every'] == 0
  assert workdir_lib.check_config(_config(), str(tmp_path), defaults)
  changed = _config()
  changed.data.crop = 4
  with pytest.raises(workdir_lib.ConfigMismatch, match=r'config\.data\.crop is 4 here but 0'):
    workdir_lib.check_config(changed, str(tmp_path), defaults)


def test_a_run_from_before_every_model_and_train_key_was_listed_resumes(tmp_path):
  """config.json files written before `typed_section` / `model_section` hold only the keys the
  config file set (e.g. `model` without `num_classes`, `train` without `grad_accum_steps`):
  they compare equal to today's config, whose extra keys are at their defaults, and a real
  change of a newly listed key is still a difference."""
  from configs import digits  # pylint: disable=g-import-not-at-top
  from diffusion_jax import run_config  # pylint: disable=g-import-not-at-top
  now = digits.get_config()
  old = digits.get_config()
  with old.unlocked():
    old.model = dict(name='unet', ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                     num_heads=1, dropout=0.0, num_groups=8)
    old.train = dict(num_steps=3000, batch_size=128, ema_decay=0.999, log_every=50,
                     checkpoint_every=500, keep_checkpoints=3)
  workdir_lib.write_config(old, str(tmp_path))
  defaults = run_config.section_defaults('unet')
  assert defaults['model.num_classes'] == 0 and defaults['model.ch_mult'] == [1, 2]
  assert workdir_lib.check_config(now, str(tmp_path), defaults)
  now.model.num_classes = 10
  with pytest.raises(workdir_lib.ConfigMismatch, match=r'config\.model\.num_classes is 10 here '
                     r'but 0'):
    workdir_lib.check_config(now, str(tmp_path), defaults)


def test_run_record_appends_one_entry_per_start_and_keeps_an_unreadable_file(tmp_path):
  from diffusion_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  record = workdir_lib.run_record()
  assert record['packages']['jax'] and record['devices']['count'] >= 1
  assert record['git'] is None or len(record['git']['commit']) == 40
  workdir_lib.append_run_record(str(tmp_path), {'n': 1})
  workdir_lib.append_run_record(str(tmp_path), {'n': 2})
  assert json.loads((tmp_path / 'run.json').read_text()) == [{'n': 1}, {'n': 2}]
  (tmp_path / 'run.json').write_text('{not json')
  workdir_lib.append_run_record(str(tmp_path), {'n': 3})
  assert json.loads((tmp_path / 'run.json').read_text()) == [{'n': 3}]
  assert (tmp_path / 'run.json.unreadable').read_text() == '{not json'
