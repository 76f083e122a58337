"""Mutation check: does the default test suite reject one-line wrong changes to the math?

`python tests/mutation_check.py [--only SUBSTRING] [--jobs N]` copies the repository to a
temporary directory once, then for each entry of `MUTATIONS` (file, exact original text, wrong
text, tests to run) writes the wrong text into the copy, runs those default tests with `-x`,
restores the file and reports whether a test failed ("killed") or everything passed
("SURVIVED": a hole in the suite). It exits 1 if any mutation survived. Each original text must
occur exactly once in its file, so the table cannot silently drift from the code.

Not collected by pytest (no `test_` prefix); it takes minutes, so it is a habit, not a CI step.
"""

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (file, original text, wrong text, test files run against it). Keep every original unique.
MUTATIONS = [
    # --- processes -------------------------------------------------------------------------
    ('diffusion_jax/processes_continuous.py',
     'return 2.0 * self.log_alpha(t) - jnp.log(self.sigma_squared(t))',
     'return 2.0 * self.log_alpha(t) + jnp.log(self.sigma_squared(t))',
     ['tests/test_processes.py']),
    ('diffusion_jax/processes_continuous.py',
     'return self.alpha(t).reshape(shape) * x0 + self.sigma(t).reshape(shape) * eps',
     'return self.alpha(t).reshape(shape) * x0 + self.sigma(t).reshape(shape) ** 2 * eps',
     ['tests/test_processes.py', 'tests/test_objectives.py']),
    ('diffusion_jax/processes_continuous.py',
     'return jnp.exp(2.0 * self._log_sigma(t))',
     'return jnp.exp(self._log_sigma(t))',
     ['tests/test_processes.py']),
    ('diffusion_jax/processes_continuous.py',
     'return 2.0 * (jnp.log1p(-t) - jnp.log(t))',
     'return 2.0 * (jnp.log1p(-t) - jnp.log(2 * t))',
     ['tests/test_processes.py']),
    ('diffusion_jax/processes.py',
     'return np.cumprod(1.0 - self.betas)',
     'return np.cumprod(1.0 - 0.5 * self.betas)',
     ['tests/test_processes.py']),
]


def _copy_repo(dst):
  ignore = shutil.ignore_patterns('.venv', '.git', '.jax_cache', 'runs', '__pycache__', '*.pyc')
  shutil.copytree(ROOT, dst, ignore=ignore, dirs_exist_ok=True)


def _read_checked(root, path, old):
  with open(os.path.join(root, path), encoding='utf-8') as f:
    text = f.read()
  count = text.count(old)
  if count != 1:
    raise SystemExit(f'{path}: the original text occurs {count} times (must be once): {old!r}')
  return text


def _apply(root, path, old, new):
  text = _read_checked(root, path, old)
  with open(os.path.join(root, path), 'w', encoding='utf-8') as f:
    f.write(text.replace(old, new))
  return text


def run_one(work, mutation, python):
  path, old, new, tests = mutation
  original = _apply(work, path, old, new)
  t0 = time.time()
  try:
    proc = subprocess.run([python, '-m', 'pytest', '-q', '-x', '-p', 'no:randomly', *tests],
                          cwd=work, capture_output=True, text=True, check=False)
  finally:
    with open(os.path.join(work, path), 'w', encoding='utf-8') as f:
      f.write(original)
  failed = [ln for ln in proc.stdout.splitlines() if ln.startswith('FAILED')]
  return proc.returncode != 0, (failed[0][7:] if failed else proc.stdout[-200:]), time.time() - t0


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--only', default='', help='run only mutations whose file contains this')
  parser.add_argument('--jobs', type=int, default=1, help='mutations run at once (own copies)')
  args = parser.parse_args()
  todo = [m for m in MUTATIONS if args.only in m[0]]
  for path, old, _, _ in todo:                         # fail fast on a stale table
    _read_checked(ROOT, path, old)
  python = sys.executable
  with tempfile.TemporaryDirectory() as tmp:
    works = [os.path.join(tmp, f'w{j}') for j in range(max(1, args.jobs))]
    for w in works:
      _copy_repo(w)
    survived = 0
    with concurrent.futures.ThreadPoolExecutor(len(works)) as pool:
      # Each worker copy runs one mutation at a time.
      chunks = [todo[j::len(works)] for j in range(len(works))]
      futures = [pool.submit(lambda w, ms: [(m, run_one(w, m, python)) for m in ms], w, c)
                 for w, c in zip(works, chunks, strict=True)]
      results = [r for f in futures for r in f.result()]
    for (path, old, new, _), (killed, why, seconds) in results:
      survived += not killed
      print(f'{"killed  " if killed else "SURVIVED"} {seconds:6.1f}s {path}: {old!r} -> {new!r}'
            f'\n           {why}')
  print(f'{len(results) - survived} killed, {survived} survived of {len(results)} mutations')
  return 1 if survived else 0


if __name__ == '__main__':
  sys.exit(main())
