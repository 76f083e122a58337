"""A resolved config saved as JSON (a run's `config.json`), as a config file:
`--config=configs/json_config.py:runs/digits/config.json`. Overrides apply as usual."""

import json

import ml_collections
from ml_collections import config_dict

from diffusion_jax.samplers import SAMPLER_OPTIONS


def get_config(path: str) -> ml_collections.ConfigDict:
  with open(path, encoding='utf-8') as f:
    values = json.load(f)
  sample = values.get('sample')
  if sample is not None:
    # Runs saved before `sample.options` kept the sampler options flat (`sample.eta`, ...);
    # they move into `sample.options`. Unset ones (null) become typed placeholders again, so
    # that `--config.sample.options.eta=0.5` overrides them as it does in configs/digits.py.
    options = sample.setdefault('options', {})
    options.update({k: sample.pop(k) for k in SAMPLER_OPTIONS if k in sample})
    for k, kind in SAMPLER_OPTIONS.items():
      if options.get(k) is None:
        options[k] = config_dict.placeholder(kind)
  return ml_collections.ConfigDict(values)
