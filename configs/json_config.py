"""A resolved config saved as JSON (a run's `config.json`), as a config file:
`--config=configs/json_config.py:runs/digits/config.json`. Overrides apply as usual."""

import json

import ml_collections


def get_config(path: str) -> ml_collections.ConfigDict:
  with open(path, encoding='utf-8') as f:
    return ml_collections.ConfigDict(json.load(f))
