"""Sample-quality metrics: Fréchet distance and the digits classifier that gives it features."""

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
)

__all__ = [
    'DEFAULT_RECIPE',
    'DigitsClassifier',
    'FeatureStats',
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
    'load_or_train_digits_classifier',
    'train_digits_classifier',
]
