"""The vector quantizer of VQ-VAE as pure functions, with an EMA codebook and dead-code restarts.

van den Oord et al. 2017 (arXiv:1711.00937), Eq. 1-3: an encoder output `z_e` `[..., D]` is
replaced by its nearest code `e_k` of a codebook `[K, D]` (squared Euclidean distance over the
last axis); gradients pass the quantization unchanged (straight-through, `z + sg(z_q - z)`);
the codebook learns from `||sg(z_e) - e||²` and the encoder commits through
`beta ||z_e - sg(e)||²`.

The EMA codebook (the VQ-VAE paper's App. A.1; Razavi et al. 2019, arXiv:1906.00446) replaces the
codebook loss: per code `N_i <- gamma N_i + (1 - gamma) n_i`, `m_i <- gamma m_i + (1 - gamma)
sum_{j: k_j = i} z_j`, `e_i = m_i / N_i`, with `N_i` Laplace-smoothed to
`(N_i + eps) / (N + K eps) * N` (`N = sum_i N_i`) so no code divides by zero.

Codes the encoder never picks stay dead; as in Jukebox (Dhariwal et al. 2020, §2.3) a code
whose EMA cluster size falls below a threshold is moved onto a random encoder output of the
batch (`restart_dead_codes`).

Everything here is a pure function of arrays and an explicit key; `VectorQuantizer` is a thin
Flax module that only holds the codebook.
"""

import numbers
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp


class EMAState(NamedTuple):
  """The EMA codebook's state, a pytree; `codebook = embed_sum / smoothed(cluster_size)`."""
  cluster_size: jax.Array  # [K], the EMA of how many vectors each code was assigned
  embed_sum: jax.Array     # [K, D], the EMA of the sum of those vectors
  codebook: jax.Array      # [K, D]


def _check_codebook(name: str, codebook: jax.Array) -> tuple[int, int]:
  if codebook.ndim != 2:
    raise ValueError(f'{name}: codebook must be [K, D], got shape {codebook.shape}.')
  k, d = codebook.shape
  if k < 1:
    raise ValueError(f'{name}: codebook has K={k} codes; it needs K >= 1.')
  return k, d


def _check_z(name: str, z: jax.Array, d: int) -> None:
  if z.ndim < 1 or z.shape[-1] != d:
    raise ValueError(f'{name}: z must be [..., D] with D={d} (the codebook\'s), got shape '
                     f'{z.shape}.')
  if not jnp.issubdtype(z.dtype, jnp.floating):
    raise ValueError(f'{name}: z must be floating, got dtype {z.dtype}.')


def _check_number(name: str, field: str, value, low: float, high: float | None,
                  closed_low: bool) -> None:
  """Range check on a Python number (a traced value is left alone)."""
  if not isinstance(value, numbers.Real):
    return
  ok_low = value >= low if closed_low else value > low
  if not ok_low or (high is not None and not value < high):
    bounds = (f'[{low}, {high})' if closed_low else f'({low}, {high})') if high is not None \
        else (f'>= {low}' if closed_low else f'> {low}')
    raise ValueError(f'{name}: {field}={value} must be {bounds}.')


def quantize(z: jax.Array, codebook: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
  """Nearest-code quantization of `z` `[..., D]` with `codebook` `[K, D]` (VQ-VAE Eq. 1-3).

  Returns `(z_q, indices, aux)`: `z_q` `[..., D]` equals `codebook[indices]` in value, with the
  straight-through gradient `d z_q / d z = I` (the codebook gets no gradient through it);
  `indices` `[...]` int32; `aux`:
    codebook_loss    mean over all elements of `(sg(z) - z_q)²` (trains the codebook only),
    commitment_loss  mean over all elements of `(z - sg(z_q))²` (trains the encoder only),
    perplexity       `exp(-sum_k p_k log p_k)`, `p_k` the fraction of vectors given code k:
                     K when all codes are used equally often, 1 when one code takes all,
    usage            the fraction of the K codes used at least once in the batch.
  """
  k, d = _check_codebook('quantize', codebook)
  _check_z('quantize', z, d)
  flat = z.reshape(-1, d).astype(jnp.float32)  # [N, D]
  codes = codebook.astype(jnp.float32)
  # ||z - e||² = ||z||² - 2 z.e + ||e||², [N, K]; HIGHEST keeps the argmin exact in float32.
  cross = jnp.dot(flat, codes.T, precision=jax.lax.Precision.HIGHEST)
  distances = (jnp.sum(flat**2, axis=1, keepdims=True) - 2.0 * cross
               + jnp.sum(codes**2, axis=1)[None, :])
  indices = jnp.argmin(distances, axis=1).astype(jnp.int32)  # [N]
  z_q = jnp.take(codebook, indices, axis=0).reshape(z.shape).astype(z.dtype)

  codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z) - z_q))
  commitment_loss = jnp.mean(jnp.square(z - jax.lax.stop_gradient(z_q)))
  p = jnp.mean(jax.nn.one_hot(indices, k, dtype=jnp.float32), axis=0)  # [K]
  perplexity = jnp.exp(jnp.sum(jax.scipy.special.entr(p)))  # entr(p) = -p log p, 0 at p = 0
  aux = {'codebook_loss': codebook_loss, 'commitment_loss': commitment_loss,
         'perplexity': perplexity, 'usage': jnp.mean((p > 0).astype(jnp.float32))}
  # The straight-through estimator `z + sg(z_q - z)`, written so the forward value is exactly
  # `codebook[indices]` (`z - sg(z)` is exactly 0) rather than `z_q` up to rounding.
  z_st = jax.lax.stop_gradient(z_q) + (z - jax.lax.stop_gradient(z))
  return z_st, indices.reshape(z.shape[:-1]), aux


def init_ema_state(codebook: jax.Array) -> EMAState:
  """EMA state for an initial `codebook` `[K, D]`: every code counts as one vector, itself
  (`cluster_size = 1`, `embed_sum = codebook`), so the first update blends with it smoothly."""
  k, _ = _check_codebook('init_ema_state', codebook)
  codebook = jnp.asarray(codebook, jnp.float32)
  return EMAState(jnp.ones((k,), jnp.float32), codebook, codebook)


def ema_update(state: EMAState, z: jax.Array, indices: jax.Array, decay: float = 0.99,
               eps: float = 1e-5) -> EMAState:
  """One EMA codebook step (VQ-VAE App. A.1) from encoder outputs `z` `[..., D]` and their codes
  `indices` `[...]` (from `quantize`); `decay` is gamma in [0, 1), `eps` > 0 the Laplace
  smoothing. `z` is treated as a constant (no gradient flows through the update)."""
  k, d = _check_codebook('ema_update', state.codebook)
  _check_z('ema_update', z, d)
  if state.cluster_size.shape != (k,) or state.embed_sum.shape != (k, d):
    raise ValueError(f'ema_update: state has cluster_size {state.cluster_size.shape} and '
                     f'embed_sum {state.embed_sum.shape}; with codebook [{k}, {d}] they must be '
                     f'({k},) and ({k}, {d}).')
  if indices.shape != z.shape[:-1]:
    raise ValueError(f'ema_update: indices must have shape z.shape[:-1] = {z.shape[:-1]}, got '
                     f'{indices.shape}.')
  _check_number('ema_update', 'decay', decay, 0.0, 1.0, closed_low=True)
  _check_number('ema_update', 'eps', eps, 0.0, None, closed_low=False)
  flat = jax.lax.stop_gradient(z).reshape(-1, d).astype(jnp.float32)  # [N, D]
  one_hot = jax.nn.one_hot(indices.reshape(-1), k, dtype=jnp.float32)  # [N, K]
  counts = jnp.sum(one_hot, axis=0)  # n_i, [K]
  sums = jnp.dot(one_hot.T, flat, precision=jax.lax.Precision.HIGHEST)  # [K, D]
  cluster_size = decay * state.cluster_size + (1.0 - decay) * counts
  embed_sum = decay * state.embed_sum + (1.0 - decay) * sums
  n = jnp.sum(cluster_size)
  smoothed = (cluster_size + eps) / (n + k * eps) * n  # Laplace smoothing, keeps sum = n
  return EMAState(cluster_size, embed_sum, embed_sum / smoothed[:, None])


def restart_dead_codes(state: EMAState, z: jax.Array, key: jax.Array,
                       threshold: float = 1.0) -> EMAState:
  """Moves every code whose EMA `cluster_size` is below `threshold` onto an encoder output of
  the batch `z` `[..., D]`, drawn at random from `key` (without replacement when the batch has
  at least K vectors). A restarted code's statistics restart as at `init_ema_state`: it counts as
  one vector, itself. Every other code, and its statistics, are returned unchanged."""
  k, d = _check_codebook('restart_dead_codes', state.codebook)
  _check_z('restart_dead_codes', z, d)
  _check_number('restart_dead_codes', 'threshold', threshold, 0.0, None, closed_low=True)
  flat = jax.lax.stop_gradient(z).reshape(-1, d).astype(jnp.float32)  # [N, D]
  if flat.shape[0] < 1:
    raise ValueError(f'restart_dead_codes: z {z.shape} holds no vectors to restart codes with.')
  rows = jax.random.choice(key, flat.shape[0], (k,), replace=flat.shape[0] < k)
  dead = state.cluster_size < threshold  # [K]
  codebook = jnp.where(dead[:, None], flat[rows], state.codebook)
  return EMAState(jnp.where(dead, 1.0, state.cluster_size),
                  jnp.where(dead[:, None], flat[rows], state.embed_sum), codebook)


class VectorQuantizer(nn.Module):
  """A codebook `[num_codes, features]` and `quantize` (returns `(z_q, indices, aux)`).

  Trained by gradient (`ema=False`): the codebook is the parameter 'codebook', initialised
  uniform in [-1/K, 1/K] as in the VQ-VAE paper's code. With `ema=True` it lives in the
  'vq_ema' collection as an `EMAState`'s fields and the module only reads it; the caller updates
  it with `ema_update` / `restart_dead_codes` (no hidden mutation).
  """
  num_codes: int
  features: int
  ema: bool = False

  @nn.compact
  def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array, dict]:
    if not self.num_codes >= 1 or not self.features >= 1:
      raise ValueError(f'VectorQuantizer: num_codes={self.num_codes} and features='
                       f'{self.features} must be >= 1.')
    k = self.num_codes

    def init(key, shape):
      return jax.random.uniform(key, shape, jnp.float32, -1.0 / k, 1.0 / k)

    if not self.ema:
      codebook = self.param('codebook', init, (k, self.features))
    else:
      start = init_ema_state(init(self.make_rng('params'), (k, self.features))) \
          if self.is_initializing() else None
      for field in EMAState._fields:
        self.variable('vq_ema', field, lambda f=field: getattr(start, f))
      codebook = self.get_variable('vq_ema', 'codebook')
    return quantize(z, codebook)
