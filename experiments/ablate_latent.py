r"""Pixel vs latent diffusion at equal training compute, on the 32x32 digits.

  python -m experiments.ablate_latent --workdir=runs/ablate_latent [--variant=smoke]

1. latent: `configs/latent_digits.py` (KL-f4 autoencoder, then the digits U-Net on 8x8x2
   latents, DDPM eps / L_simple, ancestral DDPM with 100 steps), its three stages in
   `<workdir>/latent`.
2. pixel: the same objective, U-Net family, sampler and NFE on the 32x32 images themselves
   (`<workdir>/pixel`; attention at 16x16, the U-Net's lower level), trained for as many steps
   as fit in the latent run's whole training time (autoencoder + latent diffusion, as
   metrics.jsonl times them), the pixel step time measured first (`--probe_steps` steps).
Both are measured by FD in the digits classifier's feature space (32x32 mapped back to 8x8
exactly) against the same floor. Writes `latent_ablation.md` / `.csv` in the work dir; either
arm is reused when its work dir holds a finished run.
"""

import json
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from experiments import cli  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'Where both arms run.')
_VARIANT = flags.DEFINE_string('variant', '', "configs/latent_digits.py variant ('smoke').")
_PROBE = flags.DEFINE_integer('probe_steps', 20, 'Pixel train steps timed to set its budget.')
flags.mark_flags_as_required(['workdir'])


def train_seconds(run_dir: str) -> tuple[float, float, int]:
  """`(seconds, median step seconds, steps)` of a run's training from its metrics.jsonl (the
  first interval includes compilation; the median step time leaves it out)."""
  rows = []
  with open(os.path.join(run_dir, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      row = json.loads(line)
      if 'steps_per_sec' in row:
        rows.append(row)
  total, last, per_step = 0.0, 0, []
  for row in rows:
    n = row['step'] - last
    total += n / row['steps_per_sec']
    per_step.append(1.0 / row['steps_per_sec'])
    last = row['step']
  per_step = sorted(per_step[1:] or per_step)
  return total, per_step[len(per_step) // 2], last


def pixel_config(variant: str):
  from configs import digits  # pylint: disable=g-import-not-at-top
  c = digits.get_config(variant)
  c.data.image_size = 32
  c.model.attn_resolutions = (16,)
  return c


def probe_step_seconds(config, steps: int) -> float:
  """Seconds per train step of `config` after compilation (the loop's own jitted step)."""
  # pylint: disable=g-import-not-at-top
  import jax
  from diffusion_jax import parallel
  from diffusion_jax import train_loop
  from diffusion_jax import training
  # pylint: enable=g-import-not-at-top
  setup = train_loop.build_setup(config)
  optimizer = training.make_optimizer(setup.optim, setup.train.num_steps)
  ema_fn = training.ema(setup.train.ema_decay)
  state = jax.jit(train_loop.init_state_fn(setup, optimizer, ema_fn))(jax.random.key(0))
  step = jax.jit(training.make_train_step(setup.objective, setup.model.apply, optimizer, ema_fn,
                                          conditional=setup.conditional), donate_argnums=(0,))
  batch = {'image': setup.source.batch(0, 0, setup.train.batch_size)['image']}
  state, m = step(state, batch)
  parallel.local_value(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch)
  parallel.local_value(m)
  return (time.perf_counter() - t0) / steps


def main(argv):
  workdir = cli.begin(argv, None, _WORKDIR)[1]
  # pylint: disable=g-import-not-at-top
  from configs import latent_digits
  from diffusion_jax import train_loop
  from experiments import ablation_lib as lib
  # pylint: enable=g-import-not-at-top
  cache_dir = cli.default_cache_dir()
  with cli.user_errors():
    latent_dir, pixel_dir = os.path.join(workdir, 'latent'), os.path.join(workdir, 'pixel')
    config = latent_digits.get_config(_VARIANT.value)
    config.eval.cache_dir = cache_dir
    latent = train_loop.train_and_evaluate(config, latent_dir)
    ae_s, ae_step, ae_n = train_seconds(os.path.join(latent_dir, 'autoencoder'))
    ld_s, ld_step, ld_n = train_seconds(latent_dir)
    pixel_cfg = pixel_config(_VARIANT.value)
    pixel_cfg.eval.cache_dir = cache_dir
    if not lib.is_trained(pixel_dir, pixel_cfg) and not os.path.exists(
        os.path.join(pixel_dir, 'config.json')):
      step_s = probe_step_seconds(pixel_cfg, _PROBE.value)
      pixel_cfg.train.num_steps = max(int((ae_s + ld_s) / step_s), 1)
      print(f'Pixel step {step_s * 1e3:.1f} ms: {pixel_cfg.train.num_steps} steps in the latent '
            f'run\'s {ae_s + ld_s:.0f} s', flush=True)
    elif os.path.exists(os.path.join(pixel_dir, 'config.json')):
      with open(os.path.join(pixel_dir, 'config.json'), encoding='utf-8') as f:
        pixel_cfg.train.num_steps = json.load(f)['train']['num_steps']
    pixel = train_loop.train_and_evaluate(pixel_cfg, pixel_dir)
    px_s, px_step, px_n = train_seconds(pixel_dir)
    s = config.sample
    rows = [
        {'arm': 'latent (KL-f4, 8x8x2)', 'fd': latent['fd'], 'fd_floor': latent['fd_floor'],
         'fd_ratio': latent['fd_ratio'], 'train_steps': f'{ae_n} AE + {ld_n}',
         'step_ms': f'{ae_step * 1e3:.1f} AE, {ld_step * 1e3:.1f}',
         'train_s': ae_s + ld_s, 'sample_s': latent['sample_seconds'],
         'params': f'{latent["autoencoder/num_params"]} AE + {latent["num_params"]}',
         'ae_psnr_db': latent['autoencoder/reconstruction_psnr']},
        {'arm': 'pixel (32x32x1)', 'fd': pixel['fd'], 'fd_floor': pixel['fd_floor'],
         'fd_ratio': pixel['fd_ratio'], 'train_steps': str(px_n),
         'step_ms': f'{px_step * 1e3:.1f}', 'train_s': px_s,
         'sample_s': pixel['sample_seconds'], 'params': str(pixel['num_params']),
         'ae_psnr_db': float('nan')},
    ]
    lines = [f'# Pixel vs latent diffusion, digits 32x32 ({s.sampler}, {s.steps} steps, '
             f'n={latent["num_generated"]})', '',
             '| arm | FD | floor | FD/floor | train steps | step ms | train s | sample s | '
             'params | AE PSNR dB |', '|' + '---|' * 10]
    for r in rows:
      lines.append(f'| {r["arm"]} | {r["fd"]:.3f} | {r["fd_floor"]:.3f} | {r["fd_ratio"]:.2f} | '
                   f'{r["train_steps"]} | {r["step_ms"]} | {r["train_s"]:.0f} | '
                   f'{r["sample_s"]:.1f} | {r["params"]} | '
                   + ('—' if r['ae_psnr_db'] != r['ae_psnr_db'] else f'{r["ae_psnr_db"]:.2f}')
                   + ' |')
    text = '\n'.join(lines) + '\n'
    with open(os.path.join(workdir, 'latent_ablation.md'), 'w', encoding='utf-8') as f:
      f.write(text)
    lib.write_csv(os.path.join(workdir, 'latent_ablation.csv'), rows)
    print(text, flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
  sys.exit(0)
