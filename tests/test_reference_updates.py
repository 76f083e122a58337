"""Step-by-step reference checks of the update rules (DESIGN §6, "independent oracles").

Each sampler is compared, state by state, with a plain float64 numpy implementation of the
paper's update written here from the paper (not from the library):

* DPM-Solver-1/2/3: Lu et al. 2022a, Eq. 3.7 and Algorithms 1 (r1 = 1/2) and 2 (r1 = 1/3,
  r2 = 2/3), noise prediction;
* DPM-Solver++(2M) and its SDE variant: Lu et al. 2022b, Algorithm 2 and App. B; (3M): the
  exponential integrator of the data-prediction ODE with the quadratic through the last three
  `x0_hat` (Taylor terms integrated in closed form);
* UniPC: Zhao et al. 2023, UniP-p / UniC-p in the data-prediction form with B(h) = h ('bh1')
  and B(h) = e^h - 1 ('bh2'); a one-unknown system takes a = 1/2 (as the authors do);
* EDM: Karras et al. 2022, Algorithm 2 with stochastic churn;
* DDIM: Song et al. 2021, Eq. 12 with sigma_t of Eq. 16, eta in {0, 0.5, 1}.

Both sides see the same analytic denoiser (Gaussian data, written below) and the same grid
arrays: a Karras grid, and a log-SNR grid with random perturbations (non-uniform step ratios,
installed in place of the library's grid builder), in float64, to <= 1e-10 (relative to the
state's scale). The stochastic rules draw their noise from the key exactly as the samplers do
(`jax.random.split(key, n)`, one normal per step), so both sides add the same arrays.
Measured max differences: ~1e-14 relative for every rule here.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import processes
from diffusion_jax import samplers
from diffusion_jax.samplers import _common
from diffusion_jax.samplers import grids as grids_lib

MU = np.array([1.5, -0.5, 0.0])
S2 = np.array([0.04, 0.5, 2.0])
BATCH = 6
STEPS = 7
TOL = 1e-10


@pytest.fixture(autouse=True)
def _x64():
  with jax.enable_x64(True):
    yield


# --- the shared analytic denoiser --------------------------------------------------------------


def np_x0(x, a, s):
  """E[x0 | x_t] for x0 ~ N(MU, diag(S2)), x_t = a x0 + s eps (numpy)."""
  return MU + a * S2 / (a * a * S2 + s * s) * (x - a * MU)


def np_eps(x, a, s):
  return (x - a * np_x0(x, a, s)) / s


def jax_denoiser(process):
  mu, s2 = jnp.asarray(MU), jnp.asarray(S2)

  def den(x, t, cond=None):
    del cond
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
    a, s = process.alpha(t)[:, None], process.sigma(t)[:, None]
    x0 = mu + a * s2 / (a * a * s2 + s * s) * (x - a * mu)
    return x0, (x - a * x0) / s
  return den


def vp_alpha_sigma(lam):
  """alpha, sigma of a variance-preserving process at full log-SNR `lam`: alpha² = sigmoid."""
  return np.sqrt(1.0 / (1.0 + np.exp(-lam))), np.sqrt(1.0 / (1.0 + np.exp(lam)))


def phi(k, z):
  """phi_k(z) = sum_j z^j / (j + k)! (the exponential integrators' phi functions), by series."""
  return sum(z**j / math.factorial(j + k) for j in range(60))


# --- grids -------------------------------------------------------------------------------------


def karras_grid(process, steps, final='data'):
  return grids_lib.time_grid(process, steps, 'karras', final=final, dtype=jnp.float64)


def perturbed_log_snr_grid(process, steps, final='data', seed=0):
  """A log-SNR grid with each interior point moved by up to ±40% of the spacing."""
  n = steps if final == 'data' else steps + 1
  lam_ends = np.clip(np.asarray(process.log_snr(jnp.asarray([1.0, process.t_min]))), -20, 20)
  lam = np.linspace(lam_ends[0], lam_ends[1], n)
  step = (lam[1] - lam[0])
  lam[1:-1] += np.random.default_rng(seed).uniform(-0.4, 0.4, n - 2) * step
  t = process.t_of_log_snr(jnp.asarray(lam))
  grid = grids_lib.Grid(*(np.asarray(v) for v in (t, process.alpha(t), process.sigma(t),
                                                  process.log_snr(t))), to_data=final == 'data')
  ratios = np.diff(grid.log_snr)[1:] / np.diff(grid.log_snr)[:-1]
  assert np.ptp(ratios) > 0.5, ratios        # really non-uniform
  return grid


@pytest.fixture(params=['karras', 'perturbed_log_snr'])
def grid_case(request, monkeypatch):
  """`(make(process, steps, final) -> Grid, sampler grid name)`; the perturbed grid replaces
  the library's grid builder, so the sampler walks exactly the arrays the reference gets."""
  if request.param == 'karras':
    return karras_grid, 'karras'
  state = {}

  def make(process, steps, final='data'):
    state['grid'] = perturbed_log_snr_grid(process, steps, final)
    return state['grid']

  monkeypatch.setattr(_common, 'make_grid', lambda *a, **k: state['grid'])
  return make, 'log_snr'


def x_prior(process, seed=1):
  return np.asarray(process.prior_sample(jax.random.key(seed), (BATCH, MU.size), jnp.float64))


def assert_trajectories_match(lib_traj, ref_traj):
  lib_traj = np.asarray(lib_traj)
  ref_traj = np.stack(ref_traj)
  assert lib_traj.shape == ref_traj.shape, (lib_traj.shape, ref_traj.shape)
  scale = np.maximum(1.0, np.max(np.abs(ref_traj), axis=(1, 2)))
  err = np.max(np.abs(lib_traj - ref_traj), axis=(1, 2)) / scale
  assert np.all(err <= TOL), err
  # The reference really moves the state (not a vacuous comparison).
  assert np.max(np.abs(ref_traj[-1] - ref_traj[0])) > 0.1
  return float(err.max())


# --- DPM-Solver (Lu et al. 2022a), noise prediction ---------------------------------------------


def ref_dpm_solver(x, g, order):
  """Singlestep DPM-Solver-`order`, Algorithms 1-2 of Lu et al. 2022a, VP process."""
  lh = g.log_snr / 2.0                            # the paper's lambda = log(alpha / sigma)
  a, s = g.alpha, g.sigma
  out = [x]
  for i in range(len(lh) - 1):
    h = lh[i + 1] - lh[i]
    eps_s = np_eps(x, a[i], s[i])
    ddim = a[i + 1] / a[i] * x - s[i + 1] * np.expm1(h) * eps_s
    if order == 1:
      x = ddim
    elif order == 2:
      r1 = 0.5
      a1, s1 = vp_alpha_sigma(2.0 * (lh[i] + r1 * h))
      u = a1 / a[i] * x - s1 * np.expm1(r1 * h) * eps_s
      x = ddim - s[i + 1] / (2.0 * r1) * np.expm1(h) * (np_eps(u, a1, s1) - eps_s)
    else:
      r1, r2 = 1.0 / 3.0, 2.0 / 3.0
      a1, s1 = vp_alpha_sigma(2.0 * (lh[i] + r1 * h))
      a2, s2 = vp_alpha_sigma(2.0 * (lh[i] + r2 * h))
      u1 = a1 / a[i] * x - s1 * np.expm1(r1 * h) * eps_s
      d1 = np_eps(u1, a1, s1) - eps_s
      u2 = (a2 / a[i] * x - s2 * np.expm1(r2 * h) * eps_s
            - s2 * r2 / r1 * (np.expm1(r2 * h) / (r2 * h) - 1.0) * d1)
      d2 = np_eps(u2, a2, s2) - eps_s
      x = ddim - s[i + 1] / r2 * (np.expm1(h) / h - 1.0) * d2
    out.append(x)
  if g.to_data:
    out.append(np_x0(x, a[-1], s[-1]))
  return out


@pytest.mark.parametrize('order', [1, 2, 3])
def test_dpm_solver_matches_lu_2022a_step_by_step(order, grid_case):
  make, name = grid_case
  proc = processes.make_process('vp_linear')
  g = make(proc, STEPS)
  x_T = x_prior(proc)
  _, info = samplers.dpm_solver_sample(jax_denoiser(proc), proc, jnp.asarray(x_T), steps=STEPS,
                                       order=order, grid=name, return_trajectory=True)
  assert_trajectories_match(info['trajectory'], ref_dpm_solver(x_T, g, order))


# --- DPM-Solver++ (Lu et al. 2022b), data prediction ---------------------------------------------


def ref_dpm_solver_pp(x, g, order, noises=None):
  """Multistep DPM-Solver++(1/2M/3M), ODE, or SDE-DPM-Solver++(1/2M) when `noises` is given.

  Step i (from 0) uses order min(order, i + 1). ODE: x_t = (sigma_t / sigma_s) x_s +
  alpha_t int_0^h e^(u - h) p(u) du, with p the polynomial through the last model outputs in
  u = l - l_s; the integrals of 1, u and u²/2 are 1 - e^-h, h - 1 + e^-h and
  h²/2 - h + 1 - e^-h. SDE (App. B): x_t = (sigma_t / sigma_s) e^-h x_s + alpha_t (1 - e^-2h)
  (m0 + D1 / 2) + sigma_t sqrt(1 - e^-2h) z with D1 = (m0 - m1) / r, r = h_prev / h.
  """
  lh = g.log_snr / 2.0
  a, s = g.alpha, g.sigma
  out, ms = [x], []
  for i in range(len(lh) - 1):
    h = lh[i + 1] - lh[i]
    ms.insert(0, np_x0(x, a[i], s[i]))
    p = min(order, i + 1)
    m0 = ms[0]
    if noises is not None:
      d = m0 if p == 1 else m0 + 0.5 * (m0 - ms[1]) / ((lh[i] - lh[i - 1]) / h)
      x = (s[i + 1] / s[i] * np.exp(-h) * x + a[i + 1] * -np.expm1(-2.0 * h) * d
           + s[i + 1] * np.sqrt(-np.expm1(-2.0 * h)) * noises[i])
    else:
      i0 = -np.expm1(-h)
      i1 = h - 1.0 + np.exp(-h)
      i2 = h * h / 2.0 - h + 1.0 - np.exp(-h)
      if p == 1:
        d = i0 * m0
      elif p == 2:   # Alg. 2: D = (1 + 1/(2r)) m0 - 1/(2r) m1, r = h_prev / h
        r = (lh[i] - lh[i - 1]) / h
        d = i0 * ((1.0 + 0.5 / r) * m0 - 0.5 / r * ms[1])
      else:          # Newton form of the quadratic through (0, m0), (u1, m1), (u2, m2)
        u1, u2 = lh[i - 1] - lh[i], lh[i - 2] - lh[i]
        dd1 = (m0 - ms[1]) / (0.0 - u1)
        dd1_prev = (ms[1] - ms[2]) / (u1 - u2)
        dd2 = (dd1 - dd1_prev) / (0.0 - u2)
        first, second = dd1 - dd2 * u1, 2.0 * dd2      # p'(0), p''(0)
        d = i0 * m0 + i1 * first + i2 * second
      x = s[i + 1] / s[i] * x + a[i + 1] * d
    out.append(x)
  if g.to_data:
    out.append(np_x0(x, a[-1], s[-1]))
  return out


@pytest.mark.parametrize('order', [1, 2, 3])
def test_dpm_solver_pp_matches_lu_2022b_step_by_step(order, grid_case):
  make, name = grid_case
  proc = processes.make_process('vp_linear')
  g = make(proc, STEPS)
  x_T = x_prior(proc)
  _, info = samplers.dpm_solver_pp_sample(jax_denoiser(proc), proc, jnp.asarray(x_T),
                                          steps=STEPS, order=order, grid=name,
                                          return_trajectory=True)
  assert_trajectories_match(info['trajectory'], ref_dpm_solver_pp(x_T, g, order))


@pytest.mark.parametrize('order', [1, 2])
def test_sde_dpm_solver_pp_matches_lu_2022b_with_the_same_noise(order, grid_case):
  make, name = grid_case
  proc = processes.make_process('vp_linear')
  g = make(proc, STEPS)
  x_T = x_prior(proc)
  key = jax.random.key(7)
  # The sampler's draw: split into one key per update step, one standard normal per step.
  keys = jax.random.split(key, len(g.t) - 1)
  noises = [np.asarray(jax.random.normal(k, x_T.shape, jnp.float64)) for k in keys]
  _, info = samplers.dpm_solver_pp_sde_sample(jax_denoiser(proc), proc, jnp.asarray(x_T), key,
                                              steps=STEPS, order=order, grid=name,
                                              return_trajectory=True)
  assert_trajectories_match(info['trajectory'], ref_dpm_solver_pp(x_T, g, order, noises))


# --- UniPC (Zhao et al. 2023), data prediction ---------------------------------------------------


def ref_unipc(x, g, order, variant, corrector=True):
  """UniPC-p: UniP-p predictor, UniC-p corrector (not after the last grid point).

  With hh = -h (data prediction), B = hh ('bh1') or e^hh - 1 ('bh2'), the update from x_i is
  (sigma_(i+1) / sigma_i) x_i - alpha_(i+1) (e^hh - 1) m_i - alpha_(i+1) B sum_k a_k D_k / r_k,
  D_k = m_(i-k) - m_i, r_k = (l_(i-k) - l_i) / h, where a solves sum_k a_k r_k^(n-1) =
  hh n! phi_(n+1)(hh) / B (n = 1..#unknowns); the corrector adds r = 1, D = m_(i+1) - m_i.
  """
  lh = g.log_snr / 2.0
  a, s = g.alpha, g.sigma
  n_pts = len(lh)
  out = []
  ms = {}
  x_cur = x
  for i in range(n_pts - 1):
    ms[i] = np_x0(x_cur, a[i], s[i]) if i == 0 else ms[i]
    h = lh[i + 1] - lh[i]
    hh = -h
    B = hh if variant == 'bh1' else np.expm1(hh)
    p = min(order, i + 1)
    rhs = [hh * math.factorial(k) * phi(k + 1, hh) / B for k in range(1, p + 1)]

    def update(nodes, diffs, x_start=x_cur, i=i, hh=hh, B=B, rhs=rhs):
      if len(nodes) == 0:
        coef = []
      elif len(nodes) == 1:
        coef = [0.5]
      else:
        R = np.array([[r**(k - 1) for r in nodes] for k in range(1, len(nodes) + 1)])
        coef = np.linalg.solve(R, np.array(rhs[:len(nodes)]))
      corr = sum(c * dk / r for c, dk, r in zip(coef, diffs, nodes, strict=True))
      return (s[i + 1] / s[i] * x_start - a[i + 1] * np.expm1(hh) * ms[i]
              - a[i + 1] * B * corr)

    nodes = [(lh[i - k] - lh[i]) / h for k in range(1, p)]
    diffs = [ms[i - k] - ms[i] for k in range(1, p)]
    x_pred = update(nodes, diffs)
    out.append(x_cur)                                   # x_i (corrected where it was)
    ms[i + 1] = np_x0(x_pred, a[i + 1], s[i + 1])        # the model at the predicted point
    if corrector and i + 1 < n_pts - 1:
      x_cur = update(nodes + [1.0], diffs + [ms[i + 1] - ms[i]])
    else:
      x_cur = x_pred
  out.append(x_cur)
  if g.to_data:
    out.append(np_x0(x_cur, a[-1], s[-1]))
  return out


@pytest.mark.parametrize('variant', ['bh1', 'bh2'])
@pytest.mark.parametrize('order,corrector', [(1, True), (2, True), (3, True), (2, False)])
def test_unipc_matches_zhao_2023_step_by_step(order, corrector, variant, grid_case):
  make, name = grid_case
  proc = processes.make_process('vp_linear')
  g = make(proc, STEPS)
  x_T = x_prior(proc)
  _, info = samplers.unipc_sample(jax_denoiser(proc), proc, jnp.asarray(x_T), steps=STEPS,
                                  order=order, variant=variant, corrector=corrector, grid=name,
                                  return_trajectory=True)
  assert_trajectories_match(info['trajectory'], ref_unipc(x_T, g, order, variant, corrector))


def test_unipc_variants_differ_where_b_matters(grid_case):
  """bh1 and bh2 give different states (so the reference comparison separates them)."""
  make, _ = grid_case
  proc = processes.make_process('vp_linear')
  g = make(proc, STEPS)
  x_T = x_prior(proc)
  d = np.max(np.abs(ref_unipc(x_T, g, 2, 'bh1')[-2] - ref_unipc(x_T, g, 2, 'bh2')[-2]))
  assert d > 1e-4, d


# --- EDM Heun with churn (Karras et al. 2022, Algorithm 2) --------------------------------------


def ref_edm_heun(x, sig, steps, s_churn, s_tmin, s_tmax, s_noise, noises, to_data):
  """Algorithm 2 on the noise levels `sig` (decreasing, > 0), then sigma = 0 if `to_data`."""
  levels = list(sig) + ([0.0] if to_data else [])
  den = lambda y, sg: np_x0(y, 1.0, sg)          # EDM: alpha = 1, D(x; sigma) = E[x0 | x]
  out = [x]
  for i in range(len(levels) - 1):
    t_i, t_next = levels[i], levels[i + 1]
    gamma = min(s_churn / steps, math.sqrt(2.0) - 1.0) if s_tmin <= t_i <= s_tmax else 0.0
    t_hat = t_i + gamma * t_i
    x_hat = x + math.sqrt(t_hat**2 - t_i**2) * s_noise * noises[i]
    d = (x_hat - den(x_hat, t_hat)) / t_hat
    x = x_hat + (t_next - t_hat) * d
    if t_next != 0:
      d2 = (x - den(x, t_next)) / t_next
      x = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d2)
    out.append(x)
  return out


@pytest.mark.parametrize('s_churn,s_tmin,s_tmax,s_noise', [
    (0.0, 0.0, float('inf'), 1.0),
    (3.0, 0.0, float('inf'), 1.003),
    # Levels outside [s_tmin, s_tmax] add no noise (they used to add sqrt(rounding) noise).
    (5.0, 0.05, 10.0, 1.0),
])
def test_heun_matches_edm_algorithm_2_with_churn(s_churn, s_tmin, s_tmax, s_noise, grid_case):
  make, name = grid_case
  proc = processes.make_process('edm')
  g = make(proc, STEPS)
  x_T = x_prior(proc)
  key = jax.random.key(3)
  # The sampler's draw: split into one key per grid level, one standard normal each.
  keys = jax.random.split(key, len(g.t))
  noises = [np.asarray(jax.random.normal(k, x_T.shape, jnp.float64)) for k in keys]
  if s_churn == 0:
    noises = [np.zeros_like(x_T)] * len(g.t)
  _, info = samplers.heun_sample(jax_denoiser(proc), proc, jnp.asarray(x_T),
                                 key if s_churn else None, steps=STEPS, grid=name,
                                 s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax,
                                 s_noise=s_noise, return_trajectory=True)
  assert_trajectories_match(info['trajectory'],
                            ref_edm_heun(x_T, g.sigma, STEPS, s_churn, s_tmin, s_tmax,
                                         s_noise, noises, g.to_data))


# --- DDIM (Song et al. 2021, Eq. 12) ----------------------------------------------------------


def ref_ddim(x, abar, steps_n, eta, noises):
  """Eq. 12 with sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
  (Eq. 16) on the visited steps `steps_n` (decreasing), abar_0 = 1 (clean data)."""
  visited = list(steps_n) + [0]
  out = [x]
  for i in range(len(steps_n)):
    ab_t, ab_prev = abar[visited[i]], abar[visited[i + 1]]
    eps = np_eps(x, math.sqrt(ab_t), math.sqrt(1.0 - ab_t))
    x0 = (x - math.sqrt(1.0 - ab_t) * eps) / math.sqrt(ab_t)
    sig = eta * math.sqrt((1.0 - ab_prev) / (1.0 - ab_t)) * math.sqrt(1.0 - ab_t / ab_prev)
    x = (math.sqrt(ab_prev) * x0 + math.sqrt(max(1.0 - ab_prev - sig**2, 0.0)) * eps
         + sig * noises[i])
    out.append(x)
  return out


@pytest.mark.parametrize('eta', [0.0, 0.5, 1.0])
@pytest.mark.parametrize('spacing', ['trailing', 'leading'])
def test_ddim_matches_song_2021_eq_12(eta, spacing):
  proc = processes.make_process('vp_discrete', num_steps=1000)
  steps = 9
  abar = np.concatenate([[1.0], np.asarray(proc.alphas_cumprod, np.float64)])
  steps_n = samplers.discrete_timesteps(1000, steps, spacing)
  x_T = x_prior(proc)
  key = jax.random.key(5)
  keys = jax.random.split(key, steps)       # the sampler's draw: one key per step
  noises = [np.asarray(jax.random.normal(k, x_T.shape, jnp.float64)) for k in keys]
  if eta == 0:
    noises = [np.zeros_like(x_T)] * steps
  _, info = samplers.ddim_sample(jax_denoiser(proc), proc, jnp.asarray(x_T), key, steps=steps,
                                 eta=eta, spacing=spacing, return_trajectory=True)
  assert_trajectories_match(info['trajectory'], ref_ddim(x_T, abar, steps_n, eta, noises))


@pytest.mark.filterwarnings('ignore:Explicitly requested dtype')
def test_heun_adds_no_noise_at_levels_without_churn():
  """With churn only below s_tmax = 10, the steps from the levels 80 and 30 are deterministic:
  the same with s_noise = 0 and 1 (float32, EDM Karras grid). It used to add
  sqrt(max(s_hat² - s_i², 0)) s_noise z there, with s_hat recomputed through t differing from
  s_i by rounding: ~sqrt(ulp) s_i of noise (3e-3 at s = 30)."""
  with jax.enable_x64(False):
    proc = processes.make_process('edm')
    g = karras_grid(proc, STEPS)
    x_T = jnp.asarray(x_prior(proc), jnp.float32)
    trajs = [np.asarray(samplers.heun_sample(
        jax_denoiser(proc), proc, x_T, jax.random.key(3), steps=STEPS, grid='karras',
        s_churn=5.0, s_tmax=10.0, s_noise=noise, return_trajectory=True)[1]['trajectory'])
        for noise in (0.0, 1.0)]
    first_churned = int(np.argmax(g.sigma <= 10.0))          # 2: levels 80, 30 have none
    assert first_churned == 2
    np.testing.assert_array_equal(trajs[0][:first_churned + 1], trajs[1][:first_churned + 1])
