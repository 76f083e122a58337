"""Shared command-line plumbing for entry points: one-line errors, runtime set-up."""

import contextlib
import os
import platform
import re
import sys

from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fail(message: str, code: int = 2):
  """Prints `error: <message>` as one line on stderr and exits; no traceback for user errors."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def parse_flags(argv):
  """absl flag parsing, with config mistakes reported as one line naming the flag or key."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(_first_and_last_line(str(e)))
  except (AttributeError, KeyError) as e:  # ml_collections: an override names a missing key
    if "has no attribute 'get_config'" in str(e):   # the file itself is not a config file
      path = next((a.split('=', 1)[1].split(':')[0] for a in argv[1:]
                   if a.startswith('--config=')), 'the --config file')
      fail(f'{path} defines no get_config(): a config file returns its ml_collections '
           f'ConfigDict from get_config() (see configs/digits.py)')
    # The message is a repr of a KeyError: quotes, backslashes and an escaped newline.
    text = str(e).replace('\\n', '\n')
    key = text.splitlines()[0].strip('\\\'" ')
    hint = next((ln.strip('\\\'" ') for ln in text.splitlines()[1:] if 'Did you mean' in ln), '')
    arg = next((a for a in argv[1:] if re.match(rf'--config\.(\S+\.)?{re.escape(key)}(=|$)', a)),
               None)
    where = f' in {arg.split("=")[0]}' if arg else ''
    fail(f'unknown config key {key!r}{where}' + (f'; {hint.strip()}' if hint else ''))
  except Exception as e:  # pylint: disable=broad-except  # a config file that fails to load
    fail(f'could not load the config: {_first_and_last_line(str(e)) or type(e).__name__}')


def config_value(holder):
  """The parsed config of a `DEFINE_config_file` holder; a file that failed to load (its error
  is deferred by ml_collections until first access) becomes a one-line error."""
  try:
    value = holder.value
    value.keys()  # forces the deferred load error, if any
    return value
  except Exception as e:  # pylint: disable=broad-except
    fail(f'could not load the config: {_first_and_last_line(str(e)) or type(e).__name__}')


def _first_and_last_line(text: str) -> str:
  lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
  if not lines:
    return ''
  return lines[0] if len(lines) == 1 else f'{lines[0]} {lines[-1]}'


EXIT_DIVERGED = 3
EXIT_SAVE_FAILED = 74     # EX_IOERR: a checkpoint could not be written
EXIT_INTERRUPTED = 130    # Ctrl-C before training started (nothing to save)


def _exit_now(code: int):
  """Exits without waiting for other threads (orbax's, after a failed save, may never end)."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


@contextlib.contextmanager
def user_errors():
  """Turns the library's user-facing errors into one-line messages: exit status 2 for a user
  error, 3 for diverged training, `preemption.EXIT_CODE` (75) after a preemption save (SIGTERM,
  SIGUSR1, Ctrl-C), 74 when a checkpoint could not be written (at once: no thread can hold the
  exit) and 130 for a Ctrl-C before training started."""
  # pylint: disable=g-import-not-at-top
  from diffusion_jax import checkpointing
  from diffusion_jax import preemption
  from diffusion_jax import training
  from diffusion_jax.configuration import ConfigError
  # pylint: enable=g-import-not-at-top
  try:
    yield
  except (ConfigError, checkpointing.CheckpointError) as e:
    fail(str(e))
  except training.TrainingDiverged as e:
    fail(str(e), code=EXIT_DIVERGED)
  except preemption.Preempted as e:
    print(f'preempted: {e}', file=sys.stderr, flush=True)
    sys.exit(preemption.EXIT_CODE)
  except checkpointing.CheckpointSaveError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    _exit_now(EXIT_SAVE_FAILED)
  except KeyboardInterrupt:
    print('\ninterrupted: exiting (nothing to save at this point)', file=sys.stderr, flush=True)
    _exit_now(EXIT_INTERRUPTED)


def start_processes(coordinator_address, num_processes, process_id):
  """`jax.distributed` for a multi-process run (explicit flags, or SLURM's variables)."""
  from diffusion_jax import parallel  # pylint: disable=g-import-not-at-top
  try:
    parallel.initialize(coordinator_address, num_processes, process_id)
  except ValueError as e:
    fail(str(e))
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1 and jax.default_backend() == 'cpu':
    # jax 0.12 on CPU: an executable with cross-process (gloo) collectives that is loaded from
    # the persistent compilation cache waits forever in its first collective (a 2-process run
    # hung in 3 of 4 tries with a warm cache, never with a cold one; jax 0.10 did not). CPU
    # multi-process runs are the localhost test path, so they compile afresh.
    jax.config.update('jax_enable_compilation_cache', False)


def cpu_name() -> str:
  """The CPU model from /proc/cpuinfo (else what `platform` knows), for benchmark tables."""
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return cpu


def default_cache_dir() -> str:
  return os.environ.get('DIFFUSION_JAX_CACHE',
                        os.path.join(os.path.expanduser('~'), '.cache', 'diffusion_jax'))


def setup_runtime():
  """Persistent XLA compilation cache (a second run compiles in seconds), threefry
  partitionable keys (random numbers do not depend on the sharding), and warnings-only
  library logging unless `--verbosity` is given."""
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  jax.config.update('jax_compilation_cache_dir', os.path.join(default_cache_dir(), 'xla'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  jax.config.update('jax_threefry_partitionable', True)


def begin(argv, config_holder, workdir_flag):
  """The start of every entry point: no stray arguments, the runtime set up, the config
  loaded (one-line errors) and the work dir made absolute. Returns `(config, workdir)`."""
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if not (workdir_flag.value or '').strip():    # abspath('') would be the current directory
    fail(f'--{workdir_flag.name} is empty: name the directory the run writes to')
  setup_runtime()
  config = config_value(config_holder) if config_holder is not None else None
  return config, os.path.abspath(workdir_flag.value)


def parse_flags_with_run_config(argv):
  """`cli.parse_flags`, with `--config` defaulting to the run's own `config.json` (overrides
  such as `--config.sample.steps=20` then apply to it)."""
  args = list(argv)
  if not any(a == '--config' or a.startswith('--config=') for a in args[1:]):
    workdir = None
    for i, a in enumerate(args[1:], 1):
      if a.startswith('--workdir='):
        workdir = a.split('=', 1)[1]
      elif a == '--workdir' and i + 1 < len(args):
        workdir = args[i + 1]
    if workdir:
      path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), 'config.json')
      if not os.path.exists(path):
        fail(f'no --config given and the work dir has no config.json ({path}); pass the '
             f'run\'s config with --config=...')
      args.insert(1, f'--config={os.path.join(ROOT, "configs", "json_config.py")}:{path}')
  return parse_flags(args)


def latent_decoder(config, workdir):
  """`decode(scaled latents) -> images` (numpy, batches split over every device) with the
  autoencoder of the latent diffusion run in `workdir`."""
  # pylint: disable=g-import-not-at-top
  from diffusion_jax import latent_pipeline
  from diffusion_jax import parallel
  from diffusion_jax.data import latents as latents_lib
  # pylint: enable=g-import-not-at-top
  info = latents_lib.read_info(os.path.join(workdir, latent_pipeline.LATENTS_DIR))
  decode = latent_pipeline.latent_decoder(latent_pipeline.autoencoder_config(config),
                                          os.path.join(workdir, latent_pipeline.AUTOENCODER_DIR),
                                          info)
  mesh = parallel.make_mesh()
  return lambda z: parallel.map_batches(decode, z, len(z), mesh)


def load_run(workdir: str):
  """`(config, setup, ema_params, step)` of a finished run, from its own config.json and its
  newest readable checkpoint; a directory that is not a run is a one-line error."""
  from configs import json_config  # pylint: disable=g-import-not-at-top
  from diffusion_jax import train_loop  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    fail(f'{workdir}: no config.json (not a run work dir)')
  config = json_config.get_config(path)
  with user_errors():
    setup, state, step = train_loop.load_checkpoint(config, workdir)
  return config, setup, state.ema_params, step
