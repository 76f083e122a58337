r"""WaveGrad on the embedded audio: quality against the number of refinement iterations.

  python -m experiments.audio_iterations --workdir=runs/wavegrad \
      [--num_samples=64] [--num_1000=16] [--seeds=0,1,2] [--search_clips=16] [--out=docs/audio]

`--workdir` is a finished `configs/wavegrad_synth.py` run (trained with
`python -m experiments.train --config=configs/wavegrad_synth.py --workdir=runs/wavegrad`).

1. Schedule search (WaveGrad §4): for 6 and 50 iterations, every candidate of
   `audio.schedules.candidates` (linear and geometric betas between start and end points) is
   scored by the log-mel MSE of samples against `--search_clips` TRAINING clips (the held-out
   clips are kept for the table), one seed; the best is saved beside the checkpoints in
   `<workdir>/schedules/wavegrad_<N>.json` and reused by a later call.
2. The table: each schedule samples the first `--num_samples` held-out clips' spectrograms
   (`--num_1000` for the 1000-iteration training schedule, which costs 1000 network calls per
   clip) with each seed; LSD, MCD and MR-STFT distance against the recorded clips
   (`metrics.audio`), mean ± standard deviation over seeds, beside the real-data floor (a second
   rendering of the same utterances scored against the first: what a perfect model of
   p(waveform | mel) scores). The WaveGrad rows use DDPM's ancestral step between the schedule's
   levels; one row shows the library's DPM-Solver++(2M) on its default grid for comparison.
Writes `results.md`, `results.json`, `iterations.png` (metric against iterations) and
`spectrograms.png` (a held-out clip and its samples per schedule) in `--out`.
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

_WORKDIR = flags.DEFINE_string('workdir', None, 'A finished configs/wavegrad_synth.py run.')
_NUM = flags.DEFINE_integer('num_samples', 64, 'Held-out clips per schedule and seed.',
                            lower_bound=1)
_NUM_1000 = flags.DEFINE_integer('num_1000', 16, 'Held-out clips for the 1000-iteration row '
                                 '(0: leave the row out).', lower_bound=0)
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds of the prior noise and sampler.')
_SEARCH = flags.DEFINE_integer('search_clips', 16, 'Training clips scoring the schedule search.',
                               lower_bound=1)
_OUT = flags.DEFINE_string('out', 'docs/audio', 'Where results.md / .json / the PNGs go.')
flags.mark_flags_as_required(['workdir'])

METRICS = ('lsd', 'mcd', 'mr_stft')


def with_sampler(setup, sampler: str, steps: int, options: dict):
  sample = dataclasses.replace(setup.sample, sampler=sampler, steps=steps, options=options)
  return dataclasses.replace(setup, sample=sample)


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  cli.setup_runtime()
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from diffusion_jax import generation
  from diffusion_jax.audio import conditioning
  from diffusion_jax.audio import io as audio_io
  from diffusion_jax.audio import schedules
  # pylint: enable=g-import-not-at-top
  try:
    seeds = [int(s) for s in _SEEDS.value]
  except ValueError:
    cli.fail(f'--seeds={",".join(_SEEDS.value)}: expected integers')
  if not seeds:
    cli.fail('--seeds is empty')
  workdir = os.path.abspath(_WORKDIR.value)
  out_dir = os.path.abspath(_OUT.value)
  os.makedirs(out_dir, exist_ok=True)
  t0 = time.time()
  config, setup, params, step = cli.load_run(workdir)
  if getattr(setup.condition, 'key', None) != conditioning.KEY:
    cli.fail(f'{workdir}: not a mel-conditioned run (its config has no mel section)')
  process, mel = setup.process, conditioning.mel_config(config.mel)
  process_config = dict(config.process)

  def sample(setup_s, conds, seed):
    fn = generation.make_sample_fn(setup_s)
    return generation.generate(fn, params, jax.random.key(seed), len(conds),
                               min(setup.sample.batch_size, len(conds)), setup.image_shape,
                               conds)

  def wavegrad(steps, times):
    return with_sampler(setup, schedules.SAMPLER, steps,
                        {**schedules.SAMPLER_OPTIONS, 'grid': tuple(times)})

  # 1. The schedule search on training clips.
  train_clips = np.asarray(setup.source.images[:_SEARCH.value], np.float32)
  train_conds = setup.condition(train_clips)

  def ls_mse(steps):
    def score(times):
      x = sample(wavegrad(steps, times), train_conds, 0)
      if not np.all(np.isfinite(x)):
        return float('inf')
      return float(np.mean((setup.condition(np.clip(x, -1, 1)) - train_conds) ** 2))
    return score

  searched = {}
  for n in (6, 50):
    path = os.path.join(workdir, 'schedules', f'wavegrad_{n}.json')
    if os.path.isfile(path):
      with cli.user_errors():
        searched[n] = schedules.load(path, process_config, n)
      print(f'{n} iterations: reusing {path} ({searched[n]["name"]})', flush=True)
      continue
    t1 = time.time()
    result = schedules.search(ls_mse(n), process, n,
                              progress=lambda name, v: print(f'  {name}: {v:.4f}', flush=True))
    schedules.save(path, result, process_config)
    searched[n] = {**schedules.load(path, process_config, n), 'table': result['table'],
                   'seconds': time.time() - t1}
    print(f'{n} iterations: best {result["name"]} (LS-MSE {result["score"]:.4f}, '
          f'{time.time() - t1:.0f} s) -> {path}', flush=True)

  # 2. The table on held-out clips.
  num = _NUM.value
  conditions = generation.sample_conditions(setup, num)
  paper50 = schedules.linear_betas(*schedules.WAVEGRAD_50)
  train = schedules.linear_betas(*schedules.TRAIN_BETAS)
  rows_spec = [
      ('WaveGrad 6, searched', 6, wavegrad(6, searched[6]['times']), searched[6]['name']),
      ('WaveGrad 50, searched', 50, wavegrad(50, searched[50]['times']), searched[50]['name']),
      ('WaveGrad 50, paper', 50, wavegrad(50, schedules.times(process, paper50)),
       'linear(0.0001, 0.05)'),
      ('DPM-Solver++(2M), 6', 6, with_sampler(setup, 'dpm_solver_pp_2m', 6, {}),
       'log-SNR grid'),
      ('DPM-Solver++(2M), 50', 50, with_sampler(setup, 'dpm_solver_pp_2m', 50, {}),
       'log-SNR grid'),
  ]
  if _NUM_1000.value:
    rows_spec.append(('WaveGrad 1000, training schedule', 1000,
                      wavegrad(1000, schedules.times(process, train)), 'linear(1e-06, 0.01)'))
  rows, shown = [], {'reference': conditions.references[:1]}
  for name, iters, setup_s, schedule in rows_spec:
    n = _NUM_1000.value if iters == 1000 else num
    head = conditions.head(n)
    per_seed, t1 = [], time.time()
    for seed in seeds:
      x = sample(setup_s, head.cond, seed)
      per_seed.append(setup.condition.reference_metrics(x, head.references))
      if seed == seeds[0]:
        shown[name] = x[:1]
    seconds = (time.time() - t1) / len(seeds)
    row = {'name': name, 'iterations': iters, 'schedule': schedule, 'num_clips': n,
           'seconds_per_seed': seconds}
    for k in METRICS:
      vals = np.asarray([m[k] for m in per_seed])
      row[k], row[f'{k}_std'] = float(vals.mean()), float(vals.std())
      row[f'{k}_floor'] = per_seed[0].get(f'{k}_floor')
    rows.append(row)
    print(f'{name}: ' + ', '.join(f'{k}={row[k]:.3f}±{row[f"{k}_std"]:.3f} '
                                  f'(floor {row[f"{k}_floor"]:.3f})' for k in METRICS)
          + f' [{seconds:.0f} s/seed, {n} clips]', flush=True)

  audio_io.save_spectrogram_png(
      os.path.join(out_dir, 'spectrograms.png'),
      [setup.condition(np.clip(v, -1, 1))[0] for v in shown.values()], list(shown), mel)
  _plot(os.path.join(out_dir, 'iterations.png'), rows)
  with open(os.path.join(workdir, 'eval.json'), encoding='utf-8') as f:
    run_eval = json.load(f)
  info = {'command': 'python -m experiments.audio_iterations ' + ' '.join(sys.argv[1:]),
          'workdir': os.path.relpath(workdir), 'step': step, 'seeds': seeds,
          'search_clips': _SEARCH.value, 'process': process_config, 'mel': dict(config.mel),
          'model': dict(config.model), 'train_steps': int(config.train.num_steps),
          'batch_size': int(config.train.batch_size),
          'train_seconds': run_eval.get('train_seconds'), 'run_eval': run_eval,
          'searched': {n: {k: v for k, v in s.items() if k != 'times'}
                       for n, s in searched.items()},
          'devices': str(jax.devices()), 'total_seconds': time.time() - t0}
  with open(os.path.join(out_dir, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump({'info': info, 'rows': rows}, f, indent=1, default=float)
  with open(os.path.join(out_dir, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(report(info, rows))
  print(f'Wrote {out_dir}/results.md, results.json, iterations.png, spectrograms.png',
        flush=True)


def _plot(path: str, rows: list[dict]) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.2))
  for ax, k in zip(axes, METRICS, strict=True):
    for family, marker in (('WaveGrad', 'o'), ('DPM', 's')):
      pts = sorted((r['iterations'], r[k], r[f'{k}_std']) for r in rows
                   if r['name'].startswith(family) and 'paper' not in r['name'])
      if pts:
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts],
                    marker=marker, capsize=3, label=family)
    floor = rows[0][f'{k}_floor']
    if floor is not None:
      ax.axhline(floor, color='k', ls='--', lw=1, label='real-data floor')
    ax.set_xscale('log')
    ax.set_xlabel('iterations (network calls)')
    ax.set_title(k.upper().replace('_', '-'))
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def report(info: dict, rows: list[dict]) -> str:
  ev = info['run_eval']
  lines = [
      '# WaveGrad on the embedded audio: quality against iterations', '',
      f'Run `{info["workdir"]}` (`configs/wavegrad_synth.py`, {info["train_steps"]} steps at '
      f'batch {info["batch_size"]}, checkpoint step {info["step"]}, trained in '
      f'{(info["train_seconds"] or 0) / 60:.1f} min on 2 CPU cores). Every sample is conditioned '
      'on the log-mel spectrogram of a held-out clip and scored against that clip: log-spectral '
      'distance (LSD, dB), mel-cepstral distortion (MCD, dB) and multi-resolution STFT distance '
      '(MR-STFT); lower is better. Mean ± standard deviation over seeds '
      f'{", ".join(map(str, info["seeds"]))} (prior noise and sampler noise); times per seed '
      'on 2 shared CPU cores. The floor scores a '
      'second rendering of the same utterances (fresh phases, noise and jitter) against the '
      'first: a perfect model of p(waveform | mel) scores it.', '',
      f'Command: `{info["command"]}`.', '',
      '| schedule | iterations | betas | clips | LSD | MCD | MR-STFT | s / seed |',
      '|---|---:|---|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(f'| {r["name"]} | {r["iterations"]} | {r["schedule"]} | {r["num_clips"]} | '
                 + ' | '.join(f'{r[k]:.3f} ± {r[f"{k}_std"]:.3f}' for k in METRICS)
                 + f' | {r["seconds_per_seed"]:.1f} |')
  floors = {r['num_clips']: r for r in rows if r.get('lsd_floor') is not None}
  for n, floor in sorted(floors.items(), reverse=True):
    lines.append(f'| real-data floor (second take) | | | {n} | '
                 + ' | '.join(f'{floor[f"{k}_floor"]:.3f}' for k in METRICS) + ' | |')
  lines += ['', 'Searched schedules (log-mel MSE on training clips, one seed): '
            + '; '.join(f'{n} iterations: {s["name"]} (LS-MSE {s["score"]:.4f})'
                        for n, s in info['searched'].items()) + '.', '',
            'The training loop\'s own evaluation (its configured sampler): '
            + ', '.join(f'{k}={ev[k]:.3f}' for k in METRICS if k in ev) + '.', '']
  return '\n'.join(lines)


if __name__ == '__main__':
  app.run(main)
