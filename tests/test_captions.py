"""Captioned digits: attributes from image moments, captions true of their images, templates,
the word tokenizer, and class / attribute accuracy."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.data import captions
from diffusion_jax.data import digits
from diffusion_jax.data import sampler as data_sampler
from diffusion_jax.data.sources import ArraySource
from diffusion_jax.metrics import attributes as attribute_metrics
from diffusion_jax.metrics.digits_classifier import DigitsClassifier
from diffusion_jax.text import words

# Written out here, not read from captions.ATTRIBUTES: column, value of each phrase.
_PHRASES = {'thin': (0, 0), 'bold': (0, 1), 'narrow': (1, 0), 'wide': (1, 1),
            'slanted left': (2, 0), 'slanted right': (2, 1),
            'on the left': (3, 0), 'on the right': (3, 1)}
_DIGITS = {**{w: d for d, w in enumerate('zero one two three four five six seven eight nine'
                                         .split())}, **{str(d): d for d in range(10)}}
_TOKENIZER = words.WordTokenizer.for_captions()


def _parse(text):
  """(label, [A] values) a caption states, read from its words alone."""
  toks = words.split_words(text)
  padded = ' ' + ' '.join(toks) + ' '
  found = [_DIGITS[t] for t in toks if t in _DIGITS]
  assert len(found) == 1, text
  values = [-1] * 4
  for phrase, (col, val) in _PHRASES.items():
    if f' {phrase} ' in padded:
      assert values[col] == -1, text
      values[col] = val
  return found[0], values


def _image(pixels, value=1.0):
  x = -np.ones((8, 8), np.float32)
  for i, j in pixels:
    x[i, j] = value
  return x[..., None]


# Expected values from the definition: M = sum w; width = std of the ink's column; slant =
# -mu11 / mu02 (top to the right: +); position = centroid column; thresholds of THRESHOLDS.
_HAND_BUILT = [
    # vertical 1-px bar, column 3: M 6 (thin), width 0 (narrow), shear 0 (middle), c_j 3 (left)
    ([(i, 3) for i in range(1, 7)], [0, 0, -1, 0]),
    # 6 x 4 block, columns 2..5: M 24 (bold), width sqrt(1.25) = 1.118 (narrow), c_j 3.5
    ([(i, j) for i in range(1, 7) for j in range(2, 6)], [1, 0, -1, -1]),
    # "/" : (i, 7 - i): M 8, width sqrt(5.25) = 2.29 (wide), dj = -di -> slant +1 (right)
    ([(i, 7 - i) for i in range(8)], [0, 1, 1, -1]),
    # "\" : (i, i): slant -1 (left)
    ([(i, i) for i in range(8)], [0, 1, 0, -1]),
    # blob at columns 0..1: c_j 0.5 (left); width 0.5 (narrow)
    ([(i, j) for i in range(2, 6) for j in (0, 1)], [0, 0, -1, 0]),
    # blob at columns 6..7: c_j 6.5 (right)
    ([(i, j) for i in range(2, 6) for j in (6, 7)], [0, 0, -1, 1]),
    # bars at columns 0 and 7: M 16, width 3.5 (wide), c_j 3.5 (middle)
    ([(i, j) for i in range(8) for j in (0, 7)], [0, 1, -1, -1]),
    # blank: M 0 (thin), the rest undefined (not named)
    ([], [0, -1, -1, -1]),
]


def test_attribute_order_and_words():
  assert list(captions.ATTRIBUTES) == ['thickness', 'width', 'slant', 'position']
  for phrase, (col, val) in _PHRASES.items():
    assert list(captions.ATTRIBUTES.values())[col][val] == phrase


@pytest.mark.parametrize('size', digits.SIZES)
def test_attributes_of_hand_built_images(size):
  x = np.stack([_image(p) for p, _ in _HAND_BUILT])  # [N, 8, 8, 1]
  if size == 16:
    x = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
  elif size == 32:
    a = digits.bilinear_matrix()
    x = np.einsum('ij,njkc,lk->nilc', a, x, a)
  np.testing.assert_array_equal(captions.measure_attributes(x), [e for _, e in _HAND_BUILT])


def test_ink_weights_and_clipping():
  block = [(i, j) for i in range(1, 7) for j in range(2, 6)]
  # Grey ink (x = 0) weighs w = 1/2: the 24-pixel block has M = 12, thin.
  assert captions.attribute_moments(_image(block, 0.0)[None])['thickness'][0] == 12.0
  assert captions.measure_attributes(_image(block, 0.0)[None])[0, 0] == 0
  # A generated image beyond [-1, 1] is clipped first: same values as the clipped image.
  x = np.stack([_image(p) for p, _ in _HAND_BUILT])
  np.testing.assert_array_equal(captions.measure_attributes(3.0 * x),
                                captions.measure_attributes(x))


def test_thresholds_are_the_train_split_percentiles():
  images, _ = digits.load_digits('train')
  moments = captions.attribute_moments(images)
  values = captions.measure_attributes(images)
  for k, name in enumerate(captions.ATTRIBUTES):
    low, high = np.percentile(moments[name], captions.THRESHOLD_PERCENTILES)
    spread = np.std(moments[name])
    assert abs(captions.THRESHOLDS[name][0] - low) < 0.01 * spread, name
    assert abs(captions.THRESHOLDS[name][1] - high) < 0.01 * spread, name
    # Each named value covers 25-35 % of the training digits (ties at the quantized mass).
    for v in (0, 1):
      assert 0.25 < np.mean(values[:, k] == v) < 0.35, (name, v)


def _all_captions(subset):
  out = set()
  for t in range(len(captions.TEMPLATES[subset])):
    for label in range(10):
      for values in np.ndindex(3, 3, 3, 3):
        out.add(captions.caption(label, np.array(values) - 1, template=t, subset=subset))
  return out


def test_templates_are_disjoint_and_share_their_words():
  train, heldout = _all_captions('train'), _all_captions('heldout')
  assert not train & heldout
  train_words = {w for c in train for w in words.split_words(c)}
  heldout_words = {w for c in heldout for w in words.split_words(c)}
  assert heldout_words <= train_words  # every held-out word was seen in training
  assert set(words.CAPTION_VOCAB[3:]) == train_words  # the vocabulary, no more, no less
  for subset in (train, heldout):  # numerals and number words both appear
    assert any('7' in words.split_words(c) for c in subset)
    assert any('seven' in words.split_words(c) for c in subset)
  for subset in ('train', 'heldout'):
    for c in _all_captions(subset):
      assert len(words.split_words(c)) + 2 <= _TOKENIZER.context_length


@pytest.mark.parametrize('subset', ['train', 'heldout'])
def test_caption_states_its_label_and_values(subset):
  rng = np.random.default_rng(0)
  for _ in range(200):
    label, values = int(rng.integers(10)), rng.integers(-1, 2, size=4)
    t = int(rng.integers(len(captions.TEMPLATES[subset])))
    label2, values2 = _parse(captions.caption(label, values, template=t, subset=subset))
    assert (label2, values2) == (label, values.tolist())


@pytest.fixture(scope='module')
def train_source():
  images, labels = digits.load_digits('train')
  return captions.CaptionedSource(ArraySource(images, labels, 10), _TOKENIZER)


def test_captions_are_true_of_their_images(train_source):
  images, labels = digits.load_digits('train')
  measured = captions.measure_attributes(images)
  for step in range(3):
    batch = train_source.batch(seed=1, step=step, global_batch=256)
    idx = data_sampler.batch_indices(1, step, 256, len(images))
    np.testing.assert_array_equal(batch['label'], labels[idx])
    np.testing.assert_array_equal(batch['image'], images[idx])
    for text, named, i in zip(_TOKENIZER.decode(batch['tokens']), batch['attributes'], idx,
                              strict=True):
      label, values = _parse(text)
      assert label == labels[i]
      assert values == named.tolist()
      stated = np.array(values) != -1
      np.testing.assert_array_equal(measured[i][stated], np.array(values)[stated])


def test_caption_mix(train_source):
  batch = train_source.batch(seed=0, step=0, global_batch=1000)
  counts = np.sum(batch['attributes'] != -1, axis=1)
  assert set(counts.tolist()) == {0, 1, 2}
  assert 0.15 < np.mean(counts == 0) < 0.45  # some label-only captions
  texts = _TOKENIZER.decode(batch['tokens'])
  assert any('7' in words.split_words(t) for t in texts)
  assert any('seven' in words.split_words(t) for t in texts)


def test_captions_are_deterministic_and_resume(train_source):
  a = train_source.batch(seed=3, step=5, global_batch=64)
  b = pickle.loads(pickle.dumps(train_source)).batch(seed=3, step=5, global_batch=64)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  # Two processes together read exactly the single-process batch.
  halves = [train_source.batch(3, 5, 64, p, 2) for p in (0, 1)]
  for k in a:
    np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), a[k])
  # example(index, seed, position) is the batch row at that position.
  idx, pos = data_sampler.batch_rows(3, 5, 64, len(train_source))
  row = train_source.example(int(idx[7]), 3, int(pos[7]))
  for k in a:
    np.testing.assert_array_equal(row[k], a[k][7])
  # Another epoch (position) or seed: the same image, other captions.
  texts = {_TOKENIZER.decode(train_source.example(11, 0, p)['tokens'][None])[0]
           for p in range(11, 11 + 40 * len(train_source), len(train_source))}
  assert len(texts) > 5
  other = train_source.batch(seed=4, step=5, global_batch=64)
  assert not np.array_equal(other['tokens'], a['tokens'])
  assert train_source.image_shape == (8, 8, 1) and train_source.num_classes == 10
  assert len(train_source) == 1347


def test_source_rejects_mismatched_attributes():
  images, labels = digits.load_digits('test')
  base = ArraySource(images, labels, 10)
  with pytest.raises(ValueError, match='attributes of shape'):
    captions.CaptionedSource(base, _TOKENIZER, attributes=np.zeros((3, 4)))
  with pytest.raises(ValueError, match='templates'):
    captions.CaptionedSource(base, _TOKENIZER, templates='test')


def test_evaluation_prompts_are_achievable_and_held_out():
  texts, labels, attrs = captions.evaluation_prompts(60, seed=2)
  again = captions.evaluation_prompts(60, seed=2)
  assert texts == again[0]
  np.testing.assert_array_equal(labels, np.arange(60) % 10)
  assert attrs.shape == (60, 4) and attrs.dtype == np.int32
  named = np.sum(attrs != -1, axis=1)
  assert set(named.tolist()) == {1, 2}
  images, train_labels = digits.load_digits('train')
  measured = captions.measure_attributes(images)
  train_texts = _all_captions('train')
  for text, label, a in zip(texts, labels, attrs, strict=True):
    assert _parse(text) == (label, a.tolist())
    assert text not in train_texts
    cols = a != -1
    support = np.sum((train_labels == label) & np.all(measured[:, cols] == a[cols], axis=1))
    assert support >= captions.MIN_SUPPORT, text
  assert captions.evaluation_prompts(60, seed=3)[0] != texts
  assert set(captions.evaluation_prompts(20, templates='train')[0]) <= train_texts


# ---------------------------------------------------------------------------------------------
# The word tokenizer.


def test_tokenizer_layout_and_round_trip():
  tok = _TOKENIZER
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.vocab_size == len(words.CAPTION_VOCAB)
  ids = tok.encode(['A Seven, thin', ''], 8)
  seven, comma, thin = (words.CAPTION_VOCAB.index(w) for w in ('seven', ',', 'thin'))
  a = words.CAPTION_VOCAB.index('a')
  np.testing.assert_array_equal(ids, [[1, a, seven, comma, thin, 2, 0, 0],
                                      [1, 2, 0, 0, 0, 0, 0, 0]])
  assert ids.dtype == np.int32 and tok.encode(['a 7']).shape == (1, tok.context_length)
  assert tok.decode(ids) == ['a seven, thin', '']
  for c in list(_all_captions('heldout'))[:200]:
    assert tok.decode(tok.encode([c]))[0] == c
  mask = tok.context_mask(ids)
  np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(mask[1], [1, 1, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(words.context_mask(jnp.asarray(ids))), mask)


def test_tokenizer_errors():
  tok = _TOKENIZER
  with pytest.raises(ValueError, match=r"unknown word 'eleven' in prompt 'a eleven'.*\d+ words"):
    tok.encode(['a seven', 'a eleven'])
  with pytest.raises(ValueError, match=r"unknown word 'seven!'"):
    tok.encode(['seven!'])
  long = 'a seven that is thin and wide and slanted left and on the left'
  with pytest.raises(ValueError, match=r"'a seven that is thin and wide and slante'.* 16 tokens.*"
                                       r'length=8'):
    tok.encode([long], 8)
  with pytest.warns(UserWarning, match='truncated'):
    ids = tok.encode([long], 8, truncate=True)
  assert ids[0, -1] == tok.eos_id and ids[0, 0] == tok.bos_id
  assert tok.decode(ids) == ['a seven that is thin and']
  tok.check_matches(tok.vocab_size, 'embed')
  with pytest.raises(ValueError, match=f'embed.table: .*of 99 tokens.* {tok.vocab_size}'):
    tok.check_matches(99, 'embed.table')


# ---------------------------------------------------------------------------------------------
# Class and attribute accuracy.


def _constant_classifier(label):
  """Digits-classifier params that predict `label` for every image."""
  params = jax.jit(DigitsClassifier().init)(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))['params']
  params = jax.tree.map(np.asarray, params)
  params['Dense_2']['kernel'] = np.zeros_like(params['Dense_2']['kernel'])
  params['Dense_2']['bias'] = 10.0 * np.eye(10, dtype=np.float32)[label]
  return params


def test_real_digits_meet_their_own_captions():
  images, labels = digits.load_digits('test', 16)
  source = captions.CaptionedSource(ArraySource(images, labels, 10), _TOKENIZER)
  batch = source.examples(np.arange(len(labels)), seed=0)
  clf = _constant_classifier(3)
  got = attribute_metrics.attribute_accuracy(clf, batch['image'], batch['label'],
                                             batch['attributes'])
  assert got['attribute_accuracy'] == 1.0
  assert all(got[f'attr/{name}'] == 1.0 for name in captions.ATTRIBUTES)
  assert got['class_accuracy'] == pytest.approx(np.mean(labels == 3))
  assert got['joint_accuracy'] == pytest.approx(np.mean(labels == 3))
  # Asking for the other value of every named attribute: every image that names one fails.
  flipped = np.where(batch['attributes'] == -1, -1, 1 - batch['attributes'])
  got = attribute_metrics.attribute_accuracy(clf, batch['image'], batch['label'], flipped)
  assert got['attribute_accuracy'] == pytest.approx(np.mean(np.all(flipped == -1, axis=1)))
  assert all(got[f'attr/{name}'] == 0.0 for name in captions.ATTRIBUTES)
  with pytest.raises(ValueError, match='attributes'):
    attribute_metrics.attribute_accuracy(clf, batch['image'], batch['label'], flipped[:, :2])
