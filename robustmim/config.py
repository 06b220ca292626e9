"""Typed configuration: a dataclass per stage, filled from a YAML file and dotted overrides.

`load_config(Schema, "configs/x.yaml", ["a.b=3"])` merges, in order, the dataclass defaults,
the file and the overrides, through OmegaConf's structured configs. An unknown key, a value of
the wrong type, a missing required value or a value the dataclass's `__post_init__` rejects
raises `ConfigError` naming the file or override and the key.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from robustmim.errors import ConfigError

T = TypeVar("T")


def _merge(base: DictConfig, layer: DictConfig, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, layer)
    except ConfigKeyError as e:
        raise ConfigError(f"{origin}: unknown key '{e.full_key}'") from None
    except ValidationError as e:
        raise ConfigError(f"{origin}: invalid value for '{e.full_key}': {e.msg}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{origin}: {e.msg}") from None


def _read_file(path: str | Path) -> DictConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        layer = OmegaConf.load(path)
    except Exception as e:  # YAML syntax errors come in several exception types
        raise ConfigError(f"{path}: cannot parse: {e}") from None
    if not isinstance(layer, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return layer


def _read_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"overrides {list(overrides)}: {e.msg}") from None


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build a `schema` instance from its defaults, an optional YAML file and dotted overrides."""
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    if path is not None:
        cfg = _merge(cfg, _read_file(path), str(path))
    for item in overrides:  # one at a time, so an error names the override that caused it
        cfg = _merge(cfg, _read_overrides([item]), f"override '{item}'")
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required value(s): {', '.join(missing)} (set them in the file or as key=value)")
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # raised by the dataclass's own __post_init__ checks
        raise ConfigError(str(e)) from None


def to_yaml(cfg: object) -> str:
    """The fully resolved config as YAML, the form written beside every output."""
    if not dataclasses.is_dataclass(cfg):
        raise TypeError(f"expected a dataclass instance, got {type(cfg).__name__}")
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
