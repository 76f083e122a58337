"""The FID feature network: InceptionV3 pool3 (2048 features) and its 1008-way logits.

This is the "FID Inception" of Heusel et al. (2017; the TTUR code), i.e. the 2015-12-05 TF graph
(Szegedy et al. 2016, "Rethinking the Inception Architecture") as ported by pytorch-fid. It is
torchvision's `inception_v3` with the differences of that graph: 1008 classes, no auxiliary head,
3x3 average pools that leave the zero padding out of the count (Mixed_5b-d, 6b-e, 7b), and a 3x3
*max* pool in the last block's pool branch (Mixed_7c). Each conv is conv (no bias) -> BatchNorm
(eps 1e-3, stored statistics) -> ReLU.

Input: images `[B, H, W, C]` float in [-1, 1], C = 1 (repeated to RGB) or 3, any H x W; they are
resized to 299 x 299 bilinearly with half-pixel centres and no antialiasing, as pytorch-fid does.

Weights: the commonly distributed PyTorch file `pt_inception-2015-12-05-6726825d.pth` is
converted without torch (`diffusion_jax.weights.fid_inception`) to an `.npz` that
`load_inception_params` reads; see docs/fid_inception.md.

  variables = load_inception_params('fid_inception.npz')
  features, logits = inception_features(variables, images)     # [N, 2048], [N, 1008]
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008  # the 2015 graph's softmax: 1000 ImageNet classes + 8 unused

# ---------------------------------------------------------------------------------------------
# The network. Module names are pytorch-fid's attribute names, so that a state-dict key is the
# Flax path joined by dots (`Mixed_5b.branch1x1.conv.weight` <-> params/Mixed_5b/branch1x1/conv).


class _ConvBN(nn.Module):
  """torchvision's BasicConv2d: conv without bias -> BatchNorm(eps=1e-3) -> ReLU."""

  features: int
  kernel: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)  # symmetric, per spatial axis, as torch's Conv2d
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, self.kernel, self.strides, padding=[(p, p) for p in self.padding],
                use_bias=False, precision=self.precision, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  # TF's AvgPool with SAME padding averages over the in-image taps only.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_3x3_stride2(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class _InceptionA(nn.Module):
  """Mixed_5b/c/d (35 x 35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

  pool_features: int
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(_ConvBN, precision=self.precision)
    b1 = conv(64, (1, 1), name='branch1x1')(x)
    b5 = conv(48, (1, 1), name='branch5x5_1')(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(b5)
    b3 = conv(64, (1, 1), name='branch3x3dbl_1')(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(b3)
    bp = conv(self.pool_features, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class _InceptionB(nn.Module):
  """Mixed_6a (35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(_ConvBN, precision=self.precision)
    b3 = conv(384, (3, 3), strides=(2, 2), name='branch3x3')(x)
    bd = conv(64, (1, 1), name='branch3x3dbl_1')(x)
    bd = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = conv(96, (3, 3), strides=(2, 2), name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class _InceptionC(nn.Module):
  """Mixed_6b-e (17 x 17), factorised 7x7: 1x1 | 1x7-7x1 | 7x1-1x7-7x1-1x7 | avgpool-1x1."""

  channels_7x7: int
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(_ConvBN, precision=self.precision)
    c7 = self.channels_7x7
    b1 = conv(192, (1, 1), name='branch1x1')(x)
    b7 = conv(c7, (1, 1), name='branch7x7_1')(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(b7)
    bd = conv(c7, (1, 1), name='branch7x7dbl_1')(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(bd)
    bp = conv(192, (1, 1), name='branch_pool')(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class _InceptionD(nn.Module):
  """Mixed_7a (17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(_ConvBN, precision=self.precision)
    b3 = conv(192, (1, 1), name='branch3x3_1')(x)
    b3 = conv(320, (3, 3), strides=(2, 2), name='branch3x3_2')(b3)
    b7 = conv(192, (1, 1), name='branch7x7x3_1')(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = conv(192, (3, 3), strides=(2, 2), name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class _InceptionE(nn.Module):
  """Mixed_7b/c (8 x 8), expanded: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1.

  The pool is a padding-excluding average in Mixed_7b and a 3x3/1 max pool in Mixed_7c, as in
  the 2015 graph (pytorch-fid's FIDInceptionE_1 / FIDInceptionE_2).
  """

  max_pool: bool
  precision: Any = None

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(_ConvBN, precision=self.precision)
    b1 = conv(320, (1, 1), name='branch1x1')(x)
    b3 = conv(384, (1, 1), name='branch3x3_1')(x)
    b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(b3),
                          conv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(b3)], axis=-1)
    bd = conv(448, (1, 1), name='branch3x3dbl_1')(x)
    bd = conv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(bd),
                          conv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(bd)], axis=-1)
    if self.max_pool:  # max pools pad with -inf, so the padding never wins
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = conv(192, (1, 1), name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class _Logits(nn.Module):
  """The 2048 -> 1008 softmax layer, with the bias optional (see `InceptionV3.logits_bias`)."""

  precision: Any = None

  @nn.compact
  def __call__(self, x, use_bias: bool):
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (FEATURE_DIM, NUM_CLASSES))
    bias = self.param('bias', nn.initializers.zeros, (NUM_CLASSES,))
    y = jnp.dot(x, kernel, precision=self.precision)
    return y + bias if use_bias else y


def resize_bilinear(images, size: int = INPUT_SIZE):
  """Resizes `[B, H, W, C]` to `[B, size, size, C]`: bilinear, half-pixel centres, no antialias.

  Output pixel i samples the input at u = (i + 0.5) * H / size - 0.5 and interpolates its two
  neighbours floor(u), floor(u) + 1, an out-of-range u (< 0 or > H - 1, only when upsampling)
  taking the edge pixel: torch's `F.interpolate(mode='bilinear', align_corners=False)` used by
  pytorch-fid, and TF2's `tf.image.resize(antialias=False)`. (The TF1 op inside the 2015 graph
  uses u = i * H / size instead; see docs/fid_inception.md.) `jax.image.resize` with
  `antialias=False` is exactly this: its triangle kernel spans one input pixel on each side and
  its weights are renormalised where they fall off the image.
  """
  b, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  return jax.image.resize(images, (b, size, size, c), method='bilinear', antialias=False)


def _to_network_input(images):
  # [B, H, W, C] in [-1, 1], C in {1, 3} -> [B, 299, 299, 3]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'InceptionV3: expected images [B, H, W, C] with C = 1 or 3, got shape '
                     f'{images.shape}')
  if images.shape[-1] == 1:
    images = jnp.repeat(images, 3, axis=-1)
  return resize_bilinear(images.astype(jnp.float32))


class InceptionV3(nn.Module):
  """FID InceptionV3 (see the module docstring): images -> (pool3 `[B, 2048]`, logits `[B, 1008]`).

  Attributes:
    logits_bias: whether the logits include the softmax layer's bias. The Inception Score's
      reference code (Salimans et al. 2016, `openai/improved-gan`) multiplies pool3 by the
      `softmax/logits/MatMul` weights only, so the default leaves the bias out; True gives the
      classifier's own logits.
    precision: of the convolutions and the final matmul; 'highest' keeps float32 on
      accelerators whose default is a lower-precision (TF32 / bfloat16) pass.
  """

  logits_bias: bool = False
  precision: Any = 'highest'

  @nn.compact
  def __call__(self, images):
    x = _to_network_input(images)  # [B, 299, 299, 3]
    conv = functools.partial(_ConvBN, precision=self.precision)
    x = conv(32, (3, 3), strides=(2, 2), name='Conv2d_1a_3x3')(x)  # [B, 149, 149, 32]
    x = conv(32, (3, 3), name='Conv2d_2a_3x3')(x)  # [B, 147, 147, 32]
    x = conv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)  # [B, 147, 147, 64]
    x = _max_pool_3x3_stride2(x)  # [B, 73, 73, 64]
    x = conv(80, (1, 1), name='Conv2d_3b_1x1')(x)  # [B, 73, 73, 80]
    x = conv(192, (3, 3), name='Conv2d_4a_3x3')(x)  # [B, 71, 71, 192]
    x = _max_pool_3x3_stride2(x)  # [B, 35, 35, 192]
    p = self.precision
    x = _InceptionA(32, precision=p, name='Mixed_5b')(x)  # [B, 35, 35, 256]
    x = _InceptionA(64, precision=p, name='Mixed_5c')(x)  # [B, 35, 35, 288]
    x = _InceptionA(64, precision=p, name='Mixed_5d')(x)  # [B, 35, 35, 288]
    x = _InceptionB(precision=p, name='Mixed_6a')(x)  # [B, 17, 17, 768]
    x = _InceptionC(128, precision=p, name='Mixed_6b')(x)
    x = _InceptionC(160, precision=p, name='Mixed_6c')(x)
    x = _InceptionC(160, precision=p, name='Mixed_6d')(x)
    x = _InceptionC(192, precision=p, name='Mixed_6e')(x)  # [B, 17, 17, 768]
    x = _InceptionD(precision=p, name='Mixed_7a')(x)  # [B, 8, 8, 1280]
    x = _InceptionE(max_pool=False, precision=p, name='Mixed_7b')(x)  # [B, 8, 8, 2048]
    x = _InceptionE(max_pool=True, precision=p, name='Mixed_7c')(x)  # [B, 8, 8, 2048]
    features = jnp.mean(x, axis=(1, 2))  # pool3, [B, 2048]
    logits = _Logits(precision=p, name='fc')(features, self.logits_bias)  # [B, 1008]
    return features, logits


@functools.lru_cache(maxsize=None)
def variable_shapes() -> dict[str, tuple[int, ...]]:
  """`'collection/module/.../leaf'` -> shape of every variable (params and batch_stats)."""
  abstract = jax.eval_shape(InceptionV3().init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract, sep='/').items()}


# ---------------------------------------------------------------------------------------------
# Features in fixed-size chunks.


@jax.jit
def _prepare(images):
  return _to_network_input(images)


@functools.partial(jax.jit, static_argnames=('logits_bias',))
def _apply(variables, x, logits_bias: bool):
  return InceptionV3(logits_bias=logits_bias).apply(variables, x)


def weights_digest(variables) -> str:
  """SHA-256 of the network's variables (names, shapes and float32 values, in name order): the
  identity of a weights file, whatever container holds it. Reference statistics record it
  (`experiments.fid_stats`), so FID is never taken between features of two different networks."""
  flat = traverse_util.flatten_dict(jax.device_get(variables), sep='/')
  h = hashlib.sha256()
  for k in sorted(flat):
    a = np.ascontiguousarray(np.asarray(flat[k], np.float32))
    h.update(f'{k}|{a.shape}|'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def check_digest(variables, expected: str, where: str) -> None:
  """Refuses weights whose `weights_digest` is not `expected` (one line naming `where`), so a
  run pinned to one Inception conversion never measures with another."""
  digest = weights_digest(variables)
  if expected and digest != expected.strip().lower():
    raise ValueError(f'{where}: Inception weights digest {digest} is not the pinned '
                     f'{expected.strip().lower()} (config.eval.inception_sha256)')


def feature_name(variables) -> str:
  """The feature space of these weights, as reference statistics record it."""
  return f'inception_pool3:{weights_digest(variables)[:16]}'


def inception_features(variables, images, *, batch_size: int = 50,
                       logits_bias: bool = False, mesh=None) -> tuple[np.ndarray, np.ndarray]:
  """pool3 features `[N, 2048]` and logits `[N, 1008]` (float32) of images `[N, H, W, C]`.

  Images are float in [-1, 1] (clip and, to match reference numbers, quantise samples to 8 bits
  first), C = 1 or 3. They go through in chunks of `batch_size`, the last one padded, so memory
  is bounded and the network compiles once per batch size (the resize once per input shape).
  The features feed `frechet.FeatureStats` (which accumulates in float64), the logits
  `classifier_scores.inception_score`; `logits_bias` as in `InceptionV3`. With `mesh`, each
  chunk is split over the mesh's devices (`parallel.map_batches`; every process passes the
  same images and gets all the features).
  """
  if not hasattr(images, 'dtype'):
    images = np.asarray(images)  # numpy and jax arrays (and memmaps) are sliced per chunk as-is
  if np.dtype(images.dtype).kind != 'f':
    raise ValueError(f'inception_features: expected float images in [-1, 1], got dtype '
                     f'{images.dtype}; convert uint8 with x / 127.5 - 1')
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'inception_features: expected images [N, H, W, C] with C = 1 or 3, got '
                     f'shape {images.shape}')
  if batch_size < 1:
    raise ValueError(f'inception_features: batch_size must be >= 1, got {batch_size}')
  if mesh is not None:
    from diffusion_jax import parallel  # pylint: disable=g-import-not-at-top
    variables = jax.device_put(variables, parallel.replicated(mesh))
    apply = lambda x: _apply(variables, _prepare(x), logits_bias)
    if len(images) == 0:
      return np.zeros((0, FEATURE_DIM), np.float32), np.zeros((0, NUM_CLASSES), np.float32)
    return parallel.map_batches(apply, images, batch_size, mesh)
  variables = jax.device_put(variables)  # once, not per chunk
  features, logits = [], []
  for start in range(0, len(images), batch_size):
    chunk = np.asarray(images[start:start + batch_size], np.float32)
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.zeros((batch_size - n,) + chunk.shape[1:], np.float32)])
    f, lg = _apply(variables, _prepare(chunk), logits_bias)
    features.append(np.asarray(f)[:n])
    logits.append(np.asarray(lg)[:n])
  if not features:
    return np.zeros((0, FEATURE_DIM), np.float32), np.zeros((0, NUM_CLASSES), np.float32)
  return np.concatenate(features), np.concatenate(logits)


# ---------------------------------------------------------------------------------------------
# Our weights file: an .npz of the flattened variables, keys 'params/Mixed_5b/branch1x1/conv/
# kernel', 'batch_stats/Mixed_5b/branch1x1/bn/mean', ...


def save_inception_params(path: str, variables) -> None:
  """Writes `variables` (`{'params': ..., 'batch_stats': ...}`) as the `.npz` read below."""
  flat = traverse_util.flatten_dict(jax.device_get(variables), sep='/')
  check_variables(flat, f'save_inception_params: {path}')
  with open(path, 'wb') as f:  # a file object: np.savez would append '.npz' to a bare name
    np.savez(f, **{k: np.asarray(v, np.float32) for k, v in flat.items()})


def load_inception_params(path: str):
  """Reads the `.npz` of `save_inception_params` (or `weights.convert_pytorch_fid_weights`).

  Returns:
    `{'params': ..., 'batch_stats': ...}` for `InceptionV3().apply` / `inception_features`.
  """
  if not os.path.isfile(path):
    raise ValueError(f'load_inception_params: {path} does not exist; convert the pytorch-fid '
                     'weights first (docs/fid_inception.md)')
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {k: data[k] for k in data.files}
  except Exception as e:  # pylint: disable=broad-except
    # A damaged file surfaces as BadZipFile, OSError, EOFError, ValueError, ...
    raise ValueError(f'load_inception_params: cannot read {path} '
                     f'({type(e).__name__}: {e})') from None
  check_variables(flat, f'load_inception_params: {path}')
  return traverse_util.unflatten_dict({k: np.asarray(v, np.float32) for k, v in flat.items()},
                                      sep='/')


def check_variables(flat: Mapping[str, Any], where: str) -> None:
  """Fails (naming `where`) unless `flat` (`'params/Mixed_5b/...'` -> array) holds exactly the
  network's variables, float, each of its shape."""
  expected = variable_shapes()
  missing = [k for k in expected if k not in flat]
  unexpected = [k for k in flat if k not in expected]
  more = lambda names: f' (and {len(names) - 1} more)' if len(names) > 1 else ''
  if missing:
    raise ValueError(f'{where} lacks {missing[0]!r}{more(missing)}; not an InceptionV3 file?')
  if unexpected:
    raise ValueError(f'{where} has unexpected key {unexpected[0]!r}{more(unexpected)}')
  for k, shape in expected.items():
    got = np.shape(flat[k])
    if got != shape:
      raise ValueError(f'{where}: {k!r} has shape {got}, InceptionV3 expects {shape}')
    if np.asarray(flat[k]).dtype.kind != 'f':
      raise ValueError(f'{where}: {k!r} has dtype {np.asarray(flat[k]).dtype}, expected float')
