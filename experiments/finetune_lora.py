r"""LoRA fine-tuning to held-out digit classes: FD before / after, and the adapters' size.

  python -m experiments.finetune_lora --workdir=runs/lora [--variant=smoke] \
      [--out=docs/lora] [--arms=lora,lora_attn,full]

1. base: `configs/lora_digits.py:base`, the digits U-Net trained on classes 0-7 only
   (`<workdir>/base`).
2. arms (`--arms`), each trained on the held-out 8s and 9s from the frozen base in
   `<workdir>/<arm>`: `lora` (`configs/lora_digits.py`: low-rank adapters, `models.lora`, on the
   attention projections and the ResBlock convs), `lora_attn` (the same on the attention
   projections only, the LoRA default) and `full` (every base weight fine-tuned for as many
   steps, for reference).
3. Each LoRA arm's adapters (EMA) are written to `<workdir>/<arm>.safetensors`, read back onto
   the base (`load_adapters` checks its fingerprint) and merged; every model then samples from
   the same noise. FD in the digits classifier's features against the test split's 8s and 9s,
   over disjoint chunks of as many samples as there are training 8s and 9s, beside its floor
   (those real training 8s and 9s against the same test digits); likewise against the test
   0-7, and the fraction the classifier calls an 8 or a 9.
Writes `<out>/results.md` and `<out>/samples.png` (a row of samples per model, from the same
noise). A run is reused when its work dir holds a finished run.
"""

import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from experiments import cli  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'Where the base and LoRA runs go.')
_VARIANT = flags.DEFINE_string('variant', '', "configs/lora_digits.py variant ('smoke').")
_OUT = flags.DEFINE_string('out', '', 'Where results.md and samples.png go (default: workdir).')
_CHUNKS = flags.DEFINE_integer('chunks', 4, 'Disjoint sample chunks FD is averaged over.')
_ARMS = flags.DEFINE_string('arms', 'lora', "Fine-tuning arms, comma-separated: 'lora' "
                            "(configs/lora_digits.py), 'lora_attn' (attention only), 'full' "
                            '(every base weight, for reference).')
flags.mark_flags_as_required(['workdir'])


def _train(config, workdir) -> float:
  """Trains (or reuses) the run; returns its training seconds from its metrics.jsonl (the
  first logging interval includes compilation)."""
  from diffusion_jax import train_loop  # pylint: disable=g-import-not-at-top
  train_loop.train_and_evaluate(config, workdir)
  seconds, last = 0.0, 0
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      row = json.loads(line)
      if 'steps_per_sec' in row and row['step'] > last:
        seconds += (row['step'] - last) / row['steps_per_sec']
        last = row['step']
  return seconds


def _fd_chunks(classifier, feats_ref, images, n):
  """FD of each of the disjoint `n`-sample chunks of `images` against `feats_ref`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from diffusion_jax.metrics import digits_classifier as dc  # pylint: disable=g-import-not-at-top
  from diffusion_jax.metrics import frechet  # pylint: disable=g-import-not-at-top
  feats = dc.classifier_features(classifier, images)
  return np.array([frechet.frechet_distance_from_features(feats[i:i + n], feats_ref)
                   for i in range(0, len(images) - n + 1, n)])


def arm_configs(arms, variant: str, base_dir: str) -> dict:
  """`{arm: config}` of the fine-tuning arms, each on the held-out classes from `base_dir`."""
  from configs import lora_digits  # pylint: disable=g-import-not-at-top
  from diffusion_jax.models import lora  # pylint: disable=g-import-not-at-top
  out = {}
  for arm in arms:
    c = lora_digits.get_config(variant)
    c.base.workdir = base_dir
    if arm == 'lora_attn':        # the LoRA default: attention projections only
      c.lora.update(targets=lora.DEFAULT_TARGETS, convs=False)
    elif arm == 'full':           # every base weight, at the base run's learning rate / 4
      del c['lora']
      c.optim.lr = lora_digits.get_config(','.join(['base', variant])).optim.lr / 4
    elif arm != 'lora':
      cli.fail(f'--arms: unknown arm {arm!r}; choose from {list(ARMS)}')
    out[arm] = c
  return out


ARMS = {'lora': 'LoRA, attention + ResBlock convs', 'lora_attn': 'LoRA, attention only',
        'full': 'full fine-tune'}


def main(argv):
  workdir = cli.begin(argv, None, _WORKDIR)[1]
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from configs import lora_digits
  from diffusion_jax import finetune
  from diffusion_jax import generation
  from diffusion_jax import images as images_lib
  from diffusion_jax import train_loop
  from diffusion_jax.data import digits
  from diffusion_jax.metrics import digits_classifier as dc
  from diffusion_jax.metrics import frechet
  from diffusion_jax.models import lora
  # pylint: enable=g-import-not-at-top
  out_dir = os.path.abspath(_OUT.value) if _OUT.value else workdir
  os.makedirs(out_dir, exist_ok=True)
  variant = 'smoke' if _VARIANT.value == 'smoke' else ''
  with cli.user_errors():
    base_dir = os.path.join(workdir, 'base')
    base_cfg = lora_digits.get_config(','.join(['base'] + ([variant] if variant else [])))
    seconds = {'base': _train(base_cfg, base_dir)}
    arms = arm_configs([a for a in _ARMS.value.split(',') if a], variant, base_dir)
    for arm, cfg in arms.items():
      seconds[arm] = _train(cfg, os.path.join(workdir, arm))

    # The base as the runs loaded it; each LoRA arm's adapters (EMA) through their file.
    base = finetune.load_base(base_dir)[1]
    models = {'base': (base, None)}
    for arm, cfg in arms.items():
      setup, state, _ = train_loop.load_checkpoint(cfg, os.path.join(workdir, arm))
      if arm == 'full':
        models[arm] = (state.ema_params, None)
        continue
      path = os.path.join(workdir, f'{arm}.safetensors')
      size = lora.save_adapters(path, state.ema_params['lora'], setup.model.config, base)
      adapters, config = lora.load_adapters(path, base)
      models[arm] = (lora.merge(base, adapters, config), (size, adapters, config))

    base_setup = train_loop.build_setup(base_cfg)
    sample_fn = generation.make_sample_fn(base_setup)
    classifier, info = dc.load_or_train_digits_classifier(cli.default_cache_dir())
    train_x, train_y = digits.load_digits('train')
    test_x, test_y = digits.load_digits('test')
    held = lambda y: np.isin(y, lora_digits.HELD_OUT)
    n = int(held(train_y).sum())                 # 260 training 8s and 9s
    ref_new = dc.classifier_features(classifier, test_x[held(test_y)])
    ref_old = dc.classifier_features(classifier, test_x[~held(test_y)])
    floor_new = frechet.frechet_distance_from_features(
        dc.classifier_features(classifier, train_x[held(train_y)]), ref_new)
    rng = np.random.default_rng(0)
    old_real = train_x[~held(train_y)][rng.permutation(int((~held(train_y)).sum()))[:n]]
    floor_old = frechet.frechet_distance_from_features(
        dc.classifier_features(classifier, old_real), ref_old)

    key = jax.random.key(base_cfg.seed)
    rows, grids = [], []
    for name, (params, _) in models.items():
      x = generation.generate(sample_fn, params, key, _CHUNKS.value * n,
                              base_setup.sample.batch_size, base_setup.image_shape)
      pred = dc.classifier_logits(classifier, x).argmax(-1)
      rows.append((name, _fd_chunks(classifier, ref_new, x, n),
                   _fd_chunks(classifier, ref_old, x, n),
                   float(np.isin(pred, lora_digits.HELD_OUT).mean())))
      grids.append(x[:20])
    images_lib.save_png(os.path.join(out_dir, 'samples.png'),
                        images_lib.make_grid(np.concatenate(grids), ncol=20))

    n_base = sum(int(np.size(v)) for v in jax.tree.leaves(base))
    base_bytes = lora.num_bytes(base)
    s = base_setup.sample
    flags_used = ''.join(f' --{f.name}={f.value}' for f in (_VARIANT, _OUT, _ARMS, _CHUNKS)
                         if f.present)
    lines = [
        '# LoRA: a digits 0-7 base adapted to the held-out 8s and 9s', '',
        f'Command: `python -m experiments.finetune_lora --workdir=<dir>{flags_used}`', '',
        f'- base: `configs/lora_digits.py:base`, the digits U-Net ({n_base:,} parameters), '
        f'{base_cfg.train.num_steps} steps on classes 0-7 ({seconds["base"]:.0f} s of training);']
    for arm, cfg in arms.items():
      if arm == 'full':
        what = f'every base weight at lr {cfg.optim.lr:g}'
      else:
        _, (size, adapters, config) = models[arm]
        what = (f'rank {config.rank}, alpha {config.alpha:g}, targets {list(config.targets)}, '
                f'convs={config.convs}: {len(lora.adapter_pairs(adapters))} kernels, lr '
                f'{cfg.optim.lr:g}')
      lines.append(f'- {arm} ({ARMS[arm]}): {what}; {cfg.train.num_steps} steps at batch '
                   f'{cfg.train.batch_size} on the {n} training 8s and 9s '
                   f'({seconds[arm]:.0f} s of training);')
    lines += [
        f'- every model samples the same noise ({s.sampler}, {s.steps} steps).', '',
        f'FD in the digits classifier\'s features (test accuracy '
        f'{info["test_accuracy"]:.3f}), mean (min-max) over {_CHUNKS.value} disjoint chunks of '
        f'n = {n} samples. **8-9**: against the test split\'s {int(held(test_y).sum())} 8s and '
        f'9s; floor: the {n} real training 8s and 9s against them. **0-7**: against the test '
        f'0-7; floor: {n} real training 0-7 digits. "8 or 9": the fraction of samples the '
        f'classifier calls an 8 or a 9.', '',
        '| model | FD 8-9 | FD/floor 8-9 | FD 0-7 | FD/floor 0-7 | 8 or 9 | trained |',
        '|---|---|---|---|---|---|---|']
    for name, fd_new, fd_old, frac in rows:
      extra = models[name][1]
      trained = ('—' if name == 'base' else f'{n_base:,} parameters' if extra is None else
                 f'{sum(int(np.size(v)) for v in jax.tree.leaves(extra[1])):,} parameters, '
                 f'file {extra[0]:,} bytes')
      lines.append(f'| {name} | {fd_new.mean():.2f} ({fd_new.min():.2f}-{fd_new.max():.2f}) | '
                   f'{fd_new.mean() / floor_new:.2f} | '
                   f'{fd_old.mean():.2f} ({fd_old.min():.2f}-{fd_old.max():.2f}) | '
                   f'{fd_old.mean() / floor_old:.2f} | {frac:.3f} | {trained} |')
    lines += [
        '', f'Floors: FD 8-9 {floor_new:.2f}, FD 0-7 {floor_old:.2f}. The base\'s float32 '
        f'parameters take {base_bytes:,} bytes; an adapter file (`<arm>.safetensors`: A and B '
        f'of every adapted kernel in float32, the LoRA config and the base\'s fingerprint) is '
        + ', '.join(f'{arm} {models[arm][1][0] / base_bytes:.1%}' for arm in arms
                    if models[arm][1] is not None) + ' of that.', '',
        'The adapted models\' FD 0-7 is high because they now draw 8s and 9s: the base itself '
        'is untouched (its weights are frozen and the adapters live in their own file; '
        '`lora.unmerge` or leaving the adapters out restores it). Training seconds are from '
        'each run\'s metrics.jsonl (the first interval includes compilation), on whatever '
        'else the machine was running.', '',
        '`samples.png`: one row of 20 samples per model, in the table\'s order, from the same '
        'noise.']
    text = '\n'.join(lines) + '\n'
    with open(os.path.join(out_dir, 'results.md'), 'w', encoding='utf-8') as f:
      f.write(text)
    print(text, flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
  sys.exit(0)
