r"""Post-hoc EMA: the parameters of any EMA length, reconstructed after training from the
power-function EMA snapshots a run stored (`config.train.posthoc_sigma_rels`; EDM2, Karras et
al. 2024, Sec. 3).

  python -m experiments.posthoc_ema --workdir=runs/cifar --sigma_rel=0.08 --out=ema_0.080.npz \
      [--step=S]

Reads `<workdir>/posthoc_ema/*.npz` (one profile at one step each), solves the least-squares
coefficients for `--sigma_rel` at step S (default: the last snapshot step) over the snapshots
at steps up to S, prints them, and writes the weighted sum of the snapshots to `--out`: an
`.npz` of the flattened parameter tree (keys `Dense_0/kernel`, ...; `ema.read_params` gives the
nested dicts back) with `__step__`, `__gamma__` and `__sigma_rel__` beside it, the layout of a
snapshot file.
"""

import os

from absl import app
from absl import flags

from experiments import cli

_WORKDIR = flags.DEFINE_string('workdir', None, 'The run whose posthoc_ema/ snapshots to use.')
_SIGMA_REL = flags.DEFINE_float('sigma_rel', None, 'EMA length to reconstruct, relative to the '
                                'training time (EDM2 sigma_rel, e.g. 0.05 to 0.15).')
_STEP = flags.DEFINE_integer('step', 0, 'The training step to reconstruct at (0: the last '
                             'snapshot).', lower_bound=0)
_OUT = flags.DEFINE_string('out', None, 'The .npz to write.')
flags.mark_flags_as_required(['workdir', 'sigma_rel', 'out'])


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments: {" ".join(argv[1:])}')
  cli.setup_runtime()
  from diffusion_jax import ema  # pylint: disable=g-import-not-at-top
  directory = os.path.join(_WORKDIR.value, ema.SNAPSHOT_SUBDIR)
  try:
    gamma = ema.sigma_rel_to_gamma(_SIGMA_REL.value)
    params, coefficients, used = ema.reconstruct_from_directory(directory, gamma,
                                                                _STEP.value or None)
    step = _STEP.value or used[-1].step
    print(f'sigma_rel {_SIGMA_REL.value:g} (gamma {gamma:.4f}) at step {step} from '
          f'{len(used)} snapshots:')
    for s, c in zip(used, coefficients, strict=True):
      print(f'  step {s.step:>9d}  sigma_rel {s.sigma_rel:.4f}  coefficient {c:+.6f}')
    ema.write_params(_OUT.value, params, step=step, gamma=gamma)
  except ValueError as e:
    cli.fail(str(e))
  except OSError as e:
    cli.fail(f'{e.filename or _OUT.value}: {e.strerror or e}')
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
