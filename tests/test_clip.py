"""Tests for the CLIP towers (`models.clip`), their loader (`weights.clip.load_clip`) and the CLIP
BPE tokenizer (`text.clip_tokenizer`).

The reference is Hugging Face transformers, run once by `fixtures/clip/make_fixture.py`: a tiny
random CLIPModel (quick_gelu, pooled at the first EOS), a tiny CLIPTextModel in SD's layout
(gelu, legacy argmax pooling), a tiny BPE vocabulary, and their outputs / token ids.
Programs are compiled at LLVM optimisation level 0.
"""

import functools
import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from diffusion_jax.models.clip import (CLIP_MEAN, CLIP_STD, CLIPConfig, CLIPModel,
                                       CLIPTextConfig, CLIPVisionConfig, preprocess_images)
from diffusion_jax.text.clip_tokenizer import CLIPTokenizer
from diffusion_jax.weights.clip import load_clip
from tests.error_testing import assert_one_line_error

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'clip')
TOKENIZER = os.path.join(FIXTURE, 'tokenizer')
TOLERANCE = 1e-5  # max abs difference to the reference, float32
_FAST_COMPILE = {'xla_backend_optimization_level': 0}


@functools.partial(jax.jit, static_argnames=('module', 'method'), compiler_options=_FAST_COMPILE)
def _apply(module, variables, x, method=None):
  return module.apply(variables, x, method=method)


def _text_tower(module, x):
  return module.text_model(x)


def _vision_tower(module, x):
  return module.vision_model(x)


def _both_towers(module, x):
  return module(*x)['logits_per_image']


@pytest.fixture(scope='module')
def expected():
  return dict(np.load(os.path.join(FIXTURE, 'expected.npz')))


@pytest.fixture(scope='module')
def clip():
  return load_clip(FIXTURE)


@pytest.fixture(scope='module')
def tokenizer():
  return CLIPTokenizer.from_directory(TOKENIZER)


def _max_abs(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)))


def test_config_from_hf_dicts():
  with open(os.path.join(FIXTURE, 'config.json'), encoding='utf-8') as f:
    full = json.load(f)
  text = CLIPTextConfig.from_hf_dict(full)
  assert (text.vocab_size, text.hidden_size, text.projection_dim, text.eos_token_id) == (
      554, 32, 16, 553)  # projection_dim is the top-level one, not text_config's 512
  vision = CLIPVisionConfig.from_hf_dict(full)
  assert (vision.image_size, vision.patch_size, vision.num_patches) == (32, 8, 16)
  with open(os.path.join(FIXTURE, 'text_encoder', 'config.json'), encoding='utf-8') as f:
    flat = json.load(f)
  config = CLIPConfig.from_hf_dict(flat)
  assert config.architecture == 'CLIPTextModel' and config.vision is None
  assert (config.text.hidden_act, config.text.eos_token_id) == ('gelu', 2)
  assert CLIPTextConfig.from_hf_dict({}) == CLIPTextConfig()  # HF omits default fields
  assert_one_line_error(lambda: CLIPVisionConfig.from_hf_dict(flat), ['clip_text_model'])
  assert_one_line_error(lambda: CLIPTextConfig(hidden_act='relu'), ["'relu'", 'quick_gelu'])
  assert_one_line_error(lambda: CLIPTextConfig(hidden_size=30), ['hidden_size=30'])
  assert_one_line_error(lambda: CLIPConfig.from_hf_dict({'architectures': ['BertModel']}),
                        ['BertModel'])


def test_text_tower_matches_reference(clip, expected):
  config, variables = clip
  module = config.module()
  assert isinstance(module, CLIPModel)
  hidden, pooled = _apply(module, variables, expected['input_ids'], _text_tower)
  assert _max_abs(hidden, expected['text_last_hidden_state']) <= TOLERANCE
  assert _max_abs(pooled, expected['text_pooled']) <= TOLERANCE
  embeds = _apply(module, variables, expected['input_ids'], 'encode_text')
  assert _max_abs(embeds, expected['text_embeds']) <= TOLERANCE


def test_vision_tower_matches_reference(clip, expected):
  config, variables = clip
  module = config.module()
  hidden, pooled = _apply(module, variables, expected['pixels'], _vision_tower)
  assert _max_abs(hidden, expected['vision_last_hidden_state']) <= TOLERANCE
  assert _max_abs(pooled, expected['vision_pooled']) <= TOLERANCE
  embeds = _apply(module, variables, expected['pixels'], 'encode_image')
  assert _max_abs(embeds, expected['image_embeds']) <= TOLERANCE
  logits = _apply(module, variables, (expected['input_ids'], expected['pixels']), _both_towers)
  assert _max_abs(logits, expected['logits_per_image']) <= 1e-4 * np.exp(2.6592)


def test_sd_text_encoder_gelu_and_argmax_pooling(expected):
  config, variables = load_clip(os.path.join(FIXTURE, 'text_encoder'))
  hidden, pooled = _apply(config.module(), variables, expected['input_ids'])
  assert _max_abs(hidden, expected['te_last_hidden_state']) <= TOLERANCE
  assert _max_abs(pooled, expected['te_pooled']) <= TOLERANCE


def test_text_model_with_projection_and_bare_keys(clip, expected, tmp_path):
  # A CLIPTextModelWithProjection (SDXL's text_encoder_2) made of the CLIPModel's text half.
  _, variables = clip
  state = safetensors.numpy.load_file(os.path.join(FIXTURE, 'model.safetensors'))
  with open(os.path.join(FIXTURE, 'config.json'), encoding='utf-8') as f:
    full = json.load(f)
  text_only = {k: v for k, v in state.items() if k.startswith(('text_model.', 'text_projection'))}
  (tmp_path / 'proj').mkdir()
  safetensors.numpy.save_file(text_only, str(tmp_path / 'proj' / 'model.safetensors'))
  (tmp_path / 'proj' / 'config.json').write_text(json.dumps(
      {**full['text_config'], 'projection_dim': 16,
       'architectures': ['CLIPTextModelWithProjection']}))
  config, loaded = load_clip(str(tmp_path / 'proj'))
  assert config.vision is None and 'logit_scale' not in loaded['params']
  embeds = _apply(config.module(), loaded, expected['input_ids'], 'encode_text')
  assert _max_abs(embeds, expected['text_embeds']) <= TOLERANCE
  # transformers >= 5 saves a CLIPTextModel without the `text_model.` prefix.
  te = safetensors.numpy.load_file(os.path.join(FIXTURE, 'text_encoder', 'model.safetensors'))
  (tmp_path / 'bare').mkdir()
  safetensors.numpy.save_file({k[len('text_model.'):]: v for k, v in te.items()},
                              str(tmp_path / 'bare' / 'model.safetensors'))
  shutil.copy(os.path.join(FIXTURE, 'text_encoder', 'config.json'), tmp_path / 'bare')
  _, bare = load_clip(str(tmp_path / 'bare'))
  _, published = load_clip(os.path.join(FIXTURE, 'text_encoder'))
  jax.tree.map(np.testing.assert_array_equal, bare, published)
  assert_one_line_error(lambda: config.module().apply(loaded, expected['pixels'],
                                                      method='encode_image'), ['vision'])


def _write_checkpoint(tmp_path, state, config=None):
  shutil.copy(os.path.join(FIXTURE, 'config.json'), tmp_path / 'config.json')
  if config is not None:
    (tmp_path / 'config.json').write_text(json.dumps(config))
  safetensors.numpy.save_file(state, str(tmp_path / 'model.safetensors'))
  return str(tmp_path)


def test_loader_errors_name_file_and_key(tmp_path):
  state = safetensors.numpy.load_file(os.path.join(FIXTURE, 'model.safetensors'))
  key = 'vision_model.encoder.layers.1.mlp.fc2.weight'
  (tmp_path / 'a').mkdir()
  path = _write_checkpoint(tmp_path / 'a', {k: v for k, v in state.items() if k != key})
  assert_one_line_error(lambda: load_clip(path), [repr(key), 'model.safetensors', 'lacks'])
  (tmp_path / 'b').mkdir()
  path = _write_checkpoint(tmp_path / 'b', {**state, 'text_model.extra.weight': np.zeros(2)})
  assert_one_line_error(lambda: load_clip(path), ["'text_model.extra.weight'", 'does not use'])
  (tmp_path / 'c').mkdir()
  key = 'text_model.encoder.layers.0.mlp.fc1.weight'
  path = _write_checkpoint(tmp_path / 'c', {**state, key: np.zeros((38, 32), np.float32)})
  assert_one_line_error(lambda: load_clip(path), [repr(key), '(38, 32)', '(37, 32)'])
  # config.json that does not match the weights: a shape error.
  (tmp_path / 'd').mkdir()
  with open(os.path.join(FIXTURE, 'config.json'), encoding='utf-8') as f:
    config = json.load(f)
  config['text_config']['vocab_size'] = 555
  path = _write_checkpoint(tmp_path / 'd', state, config)
  assert_one_line_error(lambda: load_clip(path), ["'text_model.embeddings.token_embedding.weight'",
                                                  '(554, 32)', '(555, 32)'])
  # Missing files.
  (tmp_path / 'e').mkdir()
  assert_one_line_error(lambda: load_clip(str(tmp_path / 'e')), ['config.json'])
  shutil.copy(os.path.join(FIXTURE, 'config.json'), tmp_path / 'e')
  assert_one_line_error(lambda: load_clip(str(tmp_path / 'e')), ['model.safetensors'])
  (tmp_path / 'e' / 'model.safetensors').write_bytes(b'not safetensors')
  assert_one_line_error(lambda: load_clip(str(tmp_path / 'e')), ['cannot read'])


def test_tower_input_errors(clip, expected):
  config, variables = clip
  module = config.module()
  assert_one_line_error(lambda: module.apply(variables, np.zeros((1, 17), np.int32),
                                             method='encode_text'), ['17', '16'])
  assert_one_line_error(lambda: module.apply(variables, np.zeros((1, 16), np.float32),
                                             method='encode_text'), ['int'])
  assert_one_line_error(lambda: module.apply(variables, np.zeros((1, 32, 32, 1)),
                                             method='encode_image'), ['(1, 32, 32, 1)'])


def test_preprocess_images():
  grey = jnp.full((2, 64, 64, 1), 0.5)  # (0.5 + 1) / 2 = 0.75 everywhere
  out = preprocess_images(grey, 32)
  want = (0.75 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
  assert out.shape == (2, 32, 32, 3)
  np.testing.assert_allclose(out, np.broadcast_to(want, out.shape), atol=1e-5)
  # Non-square: shorter side to 32, then the centre crop (left third vs right third of a ramp).
  wide = jnp.broadcast_to(jnp.linspace(-1, 1, 96)[None, None, :, None], (1, 48, 96, 3))
  out = preprocess_images(wide, 32)
  assert out.shape == (1, 32, 32, 3)
  centre = (np.asarray(out[0, 16, 16]) * CLIP_STD + CLIP_MEAN) * 2 - 1
  np.testing.assert_allclose(centre, 0.0, atol=0.05)
  assert_one_line_error(lambda: preprocess_images(jnp.zeros((2, 8, 8, 2)), 32), ['(2, 8, 8, 2)'])


def test_tokenizer_ids_match_reference(tokenizer, expected):
  texts = [str(t) for t in expected['texts']]
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (552, 553, 553)
  assert tokenizer.context_length == 16 and tokenizer.vocab_size == 554
  np.testing.assert_array_equal(tokenizer.encode(texts, 32), expected['ids'])
  np.testing.assert_array_equal(tokenizer.encode(texts[:2] + texts[4:5]),
                                expected['input_ids'][[0, 1, 2]])
  # SD 2's pad '!': the same ids, padded with 0 (HF also turns a literal '!' into the pad id;
  # we keep it '!</w>', see the module docstring, so compare with the EOS-padded ids).
  bang = CLIPTokenizer.from_files(os.path.join(TOKENIZER, 'vocab.json'),
                                  os.path.join(TOKENIZER, 'merges.txt'), 16, pad_token='!')
  ids = bang.encode(texts, 32)
  want = np.where(tokenizer.context_mask(expected['ids']), expected['ids'], 0)
  np.testing.assert_array_equal(ids, want)
  for row, text in enumerate(texts):
    if '!' not in text:
      np.testing.assert_array_equal(ids[row], expected['ids_pad_bang'][row])


def test_tokenizer_context_mask(tokenizer, expected):
  mask = tokenizer.context_mask(expected['ids'])
  lengths = [len(tokenizer.tokenize(str(t))) + 2 for t in expected['texts']]
  np.testing.assert_array_equal(mask.sum(-1), lengths)
  assert mask[:, 0].all() and not mask[4, 2:].any()  # '' -> BOS, EOS


def test_tokenizer_too_long_and_truncation(tokenizer, expected):
  long_text = str(expected['long_text'])
  assert_one_line_error(lambda: tokenizer.encode([long_text], 8),
                        [repr(long_text[:40]), '16 tokens', 'length=8'])
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    ids = tokenizer.encode([long_text, long_text, 'a cat'], 8, truncate=True)
  assert len(caught) == 1 and 'truncated' in str(caught[0].message)
  np.testing.assert_array_equal(ids[:2], np.repeat(expected['truncated_ids'], 2, axis=0))
  assert ids[0, -1] == tokenizer.eos_id


def test_tokenizer_vocabulary_errors(tokenizer, tmp_path):
  tokenizer.check_matches(554, 'text_model')
  assert_one_line_error(lambda: tokenizer.check_matches(49408, 'text_model'),
                        ['text_model', '49408', '554'])
  with open(os.path.join(TOKENIZER, 'vocab.json'), encoding='utf-8') as f:
    vocab = json.load(f)
  # Ids that run past the table: the size agrees but the largest id does not fit.
  shifted = CLIPTokenizer({k: v + 1 for k, v in vocab.items()}, [], 16)
  assert_one_line_error(lambda: shifted.check_matches(554, 'text_model'), ['largest id 554'])
  # A merged token missing from the vocabulary.
  del vocab['cat</w>']
  (tmp_path / 'vocab.json').write_text(json.dumps(vocab))
  broken = CLIPTokenizer.from_files(str(tmp_path / 'vocab.json'),
                                    os.path.join(TOKENIZER, 'merges.txt'))
  assert_one_line_error(lambda: broken.encode(['a cat']), ["'cat</w>'", 'vocabulary'])
  assert_one_line_error(lambda: CLIPTokenizer.from_files(str(tmp_path / 'nope.json'),
                                                         str(tmp_path / 'nope.txt')),
                        ['nope.json'])
