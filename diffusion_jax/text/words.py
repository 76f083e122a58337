"""A word-level tokenizer over the fixed vocabulary of the digit captions (`data.captions`).

Text is lowercased and split into words and the punctuation tokens ',' and ':'; a prompt of n
words becomes `[BOS, w_1, ..., w_n, EOS, PAD, ...]` (`[N, L]` int32), the layout the CLIP
tokenizer also produces, so a text encoder pools at the first EOS and masks what follows it.
"""

import re
import warnings

import numpy as np

# Ids 0, 1, 2 are PAD, BOS, EOS; the words follow. Written out rather than collected from the
# templates, so that editing a template can never silently renumber a trained embedding table
# (tests/test_captions.py checks that every caption word is here and nothing else is).
SPECIAL_TOKENS = ('<pad>', '<bos>', '<eos>')
CAPTION_VOCAB = SPECIAL_TOKENS + (
    ',', ':',
    '0', '1', '2', '3', '4', '5', '6', '7', '8', '9',
    'zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine',
    'a', 'and', 'digit', 'is', 'number', 'of', 'picture', 'that', 'the',
    'thin', 'bold', 'narrow', 'wide', 'slanted', 'on', 'left', 'right',
)
CONTEXT_LENGTH = 20  # the longest caption is 15 tokens with BOS and EOS

_WORD = re.compile(r'[,:]|[^\s,:]+')
_ATTACHED = (',', ':')  # decode writes these without a space before them


def split_words(text: str) -> list[str]:
  """Lowercased words and the punctuation tokens ',' ':' of `text`, in order."""
  return _WORD.findall(text.lower())


def context_mask(tokens, bos_id: int = 1, eos_id: int = 2):
  """`[N, L]` bool: True from the first BOS through the first EOS (inclusive). Works on numpy
  and jax arrays alike (no EOS: True to the end of the row)."""
  after_bos = (tokens == bos_id).cumsum(axis=-1) > 0
  eos_before = (tokens == eos_id).cumsum(axis=-1) - (tokens == eos_id)  # EOS strictly before
  return after_bos & (eos_before == 0)


class WordTokenizer:
  """Words of `vocab` (ids = positions in it; the first three are PAD, BOS, EOS)."""

  pad_id, bos_id, eos_id = 0, 1, 2

  def __init__(self, vocab=CAPTION_VOCAB, context_length: int = CONTEXT_LENGTH):
    vocab = tuple(vocab)
    if vocab[:3] != SPECIAL_TOKENS or len(set(vocab)) != len(vocab):
      raise ValueError(f'WordTokenizer: vocab must start with {SPECIAL_TOKENS} and have no '
                       f'duplicates; got {vocab[:5]}... ({len(vocab)} entries)')
    if context_length < 2:
      raise ValueError(f'WordTokenizer: context_length={context_length}; needs >= 2 (BOS, EOS)')
    self.vocab = vocab
    self.ids = {w: i for i, w in enumerate(vocab)}
    self.vocab_size = len(vocab)
    self.context_length = int(context_length)

  @classmethod
  def for_captions(cls) -> 'WordTokenizer':
    """The tokenizer of `data.captions`: `CAPTION_VOCAB`, `CONTEXT_LENGTH`."""
    return cls(CAPTION_VOCAB, CONTEXT_LENGTH)

  def encode(self, texts, length: int | None = None, *, truncate: bool = False) -> np.ndarray:
    """`[N, length or context_length]` int32: BOS, the words' ids, EOS, then PAD.

    A word outside the vocabulary is a one-line ValueError. So is a prompt needing more than
    `length` tokens (BOS and EOS included), unless `truncate`: then its first `length - 2` words
    are kept before EOS, with a warning. `texts` is a list of strings (or one string).
    """
    if isinstance(texts, str):
      texts = [texts]
    length = self.context_length if length is None else int(length)
    if length < 2:
      raise ValueError(f'WordTokenizer.encode: length={length}; needs >= 2 (BOS and EOS)')
    out = np.full((len(texts), length), self.pad_id, np.int32)
    for row, text in enumerate(texts):
      words = split_words(text)
      for w in words:
        if w not in self.ids:
          raise ValueError(f'WordTokenizer: unknown word {w!r} in prompt {text!r}; the vocabulary '
                           f'has {self.vocab_size - len(SPECIAL_TOKENS)} words')
      if len(words) + 2 > length:
        message = (f'WordTokenizer: prompt {text[:40]!r} has {len(words) + 2} tokens (with BOS '
                   f'and EOS) but length={length}')
        if not truncate:
          raise ValueError(message + '; shorten it or pass truncate=True')
        warnings.warn(message + '; truncated', stacklevel=2)
        words = words[:length - 2]
      ids = [self.bos_id] + [self.ids[w] for w in words] + [self.eos_id]
      out[row, :len(ids)] = ids
    return out

  def context_mask(self, tokens):
    """`[N, L]` bool: True from BOS through the first EOS."""
    return context_mask(tokens, self.bos_id, self.eos_id)

  def decode(self, tokens) -> list[str]:
    """The text of each row: the words between BOS and the first EOS, ',' and ':' attached to
    the word before them (the form `data.captions` writes, so captions round-trip)."""
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
      tokens = tokens[None]
    mask = context_mask(tokens, self.bos_id, self.eos_id)
    texts = []
    for row, keep in zip(tokens, mask, strict=True):
      words = [self.vocab[int(t)] for t in row[keep]
               if int(t) not in (self.pad_id, self.bos_id, self.eos_id)]
      text = ''
      for w in words:
        text += w if (w in _ATTACHED or not text) else ' ' + w
      texts.append(text)
    return texts

  def check_matches(self, vocab_size: int, name: str) -> None:
    """One-line ValueError if a model's embedding table (`name`) has another size."""
    if int(vocab_size) != self.vocab_size:
      raise ValueError(f'{name}: an embedding table of {vocab_size} tokens, but the word '
                       f'tokenizer has {self.vocab_size}; the model was built for another '
                       f'vocabulary')
