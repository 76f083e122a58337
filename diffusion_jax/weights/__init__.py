"""Pretrained-weight file I/O: `torch.save` state dicts read and written without torch
(`torch_files`) and converters of published weights to our Flax variables (`fid_inception`:
pytorch-fid's FID Inception; `sd_vae`: Stable Diffusion's VAE from `.safetensors`; `clip`:
Hugging Face CLIP text / image towers from a local config.json + model.safetensors folder)."""

from diffusion_jax.weights.clip import clip_variables
from diffusion_jax.weights.clip import load_clip
from diffusion_jax.weights.fid_inception import convert_pytorch_fid_weights
from diffusion_jax.weights.fid_inception import state_dict_to_variables
from diffusion_jax.weights.fid_inception import variables_to_state_dict
from diffusion_jax.weights.sd_vae import autoencoder_kl_variables
from diffusion_jax.weights.sd_vae import load_autoencoder_kl
from diffusion_jax.weights.torch_files import load_torch_state_dict
from diffusion_jax.weights.torch_files import save_torch_state_dict

__all__ = [
    'autoencoder_kl_variables',
    'clip_variables',
    'convert_pytorch_fid_weights',
    'load_autoencoder_kl',
    'load_clip',
    'load_torch_state_dict',
    'save_torch_state_dict',
    'state_dict_to_variables',
    'variables_to_state_dict',
]
