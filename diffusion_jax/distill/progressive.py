"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", Algorithm 2) as an `objectives.Objective`.

A round distills a teacher sampled with `2N` deterministic DDIM steps into a student sampled
with `N`: on the student grid `t = i / N` (i = 1..N), two teacher DDIM steps
`t -> t' = t - 1/(2N) -> t'' = t - 1/N` (Alg. 2),

  z_t'  = alpha_t'  x^(z_t)  + sigma_t'  eps^(z_t)
  z_t'' = alpha_t'' x^(z_t') + sigma_t'' eps^(z_t')

(the DDIM update `alpha_s x^ + (sigma_s / sigma_t)(z_t - alpha_t x^)`, Song et al. 2021, Eq. 12
with eta = 0, written with the teacher's consistent `eps^`), define the x-target for which ONE
student DDIM step from t lands on z_t'':

  x~ = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)

(Alg. 2, the `x~` line). The loss is `w(lambda_t) ||x~ - x^_eta(z_t)||²` with the student in
v-parameterisation (§4, `x^ = alpha z - sigma v` for VP; `parameterization.to_x0_eps` in
general) and the "truncated SNR" weight `w = max(SNR, 1)` or the "SNR+1" weight `w = SNR + 1`
(both §4; SNR+1 on the x-error is the v-MSE for VP). The target is computed under
`stop_gradient`: the teacher is never differentiated.

The last student step (i = 1) goes from `t = 1/N` to the data (sigma = 0), as every library
sampler's `final='data'` step does, not to the process's `t = 0` (where some processes still
carry noise, e.g. 'vp_cosine' at log-SNR 15): `t''` is then the data, `alpha'' = 1`,
`sigma'' = 0`, and `x~` is exactly the teacher's two-step endpoint `x^(z_t')`.

Sampling a student of N steps: `student_sampler(process, N)` names the library sampler and its
options: `samplers.SAMPLERS['euler']` (DDIM with eta = 0 in `s = sigma / alpha`) with
`grid=student_times(process, N)`, or, on a DiscreteVP, `SAMPLERS['ddim']` with that grid of
integer steps `n / T` (needs `T % N == 0`, and `T % 2N == 0` for the teacher's half steps). The
teacher of a round is sampled with the same sampler on `student_times(process, 2N)`.

Rounds: round k distills `N_{k-1} = 2 N_k` steps into `N_k = student_steps(N_0, k)`; each round
is an ordinary run whose teacher is the previous round's student checkpoint (the lead's driver),
so everything here is a pure function of `(teacher, student_steps)`.
"""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import objectives
from diffusion_jax import parameterization as param
from diffusion_jax.parameterization import expand_like

WEIGHTINGS = ('truncated_snr', 'snr_plus_one')
# Teacher kinds whose x0_hat divides by alpha (unusable where alpha(1) = 0).
_DIVIDE_BY_ALPHA = ('eps', 'score', 'edm')


def student_steps(teacher_steps: int, round: int) -> int:
  """`N_k = N_0 / 2^k`: the student's steps in round `k` (round 0 is the first teacher)."""
  if int(teacher_steps) != teacher_steps or teacher_steps < 1:
    raise ValueError(f'student_steps: teacher_steps={teacher_steps!r} must be an integer >= 1')
  if int(round) != round or round < 0:
    raise ValueError(f'student_steps: round={round!r} must be an integer >= 0')
  if teacher_steps % 2**round:
    raise ValueError(f'student_steps: teacher_steps={teacher_steps} is not divisible by '
                     f'2^{round} = {2**round} (round {round} halves the steps {round} times)')
  return int(teacher_steps) // 2**int(round)


def _is_discrete(process) -> bool:
  return hasattr(process, 'num_steps')


GRIDS = ('uniform', 'karras')


def grid_times(process, u, grid: str = 'uniform', rho: float = 7.0) -> np.ndarray:
  """The time at grid position `u in (0, 1]` (float64): `u` itself for 'uniform' (S&H's
  `t = i / N`), or for 'karras' the time whose noise level `s = sigma / alpha` is Karras et
  al.'s (2022, Eq. 5) `s(u) = (s_min^(1/rho) + u (s_max^(1/rho) - s_min^(1/rho)))^rho`, with
  `s_max`, `s_min` the process's at `t = 1` and `t_min`. Any such `t = g(u)` nests: the grid of
  `N` steps is every other time of the grid of `2N`, as the rounds need."""
  u = np.asarray(u, np.float64)
  if grid == 'uniform':
    return u
  if grid != 'karras':
    raise ValueError(f'grid={grid!r}; choose from {GRIDS}')
  ends = np.array([1.0, float(process.t_min)])
  lam = process.log_snr_np(ends)
  s_max, s_min = np.exp(-0.5 * lam)
  s = (s_min ** (1 / rho) + u * (s_max ** (1 / rho) - s_min ** (1 / rho))) ** rho
  return np.clip(process.t_of_log_snr_np(-2.0 * np.log(s)), float(process.t_min), 1.0)


def student_times(process, steps: int, grid: str = 'uniform') -> np.ndarray:
  """THE grid a student of `steps` steps is trained and sampled on: `t = g(i / N)`, i = N..1
  (float64, decreasing; `grid_times`), followed by the samplers' `final='data'` step to
  sigma = 0.

  On a DiscreteVP each `i / N` must be an integer step `n / T` (`T % N == 0`, 'uniform' only);
  elsewhere the smallest time must not lie below the process's `t_min`.
  """
  if int(steps) != steps or steps < 1:
    raise ValueError(f'student_times: steps={steps!r} must be an integer >= 1')
  steps = int(steps)
  if _is_discrete(process):
    if grid != 'uniform':
      raise ValueError(f"student_times: grid={grid!r} on a DiscreteVP; its integer steps need "
                       f"grid='uniform'")
    if process.num_steps % steps:
      raise ValueError(f'student_times: steps={steps} does not divide the DiscreteVP steps '
                       f'T={process.num_steps}, so i / N is not an integer step n / T')
  times = grid_times(process, np.arange(steps, 0, -1, dtype=np.float64) / steps, grid)
  if not _is_discrete(process) and times[-1] < float(process.t_min):
    raise ValueError(f'student_times: steps={steps} puts the last time {times[-1]:.4g} below '
                     f'the process t_min = {float(process.t_min):.4g}')
  return times


def student_sampler(process, steps: int, grid: str = 'uniform') -> tuple[str, dict]:
  """`(name in samplers.SAMPLERS, options)` sampling a student of `steps` steps on exactly
  `student_times`: DDIM on a DiscreteVP's integer steps, else 'euler' (DDIM in sigma / alpha);
  call it as `SAMPLERS[name](denoiser, process, x_T, steps=steps, **options)`."""
  times = tuple(float(t) for t in student_times(process, steps, grid))
  return ('ddim' if _is_discrete(process) else 'euler'), {'grid': times}


def check_teacher(process, teacher, who: str, teacher_process=None):
  """The teacher as a `Denoiser`, after the one-line refusals every distillation shares.

  `teacher_process` (the process the teacher was trained on, when the caller knows it) must be
  `process` itself or one with the same alpha and sigma; a consistency model (a one-step map,
  not a PF-ODE denoiser) is refused, and so is a kind whose x0_hat divides by alpha where
  alpha(1) = 0.
  """
  if teacher is None:
    raise ValueError(f'{who}: needs teacher= (a parameterization.Denoiser of the trained model)')
  teacher = param.as_denoiser(teacher)
  if teacher_process is not None and teacher_process is not process:
    t = np.linspace(0.05, 0.95, 7)
    same = (type(teacher_process) is type(process)
            and np.allclose(teacher_process.alpha_np(t), process.alpha_np(t), rtol=1e-9)
            and np.allclose(teacher_process.sigma_np(t), process.sigma_np(t), rtol=1e-9))
    if not same:
      raise ValueError(f'{who}: the teacher was trained on {type(teacher_process).__name__} but '
                       f'the student uses {type(process).__name__}; distill on the same process')
  if teacher.kind == 'consistency':
    raise ValueError(f"{who}: teacher kind 'consistency' is a one-step map, not a denoiser of "
                     f'the probability-flow ODE of {type(process).__name__}')
  if teacher.kind in _DIVIDE_BY_ALPHA and float(process.alpha_np(np.array(1.0))) == 0.0:
    raise ValueError(f'{who}: teacher kind {teacher.kind!r} cannot give x0 at t = 1 where '
                     f'{type(process).__name__} has alpha = 0; use a v, x0 or velocity teacher')
  return teacher


def two_step_target(teacher, process, z_t, t, student_steps, cond=None, grid: str = 'uniform'):
  """Salimans & Ho (2022), Alg. 2: the x-target `x~` at student time `t [B]` (on the grid
  `g(i / N)`, rounded to it), from two deterministic DDIM steps of `teacher` (a `Denoiser`)
  through `t' = g((2i - 1) / 2N)` to `t'' = g((i - 1) / N)`.

  Not differentiated: the caller wraps it in `stop_gradient` (the loss does). At i = 1 the second
  step is the step to data and `x~` is the teacher's `x0_hat` at `t' = g(1/(2N))`.
  """
  n = int(student_steps)
  fine = grid_times(process, np.arange(2 * n + 1) / (2.0 * n), grid)    # g(j / 2N), j = 0..2N
  fine = jnp.asarray(fine, z_t.dtype)
  t = jnp.broadcast_to(jnp.asarray(t, z_t.dtype), z_t.shape[:1])
  coarse = fine[2::2]                                              # g(i / N), i = 1..N
  i = 1 + jnp.argmin(jnp.abs(t[:, None] - coarse[None, :]), axis=1)
  t, t1, t2 = fine[2 * i], fine[2 * i - 1], fine[2 * i - 2]        # t, t', t''
  i = i.astype(z_t.dtype)
  alpha, sigma = process.alpha_sigma(t)
  a1, s1 = process.alpha_sigma(t1)
  a2, s2 = process.alpha_sigma(t2)
  to_data = i <= 1.0                                  # t'' is the data: alpha 1, sigma 0
  a2, s2 = jnp.where(to_data, 1.0, a2), jnp.where(to_data, 0.0, s2)
  x0, eps = teacher(z_t, t, cond)
  z1 = expand_like(a1, z_t) * x0 + expand_like(s1, z_t) * eps
  x0, eps = teacher(z1, t1, cond)
  z2 = expand_like(a2, z_t) * x0 + expand_like(s2, z_t) * eps
  ratio = s2 / sigma
  return (z2 - expand_like(ratio, z_t) * z_t) / expand_like(a2 - ratio * alpha, z_t)


def _weight(weighting, alpha, sigma):
  snr = (alpha / sigma) ** 2
  return jnp.maximum(snr, 1.0) if weighting == 'truncated_snr' else snr + 1.0


def progressive_distillation(process, *, teacher=None, student_steps: int,
                             weighting: str = 'truncated_snr', grid: str = 'uniform',
                             kind: str = 'v', sigma_data: float = param.SIGMA_DATA,
                             teacher_process=None) -> objectives.Objective:
  """Salimans & Ho (2022), Alg. 2: one round distilling `2N`-step DDIM of `teacher` into an
  `N`-step student (`N = student_steps`), as an Objective of the student's `kind` ('v', the
  paper's, by default).

  Per example: `i ~ U{1..N}`, `t = g(i / N)` (`grid`: 'uniform', the paper's `t = i / N`, or
  'karras', Karras et al.'s noise levels, for processes such as EDM whose `t` is not spread in
  noise level; `grid_times`), `eps ~ N(0, I)`, `z_t = alpha x0 + sigma eps`, and
  `w(t) mean_d (x~ - x^_eta(z_t))²` with `x~ = two_step_target(...)` under stop_gradient and
  `w = max(SNR, 1)` ('truncated_snr', §4) or `SNR + 1` ('snr_plus_one', §4). The student's
  `x^_eta` is its output read as `kind` (`parameterization.to_x0_eps`; 'edm' with
  `sigma_data` lets a student start from an EDM teacher's weights). The student is sampled
  with `student_sampler(process, N, grid)`.
  """
  who = 'progressive_distillation'
  if weighting not in WEIGHTINGS:
    raise ValueError(f'{who}: weighting={weighting!r}; choose from {WEIGHTINGS}')
  if kind not in param.KINDS:
    raise ValueError(f'{who}: kind={kind!r}; choose from {param.KINDS}')
  if grid not in GRIDS:
    raise ValueError(f'{who}: grid={grid!r}; choose from {GRIDS}')
  times = student_times(process, student_steps, grid)
  n_steps = times.shape[0]
  if _is_discrete(process) and process.num_steps % (2 * n_steps):
    raise ValueError(f'{who}: student_steps={n_steps}: the teacher half steps need 2N = '
                     f'{2 * n_steps} to divide the DiscreteVP steps T={process.num_steps}')
  if not _is_discrete(process) and grid_times(process, 0.5 / n_steps, grid) < float(
      process.t_min):
    raise ValueError(f'{who}: student_steps={n_steps}: the teacher step g(1/(2N)) lies below the '
                     f'process t_min = {float(process.t_min):.4g}')
  coarse = jnp.asarray(times[::-1].copy())                        # g(i / N), i = 1..N
  teacher = check_teacher(process, teacher, who, teacher_process)

  def loss(model_fn, x0, key, cond=None, **kwargs):
    del kwargs   # step= from a loop that passes it
    key_i, key_eps = jax.random.split(key)
    i = jax.random.randint(key_i, (x0.shape[0],), 1, n_steps + 1)
    t = coarse.astype(x0.dtype)[i - 1]                                 # [B]
    eps = jax.random.normal(key_eps, x0.shape, x0.dtype)
    z_t = process.marginal(x0, eps, t)
    x_tilde = jax.lax.stop_gradient(two_step_target(teacher, process, z_t, t, n_steps, cond,
                                                    grid))
    out = model_fn(*param.network_input(kind, z_t, t, process, sigma_data), cond)
    x_hat, _ = param.to_x0_eps(kind, out, z_t, process, t, sigma_data)
    alpha, sigma = process.alpha_sigma(t)
    w = _weight(weighting, alpha, sigma)
    per_example = w * jnp.mean(jnp.square(x_hat - x_tilde).reshape(x0.shape[0], -1), axis=-1)
    aux = {'loss_per_example': per_example, 't': t, 'log_snr': process.log_snr(t)}
    return jnp.mean(per_example), aux

  return objectives.Objective('progressive_distillation', loss, process, kind,
                              sigma_data=float(sigma_data))
