"""Preemption: a signal asks the run to checkpoint at the current step and exit for a requeue.

Clusters announce the end of a job with a signal: SIGTERM when SLURM preempts or cancels it,
and the pre-timeout signal of `sbatch --signal=USR1@<seconds>` before its time limit. The
handler only records the signal; the training loop polls `should_stop()` after each step, saves
that step and raises `Preempted`, and the entry point exits with `EXIT_CODE` (75, EX_TEMPFAIL),
which `launch/slurm/train.sbatch` answers with `scontrol requeue`. In a multi-process run the
processes agree through one tiny collective per poll, so all of them save the same step even
when the signal reached only some.

Ctrl-C (SIGINT) is treated the same way: the current step is saved and the run exits with 75.
A second Ctrl-C exits at once (status 130, no save), after the `on_force_exit` callback (which
releases the work dir's lock).
"""

import os
import signal
import sys
import threading

from diffusion_jax import parallel

EXIT_CODE = 75                      # EX_TEMPFAIL: "try again", the requeue status
FORCE_EXIT_CODE = 130               # 128 + SIGINT: a second Ctrl-C
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def _say(text: str) -> None:
  """Writes to stderr from a signal handler (a plain write: `print` could be re-entered)."""
  try:
    os.write(sys.stderr.fileno(), text.encode())
  except (OSError, ValueError):
    pass


class Preempted(RuntimeError):
  """The run stopped on a preemption signal after writing a checkpoint at `step`."""

  def __init__(self, message: str, step: int | None = None):
    super().__init__(message)
    self.step = step


class PreemptionWatcher:
  """Context manager that records `signals` while it is active (previous handlers restored on
  exit). Handlers can only be installed from the main thread; elsewhere it watches nothing."""

  def __init__(self, signals=SIGNALS, on_force_exit=None):
    self.signals = tuple(signals)
    self.received = None            # the first signal number seen, if any
    self.on_force_exit = on_force_exit
    self._previous = {}

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self.received is None:
      self.received = signum
      if signum == signal.SIGINT:
        _say('\ninterrupted: saving the current step, then exiting (Ctrl-C again to exit at '
             'once, without saving)\n')
    elif signum == signal.SIGINT:
      _say('interrupted again: exiting now, without saving this step\n')
      if self.on_force_exit is not None:
        self.on_force_exit()
      os._exit(FORCE_EXIT_CODE)  # pylint: disable=protected-access

  def __enter__(self) -> 'PreemptionWatcher':
    if threading.current_thread() is threading.main_thread():
      for s in self.signals:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  @property
  def signal_name(self) -> str:
    if self.received is None:
      return 'a preemption signal (on another process)'
    return signal.Signals(self.received).name

  def should_stop(self) -> bool:
    """Whether any process received a signal; every process must call it at the same steps."""
    return parallel.any_process(self.received is not None)
