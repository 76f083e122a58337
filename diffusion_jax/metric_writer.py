"""Where a run's numbers and pictures go: `metrics.jsonl` always (one object per line with a
`step` field), TensorBoard event files and W&B runs when `config.log.writers` names them.

Every writer has `write(step, scalars)`, `write_images(step, {name: uint8 [H, W, C]})` (JSONL
ignores images; the loop saves them as PNG too) and `close()`.
"""

import importlib.util
import json
import os
import uuid
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


# --------------------------------------------------------------------------------------------
# TensorBoard and W&B, chosen by `config.log.writers` ('jsonl,tensorboard,wandb').

WRITERS = ('jsonl', 'tensorboard', 'wandb')
_PACKAGES = {'tensorboard': ('tensorboardX', 'tb'), 'wandb': ('wandb', 'wandb')}


def parse_writers(spec: str) -> tuple[str, ...]:
  """`'jsonl,tensorboard'` -> `('jsonl', 'tensorboard')`; a one-line ValueError naming an
  unknown writer or the extra to install for a missing package. JSONL is always written (the
  loop's own record): listing it is optional."""
  names = [w.strip() for w in str(spec).split(',') if w.strip()]
  for w in names:
    if w not in WRITERS:
      raise ValueError(f'config.log.writers={spec!r}: unknown writer {w!r}; choose from '
                       f'{", ".join(WRITERS)} (comma-separated)')
    if w in _PACKAGES:
      module, extra = _PACKAGES[w]
      if importlib.util.find_spec(module) is None:
        raise ValueError(f'config.log.writers={spec!r}: {w} needs the {module} package: '
                         f'pip install "diffusion_jax[{extra}]"')
  return tuple(dict.fromkeys(['jsonl'] + names))


class TensorBoardWriter:
  """Scalars and images as TensorBoard event files under `logdir` (tensorboardX: it needs only
  numpy and protobuf; TensorBoard's own writer needs TensorFlow). On resume from step k,
  TensorBoard hides the events past k that the killed run had written (`purge_step`), as the
  JSONL writer drops those lines."""

  def __init__(self, logdir: str | os.PathLike, resume_step: int | None = None):
    import tensorboardX  # pylint: disable=g-import-not-at-top
    purge = resume_step + 1 if resume_step else None
    self._writer = tensorboardX.SummaryWriter(os.fspath(logdir), purge_step=purge,
                                              flush_secs=30)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    for k, v in scalars.items():
      v = _to_python(v)
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        self._writer.add_scalar(k, v, global_step=int(step))
    self._writer.flush()

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    for k, img in images.items():
      self._writer.add_image(k, np.asarray(img, np.uint8), global_step=int(step),
                             dataformats='HWC')
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class WandbWriter:
  """Scalars and images to Weights & Biases. `mode='offline'` (the default) needs no network
  or account: the run is written under `<directory>/wandb/` and `wandb sync` uploads it later.
  The run id is kept in `<directory>/wandb/run_id`, so a resumed run continues the same W&B
  run."""

  def __init__(self, directory: str | os.PathLike, config: Mapping | None = None, *,
               project: str = 'diffusion_jax', mode: str = 'offline'):
    import wandb  # pylint: disable=g-import-not-at-top
    directory = os.fspath(directory)
    os.makedirs(os.path.join(directory, 'wandb'), exist_ok=True)
    id_path = os.path.join(directory, 'wandb', 'run_id')
    run_id = None
    if os.path.exists(id_path):
      with open(id_path, encoding='utf-8') as f:
        run_id = f.read().strip() or None
    if run_id is None:
      run_id = uuid.uuid4().hex[:12]
      with open(id_path, 'w', encoding='utf-8') as f:
        f.write(run_id)
    self._wandb = wandb
    self._run = wandb.init(dir=directory, project=project, mode=mode, id=run_id,
                           resume='allow', config=dict(config or {}),
                           name=os.path.basename(os.path.abspath(directory)),
                           settings=wandb.Settings(console='off', silent=True))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    values = {k: _to_python(v) for k, v in scalars.items()}
    self._run.log({k: v for k, v in values.items() if v is not None}, step=int(step))

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    self._run.log({k: self._wandb.Image(np.asarray(v, np.uint8)) for k, v in images.items()},
                  step=int(step))

  def close(self) -> None:
    self._run.finish()


class MultiWriter:
  """One `write` / `write_images` / `close` for several writers (JSONL keeps no images)."""

  def __init__(self, writers):
    self.writers = list(writers)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    for w in self.writers:
      w.write(step, scalars)

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    for w in self.writers:
      if hasattr(w, 'write_images'):
        w.write_images(step, images)

  def close(self) -> None:
    for w in self.writers:
      w.close()


def make_writers(names, workdir: str, *, resume_step: int | None = None,
                 config: Mapping | None = None, wandb_project: str = 'diffusion_jax',
                 wandb_mode: str = 'offline') -> MultiWriter:
  """The writers `names` (from `parse_writers`) of a run in `workdir`: `metrics.jsonl`,
  TensorBoard event files in `<workdir>/tensorboard`, a W&B run in `<workdir>/wandb`."""
  out = []
  for name in names:
    if name == 'jsonl':
      out.append(JsonlWriter(os.path.join(workdir, 'metrics.jsonl'), resume_step=resume_step))
    elif name == 'tensorboard':
      out.append(TensorBoardWriter(os.path.join(workdir, 'tensorboard'),
                                   resume_step=resume_step))
    elif name == 'wandb':
      out.append(WandbWriter(workdir, config, project=wandb_project, mode=wandb_mode))
  return MultiWriter(out)
