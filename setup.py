"""diffusion_jax: diffusion and flow models in JAX/Flax, on one convention."""

import setuptools

INSTALL_REQUIRES = [
    # jax 0.11 and later need Python >= 3.12; on 3.10 / 3.11 pip takes 0.10.x, the floor that
    # `make test-floor` (CI) still checks.
    'jax>=0.10.0,<0.13',
    'flax>=0.12.0,<0.13',
    'optax>=0.2.4,<0.3',
    'orbax-checkpoint>=0.12.0,<0.13',
    'ml-collections>=1.0,<2',
    'tensorflow-datasets>=4.9.6,<5',
    'numpy>=1.26,<3',
    'scipy>=1.11,<2',
    'scikit-learn>=1.4,<2',
    'pillow>=10,<14',
    'matplotlib>=3.8,<4',
    'absl-py>=2.1,<3',
    'tqdm>=4.66,<5',
    'diffrax>=0.7,<0.8',
    'safetensors>=0.4,<1',
    'grain>=0.2.13,<0.3',         # data.loader; 0.2.13 is the newest for Python 3.10
]

EXTRAS_REQUIRE = {
    # Accelerators: JAX's CUDA plugin with pip-installed CUDA libraries (the NVIDIA driver each
    # needs is in JAX's installation guide), or libtpu. `cuda` is the old name of `cuda12`.
    'cuda12': ['jax[cuda12]>=0.10.0,<0.13'],
    'cuda13': ['jax[cuda13]>=0.10.0,<0.13'],
    'cuda': ['jax[cuda12]>=0.10.0,<0.13'],
    'tpu': ['jax[tpu]>=0.10.0,<0.13'],
    # Metric writers (`config.log.writers`): TensorBoard event files without TensorFlow, and W&B.
    'tb': ['tensorboardX>=2.6,<3'],
    'wandb': ['wandb>=0.17,<1'],
    'dev': [
        'tensorboardX>=2.6,<3',     # the tests read the real writers' files back
        'wandb>=0.17,<1',
        'pytest>=8,<10',
        'pytest-xdist>=3.5,<4',
        'ruff>=0.6',
        'chex>=0.1.87,<0.2',
    ],
}

setuptools.setup(
    name='diffusion_jax',
    version='0.1.0',
    description='Diffusion and flow models in JAX/Flax: objectives, samplers, models, training.',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.10',
    packages=setuptools.find_packages(include=['diffusion_jax', 'diffusion_jax.*']),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
