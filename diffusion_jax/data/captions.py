"""Captioned digits: every 8x8 digit gets short English captions that are true of its image.

A caption names the class ("seven" or "7") and 0, 1 or 2 measured attributes. Each attribute is
an image moment of the native 8x8 digit with ink weights `w = (x + 1) / 2` (pixel centres at
integer row `i` and column `j`, row 0 at the top; `M = sum w`, centroid `(c_i, c_j)`,
central moments `mu_pq = sum w (j - c_j)^p (i - c_i)^q / M`):

  thickness  M, the ink mass                              'thin' / 'bold'
  width      sqrt(mu20), the horizontal spread            'narrow' / 'wide'
  slant      -mu11 / mu02, the shear dj/di of the ink     'slanted left' / 'slanted right'
             (positive when the top leans right, as in "/")
  position   c_j, the ink's centroid column               'on the left' / 'on the right'

An attribute is named only outside a middle band: value 0 below `THRESHOLDS[name][0]`, value 1
above `THRESHOLDS[name][1]`, -1 (not named) between them. The thresholds are the 30th and 70th
percentiles over the train split, so the words are relative to the training digits: "bold" is
bolder than 70 % of them. A fifth candidate, the height sqrt(mu02), was measured and dropped:
its spread within a class is under half its total spread (the digit class fixes it).

Training captions use `TRAIN_TEMPLATES`; evaluation prompts use `HELDOUT_TEMPLATES`, whose word
order and phrasing differ (every held-out word also occurs in training), so a model must read the
text rather than a fixed label slot.
"""

import functools
import hashlib
from typing import NamedTuple

import numpy as np

from diffusion_jax.data import digits
from diffusion_jax.data import sampler as data_sampler

DIGIT_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine')
NUMERALS = tuple(str(d) for d in range(10))

# name -> (value 0 words, value 1 words), in the order of the columns of `measure_attributes`.
ATTRIBUTES = {
    'thickness': ('thin', 'bold'),
    'width': ('narrow', 'wide'),
    'slant': ('slanted left', 'slanted right'),
    'position': ('on the left', 'on the right'),
}

# (low, high): the 30th and 70th percentiles of each moment over `load_digits('train')`
# (np.percentile, linear interpolation; rounded to 3 decimals), measured once. Train-split
# distributions (10th / 30th / 50th / 70th / 90th percentiles):
#   thickness  16.69 / 18.25 / 19.56 / 20.75 / 22.25  (mass is a multiple of 1/32)
#   width       1.048 / 1.182 / 1.257 / 1.337 / 1.448
#   slant      -0.199 / -0.104 / -0.037 / 0.026 / 0.115
#   position    3.221 / 3.420 / 3.556 / 3.716 / 3.965
# tests/test_captions.py recomputes them from the data.
THRESHOLDS = {
    'thickness': (18.25, 20.75),
    'width': (1.182, 1.337),
    'slant': (-0.104, 0.026),
    'position': (3.420, 3.716),
}
THRESHOLD_PERCENTILES = (30.0, 70.0)

NOT_NAMED = -1


class Template(NamedTuple):
  """A caption form. `plain` names only the class, `described` the class and `{attrs}`: the
  attribute phrases in `ATTRIBUTES` order (reversed if `reverse`) joined by `joiner`. `{word}`
  is the class as a word ('seven'), `{numeral}` as a numeral ('7')."""
  plain: str
  described: str
  joiner: str
  reverse: bool


TRAIN_TEMPLATES = (
    Template('a {word}', 'a {word} that is {attrs}', ' and ', False),
    Template('the digit {numeral}', 'the digit {numeral}, {attrs}', ', ', False),
    Template('a picture of the number {word}', 'a picture of the number {word}, {attrs}',
             ' and ', True),
    Template('{numeral}', '{attrs}: {numeral}', ', ', False),
    Template('the number {numeral}', 'the number {numeral} that is {attrs}', ', ', True),
)
HELDOUT_TEMPLATES = (
    Template('{word}', '{word}: {attrs}', ' and ', True),
    Template('a number {numeral}', '{attrs}, a number {numeral}', ' and ', False),
    Template('the digit {word}', 'a digit {word} that is {attrs}', ', ', True),
    Template('a picture of a {numeral}', 'a picture of a {numeral}, {attrs}', ', ', False),
)
TEMPLATES = {'train': TRAIN_TEMPLATES, 'heldout': HELDOUT_TEMPLATES}

# Attributes per caption, drawn uniformly from this tuple (then capped by how many the image has
# named): a quarter of the captions name the class alone.
_NUM_NAMED = (0, 1, 2, 2)
# evaluation_prompts asks only for (class, values) that at least this many train digits have.
MIN_SUPPORT = 3
_MIN_MASS = 1e-3


def attribute_moments(images) -> dict[str, np.ndarray]:
  """The moment behind each attribute, `{name: [N] float64}`, of `[N, S, S, 1]` digits at any
  size of `digits.SIZES` (mapped to 8x8 by `digits.to_native`, clipped to [-1, 1]). A blank
  image (M < `_MIN_MASS`, far below one pixel's ink) has NaN for all but the mass; a single-row
  image has NaN slant."""
  x = np.clip(digits.to_native(np.asarray(images, np.float64)), -1.0, 1.0)[..., 0]  # [N, 8, 8]
  w = (x + 1.0) / 2.0
  rows, cols = np.meshgrid(np.arange(8.0), np.arange(8.0), indexing='ij')  # i down, j right
  mass = w.sum(axis=(1, 2))  # [N]
  with np.errstate(invalid='ignore', divide='ignore'):
    # The 32 -> 8 pseudo-inverse leaves ~1e-7 of round-off ink on a blank image: not a shape.
    safe_mass = np.where(mass < _MIN_MASS, np.nan, mass)
    c_i = (w * rows).sum(axis=(1, 2)) / safe_mass
    c_j = (w * cols).sum(axis=(1, 2)) / safe_mass
    di = rows - c_i[:, None, None]
    dj = cols - c_j[:, None, None]
    mu20 = (w * dj * dj).sum(axis=(1, 2)) / safe_mass
    mu02 = (w * di * di).sum(axis=(1, 2)) / safe_mass
    mu11 = (w * dj * di).sum(axis=(1, 2)) / safe_mass
    slant = np.where(mu02 > 1e-12, -mu11 / mu02, np.nan)
  return {'thickness': mass, 'width': np.sqrt(mu20), 'slant': slant, 'position': c_j}


def measure_attributes(images) -> np.ndarray:
  """`[N, len(ATTRIBUTES)]` int32 values of `[N, S, S, 1]` digits in [-1, 1] (generated ones
  too: clipped first): 0 below the low threshold, 1 above the high one, -1 between them or
  where the moment is undefined (NaN)."""
  moments = attribute_moments(images)
  columns = []
  for name in ATTRIBUTES:
    low, high = THRESHOLDS[name]
    v = moments[name]
    columns.append(np.where(v < low, 0, np.where(v > high, 1, NOT_NAMED)))
  return np.stack(columns, axis=1).astype(np.int32).reshape(-1, len(ATTRIBUTES))


def attribute_phrases(attribute_values) -> list[str]:
  """The phrases of the named values (`ATTRIBUTES` order; -1 entries are skipped)."""
  values = np.asarray(attribute_values).reshape(-1)
  if values.shape != (len(ATTRIBUTES),) or not np.all(np.isin(values, (NOT_NAMED, 0, 1))):
    raise ValueError(f'captions: attribute values must be {len(ATTRIBUTES)} entries of -1, 0 or '
                     f'1 (for {list(ATTRIBUTES)}); got {values.tolist()}')
  return [words[int(v)] for words, v in zip(ATTRIBUTES.values(), values, strict=True)
          if v != NOT_NAMED]


def caption(label: int, attribute_values, *, template: int, subset: str = 'train') -> str:
  """The caption of class `label` naming the values of `attribute_values` (`[A]`, -1 = not
  named) in template number `template` of `TEMPLATES[subset]`: a pure function."""
  if subset not in TEMPLATES:
    raise ValueError(f'captions: unknown template subset {subset!r}; expected one of '
                     f'{sorted(TEMPLATES)}')
  forms = TEMPLATES[subset]
  if not 0 <= template < len(forms):
    raise ValueError(f'captions: template={template}; {subset!r} has {len(forms)} templates')
  if not 0 <= int(label) < digits.NUM_CLASSES:
    raise ValueError(f'captions: label={label}; expected 0..{digits.NUM_CLASSES - 1}')
  form = forms[template]
  phrases = attribute_phrases(attribute_values)
  if form.reverse:
    phrases = phrases[::-1]
  text = form.described if phrases else form.plain
  return text.format(word=DIGIT_WORDS[int(label)], numeral=NUMERALS[int(label)],
                     attrs=form.joiner.join(phrases))


def _rng(*keys: int) -> np.random.Generator:
  # Philox keyed by a hash of the integers: a fixed function of them, no hidden state.
  digest = hashlib.blake2b(repr(tuple(int(k) for k in keys)).encode(), digest_size=16).digest()
  return np.random.Generator(np.random.Philox(key=int.from_bytes(digest, 'little')))


def draw_caption(label: int, attribute_values, *, seed: int, position: int, index: int,
                 subset: str = 'train') -> tuple[str, np.ndarray]:
  """`(text, named)`: a caption of the example at `index` read at global `position` of a run
  with `seed`, and the `[A]` values it names (-1 elsewhere). The template, how many of the
  image's named attributes it mentions (0, 1 or 2) and which, are drawn from Philox keyed by
  (seed, position, index): captions change across epochs, and a resumed run reads the same."""
  values = np.asarray(attribute_values, np.int32).reshape(-1)
  rng = _rng(seed, position, index)
  template = int(rng.integers(len(TEMPLATES[subset])))
  available = np.flatnonzero(values != NOT_NAMED)
  k = min(_NUM_NAMED[int(rng.integers(len(_NUM_NAMED)))], len(available))
  chosen = rng.permutation(available)[:k]
  named = np.full_like(values, NOT_NAMED)
  named[chosen] = values[chosen]
  return caption(label, named, template=template, subset=subset), named


class CaptionedSource:
  """A source of digits whose examples gain `'tokens'` `[length]` int32 (a caption drawn by
  `draw_caption`) and `'attributes'` `[A]` int32 (the values that caption names, -1 elsewhere).

  `base` has `example(index, seed, position)` returning 'image' and 'label' (an `ArraySource`,
  latents, ...); `attributes` `[len(base), A]` are the examples' measured values, measured from
  `base.images` (digits at any size) when omitted. Batches read the same indices as `base`
  (`sampler.batch_rows`), and `position` keys the caption, so resumed and multi-process runs see
  the captions an uninterrupted single-process run would.
  """

  def __init__(self, base, tokenizer, *, templates: str = 'train', length: int | None = None,
               attributes=None):
    if templates not in TEMPLATES:
      raise ValueError(f'CaptionedSource: templates={templates!r}; expected one of '
                       f'{sorted(TEMPLATES)}')
    if attributes is None:
      if not hasattr(base, 'images'):
        raise ValueError('CaptionedSource: pass attributes=[N, A] for a source without .images')
      attributes = measure_attributes(np.asarray(base.images))
    attributes = np.asarray(attributes, np.int32)
    if attributes.shape != (len(base), len(ATTRIBUTES)):
      raise ValueError(f'CaptionedSource: attributes of shape {attributes.shape}; expected '
                       f'({len(base)}, {len(ATTRIBUTES)}) for {list(ATTRIBUTES)}')
    self.base, self.tokenizer, self.templates = base, tokenizer, templates
    self.length = int(length or tokenizer.context_length)
    self.attributes = attributes
    self.image_shape = base.image_shape
    self.num_classes = base.num_classes

  def __len__(self) -> int:
    return len(self.base)

  def caption(self, index: int, seed: int = 0, position: int | None = None):
    """`(text, named)` of the example at `index` read at `position` (default: the index)."""
    label = self.base.example(index, seed, index if position is None else position)['label']
    return draw_caption(int(label), self.attributes[index], seed=seed,
                        position=index if position is None else position, index=index,
                        subset=self.templates)

  def example(self, index: int, seed: int = 0, position: int | None = None) -> dict:
    """The base example at `index` with its caption's `'tokens'` and `'attributes'`."""
    position = index if position is None else position
    out = dict(self.base.example(index, seed, position))
    text, named = draw_caption(int(out['label']), self.attributes[index], seed=seed,
                               position=position, index=index, subset=self.templates)
    out['tokens'] = np.asarray(self.tokenizer.encode([text], self.length)[0], np.int32)
    out['attributes'] = named
    return out

  def examples(self, indices, seed: int = 0, positions=None) -> dict:
    """Examples at `indices`, stacked; `positions` (default: the indices) key the captions."""
    indices = np.asarray(indices)
    positions = indices if positions is None else np.asarray(positions)
    rows = [self.example(int(i), seed, int(p)) for i, p in zip(indices, positions, strict=True)]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]} if rows else {}

  def batch(self, seed: int, step: int, global_batch: int, process_index: int = 0,
            process_count: int = 1) -> dict:
    idx, positions = data_sampler.batch_rows(seed, step, global_batch, len(self),
                                             process_index, process_count)
    return self.examples(idx, seed=seed, positions=positions)


@functools.lru_cache(maxsize=None)
def _train_support() -> tuple[np.ndarray, np.ndarray]:
  images, labels = digits.load_digits('train')
  return labels, measure_attributes(images)


def evaluation_prompts(num: int, *, seed: int = 0, templates: str = 'heldout'):
  """`(texts, labels, attributes)`: `num` prompts, prompt `i` of class `i % 10` naming 1 or 2
  attribute values (`attributes` `[num, A]` int32, -1 = not named), drawn from Philox keyed by
  (seed, i) among the (class, values) combinations that at least `MIN_SUPPORT` train digits
  have, so every prompt is achievable; the template is drawn uniformly from `templates`."""
  if templates not in TEMPLATES:
    raise ValueError(f'evaluation_prompts: templates={templates!r}; expected one of '
                     f'{sorted(TEMPLATES)}')
  labels, attrs = _train_support()
  num_attrs = len(ATTRIBUTES)
  pairs = [(a, b) for a in range(num_attrs) for b in range(a + 1, num_attrs)]
  texts, out_labels, out_attrs = [], np.zeros(num, np.int32), np.full((num, num_attrs), -1)
  for i in range(num):
    rng = _rng(seed, i, 0x5EED)
    label = i % digits.NUM_CLASSES
    mine = attrs[labels == label]  # [n_c, A]
    k = 1 + int(rng.integers(2))
    subsets = [(a,) for a in range(num_attrs)] if k == 1 else pairs
    candidates = []
    for subset in subsets:
      vals, counts = np.unique(mine[:, subset], axis=0, return_counts=True)
      candidates += [(subset, v) for v, c in zip(vals, counts, strict=True)
                     if c >= MIN_SUPPORT and np.all(v != NOT_NAMED)]
    subset, vals = candidates[int(rng.integers(len(candidates)))]
    out_attrs[i, list(subset)] = vals
    template = int(rng.integers(len(TEMPLATES[templates])))
    texts.append(caption(label, out_attrs[i], template=template, subset=templates))
    out_labels[i] = label
  return texts, out_labels, out_attrs.astype(np.int32)
