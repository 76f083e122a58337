"""Text conditioning: the encoder wrapper, caption dropout, frozen encoders, prompts at sampling
time (encoded once, guided against the empty or a negative prompt) and the config's errors."""

import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import text_digits
from configs import tiny_sd
from diffusion_jax import generation
from diffusion_jax import run_config
from diffusion_jax import train_loop
from diffusion_jax import training
from diffusion_jax.configuration import ConfigError
from diffusion_jax.data import sources
from diffusion_jax.models import layers
from diffusion_jax.models import text as text_models
from diffusion_jax.models.dit import DiT
from diffusion_jax.text import conditioning as text_conditioning
from diffusion_jax.text import words

TOKENIZER = words.WordTokenizer.for_captions()
PROMPTS = ['a thin seven', 'bold 3 on the left', '', 'a wide, slanted zero']


def _model(caption_dropout=0.0, freeze=False, mask_padding=True):
  length = TOKENIZER.context_length
  net = DiT(patch_size=4, hidden_size=16, depth=1, num_heads=2, frequency_dim=16,
            context_dim=16)
  encoder = text_models.TextEncoder(TOKENIZER.vocab_size, length, TOKENIZER.eos_id, width=16,
                                    depth=1, num_heads=2)
  empty = tuple(int(i) for i in TOKENIZER.encode([''])[0])
  return text_models.TextConditioned(net, encoder, empty, TOKENIZER.eos_id,
                                     caption_dropout=caption_dropout, mask_padding=mask_padding,
                                     freeze_encoder=freeze)


def _apply(model):
  return jax.jit(lambda p, x, t, c: model.apply({'params': p}, x, t, c))


def _init(model, batch=4):
  x = jnp.zeros((batch, 8, 8, 1))
  t = jnp.full((batch,), 0.5)
  tokens = jnp.asarray(TOKENIZER.encode(PROMPTS[:batch]))
  params = jax.jit(model.init)(jax.random.key(0), x, t, {'tokens': tokens})['params']
  # The U-Net zero-initialises its output layers and cross-attention outputs: randomise every
  # leaf so that the output depends on the text.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, p.shape)
                                     for k, p in zip(keys, leaves, strict=True)])
  return params


def test_context_mask_matches_the_tokenizer():
  tokens = TOKENIZER.encode(PROMPTS)
  np.testing.assert_array_equal(np.asarray(text_models.context_mask(jnp.asarray(tokens),
                                                                    TOKENIZER.eos_id)),
                                TOKENIZER.context_mask(tokens))
  # "" is BOS, EOS: exactly two attended positions.
  assert TOKENIZER.context_mask(tokens)[2].sum() == 2


@pytest.mark.slow   # ~11 s; moved out of the default run (its 10-minute budget)
def test_padding_is_not_read_and_the_caption_is():
  model = _model()
  params = _init(model)
  apply = _apply(model)
  x = jax.random.normal(jax.random.key(2), (4, 8, 8, 1))
  t = jnp.full((4,), 0.3)
  tokens = jnp.asarray(TOKENIZER.encode(PROMPTS))
  out = apply(params, x, t, {'tokens': tokens})
  # Whatever lies after EOS is hidden: another padding id changes nothing.
  mask = TOKENIZER.context_mask(np.asarray(tokens))
  other = jnp.where(mask, tokens, TOKENIZER.ids['seven'])
  np.testing.assert_allclose(apply(params, x, t, {'tokens': other}), out, atol=1e-5)
  # The words themselves matter.
  swapped = jnp.asarray(TOKENIZER.encode(['a thin three'] + PROMPTS[1:]))
  changed = apply(params, x, t, {'tokens': swapped})
  assert float(jnp.max(jnp.abs(changed[0] - out[0]))) > 1e-3
  np.testing.assert_allclose(changed[1:], out[1:], atol=1e-5)
  # Without masking, the padding is read.
  unmasked = _apply(_model(mask_padding=False))
  a = unmasked(params, x, t, {'tokens': tokens})
  b = unmasked(params, x, t, {'tokens': other})
  assert float(jnp.max(jnp.abs(a - b))) > 1e-4


@pytest.mark.slow   # ~5 s; moved out of the default run (its 10-minute budget)
def test_precomputed_context_equals_tokens():
  model = _model()
  params = _init(model)
  x = jax.random.normal(jax.random.key(2), (4, 8, 8, 1))
  t = jnp.full((4,), 0.7)
  tokens = jnp.asarray(TOKENIZER.encode(PROMPTS))
  ctx = model.apply({'params': params}, tokens, method='encode')
  assert ctx['context'].shape == (4, TOKENIZER.context_length, 16)
  np.testing.assert_allclose(model.apply({'params': params}, x, t, ctx),
                             model.apply({'params': params}, x, t, {'tokens': tokens}),
                             atol=1e-6)


def test_caption_dropout_gives_exactly_the_empty_prompt():
  batch = 64
  model = _model(caption_dropout=0.5)
  params = _init(model)
  x = jax.random.normal(jax.random.key(3), (batch, 8, 8, 1))
  t = jnp.full((batch,), 0.4)
  tokens = jnp.asarray(TOKENIZER.encode([PROMPTS[i % 2] for i in range(batch)]))
  trained = jax.jit(lambda p: model.apply({'params': p}, x, t, {'tokens': tokens}, train=True,
                                          rngs={'dropout': jax.random.key(4)}))(params)
  apply = _apply(model)
  conditional = apply(params, x, t, {'tokens': tokens})
  empty = jnp.asarray(TOKENIZER.encode([''] * batch))
  unconditional = apply(params, x, t, {'tokens': empty})
  err = lambda a: jnp.max(jnp.abs(trained - a), axis=(1, 2, 3))
  is_c, is_u = err(conditional) < 1e-5, err(unconditional) < 1e-5
  assert bool(jnp.all(is_c ^ is_u)), 'each example is its caption or the empty prompt'
  assert 16 < int(is_u.sum()) < 48      # Binomial(64, 0.5): outside this w.p. < 1e-4


def test_frozen_encoder_gets_no_gradient_and_no_update():
  model = _model(freeze=True)
  params = _init(model)
  x = jax.random.normal(jax.random.key(5), (4, 8, 8, 1))
  t = jnp.full((4,), 0.5)
  tokens = jnp.asarray(TOKENIZER.encode(PROMPTS))

  def loss(p):
    return jnp.mean(model.apply({'params': p}, x, t, {'tokens': tokens}) ** 2)
  grads = jax.jit(jax.grad(loss))(params)
  assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(grads['encoder']))
  assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads['net']))
  # Trained jointly, the encoder does get a gradient.
  joint = jax.jit(jax.grad(lambda p: jnp.mean(_model().apply({'params': p}, x, t,
                                                             {'tokens': tokens}) ** 2)))(params)
  assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(joint['encoder']))
  # The optimizer leaves a frozen subtree exactly as it was, weight decay included.
  cfg = training.OptimConfig(lr=1e-2, warmup_steps=1, weight_decay=0.1)
  opt = training.make_optimizer(cfg, 10, frozen=('encoder',))
  state = opt.init(params)
  ones = jax.tree.map(jnp.ones_like, params)
  new = params
  for _ in range(2):        # the warm-up's learning rate is 0 at step 0
    updates, state = opt.update(ones, state, new)
    new = optax.apply_updates(new, updates)
  for a, b in zip(jax.tree.leaves(new['encoder']), jax.tree.leaves(params['encoder']),
                  strict=True):
    np.testing.assert_array_equal(a, b)
  assert any(float(jnp.max(jnp.abs(a - b))) > 0
             for a, b in zip(jax.tree.leaves(new['net']), jax.tree.leaves(params['net']),
                             strict=True))


def _setup(**sample):
  config = text_digits.get_config('smoke')
  config.model = ml_collections.ConfigDict(dict(
      name='dit', patch_size=4, hidden_size=16, depth=1, num_heads=2, frequency_dim=16,
      context_dim=16))
  config.sample.update(sampler='ddim', steps=1, clip_x0=0.0, **sample)
  return run_config.build(config)


def test_guided_sampling_uses_the_negative_prompt_and_encodes_once():
  """One DDIM step from t = T returns the guided x0 prediction at x_T, which is written here
  from its definition: (1 - w) x0(negative) + w x0(prompt) (Ho & Salimans 2022, scale w)."""
  scale = 3.0
  setup = _setup(guidance_scale=scale)
  model = setup.model
  key = jax.random.key(0)
  x = jnp.zeros((1, 8, 8, 1))
  params = model.init(key, x, jnp.zeros((1,)), layers.example_cond(model))['params']
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, p.shape)
                                     for k, p in zip(keys, leaves, strict=True)])
  prompts = ['a thin seven', 'bold 3 on the left']
  tokens = setup.text.tokens(prompts)
  z = jax.random.normal(jax.random.key(2), (2, 8, 8, 1))
  negative = 'a bold seven'
  sample_fn = generation.make_sample_fn(setup, negative_prompt=negative)
  got = sample_fn(params, z, jax.random.key(3), tokens)

  den = generation.make_model_denoiser(setup, params)
  t_max = jnp.full((2,), float(setup.process.t_max))
  x_t = setup.process.prior_std * z
  x0_c, _ = den(x_t, t_max, {'tokens': jnp.asarray(tokens)})
  x0_u, _ = den(x_t, t_max, {'tokens': jnp.asarray(setup.text.tokens([negative] * 2))})
  want = (1 - scale) * x0_u + scale * x0_c
  # float32 rounding of x0 ~ 1 / alpha(T) ~ 150 times the network output, amplified by the
  # weights |1 - w| + |w| of the combination (and by XLA's reassociation).
  tol = 8 * np.finfo(np.float32).eps * (abs(1 - scale) + abs(scale)) * float(
      jnp.maximum(jnp.abs(x0_u).max(), jnp.abs(x0_c).max()))
  np.testing.assert_allclose(got, want, rtol=0, atol=tol)
  # The guidance interval and rescale work on text: outside the interval (t_max > 0.5) the
  # step is the conditional prediction itself.
  outside = dataclasses.replace(setup, sample=dataclasses.replace(
      setup.sample, guidance_interval=(0.0, 0.5), guidance_rescale=0.7))
  np.testing.assert_allclose(generation.make_sample_fn(outside)(params, z, jax.random.key(3),
                                                                tokens), x0_c, rtol=0,
                             atol=tol)
  # The text encoder runs outside the sampler's loop: no op inside a loop body reads the token
  # embedding table.
  table = params['encoder']['token_embedding']['embedding'].shape
  setup_many = dataclasses.replace(setup, sample=dataclasses.replace(setup.sample, steps=4))
  fn = generation.make_sample_fn(setup_many)
  jaxpr = jax.make_jaxpr(lambda p, z, tok: fn(p, z, jax.random.key(0), tok))(
      params, z, jnp.asarray(tokens))
  assert _reads_shape(jaxpr.jaxpr, table, in_loop=False) == (True, False)


def _reads_shape(jaxpr, shape, in_loop):
  """(read anywhere, read inside a loop body) for an input of `shape` to any equation."""
  anywhere = inside = False
  for eqn in jaxpr.eqns:
    loop = in_loop or eqn.primitive.name in ('while', 'scan')
    if any(getattr(v.aval, 'shape', None) == shape for v in eqn.invars):
      anywhere = True
      inside = inside or in_loop
    for sub in _sub_jaxprs(eqn.params.values()):
      a, i = _reads_shape(sub, shape, loop)
      anywhere, inside = anywhere or a, inside or i
  return anywhere, inside


def _sub_jaxprs(values):
  """The jaxprs among an equation's parameters (closed or open, alone or in sequences)."""
  for v in values:
    if hasattr(v, 'eqns'):
      yield v
    elif hasattr(v, 'jaxpr') and hasattr(v.jaxpr, 'eqns'):
      yield v.jaxpr
    elif isinstance(v, (list, tuple)):
      yield from _sub_jaxprs(v)


def test_sampling_a_text_model_needs_prompts():
  setup = _setup()
  params = setup.model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,)),
                            layers.example_cond(setup.model))['params']
  fn = generation.make_sample_fn(setup)
  z = jnp.zeros((2, 8, 8, 1))
  with pytest.raises(ValueError, match='text-conditioned .* needs prompts'):
    fn(params, z, jax.random.key(0), None)
  with pytest.raises(ValueError, match=r'prompt tokens must be \[B, 20\]'):
    fn(params, z, jax.random.key(0), np.zeros((2, 5), np.int32))
  with pytest.raises(ValueError, match="cond must be {'tokens'"):
    setup.model.apply({'params': params}, z, jnp.zeros((2,)), None)


@pytest.mark.parametrize('key,value,match', [
    ('model.context_dim', 32, r'context_dim=32: the text encoder gives states of width 16'),
    ('model.context_dropout', 0.1, r'caption_dropout'),
    ('model.num_classes', 10, r'reads the class from the caption'),
    ('text.encoder', 'bert', r'text.encoder'),
    ('text.caption_dropout', 1.0, r'text.caption_dropout=1.0'),
    ('text.templates', 'test', r'text.templates'),
    ('text.weights', '/nonexistent', r"only encoder='clip' loads weights"),
])
def test_config_errors(key, value, match):
  config = text_digits.get_config('smoke')
  section, name = key.split('.')
  config[section][name] = value
  with pytest.raises(ConfigError, match=match):
    run_config.build(config)


def test_captions_only_for_digits():
  parts = run_config.build(text_digits.get_config('smoke')).text
  toy = sources.ToySource('eight_gaussians')
  with pytest.raises(ConfigError, match="captions exist for the embedded digits.*'toy2d'"):
    text_conditioning.caption_source(parts, sources.DataConfig(name='toy2d'), toy)
  test_split = sources.make_source(sources.DataConfig(name='digits', split='test'))
  with pytest.raises(ConfigError, match="450 examples but the digits split 'train' has 1347"):
    text_conditioning.caption_source(parts, sources.DataConfig(name='digits'), test_split)


def test_clip_encoder_needs_a_weights_directory():
  config = text_digits.get_config('smoke')
  config.text.encoder = 'clip'
  with pytest.raises(ConfigError, match=r"text.weights: encoder='clip' needs the directory"):
    run_config.build(config)
  config.text.weights = '/nonexistent/clip'
  with pytest.raises(ConfigError, match=r"text.weights='/nonexistent/clip': no such directory"):
    run_config.build(config)


def test_captioned_batches_carry_tokens():
  setup = run_config.build(text_digits.get_config('smoke'))
  batch = setup.source.batch(0, 3, 8)
  assert batch['tokens'].shape == (8, setup.text.length) and batch['tokens'].dtype == np.int32
  texts = TOKENIZER.decode(batch['tokens'])
  digit_words = set(words.CAPTION_VOCAB) & ({str(d) for d in range(10)} | {
      'zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine'})
  for text, label in zip(texts, batch['label'], strict=True):
    named = [w for w in words.split_words(text) if w in digit_words]
    assert len(named) == 1, text
    assert named[0] in (str(label), ['zero', 'one', 'two', 'three', 'four', 'five', 'six',
                                     'seven', 'eight', 'nine'][label]), (text, label)


CLIP_FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'clip')
CLIP_TOKENIZER = os.path.join(CLIP_FIXTURE, 'tokenizer')


def _clip_config(tokenizer=CLIP_TOKENIZER):
  config = text_digits.get_config('smoke')
  config.model = ml_collections.ConfigDict(dict(
      name='dit', patch_size=4, hidden_size=16, depth=1, num_heads=2, frequency_dim=16,
      context_dim=32))
  config.text.update(encoder='clip', weights=os.path.join(CLIP_FIXTURE, 'text_encoder'),
                     tokenizer=tokenizer, freeze=True)
  return config


@pytest.mark.slow   # ~8-16 s; moved out of the default run (its 10-minute budget)
def test_frozen_clip_text_encoder_from_local_weights():
  """The SD-layout fixture (`tests/fixtures/clip/text_encoder`, made by transformers) as the
  frozen text encoder: the run's initial state holds its weights, so encoding the fixture's
  ids gives transformers' last hidden states, and a train step leaves them unchanged."""
  setup = run_config.build(_clip_config())
  expected = np.load(os.path.join(CLIP_FIXTURE, 'expected.npz'))
  assert setup.text.length == 16 and setup.text.width == 32
  optimizer, ema_fn = train_loop._optimizer_and_ema(setup)  # pylint: disable=protected-access
  init = train_loop.init_state_fn(setup, optimizer, ema_fn)
  state = jax.jit(init)(jax.random.key(0), train_loop.pretrained_params(setup))
  ctx = setup.model.apply({'params': state.params}, jnp.asarray(expected['input_ids']),
                          method='encode')
  np.testing.assert_allclose(ctx['context'], expected['te_last_hidden_state'], atol=1e-5)
  step = jax.jit(training.make_train_step(setup.objective, setup.model.apply, optimizer, ema_fn,
                                          cond_key='tokens'))
  batch = {'image': jax.random.normal(jax.random.key(1), (5, 8, 8, 1)),
           'tokens': jnp.asarray(expected['input_ids'])}
  new = state
  for _ in range(2):        # the warm-up's learning rate is 0 at step 0
    new, _ = step(new, batch)
  for a, b in zip(jax.tree.leaves(new.params['encoder']),
                  jax.tree.leaves(state.params['encoder']), strict=True):
    np.testing.assert_array_equal(a, b)
  assert any(float(jnp.max(jnp.abs(a - b))) > 0 for a, b in zip(
      jax.tree.leaves(new.params['net']), jax.tree.leaves(state.params['net']), strict=True))


def test_clip_tokenizer_that_does_not_match_the_weights(tmp_path):
  with open(os.path.join(CLIP_FIXTURE, 'tokenizer', 'vocab.json'), encoding='utf-8') as f:
    vocab = json.load(f)
  del vocab[next(k for k, v in vocab.items() if v == max(vocab.values()) - 5)]
  vocab = {k: i for i, k in enumerate(sorted(vocab, key=vocab.get))}
  for name in ('merges.txt', 'tokenizer_config.json'):
    shutil.copy(os.path.join(CLIP_FIXTURE, 'tokenizer', name), tmp_path / name)
  with open(tmp_path / 'vocab.json', 'w', encoding='utf-8') as f:
    json.dump(vocab, f)
  with pytest.raises(ConfigError,
                     match=r'text.tokenizer=.*vocab_size=554, but the CLIP tokenizer has 553'):
    run_config.build(_clip_config(str(tmp_path)))


@pytest.mark.parametrize('variant', ['smoke', 'smoke,dit'])
def test_text_configs_build_with_the_unet_and_the_dit(variant):
  for get_config in (text_digits.get_config, tiny_sd.get_config):
    config = get_config(variant)
    setup = run_config.build(config, image_shape=(8, 8, 2) if 'latent' in config else None)
    assert setup.model.net.context_dim == setup.text.width
  with pytest.raises(ValueError, match="model 'mlp' has no cross-attention"):
    text_digits.get_config('smoke,mlp')
