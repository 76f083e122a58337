r"""Sample a text-conditioned run from your own prompts and save them as a grid.

  python -m experiments.text_to_image --workdir=runs/tiny_sd \
      --prompt="a bold seven" --prompt="2 on the left, thin" [--negative_prompt="a thin seven"] \
      [--guidance_scale=3] [--per_prompt=8] [--out=prompts.png] [--config.sample.steps=50]

The run's own config (`<workdir>/config.json`) is read, with overrides on top; the newest
checkpoint's EMA parameters sample `--per_prompt` images of each prompt (one grid row each),
guided against the negative prompt ('' = the empty prompt, the unconditional branch).
Prompts are tokenized by the run's tokenizer: a word it does not know, or a prompt longer than
its context length, is a one-line error (`--truncate` cuts long prompts, keeping EOS, with a
warning, as CLIP does). With no `--prompt` the command refuses to run: a text-conditioned model
has no default prompt (`--prompt=''` samples the unconditional model).
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'The run\'s config (default: its <workdir>/config.json).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'The text-conditioned run\'s work dir.')
_PROMPT = flags.DEFINE_multi_string('prompt', None, 'A prompt (repeat the flag for more).')
_NEGATIVE = flags.DEFINE_string('negative_prompt', None, 'The unconditional branch of guidance '
                                '(default: the run\'s text.negative_prompt, usually "").')
_SCALE = flags.DEFINE_float('guidance_scale', None, 'Guidance scale (default: the config\'s).')
_PER_PROMPT = flags.DEFINE_integer('per_prompt', 8, 'Images per prompt.', lower_bound=1)
_OUT = flags.DEFINE_string('out', None, 'The grid PNG (default: <workdir>/text_to_image.png).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the prior noise and the sampler.')
_TRUNCATE = flags.DEFINE_bool('truncate', False, 'Cut prompts longer than the context length.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  config, workdir = cli.begin(argv, _CONFIG, _WORKDIR)
  if 'text' not in config:
    cli.fail(f'{workdir} is not text-conditioned (its config has no text section); sample it '
             f'with experiments.evaluate')
  if _PROMPT.value is None:
    cli.fail('this run is text-conditioned: give at least one --prompt (--prompt="" samples the '
             'unconditional model)')
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from diffusion_jax import generation
  from diffusion_jax import images as images_lib
  from diffusion_jax import train_loop
  from diffusion_jax.text import conditioning as text_conditioning
  # pylint: enable=g-import-not-at-top
  with cli.user_errors():
    # The prompts are checked first (the tokenizer needs only config.text), then restored.
    text = text_conditioning.build_parts(text_conditioning.build_text(config.text))
    texts = [p for p in _PROMPT.value for _ in range(_PER_PROMPT.value)]
    try:
      tokens = text.tokens(texts, truncate=_TRUNCATE.value)
      text.tokens([_NEGATIVE.value or ''])
    except ValueError as e:
      cli.fail(f'--prompt: {e}')
    setup, state, step = train_loop.load_checkpoint(config, workdir)
    sample_fn = generation.make_sample_fn(setup, guidance_scale=_SCALE.value,
                                          negative_prompt=_NEGATIVE.value)
    decode = cli.latent_decoder(config, workdir) if 'latent' in config else None
  x = generation.generate(sample_fn, state.ema_params, jax.random.key(_SEED.value), len(texts),
                          setup.sample.batch_size, setup.image_shape, tokens)
  if decode is not None:
    x = decode(x)
  out = _OUT.value or os.path.join(workdir, 'text_to_image.png')
  images_lib.save_png(out, images_lib.make_grid(np.asarray(x), ncol=_PER_PROMPT.value))
  scale = setup.sample.guidance_scale if _SCALE.value is None else _SCALE.value
  print(f'Step {step}, guidance scale {scale:g}: wrote {out} (one row per prompt)', flush=True)
  for i, p in enumerate(_PROMPT.value):
    print(f'  row {i}: {p!r}', flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags_with_run_config)
  sys.exit(0)
