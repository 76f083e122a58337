"""Distribution-matching distillation: DMD (Yin et al. 2024a) and DMD2 (Yin et al. 2024b).

DMD = "One-step Diffusion with Distribution Matching Distillation" (CVPR 2024); DMD2 =
"Improved Distribution Matching Distillation for Fast Image Synthesis" (NeurIPS 2024).

A generator `G_theta` maps prior noise to data in one call (or a few, DMD2 §4.4). It is trained
to make the distribution of its samples match the teacher's: the gradient of
`KL(p_fake || p_real)` after diffusing both to time `t` (DMD Eq. 7) is
`E[ -(s_real(x_t, t) - s_fake(x_t, t)) dG/dtheta ]`, with `s_real` the frozen teacher's score
and `s_fake` the score of the generator's own distribution, tracked by a second network (the
"fake score" `mu_fake`) trained by the ordinary denoising loss on the generator's samples.

Here, on the library's one convention (DESIGN §1-3):

- The generator is a network of the TEACHER's prediction kind, read as its `x0_hat` at fixed
  times: `x = x0_hat(x_{t_i}, t_i)`, `t_0 = t_max = 1` (one step: `x = G(x_T)`), DMD2's few-step
  times `generator_times(process, steps)` = `t_max (steps - i) / steps` (DMD2 §4.4: timesteps
  999, 749, 499, 249 of 1000 for 4 steps). It starts from the teacher's weights (DMD §3.1), so
  at initialisation it is the teacher's one-step prediction. It is sampled by
  `make_denoiser(generator_fn, process, objective)` and `samplers.consistency_multistep_sample(
  ..., times=generator_times(process, steps))`: `x <- alpha_i x0_hat + sigma_i z` between calls.
- The real score is the teacher `Denoiser`; the fake score is a network of the teacher's kind
  and architecture, trained by the teacher's own objective (`fake_objective`) on
  `stop_gradient(x)` (DMD Eq. 6; DMD2 §4.1).
- Both networks live in one parameter tree `{'generator': ..., 'fake': ...}` (`DMDModel`, plus
  `'discriminator'` for the GAN option); the loss calls `model_fn(x, t, cond, part=...)`.

Scores and denoisers: `s(x_t, t) = -(x_t - alpha mu(x_t, t)) / sigma²` (DMD Eq. 3), so
`s_fake - s_real = alpha (mu_fake - mu_real) / sigma²`; with DMD's weighting (Eq. 8)
`w_t = sigma² / alpha * CS / ||mu_real(x_t, t) - x||_1` the per-example gradient on `x` is

    grad = w_t (s_fake - s_real) = (mu_fake - mu_real) / mean_dims |mu_real - x|,

computed without dividing by `alpha` or `sigma` (finite at every `t`). It enters as the
surrogate `0.5 mean_dims (x - stop_gradient(x - grad))²` whose gradient on `x` is `grad / d`
(the library averages over dimensions, as DMD2's released loss does with
`reduction='mean'`; `d = CS` is a constant factor, i.e. the learning rate).

Options:
- `regression_weight > 0`: DMD's regression loss (Eq. 9) between `G(z)` and the teacher's ODE
  output from the same `z` (`regression_fn`, e.g. `ode_regression_fn`). DMD uses LPIPS; this
  library has no LPIPS, so the distance is the MSE averaged over dimensions (one-step only).
  DMD precomputes a fixed set of noise-image pairs; here the teacher's ODE is solved for fresh
  noise inside the loss (the same target law, at the cost of the teacher's steps per batch).
- `fake_updates = k > 0`: DMD2's two time-scale update rule (§4.2): the fake score is updated
  `k` times per generator update (DMD2 uses 5). On steps with
  `step % (k + 1) != 0` the generator term is multiplied by 0; the generator's optimizer must
  then not move it either (Adam's momentum would): `ttur_optimizer` does that.
- `backward_simulation` (DMD2 §4.5): the few-step generator's input at `t_i < t_0` is made by
  running the current generator itself from noise (as at inference) rather than by noising
  real data (`False`: `alpha_i x0 + sigma_i eps` from the batch).
- `gan_weight > 0`: DMD2's GAN term (§4.3), with one deviation: DMD2's discriminator is a
  classification head on the fake score network's bottleneck features; the library's networks
  return only their prediction, so here the discriminator is a network of its own (a third
  part, `dmd_model(network, discriminator=...)`), its output averaged to a logit.

Left out: DMD2's shared-feature discriminator head (above); LPIPS (MSE instead); DMD's fixed
precomputed regression pairs (fresh teacher solves instead); the classifier-free-guided teacher
of text-to-image DMD is the teacher `Denoiser` wrapped by `guidance` (not done here).
"""

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffusion_jax import parameterization as param

PARTS = ('generator', 'fake')      # the two networks every DMD model has
DISCRIMINATOR = 'discriminator'    # the optional third (the GAN term, `gan_weight > 0`)


# --- one parameter tree for both networks ------------------------------------------------------


class DMDModel(nn.Module):
  """`{'generator': ..., 'fake': ...}` (and `'discriminator'` if given): the teacher's
  architecture twice (and a discriminator network for the GAN term).

  `apply(params, x, t, cond, part=...)` calls one of them (default the generator, so sampling
  code that knows nothing of DMD samples the generator); `init` creates all. Build it with
  `dmd_model(network)`.
  """
  generator: nn.Module
  fake: nn.Module
  discriminator: nn.Module | None = None

  def _parts(self):
    return PARTS + ((DISCRIMINATOR,) if self.discriminator is not None else ())

  def __call__(self, x, t, cond=None, *, train: bool = False, part: str = 'generator'):
    if part not in self._parts():
      raise ValueError(f'DMDModel: part={part!r}; choose from {self._parts()}')
    if self.is_initializing() and part == 'generator':
      for other in self._parts()[1:]:    # init creates every parameter subtree
        getattr(self, other)(x, t, cond, train=train)
    return getattr(self, part)(x, t, cond, train=train)


def dmd_model(network: nn.Module, discriminator: nn.Module | None = None) -> DMDModel:
  """A `DMDModel` whose generator and fake score both have `network`'s architecture; a
  `discriminator` network (any `(x, t, cond) -> [B, ...]`; its output's mean over non-batch
  dimensions is the logit) enables the GAN term, e.g. `network` itself."""
  return DMDModel(generator=network.clone(), fake=network.clone(),
                  discriminator=None if discriminator is None else discriminator.clone())


def init_from_teacher(params, teacher_params):
  """`{'generator': teacher, 'fake': teacher}` (DMD §3.1, §3.2: both start from the teacher).

  `params` is a `DMDModel`'s parameter tree (`{'generator', 'fake'}` and maybe
  `'discriminator'`), `teacher_params` the teacher network's; the two parts must have the
  teacher's tree structure and leaf shapes. A discriminator of the teacher's architecture
  starts from the teacher too (DMD2 §4.3 puts its classifier on the fake score, which does);
  another keeps its own initialisation.
  """
  allowed = (set(PARTS), set(PARTS) | {DISCRIMINATOR})
  if not isinstance(params, dict) or set(params) not in allowed:
    keys = sorted(params) if isinstance(params, dict) else type(params).__name__
    raise ValueError(f'init_from_teacher: params must have keys {PARTS} (and maybe '
                     f'{DISCRIMINATOR!r}), got {keys}')
  t_struct = jax.tree_util.tree_structure(teacher_params)
  t_shapes = [jnp.shape(leaf) for leaf in jax.tree_util.tree_leaves(teacher_params)]

  def like_teacher(tree):
    return (jax.tree_util.tree_structure(tree) == t_struct and
            [jnp.shape(leaf) for leaf in jax.tree_util.tree_leaves(tree)] == t_shapes)
  for part in PARTS:
    if not like_teacher(params[part]):
      raise ValueError(f'init_from_teacher: params[{part!r}] does not have the teacher '
                       f'network\'s tree and shapes')
  copy = lambda tree: jax.tree_util.tree_map(jnp.array, tree)
  out = {'generator': copy(teacher_params), 'fake': copy(teacher_params)}
  if DISCRIMINATOR in params:
    disc = params[DISCRIMINATOR]
    out[DISCRIMINATOR] = copy(teacher_params if like_teacher(disc) else disc)
  return out


def part_fn(model_fn, part: str):
  """`(x, t, cond) -> out` of one part of a `DMDModel`'s `model_fn(x, t, cond, part=...)`."""
  def fn(x, t, cond=None):
    return model_fn(x, t, cond, part=part)
  return fn


# --- the generator's times ---------------------------------------------------------------------


def generator_times(process, steps: int = 1, t_max: float | None = None) -> np.ndarray:
  """The decreasing times the generator is trained and sampled at: `t_max (steps - i) / steps`,
  read on a process with alpha = 1 (EDM, VE) as positions on Karras et al.'s rho = 7 grid of
  its noise levels (`progressive.grid_times`; uniform `t` there is uniform sigma, whose 3/4
  step would still be at sigma 20 on EDM), as `dm_time_sampler` reads DMD's draws.

  One step is `[t_max]` (DMD); four are `[1, .75, .5, .25]` (DMD2 §4.4, timesteps 999, 749,
  499, 249; on EDM sigma 80, 17.5, 2.5, 0.17). Pass them as `times=` to
  `samplers.consistency_multistep_sample`. `t_max` defaults to the process's (1); an eps- or
  score-prediction teacher on a VP process whose `alpha(1)` is ~0 divides by it there
  (`x0 = (x - sigma eps) / alpha`), so give it `t_max < 1` (DMD's Stable Diffusion teachers
  start at t = 999 / 1000 where alpha is ~0.07).
  """
  if int(steps) != steps or steps < 1:
    raise ValueError(f'generator_times: steps={steps} must be an integer >= 1')
  t_max = float(getattr(process, 't_max', 1.0) if t_max is None else t_max)
  if not 0.0 < t_max <= 1.0:
    raise ValueError(f'generator_times: t_max={t_max} must lie in (0, 1]')
  u = t_max * (int(steps) - np.arange(int(steps))) / int(steps)
  if _unit_alpha(process):
    from diffusion_jax.distill import progressive  # pylint: disable=import-outside-toplevel
    return progressive.grid_times(process, u, 'karras')
  return u


def sample(denoiser, process, x_T, key=None, *, steps: int = 1, cond=None,
           t_max: float | None = None, return_trajectory: bool = False):
  """Samples a DMD generator in `steps` calls on `generator_times(process, steps)`: its x0_hat
  at `t_0 = 1`, then `x <- alpha_i x0_hat + sigma_i z` and x0_hat again (DMD2 §4.4; this is
  `samplers.consistency_multistep_sample` with those times). A generator trained with
  `steps = S` is trained at exactly the times of every `steps` dividing `S`."""
  from diffusion_jax.samplers import consistency    # pylint: disable=import-outside-toplevel
  return consistency.consistency_multistep_sample(
      denoiser, process, x_T, key, times=generator_times(process, steps, t_max), cond=cond,
      return_trajectory=return_trajectory)


# --- DMD's gradient ------------------------------------------------------------------------


def distribution_matching_grad(x, mu_real, mu_fake):
  """DMD's per-example gradient on `x` (Eq. 7 with the weighting of Eq. 8), `x [B, ...]`.

  `(mu_fake - mu_real) / mean_dims |mu_real - x|`, where `mu_*` are the two denoisers at
  `x_t = alpha x + sigma eps`: equal to `w_t (s_fake - s_real)` with `s = -(x_t - alpha mu) /
  sigma²` and `w_t = sigma² / alpha * CS / ||mu_real - x||_1`. The denominator is floored at
  1e-12 (it is zero only where the teacher reproduces `x` exactly, and then so must a matched
  fake score).
  """
  axes = tuple(range(1, x.ndim))
  norm = jnp.maximum(jnp.mean(jnp.abs(mu_real - x), axis=axes, keepdims=True), 1e-12)
  return (mu_fake - mu_real) / norm


def distribution_matching_loss(x, grad):
  """`0.5 mean_dims (x - sg(x - grad))²` per example: its gradient on `x` is `grad / d`."""
  target = jax.lax.stop_gradient(x - grad)
  return 0.5 * jnp.mean(jnp.square(x - target).reshape(x.shape[0], -1), axis=-1)   # [B]


# --- when to draw the DM time -----------------------------------------------------------------


def _unit_alpha(process) -> bool:
  with jax.ensure_compile_time_eval():
    alpha = np.asarray(process.alpha(jnp.asarray([1e-3, 0.1, 0.5, 1.0], jnp.float32)), float)
  return bool(np.allclose(alpha, 1.0, rtol=0.0, atol=1e-6))


def _s_range(process):
  """`(s_min, s_max)` of `s = sigma / alpha` at the process's `t_min` and `t_max`."""
  with jax.ensure_compile_time_eval():
    t = jnp.asarray([process.t_min, getattr(process, 't_max', 1.0)], jnp.float32)
    s = np.asarray(process.sigma(t) / process.alpha(t), float)
  return float(s[0]), float(s[1])


def dm_time_sampler(process, dm_time: str | None, t_min: float, t_max: float):
  """`(key, batch_size) -> t [B]` of DMD's `t ~ U[t_min, t_max]` (DMD §3.2: 0.02 T .. 0.98 T).

  'uniform': `t = u`, DMD's draw on DDPM's 1000 steps (its Stable Diffusion models).
  'karras': `u` indexes EDM's rho = 7 grid in `s = sigma / alpha` from `s(t_min)` (u = 0) to
  `s(t_max)` (u = 1), `s = (s_min^(1/7) + u (s_max^(1/7) - s_min^(1/7)))^7`, DMD's draw for its
  EDM teachers (ImageNet, CIFAR: 1000 Karras levels). None: 'karras' on `alpha = 1` processes
  (EDM, VE), else 'uniform'.
  """
  if not 0.0 <= t_min < t_max <= 1.0:
    raise ValueError(f'dmd: need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}')
  if dm_time is None:
    dm_time = 'karras' if _unit_alpha(process) else 'uniform'
  if dm_time == 'uniform':
    return lambda key, n: jax.random.uniform(key, (n,), jnp.float32, t_min, t_max)
  if dm_time != 'karras':
    raise ValueError(f"dmd: dm_time={dm_time!r}; choose 'uniform' or 'karras'")
  s_lo, s_hi = _s_range(process)
  rho = 7.0
  a, b = s_lo ** (1 / rho), s_hi ** (1 / rho)

  def sample(key, n):
    u = jax.random.uniform(key, (n,), jnp.float32, t_min, t_max)
    s = (a + u * (b - a)) ** rho
    return process.t_of_log_snr(-2.0 * jnp.log(s))
  return sample


# --- the objective -------------------------------------------------------------------------


def _default_fake_objective(process, kind):
  from diffusion_jax import objectives    # pylint: disable=import-outside-toplevel
  presets = {'eps': objectives.ddpm_eps, 'x0': objectives.ddpm_x0,
             'v': objectives.v_prediction, 'score': objectives.dsm,
             'velocity': objectives.flow_matching, 'edm': objectives.edm}
  return presets[kind](process)


def _check_teacher(teacher, fake_objective):
  if teacher is None or not callable(teacher):
    raise ValueError('dmd: teacher= must be the teacher\'s parameterization.Denoiser '
                     f'(the real score), got {type(teacher).__name__}')
  kind = getattr(teacher, 'kind', None)
  if kind not in param.KINDS:
    raise ValueError(f'dmd: the teacher has prediction kind {kind!r}, which is not a denoiser of '
                     f'a diffusion model; the real score needs one of {param.KINDS}')
  if fake_objective is not None:
    if fake_objective.kind != kind:
      raise ValueError(f'dmd: fake_objective {fake_objective.name!r} predicts '
                       f'{fake_objective.kind!r} but the teacher predicts {kind!r}')
    if fake_objective.learned_variance or fake_objective.takes_step:
      raise ValueError(f'dmd: fake_objective {fake_objective.name!r} has a learned variance or '
                       'takes the step; the fake score needs a plain denoising loss')
  return kind


def _chain_inputs(gen_x0, process, times, x_T, key, cond):
  """Backward simulation (DMD2 §4.5): the inputs `[M, B, ...]` the current generator meets at
  each of its `M` times when sampled from `x_T`, under stop_gradient (as
  `consistency_multistep_sample` with `sigma_min = 0`: `x <- alpha_i x0_hat + sigma_i z`)."""
  inputs = [x_T]
  x = x_T
  keys = jax.random.split(key, len(times))
  for i in range(1, len(times)):
    x0 = jax.lax.stop_gradient(gen_x0(x, times[i - 1]))
    t = jnp.asarray(times[i], x_T.dtype)
    x = process.alpha(t) * x0 + process.sigma(t) * jax.random.normal(keys[i], x0.shape, x0.dtype)
    inputs.append(x)
  return jnp.stack(inputs)


def _check_process(process, teacher_process):
  if teacher_process is None:
    return
  if type(teacher_process) is not type(process) or repr(teacher_process) != repr(process):
    raise ValueError(f'dmd: the teacher was trained on {teacher_process!r} but the student '
                     f'runs on {process!r}; DMD needs the teacher\'s own process')


def dmd(process, *, teacher, teacher_process=None, steps: int = 1,
        generator_t_max: float | None = None, t_min: float = 0.02,
        t_max: float = 0.98, dm_time: str | None = None, fake_objective=None,
        dm_weight: float = 1.0, fake_weight: float = 1.0, regression_weight: float = 0.0,
        regression_fn: Callable | None = None, fake_updates: int = 0,
        backward_simulation: bool = True, gan_weight: float = 0.0,
        discriminator_weight: float = 1.0):
  """DMD / DMD2 as one `objectives.Objective` (DMD Alg. 1; DMD2 Alg. 1); `takes_step`.

  `loss(model_fn, x0, key, cond=None, *, step=0)` with `model_fn(x, t, cond, part=...)` (a
  `DMDModel`'s apply; `part_fn` takes one part). Per example:

    gen_step * (dm_weight * L_DM + regression_weight * L_reg + gan_weight * L_G)
      + fake_weight * L_fake + discriminator_weight * L_D,

  - `L_DM = 0.5 mean_d (x - sg(x - grad))²`, `grad = distribution_matching_grad(x, mu_real,
    mu_fake)` at `x_t = alpha(t) x + sigma(t) eps`, `t` from `dm_time_sampler` (DMD Eqs. 7-8),
    `x = G(x_in, t_i)`: the generator's x0_hat from the input at one of its `steps` times
    (`generator_times(process, steps, generator_t_max)`; drawn uniformly per example, DMD2
    §4.4, inputs by backward simulation §4.5; sample with `sample(..., steps=steps,
    t_max=generator_t_max)`);
  - `L_fake`: `fake_objective`'s loss of the fake network on `sg(x)` (DMD Eq. 6; default the
    library's preset for the teacher's kind, pass the teacher's own training objective);
  - `L_reg = mean_d (G(x_T) - sg(regression_fn(x_T, cond)))²` (DMD Eq. 9, MSE for LPIPS);
  - `gen_step = 1` when `step % (fake_updates + 1) == 0`, else 0 (DMD2 §4.2, TTUR);
  - `gan_weight > 0` (DMD2 §4.3; else `L_G = L_D = 0`): the non-saturating GAN losses on the
    logit `D(x_t, t)` (the `'discriminator'` part's output averaged over dimensions, fed
    `network_input` of the teacher's kind):
    `L_G = softplus(-D(x_t))` for generated `x_t = alpha x + sigma eps` (the DM's `t`, `eps`),
    `L_D = softplus(-D(alpha x0 + sigma eps')) + softplus(D(sg(x_t)))` for real `x0`.
    DMD2 puts `D` as a head on the fake score's bottleneck features; the library's networks
    expose no features, so `D` is a network of its own (e.g. the teacher's architecture, started
    from the teacher by `init_from_teacher`): a deviation from the paper. `L_G` is written as
    `f(x_t) - f(sg(x_t)) + sg(f(x_t))`, `f = softplus(-D(.))`: same value, same gradient on `x`,
    and the two terms' gradients on D's parameters cancel (the generator's loss must not train
    the discriminator).

  `teacher_process`: the process the teacher was trained on (a `Denoiser` does not carry it);
  when given it must be `process` (a one-line error names both).

  The generator term's gradient reaches only generator parameters (`mu_real`, `mu_fake` and
  the target are under stop_gradient) and the fake term's only fake parameters (it sees
  `sg(x)`); the teacher never receives one. `aux`: 'loss_per_example', 't' (the DM time),
  'loss_dm', 'loss_fake', 'loss_regression', 'loss_gan_generator', 'loss_discriminator' (per
  example), 'generator_step', 'x' (the generator's samples), 'x_t' and 'generator_time'.
  """
  from diffusion_jax import objectives    # pylint: disable=import-outside-toplevel
  kind = _check_teacher(teacher, fake_objective)
  _check_process(process, teacher_process)
  times = generator_times(process, steps, generator_t_max)
  if regression_weight < 0 or dm_weight < 0 or fake_weight < 0:
    raise ValueError(f'dmd: weights must be >= 0, got dm_weight={dm_weight}, '
                     f'fake_weight={fake_weight}, regression_weight={regression_weight}')
  if regression_weight > 0 and regression_fn is None:
    raise ValueError('dmd: regression_weight > 0 needs regression_fn(x_T, cond) -> the '
                     "teacher's ODE output (e.g. ode_regression_fn)")
  if regression_weight > 0 and steps != 1:
    raise ValueError(f'dmd: the regression loss (DMD Eq. 9) is for a one-step generator; '
                     f'steps={steps}')
  if gan_weight < 0 or discriminator_weight < 0:
    raise ValueError(f'dmd: gan_weight={gan_weight} and discriminator_weight='
                     f'{discriminator_weight} must be >= 0')
  if int(fake_updates) != fake_updates or fake_updates < 0:
    raise ValueError(f'dmd: fake_updates={fake_updates} must be an integer >= 0')
  period = int(fake_updates) + 1
  draw_t = dm_time_sampler(process, dm_time, t_min, t_max)
  fake_objective = fake_objective or _default_fake_objective(process, kind)
  sigma_data = fake_objective.sigma_data
  times_j = jnp.asarray(times)

  def loss(model_fn, x0, key, cond=None, *, step=0):
    generator, fake = part_fn(model_fn, 'generator'), part_fn(model_fn, 'fake')

    def gen_x0(x_in, t):
      return param.denoise(generator, process, kind, x_in, t, cond, sigma_data=sigma_data)[0]

    k_prior, k_chain, k_i, k_t, k_eps, k_fake, k_real = jax.random.split(key, 7)
    batch = x0.shape[0]
    x_T = process.prior_sample(k_prior, x0.shape, x0.dtype)
    if steps == 1:
      x_in, t_in = x_T, jnp.full((batch,), times[0], x0.dtype)
    else:
      i = jax.random.randint(k_i, (batch,), 0, steps)                               # [B]
      t_in = times_j[i].astype(x0.dtype)
      if backward_simulation:
        inputs = _chain_inputs(gen_x0, process, times, x_T, k_chain, cond)        # [M, B, ...]
      else:
        noise = jax.random.normal(k_chain, x0.shape, x0.dtype)
        inputs = jnp.stack([x_T] + [process.marginal(x0, noise, jnp.full((batch,), t, x0.dtype))
                                    for t in times[1:]])
      x_in = inputs[i, jnp.arange(batch)]
    x = gen_x0(x_in, t_in)                                                        # [B, ...]

    t = draw_t(k_t, batch).astype(x0.dtype)
    eps = jax.random.normal(k_eps, x.shape, x.dtype)
    x_t = jax.lax.stop_gradient(process.marginal(x, eps, t))
    mu_real = jax.lax.stop_gradient(teacher(x_t, t, cond)[0])
    mu_fake = jax.lax.stop_gradient(
        param.denoise(fake, process, kind, x_t, t, cond, sigma_data=sigma_data)[0])
    grad = distribution_matching_grad(jax.lax.stop_gradient(x), mu_real, mu_fake)
    l_dm = distribution_matching_loss(x, grad)                                    # [B]

    if regression_weight > 0:
      y = jax.lax.stop_gradient(regression_fn(x_T, cond))
      l_reg = jnp.mean(jnp.square(x - y).reshape(batch, -1), axis=-1)
    else:
      l_reg = jnp.zeros_like(l_dm)

    _, fake_aux = fake_objective.loss(fake, jax.lax.stop_gradient(x), k_fake, cond)
    l_fake = fake_aux['loss_per_example']
    if gan_weight > 0:
      disc = part_fn(model_fn, DISCRIMINATOR)

      def logit(y):                                                               # [B]
        out = disc(*param.network_input(kind, y, t, process, sigma_data), cond)
        return jnp.mean(out.reshape(batch, -1), axis=-1)
      x_t_g = process.marginal(x, eps, t)                  # gradient reaches the generator
      real_t = process.marginal(x0, jax.random.normal(k_real, x0.shape, x0.dtype), t)
      f_fake, f_fake_sg = jax.nn.softplus(-logit(x_t_g)), jax.nn.softplus(-logit(x_t))
      l_gan = f_fake - f_fake_sg + jax.lax.stop_gradient(f_fake_sg)
      l_disc = jax.nn.softplus(-logit(real_t)) + jax.nn.softplus(logit(x_t))
    else:
      l_gan = l_disc = jnp.zeros_like(l_dm)
    gen_step = (jnp.asarray(step) % period == 0).astype(x0.dtype)
    per_example = (gen_step * (dm_weight * l_dm + regression_weight * l_reg
                               + gan_weight * l_gan)
                   + fake_weight * l_fake + discriminator_weight * l_disc)
    aux = {'loss_per_example': per_example, 't': t, 'log_snr': process.log_snr(t),
           'loss_dm': l_dm, 'loss_fake': l_fake, 'loss_regression': l_reg,
           'loss_gan_generator': l_gan, 'loss_discriminator': l_disc,
           'generator_step': gen_step, 'x': x, 'x_t': x_t, 'generator_time': t_in}
    return jnp.mean(per_example), aux

  return objectives.Objective('dmd', loss, process, kind, sigma_data=sigma_data,
                              takes_step=True)


# --- helpers the training run needs ------------------------------------------------------------


def ode_regression_fn(teacher, process, sampler: str = 'heun', steps: int = 18, **options):
  """`(x_T, cond) -> x0`: the teacher's deterministic sample from `x_T` (DMD §3.3's paired
  noise-image targets) with `samplers.SAMPLERS[sampler]` at `steps`."""
  from diffusion_jax import samplers    # pylint: disable=import-outside-toplevel
  if sampler not in samplers.SAMPLERS:
    raise ValueError(f'ode_regression_fn: sampler={sampler!r}; choose from '
                     f'{sorted(samplers.SAMPLERS)}')
  sample = samplers.SAMPLERS[sampler]

  def fn(x_T, cond=None):
    return sample(teacher, process, x_T, None, steps=steps, cond=cond, **options)[0]
  return fn


def skip_zero_updates(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` where some gradient is nonzero; else zero updates with `inner`'s state unchanged,
  so a parameter whose loss term is masked on a step stays put (Adam's momentum would move it).

  Deciding by the gradient rather than a step count keeps it in step with the loss's mask even
  when the train step skips a non-finite update (which leaves the optimizer state as it was).
  """
  def init(params):
    return inner.init(params)

  def update(updates, state, params=None):
    nonzero = jnp.any(jnp.stack([jnp.any(u != 0) for u in jax.tree_util.tree_leaves(updates)]))

    def skip(_):
      return jax.tree_util.tree_map(jnp.zeros_like, updates), state
    return jax.lax.cond(nonzero, lambda _: inner.update(updates, state, params), skip, None)

  return optax.GradientTransformation(init, update)


def ttur_optimizer(generator_opt: optax.GradientTransformation,
                   fake_opt: optax.GradientTransformation,
                   discriminator_opt: optax.GradientTransformation | None = None
                   ) -> optax.GradientTransformation:
  """DMD2's two time-scale update (§4.2) on a `{'generator', 'fake'}` tree: the fake score's
  optimizer every step, the generator's only on the steps where `dmd(fake_updates=k)`'s loss
  has its generator term (`step % (k + 1) == 0`; its gradient is exactly zero otherwise).
  A `'discriminator'` part is updated every step by `discriminator_opt` (default `fake_opt`)."""
  def labels(params):
    return {part: jax.tree_util.tree_map(lambda _, p=part: p, tree)
            for part, tree in params.items()}
  return optax.multi_transform({'generator': skip_zero_updates(generator_opt),
                                'fake': fake_opt,
                                DISCRIMINATOR: discriminator_opt or fake_opt}, labels)
