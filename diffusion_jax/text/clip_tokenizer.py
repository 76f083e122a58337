"""CLIP's byte-level BPE tokenizer (Radford et al. 2021; OpenAI `simple_tokenizer.py`), read from
local `vocab.json` + `merges.txt` files as Stable Diffusion's `tokenizer/` folder ships them.

A prompt becomes ids in five steps, those of Hugging Face's CLIPTokenizer (transformers 5):
  1. normalise: NFC, every whitespace run -> ' ', strip, lowercase (OpenAI's code runs ftfy and
     html.unescape first; neither changes text that is already clean, and neither is here);
  2. split into pieces by CLIP's pattern
       <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+
     written for Python's `re`, which lacks \\p{..}: Python's `\\w` is exactly letters (L*),
     numbers (N*) and '_', so [\\p{L}]+ -> [^\\W\\d_]+, [\\p{N}] -> \\d, [^\\s\\p{L}\\p{N}]+ ->
     (?:[^\\s\\w]|_)+. `\\d` is only the decimal digits (Nd), so the other numbers (Nl, No: '½',
     '²', 'Ⅻ') would join a letter run; such runs are split again by unicodedata, making the
     split exact up to the two libraries' Unicode versions;
  3. each piece's UTF-8 bytes -> printable characters (GPT-2's byte -> unicode table), and `</w>`
     appended to its last symbol;
  4. BPE: repeatedly merge the adjacent pair of lowest rank in merges.txt (cached per piece);
  5. each symbol -> its id in vocab.json; `<|startoftext|>` first, `<|endoftext|>` last, then
     the pad id to the length. A special token in the text is its id (as in the reference).
One difference from HF: HF registers the pad token as a special token, so with SD 2's
pad_token='!' a literal '!' in a prompt becomes the pad id 0 instead of '!</w>' (256). Here '!'
stays '!</w>', as in OpenCLIP's tokenizer, which SD 2's text encoder was trained with (it pads
with id 0 and has no such rule). With the default pad (`<|endoftext|>`) the two agree.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
import warnings
from collections.abc import Sequence

import numpy as np

BOS_TOKEN, EOS_TOKEN = '<|startoftext|>', '<|endoftext|>'
_PIECES = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                     r"(?P<letters>[^\W\d_]+)|\d|(?:[^\s\w]|_)+", re.IGNORECASE)
_WHITESPACE = re.compile(r'\s+')


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2 / CLIP's table byte -> a printable character: the 188 printable Latin-1 bytes ('!'..'~',
  '¡'..'¬', '®'..'ÿ') map to themselves, the other 68 to chr(256 + n) in ascending order."""
  keep = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
          *range(ord('®'), ord('ÿ') + 1)]
  others = [b for b in range(256) if b not in keep]
  return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def normalize(text: str) -> str:
  """Step 1: NFC, whitespace runs -> one space, stripped, lowercased."""
  return _WHITESPACE.sub(' ', unicodedata.normalize('NFC', text)).strip().lower()


def pre_tokenize(text: str) -> list[str]:
  """Step 2 on normalised text: CLIP's pieces (module docstring)."""
  pieces = []
  for m in _PIECES.finditer(text):
    piece = m.group()
    if m.group('letters') is None or piece.isalpha():
      pieces.append(piece)
      continue
    # A run of letters and non-decimal numbers: letters stay together, each number alone.
    run = ''
    for ch in piece:
      if ch.isalpha():
        run += ch
        continue
      if run:
        pieces.append(run)
        run = ''
      pieces.append(ch)
    if run:
      pieces.append(run)
  return pieces


def context_mask(tokens, bos_id: int, eos_id: int):
  """`[N, L]` bool: True from the first BOS through the first EOS (inclusive); with no EOS,
  through the end of the row. Works on numpy and jax arrays alike."""
  is_eos = tokens == eos_id
  after_bos = (tokens == bos_id).cumsum(axis=-1) > 0
  eos_before = is_eos.cumsum(axis=-1) - is_eos  # EOS strictly before this position
  return after_bos & (eos_before == 0)


class CLIPTokenizer:
  """CLIP's BPE tokenizer over a vocabulary `{token: id}` and ranked `merges` (module docstring).

  Attributes: vocab_size, context_length, pad_id, bos_id, eos_id. The pad token defaults to
  `<|endoftext|>` (SD 1.x's tokenizer; SD 2.x's pads with '!', id 0).
  """

  def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]],
               context_length: int = 77, pad_token: str | None = None):
    for token in (BOS_TOKEN, EOS_TOKEN) + ((pad_token,) if pad_token is not None else ()):
      if token not in vocab:
        raise ValueError(f'CLIPTokenizer: the vocabulary ({len(vocab)} tokens) lacks {token!r}')
    if int(context_length) < 2:
      raise ValueError(f'CLIPTokenizer: context_length={context_length}; needs >= 2 (BOS, EOS)')
    self.vocab = dict(vocab)
    self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
    self.byte_encoder = bytes_to_unicode()
    self.vocab_size = len(self.vocab)
    self.context_length = int(context_length)
    self.bos_id, self.eos_id = self.vocab[BOS_TOKEN], self.vocab[EOS_TOKEN]
    self.pad_id = self.vocab[EOS_TOKEN if pad_token is None else pad_token]
    self._cache = {BOS_TOKEN: [BOS_TOKEN], EOS_TOKEN: [EOS_TOKEN]}  # piece -> BPE symbols

  @classmethod
  def from_files(cls, vocab_json: str, merges_txt: str, context_length: int = 77,
                 pad_token: str | None = None) -> CLIPTokenizer:
    """vocab.json (`{token: id}`) and merges.txt (a `#version` line, then one `a b` pair a line,
    highest priority first)."""
    try:
      with open(vocab_json, encoding='utf-8') as f:
        vocab = json.load(f)
      with open(merges_txt, encoding='utf-8') as f:
        lines = f.read().split('\n')
    except (OSError, ValueError) as e:
      text = ' '.join(str(e).split())
      raise ValueError(f'CLIPTokenizer.from_files: cannot read {vocab_json} / {merges_txt} '
                       f'({type(e).__name__}: {text[:120]})') from None
    merges = []
    for number, line in enumerate(lines, 1):
      if not line or (number == 1 and line.startswith('#version')):
        continue
      pair = line.split(' ')
      if len(pair) != 2:
        raise ValueError(f'CLIPTokenizer.from_files: {merges_txt} line {number} is {line!r}, '
                         f'not a pair "a b"')
      merges.append(tuple(pair))
    return cls(vocab, merges, context_length, pad_token)

  @classmethod
  def from_directory(cls, path: str, context_length: int | None = None) -> CLIPTokenizer:
    """A HF tokenizer folder (SD's `tokenizer/`): vocab.json, merges.txt and, if present,
    tokenizer_config.json's `pad_token` and `model_max_length` (the context length, else 77)."""
    settings = {}
    config_file = os.path.join(path, 'tokenizer_config.json')
    if os.path.isfile(config_file):
      with open(config_file, encoding='utf-8') as f:
        settings = json.load(f)
    pad = settings.get('pad_token')
    pad = pad.get('content') if isinstance(pad, dict) else pad  # older files: an AddedToken
    if context_length is None:
      context_length = settings.get('model_max_length', 77)
    return cls.from_files(os.path.join(path, 'vocab.json'), os.path.join(path, 'merges.txt'),
                          context_length, pad)

  def bpe(self, piece: str) -> list[str]:
    """Steps 3-4 for one piece: its byte symbols, `</w>` on the last, merged by rank."""
    if piece in self._cache:
      return self._cache[piece]
    word = [self.byte_encoder[b] for b in piece.encode('utf-8')]
    word[-1] += '</w>'
    while len(word) > 1:
      pairs = zip(word, word[1:], strict=False)
      first, second = min(pairs, key=lambda p: self.ranks.get(p, len(self.ranks)))
      if (first, second) not in self.ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    self._cache[piece] = word
    return word

  def tokenize(self, text: str) -> list[int]:
    """The ids of `text` without BOS / EOS; a symbol missing from the vocabulary (impossible with
    a complete byte-level vocabulary) is a one-line ValueError naming it."""
    ids = []
    for piece in pre_tokenize(normalize(text)):
      for symbol in self.bpe(piece):
        if symbol not in self.vocab:
          raise ValueError(f'CLIPTokenizer: {symbol!r} (from {piece!r} in {text[:40]!r}) is not '
                           f'in the vocabulary of {self.vocab_size} tokens')
        ids.append(self.vocab[symbol])
    return ids

  def encode(self, texts: Sequence[str], length: int | None = None, *,
             truncate: bool = False) -> np.ndarray:
    """`[N, length or context_length]` int32: BOS, the text's ids, EOS, then pad_id.

    A prompt needing more than `length` tokens (BOS and EOS included) is a one-line ValueError,
    unless `truncate`: then its ids are cut to `length - 2` and EOS kept last (as CLIP and HF
    do), with one warning per call. `texts` is a sequence of strings (or one string).
    """
    if isinstance(texts, str):
      texts = [texts]
    length = self.context_length if length is None else int(length)
    if length < 2:
      raise ValueError(f'CLIPTokenizer.encode: length={length}; needs >= 2 (BOS and EOS)')
    out = np.full((len(texts), length), self.pad_id, np.int32)
    cut = []
    for row, text in enumerate(texts):
      ids = self.tokenize(text)
      if len(ids) + 2 > length:
        if not truncate:
          raise ValueError(f'CLIPTokenizer: prompt {text[:40]!r} has {len(ids) + 2} tokens '
                           f'(with BOS and EOS) but length={length}; shorten it or pass '
                           f'truncate=True')
        cut.append(f'{text[:40]!r} ({len(ids) + 2} tokens)')
        ids = ids[:length - 2]
      out[row, :len(ids) + 2] = [self.bos_id, *ids, self.eos_id]
    if cut:
      warnings.warn(f'CLIPTokenizer: {len(cut)} prompt(s) longer than length={length} truncated, '
                    f'EOS kept: {", ".join(cut[:3])}', stacklevel=2)
    return out

  def context_mask(self, tokens):
    """`[N, L]` bool: True from BOS through the first EOS (inclusive)."""
    return context_mask(tokens, self.bos_id, self.eos_id)

  def check_matches(self, vocab_size: int, name: str) -> None:
    """One-line ValueError if a text tower (`name`) with `vocab_size` tokens cannot take this
    tokenizer's ids: another vocabulary size, or an id >= vocab_size."""
    largest = max(self.vocab.values())
    if int(vocab_size) != self.vocab_size or largest >= int(vocab_size):
      raise ValueError(f'{name}: its token embedding has vocab_size={vocab_size}, but the CLIP '
                       f'tokenizer has {self.vocab_size} tokens (largest id {largest}); the '
                       f'tokenizer files do not match the weights')
