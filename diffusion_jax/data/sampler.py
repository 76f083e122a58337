"""Data order as a pure function of (seed, step), so a resumed run sees the same batches.

Global batch `step` holds the examples at positions `[step * B, (step + 1) * B)` of the
concatenation of per-epoch permutations; process p of P takes rows `[p B / P, (p + 1) B / P)`.
A position also keys its example's randomness (flips, dequantization), so that is independent
of the process count and of restarts too.
"""

import numpy as np


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The order of the examples in `epoch`: a permutation of `arange(num_examples)`."""
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
    out[sel] = epoch_permutation(seed, int(e), num_examples)[pos[sel] % num_examples]
  return out


def process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
  """Process p's rows `[p B / P, (p + 1) B / P)` of a global batch of B."""
  if global_batch % process_count:
    raise ValueError(f'data: global batch {global_batch} is not divisible by '
                     f'process_count={process_count}')
  per = global_batch // process_count
  return slice(process_index * per, (process_index + 1) * per)


def batch_rows(seed: int, step: int, global_batch: int, num_examples: int,
               process_index: int = 0, process_count: int = 1):
  """`(indices, positions)` of this process's rows of global batch `step`: the examples'
  dataset indices and their global positions (which key per-example randomness)."""
  rows = process_rows(global_batch, process_index, process_count)
  indices = batch_indices(seed, step, global_batch, num_examples)[rows]
  positions = step * global_batch + np.arange(global_batch)[rows]
  return indices, positions
