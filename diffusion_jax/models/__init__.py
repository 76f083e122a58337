"""Denoising networks, selected by name through `MODELS` (name → constructor).

Only the DDPM U-Net exists so far; a DiT (Peebles & Xie 2023) and an MLP for 2-D toy data
come later.
"""

from diffusion_jax.models.unet import UNet

MODELS = {
    'unet': UNet,
}
