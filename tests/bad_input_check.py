"""Bad-input sweep: what does each entry point print when a researcher gets something wrong?

`python tests/bad_input_check.py [--only SUBSTRING] [--out docs/bad_inputs.txt]` runs every case
of `CASES` (a mistaken flag, config value, file a resume reads back, or CLI argument) against the
real `experiments.train` / `experiments.evaluate` in a temporary directory, and every entry of
`LIBRARY` (a library function called with a wrong array or value) in-process. For each it
records the exit status and what was printed, and judges it: `ok` when the run refused with
one line on stderr naming the mistake (or, for a case marked so, went on and said what it did),
`BAD` otherwise (a traceback, a silent wrong result, a hang, or a message that does not name
the key, value or file). It exits 1 if any case is `BAD`.

Not collected by pytest: the whole sweep is 57 subprocesses (~4 min on two cores). The cases
that guard a fixed hole are also default tests (tests/test_cli.py, tests/test_bad_inputs.py);
this script is the habit of trying them all again. The last full run is docs/bad_inputs.txt.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A run that trains in seconds, with no sampling or evaluation at the end.
FAST = ['--config=configs/digits.py:smoke,mlp', '--config.eval.enabled=False',
        '--config.sample.grid_size=0']
UNET = ['--config=configs/digits.py:smoke', '--config.eval.enabled=False',
        '--config.sample.grid_size=0']
AUDIO = ['--config=configs/wavegrad_synth.py:smoke', '--config.eval.enabled=False',
         '--config.sample.grid_size=0']


def _train(*flags):
  return ['experiments.train', *flags]


def _evaluate(*flags):
  return ['experiments.evaluate', *flags]


# (id, module + flags (`{wd}` is the case's work dir, `{run}` a copy of a finished run),
#  expected exit status, words the message must contain (case-insensitive), setup(run_dir) or
#  None). Expected status 0 means "goes on": the words must then appear in stdout or stderr.
CASES = [
    # --- the config file and its flags ------------------------------------------------------
    ('config file missing', _train('--config=configs/nope.py', '--workdir={wd}'), 2,
     ['configs/nope.py'], None),
    ('config variant unknown', _train('--config=configs/digits.py:smok', '--workdir={wd}'), 2,
     ['smok'], None),
    ('unknown key', _train(*FAST, '--config.model.hiden=8', '--workdir={wd}'), 2,
     ['hiden'], None),
    ('wrong type', _train(*FAST, '--config.train.batch_size=abc', '--workdir={wd}'), 2,
     ['batch_size', 'abc'], None),
    ('list flag with a non-number', _train(*UNET, '--config.model.ch_mult=1,x',
                                           '--workdir={wd}'), 2, ['ch_mult'], None),
    ('list flag empty', _train(*UNET, '--config.model.ch_mult=()', '--workdir={wd}'), 2,
     ['ch_mult'], None),
    ('attention at a resolution the U-Net never has',
     _train(*UNET, '--config.model.attn_resolutions=(3,)', '--workdir={wd}'), 2,
     ['attn_resolutions', '3'], None),
    ('image size the U-Net cannot halve',
     _train(*UNET, '--config.model.ch_mult=(1,1,1,1,1,1)', '--config.model.attn_resolutions=()',
            '--workdir={wd}'), 2, ['ch_mult', '32'], None),
    ('digits at a size they do not come in',
     _train(*FAST, '--config.data.image_size=12', '--workdir={wd}'), 2, ['image_size', '12'],
     None),
    ('stray positional argument', _train(*FAST, '--workdir={wd}', 'extra'), 2, ['extra'], None),
    ('workdir empty', _train(*FAST, '--workdir='), 2, ['workdir'], None),
    ('workdir is a file', _train(*FAST, '--workdir={run}/metrics.jsonl'), 2,
     ['metrics.jsonl'], None),
    ('workdir not writable', _train(*FAST, '--workdir=/proc/diffusion_jax_run'), 2,
     ['/proc/diffusion_jax_run'], None),
    # --- train / optim values ----------------------------------------------------------------
    ('batch size 0', _train(*FAST, '--config.train.batch_size=0', '--workdir={wd}'), 2,
     ['batch_size', '0'], None),
    ('batch size not divisible by the devices',
     _train(*FAST, '--config.train.batch_size=12', '--workdir={wd}'), 2,
     ['batch_size', '12', '8'], None),
    ('negative num_steps', _train(*FAST, '--config.train.num_steps=-5', '--workdir={wd}'), 2,
     ['num_steps', '-5'], None),
    ('negative learning rate', _train(*FAST, '--config.optim.lr=-1.0', '--workdir={wd}'), 2,
     ['lr', '-1'], None),
    ('EMA decay above 1', _train(*FAST, '--config.train.ema_decay=1.5', '--workdir={wd}'), 2,
     ['ema_decay', '1.5'], None),
    ('grad accumulation that does not divide the batch',
     _train(*FAST, '--config.train.grad_accum_steps=3', '--workdir={wd}'), 2,
     ['grad_accum_steps', '3'], None),
    ('checkpoint_every 0', _train(*FAST, '--config.train.checkpoint_every=0', '--workdir={wd}'),
     2, ['checkpoint_every'], None),
    ('keep_checkpoints 0', _train(*FAST, '--config.train.keep_checkpoints=0', '--workdir={wd}'),
     2, ['keep_checkpoints'], None),
    ('unknown lr schedule', _train(*FAST, '--config.optim.schedule=cosin', '--workdir={wd}'), 2,
     ['schedule', 'cosin'], None),
    # Allowed (the run may be extended later), but the run says what it means:
    ('warmup longer than the run', _train(*FAST, '--config.optim.warmup_steps=500',
                                          '--workdir={wd}'), 0, ['warmup_steps=500', 'peaks'],
     None),
    # jax takes any integer seed; a negative one is a different, valid stream:
    ('negative seed', _train(*FAST, '--config.seed=-1', '--workdir={wd}'), 0, [], None),
    # --- data ---------------------------------------------------------------------------------
    ('unknown data set', _train(*FAST, '--config.data.name=mnist2', '--workdir={wd}'), 2,
     ['mnist2'], None),
    ('TFDS data dir that does not exist',
     _train(*FAST, '--config.data.name=cifar10', '--config.data.data_dir=/nonexistent/tfds',
            '--workdir={wd}'), 2, ['/nonexistent/tfds'], None),
    ('negative image size', _train(*FAST, '--config.data.image_size=-4', '--workdir={wd}'), 2,
     ['image_size', '-4'], None),
    # --- process / objective / model ---------------------------------------------------------
    ('unknown objective', _train(*FAST, '--config.objective.name=eps', '--workdir={wd}'), 2,
     ['objective', 'eps'], None),
    ('unknown process', _train(*FAST, '--config.process.name=vp', '--workdir={wd}'), 2,
     ['process', 'vp'], None),
    ('process with 0 steps', _train(*FAST, '--config.process.num_steps=0', '--workdir={wd}'), 2,
     ['num_steps', '0'], None),
    # Valid combinations (every objective is defined on every process, DESIGN §1), so they run:
    ('EDM objective on a discrete VP process',
     _train(*FAST, '--config.objective.name=edm', '--workdir={wd}'), 0, [], None),
    ('flow matching on a VP process',
     _train(*FAST, '--config.objective.name=flow_matching', '--workdir={wd}'), 0, [], None),
    ('unknown model', _train(*FAST, '--config.model.name=resnet', '--workdir={wd}'), 2,
     ['resnet'], None),
    ('negative num_classes', _train(*FAST, '--config.model.num_classes=-1', '--workdir={wd}'), 2,
     ['num_classes', '-1'], None),
    ('label dropout above 1',
     _train('--config=configs/digits.py:smoke,mlp,cond', '--config.eval.enabled=False',
            '--config.sample.grid_size=0', '--config.model.label_dropout=1.5',
            '--workdir={wd}'), 2, ['label_dropout', '1.5'], None),
    ('dropout 1', _train(*UNET, '--config.model.dropout=1.0', '--workdir={wd}'), 2,
     ['dropout'], None),
    # --- sampling ----------------------------------------------------------------------------
    ('unknown sampler', _train(*FAST, '--config.sample.sampler=dpm', '--workdir={wd}'), 2,
     ['sampler', 'dpm'], None),
    ('sampler option the sampler does not take',
     _train(*FAST, '--config.sample.sampler=heun', '--config.sample.options.eta=0.5',
            '--workdir={wd}'), 2, ['eta', 'heun'], None),
    ('sampler option of a bad value',
     _train(*FAST, '--config.sample.sampler=unipc_bh1', '--config.sample.options.order=7',
            '--workdir={wd}'), 2, ['order', '7'], None),
    ('sampler option with an unknown choice',
     _train(*FAST, '--config.sample.sampler=ddim', '--config.sample.options.grid=logsnr',
            '--workdir={wd}'), 2, ['grid', 'logsnr'], None),
    ('negative t_min',
     _train(*FAST, '--config.sample.sampler=ddim', '--config.sample.options.t_min=-0.1',
            '--workdir={wd}'), 2, ['t_min', '-0.1'], None),
    ('more ancestral steps than the process has',
     _train(*FAST, '--config.sample.steps=5000', '--workdir={wd}'), 2, ['steps', '5000'], None),
    ('sample steps 0', _train(*FAST, '--config.sample.steps=0', '--workdir={wd}'), 2,
     ['steps', '0'], None),
    ('guidance on an unconditional model',
     _train(*FAST, '--config.sample.guidance_scale=3.0', '--workdir={wd}'), 2,
     ['guidance_scale'], None),
    ('sample batch 0', _train(*FAST, '--config.sample.batch_size=0', '--workdir={wd}'), 2,
     ['batch_size', '0'], None),
    ('negative clip_x0', _train(*FAST, '--config.sample.clip_x0=-1.0', '--workdir={wd}'), 2,
     ['clip_x0', '-1'], None),
    ('evaluation of 0 samples',
     _train(*FAST, '--config.eval.enabled=True', '--config.eval.num_samples=0',
            '--workdir={wd}'), 2, ['num_samples', '0'], None),
    # --- audio (configs/wavegrad_synth.py) ---------------------------------------------------
    ('spectrogram hop that does not divide the clip length',
     _train(*AUDIO, '--config.mel.hop=96', '--workdir={wd}'), 2, ['hop', '96', '4096'], None),
    ('spectrogram sample rate other than the data\'s',
     _train(*AUDIO, '--config.mel.sample_rate=16000', '--workdir={wd}'), 2,
     ['sample_rate', '16000', '8000'], None),
    ('audio data asked for at another sample rate',
     _train(*AUDIO, '--config.data.sample_rate=16000', '--workdir={wd}'), 2,
     ['sample_rate', '16000'], None),
    ('WaveGrad upsampling factors that are not the hop',
     _train(*AUDIO, '--config.model.factors=(4,4,2,4)', '--workdir={wd}'), 2, ['factors', 'hop'],
     None),
    ('in-loop evaluation of audio',
     _train(*AUDIO, '--config.eval.enabled=True', '--config.eval.every=2', '--workdir={wd}'), 2,
     ['eval.every', 'audio'], None),
]


def _corrupt(relpath, text):
  def setup(run):
    with open(os.path.join(run, relpath), 'w') as f:
      f.write(text)
  return setup


def _truncate_metrics(run):
  path = os.path.join(run, 'metrics.jsonl')
  with open(path) as f:
    text = f.read()
  with open(path, 'w') as f:
    f.write(text[:-25])   # a row cut in the middle, as a kill during a write leaves it


def _remove(relpath):
  def setup(run):
    p = os.path.join(run, relpath)
    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
  return setup


def _edit_config(section, key, value):
  def setup(run):
    path = os.path.join(run, 'config.json')
    with open(path) as f:
      cfg = json.load(f)
    cfg[section][key] = value
    with open(path, 'w') as f:
      json.dump(cfg, f, indent=2)
  return setup


RESUME = [*FAST, '--config.train.num_steps=30', '--workdir={run}']
CASES += [
    # --- files a resume reads back (a copy of a finished 20-step run) -----------------------
    ('config.json cut short', _train(*RESUME), 2, ['config.json'],
     _corrupt('config.json', '{"seed": 0, "data": {')),
    ('config.json deleted, checkpoints kept', _train(*RESUME), 0, [],
     _remove('config.json')),
    ('config.json edited by hand to another model', _train(*RESUME), 2,
     ['config.json', 'hidden'], _edit_config('model', 'hidden', 64)),
    ('metrics.jsonl with a row cut by a kill', _train(*RESUME), 0, [], _truncate_metrics),
    ('lock file with garbage in it', _train(*RESUME), 2, ['run.lock'],
     _corrupt('run.lock', 'not a pid\n')),
    # --- evaluate ----------------------------------------------------------------------------
    ('evaluate a work dir that does not exist',
     _evaluate('--workdir={wd}/nothing_here'), 2, ['nothing_here'], None),
    ('evaluate a work dir without checkpoints', _evaluate(*FAST[:1], '--workdir={wd}'), 2,
     ['checkpoint'], None),
    ('evaluate --num_samples=0', _evaluate('--workdir={run}', '--num_samples=0'), 2,
     ['num_samples'], None),
    ('evaluate --nll_examples=-3', _evaluate('--workdir={run}', '--nll_examples=-3'), 2,
     ['nll_examples'], None),
    ('evaluate digits with FID Inception weights (they would be ignored)',
     _evaluate('--workdir={run}', '--inception_weights=/nonexistent/inception.npz'), 2,
     ['inception_weights'], None),
]


def _library_cases():
  """(id, thunk, words the ValueError/TypeError message must contain). A thunk that returns
  instead of raising is judged BAD (a silent result for a wrong input)."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  from diffusion_jax import analytic, objectives, parameterization, processes, samplers
  from diffusion_jax.samplers import grids
  from diffusion_jax.audio import features, schedules
  from diffusion_jax.data import audio as audio_data
  import numpy as np
  # pylint: enable=g-import-not-at-top
  vp = processes.make_process('vp_discrete', schedule='linear', num_steps=1000)
  den = analytic.gaussian_denoiser(jnp.zeros(2), jnp.ones(2), vp)
  x = jnp.ones((4, 2))
  key = jax.random.key(0)
  model = lambda x, t, cond=None: jnp.zeros_like(x)
  return [
      ('make_process: unknown schedule',
       lambda: processes.make_process('vp_discrete', schedule='cosin'), ['cosin']),
      ('make_process: unknown keyword',
       lambda: processes.make_process('ve', sigma_mx=10.0), ['sigma_mx']),
      ('make_process: sigma_min above sigma_max',
       lambda: processes.make_process('ve', sigma_min=50.0, sigma_max=1.0), ['sigma_min']),
      ('make_objective: unknown name', lambda: objectives.make_objective('epsilon', vp),
       ['epsilon']),
      ('make_objective: negative sigma_data',
       lambda: objectives.make_objective('edm', processes.make_process('edm'), sigma_data=-1.0),
       ['sigma_data']),
      ('make_denoiser: unknown kind', lambda: parameterization.make_denoiser(model, vp, 'epsilon'),
       ['epsilon']),
      ('ddim: steps 0', lambda: samplers.ddim_sample(den, vp, x, key, steps=0), ['steps']),
      ('ddim: negative steps', lambda: samplers.ddim_sample(den, vp, x, key, steps=-3),
       ['steps']),
      ('ddim: eta negative', lambda: samplers.ddim_sample(den, vp, x, key, steps=4, eta=-0.5),
       ['eta']),
      ('ddpm: no key', lambda: samplers.ddpm_sample(den, vp, x, None, steps=4), ['key']),
      ('ddim: integer x_T', lambda: samplers.ddim_sample(den, vp, jnp.ones((4, 2), jnp.int32),
                                                         key, steps=4), ['x_T']),
      ('dpm_solver_3: t_min above t_max',
       lambda: samplers.dpm_solver_3_sample(den, vp, x, key, steps=4, t_min=0.9, t_max=0.5),
       ['t_min']),
      ('unipc: unknown variant',
       lambda: samplers.SAMPLERS['unipc_bh1'](den, vp, x, key, steps=4, order=5), ['order']),
      ('karras_sigmas: n 0', lambda: grids.karras_sigmas(0, 0.002, 80.0), ['n']),
      ('karras_sigmas: sigma_min above sigma_max',
       lambda: grids.karras_sigmas(10, 80.0, 0.002), ['sigma_min']),
      ('ot_pairing: batch sizes differ',
       lambda: objectives.ot_pairing(jnp.ones((4, 2)), jnp.ones((3, 2))), ['4', '3']),
      ('gaussian_denoiser: negative variance',
       lambda: analytic.gaussian_denoiser(jnp.zeros(2), -jnp.ones(2), vp), ['s2']),
      ('explicit grid not decreasing',
       lambda: samplers.time_grid(vp, 3, (0.5, 0.9, 0.1)), ['decreasing', '0.9']),
      ('explicit grid of another length than the steps',
       lambda: samplers.time_grid(vp, 3, (0.9, 0.5)), ['steps=3', '2 times']),
      ('silent audio clip', lambda: audio_data.check_clip(np.zeros(4096), 'clip 7'),
       ['clip 7', 'silent']),
      ('clipped audio clip',
       lambda: audio_data.check_clip(np.sign(np.sin(np.arange(4096.0))), 'clip 8'),
       ['clip 8', 'clipped']),
      ('spectrogram hop that does not divide the waveform',
       lambda: features.num_frames(4000, 64), ['hop=64', '4000']),
      ('WaveGrad schedule outside the process',
       lambda: schedules.times(vp, np.geomspace(1e-9, 0.5, 6)), ['range']),
      ('objective loss: labels of another batch size',
       lambda: objectives.make_objective('ddpm_eps', vp)(
           lambda x, t, cond=None: x, x, key, cond=jnp.zeros((3,), jnp.int32)), ['cond']),
  ]


def _judge(proc_rc, out, err, expected_rc, words, seconds):
  text = (err if expected_rc else out + err).lower()
  lines = [ln for ln in err.splitlines() if ln.strip()]
  if 'traceback (most recent call last)' in err.lower():
    return 'BAD', 'traceback'
  if proc_rc != expected_rc:
    return 'BAD', f'exit {proc_rc}, expected {expected_rc}'
  if expected_rc and len(lines) != 1:
    return 'BAD', f'{len(lines)} lines on stderr'
  missing = [w for w in words if w.lower() not in text]
  if missing:
    return 'BAD', f'message does not name {missing}'
  return 'ok', ''


def run_cases(only, scratch, timeout):
  env = dict(os.environ, PYTHONUNBUFFERED='1',
             XLA_FLAGS='--xla_force_host_platform_device_count=8',
             DIFFUSION_JAX_CACHE=os.path.join(scratch, 'cache'))
  finished = os.path.join(scratch, 'finished')
  proc = subprocess.run([sys.executable, '-m', 'experiments.train', *FAST,
                         f'--workdir={finished}'], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = []
  for i, (name, argv, expected_rc, words, setup) in enumerate(CASES):
    if only and only not in name:
      continue
    wd = os.path.join(scratch, f'case{i}')
    run = os.path.join(scratch, f'run{i}')
    shutil.copytree(finished, run)
    if setup:
      setup(run)
    cmd = [sys.executable, '-m', *[a.format(wd=wd, run=run) for a in argv]]
    start = time.time()
    try:
      p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
      rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired:
      rc, out, err = 'timeout', '', ''
    seconds = time.time() - start
    verdict, why = _judge(rc, out, err, expected_rc, words, seconds)
    shown = ([ln for ln in err.splitlines() if ln.strip()] or
             [ln for ln in out.splitlines() if ln.strip()] or [''])
    said = shown[-1] if verdict == 'ok' or why != 'traceback' else shown[-1]
    rows.append((verdict, name, rc, seconds, said, why))
    print(f'{verdict:4} {name}: exit {rc} in {seconds:.0f} s: {said[:300]}'
          + (f'  [{why}]' if why else ''), flush=True)
  return rows


def run_library(only):
  rows = []
  for name, thunk, words in _library_cases():
    if only and only not in name:
      continue
    try:
      thunk()
      verdict, said, why = 'BAD', 'returned without an error', 'silent'
    except (ValueError, TypeError, KeyError) as e:
      said = f'{type(e).__name__}: {e}'.splitlines()[0]
      missing = [w for w in words if w.lower() not in str(e).lower()]
      verdict, why = ('BAD', f'message does not name {missing}') if missing else ('ok', '')
    except Exception as e:  # pylint: disable=broad-except
      said = f'{type(e).__name__}: {e}'.splitlines()[0]
      verdict, why = 'BAD', 'not a ValueError/TypeError'
      traceback.print_exc()
    rows.append((verdict, name, '-', 0.0, said, why))
    print(f'{verdict:4} {name}: {said[:300]}' + (f'  [{why}]' if why else ''), flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--only', default='')
  parser.add_argument('--out', default='')
  parser.add_argument('--timeout', type=float, default=300)
  parser.add_argument('--library_only', action='store_true')
  args = parser.parse_args()
  start = time.time()
  rows = run_library(args.only)
  if not args.library_only:
    with tempfile.TemporaryDirectory() as scratch:
      rows += run_cases(args.only, scratch, args.timeout)
  bad = [r for r in rows if r[0] == 'BAD']
  summary = (f'{len(rows)} cases, {len(rows) - len(bad)} ok, {len(bad)} BAD, '
             f'in {time.time() - start:.0f} s')
  print(summary)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(f'# python tests/bad_input_check.py  ({summary})\n')
      for verdict, name, rc, _, said, why in rows:
        f.write(f'{verdict:4} | {name} | exit {rc} | {said}' + (f' [{why}]' if why else '')
                + '\n')
  sys.exit(1 if bad else 0)


if __name__ == '__main__':
  main()
