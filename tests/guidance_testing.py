"""The 2-class Gaussian problem shared by the guidance and inpainting tests: exact class-
conditional denoisers (`analytic.gaussian_denoiser` per class) and the exact unconditional one
(`gmm_denoiser` for the 50/50 mixture), behind one labelled denoiser."""

import jax
import jax.numpy as jnp
import numpy as np

from diffusion_jax import analytic
from diffusion_jax import parameterization
from diffusion_jax import processes

PROC = processes.DiscreteVP.from_name('linear', 1000)
MEANS = np.array([[1.0, -1.0, 0.5], [-1.0, 2.0, 0.0]])   # class 0, class 1
S2 = np.array([0.3, 0.5, 0.2])
NULL = 2                                                  # the "null" label


def class_denoisers():
  """`(den0, den1, den_u)`: exact denoisers of each class and of the 50/50 mixture."""
  den0, den1 = (analytic.gaussian_denoiser(MEANS[k], S2, PROC) for k in range(2))
  den_u = analytic.gmm_denoiser(np.array([0.5, 0.5]), MEANS, np.stack([S2, S2]), PROC)
  return den0, den1, den_u


def labelled_denoiser(seen=None):
  """One denoiser for all labels: 0, 1 (conditional) and NULL (unconditional)."""
  den0, den1, den_u = class_denoisers()

  def den(x, t, cond):
    if seen is not None:
      seen.append((x.shape, jnp.shape(t), jax.tree.map(jnp.shape, cond)))
    label = cond['label'] if isinstance(cond, dict) else cond
    outs = [d(x, t) for d in (den0, den1, den_u)]
    pick = lambda i: jnp.where(label[:, None] == 0, outs[0][i],
                               jnp.where(label[:, None] == 1, outs[1][i], outs[2][i]))
    return pick(0), pick(1)

  return parameterization.Denoiser(den, kind='eps')
