"""CLIP score with the real CLIP towers (the transformers fixture in tests/fixtures/clip)."""

import os

import numpy as np
import pytest

from diffusion_jax.metrics import clip_score
from diffusion_jax.text.clip_tokenizer import CLIPTokenizer
from diffusion_jax.weights.clip import load_clip

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'clip')
MODEL_TEXTS = ['a photo of a cat', 'A Photo OF a DOG!', '']   # make_fixture.py's first three


def test_pair_scores_formula():
  a = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
  b = np.array([[0.0, 2.0], [5.0, 0.0], [-1.0, 0.0], [4.0, 3.0]])
  # 100 max(cos, 0): orthogonal 0, parallel 100, opposite 0 (clipped), cos = 24 / 25.
  np.testing.assert_allclose(clip_score.pair_scores(a, b), [0.0, 100.0, 0.0, 96.0], atol=1e-12)
  with pytest.raises(ValueError, match='paired'):
    clip_score.pair_scores(a, b[:2])


def test_clip_score_matches_the_reference_embeddings():
  expected = np.load(os.path.join(FIXTURE, 'expected.npz'))
  config, variables = load_clip(FIXTURE)
  score = clip_score.CLIPScore(config, variables,
                               CLIPTokenizer.from_directory(os.path.join(FIXTURE, 'tokenizer')))
  img, txt = expected['image_embeds'][:3], expected['text_embeds'][:3]
  cos = (img * txt).sum(1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
  want = float(np.mean(100 * np.maximum(cos, 0)))
  got = score(expected['pixels'][:3], MODEL_TEXTS, preprocessed=True)
  assert got == pytest.approx(want, abs=1e-3)     # float32 embeddings (errors ~1e-6)
  # Raw images in [-1, 1] go through the preprocessing (grey -> RGB, resize, normalise).
  grey = np.random.default_rng(0).uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
  assert 0.0 <= score(grey, MODEL_TEXTS) <= 100.0
  with pytest.raises(ValueError, match='3 images but 2 prompts'):
    score(grey, MODEL_TEXTS[:2])


def test_clip_score_needs_both_towers():
  config, variables = load_clip(os.path.join(FIXTURE, 'text_encoder'))
  with pytest.raises(ValueError, match='CLIPTextModel has no vision tower'):
    clip_score.CLIPScore(config, variables,
                         CLIPTokenizer.from_directory(os.path.join(FIXTURE, 'tokenizer')))
