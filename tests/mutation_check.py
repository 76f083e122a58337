"""Mutation check: does the default test suite reject one-line wrong changes to the math?

`python tests/mutation_check.py [--only SUBSTRING] [--jobs N]` copies the repository to a
temporary directory once, then for each entry of `MUTATIONS` (file, exact original text, wrong
text, tests to run) writes the wrong text into the copy, runs those default tests with `-x`,
restores the file and reports whether a test failed ("killed") or everything passed
("SURVIVED": a hole in the suite). It exits 1 if any mutation survived. Each original text must
occur exactly once in its file, so the table cannot silently drift from the code.

Not collected by pytest (no `test_` prefix); the whole table takes ~30 min on two cores, so
it is a habit, not a CI step. The last full run's output is in docs/mutation_check.txt.
"""

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (file, original text, wrong text, test files run against it). Keep every original unique.
# Every mutation sits in code the library runs in its normal paths (not in validation or in a
# method every family overrides). Test lists are short and most-targeted first: `-x` stops at the
# first failure, and a survivor runs them all. A pytest node id narrows a slow file.
PC, PR = 'diffusion_jax/processes_continuous.py', 'diffusion_jax/processes.py'
PA, OB = 'diffusion_jax/parameterization.py', 'diffusion_jax/objectives.py'
CO, EL = 'diffusion_jax/consistency.py', 'diffusion_jax/elbo.py'
S = 'diffusion_jax/samplers/'
T_PROC, T_PARAM, T_ORACLE = 'tests/test_processes.py', 'tests/test_parameterization.py', \
    'tests/test_oracles.py'
T_OBJ, T_VALUES = 'tests/test_objectives.py', 'tests/test_objective_values.py'
T_CONS, T_ELBO, T_REF = 'tests/test_consistency.py', 'tests/test_elbo.py', \
    'tests/test_reference_updates.py'
T_DPM, T_ODE, T_SDE = 'tests/test_samplers_dpm.py', 'tests/test_samplers_ode.py', \
    'tests/test_samplers_sde.py'
T_SAMP, T_ALL, T_GRIDS = 'tests/test_samplers.py', 'tests/test_samplers_all.py', \
    'tests/test_grids.py'
T_LIK = 'tests/test_likelihood.py'
AE, VQ = 'diffusion_jax/models/autoencoder.py', 'diffusion_jax/models/vq.py'
AEL = 'diffusion_jax/autoencoder_losses.py'
LAT, LATD, DIG = 'diffusion_jax/latent.py', 'diffusion_jax/data/latents.py', \
    'diffusion_jax/data/digits.py'
T_LAT, T_AEVQ, T_DIG = 'tests/test_latent.py', 'tests/test_autoencoder_vq.py', \
    'tests/test_digits_sizes.py'
T_AE, T_VQ, T_AEL = 'tests/test_autoencoder.py', 'tests/test_vq.py', \
    'tests/test_autoencoder_losses.py'
TR, EM, T_EMA = 'diffusion_jax/training.py', 'diffusion_jax/ema.py', 'tests/test_ema.py'
T_VLB = T_ELBO + '::test_ddpm_vlb_terms_are_ho_et_al_eq_5_to_7_per_example'
TX, T_TEXT = 'diffusion_jax/models/text.py', 'tests/test_text_conditioning.py'
ED, T_EDIT = 'diffusion_jax/editing.py', 'tests/test_editing.py'
T_FT = 'tests/test_finetune.py'
LO, T_LO = 'diffusion_jax/models/lora.py', 'tests/test_lora.py'
CN, T_CN = 'diffusion_jax/models/controlnet.py', 'tests/test_controlnet.py'
UN, DC = 'diffusion_jax/models/unet.py', 'diffusion_jax/data/control.py'
SR, T_SR = 'diffusion_jax/models/superres.py', 'tests/test_superres.py'
GEN = 'diffusion_jax/generation.py'
PG, T_PG = 'diffusion_jax/progressive.py', 'tests/test_progressive.py'
AF, AM, AIO = ('diffusion_jax/audio/features.py', 'diffusion_jax/metrics/audio.py',
               'diffusion_jax/audio/io.py')
T_AF, T_AD = 'tests/test_audio_features.py', 'tests/test_audio_data.py'
AD, TA = 'diffusion_jax/data/audio.py', 'diffusion_jax/data/tfds_audio.py'
WG, T_WG = 'diffusion_jax/models/wavegrad.py', 'tests/test_wavegrad.py'
ASC, T_ASC = 'diffusion_jax/audio/schedules.py', 'tests/test_audio_schedules.py'
ACO, T_ARUN = 'diffusion_jax/audio/conditioning.py', 'tests/test_audio_run.py'

T_IPNDM = 'tests/test_samplers_ipndm.py'
MUTATIONS = [
    # --- processes (processes.py, processes_continuous.py) ----------------------------------
    # (The base `Process.log_snr` is overridden by every family: a change there is dead code.)
    (PC, 'return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min',
     'return -0.5 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min',
     [T_PROC]),
    (PC, 'return self.alpha(t).reshape(shape) * x0 + self.sigma(t).reshape(shape) * eps',
     'return self.alpha(t).reshape(shape) * x0 + self.sigma(t).reshape(shape) ** 2 * eps',
     [T_PROC]),
    (PC, 'return d_var - 2.0 * f * var', 'return d_var + 2.0 * f * var', [T_PROC]),
    (PC, 'return xp.exp(2.0 * self._log_sigma(t))', 'return xp.exp(self._log_sigma(t))',
     [T_PROC]),
    (PC, 'return 2.0 * (xp.log1p(-t) - xp.log(t))',
     'return 2.0 * (xp.log1p(-t) - xp.log(2 * t))',
     [T_PROC]),
    (PC, 'return lam + self.shift\n', 'return lam - self.shift\n', [T_PROC]),
    (PC, 't = -2.0 * c / (b + xp.sqrt(b * b - 4.0 * a * c))',
     't = -2.0 * c / (b + xp.sqrt(b * b + 4.0 * a * c))', [T_PROC]),
    (PC, 'return -xp.expm1(-self._integrated_beta(t))',
     'return -xp.expm1(-0.5 * self._integrated_beta(t))', [T_PROC]),
    (PC, 'return xp.exp(-0.5 * lam) / self.sigma_max',
     'return xp.exp(-lam) / self.sigma_max', [T_PROC]),
    (PR, 'return np.cumprod(1.0 - self.betas)', 'return np.cumprod(1.0 - 0.5 * self.betas)',
     [T_PROC]),
    (PR, 'return (np.arange(self.num_steps + 1) / self.num_steps).astype(dtype)',
     'return (np.arange(self.num_steps + 1) / (self.num_steps + 1)).astype(dtype)', [T_PROC]),
    (PR, 'return math.cos((n / num_steps + s) / (1 + s) * math.pi / 2) ** 2',
     'return math.cos((n / num_steps + s) / (1 + s) * math.pi / 2)', [T_PROC]),
    (PR, 'scale = 1000.0 / num_steps', 'scale = 1.0', [T_PROC]),

    # --- parameterization ---------------------------------------------------------------------
    (PA, '1.0 / jnp.sqrt(norm), 0.25 * jnp.log(s)', '1.0 / jnp.sqrt(norm), 0.5 * jnp.log(s)',
     [T_ORACLE, T_PARAM]),
    (PA, 'return sd2 / norm, s * sigma_data / jnp.sqrt(norm)',
     'return sd2 / norm, s * sigma_data / norm', [T_ORACLE, T_PARAM]),
    (PA, 'return alpha * eps - sigma * x0', 'return alpha * eps + sigma * x0', [T_ORACLE, T_PARAM]),
    (PA, 'return (alpha * x_t - sigma * out) / norm, (sigma * x_t + alpha * out) / norm',
     'return (alpha * x_t - sigma * out) / norm, (sigma * x_t - alpha * out) / norm',
     [T_PARAM, T_ORACLE]),
    (PA, 'det = alpha * d_sigma - sigma * d_alpha', 'det = alpha * d_sigma + sigma * d_alpha',
     [T_PARAM, T_ORACLE]),
    (PA, 'eps = -sigma * out', 'eps = sigma * out', [T_PARAM, T_ORACLE]),
    (PA, 'x_tilde = x0 + sigma / alpha * eps', 'x_tilde = x0 + sigma * eps', [T_ORACLE, T_PARAM]),
    (PA, 'return expand_like(c_in / alpha, x_t) * x_t, c_noise',
     'return expand_like(c_in, x_t) * x_t, c_noise', [T_PARAM, T_ORACLE]),
    (PA, 'sigma_data * shifted / jnp.sqrt(sd2 + sigma**2)',
     'sigma_data * sigma / jnp.sqrt(sd2 + sigma**2)', [T_PARAM, T_CONS]),
    (PA, '    eps = (x_t - alpha * x0) / sigma\n', '    eps = (x_t - x0) / sigma\n', [T_PARAM]),

    # --- objectives ---------------------------------------------------------------------------
    (OB, "if kind == 'x0':\n    return (sigma / alpha) ** 2",
     "if kind == 'x0':\n    return (alpha / sigma) ** 2",
     [T_OBJ + '::test_stated_equivalences_per_example']),
    (OB, 'return (sigma / alpha) ** 2 / c_out**2', 'return (sigma / alpha) / c_out**2',
     [T_OBJ + '::test_stated_equivalences_per_example']),
    (OB, 'return jnp.minimum(snr, gamma) / snr / eps_mse_factor(kind, process, t)',
     'return jnp.minimum(snr, gamma) / eps_mse_factor(kind, process, t)',
     [T_OBJ + '::test_min_snr_v_weight_is_papers_form_on_vp',
      T_OBJ + '::test_loss_at_optimal_model_is_closed_form_minimum']),
    (OB, "- 2.0 * a @ b.T", "+ 2.0 * a @ b.T",
     [T_VALUES + '::test_ot_flow_matching_is_flow_matching_on_assignment_paired_noise',
      T_OBJ + '::test_ot_pairing_is_the_exact_minimum_cost_permutation']),
    (OB, 'x_t = process.marginal(x0, eps, t)', 'x_t = process.marginal(eps, x0, t)',
     [T_OBJ + '::test_loss_at_optimal_model_is_closed_form_minimum']),
    (OB, 'return process.sigma(t) ** 2', 'return process.sigma(t)',
     [T_OBJ + '::test_loss_at_optimal_model_is_closed_form_minimum']),
    (OB, 'return process.t_of_log_snr(-2.0 * log_sigma)', 'return process.t_of_log_snr(-log_sigma)',
     [T_OBJ + '::test_t_samplers_follow_their_distributions', T_PROC]),
    (OB, 'n = jax.random.randint(key, (batch_size,), 1, process.num_steps + 1)',
     'n = jax.random.randint(key, (batch_size,), 0, process.num_steps)',
     [T_OBJ + '::test_aux_reports_t_on_ddpm_grid_and_log_snr',
      T_OBJ + '::test_t_samplers_follow_their_distributions']),
    (OB, 'return 0.5 * (t_max - t0) * (-d_lambda)', 'return (t_max - t0) * (-d_lambda)',
     ['tests/test_weighting.py', T_OBJ + '::test_loss_at_optimal_model_is_closed_form_minimum']),
    (OB, 'return jstats.norm.pdf(u, mean, std) / (t * (1 - t)) * _dt_dlambda(process, lam)',
     'return jstats.norm.pdf(u, mean, std) / t * _dt_dlambda(process, lam)',
     ['tests/test_weighting.py']),

    # --- consistency (training and distillation) ---------------------------------------------
    (CO, 'online = f(model_fn, x0 + expand_like(sigma_next, x0) * z, sigma_next, cond)',
     'online = f(model_fn, x0 + expand_like(sigma_i, x0) * z, sigma_next, cond)',
     [T_VALUES + '::test_consistency_training_loss_is_the_hand_computation', T_CONS]),
    (CO, 'return 1.0 / (sigma_next - sigma_i)', 'return 1.0 / (sigma_next + sigma_i)',
     [T_VALUES + '::test_consistency_training_loss_is_the_hand_computation', T_CONS]),
    (CO, 'return 0.00054 * math.sqrt(dim)', 'return 0.00054 * dim',
     [T_CONS, T_VALUES + '::test_consistency_training_loss_is_the_hand_computation']),
    (CO, 'cdf = erf((jnp.log(sigmas) - p_mean) / (math.sqrt(2.0) * p_std))',
     'cdf = erf((jnp.log(sigmas) - p_mean) / (2.0 * p_std))', [T_CONS]),
    (CO, 'return jnp.minimum(jnp.left_shift(s0, doublings.astype(jnp.int32)), s1) + 1',
     'return jnp.minimum(jnp.left_shift(s0, doublings.astype(jnp.int32)), s1)', [T_CONS]),
    (CO, 'n = jnp.ceil(jnp.sqrt(frac * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1.0) + 1.0',
     'n = jnp.ceil(jnp.sqrt(frac * (s1 ** 2 - s0**2) + s0**2) - 1.0) + 1.0', [T_CONS]),
    (CO, 'expand_like(sigma, x), _sigma_to_t(process, sigma_to)',
     'expand_like(sigma_to, x), _sigma_to_t(process, sigma_to)', [T_CONS]),
    (CO, 'process, x_next, sigma_next, sigma_n,', 'process, x_next, sigma_n, sigma_next,',
     [T_CONS]),

    # --- elbo ---------------------------------------------------------------------------------
    (EL, '- 1.0 - jnp.log(s**2 / p2)', '- 1.0 + jnp.log(s**2 / p2)', [T_ELBO]),
    (EL, '(jnp.log(2 * math.pi * s_tilde2) + 1.0)', '(jnp.log(2 * math.pi * s_tilde2))', [T_ELBO]),
    (EL, 'weight = 0.5 * (t_max - t0) * (-d_lambda)', 'weight = (t_max - t0) * (-d_lambda)',
     [T_ELBO]),
    (EL, 'nll = (prior_kl(process, x0, t_max)', 'nll = (prior_kl(process, x0)', [T_ELBO]),
    (EL, 'c0 = jnp.sqrt(abar_m) * beta / (1 - abar_n)',
     'c0 = jnp.sqrt(abar_n) * beta / (1 - abar_n)',
     [T_VLB, T_ELBO]),
    # (Replaces `ct` -> `(1 - beta) ...`, an equivalent change: ct multiplies x_t in both
    # posterior means, so it cancels from the KL, which sees only c0 (x0 - x0_hat).)
    (EL, 'var_q = beta * (1 - abar_m) / (1 - abar_n)', 'var_q = beta * (1 - abar_n) / (1 - abar_m)',
     [T_VLB, T_ELBO]),
    (EL, 'terms = T * jnp.where(n == 1, decoder, kl)', 'terms = jnp.where(n == 1, decoder, kl)',
     [T_ELBO, T_VALUES + '::test_ddpm_hybrid_is_l_simple_plus_weighted_t_times_l_vlb_term']),
    (EL, 'return 0.5 * (jnp.log(var2 / var1)', 'return 0.5 * (jnp.log(var1 / var2)', [T_ELBO]),
    (EL, 'var_p = jnp.exp(v * ex(jnp.log(beta)) + (1 - v) * ex(log_tilde))',
     'var_p = jnp.exp((1 - v) * ex(jnp.log(beta)) + v * ex(log_tilde))', [T_ELBO]),
    (EL, 'vlb_bpd = terms / (d * math.log(2.0))', 'vlb_bpd = terms / d',
     [T_VALUES + '::test_ddpm_hybrid_is_l_simple_plus_weighted_t_times_l_vlb_term', T_ELBO]),

    # --- samplers/dpm_solver.py ---------------------------------------------------------------
    (S + 'dpm_solver.py', 'A, B = a_t / a_s, -s_t * h * phi(1, h)',
     'A, B = a_s / a_t, -s_t * h * phi(1, h)', [T_REF, T_DPM]),
    (S + 'dpm_solver.py', 'C = -s_t * h * phi(1, h) / (2.0 * rh[0] / h)',
     'C = -s_t * h * phi(1, h) / (rh[0] / h)', [T_REF, T_DPM]),
    (S + 'dpm_solver.py', 'C_j = -s_j * (rh[1] / rh[0]) * rh[1] * phi(2, rh[1])',
     'C_j = -s_j * (rh[0] / rh[1]) * rh[1] * phi(2, rh[1])', [T_REF, T_DPM]),
    (S + 'dpm_solver.py', 'C = -s_t / (rh[1] / h) * h * phi(2, h)',
     'C = -s_t / (rh[1] / h) * h * phi(1, h)', [T_REF, T_DPM]),
    (S + 'dpm_solver.py', 'r = (lh[i] - lh[i - 1]) / h', 'r = h / (lh[i] - lh[i - 1])',
     [T_REF, T_DPM]),
    (S + 'dpm_solver.py',
     'moments = np.array([h * math.factorial(i) * float(phi(i + 1, -h)) for i in k])',
     'moments = np.array([h * float(phi(i + 1, -h)) for i in k])', [T_REF, T_DPM]),
    (S + 'dpm_solver.py', 'c[i] = sigma[i + 1] * np.sqrt(base)', 'c[i] = sigma[i] * np.sqrt(base)',
     [T_REF, T_DPM]),
    (S + 'dpm_solver.py', 'a[i] = sigma[i + 1] / sigma[i] * np.exp(-h)',
     'a[i] = sigma[i + 1] / sigma[i] * np.exp(-2.0 * h)', [T_REF, T_DPM]),
    (S + 'dpm_solver.py', 'w[i] *= alpha[i + 1]', 'w[i] *= alpha[i]', [T_REF, T_DPM]),
    (S + 'dpm_solver.py', 'series = sum(z**j / math.factorial(j + k) for j in range(30))',
     'series = sum(z**j / math.factorial(j + k + 1) for j in range(30))', [T_REF, T_DPM]),

    # --- samplers/unipc.py --------------------------------------------------------------------
    (S + 'unipc.py', "B = hh if variant == 'bh1' else hh * float(dpm_solver.phi(1, hh))",
     "B = hh * float(dpm_solver.phi(1, hh)) if variant == 'bh1' else hh", [T_REF, T_DPM]),
    (S + 'unipc.py', 'b = [hh * math.factorial(k) * float(dpm_solver.phi(k + 1, hh)) / B',
     'b = [hh * float(dpm_solver.phi(k + 1, hh)) / B', [T_REF, T_DPM]),
    (S + 'unipc.py', 'r = [(lh[i - k] - lh[i]) / h for k in range(1, p)]',
     'r = [(lh[i - k + 1] - lh[i - 1]) / h for k in range(1, p)]', [T_REF, T_DPM]),
    (S + 'unipc.py', 'return np.array([0.5])', 'return np.array([1.0])', [T_REF, T_DPM]),
    (S + 'unipc.py', 'wcn[i + 1] = -a_t * B * rho_c[-1]', 'wcn[i + 1] = a_t * B * rho_c[-1]',
     [T_REF, T_DPM]),
    (S + 'unipc.py', 'wp[i, 0] = base + a_t * B * sum(rho[k] / r[k] for k in range(p - 1))',
     'wp[i, 0] = base - a_t * B * sum(rho[k] / r[k] for k in range(p - 1))', [T_REF, T_DPM]),
    (S + 'unipc.py', 'x_next = ap * x + dpm_solver.weighted_sum',
     'x_next = ap * x_pred + dpm_solver.weighted_sum', [T_REF, T_DPM]),

    # --- samplers/ode.py ----------------------------------------------------------------------
    (S + 'ode.py', 'return alpha_next * (x / alpha + (s_next - s) * 0.5 * (d1 + d2))',
     'return alpha_next * (x / alpha + (s_next - s) * 0.5 * (d2 + d2))', [T_REF, T_ODE]),
    (S + 'ode.py', 'y_euler = x / alpha + (s_next - s) * d1',
     'y_euler = x / alpha + (s_next - s) * 0.5 * d1',
     [T_REF, T_ODE]),
    (S + 'ode.py', 'return alpha_next * x0 + sigma_next * eps', 'return x0 + sigma_next * eps',
     [T_SAMP, T_ODE]),
    (S + 'ode.py', 'gamma = min(s_churn / steps, math.sqrt(2.0) - 1.0)',
     'gamma = min(s_churn / steps, math.sqrt(2.0))', [T_REF]),
    (S + 'ode.py', 'add = jnp.sqrt(jnp.maximum(s_hat**2 - s_i**2, 0.0)) * s_noise',
     'add = jnp.maximum(s_hat - s_i, 0.0) * s_noise', [T_REF]),
    (S + 'ode.py', "'midpoint': ((0.0, 0.5), ((), (0.5,)), (0.0, 1.0)),",
     "'midpoint': ((0.0, 0.5), ((), (1.0,)), (0.0, 1.0)),", [T_ODE]),
    (S + 'ode.py', '(1 / 6, 1 / 3, 1 / 3, 1 / 6)),', '(1 / 6, 1 / 3, 1 / 6, 1 / 3)),', [T_ODE]),
    (S + 'ode.py', 'return expand_like(d_alpha, x) * x0 + expand_like(d_sigma, x) * eps',
     'return expand_like(d_alpha, x) * eps + expand_like(d_sigma, x) * x0', [T_ODE]),
    (S + 'ode.py', 'ks.append(velocity(denoiser, process, xi, t_i + ci * h, cond))',
     'ks.append(velocity(denoiser, process, xi, t_i + 0.5 * ci * h, cond))', [T_ODE]),

    # --- samplers/discrete.py -----------------------------------------------------------------
    (S + 'discrete.py', 's = eta * np.sqrt((1 - abar_m) / (1 - abar_n) * (1 - abar_n / abar_m))',
     's = eta * np.sqrt((1 - abar_n) / (1 - abar_m) * (1 - abar_n / abar_m))', [T_REF, T_SAMP]),
    (S + 'discrete.py', 'c_eps = np.sqrt(np.maximum(1 - abar_m - s**2, 0.0))',
     'c_eps = np.sqrt(np.maximum(1 - abar_m, 0.0))', [T_REF, T_SAMP]),
    (S + 'discrete.py', 'c_x0 = np.sqrt(abar_m) * beta / (1 - abar_n)',
     'c_x0 = np.sqrt(abar_n) * beta / (1 - abar_n)', [T_SAMP, T_SDE]),
    (S + 'discrete.py', 'log_var = v * log_beta + (1 - v) * log_tilde',
     'log_var = (1 - v) * log_beta + v * log_tilde', [T_SDE, T_SAMP]),
    (S + 'discrete.py', 'std = jnp.where(last, 0.0, jnp.exp(0.5 * log_var))',
     'std = jnp.where(last, 0.0, jnp.exp(log_var))', [T_SAMP, T_SDE]),
    (S + 'discrete.py', 'alpha, s = np.sqrt(abar), np.sqrt((1.0 - abar) / abar)',
     'alpha, s = np.sqrt(abar), np.sqrt(1.0 - abar)', [T_SDE]),
    (S + 'discrete.py', 'y_n = y + (s_n - s_m) * eps', 'y_n = y + (s_m - s_n) * eps', [T_SDE]),
    (S + 'discrete.py', 't = n.astype(dtype) / dtype.type(process.num_steps)',
     't = (n - 1).astype(dtype) / dtype.type(process.num_steps)',
     [T_SAMP, T_SDE]),

    # --- samplers/sde.py ----------------------------------------------------------------------
    (S + 'sde.py', 'drift = f_i * x + g2_i / s_i * eps', 'drift = f_i * x - g2_i / s_i * eps',
     [T_SDE]),
    (S + 'sde.py', 'jnp.sqrt(g2_i * h_i) * jax.random.normal(k, x.shape, x.dtype)',
     'jnp.sqrt(g2_i) * h_i * jax.random.normal(k, x.shape, x.dtype)', [T_SDE]),
    (S + 'sde.py', 'c_x, c_eps, c_z = 2.0 - r, -big_g2 / sigma[:-1], np.sqrt(big_g2)',
     'c_x, c_eps, c_z = 2.0 - r, -big_g2 / sigma[1:], np.sqrt(big_g2)', [T_SDE]),
    (S + 'sde.py', 'big_g2 = np.maximum(sigma[:-1] ** 2 - r**2 * sigma[1:] ** 2, 0.0)',
     'big_g2 = np.maximum(sigma[:-1] ** 2 - r * sigma[1:] ** 2, 0.0)', [T_SDE]),
    (S + 'sde.py', 'e = parameterization.expand_like(2.0 * a_i * ratio**2, x)',
     'e = parameterization.expand_like(a_i * ratio**2, x)',
     [T_VALUES + '::test_pc_langevin_step_is_song_2021_algorithm_5', T_SDE]),
    (S + 'sde.py', 'return x + e * score + jnp.sqrt(2.0 * e) * z',
     'return x + e * score + jnp.sqrt(e) * z',
     [T_VALUES + '::test_pc_langevin_step_is_song_2021_algorithm_5', T_SDE]),
    (S + 'sde.py', 'a = (alpha[:alpha_next.shape[0]] / alpha_next) ** 2',
     'a = (alpha[:alpha_next.shape[0]] / alpha_next)',
     [T_VALUES + '::test_pc_langevin_step_is_song_2021_algorithm_5', T_SDE]),
    (S + 'sde.py', 'c_x, c_eps, c_z = 1.0 - h * f, -h * g2 / sigma[:-1], np.sqrt(g2 * h)',
     'c_x, c_eps, c_z = 1.0 + h * f, -h * g2 / sigma[:-1], np.sqrt(g2 * h)',
     [T_SDE + '::test_euler_maruyama_predictor_is_song_et_al_eq_6', T_SDE]),

    # --- samplers/consistency.py --------------------------------------------------------------
    (S + 'consistency.py', 'top_up = np.sqrt(np.maximum(s**2 - s_min**2, 0.0))',
     'top_up = np.maximum(s - s_min, 0.0)', [T_SDE, T_CONS]),
    (S + 'consistency.py', 'x = a_i * (x0 + std_i * jax.random.normal(k, x0.shape, x0.dtype))',
     'x = x0 + std_i * jax.random.normal(k, x0.shape, x0.dtype)', [T_SDE, T_CONS]),
    (S + 'consistency.py', 'x0, _ = denoiser(x_T, t_j[0], cond)',
     'x0, _ = denoiser(x_T, t_j[1], cond)',
     [T_SDE, T_CONS]),
    (S + 'consistency.py', '(t_j[1:], alpha_j[1:], std_j[1:], keys)',
     '(t_j[1:], alpha_j[1:], std_j[:-1], keys)', [T_SDE, T_CONS]),
    (S + 'consistency.py', 'return g.t[:-1]', 'return g.t[1:]', [T_SDE, T_CONS]),

    # --- samplers/grids.py --------------------------------------------------------------------
    (S + 'grids.py', 'ramp = np.linspace(0.0, 1.0, int(n))',
     'ramp = np.linspace(0.0, 1.0, int(n) + 1)[:-1]', [T_GRIDS, T_CONS]),
    (S + 'grids.py', 'ramp = jnp.maximum(k, 0).astype(dtype) / jnp.asarray(n - 1, dtype)',
     'ramp = jnp.maximum(k, 0).astype(dtype) / jnp.asarray(n, dtype)', [T_CONS, T_GRIDS]),
    (S + 'grids.py', 'k = np.round(np.arange(T, 0, -T / S)) - 1',
     'k = np.round(np.arange(T, 0, -T / S)) - 2', [T_GRIDS, T_SAMP]),
    (S + 'grids.py', 'k = np.round(np.linspace(0, T - 1, S))',
     'k = np.round(np.linspace(1, T - 1, S))',
     [T_GRIDS, T_SAMP]),
    (S + 'grids.py', 'k = np.arange(S) * (T // S)', 'k = np.arange(S) * (T // S) + 1',
     [T_GRIDS, T_SAMP]),
    (S + 'grids.py', 's_max, s_min = np.exp(-0.5 * lam_ends)', 's_max, s_min = np.exp(-lam_ends)',
     [T_GRIDS]),
    (S + 'grids.py', 't = np.linspace(t_max, t_min, n + 1)[:-1] if at_data',
     't = np.linspace(t_max, t_min, n + 1)[1:] if at_data', [T_GRIDS, T_ODE]),
    (S + 'grids.py', 's_max, s_min = EDM_SIGMA_MAX, EDM_SIGMA_MIN',
     's_max, s_min = EDM_SIGMA_MAX, 2 * EDM_SIGMA_MIN', [T_GRIDS]),

    # --- samplers/adaptive.py -----------------------------------------------------------------
    (S + 'adaptive.py', 'calls = calls + tried * (stages - 1 if fsal else stages)',
     'calls = calls + tried * (stages if fsal else stages)', [T_LIK]),
    (S + 'adaptive.py', 'x, stats = integrate(fn, x_T, t_max, t_min, solver=solver',
     'x, stats = integrate(fn, x_T, t_min, t_max, solver=solver', [T_LIK]),
    (S + 'adaptive.py', 'solver_state = (jnp.asarray(False), f0) if fsal else None',
     'solver_state = (jnp.asarray(False), jax.tree.map(jnp.zeros_like, f0)) if fsal else None',
     [T_LIK]),
    (S + 'adaptive.py', 'x = _common.to_data(denoiser, x, jnp.asarray(t_min, x_T.dtype), cond)',
     'x = _common.to_data(denoiser, x, jnp.asarray(t_max, x_T.dtype), cond)', [T_LIK]),
    # Value-equivalent where sigma(t_min) = 0 (a velocity model's x0_hat there is x itself): it
    # costs one extra call, which the documented NFE rejects.
    (S + 'adaptive.py', "to_data = final == 'data' and not at_data", "to_data = final == 'data'",
     [T_LIK]),
    (S + 'adaptive.py', "info['trajectory_length'] = n + 1 + int(to_data)",
     "info['trajectory_length'] = n + int(to_data)", [T_LIK]),

    # --- samplers/likelihood.py ---------------------------------------------------------------
    (S + 'likelihood.py', 'return -0.5 * sq / std**2', 'return -0.5 * sq / std', [T_LIK]),
    (S + 'likelihood.py', 'jnp.log(2.0 * math.pi * jnp.asarray(std, x.dtype) ** 2)',
     'jnp.log(2.0 * math.pi * jnp.asarray(std, x.dtype))', [T_LIK]),
    (S + 'likelihood.py', "div = jnp.einsum('ibi->b', jv.reshape(d, x.shape[0], d))",
     "div = jnp.einsum('ibj->b', jv.reshape(d, x.shape[0], d))", [T_LIK]),
    (S + 'likelihood.py', 'jnp.sum((probes * jv).reshape(k, b, -1), axis=-1)',
     'jnp.sum((jv * jv).reshape(k, b, -1), axis=-1)', [T_LIK]),
    (S + 'likelihood.py', 'return prior + delta, info', 'return prior - delta, info', [T_LIK]),
    (S + 'likelihood.py', 'return lo + (hi - lo) * (x_int.astype(dtype) + u) / num_bins',
     'return lo + (hi - lo) * (x_int.astype(dtype) + u) / (num_bins - 1)', [T_LIK]),
    (S + 'likelihood.py',
     'return -logp / (num_dims * math.log(2.0)) + math.log2(num_bins / (hi - lo))',
     'return -logp / (num_dims * math.log(2.0)) + math.log2(num_bins)', [T_LIK]),

    # --- autoencoders: models/autoencoder.py, models/vq.py, autoencoder_losses.py -------------
    (AE, 'return jnp.exp(0.5 * self.logvar)', 'return jnp.exp(self.logvar)', [T_AE, T_AEL]),
    (AE, '0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=axes)',
     '0.5 * jnp.sum(jnp.square(self.mean) + self.var - self.logvar, axis=axes)', [T_AE]),
    (VQ, 'z_st = jax.lax.stop_gradient(z_q) + (z - jax.lax.stop_gradient(z))',
     'z_st = z_q + (z - jax.lax.stop_gradient(z))', [T_VQ]),
    (VQ, 'smoothed = (cluster_size + eps) / (n + k * eps) * n',
     'smoothed = cluster_size', [T_VQ]),
    (VQ, 'codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z) - z_q))',
     'codebook_loss = jnp.mean(jnp.square(z - z_q))', [T_VQ]),
    (VQ, 'perplexity = jnp.exp(jnp.sum(jax.scipy.special.entr(p)))',
     'perplexity = jnp.sum(jax.scipy.special.entr(p))', [T_VQ]),
    (AEL, 'per_example = rec + beta * kl', 'per_example = rec + kl', [T_AEL]),
    (AEL, 'return 10.0 * jnp.log10(peak_to_peak**2 / mse)',
     'return 10.0 * jnp.log10(peak_to_peak / mse)', [T_AEL]),
    (AEL, 'commitment = _sum_per_example(jnp.square(z - jax.lax.stop_gradient(e)))  # [B]',
     'commitment = _sum_per_example(jnp.square(z - e))  # [B]', [T_AEL]),
    (AE, '      z, _, _ = self.quantizer(z)', '      pass', [T_AEVQ]),
    # --- latent diffusion: latent.py, data/latents.py, the 32x32 digits ------------------------
    (LAT, 'state = vq.ema_update(state, aux[\'z\'], aux[\'indices\'], obj.codebook_decay)',
     'state = vq.ema_update(state, aux[\'z\'], aux[\'indices\'], 0.99)',
     [f'{T_LAT}::test_vq_step_updates_the_ema_codebook_as_written_by_hand']),
    (LAT, 'return z.mean if setup.kind == \'kl\' else z',
     'return z.sample(jax.random.key(0)) if setup.kind == \'kl\' else z', [T_LAT]),
    (LAT, 'return 1.0 / math.sqrt(var)', 'return 1.0 / var', [T_LAT]),
    (LATD, "out['image'] = out['image'] * np.float32(self.scale)",
     "out['image'] = out['image']", [T_LAT]),
    (LAT, "  return lambda z: setup.model.apply(variables, z, method='decode')",
     "  return lambda z: setup.model.apply(variables, z, quantize=False, method='decode') "
     "if setup.kind == 'vq' else setup.model.apply(variables, 2 * z, method='decode')",
     [T_LAT]),
    (TR, 'state = state.replace(params=params, opt_state=opt_state, model_state=model_state,',
     'state = state.replace(params=params, opt_state=opt_state,',
     [f'{T_LAT}::test_vq_step_updates_the_ema_codebook_as_written_by_hand']),
    # --- EMA kinds: EDM half-life (training.py), power-function and post-hoc EMA (ema.py) ------
    (TR, 'log_beta = -math.log(2.0) * batch_size / jnp.maximum(halflife, 1e-8)',
     'log_beta = -math.log(2.0) / jnp.maximum(halflife, 1e-8)', [T_EMA]),
    (TR, 'seen = jnp.asarray(step, jnp.float32) * batch_size',
     'seen = (jnp.asarray(step, jnp.float32) + 1) * batch_size', [T_EMA]),
    (TR, 'posthoc = posthoc_fn.update(state.posthoc_ema, params, state.step)',
     'posthoc = posthoc_fn.update(state.posthoc_ema, state.ema_params, state.step)', [T_EMA]),
    (EM, 'return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))',
     'return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 2)))', [T_EMA]),
    (EM, 'roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])',
     'roots = np.roots([1.0, 7.0, 16.0 + s, 12.0 - s])', [T_EMA]),
    (EM, 'log_beta = (gamma + 1.0) * jnp.log1p(-1.0 / t)',
     'log_beta = gamma * jnp.log1p(-1.0 / t)', [T_EMA]),
    (EM, 't = jnp.asarray(step, jnp.float32) + 1.0', 't = jnp.asarray(step, jnp.float32) + 2.0',
     [T_EMA]),
    (EM, 'gamma_longer = np.where(t_a < t_b, gamma_b, gamma_a)',
     'gamma_longer = np.where(t_a < t_b, gamma_a, gamma_b)', [T_EMA]),
    (EM, '* ratio ** gamma_longer / longer)', '* ratio ** -gamma_longer / longer)', [T_EMA]),
    (EM, 'return ((gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 1)',
     'return ((gamma_a + 1) * (gamma_b + 1) / (gamma_a + gamma_b + 2)', [T_EMA]),
    (EM, 'b = profile_inner_product(steps, gammas, float(target_step), float(target_gamma))',
     'b = profile_inner_product(steps, gammas, steps.max(), float(target_gamma))', [T_EMA]),
    (EM, 'return x / x.sum()', 'return x', [T_EMA]),
    (EM, 'total = jax.tree.map(lambda s, x: s + c * np.asarray(x, np.float64), total, tree)',
     'total = jax.tree.map(lambda s, x: s + np.asarray(x, np.float64), total, tree)', [T_EMA]),
    (DIG, 'src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0, n_in - 1)',
     'src = np.clip(np.arange(n_out) * (n_in - 1) / (n_out - 1), 0.0, n_in - 1)', [T_DIG]),
    (DIG, 'a_pinv = np.linalg.pinv(bilinear_matrix())  # [8, 32]',
     'a_pinv = bilinear_matrix().T / 4  # [8, 32]', [T_DIG]),
    # --- text: conditioning, CLIP, captions, CLIP score --------------------------------------
    (TX, 'before = jnp.cumsum(is_eos, axis=-1) - is_eos', 'before = jnp.cumsum(is_eos, axis=-1)',
     [T_TEXT + '::test_context_mask_matches_the_tokenizer']),
    (TX, 'tokens = jnp.where(drop[:, None], empty[None, :], tokens)',
     'tokens = jnp.where(drop[:, None], 0, tokens)',
     [T_TEXT + '::test_caption_dropout_gives_exactly_the_empty_prompt']),
    (TX, 'h = _EncoderBlock(self.num_heads, dtype=self.dtype, name=f\'block_{i}\')(h, mask)',
     'h = _EncoderBlock(self.num_heads, dtype=self.dtype, name=f\'block_{i}\')(h, None)',
     [T_TEXT + '::test_padding_is_not_read_and_the_caption_is']),
    (TX, 'context = jax.lax.stop_gradient(context)', 'context = context',
     [T_TEXT + '::test_frozen_encoder_gets_no_gradient_and_no_update']),
    (TR, "lambda path, _: 'frozen' if path[0].key in frozen else 'train', params)",
     "lambda path, _: 'train', params)",
     [T_TEXT + '::test_frozen_encoder_gets_no_gradient_and_no_update']),
    ('diffusion_jax/generation.py', 'den = guide(den, encode(negative))',
     'den = guide(den, encode(negative * 0))',
     [T_TEXT + '::test_guided_sampling_uses_the_negative_prompt_and_encodes_once']),
    ('diffusion_jax/metrics/clip_score.py', 'return weight * np.maximum(cos, 0.0)',
     'return weight * cos', ['tests/test_clip_score.py']),
    ('diffusion_jax/models/clip.py', "'quick_gelu': lambda z: z * jax.nn.sigmoid(1.702 * z),",
     "'quick_gelu': lambda z: z * jax.nn.sigmoid(1.0 * z),", ['tests/test_clip.py']),
    ('diffusion_jax/models/clip.py', 'causal = jnp.tril(jnp.ones((n, n), bool))',
     'causal = jnp.ones((n, n), bool)', ['tests/test_clip.py']),
    ('diffusion_jax/data/captions.py', 'slant = np.where(mu02 > 1e-12, -mu11 / mu02, np.nan)',
     'slant = np.where(mu02 > 1e-12, mu11 / mu02, np.nan)', ['tests/test_captions.py']),
    # --- control, editing, resolution: finetune, editing, LoRA, ControlNet, SR, progressive --
    (TR, 'return {**averaged, **{k: params[k] for k in frozen}}', 'return averaged',
     [T_FT + '::test_a_frozen_subtrees_average_is_the_subtree_itself']),
    ('diffusion_jax/finetune.py', "return {k: v for k, v in tree.items() if k != 'base'}",
     'return dict(tree)', [T_FT]),
    (ED, 'return expand_like(process.alpha(tb), x0) * x0 + expand_like(process.sigma(tb), x0) '
         '* eps',
     'return expand_like(process.sigma(tb), x0) * x0 + expand_like(process.alpha(tb), x0) '
     '* eps',
     [T_EDIT]),
    (ED, 'k_noise, k_sample = jax.random.split(key)', 'k_sample, k_noise = jax.random.split(key)',
     [T_EDIT]),
    (ED, 'x, info = fn(denoiser, process, x_t, k_sample, t_max=t, **sampler_kwargs)',
     'x, info = fn(denoiser, process, x_t, k_sample, t_max=1.0, **sampler_kwargs)', [T_EDIT]),
    (ED, "den_source = _maybe_guided(denoiser, source_scale, null_cond, who, 'source_scale')",
     "den_source = _maybe_guided(denoiser, target_scale, null_cond, who, 'source_scale')",
     [T_EDIT]),
    (ED, 'x, info_gen = fn(den_target, process, latent, None, steps=steps, cond=target_cond,',
     'x, info_gen = fn(den_source, process, latent, None, steps=steps, cond=target_cond,',
     [T_EDIT]),
    (ED, 't_max=t, **grid_kw, **sampler_kwargs)', 't_max=1.0, **grid_kw, **sampler_kwargs)',
     [T_EDIT]),
    (ED, "return x0, {'nfe': 0, 'denoiser_calls': 0, 't_start': 0.0}",
     "return x0 * 0.5, {'nfe': 0, 'denoiser_calls': 0, 't_start': 0.0}", [T_EDIT]),
    (S + 'grids.py',
     't = discrete_timesteps(start_step(T, t_max), n, grid) / T',
     't = discrete_timesteps(T, n, grid) / T', [T_EDIT]),
    (S + 'discrete.py',
     "t, abar_n, abar_m, _ = _pairs(process, steps, spacing, denoiser, 'ddim_sample', t_max, "
     "grid,",
     "t, abar_n, abar_m, _ = _pairs(process, steps, spacing, denoiser, 'ddim_sample', 1.0, "
     "grid,", [T_EDIT]),
    (S + 'discrete.py',
     "t, abar_n, abar_m, m = _pairs(process, steps, spacing, denoiser, 'ddpm_sample', t_max, "
     "grid,",
     "t, abar_n, abar_m, m = _pairs(process, steps, spacing, denoiser, 'ddpm_sample', 1.0, "
     "grid,", [T_EDIT]),
    (S + 'discrete.py',
     'n = discrete_timesteps(top, top if steps is None else steps, spacing)',
     'n = discrete_timesteps(process.num_steps, top if steps is None else steps, spacing)',
     [T_EDIT]),
    # LoRA (models/lora.py), the digits class subset (data/sources.py)
    (LO, 'return (config.scale * ab).reshape(kernel_shape)', 'return ab.reshape(kernel_shape)',
     [T_LO + '::test_merge_is_w_plus_scaled_ab_index_by_index']),
    (LO, 'return self.alpha / self.rank', 'return self.alpha * self.rank',
     [T_LO + '::test_merge_is_w_plus_scaled_ab_index_by_index']),
    (LO, '      n_out = len(bias_shape)', '      n_out = 1',
     [T_LO + '::test_merge_is_w_plus_scaled_ab_index_by_index']),
    (LO, 'return kernel_shape[:-n_out], kernel_shape[-n_out:]',
     'return kernel_shape[:1], kernel_shape[1:]',
     [T_LO + '::test_merge_is_w_plus_scaled_ab_index_by_index']),
    (LO, 'flat[path] = w + sign * delta(a, b, w.shape, config).astype(w.dtype)',
     'flat[path] = w - sign * delta(a, b, w.shape, config).astype(w.dtype)',
     [T_LO + '::test_merge_is_w_plus_scaled_ab_index_by_index']),
    (LO, "out[path + '/b'] = jnp.zeros((config.rank, fan_out), dtype)",
     "out[path + '/b'] = jnp.ones((config.rank, fan_out), dtype)",
     [T_LO + '::test_zero_b_and_unmerge']),
    (LO, "out[path + '/a'] = (a / np.sqrt(fan_in)).astype(dtype)",
     "out[path + '/a'] = (a * np.sqrt(fan_in)).astype(dtype)",
     [T_LO + '::test_zero_b_and_unmerge']),
    (LO, 'return _add_deltas(merged, adapters, config, -1.0)',
     'return _add_deltas(merged, adapters, config, 1.0)', [T_LO + '::test_zero_b_and_unmerge']),
    (LO, 'return y + (config.scale * h).reshape(y.shape).astype(y.dtype)',
     'return y + h.reshape(y.shape).astype(y.dtype)',
     [T_LO + '::test_merged_equals_unmerged_forward_and_zero_b_is_the_base']),
    (LO, "return merge(jax.lax.stop_gradient(params['base']), params['lora'], self.config)",
     "return merge(params['base'], params['lora'], self.config)",
     [T_LO + '::test_gradient_is_zero_on_base_and_nonzero_on_every_adapter']),
    (LO, 'return len(in_shape) + len(out_shape) == 4 and len(out_shape) == 1',
     'return len(in_shape) + len(out_shape) == 4',
     [T_LO + '::test_default_targets_are_the_attention_projections']),
    (LO, 'kept = [p for p in hits if config.convs or not _is_conv(*splits[p])]', 'kept = hits',
     [T_LO + '::test_default_targets_are_the_attention_projections']),
    (LO, '    digest.update(w.tobytes())', '    pass',
     [T_LO + '::test_save_load_and_adapters_for_another_base']),
    ('diffusion_jax/data/sources.py', '      keep = np.isin(y, cfg.classes)',
     '      keep = ~np.isin(y, cfg.classes)', [T_LO + '::test_digits_class_subset']),
    # ControlNet (models/controlnet.py, the U-Net's residual inputs, data/control.py)
    (CN, 'residuals = [r * strength.astype(r.dtype)[:, None, None, None] for r in residuals]',
     'residuals = [r for r in residuals]', [T_CN]),
    (CN, 'return [_conv(f.shape[-1], 1, dtype, name, zero_init=True)(f)',
     'return [_conv(f.shape[-1], 1, dtype, name, zero_init=False)(f)', [T_CN]),
    (CN, "return _conv(self.features, 3, self.dtype, 'conv_out', zero_init=True)(h)",
     "return _conv(self.features, 3, self.dtype, 'conv_out', zero_init=False)(h)", [T_CN]),
    (CN, "base_cls = nn.map_variables(unet.UNet, 'params', trans_in_fn=_stop_gradient, "
         "init=True)",
     "base_cls = nn.map_variables(unet.UNet, 'params', trans_in_fn=lambda v: v, init=True)",
     [T_CN]),
    (CN, 'feats = self.encoder(x, t, cond, train=train, hint=hint)',
     'feats = self.encoder(x, t, None, train=train, hint=hint)', [T_CN]),
    (CN, 'new_copy = {k: base_params[k] for k in copy}', 'new_copy = {k: copy[k] for k in copy}',
     [T_CN]),
    (UN, 'h = h + residuals[-1].astype(dtype)', 'h = h + residuals[-2].astype(dtype)', [T_CN]),
    (UN, 'skips = [s + r.astype(dtype) for s, r in zip(skips, residuals[:-1], strict=True)]',
     'skips = [s + r.astype(dtype) for s, r in zip(skips, residuals[-2::-1], strict=True)]',
     [T_CN]),
    (UN, 'h = h + hint.astype(dtype)', 'h = h - hint.astype(dtype)', [T_CN]),
    (DC, '[-2.0, 0.0, 2.0]', '[-1.0, 0.0, 1.0]', [T_CN]),
    (DC, 'SOBEL_Y = SOBEL_X.T', 'SOBEL_Y = SOBEL_X', [T_CN]),
    (DC, 'STEP_MAGNITUDE = 4.0', 'STEP_MAGNITUDE = 3.0', [T_CN]),
    (DC, "padded = np.pad(u, ((0, 0), (1, 1), (1, 1)), mode='edge')",
     "padded = np.pad(u, ((0, 0), (1, 1), (1, 1)), mode='constant')", [T_CN]),
    (DC, 'magnitude = (magnitude > threshold).astype(np.float32)',
     'magnitude = (magnitude >= threshold).astype(np.float32)', [T_CN]),
    (DC, 'iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)',
     'iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)', [T_CN]),
    (DC, 'l1 = np.abs(maps - conds).reshape(len(maps), -1).mean(axis=1)',
     'l1 = np.abs(maps - conds).reshape(len(maps), -1).sum(axis=1)', [T_CN]),
    # super-resolution (models/superres.py, generation.py prepare_cond)
    (SR, 'return process.alpha(s) * low_res + process.sigma(s) * eps',
     'return process.sigma(s) * low_res + process.alpha(s) * eps',
     [T_SR]),
    (SR, 'return processes.VPCosine(logsnr_min=-math.inf, logsnr_max=math.inf)',
     'return processes.VPCosine(logsnr_min=-math.inf, logsnr_max=15.0)',
     [T_SR]),
    (SR, 'level = jax.random.uniform(key_s, (b,), jnp.float32, 0.0, self.aug_max)',
     'level = jax.random.uniform(key_s, (b,), jnp.float32, 0.0, 1.0)',
     [T_SR]),
    (SR, 'inputs[1] = upsample_condition(augment_condition(low_res, level, eps).astype(x.dtype),',
     'inputs[1] = upsample_condition(augment_condition(low_res, level, 0 * eps).astype(x.dtype),',
     [T_SR]),
    (SR, 'level = jnp.broadcast_to(jnp.asarray(level, x.dtype), (b,))',
     'level = jnp.broadcast_to(jnp.asarray(self.aug_max, x.dtype), (b,))',
     [T_SR]),
    (SR, 's = jnp.full(low_res.shape[:1], self.sample_aug_level, jnp.float32)',
     's = jnp.full(low_res.shape[:1], self.aug_max, jnp.float32)',
     [T_SR]),
    (SR, 'return jax.image.resize(low_res, (b, factor * h, factor * w, c), method)',
     "return jax.image.resize(low_res, (b, factor * h, factor * w, c), 'bilinear')",
     [T_SR]),
    (SR, 'return images.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))',
     'return images.reshape(n, factor, h // factor, factor, w // factor, c).mean(axis=(1, 3))',
     [T_SR]),
    (SR, 'if (low_res.ndim != 4 or low_res.shape[0] != b or low_res.shape[1] * f != h',
     'if (low_res.ndim != 4 or low_res.shape[0] != b or low_res.shape[1] != h',
     [T_SR]),
    (SR, 'per_sample = np.sqrt(np.sum(diff.reshape(len(diff), -1) ** 2, axis=1))',
     'per_sample = np.sum(diff.reshape(len(diff), -1) ** 2, axis=1)',
     [T_SR]),
    (SR, "h = jnp.concatenate(inputs, axis=-1)  # [B, H, W, C + C' (+ 1)]",
     "h = jnp.concatenate(inputs[::-1], axis=-1)  # [B, H, W, C + C' (+ 1)]",
     [T_SR]),
    (GEN, 'cond = prepare(cond, jax.random.fold_in(key, 1))',
     'cond = prepare(cond, jax.random.fold_in(key, 0))',
     [T_SR]),
    # progressive training (progressive.py)
    (PG, '    if start > step:', '    if start >= step:', [T_PG]),
    (PG, '  return x.mean(axis=(-4, -2), dtype=np.float32)',
     '  return x.max(axis=(-4, -2))',
     [T_PG]),
    (PG, 'self.factor_at(position // self.global_batch)',
     'self.factor_at(position // len(self.source))',
     [T_PG]),
    (PG, '    return self.image_shape[0] // resolution_at(self.schedule, step)',
     '    return self.image_shape[0] // resolution_at(self.schedule, step + 1)',
     [T_PG]),
    (PG, 'any(s == step for s, _ in schedule)', 'any(s == step + 1 for s, _ in schedule)', [T_PG]),
    # audio (issue 23): features, metrics, WAV files, the synthetic corpus and TFDS audio,
    # WaveGrad, its schedules and the mel condition
    (AF, 'left = (n_fft - hop) // 2', 'left = (n_fft - hop + 1) // 2', [T_AF]),
    (AF, '* (2.0 / (hi - lo))', '* (1.0 / (hi - lo))', [T_AF]),
    (AF, 'np.log10(1.0 + np.asarray(f, np.float64) / 700.0)',
     'np.log10(1.0 + np.asarray(f, np.float64) / 1000.0)', [T_AF]),
    (AF, 'np.where(k == 0, np.sqrt(1.0 / num_mels)', 'np.where(k == 0, np.sqrt(2.0 / num_mels)',
     [T_AF]),
    (AF, '0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)',
     '0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / (n_fft - 1))', [T_AF]),
    (AM, 'log_mel_numpy(x, cfg), n_mfcc)[..., 1:]', 'log_mel_numpy(x, cfg), n_mfcc)[..., 0:]',
     [T_AF]),
    (AM, 'sc = np.sqrt(np.sum((my - mx) ** 2, axis=(1, 2))) / norm_y',
     'sc = np.sqrt(np.sum((my - mx) ** 2, axis=(1, 2))) / np.sqrt(np.sum(mx ** 2, axis=(1, 2)))',
     [T_AF]),
    (AM, 'px = 10.0 * np.log10(', 'px = 20.0 * np.log10(', [T_AF]),
    (AIO, 'PCM_SCALE = 32767.0', 'PCM_SCALE = 32768.0', [T_AF]),
    (AD, 'vowels[:, 0] = labels', 'vowels[:, 1] = labels', [T_AD]),
    (AD, 'if clipped > _CLIPPED_FRACTION:', 'if clipped >= _CLIPPED_FRACTION:', [T_AD]),
    (AD, 'key=[split_id, 1 + int(take)]', 'key=[split_id, 1]', [T_AD]),
    (TA, 'start = (n - length) // 2', 'start = (n - length + 1) // 2', [T_AD]),
    (TA, 'left = (length - n) // 2', 'left = 0', [T_AD]),
    (TA, 'x = x.astype(np.float32) / 32768.0', 'x = x.astype(np.float32) / 32767.0', [T_AD]),
    (WG, 'layers.timestep_embedding(scale * noise.astype(jnp.float32), dim)',
     'layers.timestep_embedding(noise.astype(jnp.float32), dim)', [T_WG]),
    (WG, 'film = lambda h: scale * h + shift', 'film = lambda h: scale * (h + shift)', [T_WG]),
    (WG, 'h = conv(3)(_lrelu(film(h)))', 'h = conv(3)(_lrelu(h))', [T_WG]),
    (WG, 'return h.reshape(b, n // factor, factor, c).mean(axis=2)',
     'return h.reshape(b, n // factor, factor, c)[:, :, 0]', [T_WG]),
    (WG, 'g = g + pe[:, None, :].astype(g.dtype)', 'g = g + 0 * pe[:, None, :].astype(g.dtype)',
     [T_WG]),
    (WG, '_SLOPE = 0.2', '_SLOPE = 0.1', [T_WG]),
    (WG, 'dilations: tuple[int, ...] = (1, 2, 4, 8)', 'dilations: tuple[int, ...] = (1, 2, 4, 4)',
     [T_WG]),
    (ASC, 'lam = np.log(abar) - np.log1p(-abar)', 'lam = np.log(abar) - np.log(abar)', [T_ASC]),
    (ASC, 'return np.cumprod(1.0 - check_betas(betas))', 'return np.cumprod(check_betas(betas))',
     [T_ASC]),
    (ASC, 'abar = alphas_cumprod(betas)[::-1]', 'abar = alphas_cumprod(betas)', [T_ASC]),
    (ACO, 'model = model.clone(noise_level=process.alpha)',
     'model = model.clone(noise_level=process.sigma)', [T_ARUN]),
    (ACO, 'idx = np.arange(num) % len(take0)', 'idx = np.arange(num) % len(take0) + 1', [T_ARUN]),
    ('diffusion_jax/samplers/grids.py', '  t = np.asarray(t, np.float64).astype(dtype)\n',
     '  t = np.asarray(t, np.float64)[::-1].astype(dtype)\n', [T_GRIDS]),
    # Issue 24: the few-step 'auto' grid, lower-order final steps, the flow refusal, the
    # stop-short warning; iPNDM (its own reference-loop and convergence tests).
    (S + 'defaults.py', 'AUTO_JUMP_LOG_SNR = -4.0',
     'AUTO_JUMP_LOG_SNR = -5.0', ['tests/test_low_nfe.py']),
    (S + 'defaults.py', 'AUTO_END_OFFSET, AUTO_END_SLOPE = 1.5, 0.4',
     'AUTO_END_OFFSET, AUTO_END_SLOPE = 1.5, 0.5', ['tests/test_low_nfe.py']),
    (S + 'defaults.py', 'return np.concatenate([[lam_start], np.linspace(lam_a, lam_end, n - 1)])',
     'return np.linspace(lam_start, lam_end, n)', ['tests/test_low_nfe.py']),
    (S + 'dpm_solver.py', '  p = np.minimum(order, i + 1)\n', '  p = np.full(n, order)\n',
     ['tests/test_low_nfe.py']),
    (S + 'dpm_solver.py', 'return np.minimum(p, n - i) if lower_order_final else p',
     'return np.minimum(p, n - i + 1) if lower_order_final else p', ['tests/test_low_nfe.py']),
    (S + 'ode.py', "if hasattr(process, 'num_steps'):",
     "if hasattr(process, 'num_stepz'):", ['tests/test_low_nfe.py']),
    (S + '_common.py', 'if float(g.t[-1]) > lo + 1e-6 * max(lo, 1e-3):',
     'if float(g.t[-1]) > lo + 1.0:', ['tests/test_low_nfe.py']),
    (S + 'ipndm.py', '    4: (55.0 / 24.0, -59.0 / 24.0, 37.0 / 24.0, -9.0 / 24.0),',
     '    4: (55.0 / 24.0, -59.0 / 24.0, -37.0 / 24.0, -9.0 / 24.0),', [T_IPNDM]),
    (S + 'ipndm.py', '    3: (23.0 / 12.0, -16.0 / 12.0, 5.0 / 12.0),',
     '    3: (23.0 / 12.0, 16.0 / 12.0, 5.0 / 12.0),', [T_IPNDM]),
    (S + 'ipndm.py', '    2: (3.0 / 2.0, -1.0 / 2.0),',
     '    2: (3.0 / 2.0, 1.0 / 2.0),', [T_IPNDM]),
    (S + 'ipndm.py', '    h = s[i + 1] - s[i]\n',
     '    h = s[i] - s[i - 1] if i else s[i + 1] - s[i]\n', [T_IPNDM]),
    (S + 'ipndm.py', '  w_x = jnp.asarray(alpha[1:, None] * w, dtype)',
     '  w_x = jnp.asarray(alpha[:-1, None] * w, dtype)', [T_IPNDM]),
    (S + 'ipndm.py', '  a = jnp.asarray(alpha[1:] / alpha[:-1], dtype)',
     '  a = jnp.asarray(np.ones_like(alpha[1:]), dtype)', [T_IPNDM]),
    (S + 'ipndm.py', '      c = variable_ab_weights([(s[i - j] - s[i]) / h for j in range(p)])',
     '      c = variable_ab_weights([(s[i] - s[i - j]) / h for j in range(p)])', [T_IPNDM]),
    (S + 'ipndm.py', '  return np.linalg.solve(vander, 1.0 / (k + 1.0))',
     '  return np.linalg.solve(vander, 1.0 / (k + 2.0))', [T_IPNDM]),
    (S + 'ipndm.py', 'order, return_trajectory, prediction=1)',
     'order, return_trajectory, prediction=0)', [T_IPNDM]),
    (S + 'dpm_solver.py', '    new_hist = jnp.stack(ms[:order - 1]) if order > 1 else hist',
     '    new_hist = jnp.stack(ms[1:order]) if order > 1 else hist', [T_IPNDM, T_DPM]),
    (S + 'ipndm.py', "    if variant == 'fixed':\n      c = np.asarray",
     "    if variant == 'nope':\n      c = np.asarray", [T_IPNDM]),
]


# Issue 24, Heun's and DPM-Solver-3's few-step defaults (helper H, 12 of 12 killed).
T_H = ['tests/test_low_nfe.py']
MUTATIONS += [
    (S + 'defaults.py', 'HEUN_JUMP_LOG_SNR = -3.0', 'HEUN_JUMP_LOG_SNR = -2.0', T_H),
    (S + 'defaults.py', 'HEUN_END_OFFSET, HEUN_END_SLOPE = -2.0, 1.0',
     'HEUN_END_OFFSET, HEUN_END_SLOPE = -1.0, 1.0', T_H),
    (S + 'defaults.py', 'HEUN_SHORT_JUMP_STEPS, HEUN_SHORT_JUMP_LOG_SNR = 15, -4.0',
     'HEUN_SHORT_JUMP_STEPS, HEUN_SHORT_JUMP_LOG_SNR = 15, -5.0', T_H),
    (S + 'defaults.py',
     'jump = HEUN_JUMP_LOG_SNR if steps < HEUN_SHORT_JUMP_STEPS else HEUN_SHORT_JUMP_LOG_SNR',
     'jump = HEUN_JUMP_LOG_SNR', T_H),
    (S + 'defaults.py', 'DPM3_DDIM_JUMP_MAX_STEPS = 3', 'DPM3_DDIM_JUMP_MAX_STEPS = 4', T_H),
    (S + 'defaults.py', 'return bool(lam[0] < jump and lam[1] == jump)', 'return False', T_H),
    (S + 'ode.py', 'euler = np.arange(n - 1) < int(first_euler)',
     'euler = np.arange(n - 1) <= int(first_euler)', T_H),
    (S + 'ode.py', 'return jax.lax.cond(euler, lambda _: alpha_next * y_euler, corrected, None)',
     'return jax.lax.cond(euler, corrected, lambda _: alpha_next * y_euler, None)', T_H),
    (S + 'ode.py', 'calls = 2 * (n - 1) - int(first_euler)', 'calls = 2 * (n - 1)', T_H),
    (S + 'ode.py', "if final == 'data' and steps < defaults.AUTO_MAX_STEPS else 'karras')",
     "if final == 'data' else 'karras')", T_H),
    (S + 'dpm_solver.py', 'return jax.lax.cond(first_order, lambda: A * x + B * eps_s,',
     'return jax.lax.cond(first_order, lambda: A * x - B * eps_s,', T_H),
    (S + 'dpm_solver.py', 'calls = order * (t.shape[0] - 1) - (order - 1) * int(first_ddim)',
     'calls = order * (t.shape[0] - 1) - order * int(first_ddim)', T_H),
]

# Issue 22, the few-step methods (diffusion_jax/distill, samplers/flow_map.py, the models'
# second time input); each helper checked its own on a private copy, all killed.
PD, RF = 'diffusion_jax/distill/progressive.py', 'diffusion_jax/distill/reflow.py'
T_PD, T_RF = 'tests/test_distill_progressive.py', 'tests/test_distill_reflow.py'

MUTATIONS += [
    # progressive: Alg. 2's times and DDIM steps
    (PD, 't, t1, t2 = fine[2 * i], fine[2 * i - 1], fine[2 * i - 2]',
     't, t1, t2 = fine[2 * i], fine[2 * i - 1], fine[2 * i - 1]', [T_PD]),
    (PD, 't, t1, t2 = fine[2 * i], fine[2 * i - 1], fine[2 * i - 2]',
     't, t1, t2 = fine[2 * i], fine[2 * i - 2], fine[2 * i - 2]', [T_PD]),
    (PD, '  s = (s_min ** (1 / rho) + u * (s_max ** (1 / rho) - s_min ** (1 / rho))) ** rho',
     '  s = (s_min ** (1 / rho) + u * (s_max ** (1 / rho) - s_min ** (1 / rho))) ** (rho - 1)',
     [T_PD]),
    (PD, '    t = coarse.astype(x0.dtype)[i - 1]', '    t = coarse.astype(x0.dtype)[i - 1] * 0.99',
     [T_PD]),
    (PD, 'z1 = expand_like(a1, z_t) * x0 + expand_like(s1, z_t) * eps',
     'z1 = expand_like(a1, z_t) * x0 + expand_like(s1, z_t) * eps * 0.9', [T_PD]),
    (PD, '  x0, eps = teacher(z1, t1, cond)', '  x0, eps = teacher(z1, t, cond)', [T_PD]),
    (PD, 'ratio = s2 / sigma', 'ratio = s2 / sigma / alpha', [T_PD]),
    (PD, 'return (z2 - expand_like(ratio, z_t) * z_t) / expand_like(a2 - ratio * alpha, z_t)',
     'return (z2 - expand_like(ratio, z_t) * z_t) / expand_like(a2 + ratio * alpha, z_t)',
     [T_PD]),
    # the last step (i = 1) goes to the data, not to the process's t = 0
    (PD, 'to_data = i <= 1.0', 'to_data = i < 1.0', [T_PD]),
    (PD, 'a2, s2 = jnp.where(to_data, 1.0, a2), jnp.where(to_data, 0.0, s2)',
     'a2, s2 = jnp.where(to_data, 1.0, a2), s2', [T_PD]),
    # weighting, v-conversion, stop_gradient, t grid
    (PD, 'return jnp.maximum(snr, 1.0) if weighting', 'return jnp.minimum(snr, 1.0) if weighting',
     [T_PD]),
    (PD, "else snr + 1.0", "else snr + 0.5", [T_PD]),
    (PD, "x_hat, _ = param.to_x0_eps(kind, out, z_t, process, t, sigma_data)",
     "_, x_hat = param.to_x0_eps(kind, out, z_t, process, t, sigma_data)", [T_PD]),
    (PD, 'x_tilde = jax.lax.stop_gradient(two_step_target(',
     'x_tilde = (two_step_target(', [T_PD]),
    (PD, 'i = jax.random.randint(key_i, (x0.shape[0],), 1, n_steps + 1)',
     'i = jax.random.randint(key_i, (x0.shape[0],), 1, n_steps)', [T_PD]),
    (PD, "return ('ddim' if _is_discrete(process) else 'euler'), {'grid': times}",
     "return ('ddim' if _is_discrete(process) else 'flow_euler'), {'grid': times}", [T_PD]),
    (PD, 'np.arange(steps, 0, -1, dtype=np.float64) / steps, grid)',
     'np.arange(steps, 0, -1, dtype=np.float64) / steps * (1 - 0.5 / steps), grid)', [T_PD]),
    # reflow: coupling, interpolant, target, t law, stop_gradient
    (RF, 'return jax.lax.stop_gradient(teacher(x_t, t, cond))', 'return teacher(x_t, t, cond)',
     [T_RF]),
    (RF, 'x_t = process.marginal(x0_hat, z, t)', 'x_t = process.marginal(z, x0_hat, t)', [T_RF]),
    (RF, "tgt = param.target('velocity', x0_hat, z, process, t)",
     "tgt = param.target('velocity', z, x0_hat, process, t)", [T_RF]),
    (RF, 'z = jax.random.normal(key_z, x0.shape, x0.dtype)                  #',
     'z = jax.random.normal(key_t, x0.shape, x0.dtype)                  #', [T_RF]),
    (RF, 'return jnp.ones((batch,), dtype)', 'return jnp.full((batch,), 0.99, dtype)', [T_RF]),
    (RF, 'return jax.random.uniform(key, (batch,), dtype)',
     'return jax.random.uniform(key, (batch,), dtype) ** 2', [T_RF]),
    (RF, 'x0_hat = reflow_coupling(teacher, teacher_process, z,',
     'x0_hat = 0.999 * reflow_coupling(teacher, teacher_process, z,', [T_RF]),
    (RF, 'x0, _ = solve(_frozen(param.as_denoiser(teacher)), process, process.prior_std * z,',
     'x0, _ = solve(_frozen(param.as_denoiser(teacher)), process, z,', [T_RF]),
]

_M = 'diffusion_jax/distill/trigflow.py'
_P = 'diffusion_jax/processes_continuous.py'
_T = ['tests/test_distill_trigflow.py']

MUTATIONS += [
    # the tangent df/dtau = -cos (sd F - dx/dtau) - r sin (x + sd dF/dtau)
    (_M, '-cos * (sigma_data * f_minus - dx_dtau)', '-cos * (sigma_data * f_minus + dx_dtau)', _T),
    (_M, 'r * sin * (x_tau + sigma_data * d_f)', 'r * sin * (x_tau - sigma_data * d_f)', _T),
    (_M, 'r * sin * (x_tau + sigma_data * d_f)', 'r * sin * (x_tau + d_f)', _T),
    (_M, '(dx_dtau, jnp.ones_like(tau))', '(dx_dtau, jnp.zeros_like(tau))', _T),
    (_M, '(dx_dtau, jnp.ones_like(tau))', '(jnp.zeros_like(dx_dtau), jnp.ones_like(tau))', _T),
    # g = cos(tau) df/dtau, normalised, under stop_gradient
    (_M, 'normalize_tangent(cos * df_dtau, tangent_c)',
     'normalize_tangent(sin * df_dtau, tangent_c)', _T),
    (_M, 'g = jax.lax.stop_gradient(normalize_tangent(cos * df_dtau, tangent_c))',
     'g = normalize_tangent(cos * df_dtau, tangent_c)', _T),
    (_M, 'f_minus = jax.lax.stop_gradient(f_minus)', 'f_minus = f_minus', _T),
    # (Dropping the stop_gradient on dx_dtau is an equivalent mutant: dx_dtau enters only g,
    # which is stop-gradiented as a whole; not listed.)
    (_M, 'jnp.square(out - f_minus - g)', 'jnp.square(out - f_minus + g)', _T),
    (_M, 'return g / expand_like(_norm(g) + c, g)',
     'return g / expand_like(_norm(g) ** 2 + c, g)', _T),
    (_M, 'jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)',
     'jnp.maximum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)', _T),
    # adaptive weighting e^w / D ||.||² - w
    (_M, 'per_example = jnp.exp(w) / dim * sq - w', 'per_example = jnp.exp(w) / dim * sq + w', _T),
    (_M, 'per_example = jnp.exp(w) / dim * sq - w', 'per_example = jnp.exp(w) * sq - w', _T),
    (_M, 'per_example = jnp.exp(w) / dim * sq - w', 'per_example = jnp.exp(-w) / dim * sq - w', _T),
    # proposal, sCT velocity, teacher velocity and its conversion
    (_M, 'jnp.arctan(jnp.exp(s) / sd)', 'jnp.arctan(jnp.exp(s) * sd)', _T),
    (_M, 'expand_like(jnp.cos(tau), x0) * z - expand_like(jnp.sin(tau), x0) * x0',
     'expand_like(jnp.cos(tau), x0) * z + expand_like(jnp.sin(tau), x0) * x0', _T),
    (_M, 'return cos * sd * eps - sin * x0', 'return cos * eps - sin * x0', _T),
    (_M, "jnp.log(jnp.sin(tau)) - math.log(sd))", "jnp.log(jnp.sin(tau)) + math.log(sd))", _T),
    (_M, 'scale = jnp.where(cos >= sin, alpha / cos, sigma / (sd * sin))',
     'scale = jnp.where(cos >= sin, alpha / cos, sigma / sin)', _T),
    (_M, 'return (float(np.arctan(np.exp(-0.5 * lam_hi) / sd)),',
     'return (float(np.arctan(np.exp(-0.5 * lam_lo) / sd)),', _T),
    # the kind
    (_M, 'return cos * eps - sin * x0 / process.sigma_data', 'return cos * eps - sin * x0', _T),
    (_M, 'return cos * x_t - sin * sd * out, sin * x_t / sd + cos * out',
     'return cos * x_t - sin * sd * out, sin * x_t + cos * out', _T),
    (_M, 'return cos * x_t - sin * sd * out, sin * x_t / sd + cos * out',
     'return cos * x_t - sin * out, sin * x_t / sd + cos * out', _T),
    (_M, 'out = model_fn(x_t / sd, t, cond)', 'out = model_fn(x_t, t, cond)', _T),
    (_M, 'return split_output(model_fn(x_tau / sigma_data, t_of_tau(tau), cond))',
     'return split_output(model_fn(x_tau, t_of_tau(tau), cond))', _T),
    (_M, 'return tau / (0.5 * math.pi)', 'return tau / math.pi', _T),
    (_M, "MIDDLE_TAU = 1.1", "MIDDLE_TAU = 1.0", _T),
    (_M, 'eps = (x_t - cos * x0) / (sin * sd)', 'eps = (x_t - cos * x0) / sin', _T),
    (_M, 'return param.Denoiser(fn, kind=KIND, sigma_min=0.0)',
     'return param.Denoiser(fn, kind=KIND)', _T),
    # the process
    (_P, 'return self.sigma_data * xp.sin(0.5 * math.pi * t)',
     'return xp.sin(0.5 * math.pi * t)', _T),
    (_P, 'x = lam + 2.0 * math.log(self.sigma_data)',
     'x = lam - 2.0 * math.log(self.sigma_data)', _T),
    (_P, 'return xp.sin(0.5 * math.pi * (1.0 - t))', 'return xp.cos(0.5 * math.pi * t)', _T),
]

MF, SC = 'diffusion_jax/distill/meanflow.py', 'diffusion_jax/distill/shortcut.py'
FM, PA = 'diffusion_jax/samplers/flow_map.py', 'diffusion_jax/parameterization.py'
LA, ML = 'diffusion_jax/models/layers.py', 'diffusion_jax/models/mlp.py'
UN = 'diffusion_jax/models/unet.py'
T_MF, T_SC = 'tests/test_distill_meanflow.py', 'tests/test_distill_shortcut.py'

MUTATIONS += [
    # MeanFlow target (Eq. 8-10)
    (MF, 'u_tgt = v - param.expand_like(t - r, z) * dudt',
     'u_tgt = v + param.expand_like(t - r, z) * dudt', [T_MF]),
    (MF, '(v, jnp.zeros_like(r), jnp.ones_like(t))', '(v, jnp.ones_like(r), jnp.ones_like(t))',
     [T_MF]),
    (MF, '(v, jnp.zeros_like(r), jnp.ones_like(t))',
     '(jnp.zeros_like(v), jnp.zeros_like(r), jnp.ones_like(t))', [T_MF]),
    (MF, 'return u, jax.lax.stop_gradient(u_tgt)', 'return u, u_tgt', [T_MF]),
    (MF, 'return model_fn(z, t, layers.with_delta(cond, t - r))',
     'return model_fn(z, t, layers.with_delta(cond, r))', [T_MF]),
    # MeanFlow loss (Alg. 1, §4.3)
    (MF, 'z = (1.0 - tb) * x0 + tb * eps', 'z = tb * x0 + (1.0 - tb) * eps', [T_MF]),
    (MF, '  v = eps - x0\n', '  v = x0 - eps\n', [T_MF]),
    (MF, 'return jax.lax.stop_gradient(1.0 / (sq_norm + c) ** p)',
     'return 1.0 / (sq_norm + c) ** p',
     [T_MF]),
    (MF, 'sq_norm = jnp.sum(delta**2, axis=-1)', 'sq_norm = jnp.mean(delta**2, axis=-1)', [T_MF]),
    (MF, 'keep = jax.random.uniform(k_ratio, (batch,), dtype) < ratio',
     'keep = jax.random.uniform(k_ratio, (batch,), dtype) > ratio', [T_MF]),
    (MF, 't, r = jnp.maximum(a, b), jnp.minimum(a, b)',
     'r, t = jnp.maximum(a, b), jnp.minimum(a, b)',
     [T_MF]),
    # MeanFlow flow map (Eq. 12) and the sampler
    (MF, 'return x_t - param.expand_like(t - s, x_t) * average_velocity',
     'return x_t + param.expand_like(t - s, x_t) * average_velocity', [T_MF]),
    (MF, 'average_velocity(model_fn, x_t, s, t, cond)',
     'average_velocity(model_fn, x_t, 0 * s, t, cond)',
     [T_MF]),
    (FM, 'return flow_map.jump(x, t_i, t_next, cond)',
     'return flow_map.jump(x, t_i, 0 * t_next, cond)',
     [T_MF, T_SC]),
    (FM, "info = {'nfe': int(steps) * int(flow_map.evals_per_call)",
     "info = {'nfe': int(steps + 1) * int(flow_map.evals_per_call)", [T_MF, T_SC]),
    (PA, '  if isinstance(denoiser, FlowMap):\n    raise', '  if False:\n    raise', [T_MF]),
    # The delta input
    (LA, '  if delta is not None and not delta_input:', '  if False:', [T_MF]),
    (ML, '    if self.delta_input:\n      demb', '    if False:\n      demb', [T_MF]),
    # Survives the default suite (a U-Net forward is too slow for it); killed by the slow
    # tests/test_distill_meanflow.py::test_delta_input_unet (-m slow).
    (UN, "temb = temb + nn.Dense(4 * self.ch, dtype=dtype, kernel_init=dense_init,\n"
         "                             name='delta_dense_1')",
     "temb = temb + 0 * nn.Dense(4 * self.ch, dtype=dtype, kernel_init=dense_init,\n"
     "                             name='delta_dense_1')", [T_MF]),
    (ML, "temb = temb + nn.Dense(self.hidden, dtype=dtype, kernel_init=kernel_init,",
     "temb = temb + 0 * nn.Dense(self.hidden, dtype=dtype, kernel_init=kernel_init,", [T_MF]),
    # Shortcut self-consistency (Eq. 4) and loss (Alg. 1)
    (SC, 'x_mid = x_t - param.expand_like(d, x_t) * s_first',
     'x_mid = x_t + param.expand_like(d, x_t) * s_first', [T_SC]),
    (SC, 's_second = shortcut_velocity(model_fn, x_mid, t - d, d_query, cond)',
     's_second = shortcut_velocity(model_fn, x_mid, t, d_query, cond)', [T_SC]),
    (SC, 'x_mid, t - d, d_query, cond)', 'x_mid, t - d, d, cond)', [T_SC]),
    (SC, 'return jax.lax.stop_gradient((s_first + s_second) / 2.0)',
     'return (s_first + s_second) / 2.0', [T_SC]),
    (SC, 'd_in = jnp.concatenate([2.0 * d_sc,', 'd_in = jnp.concatenate([d_sc,', [T_SC]),
    (SC, '  target = eps - x0\n', '  target = x0 - eps\n', [T_SC]),
    (SC, 't = jnp.minimum(j, n_steps) * 2.0 * d', 't = jnp.minimum(j, n_steps) * d', [T_SC]),
    (SC, 'jnp.right_shift(max_steps, k + 1)', 'jnp.right_shift(max_steps, k)', [T_SC]),
    (SC, 'jnp.where(k == 0, 0.0, d)', 'jnp.where(k < 0, 0.0, d)', [T_SC]),
    (SC, 'x_t = (1.0 - tb) * x0 + tb * eps', 'x_t = tb * x0 + (1.0 - tb) * eps', [T_SC]),
    (SC, 'return x_t - param.expand_like(d, x_t) * shortcut_velocity',
     'return x_t + param.expand_like(d, x_t) * shortcut_velocity', [T_SC]),
]

DMD, T_DMD = 'diffusion_jax/distill/dmd.py', 'tests/test_distill_dmd.py'

MUTATIONS += [
    # DMD's gradient (Eq. 7) and weighting (Eq. 8)
    (DMD, 'return (mu_fake - mu_real) / norm', 'return (mu_real - mu_fake) / norm', [T_DMD]),
    (DMD, 'jnp.mean(jnp.abs(mu_real - x), axis=axes', 'jnp.mean(jnp.abs(mu_fake - x), axis=axes',
     [T_DMD]),
    (DMD, 'jnp.mean(jnp.abs(mu_real - x), axis=axes', 'jnp.sum(jnp.abs(mu_real - x), axis=axes',
     [T_DMD]),
    # the surrogate 0.5 ||x - sg(x - grad)||²
    (DMD, 'target = jax.lax.stop_gradient(x - grad)', 'target = jax.lax.stop_gradient(x + grad)',
     [T_DMD]),
    (DMD, 'target = jax.lax.stop_gradient(x - grad)', 'target = x - grad', [T_DMD]),
    (DMD, 'return 0.5 * jnp.mean(jnp.square(x - target)', 'return jnp.mean(jnp.square(x - target)',
     [T_DMD]),
    # the DM time and the noised sample
    (DMD, 'x_t = jax.lax.stop_gradient(process.marginal(x, eps, t))',
     'x_t = jax.lax.stop_gradient(process.marginal(x, eps, t_in))', [T_DMD]),
    (DMD, "dm_time = 'karras' if _unit_alpha(process) else 'uniform'",
     "dm_time = 'uniform' if _unit_alpha(process) else 'karras'", [T_DMD]),
    (DMD, '  rho = 7.0\n', '  rho = 3.0\n', [T_DMD]),
    # gradient separation
    (DMD, '_, fake_aux = fake_objective.loss(fake, jax.lax.stop_gradient(x), k_fake, cond)',
     '_, fake_aux = fake_objective.loss(fake, x, k_fake, cond)', [T_DMD]),
    (DMD, '+ fake_weight * l_fake + discriminator_weight', '+ l_fake + discriminator_weight',
     [T_DMD]),
    # two time-scale update rule
    (DMD, 'gen_step = (jnp.asarray(step) % period == 0)',
     'gen_step = (jnp.asarray(step) % period != 0)', [T_DMD]),
    (DMD, 'period = int(fake_updates) + 1', 'period = int(fake_updates) + 2', [T_DMD]),
    (DMD, 'return jax.lax.cond(nonzero, lambda _: inner.update',
     'return jax.lax.cond(True, lambda _: inner.update', [T_DMD]),
    # regression loss (DMD Eq. 9, MSE)
    (DMD, 'l_reg = jnp.mean(jnp.square(x - y)', 'l_reg = jnp.mean(jnp.abs(x - y)', [T_DMD]),
    # few-step times and backward simulation (DMD2 §4.5)
    (DMD, '  u = t_max * (int(steps) - np.arange(int(steps))) / int(steps)',
     '  u = t_max * (int(steps) - np.arange(int(steps)) - 1) / int(steps)', [T_DMD]),
    (DMD, "    return progressive.grid_times(process, u, 'karras')",
     "    return progressive.grid_times(process, u, 'uniform')", [T_DMD]),
    (DMD, 'x0 = jax.lax.stop_gradient(gen_x0(x, times[i - 1]))',
     'x0 = jax.lax.stop_gradient(gen_x0(x, times[i]))', [T_DMD]),
    (DMD, 'x_in = inputs[i, jnp.arange(batch)]', 'x_in = inputs[0 * i, jnp.arange(batch)]',
     [T_DMD]),
    # DMD2's GAN term (non-saturating, separate discriminator)
    (DMD, 'l_gan = f_fake - f_fake_sg + jax.lax.stop_gradient(f_fake_sg)', 'l_gan = f_fake',
     [T_DMD]),
    (DMD, 'f_fake, f_fake_sg = jax.nn.softplus(-logit(x_t_g))',
     'f_fake, f_fake_sg = jax.nn.softplus(logit(x_t_g))', [T_DMD]),
    (DMD, 'l_disc = jax.nn.softplus(-logit(real_t)) + jax.nn.softplus(logit(x_t))',
     'l_disc = jax.nn.softplus(-logit(real_t)) + jax.nn.softplus(logit(x_t_g))', [T_DMD]),
    (DMD, '+ gan_weight * l_gan)', '+ l_gan)', [T_DMD]),
    (DMD, 'x_t_g = process.marginal(x, eps, t)', 'x_t_g = process.marginal(x, eps, 1 - t)',
     [T_DMD]),
    # both parts start from the teacher
    (DMD, "out = {'generator': copy(teacher_params), 'fake': copy(teacher_params)}",
     "out = {'generator': copy(teacher_params), 'fake': copy(params['fake'])}", [T_DMD]),
]


def _copy_repo(dst):
  ignore = shutil.ignore_patterns('.venv', '.git', '.jax_cache', 'runs', '__pycache__', '*.pyc')
  shutil.copytree(ROOT, dst, ignore=ignore, dirs_exist_ok=True)


def _read_checked(root, path, old):
  with open(os.path.join(root, path), encoding='utf-8') as f:
    text = f.read()
  count = text.count(old)
  if count != 1:
    raise SystemExit(f'{path}: the original text occurs {count} times (must be once): {old!r}')
  return text


def _apply(root, path, old, new):
  text = _read_checked(root, path, old)
  with open(os.path.join(root, path), 'w', encoding='utf-8') as f:
    f.write(text.replace(old, new))
  return text


def run_one(work, mutation, python):
  path, old, new, tests = mutation
  original = _apply(work, path, old, new)
  t0 = time.time()
  try:
    proc = subprocess.run([python, '-m', 'pytest', '-q', '-x', '-p', 'no:randomly', *tests],
                          cwd=work, capture_output=True, text=True, check=False)
  finally:
    with open(os.path.join(work, path), 'w', encoding='utf-8') as f:
      f.write(original)
  failed = [ln for ln in proc.stdout.splitlines() if ln.startswith('FAILED')]
  return proc.returncode != 0, (failed[0][7:] if failed else proc.stdout[-200:]), time.time() - t0


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--only', default='', help='run only mutations whose file contains this')
  parser.add_argument('--jobs', type=int, default=1, help='mutations run at once (own copies)')
  args = parser.parse_args()
  todo = [m for m in MUTATIONS if args.only in m[0]]
  for path, old, _, _ in todo:                         # fail fast on a stale table
    _read_checked(ROOT, path, old)
  python = sys.executable
  with tempfile.TemporaryDirectory() as tmp:
    works = [os.path.join(tmp, f'w{j}') for j in range(max(1, args.jobs))]
    for w in works:
      _copy_repo(w)
    lock = threading.Lock()

    def report(mutation, result):
      path, old, new, _ = mutation
      killed, why, seconds = result
      with lock:   # as each finishes, so a long run shows progress
        print(f'{"killed  " if killed else "SURVIVED"} {seconds:6.1f}s {path}: {old!r} -> '
              f'{new!r}\n           {why}', flush=True)
      return mutation, result

    t0 = time.time()
    with concurrent.futures.ThreadPoolExecutor(len(works)) as pool:
      # Each worker copy runs one mutation at a time.
      chunks = [todo[j::len(works)] for j in range(len(works))]
      futures = [pool.submit(lambda w, ms: [report(m, run_one(w, m, python)) for m in ms], w, c)
                 for w, c in zip(works, chunks, strict=True)]
      results = [r for f in futures for r in f.result()]
    survived = sum(not killed for _, (killed, _, _) in results)
  per_file = {}
  for (path, _, _, _), (killed, _, _) in results:
    per_file.setdefault(path, [0, 0])[0 if killed else 1] += 1
  for path, (k, s) in per_file.items():
    print(f'{path}: {k} killed, {s} survived')
  print(f'{len(results) - survived} killed, {survived} survived of {len(results)} mutations '
        f'in {time.time() - t0:.0f}s')
  return 1 if survived else 0


if __name__ == '__main__':
  sys.exit(main())
