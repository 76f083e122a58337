"""Classifier-free guidance, guidance rescale and interval (diffusion_jax.guidance) against
closed forms, on a 2-class Gaussian problem whose class-conditional and unconditional denoisers
are exact (`tests.guidance_testing`).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax import guidance
from diffusion_jax import samplers
from tests.guidance_testing import NULL
from tests.guidance_testing import PROC
from tests.guidance_testing import class_denoisers
from tests.guidance_testing import labelled_denoiser
from tests.sampler_testing import counting


def batch(b=16, seed=0):
  kx, kt, kc = jax.random.split(jax.random.key(seed), 3)
  x = 1.5 * jax.random.normal(kx, (b, 3))
  t = jax.random.uniform(kt, (b,), minval=0.05, maxval=0.95)
  labels = jax.random.randint(kc, (b,), 0, 2)
  return x, t, labels


def conditional(x, t, labels):
  den0, den1, _ = class_denoisers()
  (a0, e0), (a1, e1) = den0(x, t), den1(x, t)
  c = labels[:, None] == 0
  return jnp.where(c, a0, a1), jnp.where(c, e0, e1)


# --- classifier-free guidance ----------------------------------------------------------------


def test_cfg_scale_one_is_conditional_and_zero_unconditional_exactly():
  x, t, labels = batch()
  den = labelled_denoiser()
  x0_c, eps_c = conditional(x, t, labels)
  x0_u, eps_u = class_denoisers()[2](x, t)
  for scale, (x0_ref, eps_ref) in ((1.0, (x0_c, eps_c)), (0.0, (x0_u, eps_u))):
    x0, eps = guidance.classifier_free_guidance(den, scale, NULL)(x, t, labels)
    np.testing.assert_array_equal(x0, x0_ref)
    np.testing.assert_array_equal(eps, eps_ref)


@pytest.mark.parametrize('scale', [0.5, 2.0, 4.0])
def test_cfg_matches_independent_combination(scale):
  x, t, labels = batch(seed=1)
  guided = guidance.classifier_free_guidance(labelled_denoiser(), scale, NULL)
  x0, eps = guided(x, t, labels)
  x0_c, eps_c = conditional(x, t, labels)
  x0_u, eps_u = class_denoisers()[2](x, t)
  np.testing.assert_allclose(eps, eps_u + scale * (eps_c - eps_u), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(x0, x0_u + scale * (x0_c - x0_u), rtol=1e-5, atol=1e-5)
  alpha, sigma = PROC.alpha(t)[:, None], PROC.sigma(t)[:, None]
  np.testing.assert_allclose(alpha * x0 + sigma * eps, x, rtol=1e-5, atol=1e-5)
  # Per-example scales [B] and a scalar t work too.
  scales = jnp.linspace(0.0, 3.0, x.shape[0])
  x0_b, _ = guidance.classifier_free_guidance(labelled_denoiser(), scales, NULL)(x, 0.4, labels)
  x0_c, _ = conditional(x, jnp.full_like(t, 0.4), labels)
  x0_u, _ = class_denoisers()[2](x, jnp.full_like(t, 0.4))
  np.testing.assert_allclose(x0_b, x0_u + scales[:, None] * (x0_c - x0_u), rtol=1e-5, atol=1e-5)


def test_cfg_one_batched_call_with_pytree_cond():
  x, t, labels = batch(b=5)
  seen = []
  cond = {'label': labels, 'emb': jnp.ones((5, 4))}
  null = {'label': NULL, 'emb': jnp.zeros(4)}
  guided = guidance.classifier_free_guidance(labelled_denoiser(seen), 3.0, null)
  x0, _ = guided(x, t, cond)
  assert seen == [((10, 3), (10,), {'emb': (10, 4), 'label': (5 * 2,)})]
  ref, _ = guidance.classifier_free_guidance(labelled_denoiser(), 3.0, NULL)(x, t, labels)
  np.testing.assert_array_equal(x0, ref)
  # One array for every leaf, and the batch really holds cond then null_cond.
  got = []
  def spy(x, t, cond):
    got.append(cond)
    return x, jnp.zeros_like(x)
  guidance.classifier_free_guidance(spy, 2.0, 7)(x, t, {'a': labels, 'b': labels + 10})
  np.testing.assert_array_equal(got[0]['a'], np.concatenate([labels, np.full(5, 7)]))
  np.testing.assert_array_equal(got[0]['b'], np.concatenate([labels + 10, np.full(5, 7)]))
  with pytest.raises(ValueError, match='needs cond'):
    guided(x, t, None)
  with pytest.raises(ValueError, match='need'):
    guidance.classifier_free_guidance(spy, 2.0, 7, rescale=0.7)


def test_cfg_attributes():
  den = labelled_denoiser()
  guided = guidance.classifier_free_guidance(den, 2.0, NULL)
  assert guided.evals_per_call == 2 and guided.kind == 'eps'
  den = dataclasses.replace(den, evals_per_call=3)   # e.g. an inner ensemble of 3
  assert guidance.classifier_free_guidance(den, 2.0, NULL).evals_per_call == 6


def test_guidance_rescale():
  x, t, labels = batch(seed=2)
  den = labelled_denoiser()
  x0_c, _ = conditional(x, t, labels)
  plain = guidance.classifier_free_guidance(den, 5.0, NULL)
  x0_g, _ = plain(x, t, labels)
  std = lambda a: jnp.std(a, axis=1)
  assert np.mean(std(x0_g) / std(x0_c)) > 2         # guidance inflates the std here
  alpha, sigma = PROC.alpha(t)[:, None], PROC.sigma(t)[:, None]
  for phi in (1.0, 0.7):
    x0, eps = guidance.classifier_free_guidance(den, 5.0, NULL, rescale=phi, process=PROC)(
        x, t, labels)
    factor = phi * std(x0_c) / std(x0_g) + (1 - phi)
    np.testing.assert_allclose(x0, x0_g * factor[:, None], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alpha * x0 + sigma * eps, x, rtol=1e-5, atol=1e-5)
    if phi == 1.0:
      np.testing.assert_allclose(std(x0), std(x0_c), rtol=1e-5)


def test_guidance_interval():
  x, t, labels = batch(b=32, seed=3)
  den = labelled_denoiser()
  x0_c, eps_c = conditional(x, t, labels)
  x0_g, eps_g = guidance.classifier_free_guidance(den, 3.0, NULL)(x, t, labels)
  lo, hi = 0.3, 0.7
  x0, eps = guidance.classifier_free_guidance(den, 3.0, NULL, interval=(lo, hi))(x, t, labels)
  inside = np.asarray((t >= lo) & (t <= hi))
  assert 0 < inside.sum() < inside.size
  np.testing.assert_array_equal(x0[~inside], x0_c[~inside])
  np.testing.assert_array_equal(eps[~inside], eps_c[~inside])
  np.testing.assert_array_equal(x0[inside], x0_g[inside])
  np.testing.assert_array_equal(eps[inside], eps_g[inside])
  # In EDM's sigma / alpha: the same set of examples for the matching interval.
  s_of = lambda tt: float(PROC.sigma(jnp.asarray(tt)) / PROC.alpha(jnp.asarray(tt)))
  guided_s = guidance.classifier_free_guidance(den, 3.0, NULL, interval=(s_of(lo), s_of(hi)),
                                               interval_in='sigma', process=PROC)
  x0_s, _ = guided_s(x, t, labels)
  np.testing.assert_array_equal(x0_s, x0)
  assert guided_s.evals_per_call == 2     # both halves are computed even outside the interval


def test_cfg_nfe_is_counted_honestly():
  b = 8
  x_T = jax.random.normal(jax.random.key(4), (b, 3))
  labels = jnp.arange(b) % 2
  # Heun's few-step default grid takes its first step as one Euler call: 2 * 4 - 2 calls.
  for name, steps, calls in (('euler', 6, 6), ('ddpm', 10, 10), ('heun', 4, 6)):
    seen = []
    inner, count = counting(labelled_denoiser(seen))
    guided = guidance.classifier_free_guidance(inner, 2.5, NULL, interval=(0.1, 0.9))
    x, info = samplers.SAMPLERS[name](guided, PROC, x_T, jax.random.key(5), steps=steps,
                                      cond=labels)
    jax.effects_barrier()
    assert count() == calls, name
    assert info['nfe'] == 2 * calls and info['denoiser_calls'] == calls, (name, info)
    assert {s[0][0] for s in seen} == {2 * b}, name
    assert np.all(np.isfinite(x))


def test_rescale_and_interval_wrappers_compose_to_the_flags_exactly():
  x, t, labels = batch(b=32, seed=6)
  den = labelled_denoiser()
  s_interval = (0.5, 3.0)   # in sigma / alpha: some of the batch lies outside
  cases = [dict(rescale=0.7, process=PROC),
           dict(interval=(0.3, 0.7)),
           dict(rescale=1.0, interval=s_interval, interval_in='sigma', process=PROC),
           dict(rescale=0.7, interval=(0.3, 0.7), process=PROC)]
  for flags in cases:
    composed = guidance.classifier_free_guidance(den, 3.0, NULL)
    if flags.get('rescale'):
      composed = guidance.guidance_rescale(composed, flags['rescale'], PROC)
    if flags.get('interval'):
      composed = guidance.guidance_interval(composed, flags['interval'],
                                            interval_in=flags.get('interval_in', 't'),
                                            process=flags.get('process'))
    flagged = guidance.classifier_free_guidance(den, 3.0, NULL, **flags)
    for a, b in zip(composed(x, t, labels), flagged(x, t, labels), strict=True):
      np.testing.assert_array_equal(a, b)
    jitted = [jax.jit(f)(x, t, labels) for f in (composed, flagged)]
    for a, b in zip(*jitted, strict=True):
      np.testing.assert_array_equal(a, b)
    assert composed.evals_per_call == flagged.evals_per_call == 2
    assert composed.kind == flagged.kind == 'eps'
  # The rescale really acts under the interval: outside it, the conditional prediction.
  x0_c, _ = conditional(x, t, labels)
  both = guidance.guidance_interval(guidance.guidance_rescale(
      guidance.classifier_free_guidance(den, 3.0, NULL), 0.7, PROC), (0.3, 0.7))
  outside = np.asarray((t < 0.3) | (t > 0.7))
  np.testing.assert_array_equal(both(x, t, labels)[0][outside], x0_c[outside])
  # phi = 0 is the guided denoiser itself; wrapping a plain denoiser is an error.
  plain = guidance.classifier_free_guidance(den, 3.0, NULL)
  assert guidance.guidance_rescale(plain, 0.0, PROC) is plain
  with pytest.raises(ValueError, match='classifier_free_guidance denoiser'):
    guidance.guidance_rescale(den, 0.7, PROC)
  with pytest.raises(ValueError, match='classifier_free_guidance denoiser'):
    guidance.guidance_interval(den, (0.3, 0.7))
  with pytest.raises(ValueError, match='needs process'):
    guidance.guidance_interval(plain, (0.3, 0.7), interval_in='sigma')
  with pytest.raises(ValueError, match=r'\[0, 1\]'):
    guidance.guidance_rescale(plain, 1.5, PROC)
