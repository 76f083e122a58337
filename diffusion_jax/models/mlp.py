"""MLP denoiser for low-dimensional data (2-D toys): `(x [B, D], t [B], cond) -> [B, D]`.

Any other input shape `[B, ...]` is flattened and the output reshaped back, so the same network
also runs on small images (e.g. 8x8 digits as 64-vectors) as a no-convolution baseline.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from diffusion_jax.models import initializers
from diffusion_jax.models import layers


class MLP(nn.Module):
  """Residual MLP with a noise-level embedding (and class embedding) added to every layer.

  `t` is continuous time in [0, 1] (or EDM's `c_noise`), embedded as the U-Net does
  (`embedding`, `time_scale`, `fourier_scale`). `num_classes > 0` adds a class embedding with a
  learned null label `num_classes` and `label_dropout` (classifier-free guidance); see
  `layers.parse_cond`. The output layer is zero-initialised, so the network outputs exactly
  zero at init. `dtype` is the compute dtype (parameters stay float32).

  `delta_input=True` adds a second time input `cond['delta']` (`[B]`, required then; MeanFlow's
  `t - r`, a shortcut model's step size), embedded like `t` by its own two Dense layers
  (`delta_dense_0/1`) and added to the time embedding; False leaves the network as it was.
  """
  hidden: int = 128
  depth: int = 3
  embedding: str = 'sinusoidal'
  time_scale: float = 1000.0
  fourier_scale: float = 16.0
  num_classes: int = 0
  label_dropout: float = 0.0
  dtype: Any = 'float32'
  delta_input: bool = False

  @nn.compact
  def __call__(self, x, t, cond=None, *, train: bool = False):
    if x.ndim < 2:
      raise ValueError(f'MLP: x must be [B, D] (or [B, ...], flattened), got shape {x.shape}')
    layers.check_fields('MLP', self, positive=('hidden',), non_negative=('depth', 'num_classes'),
                        probabilities=('label_dropout',))
    shape = x.shape
    x = x.reshape(shape[0], -1)  # [B, D]
    t = layers.check_inputs('MLP', x, t, ndim=2)
    c = layers.parse_cond('MLP', cond, shape[0], self.num_classes, 0,
                          delta_input=self.delta_input)
    dtype = layers.canonical_dtype('MLP', self.dtype)
    temb = layers.noise_embedding(t, self.hidden, self.embedding, self.time_scale,
                                  self.fourier_scale)
    kernel_init = initializers.lecun_normal()
    dense = lambda features, init=kernel_init: nn.Dense(features, dtype=dtype, kernel_init=init)
    temb = dense(self.hidden)(temb)
    temb = dense(self.hidden)(nn.silu(temb))                                       # [B, H]
    if self.delta_input:
      demb = layers.noise_embedding(c.delta, self.hidden, self.embedding, self.time_scale,
                                    self.fourier_scale)
      demb = nn.Dense(self.hidden, dtype=dtype, kernel_init=kernel_init, name='delta_dense_0')(demb)
      temb = temb + nn.Dense(self.hidden, dtype=dtype, kernel_init=kernel_init,
                             name='delta_dense_1')(nn.silu(demb))
    if self.num_classes > 0:
      labels = layers.drop_labels(self, c.labels, self.num_classes, self.label_dropout,
                                  train=train)
      temb = temb + nn.Embed(self.num_classes + 1, self.hidden, dtype=dtype,
                             embedding_init=initializers.embed_normal())(labels)
    h = dense(self.hidden)(x.astype(dtype))
    for _ in range(self.depth):
      h = h + dense(self.hidden)(nn.silu(dense(self.hidden)(nn.silu(h)) + temb))
    out = dense(x.shape[-1], initializers.zeros)(nn.silu(h))
    return out.astype(jnp.float32).reshape(shape)
