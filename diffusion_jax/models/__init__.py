"""Denoising networks, selected by name through `MODELS` (name → constructor).

Every model has the DESIGN §2 interface `model(x_t, t, cond, *, train) -> out`:
  unet  DDPM / DDPM++ / ADM U-Nets (`unet.py`), by config;
  dit   the diffusion transformer of Peebles & Xie 2023 (`dit.py`), sizes S/B/L/XL;
  mlp   a residual MLP for low-dimensional data (`mlp.py`);
  wavegrad  WaveGrad of Chen et al. 2021, a mel-conditioned waveform denoiser (`wavegrad.py`).
Conditioning (class labels with a null class and label dropout, cross-attended context) is
shared through `layers.py`.

Not denoisers, so not in `MODELS`: the first-stage autoencoders of latent diffusion, whose
latents other models diffuse, selected by name through `AUTOENCODERS` (`autoencoder.py`):
  kl  `AutoencoderKL`, the KL-VAE (Stable Diffusion's, `SD_VAE_CONFIG`);
  vq  `AutoencoderVQ`, LDM's VQ-regularised autoencoder, whose codebook is a `VectorQuantizer`;
and the VQ-VAE quantizer (`vq.py`: `quantize`, the EMA codebook, dead-code restarts,
`VectorQuantizer`). Their losses are in `diffusion_jax.autoencoder_losses`.

Text: `text.py` holds `TextEncoder` (a small Transformer trained with the denoiser),
`CLIPTextStates` (the CLIP text tower as an encoder) and `TextConditioned`, a denoiser that reads
token ids (`config.text`); `clip.py` the CLIP text and image towers (`CLIPModel`), whose
weights `weights.clip.load_clip` reads from a local Hugging Face folder.
"""

from diffusion_jax.models.autoencoder import (AUTOENCODERS, SD_VAE_CONFIG, AutoencoderKL,
                                              AutoencoderVQ)
from diffusion_jax.models.dit import DiT
from diffusion_jax.models.mlp import MLP
from diffusion_jax.models.unet import UNet
from diffusion_jax.models.vq import VectorQuantizer
from diffusion_jax.models.wavegrad import WaveGrad

MODELS = {
    'unet': UNet,
    'dit': DiT,
    'mlp': MLP,
    'wavegrad': WaveGrad,
}
