"""Sample-quality and likelihood numbers for a trained model, streamed over generated batches.

- Digits (`digits_metrics`): in the feature space of the digits classifier, against the 450
  held-out test digits: Fréchet distance with its real-data floor at the same n, KID (unbiased,
  polynomial kernel), improved precision / recall (k = 3), and for conditional models the
  classifier's accuracy on the intended classes.
- Any images (`InceptionMetrics`): FID against reference statistics (`.npz` mu / sigma), the
  Inception Score, and KID / precision / recall against reference features when given, in the
  pool3 space of the FID InceptionV3. Feature statistics accumulate in float64 batch by batch.
- 2-D toys (`toy_metrics`): sliced Wasserstein and RBF-MMD against fresh exact draws, with
  the floor of one exact draw against another.
- Likelihood (`heldout_bits_per_dim`): negative log-likelihood of dequantized held-out data in
  bits/dim through the probability-flow ODE (`samplers.likelihood`).
"""

import functools
import math

import jax
import numpy as np

from diffusion_jax import parameterization
from diffusion_jax.data import digits
from diffusion_jax.metrics import classifier_scores
from diffusion_jax.metrics import digits_classifier
from diffusion_jax.metrics import frechet
from diffusion_jax.metrics import inception
from diffusion_jax.metrics import kernel
from diffusion_jax.metrics import manifold
from diffusion_jax.metrics import sliced
from diffusion_jax.samplers import likelihood

# Data the training loop can evaluate itself. Audio is scored against the held-out clips its
# samples were conditioned on (`audio.conditioning.reference_metrics`), not here.
AUDIO = ('synth_audio', 'speech_commands', 'tfds_audio')
EVALUATED = ('digits', 'toy2d') + AUDIO
KID_SUBSETS = 100
PR_NEIGHBOURS = 3        # Kynkäänniemi et al. 2019


def evaluate_samples(data_name: str, source, samples: np.ndarray, labels: np.ndarray | None,
                     cache_dir: str, *, prompts=None, digits_clip_steps: int = 0) -> dict:
  """The metrics of `samples` of the data named `data_name` (one of `EVALUATED`):
  `digits_metrics` (the feature classifier trained once and cached in `cache_dir`) or
  `toy_metrics` against the toy `source`; with `prompts` (a text-conditioned model's,
  `text.conditioning.Prompts`), `text_metrics` too."""
  if data_name == 'toy2d':
    return toy_metrics(source, samples)
  if data_name in AUDIO:
    return {}
  if data_name != 'digits':
    raise ValueError(f'evaluate_samples: data {data_name!r} has no built-in evaluation; '
                     f'use InceptionMetrics')
  params, info = digits_classifier.load_or_train_digits_classifier(cache_dir, seed=0)
  result = digits_metrics(params, info, samples, labels)
  if prompts is not None:
    result.update(text_metrics(params, samples, prompts, cache_dir,
                               digits_clip_steps=digits_clip_steps))
  return result


def load_digits_clip(cache_dir: str, steps: int = 0):
  """The digits-CLIP behind the CLIP score (`metrics.digits_clip`; `steps` > 0 replaces its
  recipe's training steps), trained once and cached in `cache_dir`."""
  from diffusion_jax.metrics import digits_clip  # pylint: disable=g-import-not-at-top
  return digits_clip.load_or_train_digits_clip(
      cache_dir, recipe_overrides={'steps': steps} if steps else None)


def text_metrics(classifier_params, samples: np.ndarray, prompts, cache_dir: str, *,
                 digits_clip_steps: int = 0, digits_clip_model=None) -> dict:
  """How well digits follow their prompts (`prompts.texts`, with the class and attribute
  values each names): `metrics.attributes.attribute_accuracy` (class, attribute and joint
  accuracy, measured on the images) and the digits-CLIP score (`metrics.digits_clip`, trained
  once and cached in `cache_dir`) with its floor, the score of real test digits with their
  captions (`clip_score_real`), and the digits-CLIP's retrieval accuracy. `digits_clip_steps`
  > 0 trains the digits-CLIP for that many steps instead of its recipe's (smoke runs);
  `digits_clip_model` (`(params, info)`, already loaded) skips reading it from the cache."""
  from diffusion_jax.metrics import attributes as attributes_lib  # pylint: disable=g-import-not-at-top
  from diffusion_jax.metrics import digits_clip  # pylint: disable=g-import-not-at-top
  from diffusion_jax.text import words  # pylint: disable=g-import-not-at-top
  x = digits.to_native(samples)
  out = dict(attributes_lib.attribute_accuracy(classifier_params, x, prompts.labels,
                                               prompts.attributes))
  clip_params, clip_info = digits_clip_model or load_digits_clip(cache_dir, digits_clip_steps)
  tokens = words.WordTokenizer.for_captions().encode(list(prompts.texts))
  out['clip_score'] = float(digits_clip.clip_score(clip_params, x, tokens))
  out['clip_score_real'] = float(clip_info['clip_score_real'])
  out['clip_retrieval_accuracy'] = float(clip_info['retrieval_accuracy'])
  return out


def digits_metrics(classifier_params, classifier_info, generated: np.ndarray,
                   labels: np.ndarray | None = None) -> dict:
  """FD, KID, precision and recall of generated digits, each beside its floor (the same number
  for real training digits, as many as generated), and the class accuracy if `labels`.
  16x16 and 32x32 digits are measured at 8x8 (`digits.to_native`)."""
  generated = digits.to_native(generated)
  result = dict(digits_classifier.digits_fd_eval(
      classifier_params, generated,
      classifier_test_accuracy=float(classifier_info['test_accuracy'])))
  test_x, _ = digits.load_digits('test')
  features = lambda x: digits_classifier.classifier_features(classifier_params, x)
  real = features(test_x)
  for suffix, fake in (('', features(generated)),
                       ('_floor', features(digits_classifier.floor_subsample(len(generated))))):
    kid, kid_std = kernel.kid(real, fake, num_subsets=KID_SUBSETS,
                              subset_size=min(len(real), len(fake)))
    pr = manifold.precision_recall(real, fake, k=PR_NEIGHBOURS)
    result.update({f'kid{suffix}': kid, f'kid_std{suffix}': kid_std,
                   f'precision{suffix}': pr['precision'], f'recall{suffix}': pr['recall']})
  if labels is not None:
    result['class_accuracy'] = digits_classifier.classifier_accuracy(classifier_params,
                                                                     generated, labels)
  return result


TOY_REFERENCE_SEED = 12345   # the exact draws toy samples are compared with (fixed per toy)
SW_PROJECTIONS = 512
MMD_MAX = 1000          # MMD on the first 1,000 points (its median bandwidth is quadratic)


def toy_metrics(source, generated: np.ndarray) -> dict:
  """Sliced Wasserstein (512 projections) and RBF-MMD² of 2-D samples against a fresh exact
  draw of as many points, each beside its floor: the same number for a second exact draw."""
  n = len(generated)
  ref, k_proj, floor = _toy_reference(source, n)
  out = {'num_generated': n, **floor}
  out['sw'] = float(_sliced_wasserstein(k_proj, np.asarray(generated, np.float32), ref))
  m = min(n, MMD_MAX)
  out['mmd'] = kernel.mmd_rbf(ref[:m], np.asarray(generated[:m], np.float64))
  out['sw_ratio'] = out['sw'] / out['sw_floor']
  return out


_sliced_wasserstein = jax.jit(sliced.sliced_wasserstein, static_argnums=(3, 4))


@functools.lru_cache(maxsize=8)
def _toy_reference(source, n: int):
  """The exact reference draw, the projection key and the floor, once per (toy, n)."""
  k_ref, k_floor, k_proj = jax.random.split(jax.random.key(TOY_REFERENCE_SEED), 3)
  ref, other = source.sample(k_ref, n), source.sample(k_floor, n)
  m = min(n, MMD_MAX)
  floor = {'sw_floor': float(_sliced_wasserstein(k_proj, other, ref)),
           'mmd_floor': kernel.mmd_rbf(ref[:m], other[:m])}
  return ref, k_proj, floor


class InceptionMetrics:
  """FID / IS (and KID, precision, recall against `reference_features`) accumulated batch by
  batch: `update(images)` per generated batch, then `result()`."""

  def __init__(self, variables, reference_stats: tuple[np.ndarray, np.ndarray],
               reference_features: np.ndarray | None = None, batch_size: int = 50,
               keep_features: int = 10_000, mesh=None):
    self.variables = variables
    self.mesh = mesh   # split each batch over its devices
    self.reference_stats = reference_stats
    self.reference_features = reference_features
    self.batch_size = batch_size
    self.keep_features = keep_features if reference_features is not None else 0
    self.stats = frechet.FeatureStats()
    self._logits, self._features = [], []

  def update(self, images: np.ndarray) -> None:
    # The reference numbers are computed on 8-bit images: quantise as a saved PNG would be.
    x = np.round((np.clip(images, -1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0
    features, logits = inception.inception_features(self.variables, x.astype(np.float32),
                                                    batch_size=self.batch_size, mesh=self.mesh)
    self.stats.update(features)
    self._logits.append(logits)
    kept = sum(len(f) for f in self._features)
    if kept < self.keep_features:
      self._features.append(features[:self.keep_features - kept])

  def result(self) -> dict:
    mu, sigma = self.reference_stats
    out = {'fid': frechet.frechet_distance(self.stats.mean, self.stats.cov, mu, sigma),
           'num_generated': self.stats.count}
    logits = np.concatenate(self._logits)
    out['inception_score'], out['inception_score_std'] = classifier_scores.inception_score(
        logits, splits=min(10, len(logits)))
    if self._features:
      fake = np.concatenate(self._features)
      real = self.reference_features
      out['kid'], out['kid_std'] = kernel.kid(real, fake, num_subsets=KID_SUBSETS,
                                              subset_size=min(1000, len(real), len(fake)))
      out.update(manifold.precision_recall(real, fake, k=PR_NEIGHBOURS))
    return out


def heldout_bits_per_dim(denoiser, process, key, images: np.ndarray, *, num_bins: int,
                         data_range: tuple[float, float], batch_size: int = 150,
                         trace: str = 'hutchinson', rtol: float = 1e-4,
                         atol: float = 1e-4) -> dict:
  """NLL in bits/dim of `images` (on the grid `lo + (hi - lo) k / num_bins`) under the
  probability-flow ODE of `denoiser` (build it with `make_denoiser(model_fn, process,
  objective)`, no clipping), each uniformly dequantized once (`likelihood.bits_per_dim`).

  Digits have 17 grey levels, 2/16 apart in [-1, 1]: `num_bins=17`, `data_range=(-1, 1.125)`,
  so that level k's cell is `[-1 + k / 8, -1 + (k + 1) / 8)`; a uniform model scores
  log2(17) = 4.09 bits/dim.
  """
  lo, hi = data_range
  x_int = np.round((images - lo) / (hi - lo) * num_bins).astype(np.int32)
  if x_int.min() < 0 or x_int.max() >= num_bins:
    raise ValueError(f'heldout_bits_per_dim: images outside the {num_bins}-level grid on '
                     f'[{lo}, {hi})')

  if parameterization.as_denoiser(denoiser).kind == 'consistency':
    raise ValueError('heldout_bits_per_dim: a consistency model defines no probability-flow ODE')

  @jax.jit
  def bpd(x, key):
    out, info = likelihood.bits_per_dim(denoiser, process, x, key, num_bins=num_bins,
                                        data_range=data_range, trace=trace, rtol=rtol,
                                        atol=atol)
    return out, info['nfe']

  values, nfes = [], []
  for start in range(0, len(x_int), batch_size):
    chunk = x_int[start:start + batch_size]
    out, nfe = bpd(chunk, jax.random.fold_in(key, start))
    values.append(np.asarray(out))
    nfes.append(int(nfe))
  values = np.concatenate(values)
  return {'bits_per_dim': float(values.mean()),
          'bits_per_dim_sem': float(values.std(ddof=1) / math.sqrt(len(values))),
          'nll_examples': int(len(values)), 'nll_nfe_mean': float(np.mean(nfes)),
          'nll_trace': trace}


# --------------------------------------------------------------------------------------------
# Reference statistics of a data source, and the one number the training loop tracks.


def digits_feature_name(classifier_params) -> str:
  """The digits classifier's feature space, as reference statistics record it."""
  return f'digits_classifier:{digits_classifier.params_digest(classifier_params)[:16]}'


def reference_stats(source, features, *, batch_size: int = 500, limit: int = 0,
                    progress=None) -> frechet.FeatureStats:
  """Feature statistics (float64 mean and covariance) of a data source's examples, in index
  order, streamed in batches of `batch_size`: `features(images) -> [B, D]` (e.g. Inception
  pool3 over the mesh). `limit` > 0 takes the first `limit` examples. `progress(n)` is called
  with each batch's size."""
  n = len(source) if not limit else min(limit, len(source))
  stats = frechet.FeatureStats()
  for start in range(0, n, batch_size):
    images = source.examples(np.arange(start, min(start + batch_size, n)))['image']
    stats.update(features(images))
    if progress is not None:
      progress(len(images))
  return stats


def check_reference(path: str, feature: str) -> tuple[np.ndarray, np.ndarray]:
  """`(mu, sigma)` of the statistics file `path`, refused (one line) if it records another
  feature space than `feature` (other weights, or the other network)."""
  mu, sigma = frechet.load_stats(path)
  saved = frechet.load_stats_info(path).get('feature')
  if saved is not None and saved != feature:
    raise ValueError(f'{path}: statistics of features {saved!r}, but this evaluation measures '
                     f'{feature!r}; recompute them with experiments.fid_stats')
  return mu, sigma


def metric_name(data_name: str) -> str:
  """The number `SampleMetric` tracks for this data (lower is better): 'fd', 'sw' or 'fid'."""
  return {'digits': 'fd', 'toy2d': 'sw'}.get(data_name, 'fid')


class SampleMetric:
  """The sample metric of the training loop's evaluations (in-loop and final).

  `SampleMetric(data_name, source, cache_dir, reference_stats='', inception_weights='',
  mesh=None)`; `metric(samples, labels) -> dict`. `name` is the tracked number and `mode`
  whether lower ('min') or higher ('max') is better:

    digits   'fd': Fréchet distance in the digits classifier's features against the test digits
             (or `reference_stats` written by `experiments.fid_stats`), with `fd_floor` (real
             training digits, as many as generated) and `fd_ratio`; `class_accuracy` if labels.
    toy2d    'sw': sliced Wasserstein against exact draws, with its floor.
    other    'fid': FID against `reference_stats` with the Inception network of
             `inception_weights` (split over `mesh`; refused unless its digest is
             `inception_sha256`, when given), and the Inception Score.

  The classifier, the reference statistics and the floors are computed once.
  """

  def __init__(self, data_name: str, source, cache_dir: str, *, reference_stats: str = '',
               inception_weights: str = '', inception_sha256: str = '', mesh=None,
               digits_clip_steps: int = 0):
    self.data_name = data_name
    self.digits_clip_steps = digits_clip_steps
    self._digits_clip = None
    self.source = source
    self.cache_dir = cache_dir
    self.name = metric_name(data_name)
    self.mode = 'min'
    self._floors = {}
    if data_name == 'toy2d':
      pass
    elif data_name == 'digits':
      self.classifier, self.info = digits_classifier.load_or_train_digits_classifier(
          cache_dir, seed=0)
      if reference_stats:
        mu, sigma = check_reference(reference_stats, digits_feature_name(self.classifier))
        count = int(frechet.load_stats_info(reference_stats).get('count', 2))
        self.reference = frechet.FeatureStats.from_moments(mu, sigma, max(count, 2))
      else:
        self.reference = digits_classifier.digits_reference_stats(self.classifier)
    else:
      if not (reference_stats and inception_weights):
        raise ValueError(f'data {data_name!r}: FID needs reference statistics and Inception '
                         f'weights (config.eval.reference_stats, config.eval.inception_weights)')
      self.variables = inception.load_inception_params(inception_weights)
      inception.check_digest(self.variables, inception_sha256, inception_weights)
      self.reference = check_reference(reference_stats, inception.feature_name(self.variables))
      self.mesh = mesh

  def __call__(self, samples: np.ndarray, labels: np.ndarray | None = None, *,
               prompts=None) -> dict:
    if self.name == 'sw':
      return toy_metrics(self.source, samples)
    if self.name == 'fd':
      x = digits.to_native(samples)
      out = {'fd': digits_classifier.digits_fd(self.classifier, x, reference=self.reference),
             'num_generated': len(x)}
      if len(x) not in self._floors:
        self._floors[len(x)] = digits_classifier.digits_fd_floor(
            self.classifier, len(x), reference=self.reference)[0]
      out['fd_floor'] = self._floors[len(x)]
      out['fd_ratio'] = out['fd'] / out['fd_floor']
      if labels is not None:
        out['class_accuracy'] = digits_classifier.classifier_accuracy(self.classifier, x, labels)
      if prompts is not None:
        if self._digits_clip is None:     # loaded once, reused by every evaluation
          self._digits_clip = load_digits_clip(self.cache_dir, self.digits_clip_steps)
        out.update(text_metrics(self.classifier, x, prompts, self.cache_dir,
                                digits_clip_model=self._digits_clip))
      return out
    metrics = InceptionMetrics(self.variables, self.reference, mesh=self.mesh)
    metrics.update(samples)
    return metrics.result()


def format_eval_line(result: dict) -> str:
  """One line for a run's final evaluation: reconstruction, SW, audio distances, or FD with the
  class, attribute and CLIP numbers a conditional model adds."""
  if 'reconstruction_psnr' in result:
    return (f'EVAL step={result["step"]}: reconstruction PSNR='
            f'{result["reconstruction_psnr"]:.2f} dB MSE={result["reconstruction_mse"]:.5f} '
            f'(held-out, n={result["num_reconstructed"]})')
  if 'sw' in result:
    return (f'EVAL step={result["step"]}: SW={result["sw"]:.4f} floor={result["sw_floor"]:.4f} '
            f'(exact vs exact, n={result["num_generated"]}) SW/floor={result["sw_ratio"]:.2f}')
  if 'lsd' in result:     # audio against held-out clips (`audio.conditioning`)
    return f'EVAL step={result["step"]}: ' + ' '.join(
        f'{name}={result[k]:.3f}' + (f' (floor {result[k + "_floor"]:.3f})'
                                     if k + '_floor' in result else '')
        for k, name in (('lsd', 'LSD'), ('mcd', 'MCD'), ('mr_stft', 'MR-STFT')))
  if 'fd' not in result:
    return f'EVAL step={result["step"]}: evaluation disabled'
  return (f'EVAL step={result["step"]}: FD={result["fd"]:.3f} '
          f'floor={result["fd_floor"]:.3f} (real train vs real test, n={result["num_generated"]}) '
          f'FD/floor={result["fd_ratio"]:.2f} '
          f'classifier_test_acc={result["classifier_test_accuracy"]:.4f}'
          + (f' class_accuracy={result["class_accuracy"]:.4f}' if 'class_accuracy' in result
             else '')
          + (f' attribute_accuracy={result["attribute_accuracy"]:.4f} clip_score='
             f'{result["clip_score"]:.2f} (real {result["clip_score_real"]:.2f})'
             if 'clip_score' in result else ''))
