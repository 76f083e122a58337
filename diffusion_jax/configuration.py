"""Configs are data: they become typed, frozen objects where they enter the code.

`from_section` turns one `ml_collections` section into a frozen dataclass (or a Flax module's
keyword arguments), failing before anything compiles with a one-line `ConfigError` that names
the key: unknown keys, wrong types and values outside a known set.
"""

import dataclasses
import types
import typing
from typing import Any, Mapping


class ConfigError(ValueError):
  """A user-facing configuration mistake; the message names the offending key."""


def _type_ok(value, annotation) -> bool:
  origin = typing.get_origin(annotation)
  if annotation is Any or annotation is None:
    return True
  if origin in (typing.Union, types.UnionType):
    return any(_type_ok(value, a) for a in typing.get_args(annotation))
  if annotation is type(None):
    return value is None
  if origin in (tuple, list):
    if not isinstance(value, (tuple, list)):
      return False
    args = typing.get_args(annotation)   # tuple[int, ...] / list[int]: every element checked
    element = args[0] if len(args) == 1 or (len(args) == 2 and args[1] is Ellipsis) else None
    return element is None or all(_type_ok(v, element) for v in value)
  if annotation is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if annotation is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(annotation, type):
    return isinstance(value, annotation)
  return True  # an annotation we cannot check cheaply (e.g. a dtype alias)


def check_keys(section: str, values: Mapping[str, Any], fields: Mapping[str, Any]) -> None:
  """Raises `ConfigError` for keys of `values` not in `fields` or of the wrong type."""
  for k, v in values.items():
    if k not in fields:
      raise ConfigError(f'config.{section}.{k}: unknown key; valid keys are {sorted(fields)}')
    if not _type_ok(v, fields[k]):
      raise ConfigError(f'config.{section}.{k}={v!r}: expected {_type_name(fields[k])}, '
                        f'got {type(v).__name__}')


def _type_name(annotation):
  if typing.get_origin(annotation) in (tuple, list):
    return str(annotation)       # 'tuple[int, ...]', not just 'tuple'
  return getattr(annotation, '__name__', str(annotation))


def from_section(cls, section: str, values: Mapping[str, Any], **extra):
  """`cls(**values, **extra)` for a dataclass `cls` (Flax modules included), checked first."""
  values = dict(values)
  hints = typing.get_type_hints(cls)
  fields = {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)
            if f.init and f.name not in ('parent', 'name')}
  check_keys(section, values, fields)
  values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()}
  return cls(**values, **extra)


def choice(section_key: str, value: str, options) -> str:
  """Checks that a name is one of `options` (a dict of names or a sequence)."""
  if value not in options:
    raise ConfigError(f'config.{section_key}={value!r}: unknown; choose from {sorted(options)}')
  return value


def positive(section_key: str, value, allow_zero: bool = False):
  if not (value >= 0 if allow_zero else value > 0):
    bound = '>= 0' if allow_zero else '> 0'
    raise ConfigError(f'config.{section_key}={value!r}: must be {bound}')
  return value
