"""The training loop samples models of every objective family with any named sampler: learned
variances (DDPM L_hybrid, sampled with variance='learned'), consistency training (consistency
sampling on EDM), and flow matching with a multistep solver."""

import os

import numpy as np
import pytest

from configs import digits as digits_config
from diffusion_jax import train_loop

CASES = {
    'hybrid_learned_variance': dict(
        objective=dict(name='ddpm_hybrid'), model=dict(out_channels=2),
        sample=dict(sampler='ddpm', steps=5, variance='learned')),
    'consistency_training': dict(
        process=dict(name='edm'), objective=dict(name='consistency_training', total_steps=4),
        sample=dict(sampler='consistency', steps=2)),
    'flow_matching_unipc': dict(
        process=dict(name='linear'), objective=dict(name='flow_matching'),
        sample=dict(sampler='unipc_bh2', steps=5)),
}


@pytest.mark.parametrize('case', [
    'consistency_training', 'hybrid_learned_variance',
    pytest.param('flow_matching_unipc', marks=pytest.mark.slow)])
def test_train_loop_samples_every_objective_family(tmp_path, case):
  config = digits_config.get_config('smoke')
  config.model.update(ch=8, num_groups=4)
  config.train.update(num_steps=4, batch_size=8, log_every=2, checkpoint_every=4)
  config.eval.enabled = False
  config.sample.update(batch_size=10, grid_size=10)
  for section, values in CASES[case].items():
    if section in ('process', 'objective'):
      config[section] = values
    else:
      config[section].update(values)
  result = train_loop.train_and_evaluate(config, str(tmp_path))
  samples = np.load(tmp_path / 'samples.npy')
  assert samples.shape == (10, 8, 8, 1) and np.all(np.isfinite(samples))
  assert os.path.exists(tmp_path / 'samples.png') and result['step'] == 4
