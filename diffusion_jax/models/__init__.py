"""Denoising networks, selected by name through `MODELS` (name → constructor).

The DDPM U-Net for images and an MLP for low-dimensional (2-D toy) data; a DiT
(Peebles & Xie 2023) comes later.
"""

from diffusion_jax.models.mlp import MLP
from diffusion_jax.models.unet import UNet

MODELS = {
    'unet': UNet,
    'mlp': MLP,
}
