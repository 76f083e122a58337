"""Scalars to a JSON-lines file (`metrics.jsonl`): one object per line with a `step` field."""

import json
import os
from typing import Mapping

import numpy as np


class JsonlWriter:
  """Appends `{"step": s, **scalars}` lines. On resume, lines past `resume_step` are dropped so
  the file reads as one uninterrupted run (those steps are recomputed and logged again)."""

  def __init__(self, path: str | os.PathLike, resume_step: int | None = None):
    self.path = os.fspath(path)
    if resume_step is not None and os.path.exists(self.path):
      kept = []
      with open(self.path, encoding='utf-8') as f:
        for line in f:
          try:
            if json.loads(line).get('step', 0) <= resume_step:
              kept.append(line if line.endswith('\n') else line + '\n')
          except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
      tmp = self.path + '.tmp'
      with open(tmp, 'w', encoding='utf-8') as f:
        f.writelines(kept)
      os.replace(tmp, self.path)
    self._file = open(self.path, 'a', encoding='utf-8')

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    record = {'step': int(step)}
    record.update({k: _to_python(v) for k, v in scalars.items()})
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def _to_python(v):
  if isinstance(v, (str, bool, int)) or v is None:
    return v
  return float(np.asarray(v))
