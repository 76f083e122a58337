r"""Convert pytorch-fid's FID Inception weights to the `.npz` that the library loads (no torch).

  python -m experiments.convert_inception \
      --pth=pt_inception-2015-12-05-6726825d.pth --out=fid_inception.npz

Prints the file's SHA-256 (its name carries the first 8 hex digits, torch.hub's convention) and
the parameter count; see docs/fid_inception.md for where the file comes from.
"""

import hashlib
import os

from absl import app
from absl import flags

from experiments import cli

_PTH = flags.DEFINE_string('pth', None,
                           'pytorch-fid weights file, pt_inception-2015-12-05-6726825d.pth.')
_OUT = flags.DEFINE_string('out', 'fid_inception.npz', 'Where to write the converted .npz.')

_EXPECTED_SHA256_PREFIX = '6726825d'


def main(argv):
  del argv
  cli.setup_runtime()
  import jax  # pylint: disable=g-import-not-at-top
  from diffusion_jax.weights import fid_inception  # pylint: disable=g-import-not-at-top
  if not _PTH.value:
    cli.fail('--pth is required (the pytorch-fid weights file)')
  try:
    digest = hashlib.sha256()
    with open(_PTH.value, 'rb') as f:
      for block in iter(lambda: f.read(1 << 20), b''):
        digest.update(block)
    sha256 = digest.hexdigest()
  except OSError as e:
    cli.fail(f'cannot read {_PTH.value}: {e.strerror or e}')
  note = ('' if sha256.startswith(_EXPECTED_SHA256_PREFIX) else
          f' -- not the pytorch-fid release (whose SHA-256 starts {_EXPECTED_SHA256_PREFIX})')
  print(f'{_PTH.value}: sha256 {sha256}{note}')
  try:
    variables = fid_inception.convert_pytorch_fid_weights(_PTH.value, _OUT.value)
  except ValueError as e:
    cli.fail(str(e))
  sizes = {name: sum(v.size for v in jax.tree_util.tree_leaves(tree))
           for name, tree in variables.items()}
  print(f'wrote {_OUT.value} ({os.path.getsize(_OUT.value) / 2**20:.1f} MiB): '
        f'{sizes["params"]:,} parameters (expected 23,850,960) and '
        f'{sizes["batch_stats"]:,} BatchNorm statistics')
  from diffusion_jax.metrics import inception  # pylint: disable=g-import-not-at-top
  print(f'weights digest (pin it: --config.eval.inception_sha256=...): '
        f'{inception.weights_digest(variables)}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
