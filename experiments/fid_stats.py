r"""Reference statistics for FID (or digits FD) of any `config.data` source, for the training
loop's evaluations (`config.eval.reference_stats`) and `experiments.evaluate`.

  python -m experiments.fid_stats --config=configs/ddpm_cifar10.py --out=cifar10_train.npz \
      --inception_weights=fid_inception.npz [--split=train] [--limit=50000] [--batch_size=500]
  python -m experiments.fid_stats --config=configs/digits.py --out=digits_test.npz --split=test

The source's examples are read in index order and streamed through the feature network in
batches, each split over every device (and every process of a multi-process run); the mean and
covariance accumulate in float64. Image data is measured with the FID Inception network
(`--inception_weights`, docs/fid_inception.md), digits with the cached digits classifier. The
`.npz` holds `mu` and `sigma` (the layout FID tools use) and, beside them, `feature` (the
network and a digest of its weights: statistics of other weights are refused when read back),
`count`, `data` and `split`.
"""

import json
import os
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from experiments import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'The config whose `data` section names '
                                          'the source.', lock_config=True)
_OUT = flags.DEFINE_string('out', None, 'The statistics file to write (.npz).')
_INCEPTION = flags.DEFINE_string('inception_weights', '', 'Converted FID Inception .npz (image '
                                 'data; digits use the digits classifier).')
_SPLIT = flags.DEFINE_string('split', None, 'The split (default: config.data.split).')
_LIMIT = flags.DEFINE_integer('limit', 0, 'Use the first N examples (0: all).', lower_bound=0)
_SHA = flags.DEFINE_string('inception_sha256', '', 'Refuse Inception weights of another digest '
                           '(what experiments.convert_inception printed).')
_BATCH = flags.DEFINE_integer('batch_size', 500, 'Examples per batch.', lower_bound=1)
_CACHE = flags.DEFINE_string('cache_dir', '', 'Where the digits classifier is cached (default: '
                             'config.eval.cache_dir, else the user cache).')
flags.mark_flags_as_required(['config', 'out'])


def main(argv):
  config, out = cli.begin(argv, _CONFIG, _OUT)
  # pylint: disable=g-import-not-at-top
  import dataclasses
  import jax
  import tqdm
  from diffusion_jax import evaluation
  from diffusion_jax import parallel
  from diffusion_jax import run_config
  from diffusion_jax.data import digits
  from diffusion_jax.metrics import digits_classifier
  from diffusion_jax.metrics import frechet
  from diffusion_jax.metrics import inception
  # pylint: enable=g-import-not-at-top
  with cli.user_errors():
    data = run_config.build_data(config.data)
    if _SPLIT.value:
      data = dataclasses.replace(data, split=_SPLIT.value)
    if data.name == 'toy2d':
      cli.fail('config.data.name=toy2d: 2-D toys are measured against exact draws (sliced '
               'Wasserstein), not against feature statistics')
    source = run_config.open_source(data)
  mesh = parallel.make_mesh()
  if data.name == 'digits':
    if _INCEPTION.value:
      cli.fail('--inception_weights: digits are measured with the digits classifier (FD); '
               'leave it out')
    cache = _CACHE.value or config.eval.get('cache_dir') or cli.default_cache_dir()
    classifier, _ = digits_classifier.load_or_train_digits_classifier(cache, seed=0)
    feature = evaluation.digits_feature_name(classifier)
    features = lambda x: digits_classifier.classifier_features(classifier, digits.to_native(x))
  else:
    if not _INCEPTION.value:
      cli.fail(f'config.data.name={data.name!r}: --inception_weights is required (the converted '
               f'FID Inception weights; docs/fid_inception.md)')
    with cli.user_errors():
      variables = inception.load_inception_params(_INCEPTION.value)
      inception.check_digest(variables, _SHA.value, _INCEPTION.value)
    feature = inception.feature_name(variables)
    features = lambda x: inception.inception_features(variables, x, batch_size=_BATCH.value,
                                                      mesh=mesh)[0]
  n = len(source) if not _LIMIT.value else min(_LIMIT.value, len(source))
  is_main = jax.process_index() == 0
  print(f'Reference statistics of {data.name}/{data.split}: {n} examples, features {feature}, '
        f'on {parallel.describe(mesh)}', flush=True)
  t0 = time.time()
  bar = tqdm.tqdm(total=n, desc='features', unit='img', dynamic_ncols=True, mininterval=1.0,
                  disable=not is_main)
  stats = evaluation.reference_stats(source, features, batch_size=_BATCH.value, limit=n,
                                     progress=bar.update)
  bar.close()
  if is_main:
    os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
    frechet.save_stats(out, stats.mean, stats.cov, feature=feature, count=stats.count,
                       data=json.dumps(dataclasses.asdict(data)), split=data.split)
    print(f'Wrote {out}: {stats.count} examples, {stats.dim} features, '
          f'{time.time() - t0:.1f} s', flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
  sys.exit(0)
