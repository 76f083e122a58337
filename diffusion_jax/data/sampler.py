"""Data order as a pure function of (seed, step), so a resumed run sees the same batches."""

import numpy as np


def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  # Philox keyed by (seed, epoch): a fixed, documented bit generator, no hidden state.
  rng = np.random.Generator(np.random.Philox(key=[seed, epoch]))
  return rng.permutation(num_examples)


def batch_indices(seed: int, step: int, batch_size: int, num_examples: int) -> np.ndarray:
  """Example indices of the batch at `step`: epochs are shuffled without replacement.

  Batch `step` covers positions `[step * B, (step + 1) * B)` of the concatenation of
  per-epoch permutations, so every example appears once per epoch and a batch may
  straddle two epochs. Depends only on its arguments.
  """
  if batch_size <= 0 or num_examples <= 0:
    raise ValueError(f'batch_size={batch_size} and num_examples={num_examples} must be positive')
  start = step * batch_size
  pos = start + np.arange(batch_size)
  epochs = pos // num_examples
  out = np.empty(batch_size, dtype=np.int64)
  for e in np.unique(epochs):
    sel = epochs == e
    out[sel] = _epoch_permutation(seed, int(e), num_examples)[pos[sel] % num_examples]
  return out
