"""Few-step generation: distillations and one-step models at NFE 1, 2, 4 and 8 (issue 22).

`python -m experiments.ablate_few_step --config=configs/ablation_few_step.py --workdir=DIR`
(digits), or `--config=configs/ablation_few_step.py:toy2d` (the 2-D mixture of 8 Gaussians).

One teacher, the quick start's recipe (EDM process and objective, `configs/digits.py`), is
trained once (`ablation.teacher_steps`) and sampled by `ablation.teacher_sampler` at each NFE
and by its own default sampler at `ablation.teacher_nfe` (its best). Every method then trains
`ablation.student_steps` steps at the base batch ("equal student compute": the same number of
student updates on the same examples; what one update costs differs by method and is reported
as training seconds), from the teacher where it needs one, for each of `ablation.seeds`, and
is sampled at each of `ablation.nfes`. Progressive distillation spends the same steps over
its rounds (each round halves the sampling steps; round r is measured at its own NFE).

Methods (`ablation.runs`; pick some with `--config.ablation.methods=cd,ct`):
  cd           consistency distillation (Song et al. 2023), Heun teacher steps, from the
               teacher's weights
  ct           improved consistency training (Song & Dhariwal 2023), from data
  progressive  progressive distillation (Salimans & Ho 2022): 16 teacher steps -> 8, 4, 2, 1
               in four rounds on Karras' nested grid, an EDM-kind student from the teacher's
               weights, each round the teacher of the next
  reflow       reflow (Liu et al. 2022): a flow on the linear interpolant trained on the
               teacher's (noise, 8-step DPM-Solver++ 2M sample) pairs, sampled with Euler
  scd, sct     continuous-time consistency distillation / training, sCM (Lu & Song 2024) on
               TrigFlow with adaptive weighting; the EDM teacher converted exactly by log-SNR;
               the network's time embedding at time_scale 1 (sCM §4.1's stable conditioning)
  dmd          DMD2 (Yin et al. 2024): a 4-step generator and a fake score, both from the
               teacher's weights, distribution matching with 4 fake-score updates per
               generator update (TTUR), no GAN term; sampled at 1, 2 and 4 of its times
  meanflow     MeanFlow (Geng et al. 2025): the average velocity u(z, r, t) on the linear
               interpolant, from data; plain squared loss (adaptive_p = 0) and time_scale 1
               (the helper's 2-D study: the paper's p = 1 and a 1000x time embedding train badly;
               on digits p = 1 was also worse); r != t on the paper's 25 % of the batch
               (`--config.ablation.runs.meanflow.objective.ratio=0.5`: half, better at 1 NFE
               at 6,000 steps, README)
  shortcut     shortcut models (Frans et al. 2024): s(x, t, d), flow matching plus
               self-consistency on a quarter of the batch, from data
"""

import ml_collections

from configs import digits

RUNS = {
    'cd': dict(objective=dict(name='consistency_distillation'), teacher=True, init=True,
               sampler='consistency'),
    'ct': dict(objective=dict(name='consistency_training'), sampler='consistency'),
    'progressive': dict(objective=dict(name='progressive_distillation', grid='karras',
                                       kind='edm'),
                        teacher=True, init=True, rounds=4, start_steps=16, sampler='euler'),
    'reflow': dict(process=dict(name='linear'),
                   objective=dict(name='reflow', teacher_steps=8,
                                  teacher_sampler='dpm_solver_pp_2m'),
                   teacher=True, sampler='flow_euler'),
    'scd': dict(process=dict(name='trigflow', sigma_data=0.5),
                objective=dict(name='scm_distillation'), model=dict(time_scale=1.0),
                teacher=True, sampler='consistency', times='scm'),
    'sct': dict(process=dict(name='trigflow', sigma_data=0.5),
                objective=dict(name='scm_training'), model=dict(time_scale=1.0),
                sampler='consistency', times='scm'),
    'dmd': dict(objective=dict(name='dmd', steps=4, fake_updates=4), teacher=True,
                sampler='consistency', times='dmd', nfes='1,2,4'),
    'meanflow': dict(process=dict(name='linear'),
                     objective=dict(name='meanflow', adaptive_p=0.0, ratio=0.25),
                     model=dict(delta_input=True, time_scale=1.0), sampler='flow_map'),
    'shortcut': dict(process=dict(name='linear'), objective=dict(name='shortcut'),
                     model=dict(delta_input=True), sampler='flow_map'),
}


def get_config(arg: str = 'digits') -> ml_collections.ConfigDict:
  if arg not in ('digits', 'toy2d'):
    raise ValueError(f"configs/ablation_few_step.py:{arg}: choose 'digits' or 'toy2d'")
  c = digits.get_config()          # the quick start's EDM recipe: the shared teacher
  teacher_steps, student_steps, num = 6000, 2000, 1000
  if arg == 'toy2d':
    c.data = digits.data_section(name='toy2d', toy='eight_gaussians')
    c.model = digits.model_section(name='mlp', hidden=128, depth=3)
    c.train.update(batch_size=512, log_every=250)
    c.sample.update(clip_x0=0.0, batch_size=5000, grid_size=2000)
    teacher_steps, student_steps, num = 2000, 1000, 5000
  c.train.update(num_steps=teacher_steps, checkpoint_every=500)
  c.eval.enabled = False
  c.ablation = ml_collections.ConfigDict(dict(
      methods=','.join(RUNS),          # which of `runs`, comma-separated
      seeds='0',                       # several ('0,1,2'): mean +- std over seeds
      nfes='1,2,4,8',
      teacher_steps=teacher_steps,
      teacher_seed=0,
      teacher_sampler='dpm_solver_pp_2m',   # the teacher's row at each NFE
      teacher_nfe=50,                  # and its best: its own default sampler at this NFE
      student_steps=student_steps,
      num_samples=num,                 # generated per (run, NFE)
      runs=RUNS,
  ))
  return c
