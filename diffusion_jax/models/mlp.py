"""MLP denoiser for low-dimensional data (2-D toys): `(x [B, D], t [B], cond) -> [B, D]`."""

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models.unet import timestep_embedding


class MLP(nn.Module):
  """Residual MLP with a sinusoidal time embedding added to every hidden layer.

  `t` is continuous time in [0, 1] (or EDM's `c_noise`), embedded after scaling by `time_scale`
  as the U-Net does; `num_classes > 0` adds a class embedding with a null label `num_classes`.
  """
  hidden: int = 128
  depth: int = 3
  time_scale: float = 1000.0
  num_classes: int = 0

  @nn.compact
  def __call__(self, x, t, cond=None, *, train: bool = False):
    del train
    if x.ndim != 2:
      raise ValueError(f'MLP: x must be [B, D], got shape {x.shape}')
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
    temb = timestep_embedding(t * self.time_scale, self.hidden)
    temb = nn.Dense(self.hidden)(nn.silu(nn.Dense(self.hidden)(temb)))           # [B, H]
    if self.num_classes > 0:
      labels = jnp.full(x.shape[:1], self.num_classes) if cond is None else cond
      temb = temb + nn.Embed(self.num_classes + 1, self.hidden)(labels)
    h = nn.Dense(self.hidden)(x)
    for _ in range(self.depth):
      h = h + nn.Dense(self.hidden)(nn.silu(nn.Dense(self.hidden)(nn.silu(h)) + temb))
    return nn.Dense(x.shape[-1], kernel_init=nn.initializers.zeros)(nn.silu(h))
