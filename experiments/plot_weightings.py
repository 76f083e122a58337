r"""Plot every objective's implied eps-MSE weighting w(lambda) (Kingma & Gao 2023).

  python -m experiments.plot_weightings --out=weightings.png

Each objective is shown on the process its paper uses; w is normalised so the ELBO is 1.
"""

from absl import app
from absl import flags

_OUT = flags.DEFINE_string('out', 'weightings.png', 'Where to write the PNG.')


def main(argv):
  del argv
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from diffusion_jax import processes  # pylint: disable=g-import-not-at-top
  from diffusion_jax import weighting  # pylint: disable=g-import-not-at-top

  lam = np.linspace(-10.0, 10.0, 401)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  print(f'{"objective":16s} {"process":12s} ' + ' '.join(f'w({v:+.0f})' for v in (-5, 0, 5)))
  for name, (proc_name, kwargs) in weighting.WEIGHTED_OBJECTIVES.items():
    proc = processes.make_process(proc_name)
    w = np.asarray(weighting.implied_weighting(name, proc, lam, **kwargs))
    ax.plot(lam, w, label=f'{name} ({proc_name})')
    at = [float(weighting.implied_weighting(name, proc, np.array([v]), **kwargs)[0])
          for v in (-5, 0, 5)]
    print(f'{name:16s} {proc_name:12s} ' + ' '.join(f'{a:6.3f}' for a in at))
  ax.set_yscale('log')
  ax.set_ylim(1e-3, 1e2)
  ax.set_xlabel('log-SNR  lambda')
  ax.set_ylabel('w(lambda)  (ELBO = 1)')
  ax.set_title('Implied eps-MSE weighting of each objective (Kingma & Gao 2023)')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(_OUT.value, dpi=120)
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
