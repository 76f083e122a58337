"""The tiny Stable Diffusion end to end (smoke size): captions -> autoencoder latents -> a
text-conditioned U-Net -> prompts sampled, decoded and measured; then the text_to_image command
with its one-line errors.

Slow as a whole: the smoke run trains an autoencoder, encodes latents and trains the text model
in a subprocess (~100 s of the default run's 10-minute budget, cold caches); the text pieces
each have their default tests in test_text_conditioning.py, test_captions.py and test_clip.py.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args, cache_dir):
  env = dict(os.environ, DIFFUSION_JAX_CACHE=cache_dir, PYTHONUNBUFFERED='1')
  return subprocess.run([sys.executable, '-m', module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def _error_line(proc):
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(lines) == 1, proc.stderr[-2000:]
  assert lines[0].startswith('error: ')
  return lines[0]


@pytest.fixture(scope='module')
def run(tmp_path_factory, subprocess_cache):
  workdir = tmp_path_factory.mktemp('tiny_sd')
  proc = _run('experiments.train', '--config=configs/tiny_sd.py:smoke', f'--workdir={workdir}',
              cache_dir=subprocess_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_tiny_sd_trains_on_captions_and_measures_prompt_following(run):
  workdir, proc = run
  result = json.loads((workdir / 'eval.json').read_text())
  for key in ('fd', 'class_accuracy', 'attribute_accuracy', 'joint_accuracy', 'clip_score',
              'clip_score_real', 'clip_retrieval_accuracy'):
    assert np.isfinite(result[key]), key
  assert 0 <= result['clip_score'] <= 100 and 0 <= result['attribute_accuracy'] <= 1
  assert 'attribute_accuracy=' in proc.stdout and 'clip_score=' in proc.stdout
  config = json.loads((workdir / 'config.json').read_text())
  assert config['text']['encoder'] == 'transformer'
  # The grid's prompts: held-out templates, sample i of class i mod 10.
  lines = (workdir / 'prompts.txt').read_text().splitlines()
  assert len(lines) == 20 and lines[0].startswith('0: ')
  # The model holds the encoder beside the U-Net, and the latents carried captions.
  assert 'TextConditioned' in proc.stdout


def test_text_to_image_writes_a_row_per_prompt(run, subprocess_cache, tmp_path):
  workdir, _ = run
  out = tmp_path / 'grid.png'
  proc = _run('experiments.text_to_image', f'--workdir={workdir}', '--prompt=a bold seven',
              '--prompt=2 on the left', '--negative_prompt=a thin seven', '--per_prompt=3',
              '--guidance_scale=3', f'--out={out}', cache_dir=subprocess_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  image = np.asarray(Image.open(out))
  # make_grid: 2 rows of 3 decoded 32x32 digits, enlarged 4x, 1-pixel gaps.
  assert image.shape[:2] == (2 * (4 * 32 + 1) + 1, 3 * (4 * 32 + 1) + 1), image.shape
  assert "row 0: 'a bold seven'" in proc.stdout


@pytest.mark.parametrize('args,words', [
    ((), 'give at least one --prompt'),
    (('--prompt=a purple seven',), "unknown word 'purple'"),
    (('--prompt=' + ' '.join(['seven'] * 30),), 'has 32 tokens (with BOS and EOS) but length=20'),
])
def test_text_to_image_bad_prompts_are_one_line(run, subprocess_cache, args, words):
  workdir, _ = run
  line = _error_line(_run('experiments.text_to_image', f'--workdir={workdir}', *args,
                          cache_dir=subprocess_cache))
  assert words in line, line
