r"""ControlNet on the digits: control fidelity and FD against the control strength.

  python -m experiments.controlnet_strength --workdir=runs/controlnet_strength \
      [--base=runs/digits] [--strengths=0,0.25,0.5,1,1.5] [--num_samples=1000] \
      [--out=docs/controlnet] [--smoke]

1. The base: `--base`, a finished unconditional digits run (`configs/digits.py`); without it,
   one is trained in `<workdir>/base` (kept: a second call reuses it).
2. The ControlNet: `configs/controlnet_digits.py` (Sobel edge maps) on that base, trained in
   `<workdir>/control` (skipped if that run already finished); the training loop's own
   evaluation (FD and control fidelity at strength 1) is in its eval.json.
3. Sampling: sample i is conditioned on held-out test digit i's edge map (cycled), at each
   strength (`ControlNet.strength`, the sampling option `config.control.strength`), from the
   same prior noise and sampler keys, so strength 0 gives exactly the base model's samples.
   Each row reports digits FD (beside the floor of as many real training digits) and the control
   fidelity: the edge operator applied to the samples against the maps they were given (IoU of
   the binary maps, L1). Two references: the test digits against their own maps (1 and 0 by
   construction) and against the map of another test digit (the next one), the fidelity of an
   image unrelated to its map.
Writes `results.md`, `results.json` and `controlnet.png` (rows: the test digits the maps came
from, the maps, the samples at each strength) in `--out`.
"""

import dataclasses
import json
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from experiments import cli  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the base (unless --base) and the '
                               'ControlNet runs are trained.')
_BASE = flags.DEFINE_string('base', None, 'Work dir of a finished unconditional digits run '
                            '(configs/digits.py); default: train one in <workdir>/base.')
_STRENGTHS = flags.DEFINE_list('strengths', ['0', '0.25', '0.5', '1', '1.5'],
                               'Control strengths to sample at.')
_NUM = flags.DEFINE_integer('num_samples', 1000, 'Samples per strength.', lower_bound=1)
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the prior noise and sampler keys.')
_OUT = flags.DEFINE_string('out', 'docs/controlnet', 'Where results.md / .json / the PNG go.')
_GRID = flags.DEFINE_integer('grid', 12, 'Conditions shown in controlnet.png.', lower_bound=1)
_SMOKE = flags.DEFINE_bool('smoke', False, 'Smoke variants of both configs (seconds).')
flags.mark_flags_as_required(['workdir'])


def train_if_needed(config, workdir: str, what: str) -> None:
  """Trains `config` in `workdir` unless a finished run (its eval.json) is there."""
  from diffusion_jax import train_loop  # pylint: disable=g-import-not-at-top
  if os.path.isfile(os.path.join(workdir, 'eval.json')):
    print(f'{what}: reusing the finished run in {workdir}', flush=True)
    return
  with config.unlocked():
    config.eval.cache_dir = config.eval.cache_dir or cli.default_cache_dir()
  print(f'{what}: training in {workdir}', flush=True)
  with cli.user_errors():
    result = train_loop.train_and_evaluate(config, workdir)
  print(train_loop.format_eval_line(result), flush=True)


def parse_strengths(values) -> list[float]:
  try:
    strengths = [float(v) for v in values]
  except ValueError:
    strengths = []
  if not strengths or any(s < 0 for s in strengths):
    cli.fail(f'--strengths={",".join(values)}: expected non-negative numbers')
  return strengths


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  if not (_WORKDIR.value or '').strip():
    cli.fail('--workdir is empty: name the directory the runs are trained in')
  cli.setup_runtime()
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from configs import controlnet_digits
  from configs import digits as digits_config
  from diffusion_jax import evaluation
  from diffusion_jax import generation
  from diffusion_jax import images as images_lib
  from diffusion_jax.data import control as control_lib
  from diffusion_jax.metrics import digits_classifier
  # pylint: enable=g-import-not-at-top
  strengths = parse_strengths(_STRENGTHS.value)
  variant = 'smoke' if _SMOKE.value else None
  workdir = os.path.abspath(_WORKDIR.value)
  out_dir = os.path.abspath(_OUT.value)
  os.makedirs(out_dir, exist_ok=True)

  # 1-2. The base and the ControlNet.
  base_dir = os.path.abspath(_BASE.value) if _BASE.value else os.path.join(workdir, 'base')
  if _BASE.value:
    if not os.path.isfile(os.path.join(base_dir, 'config.json')):
      cli.fail(f'--base={_BASE.value}: no config.json there (not a finished run)')
  else:
    train_if_needed(digits_config.get_config(variant), base_dir, 'base')
  control_dir = os.path.join(workdir, 'control')
  config = controlnet_digits.get_config(variant)
  config.base.workdir = base_dir
  t0 = time.time()
  train_if_needed(config, control_dir, 'ControlNet')
  with open(os.path.join(control_dir, 'eval.json'), encoding='utf-8') as f:
    run_eval = json.load(f)
  base_eval = {}
  if os.path.isfile(os.path.join(base_dir, 'eval.json')):
    with open(os.path.join(base_dir, 'eval.json'), encoding='utf-8') as f:
      base_eval = json.load(f)

  # 3. Sampling at each strength, conditioned on held-out maps, from the same noise.
  _, setup, params, step = cli.load_run(control_dir)
  if getattr(setup, 'condition', None) is None or not hasattr(setup.model, 'strength'):
    cli.fail(f'{control_dir}: not a ControlNet run (its config has no control section)')
  num = _NUM.value
  conds = generation.sample_conditions(setup, num)
  maps, refs = conds.cond, conds.references
  op = setup.condition.fn
  cls_params, cls_info = digits_classifier.load_or_train_digits_classifier(
      setup.eval.cache_dir or cli.default_cache_dir(), seed=0)
  key = jax.random.key(_SEED.value)
  rows, grid = [], {'test digit': refs[:_GRID.value], 'edge map': 2.0 * maps[:_GRID.value] - 1.0}
  for s in strengths:
    t1 = time.time()
    at = dataclasses.replace(setup, model=setup.model.clone(strength=s))
    samples = generation.generate(generation.make_sample_fn(at), params, key, num,
                                  setup.sample.batch_size, setup.image_shape, maps)
    fid = control_lib.control_fidelity(samples, maps, op)
    row = {'strength': s, 'iou': float(fid.iou.mean()), 'iou_std': float(fid.iou.std()),
           'l1': float(fid.l1.mean()), 'l1_std': float(fid.l1.std()),
           **evaluation.digits_metrics(cls_params, cls_info, samples),
           'sample_seconds': time.time() - t1}
    row['fd_ratio'] = row['fd'] / row['fd_floor']
    rows.append(row)
    grid[f'strength {s:g}'] = samples[:_GRID.value]
    print(f'strength {s:g}: IoU={row["iou"]:.3f} L1={row["l1"]:.3f} FD={row["fd"]:.3f} '
          f'floor={row["fd_floor"]:.3f} ({row["sample_seconds"]:.0f} s)', flush=True)
  own = control_lib.control_fidelity(refs, maps, op)
  other = control_lib.control_fidelity(np.roll(refs, -1, axis=0), maps, op)
  references = {'own': {'iou': float(own.iou.mean()), 'l1': float(own.l1.mean())},
                'other': {'iou': float(other.iou.mean()), 'l1': float(other.l1.mean())}}

  tiles = np.concatenate(list(grid.values()))
  images_lib.save_png(os.path.join(out_dir, 'controlnet.png'),
                      images_lib.make_grid(tiles, ncol=min(_GRID.value, num), upscale=4))
  info = {'command': 'python -m experiments.controlnet_strength ' + ' '.join(sys.argv[1:]),
          'base': os.path.relpath(base_dir), 'control': os.path.relpath(control_dir),
          'control_step': step, 'num_samples': num, 'seed': _SEED.value,
          'sampler': f'{setup.sample.sampler} {setup.sample.steps}',
          'operator': dict(config.control), 'train_steps': int(config.train.num_steps),
          'batch_size': int(config.train.batch_size),
          'control_train_seconds': run_eval.get('train_seconds'),
          'base_train_seconds': base_eval.get('train_seconds'),
          'base_steps': base_eval.get('step'), 'run_eval': run_eval,
          'grid_rows': list(grid), 'devices': str(jax.devices()),
          'total_seconds': time.time() - t0}
  with open(os.path.join(out_dir, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump({'info': info, 'rows': rows, 'references': references}, f, indent=1,
              default=float)
  with open(os.path.join(out_dir, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(report(info, rows, references))
  print(f'Wrote {out_dir}/results.md, results.json, controlnet.png', flush=True)


def report(info: dict, rows: list[dict], references: dict) -> str:
  ev = info['run_eval']
  lines = [
      '# ControlNet on the digits: control strength', '',
      f'Base `{info["base"]}` (an unconditional `configs/digits.py` run, step '
      f'{info["base_steps"]}), frozen; ControlNet `{info["control"]}` '
      f'(`configs/controlnet_digits.py`, {info["train_steps"]} steps at batch '
      f'{info["batch_size"]}, checkpoint step {info["control_step"]}; {_control(info)}). '
      f'Sample i is conditioned on the edge map of held-out test digit i '
      f'(cycled); {info["num_samples"]} samples per strength, sampler {info["sampler"]}, the '
      f'same prior noise and sampler keys (seed {info["seed"]}) at every strength, so strength '
      f'0 gives the base model\'s own samples (every residual is exactly 0).', '',
      f'Command: `{info.get("command", "python -m experiments.controlnet_strength")}`.', '',
      'Control fidelity: the Sobel edge operator applied to each sample against the map it was '
      'given: IoU of the binary maps (higher is better) and mean |difference| (L1, lower is '
      'better), mean ± standard deviation over samples. FD: digits classifier features against '
      'the 450 test digits; the floor is as many real training digits against the same test '
      'digits.', '',
      '| strength | IoU | L1 | FD | FD floor | FD/floor | sample s |',
      '|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| {r["strength"]:g} | {r["iou"]:.3f} ± {r["iou_std"]:.3f} | '
                 f'{r["l1"]:.3f} ± {r["l1_std"]:.3f} | {r["fd"]:.2f} | {r["fd_floor"]:.2f} | '
                 f'{r["fd_ratio"]:.2f} | {r["sample_seconds"]:.0f} |')
  o, u = references['own'], references['other']
  lines += [
      '', 'References: the test digits against their own maps, IoU '
      f'{o["iou"]:.3f}, L1 {o["l1"]:.3f} (1 and 0 by construction); against the next test '
      f'digit\'s map (an image unrelated to its map), IoU {u["iou"]:.3f}, L1 {u["l1"]:.3f}.', '',
      f'The training run\'s own final evaluation (strength 1, its own sampling key): FD '
      f'{ev.get("fd", float("nan")):.2f} (floor {ev.get("fd_floor", float("nan")):.2f}), '
      f'control IoU {ev.get("control_iou", float("nan")):.3f}, L1 '
      f'{ev.get("control_l1", float("nan")):.3f}.', '',
      'Reading the FD column: the samples are conditioned on the test digits\' maps and FD is '
      'measured against those same test digits, so a sample that follows its map closely is '
      'close to the test digit the map came from. A perfectly controlled model would reproduce '
      'the test set and could go below the floor (real training digits against the test '
      'digits). Falling FD with strength therefore shows control as much as image quality; '
      'strength 0 is the unconditional base.', '',
      f'Training time: ControlNet {_seconds(info["control_train_seconds"])}, base '
      f'{_seconds(info["base_train_seconds"])} (shared 2-core machine; see the log for load).',
      '', f'`controlnet.png`, rows top to bottom: {", ".join(info["grid_rows"])}.', '',
      f'Devices: {info["devices"]}.']
  return '\n'.join(lines) + '\n'


def _control(info: dict) -> str:
  op = info['operator']
  threshold = 'default' if op.get('threshold') is None else op['threshold']
  return (f'operator {op["operator"]!r} (threshold {threshold}), hint channels '
          f'{tuple(op["hint_channels"])}')


def _seconds(value) -> str:
  return 'n/a' if value is None else f'{value:.0f} s'


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
