"""Exact log-likelihood through the probability-flow ODE, and bits/dim of 8-bit data.

The PF-ODE `dx/dt = v(x, t)` (`ode.velocity`) is a continuous normalizing flow, so along a
solution `d log p_t(x_t) / dt = -div v(x_t, t)` (Chen et al. 2018, Thm. 1; Song et al. 2021,
Eq. 39). Integrating data `x` at `t_min` forward to `t_max` together with the divergence,

  log p_tmin(x) = log p_prior(x_tmax) + ∫_{t_min}^{t_max} div v(x_t, t) dt,

with `p_prior = N(0, prior_std² I)` (the process's) unless `prior_logp` is given. The solve is
`adaptive.integrate` (diffrax, PID step-size control) over the state `(x, ∫ div v)`, one step
size for the whole batch. The divergence is

* `trace='exact'`: `sum_i e_i^T J e_i`, D forward-mode Jacobian-vector products per
  evaluation (vmapped), for small D. Each basis tangent `e_i` is shared by the batch, so the
  per-example trace assumes the denoiser treats examples independently (true of networks
  without batch statistics);
* `trace='hutchinson'`: `E_u[u^T J u] = tr J` for `E[u u^T] = I` (Hutchinson 1989; Grathwohl et
  al. 2019), `num_probes` probes `u` (Rademacher or Gaussian), drawn once per solve from `key`
  and held fixed along it, as FFJORD does; unbiased for the integral, so for `log p` up to the
  solver's tolerance.

NFE: one velocity evaluation (`info['nfe']`, exact, as in `adaptive`) runs the denoiser once,
with `info['products_per_eval']` Jacobian-vector products (D or num_probes) riding on it.

Bits/dim for 8-bit data (Song et al. 2021, App. D.2; Ho et al. 2020; Theis et al. 2016):
integers `k ∈ {0, …, B-1}` (`B = num_bins = 256`) get uniform noise, `z = k + u, u ~ U[0, 1)`,
and the model sees `x = lo + (hi - lo) z / B` (`data_range = (lo, hi)`, (-1, 1) by default).
With the change of variables `p_Z(z) = p_X(x) (hi - lo) / B` per dimension,

  bits/dim = -log p_X(x) / (D ln 2) + log2(B / (hi - lo)),

i.e. `+7` for [-1, 1] and `+8` for [0, 1]: an upper bound, in expectation over `u`, on the
discrete NLL `-log2 P(k) / D` of the 8-bit data (Jensen). `elbo.bits_per_dim(nll, D,
log_scale)` gives the same number with `log_scale = log(B / (hi - lo))`; its `LOG_127_5` is
the convention `x = k / 127.5 - 1` (bin width 2/255), 0.0056 bits/dim below the 256-bin one.
"""

import math

import jax
import jax.numpy as jnp

from diffusion_jax.samplers import _common
from diffusion_jax.samplers import adaptive
from diffusion_jax.samplers.ode import velocity

TRACES = ('exact', 'hutchinson')
PROBES = ('rademacher', 'gaussian')


def gaussian_log_density(x, std):
  """`log N(x; 0, std² I)` summed over all but the leading axis, `[B]`."""
  d = math.prod(x.shape[1:])
  sq = jnp.sum(jnp.square(x).reshape(x.shape[0], -1), axis=-1)
  return -0.5 * sq / std**2 - 0.5 * d * jnp.log(2.0 * math.pi * jnp.asarray(std, x.dtype) ** 2)


def _exact_divergence(f, x):
  """`(f(x), div f(x))` per example, by D Jacobian-vector products with shared basis tangents."""
  d = math.prod(x.shape[1:])
  basis = jnp.eye(d, dtype=x.dtype).reshape((d, 1) + x.shape[1:])
  one = lambda e: jax.jvp(f, (x,), (jnp.broadcast_to(e, x.shape),))
  v, jv = jax.vmap(one, out_axes=(None, 0))(basis)            # jv [D, B, ...]
  div = jnp.einsum('ibi->b', jv.reshape(d, x.shape[0], d))
  return v, div


def _hutchinson_divergence(f, x, probes):
  """`(f(x), mean_k u_k^T J u_k)` per example, for probes `[K, B, ...]`."""
  v, jv = jax.vmap(lambda u: jax.jvp(f, (x,), (u,)), out_axes=(None, 0))(probes)
  k, b = probes.shape[:2]
  return v, jnp.mean(jnp.sum((probes * jv).reshape(k, b, -1), axis=-1), axis=0)


def draw_probes(key, shape, num_probes: int = 1, probe: str = 'rademacher', dtype=jnp.float32):
  """`[num_probes, *shape]` probes with `E[u u^T] = I`."""
  if probe not in PROBES:
    raise ValueError(f'unknown probe {probe!r}; choose from {PROBES}')
  if int(num_probes) != num_probes or num_probes < 1:
    raise ValueError(f'num_probes={num_probes} must be an integer >= 1')
  full = (int(num_probes),) + tuple(shape)
  if probe == 'rademacher':
    return jax.random.rademacher(key, full, dtype)
  return jax.random.normal(key, full, dtype)


def log_likelihood(denoiser, process, x0, key=None, *, trace: str = 'exact', num_probes: int = 1,
                   probe: str = 'rademacher', t_min=None, t_max: float = 1.0, rtol=1e-5,
                   atol=1e-5, solver: str = 'tsit5', prior_logp=None, cond=None, dt0=None,
                   max_steps: int = 4096, pcoeff=0.0, icoeff=1.0, dcoeff=0.0,
                   throw: bool = True):
  """`log p_tmin(x0)` in nats per example `[B]`, by the PF-ODE from `t_min` to `t_max`.

  `x0 [B, ...]` is data at `t_min` (the process's by default; Song et al. 2021 evaluate VP
  likelihoods at 1e-5, where sampling stops at 1e-3). `prior_logp(x_tmax) -> [B]` replaces
  the default `N(0, prior_std² I)` (e.g. by the exact marginal at `t_max` in tests). The
  velocity is evaluated at `t_min`: where `sigma(t_min) = 0` it must be finite there (x0 / edm
  kinds are refused). `key` is needed for `trace='hutchinson'`. Solver options as
  `adaptive.adaptive_sample`.

  Returns `(logp, info)`; `info`: `nfe` (exact), `denoiser_calls`, `num_steps`,
  `num_rejected_steps`, `success`, `products_per_eval`, `prior_logp` and `delta_logp`
  (`∫ div v dt`) per example, `x_prior` (the latent at `t_max`).
  """
  who = 'log_likelihood'
  if trace not in TRACES:
    raise ValueError(f'unknown trace {trace!r}; choose from {TRACES}')
  t_min = adaptive.check_interval(process, t_min, t_max, who)
  adaptive.check_sigma_endpoint(denoiser, process, t_min, who)
  with jax.ensure_compile_time_eval():
    alpha_last = process.alpha(jnp.asarray(t_max, jnp.float32))
  _common.check_terminal_snr(denoiser, alpha_last, who)
  f_at = lambda t: (lambda x: velocity(denoiser, process, x, t, cond))
  if trace == 'exact':
    products = math.prod(x0.shape[1:])
    div_fn = lambda t, x: _exact_divergence(f_at(t), x)
  else:
    _common.need_key(key, who, "trace='hutchinson' draws random probes")
    probes = draw_probes(key, x0.shape, num_probes, probe, x0.dtype)
    products = int(num_probes)
    div_fn = lambda t, x: _hutchinson_divergence(f_at(t), x, probes)

  def fn(t, y):
    x, _ = y
    return div_fn(t, x)

  y0 = (x0, jnp.zeros(x0.shape[:1], x0.dtype))
  (x1, delta), stats = adaptive.integrate(
      fn, y0, t_min, t_max, solver=solver, rtol=rtol, atol=atol, dt0=dt0, max_steps=max_steps,
      pcoeff=pcoeff, icoeff=icoeff, dcoeff=dcoeff, throw=throw)
  prior = (gaussian_log_density(x1, process.prior_std) if prior_logp is None
           else prior_logp(x1))
  calls = stats['calls']
  info = {'nfe': calls * _common.evals_per_call(denoiser), 'denoiser_calls': calls,
          'num_steps': stats['num_steps'], 'num_rejected_steps': stats['num_rejected_steps'],
          'success': stats['success'], 'products_per_eval': products, 'prior_logp': prior,
          'delta_logp': delta, 'x_prior': x1}
  return prior + delta, info


def dequantize(key, x_int, *, num_bins: int = 256, data_range=(-1.0, 1.0), dtype=jnp.float32):
  """Uniformly dequantized data `lo + (hi - lo) (k + u) / num_bins`, `u ~ U[0, 1)`.

  `x_int` holds integers `k` in `[0, num_bins)` (uint8 images); the result lies in
  `[lo, hi)`, the cell of `k` being `[lo + (hi - lo) k / B, lo + (hi - lo) (k + 1) / B)`.
  """
  lo, hi = (float(v) for v in data_range)
  if not hi > lo:
    raise ValueError(f'data_range={data_range} must be (lo, hi) with hi > lo')
  u = jax.random.uniform(key, x_int.shape, dtype)
  return lo + (hi - lo) * (x_int.astype(dtype) + u) / num_bins


def nll_bits_per_dim(logp, num_dims: int, *, num_bins: int = 256, data_range=(-1.0, 1.0)):
  """`-logp / (D ln 2) + log2(num_bins / (hi - lo))`: bits/dim of the dequantized integers.

  `logp` (nats, `[B]`) is the density of `x = lo + (hi - lo) z / num_bins`; the second term is
  the log-Jacobian of that scaling (7 bits for 256 bins in [-1, 1], 8 in [0, 1]).
  """
  lo, hi = (float(v) for v in data_range)
  if not hi > lo:
    raise ValueError(f'data_range={data_range} must be (lo, hi) with hi > lo')
  return -logp / (num_dims * math.log(2.0)) + math.log2(num_bins / (hi - lo))


def bits_per_dim(denoiser, process, x_int, key, *, num_bins: int = 256, data_range=(-1.0, 1.0),
                 dtype=jnp.float32, **likelihood_options):
  """Bits/dim of integer data (e.g. uint8 images `[B, H, W, C]`) under the PF-ODE model.

  Dequantizes (`dequantize`), evaluates `log_likelihood` (options passed through) and converts
  (`nll_bits_per_dim`): `-log p_X(x) / (D ln 2) + log2(num_bins / (hi - lo))` per example,
  `[B]`. One dequantization draw per call; average over keys for the expectation over `u`.
  Returns `(bpd, info)`.
  """
  key_u, key_trace = jax.random.split(key)
  x = dequantize(key_u, x_int, num_bins=num_bins, data_range=data_range, dtype=dtype)
  logp, info = log_likelihood(denoiser, process, x, key_trace, **likelihood_options)
  d = math.prod(x.shape[1:])
  return nll_bits_per_dim(logp, d, num_bins=num_bins, data_range=data_range), info
