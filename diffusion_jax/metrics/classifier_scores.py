"""Inception Score (Salimans et al. 2016) from any classifier's logits.

`IS = exp(E_x KL(p(y|x) || p(y)))`, computed on `splits` equal chunks (10 in the reference
code) with mean and std over the chunks; `p(y)` is each chunk's mean prediction. float64.
"""

import numpy as np


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
  """`(mean, std)` of the Inception Score over `splits` chunks of `logits` `[N, C]`."""
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or len(logits) < splits:
    raise ValueError(f'inception_score: logits must be [N >= splits={splits}, C], got '
                     f'{logits.shape}')
  log_p = logits - logits.max(1, keepdims=True)
  log_p = log_p - np.log(np.exp(log_p).sum(1, keepdims=True))      # log p(y|x), [N, C]
  scores = []
  for chunk in np.array_split(log_p, splits):
    p = np.exp(chunk)
    log_marginal = np.log(p.mean(0))                                  # log p(y), [C]
    kl = (p * (chunk - log_marginal[None, :])).sum(1)                 # [n]
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))
