"""Datasets: embedded (digits) now; TFDS pipelines come with the data issue."""

from diffusion_jax.data.digits import load_digits
from diffusion_jax.data.sampler import batch_indices
