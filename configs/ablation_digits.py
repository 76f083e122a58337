"""Objective ablation on the embedded digits: six objectives, one model, one budget.

`python -m experiments.ablate_objectives --config=configs/ablation_digits.py --workdir=DIR`.
Every run trains the quick-start U-Net (177k parameters) for the same 3,000 steps at batch 128
(384,000 examples, in the same order: the data order is a function of (seed, step)), with the
same optimizer, EMA and seed; what differs is the objective and the process its paper uses.
Each is then sampled with every listed sampler at every listed NFE and measured by FD against
the test digits (with KID, precision and recall beside it), and its checkpoints every
`curve_every` steps give the metric-vs-step curve. About 30-50 minutes on 2 CPU cores.

Runs (`ablation.runs`; pick some with `--config.ablation.objectives=eps,flow`):
  eps    DDPM L_simple, eps-prediction (Ho et al. 2020), linear betas, T = 1000
  v      v-prediction (Salimans & Ho 2022), cosine schedule (continuous)
  x0     x0-prediction, linear betas
  edm    EDM preconditioning and loss (Karras et al. 2022)
  flow   flow matching / rectified flow, velocity on the linear interpolant (Lipman et al. 2023)
  ct     improved consistency training (Song & Dhariwal 2023), sampled with 1, 2 and 4 steps
"""

import ml_collections

from configs import digits

RUNS = {
    'eps': dict(process=dict(name='vp_discrete', schedule='linear', num_steps=1000),
                objective=dict(name='ddpm_eps')),
    'v': dict(process=dict(name='vp_cosine'), objective=dict(name='v_prediction')),
    'x0': dict(process=dict(name='vp_discrete', schedule='linear', num_steps=1000),
               objective=dict(name='ddpm_x0')),
    'edm': dict(process=dict(name='edm'), objective=dict(name='edm')),
    'flow': dict(process=dict(name='linear'), objective=dict(name='flow_matching')),
    # A consistency model samples only with the consistency sampler (1 NFE per step).
    'ct': dict(process=dict(name='edm'), objective=dict(name='consistency_training'),
               samplers='consistency', nfes='1,2,4'),
}


def get_config() -> ml_collections.ConfigDict:
  c = digits.get_config('eps')  # the 3,000-step DDPM budget the ablation tables report
  c.ablation = ml_collections.ConfigDict(dict(
      objectives=','.join(RUNS),        # which of `runs`, comma-separated
      seeds='0',                        # several ('0,1,2'): mean +- std over seeds
      samplers='euler,heun,dpm_solver_pp_2m',
      nfes='5,10,20,50',
      num_samples=1000,                 # generated per (run, sampler, NFE)
      curve_every=500,                  # metric vs training step: these checkpoints
      curve_sampler='dpm_solver_pp_2m',
      curve_nfe=20,
      runs=RUNS,
  ))
  return c
