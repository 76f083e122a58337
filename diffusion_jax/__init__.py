"""diffusion_jax: diffusion and flow models in JAX/Flax, on one convention (DESIGN.md).

Public names, one dict per family, so configs, ablations and outside scripts select by name:
`PROCESSES`, `OBJECTIVES`, `SAMPLERS`, `MODELS` (name -> constructor or function).
"""

from diffusion_jax import analytic
from diffusion_jax import guidance
from diffusion_jax import inpainting
from diffusion_jax import interpolation
from diffusion_jax import parameterization
from diffusion_jax import processes
from diffusion_jax import objectives
from diffusion_jax import samplers
from diffusion_jax.models import MODELS
from diffusion_jax.objectives import OBJECTIVES
from diffusion_jax.parameterization import make_denoiser
from diffusion_jax.processes import PROCESSES
from diffusion_jax.processes import DiscreteVP
from diffusion_jax.samplers import SAMPLERS
from diffusion_jax.samplers import ddim_sample
from diffusion_jax.samplers import ddpm_sample

__version__ = '0.1.0'
