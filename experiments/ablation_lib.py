"""The machinery of the ablation scripts: run configs from one base, trainings, evaluation grids,
tables and figures. Everything a run leaves is in its own work dir, and every result is cached
there as JSON, so a rerun skips what is done and a sweep can be trained elsewhere (a SLURM job
array through `launch/slurm/sweep.sh`) and evaluated here.

Layout of an ablation's work dir:

  runs/<name>_s<seed>/     an ordinary training run (checkpoints/, config.json, samples.png),
                           plus eval_<sampler>_nfe<N>.json, curve_<step>.json, loss_vs_logsnr.json
  results.csv / .md        one row per (run, sampler, NFE) / the pivot table, mean +- std
  curve.csv                the metric at every kept checkpoint
  *.png                    the figures
"""

import copy
import csv
import dataclasses
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from diffusion_jax import checkpointing
from diffusion_jax import configuration
from diffusion_jax import evaluation
from diffusion_jax import generation
from diffusion_jax import latent_pipeline
from diffusion_jax import parallel
from diffusion_jax import parameterization
from diffusion_jax import run_config
from diffusion_jax import samplers
from diffusion_jax import train_loop
from diffusion_jax.configuration import ConfigError
from diffusion_jax.data import digits
from diffusion_jax.data import latents as latents_lib


@dataclasses.dataclass(frozen=True)
class Run:
  name: str                   # e.g. 'flow_s0'
  objective: str              # the key of `ablation.runs`
  seed: int
  config: ml_collections.ConfigDict
  samplers: tuple[str, ...]
  nfes: tuple[int, ...]


def split_list(value, key: str, kind=str) -> tuple:
  """'a,b,c' (or a sequence) -> a tuple; a one-line ConfigError naming `key` otherwise."""
  items = value.split(',') if isinstance(value, str) else list(value)
  try:
    out = tuple(kind(v.strip() if isinstance(v, str) else v) for v in items if str(v).strip())
  except ValueError:
    raise ConfigError(f'config.ablation.{key}={value!r}: expected comma-separated '
                      f'{kind.__name__}s') from None
  if not out:
    raise ConfigError(f'config.ablation.{key} is empty')
  return out


def base_and_ablation(config: ml_collections.ConfigDict):
  """The training config (every section but `ablation`) and the ablation section."""
  if 'ablation' not in config:
    raise ConfigError('config.ablation: this config has no ablation section (see '
                      'configs/ablation_digits.py)')
  base = ml_collections.ConfigDict({k: copy.deepcopy(v.to_dict() if hasattr(v, 'to_dict') else v)
                                    for k, v in config.items() if k != 'ablation'})
  return base, config.ablation


def make_runs(config: ml_collections.ConfigDict, names=None) -> list[Run]:
  """One `Run` per (objective, seed): the base config with the objective's sections replaced
  (process, objective) or updated (others), the seed set, checkpoints kept every
  `curve_every` steps, and the in-loop evaluation off (the grid measures instead). Model,
  data, optimizer and step budget are the base's for every run: equal compute."""
  base, ab = base_and_ablation(config)
  definitions = ab.runs.to_dict() if hasattr(ab.runs, 'to_dict') else dict(ab.runs)
  names = split_list(ab.objectives if names is None else names, 'objectives')
  for n in names:
    if n not in definitions:
      raise ConfigError(f'config.ablation.objectives: unknown run {n!r}; choose from '
                        f'{sorted(definitions)}')
  runs = []
  for n in names:
    spec = dict(definitions[n])
    run_samplers = split_list(spec.pop('samplers', ab.samplers), 'samplers')
    run_nfes = split_list(spec.pop('nfes', ab.nfes), 'nfes', int)
    for s in run_samplers:
      if s not in samplers.SAMPLERS:
        raise ConfigError(f'config.ablation.samplers: unknown sampler {s!r}')
    for seed in split_list(ab.seeds, 'seeds', int):
      c = ml_collections.ConfigDict(base.to_dict())
      for section, values in spec.items():
        if section in ('process', 'objective'):
          c[section] = dict(values)
        else:
          c[section].update(values)
      if c.objective.name == 'consistency_training' and 'total_steps' not in c.objective:
        c.objective.total_steps = c.train.num_steps   # the curriculum spans the whole run
      c.seed = seed
      # Checkpoints at every multiple of curve_every, kept (orbax keep_period).
      c.train.keep_every = int(ab.curve_every)
      c.train.checkpoint_every = math.gcd(int(c.train.checkpoint_every), int(ab.curve_every))
      c.eval.enabled = False
      # The run's own samples.png: its first ablation sampler.
      c = _with_sampler(c, run_samplers[0], min(int(ab.curve_nfe), max(run_nfes)))
      runs.append(Run(f'{n}_s{seed}', n, seed, c, run_samplers, run_nfes))
  return runs


def nfe_of(sampler: str, setup, steps: int) -> float:
  """The exact NFE of `sampler` at `steps` for this setup's process and prediction kind, from
  tracing it with a stand-in denoiser (nothing is computed); inf if it refuses those steps.
  Memoized on (sampler, steps, process, kind, image shape): a trace builds the time grid
  eagerly, which compiles a few ops for every new step count (~1 s on 2 CPU cores)."""
  return _traced_nfe(sampler, int(steps), setup.process, setup.objective.kind,
                     tuple(setup.image_shape))


@functools.lru_cache(maxsize=None)
def _traced_nfe(sampler: str, steps: int, process, kind: str, image_shape: tuple) -> float:
  out = {}

  if kind in parameterization.FLOW_MAP_KINDS:      # MeanFlow, shortcut: sampled by jumps
    den = parameterization.FlowMap(lambda x, t, s, cond=None: x, kind=kind)
  else:
    den = parameterization.Denoiser(lambda x, t, cond=None: (x, x), kind=kind)

  def f(x):
    y, info = samplers.SAMPLERS[sampler](den, process, x, jax.random.key(0), steps=steps)
    out['nfe'] = info['nfe']
    return y
  try:
    jax.eval_shape(f, jax.ShapeDtypeStruct((1,) + image_shape, jnp.float32))
  except (ValueError, TypeError):
    return math.inf
  return int(out['nfe'])


def steps_for_nfe(sampler: str, setup, nfe: int) -> tuple[int, int]:
  """The most steps of `sampler` whose exact NFE is <= `nfe`, and that NFE (NFE grows with
  the steps); `(0, 0)` if even one step costs more."""
  best = (0, 0)
  for steps in range(1, nfe + 1):
    cost = nfe_of(sampler, setup, steps)
    if cost > nfe:
      if best[0]:
        break
      continue
    best = (steps, int(cost))
  return best


def _json(path, compute):
  """The cached JSON result at `path`, or `compute()` written there atomically."""
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  result = compute()
  tmp = f'{path}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(result, f, indent=2)
  os.replace(tmp, path)
  return result


def _with_sampler(config, sampler: str, steps: int):
  """`config` sampling with `sampler` at `steps`, every other sampler option at its default."""
  c = ml_collections.ConfigDict(config.to_dict())
  for k in c.sample.get('options', {}):
    c.sample.options[k] = None
  c.sample.update(sampler=sampler, steps=steps)
  return c


@functools.lru_cache(maxsize=4)
def _restored(run_dir: str, config_json: str, step: int | None):
  """`(setup, state, step)` of a run's checkpoint, restored once per (run, step) and config."""
  return train_loop.load_checkpoint(ml_collections.ConfigDict(json.loads(config_json)), run_dir,
                                    step=step)


@functools.lru_cache(maxsize=4)
def _decoder(run_dir: str, config_json: str):
  """`decode(scaled latents) -> images` of a latent diffusion run (its autoencoder stage)."""
  config = ml_collections.ConfigDict(json.loads(config_json))
  info = latents_lib.read_info(os.path.join(run_dir, latent_pipeline.LATENTS_DIR))
  return latent_pipeline.latent_decoder(latent_pipeline.autoencoder_config(config),
                                        os.path.join(run_dir, latent_pipeline.AUTOENCODER_DIR),
                                        info)


def measure(run_dir: str, config, sampler: str, steps: int, num: int, cache_dir: str,
            step: int | None = None, keep_options: bool = False) -> dict:
  """Samples `num` images of the run's checkpoint (`step`, default the newest; EMA
  parameters) with `sampler` at `steps`, from the key the run itself samples with, and returns
  the metrics of the data (FD... for digits, SW... for 2-D toys), `nfe` and seconds.
  `keep_options` keeps the config's other sampler options (else they take their defaults)."""
  base, state, at = _restored(run_dir, config.to_json(), step)
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.sample.update(sampler=sampler, steps=steps)
  if not keep_options:
    cfg = _with_sampler(config, sampler, steps)
  sample = configuration.from_section(run_config.SampleConfig, 'sample', cfg.sample)
  run_config.check_sampler(sample, base.process, base.objective, base.image_shape)
  setup = dataclasses.replace(base, sample=sample)
  conditions = generation.sample_conditions(setup, num)
  key = jax.random.split(jax.random.key(cfg.seed))[1]
  t0 = time.time()
  x = generation.generate(generation.make_sample_fn(setup), state.ema_params, key, num,
                          setup.sample.batch_size, setup.image_shape, conditions.cond)
  if 'latent' in config:             # latent diffusion: measured on the decoded images
    x = parallel.map_batches(_decoder(run_dir, config.to_json()), x, setup.sample.batch_size,
                             parallel.make_mesh())
  seconds = time.time() - t0
  result = evaluation.evaluate_samples(setup.data.name, setup.source, x, conditions.labels,
                                       cache_dir, prompts=conditions.prompts,
                                       digits_clip_steps=setup.eval.digits_clip_steps)
  result.update(step=int(at), sampler=sampler, steps=steps, sample_seconds=seconds,
                nfe=nfe_of(sampler, setup, steps) * (2 if _guided(setup) else 1))
  return result


def loss_vs_log_snr(run_dir: str, config, *, repeats: int = 20, bins: int = 24) -> dict:
  """The trained (EMA) model's per-example objective over log-SNR on held-out data: the loss
  itself and, divided by the objective's eps-MSE weight, the eps-MSE it implies (one axis for
  every objective, Kingma & Gao 2023). Binned means over `repeats` draws of t and noise."""
  setup, state, _ = train_loop.load_checkpoint(config, run_dir)
  x = _heldout(setup)

  @jax.jit
  def aux(params, key):
    def model_fn(x_t, t, c):
      return setup.model.apply({'params': params}, x_t, t, c)
    _, a = setup.objective(model_fn, x, key, None,
                           **({'step': setup.train.num_steps} if _takes_step(setup) else {}))
    return a['log_snr'], a['loss_per_example'], a.get('eps_weight', jnp.full_like(a['log_snr'],
                                                                                  jnp.nan))
  draws = [jax.tree.map(np.asarray, aux(state.ema_params, jax.random.key(100 + r)))
           for r in range(repeats)]
  lam, loss, weight = (np.concatenate([d[i] for d in draws]) for i in range(3))
  finite = np.isfinite(lam)
  lam, loss, weight = lam[finite], loss[finite], weight[finite]
  edges = np.quantile(lam, np.linspace(0, 1, bins + 1))
  which = np.clip(np.searchsorted(edges, lam, side='right') - 1, 0, bins - 1)
  has_weight = bool(np.all(np.isfinite(weight)))
  out = {'log_snr': [], 'loss': [], 'eps_mse': [] if has_weight else None}
  for b in range(bins):
    sel = which == b
    if sel.any():
      out['log_snr'].append(float(lam[sel].mean()))
      out['loss'].append(float(loss[sel].mean()))
      w = weight[sel]
      if has_weight:
        out['eps_mse'].append(float(np.mean(loss[sel][w > 0] / w[w > 0])) if np.any(w > 0)
                              else float('nan'))
  return out


def _guided(setup) -> bool:
  """Classifier-free guidance evaluates the network twice per call."""
  return setup.cond_key is not None and setup.sample.guidance_scale != 1.0


def _takes_step(setup) -> bool:
  return setup.objective.takes_step


def _heldout(setup) -> np.ndarray:
  if setup.data.name == 'digits':
    return digits.load_digits('test', setup.image_shape[0])[0]
  if setup.data.name == 'toy2d':
    return setup.source.sample(jax.random.key(evaluation.TOY_REFERENCE_SEED + 1), 2048)
  return setup.source.batch(0, 0, 512)['image']


def metric_name(config) -> str:
  return 'sw' if config.data.name == 'toy2d' else 'fd'


class SweepProgress:
  """One progress bar (with ETA) over the whole sweep, in rough units of training steps."""

  def __init__(self, total: float, desc: str):
    self.bar = tqdm.tqdm(total=round(total), desc=desc, unit='u', dynamic_ncols=True,
                         position=1, mininterval=1.0)

  def done(self, units: float, note: str = ''):
    self.bar.set_postfix_str(note, refresh=False)
    self.bar.update(round(units))

  def close(self):
    self.bar.close()


def sample_units(nfe: int, num: int, config) -> float:
  """The cost of sampling in training-step units: one step is ~3 forward passes of a batch."""
  return nfe * num / (3.0 * config.train.batch_size) + 20.0   # + compile and metrics


def write_csv(path: str, rows: list[dict]) -> None:
  keys = []
  for r in rows:
    keys += [k for k in r if k not in keys]
  with open(path, 'w', newline='', encoding='utf-8') as f:
    w = csv.DictWriter(f, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)


def mean_std(values) -> str:
  """'mean' for one value, 'mean ± std' (sample std) for several. A missing or non-finite value
  (a diverged seed) is not averaged away silently: the cell says how many of the values it
  dropped, e.g. '4.2 (1/2 non-finite)', or 'n/a' when none is finite."""
  values = list(values)
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
  dropped = len(values) - len(v)
  if not len(v):
    return 'n/a'
  cell = f'{v.mean():.3g}' if len(v) == 1 else f'{v.mean():.3g} ± {v.std(ddof=1):.2g}'
  return f'{cell} ({dropped}/{len(values)} non-finite)' if dropped else cell


def run_dir_of(workdir: str, run: Run) -> str:
  return os.path.join(workdir, 'runs', run.name)


def is_trained(run_dir: str, config) -> bool:
  """The loop writes eval.json after its last step; a finished run is not trained again."""
  path = os.path.join(run_dir, 'eval.json')
  if not os.path.exists(path):
    return False
  with open(path, encoding='utf-8') as f:
    return json.load(f).get('step') == config.train.num_steps


def curve_steps(config) -> list[int]:
  every, total = int(config.train.keep_every), int(config.train.num_steps)
  return sorted({*range(every, total + 1, every), total}) if every else [total]


def run_ablation(runs: list[Run], config, workdir: str, cache_dir: str):
  """Trains what is not trained, measures what is not measured; returns the result rows, the
  metric-vs-step rows and each run's loss-vs-log-SNR curve."""
  _, ab = base_and_ablation(config)
  num = int(ab.num_samples)
  curve_nfe = int(ab.curve_nfe)
  plan = []   # (run, setup, [(sampler, nfe, steps, exact)])
  for run in runs:
    setup = run_config.build(run.config)
    cells = []
    for sampler in run.samplers:
      for nfe in run.nfes:
        steps, exact = steps_for_nfe(sampler, setup, nfe)
        if steps:
          cells.append((sampler, nfe, steps, exact))
    plan.append((run, setup, cells))

  total = 0.0
  for run, _, cells in plan:
    total += run.config.train.num_steps * (not is_trained(run_dir_of(workdir, run), run.config))
    total += sum(sample_units(e, num, run.config) for *_, e in cells)
    total += len(curve_steps(run.config)) * sample_units(curve_nfe, num, run.config)
  progress = SweepProgress(total, f'ablation ({len(runs)} runs)')
  rows, curve, losses = [], [], {}
  try:
    for run, setup, cells in plan:
      run_dir = run_dir_of(workdir, run)
      if not is_trained(run_dir, run.config):
        train_loop.train_and_evaluate(run.config, run_dir)
        progress.done(run.config.train.num_steps, f'{run.name} trained')
      final = int(run.config.train.num_steps)
      for sampler, nfe, steps, exact in cells:
        result = cached(os.path.join(run_dir, f'eval_{sampler}_nfe{nfe}.json'), final,
                         lambda: measure(run_dir, run.config, sampler, steps, num, cache_dir))
        rows.append({'objective': run.objective, 'seed': run.seed, 'sampler': sampler,
                     'nfe_budget': nfe, **result})
        progress.done(sample_units(exact, num, run.config), f'{run.name} {sampler}@{exact}')
      sampler = ab.curve_sampler if ab.curve_sampler in run.samplers else run.samplers[0]
      steps, _ = steps_for_nfe(sampler, setup, curve_nfe)
      steps = steps or 1
      for step in curve_steps(run.config):
        result = cached(os.path.join(run_dir, f'curve_{sampler}_{steps}_{step}.json'), step,
                         lambda: measure(run_dir, run.config, sampler, steps, num, cache_dir,
                                         step=step))
        curve.append({'objective': run.objective, 'seed': run.seed, **result})
        progress.done(sample_units(curve_nfe, num, run.config), f'{run.name} step {step}')
      losses[run.name] = cached(os.path.join(run_dir, 'loss_vs_logsnr.json'), None,
                                 lambda: loss_vs_log_snr(run_dir, run.config))
  finally:
    progress.close()
  return rows, curve, losses


def latest_step(run_dir: str) -> int:
  """The newest checkpoint step of a run (a one-line CheckpointError if it has none)."""
  with checkpointing.Checkpointer(os.path.join(run_dir, 'checkpoints'), read_only=True) as c:
    steps = c.all_steps()
  if not steps:
    raise checkpointing.CheckpointError(f'no checkpoint in {run_dir}/checkpoints')
  return steps[-1]


def cached(path: str, step, compute):
  """`_json`, recomputed when the cached result is of another checkpoint step."""
  if os.path.exists(path) and step is not None:
    with open(path, encoding='utf-8') as f:
      if json.load(f).get('step') != step:
        os.remove(path)
  return _json(path, compute)


def emit_sweep(runs: list[Run], path: str, runs_root: str) -> None:
  """Each run's resolved config as `<runs_root>/<name>.json` and a sweep file whose line
  `<name> --config=configs/json_config.py:<that json>` trains it in `<runs_root>/<name>`."""
  os.makedirs(runs_root, exist_ok=True)
  lines = []
  for run in runs:
    cfg_path = os.path.join(runs_root, f'{run.name}.json')
    with open(cfg_path, 'w', encoding='utf-8') as f:
      f.write(run.config.to_json_best_effort(indent=2, sort_keys=True) + '\n')
    lines.append(f'{run.name} --config=configs/json_config.py:{cfg_path}')
  with open(path, 'w', encoding='utf-8') as f:
    f.write('# ablation runs: launch/slurm/sweep.sh THIS_FILE - ' + runs_root + '\n')
    f.write('\n'.join(lines) + '\n')
  print(f'Wrote {len(lines)} runs to {path}; train them with\n'
        f'  launch/slurm/sweep.sh {path} - {runs_root}\n'
        f'then rerun this command to evaluate and tabulate.', flush=True)
