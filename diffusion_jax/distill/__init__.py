"""Few-step generation: distillation and one-step models on the library's one convention.

Each module is one method, its paper and equations in its docstrings; every loss is an
`objectives.Objective` (so training, checkpoints and configs are the ordinary ones), and a
method that is not sampled through a denoiser says how it is sampled.

  progressive   progressive distillation (Salimans & Ho 2022), and reflow (Liu et al. 2022)
  trigflow      continuous-time consistency models, sCM / TrigFlow (Lu & Song 2024)
  meanflow      MeanFlow average velocity (Geng et al. 2025); shortcut models (Frans et al. 2024)
  dmd           distribution-matching distillation, DMD / DMD2 (Yin et al. 2024)
"""


def network_for(model, objective):
  """The network an objective trains, around `model` (the configured one): sCM's (kind
  'trigflow') carries its learned adaptive weighting `w(tau)` beside it
  (`trigflow.TimeWeighted`, params {'net', 'weight'}); DMD's is a generator and a fake score
  (`dmd.DMDModel`, {'generator', 'fake'}), both started from the teacher's weights
  (`run_state.init_state_fn`). Any other objective trains `model` itself."""
  if objective.kind == 'trigflow':
    from diffusion_jax.distill import trigflow  # pylint: disable=g-import-not-at-top
    return trigflow.TimeWeighted(model, time_scale=getattr(model, 'time_scale', 1000.0))
  if objective.name == 'dmd':
    from diffusion_jax.distill import dmd  # pylint: disable=g-import-not-at-top
    return dmd.dmd_model(model)
  return model
