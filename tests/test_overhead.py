"""Nothing scales with the batch but the network (issue 24, item 4), and explicit grids for the
discrete samplers (item 5): the float64 numpy twins of every process, DiscreteVP's interval
lookup, the denoiser wrapper's structure (schedule at the time's own shape, no derivatives
unless the kind needs them), grids built without jax, and DDPM / DDIM on explicit grids."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import parameterization as param
from diffusion_jax import processes
from diffusion_jax import samplers
from diffusion_jax.samplers import grids

# Every process of PROCESSES with its defaults, plus the discrete VP's other shapes.
CASES = [(name, {}) for name in processes.PROCESSES] + [
    ('vp_discrete', {'schedule': 'cosine', 'num_steps': 37}),
    ('vp_discrete', {'zero_terminal_snr': True}),
]


def _ids(case):
  return case[0] + ''.join(f'-{k}={v}' for k, v in case[1].items())


@pytest.mark.parametrize('case', CASES, ids=_ids)
def test_numpy_twins_equal_the_jnp_methods_in_float64(case):
  """`alpha_np`, `sigma_np`, `log_snr_np`, `t_of_log_snr_np` are the jnp formulas evaluated by
  numpy: equal to the jnp methods under x64 up to a few float64 ulps (different libm
  implementations of exp / log / expm1 / atan; 1e-12 relative leaves a 1000x margin, and the
  inverse, evaluated through the same libm calls on both sides, gets 1e-11)."""
  name, kwargs = case
  proc = processes.make_process(name, **kwargs)
  t = np.concatenate([np.linspace(0.0, 1.0, 41), [proc.t_min, 1e-6, 0.5 + 1e-9]])
  inner = t[(t > 0.01) & (t < 0.99)]   # finite, invertible log-SNR in every family
  lam = proc.log_snr_np(inner)
  with jax.enable_x64(True):
    want = jax.jit(lambda t, lam: (proc.alpha(t), proc.sigma(t), proc.log_snr(t),
                                   proc.t_of_log_snr(lam)))(jnp.asarray(t), jnp.asarray(lam))
  for np_fn, w in zip((proc.alpha_np, proc.sigma_np, proc.log_snr_np), want, strict=False):
    got = np_fn(t)
    assert got.dtype == np.float64 and got.shape == t.shape
    np.testing.assert_allclose(got, np.asarray(w), rtol=1e-12, atol=1e-300)
  got = proc.t_of_log_snr_np(lam)
  np.testing.assert_allclose(got, np.asarray(want[3]), rtol=1e-11, atol=1e-13)
  np.testing.assert_allclose(got, inner, rtol=1e-9)   # and it is the inverse
  assert np.asarray(proc.alpha_np(0.5)).shape == ()   # a scalar stays a scalar


def test_discrete_numpy_twin_hits_the_training_steps_exactly():
  """At t = n / T the twin is sqrt(abar_n) with abar_n = prod (1 - beta_i) (Ho et al. Eq. 4),
  written here from the betas; log alpha is linear in t in between."""
  proc = processes.DiscreteVP.from_name('linear', num_steps=50)
  abar = np.cumprod(1.0 - processes.linear_betas(50))
  n = np.arange(1, 51)
  np.testing.assert_allclose(proc.alpha_np(n / 50) ** 2, abar, rtol=1e-14)
  mid = 0.5 * (np.log(proc.alpha_np(n[:-1] / 50)) + np.log(proc.alpha_np(n[1:] / 50)))
  np.testing.assert_allclose(np.log(proc.alpha_np((n[:-1] + 0.5) / 50)), mid, rtol=1e-13)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.float64])
def test_discrete_log_alpha_is_jnp_interp(dtype):
  """The index-arithmetic lookup is `jnp.interp` over the knots n / T (correctly rounded): at
  every knot, one ulp either side, random times and outside [0, 1]. Same formula, but XLA may
  contract its last multiply-add into an FMA in one program and not the other: 2 ulps."""
  T = 1000
  proc = processes.DiscreteVP.from_name('linear', num_steps=T)
  with jax.enable_x64(dtype == jnp.float64):
    knots = (np.arange(T + 1) / T).astype(dtype)
    t = np.concatenate([knots, np.random.default_rng(0).uniform(-0.1, 1.1, 2000).astype(dtype),
                        np.array([-1.0, 2.0, np.inf, -np.inf], dtype)])
    t = np.concatenate([t, np.nextafter(t, np.inf), np.nextafter(t, -np.inf)]).astype(dtype)
    values = jnp.asarray(0.5 * np.log(np.concatenate([[1.0], proc.alphas_cumprod])), dtype)
    want = np.asarray(jax.jit(jnp.interp)(jnp.asarray(t), jnp.asarray(knots), values))
    got, alpha, sigma, pair = jax.jit(lambda t: (proc.log_alpha(t), proc.alpha(t),
                                                 proc.sigma(t), proc.alpha_sigma(t)))(
                                                     jnp.asarray(t))
    ulp = np.finfo(dtype).eps
    np.testing.assert_allclose(got, want, rtol=2 * ulp, atol=2 * ulp * np.abs(want).max())
    # t_of_step(n) is a knot: log alpha there is the table's 0.5 log abar_n exactly.
    np.testing.assert_array_equal(got[:T + 1], np.asarray(values))
    np.testing.assert_array_equal(pair[0], alpha)   # alpha_sigma shares one log alpha
    np.testing.assert_array_equal(pair[1], sigma)


# --- the denoiser wrapper ---------------------------------------------------------------------

B, D = 7, 3


def _jaxpr_eqns(jaxpr):
  """Every equation, recursively through sub-jaxprs (jit, scan, while, cond bodies)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, 'jaxpr', sub)
        if isinstance(inner, jax.extend.core.Jaxpr):
          yield from _jaxpr_eqns(inner)


def test_eps_denoiser_at_a_scalar_time_has_no_batch_shaped_schedule_ops():
  """Only the network's time input is broadcast to [B]; the schedule is evaluated at the
  scalar time, without a search (searchsorted's while loop) or any sort."""
  proc = processes.DiscreteVP.from_name('linear')
  seen = []

  def model(x, t, cond):
    seen.append(t.shape)
    return 0.1 * x

  den = param.make_denoiser(model, proc, 'eps')
  jaxpr = jax.make_jaxpr(lambda x, t: den(x, t))(jnp.ones((B, D)), jnp.float32(0.3)).jaxpr
  eqns = list(_jaxpr_eqns(jaxpr))
  assert seen == [(B,)]
  names = {e.primitive.name for e in eqns}
  assert not names & {'while', 'scan', 'sort', 'searchsorted'}, names
  batch_shaped = [e.primitive.name for e in eqns for v in e.outvars if v.aval.shape == (B,)]
  assert batch_shaped == ['broadcast_in_dim'], batch_shaped


class _Undifferentiable(processes.VPLinear):
  """VPLinear whose schedule raises when differentiated (a custom_jvp rule that refuses)."""

  def alpha_sigma(self, t):
    @jax.custom_jvp
    def pair(t):
      return super(_Undifferentiable, self).alpha_sigma(t)

    @pair.defjvp
    def _(primals, tangents):
      raise AssertionError('the schedule was differentiated')

    return pair(jnp.asarray(t))


@pytest.mark.parametrize('kind', param.ALL_KINDS)
def test_only_velocity_differentiates_the_schedule(kind):
  """`jax.jvp` of alpha and sigma runs for 'velocity' (its conversion needs alpha', sigma')
  and for no other kind."""
  proc = _Undifferentiable(beta_max=20.0)
  den = param.make_denoiser(lambda x, t, c: 0.1 * x, proc, kind)
  run = lambda: jax.make_jaxpr(lambda x: den(x, jnp.float32(0.3)))(jnp.ones((B, D)))
  if kind == 'velocity':
    with pytest.raises(AssertionError, match='differentiated'):
      run()
  else:
    run()


def test_scalar_and_per_example_times_give_the_same_denoiser_output():
  """For every kind, a scalar t (evaluated once) and the same t broadcast to [B] (evaluated per
  example, the pre-issue-24 path) agree to float32 rounding (a few ulps of values of order 1).
  Two times, one compile each way."""
  proc = processes.DiscreteVP.from_name('linear')
  w = jnp.linspace(-1.0, 1.0, D)

  def model(x, t, cond):
    return jnp.tanh(x * w + t[:, None])

  dens = [param.make_denoiser(model, proc, kind) for kind in param.ALL_KINDS]
  x = jax.random.normal(jax.random.key(0), (B, D))
  times = (0.013, 0.97)
  scalar = jax.jit(lambda x: [den(x, jnp.float32(t)) for den in dens for t in times])(x)
  batched = jax.jit(lambda x: [den(x, jnp.full((B,), t, jnp.float32)) for den in dens
                               for t in times])(x)
  for i, (s, b) in enumerate(zip(scalar, batched, strict=True)):
    for a, c in zip(s, b, strict=True):
      assert a.shape == (B, D)
      np.testing.assert_allclose(a, c, rtol=2e-6, atol=2e-6, err_msg=param.ALL_KINDS[i // 2])


# --- grids from numpy ------------------------------------------------------------------------


class _NumpyOnly(processes.VPCosine):
  """VPCosine whose jax methods raise: grids must come from the numpy twins alone."""

  def _refuse(self, *args):
    raise AssertionError('a jax schedule method was called while building a grid')

  alpha = sigma = log_snr = t_of_log_snr = alpha_sigma = log_alpha = _refuse


@pytest.mark.parametrize('grid', ['t', 'log_snr', 'karras', (0.9, 0.5, 0.2, 0.05)])
def test_grids_are_built_without_jax(grid):
  """No jax op (nothing to trace or compile): each grid point's alpha is cos(pi t / 2) and
  log-SNR -2 log tan(pi t / 2) (the full cosine schedule, Nichol & Dhariwal 2021), and the
  log-SNR grid is uniform in log-SNR (float32 rounding of t: 1e-5 relative)."""
  proc = _NumpyOnly(logsnr_min=-math.inf, logsnr_max=math.inf, t_min=0.01)
  g = samplers.time_grid(proc, 4, grid, t_max=0.95)
  assert g.t.dtype == np.float32 and g.alpha.dtype == np.float32
  t = g.t.astype(np.float64)
  np.testing.assert_allclose(g.alpha, np.cos(0.5 * np.pi * t), rtol=1e-6)
  np.testing.assert_allclose(g.log_snr, -2.0 * np.log(np.tan(0.5 * np.pi * t)), rtol=1e-5,
                             atol=1e-5)
  if grid == 'log_snr':
    np.testing.assert_allclose(np.diff(g.log_snr.astype(np.float64), 2), 0.0, atol=1e-4)
    assert g.t[0] == np.float32(0.95) and g.t[-1] == np.float32(0.01)


# --- explicit grids for DDPM / DDIM ----------------------------------------------------------


def test_diffusers_timesteps_are_one_based_steps():
  """diffusers' 0-based timestep k is our step k + 1 at t = (k + 1) / T, written out here."""
  trailing = [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
  np.testing.assert_allclose(grids.diffusers_timesteps(trailing, 1000),
                             [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1], rtol=1e-15)
  leading = [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
  np.testing.assert_allclose(grids.diffusers_timesteps(leading, 1000) * 1000,
                             [901, 801, 701, 601, 501, 401, 301, 201, 101, 1], rtol=1e-15)
  with pytest.raises(ValueError, match=r'timestep 1000 .*\[0, 999\]'):
    grids.diffusers_timesteps([1000, 500], 1000)
  with pytest.raises(ValueError, match=r'timestep 2.5 '):
    grids.diffusers_timesteps([2.5], 1000)


def _eps_of_gaussian(abar_of_t, scale=0.7):
  """E[eps | x_t] for data N(0, scale² I): x_t ~ N(0, abar scale² + 1 - abar)."""
  def fn(x, t, cond=None):
    abar = abar_of_t(t)
    var = abar * scale**2 + 1.0 - abar
    eps = jnp.sqrt(1.0 - abar) * x / var
    return (x - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar), eps
  return fn


def test_ddim_and_ddpm_on_an_explicit_grid_equal_the_spacing_bit_for_bit():
  """The 'trailing' spacing's own times (diffusers' [999, 899, ..., 99]) as an explicit grid
  give exactly the spacing's result, for DDIM (eta 0.5: every coefficient in use) and DDPM."""
  proc = processes.DiscreteVP.from_name('linear')
  den = _eps_of_gaussian(lambda t: proc.alpha(t) ** 2)
  x_T = jax.random.normal(jax.random.key(1), (4, 2))
  times = grids.diffusers_timesteps([999, 899, 799, 699, 599, 499, 399, 299, 199, 99], 1000)
  key = jax.random.key(2)
  for sample, kwargs in ((samplers.ddim_sample, {'eta': 0.5}), (samplers.ddpm_sample, {})):
    by_spacing, _ = sample(den, proc, x_T, key, steps=10, spacing='trailing', **kwargs)
    by_grid, info = sample(den, proc, x_T, key, grid=times, **kwargs)
    np.testing.assert_array_equal(by_grid, by_spacing)
    assert info['nfe'] == 10


def test_ddim_on_an_explicit_grid_is_the_closed_form_update():
  """One DDIM step from step 600 to 200 and the step to data, on Gaussian data N(0, 0.7²):
  x_200 = sqrt(abar_200) x0_hat + sqrt(1 - abar_200) eps_hat, then x0_hat at step 200, with
  the exact posterior means written here from abar (float64)."""
  proc = processes.DiscreteVP.from_name('linear')
  abar = np.cumprod(1.0 - processes.linear_betas(1000))
  with jax.enable_x64(True):
    den = _eps_of_gaussian(lambda t: proc.alpha(t) ** 2)
    x = np.array([[0.3, -1.2], [2.0, 0.1]])
    got, info = samplers.ddim_sample(den, proc, jnp.asarray(x), grid=[0.6, 0.2])
    s2 = 0.49
    a6, a2 = abar[599], abar[199]
    x0 = math.sqrt(a6) * s2 * x / (a6 * s2 + 1 - a6)
    eps = (x - math.sqrt(a6) * x0) / math.sqrt(1 - a6)
    x2 = math.sqrt(a2) * x0 + math.sqrt(1 - a2) * eps
    want = math.sqrt(a2) * s2 * x2 / (a2 * s2 + 1 - a2)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert info['nfe'] == 2


def test_explicit_discrete_grid_errors_are_one_line():
  proc = processes.DiscreteVP.from_name('linear')
  den = _eps_of_gaussian(lambda t: proc.alpha(t) ** 2)
  x = jnp.zeros((2, 2))
  cases = [
      (dict(grid=[0.9, 0.5005]), r'grid time 0.5005 is not an integer step n / T'),
      (dict(grid=[0.5, 0.9]), 'strictly decreasing'),
      (dict(grid=[0.9, 0.5], steps=3), 'steps=3 but the grid holds 2'),
      (dict(grid=[0.9, 0.5], t_max=0.8), r'outside 1\.\.800'),
      (dict(grid=[0.5, 0.0]), r'outside 1\.\.1000'),
      (dict(grid='log_snr'), "grid='log_snr'; a discrete sampler takes a spacing"),
  ]
  for kwargs, match in cases:
    with pytest.raises(ValueError, match=match) as err:
      samplers.ddim_sample(den, proc, x, **kwargs)
    assert '\n' not in str(err.value)
  # A spacing's name as `grid` is that spacing.
  a, _ = samplers.ddim_sample(den, proc, x + 1.0, steps=5, grid='leading')
  b, _ = samplers.ddim_sample(den, proc, x + 1.0, steps=5, spacing='leading')
  np.testing.assert_array_equal(a, b)
