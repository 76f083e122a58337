"""Reference configs build the published models: parameter counts against the papers.

Counts use `jax.eval_shape` on `init` (nothing is allocated), so even DiT-XL/2 costs seconds.
Every reference config is also validated whole (process, objective, model, sampler) by
`run_config.build` at the image shape it was written for.
"""

import importlib
import math

import jax
import jax.numpy as jnp
import pytest

from diffusion_jax import run_config


def _config(name, variant=None):
  module = importlib.import_module(f'configs.{name}')
  config = module.get_config(variant) if variant is not None else module.get_config()
  return module, config


def count_params(model, image_shape, num_classes=0):
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  cond = jax.ShapeDtypeStruct((1,), jnp.int32) if num_classes else None
  shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, cond)
  return sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))


# (config, variant, published count, source). Our class tables have one extra (null) row.
PUBLISHED = [
    # Ho et al. 2020, App. B: "35.7 million parameters"; the official TF code's count is exact.
    ('ddpm_cifar10', None, 35_746_307, 'DDPM CIFAR-10'),
    # The DDPM++ cont. (VP) and ADM ImageNet-64 sizes as tabulated by Karras et al. 2022 (EDM).
    ('ddpm_cifar10', 'ddpmpp', 61.80e6, 'DDPM++ cont. CIFAR-10'),
    ('adm_imagenet64', None, 295.90e6, 'ADM ImageNet-64'),
    # Peebles & Xie 2023, Table 1 / 4.
    ('dit', 'S/2', 33e6, 'DiT-S/2'),
    ('dit', 'B/2', 130e6, 'DiT-B/2'),
    ('dit', 'L/2', 458e6, 'DiT-L/2'),
    ('dit', 'XL/2', 675e6, 'DiT-XL/2'),
]


@pytest.mark.parametrize('name, variant, published, what', PUBLISHED,
                         ids=[p[3] for p in PUBLISHED])
def test_parameter_count_matches_paper(name, variant, published, what):
  module, config = _config(name, variant)
  model = run_config.build_model(config.model)
  count = count_params(model, module.IMAGE_SHAPE, config.model.get('num_classes', 0))
  print(f'{what}: {count:,} parameters (paper {published / 1e6:.2f} M)')
  if isinstance(published, int):
    assert count == published
  assert abs(count / published - 1) < 0.01, f'{what}: {count:,} vs {published:,.0f}'


@pytest.mark.parametrize('name, variant', [
    ('ddpm_cifar10', None), ('ddpm_cifar10', 'ddpmpp'), ('adm_imagenet64', None),
    ('dit', 'S/8'), ('dit', 'XL/2'),
])
def test_reference_config_is_valid_whole(name, variant):
  module, config = _config(name, variant)
  setup = run_config.build(config, image_shape=module.IMAGE_SHAPE)
  assert setup.model.out_channels in (None, 2 * module.IMAGE_SHAPE[-1])
  assert setup.objective.learned_variance == (setup.model.out_channels is not None)
  # Learned variances are sampled with them (config.sample.options.variance).
  learned = setup.objective.learned_variance
  assert setup.sample.options.get('variance') == ('learned' if learned else None)
  # Output = input shape, with 2C channels where the variances are learned.
  x = jax.ShapeDtypeStruct((2, *module.IMAGE_SHAPE), jnp.float32)
  t = jax.ShapeDtypeStruct((2,), jnp.float32)
  c = jax.ShapeDtypeStruct((2,), jnp.int32) if setup.conditional else None
  params = jax.eval_shape(setup.model.init, jax.random.key(0), x, t, c)
  out = jax.eval_shape(setup.model.apply, params, x, t, c)
  h, w, ch = module.IMAGE_SHAPE
  assert out.shape == (2, h, w, 2 * ch if setup.objective.learned_variance else ch)
  assert out.dtype == jnp.float32
  # Mixed precision on accelerators: bfloat16 compute, float32 parameters (so float32 optimizer
  # state and EMA, which are built from them).
  assert setup.model.dtype == 'bfloat16'
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


def test_reference_configs_say_how_to_prepare_missing_data(tmp_path):
  _, config = _config('ddpm_cifar10')
  config.data.data_dir = str(tmp_path)
  with pytest.raises(run_config.ConfigError) as e:
    run_config.build(config)
  message = str(e.value)
  assert f"TFDS dataset 'cifar10' is not readable in data_dir={tmp_path}" in message
  assert 'tfds build cifar10' in message and '\n' not in message


def test_latent_config_needs_its_file():
  _, config = _config('dit', 'S/8')
  with pytest.raises(run_config.ConfigError,
                     match=r"config.data.path: data.name='latents' needs the directory"):
    run_config.build(config)


def test_dit_config_rejects_unknown_sizes():
  with pytest.raises(ValueError, match=r"variant 'XXL/2' is not SIZE/PATCH"):
    _config('dit', 'XXL/2')


DIT_GFLOPS = [('S/2', 6.06), ('B/2', 23.01), ('L/2', 80.71), ('XL/2', 118.64)]


@pytest.mark.parametrize('variant, paper', DIT_GFLOPS, ids=[v for v, _ in DIT_GFLOPS])
def test_dit_forward_gflops_match_paper(variant, paper):
  """Forward cost of one 32x32x4 latent from XLA's HLO cost analysis (lowered, not compiled).

  XLA counts a multiply-add as 2 FLOPs; DiT's Table 4 "Gflops" counts it once, so we compare
  XLA / 2. Measured: S/2 6.10, B/2 23.10, L/2 80.95, XL/2 118.94 (0.3-0.7 % above the paper:
  XLA also counts the softmax, norms and modulation, which the paper's counter skips).
  """
  module, config = _config('dit', variant)
  model = run_config.build_model(config.model)
  x = jax.ShapeDtypeStruct((1, *module.IMAGE_SHAPE), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  c = jax.ShapeDtypeStruct((1,), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), x, t, c)
  analysis = jax.jit(model.apply).lower(params, x, t, c).cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  gmacs = analysis['flops'] / 2e9
  assert abs(gmacs / paper - 1) < 0.10, f'DiT-{variant}: {gmacs:.2f} GMACs vs paper {paper}'


@pytest.mark.parametrize('name', ['digits', 'ddpm_cifar10', 'adm_imagenet64', 'dit',
                                  'ablation_digits', 'ablation_toy2d'])
def test_every_data_key_is_overridable(name):
  """`--config.data.data_dir=...` (documented in ddpm_cifar10.py) used to be an unknown key:
  every config's data section lists every `DataConfig` field."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from diffusion_jax.data import sources  # pylint: disable=g-import-not-at-top
  _, config = _config(name)
  assert set(config.data) == {f.name for f in dataclasses.fields(sources.DataConfig)}
  config.data.flip = True                    # the optional field is a typed placeholder
  with pytest.raises(TypeError):
    config.data.flip = 'yes'
