"""Sample-quality metrics: Fréchet distance, KID / MMD, precision and recall, Inception Score,
sliced Wasserstein; the FID InceptionV3 (its weights are converted by `diffusion_jax.weights`)
and the digits classifier whose features they use on the embedded data."""

from diffusion_jax.metrics.digits_classifier import (
    DEFAULT_RECIPE,
    DigitsClassifier,
    classifier_accuracy,
    classifier_features,
    classifier_logits,
    digits_classifier_cache_path,
    digits_fd,
    digits_fd_eval,
    digits_fd_floor,
    digits_reference_stats,
    load_or_train_digits_classifier,
    train_digits_classifier,
)
from diffusion_jax.metrics.frechet import (
    FeatureStats,
    frechet_distance,
    frechet_distance_from_features,
    frechet_distance_from_stats,
    load_stats,
    save_stats,
)
from diffusion_jax.metrics.classifier_scores import inception_score
from diffusion_jax.metrics.inception import (
    InceptionV3,
    inception_features,
    load_inception_params,
    save_inception_params,
)
from diffusion_jax.metrics.kernel import kid, mmd2_unbiased, mmd_rbf, polynomial_kernel, rbf_kernel
from diffusion_jax.metrics.manifold import knn_radii, precision_recall
from diffusion_jax.metrics.sliced import sliced_wasserstein

__all__ = [
    'DEFAULT_RECIPE',
    'DigitsClassifier',
    'FeatureStats',
    'InceptionV3',
    'classifier_accuracy',
    'classifier_features',
    'classifier_logits',
    'digits_classifier_cache_path',
    'digits_fd',
    'digits_fd_eval',
    'digits_fd_floor',
    'digits_reference_stats',
    'frechet_distance',
    'frechet_distance_from_features',
    'frechet_distance_from_stats',
    'inception_features',
    'inception_score',
    'kid',
    'load_inception_params',
    'load_stats',
    'save_inception_params',
    'save_stats',
    'knn_radii',
    'mmd2_unbiased',
    'mmd_rbf',
    'polynomial_kernel',
    'precision_recall',
    'rbf_kernel',
    'sliced_wasserstein',
    'load_or_train_digits_classifier',
    'train_digits_classifier',
]
