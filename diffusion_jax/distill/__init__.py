"""Few-step generation: distillation and one-step models on the library's one convention.

Each module is one method, its paper and equations in its docstrings; every loss is an
`objectives.Objective` (so training, checkpoints and configs are the ordinary ones), and a
method that is not sampled through a denoiser says how it is sampled.

  progressive   progressive distillation (Salimans & Ho 2022), and reflow (Liu et al. 2022)
  trigflow      continuous-time consistency models, sCM / TrigFlow (Lu & Song 2024)
  meanflow      MeanFlow average velocity (Geng et al. 2025); shortcut models (Frans et al. 2024)
  dmd           distribution-matching distillation, DMD / DMD2 (Yin et al. 2024)
"""
