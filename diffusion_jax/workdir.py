"""What keeps one work dir to one run: a lock, and the run's `config.json`.

* `WorkdirLock`: a file `<workdir>/run.lock` holding the pid and host of the run that owns the
  work dir, created atomically (`O_CREAT | O_EXCL`). A second run refuses (`WorkdirBusy`, one
  line naming the holder); a lock left by a dead process on this host is taken over, and the
  run says so. The lock is removed when the run ends, also on an exception.
* `check_config`: `config.json` is written once, when a run starts in a fresh work dir
  (`write_config`, atomic, never replaced); a later run in the same work dir must have the same
  resolved config (`ConfigMismatch` otherwise, before anything is built). Only what does not
  change what was trained may differ: `train.num_steps` (extending a run), `sample.*` and
  `eval.*` (a finished run re-samples and re-evaluates).
"""

import datetime
import importlib.metadata
import json
import logging
import os
import platform
import socket
import subprocess
import sys

import ml_collections

from diffusion_jax.configuration import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = 'run.lock'
CONFIG_NAME = 'config.json'
# Keys (dotted prefixes) a resumed run may change: they do not change the trained state.
MAY_DIFFER = ('train.num_steps', 'sample', 'eval', 'profile', 'log', 'latent.autoencoder.eval',
              'text.negative_prompt', 'text.eval_templates')


class WorkdirBusy(ConfigError):
  """Another live run holds the work dir's lock."""


class ConfigMismatch(ConfigError):
  """The config differs from the one the work dir's run was started with."""


def json_config_flag(workdir: str) -> str:
  """The `--config` value that reloads a run's own config."""
  return f'--config=configs/json_config.py:{os.path.join(workdir, CONFIG_NAME)}'


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:         # another user's process
    return True
  return True


class WorkdirLock:
  """Context manager owning `<workdir>/run.lock` for this process (see the module doc)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
    self.host = socket.gethostname()
    self.pid = os.getpid()
    self._text = json.dumps({'pid': self.pid, 'host': self.host})
    self._held = False

  def acquire(self) -> 'WorkdirLock':
    for _ in range(3):
      if self._create():
        self._held = True
        return self
      holder = self._read(self.path)
      if holder is None:            # vanished, or half-written by a starting run: look again
        continue
      pid, host = holder.get('pid'), holder.get('host')
      if host == self.host and isinstance(pid, int) and not _pid_alive(pid):
        if self._take_over(holder):
          print(f'Took over the lock of a run that is gone (pid {pid} on {host}): {self.path}',
                file=sys.stderr, flush=True)
          self._held = True
          return self
        continue
      raise WorkdirBusy(
          f'work dir {os.path.dirname(self.path)} is in use by another run (pid {pid} on host '
          f'{host}); wait for it to end, or use another --workdir (if that run is gone, '
          f'delete {self.path})')
    raise WorkdirBusy(f'could not take the lock {self.path}: it keeps changing')

  def _create(self) -> bool:
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    except OSError as e:
      raise ConfigError(f'could not create the lock {self.path}: {e.strerror or e}') from None
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      f.write(self._text + '\n')
    return True

  @staticmethod
  def _read(path) -> dict | None:
    try:
      with open(path, encoding='utf-8') as f:
        holder = json.loads(f.read())
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return {'pid': None, 'host': '(unreadable lock file)'}
    return holder if isinstance(holder, dict) else {'pid': None, 'host': '(unreadable lock file)'}

  def _take_over(self, stale: dict) -> bool:
    """Moves the stale lock aside (one rename: of several runs doing this, one wins), checks that
    what was moved is the stale lock, and creates ours."""
    aside = f'{self.path}.stale-{self.pid}'
    try:
      os.replace(self.path, aside)
    except FileNotFoundError:
      return self._create()
    moved = self._read(aside)
    if moved != stale:              # a live run's fresh lock: put it back, look again
      try:
        os.link(aside, self.path)
      except OSError:
        pass
      os.remove(aside)
      return False
    os.remove(aside)
    return self._create()

  def release(self) -> None:
    """Removes the lock if it is still this process's (idempotent)."""
    if not self._held:
      return
    self._held = False
    holder = self._read(self.path)
    if holder and holder.get('pid') == self.pid and holder.get('host') == self.host:
      try:
        os.remove(self.path)
      except OSError:
        pass

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def config_dict(config: ml_collections.ConfigDict) -> dict:
  """The config as `config.json` stores it (JSON: tuples become lists)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def _flatten(d, prefix=''):
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict) and v:
      out.update(_flatten(v, key + '.'))
    else:
      out[key] = v
  return out


def _may_differ(key: str) -> bool:
  return any(key == p or key.startswith(p + '.') for p in MAY_DIFFER)


def check_config(config: ml_collections.ConfigDict, workdir: str,
                 defaults: dict | None = None) -> bool:
  """Compares `config` with the work dir's `config.json`, if there is one; raises a one-line
  `ConfigMismatch` naming the first key that differs (other than those in `MAY_DIFFER`).
  `defaults` (dotted key -> value) are what a key absent from one side means: a config that
  spells out a default (e.g. every `config.data` key, listed since this change) is the same as
  one that left it out. Returns whether `config.json` exists. Reads only."""
  path = os.path.join(workdir, CONFIG_NAME)
  try:
    with open(path, encoding='utf-8') as f:
      saved = json.load(f)
  except FileNotFoundError:
    return False
  except (OSError, ValueError) as e:
    raise ConfigMismatch(f'{path} is unreadable ({e}); it is the config of the run in this work '
                         f'dir: restore it, or use a new --workdir') from None
  old, new = _flatten(saved), _flatten(config_dict(config))
  for key, value in (defaults or {}).items():
    old.setdefault(key, value)
    new.setdefault(key, value)
  for key in sorted(set(old) | set(new)):
    if _may_differ(key) or old.get(key, KeyError) == new.get(key, KeyError):
      continue
    have = 'absent' if key not in old else json.dumps(old[key])
    want = 'absent' if key not in new else json.dumps(new[key])
    raise ConfigMismatch(
        f'config.{key} is {want} here but {have} in the config this work dir was started with '
        f'({path}); continue that run with {json_config_flag(workdir)} (train.num_steps, '
        f'sample.* and eval.* may be overridden), or use a new --workdir')
  return True


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes `config.json` if the work dir has none (atomically; an existing one is kept)."""
  path = os.path.join(workdir, CONFIG_NAME)
  if os.path.exists(path):
    return
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True) + '\n')
  try:
    os.link(tmp, path)          # fails if another writer was first: theirs is kept
  except FileExistsError:
    pass
  finally:
    os.remove(tmp)


RUN_RECORD_NAME = 'run.json'
_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'ml-collections',
             'tensorflow-datasets', 'safetensors', 'diffrax')


def _git(*args) -> str | None:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    done = subprocess.run(['git', '-C', root, *args], capture_output=True, text=True, timeout=10,
                          check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return done.stdout if done.returncode == 0 else None


def run_record(mesh=None) -> dict:
  """What reproduces this start of a run beside its config: the time, the command line, the
  code version (git commit of the checkout `diffusion_jax` is imported from, and whether it had
  uncommitted changes; None outside a git checkout), package versions, Python, host, devices
  and processes."""
  import jax  # pylint: disable=g-import-not-at-top
  commit = _git('rev-parse', 'HEAD')
  status = _git('status', '--porcelain', '--untracked-files=no') if commit else None
  versions = {}
  for name in _PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  devices = mesh.devices.flatten().tolist() if mesh is not None else jax.devices()
  return {
      'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'argv': list(sys.argv), 'cwd': os.getcwd(),
      'git': None if commit is None else {'commit': commit.strip(),
                                          'dirty': bool((status or '').strip())},
      'packages': versions, 'python': platform.python_version(), 'host': socket.gethostname(),
      'devices': {'platform': devices[0].platform, 'kind': devices[0].device_kind,
                  'count': len(devices), 'local_count': jax.local_device_count(),
                  'process_count': jax.process_count()},
  }


def append_run_record(workdir: str, record: dict) -> None:
  """Appends `record` to the work dir's `run.json` (a list: one entry per start or resume),
  atomically; an unreadable `run.json` is kept aside as `run.json.unreadable`, not lost."""
  path = os.path.join(workdir, RUN_RECORD_NAME)
  records = []
  if os.path.exists(path):
    try:
      with open(path, encoding='utf-8') as f:
        records = json.load(f)
      if not isinstance(records, list):
        raise ValueError('not a list')
    except (OSError, ValueError):
      os.replace(path, path + '.unreadable')
      records = []
  records.append(record)
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(records, f, indent=2)
  os.replace(tmp, path)
