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

import re

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from robustmim.errors import ConfigError

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML without YAML 1.1's base-60 numbers: there `72:00:00` is the integer 259200 and `1:30`
    is 90, so a Slurm time limit would silently become months. Here both stay strings."""


_INT = re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0b[01_]+|0x[0-9a-fA-F_]+|0o?[0-7_]+)$")
_FLOAT = re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+][0-9]+)?"
                    r"|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


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
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: cannot parse: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return OmegaConf.create(data)


def _read_overrides(overrides: Sequence[str]) -> DictConfig:
    tree: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            parsed = parse_yaml(value) if value else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override '{item}': cannot parse the value: {e}") from None
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = parsed
    return OmegaConf.create(tree)


def _renames(schema: type) -> dict[str, str]:
    """Top-level keys a schema renamed (`renamed_keys = {"old": "new"}` on its class): older run
    directories' config.yaml and older commands still read, under the new name."""
    return getattr(schema, "renamed_keys", {})


def _rename_in_tree(schema: type, tree: DictConfig, source: str) -> DictConfig:
    for old, new in _renames(schema).items():
        if old in tree:
            if new in tree:
                raise ConfigError(f"{source}: sets both '{old}' and '{new}'; '{old}' is the old name of '{new}'")
            tree[new] = tree.pop(old)
            _note_rename(source, old, new)
    return tree


def _rename_override(schema: type, item: str) -> str:
    key, sep, value = item.partition("=")
    head, dot, rest = key.partition(".")
    new = _renames(schema).get(head)
    if new is None:
        return item
    _note_rename(f"override '{item}'", head, new)
    return f"{new}{dot}{rest}{sep}{value}"


def _note_rename(source: str, old: str, new: str) -> None:
    from robustmim.log import get_logger

    get_logger(__name__).info(f"note: {source}: '{old}' is now called '{new}'")


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build a `schema` instance from its defaults, an optional YAML file and dotted overrides."""
    return _checked(resolved_tree(schema, path, overrides))


def config_from_dict(schema: type[T], data: dict, source: str) -> T:
    """A `schema` instance from a mapping read elsewhere (e.g. a JSON file named by `source`)."""
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of keys to values at the top level")
    return _checked(_merge(cfg, _rename_in_tree(schema, OmegaConf.create(data), source), source))


def resolved_tree(schema: type, path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """The merged settings before the required-value and dataclass checks (`--print-config`);
    unknown keys and wrongly typed values are refused as by `load_config`."""
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    if path is not None:
        cfg = _merge(cfg, _rename_in_tree(schema, _read_file(path), str(path)), str(path))
    return _apply_overrides(cfg, [_rename_override(schema, item) for item in overrides])


def _apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    for item in overrides:  # one at a time, so an error names the override that caused it
        layer = _read_overrides([item])
        key = item.partition("=")[0]
        section = OmegaConf.select(cfg, key, default=None) if key else None
        value = OmegaConf.select(layer, key, default=None)
        if isinstance(section, DictConfig) and not isinstance(value, DictConfig):
            keys = ", ".join(f"{key}.{k}" for k in list(section.keys())[:4])
            raise ConfigError(f"override '{item}': '{key}' is a section of settings, not a value; set its keys "
                              f"instead ({keys}, ...)")
        cfg = _merge(cfg, layer, f"override '{item}'")
    return cfg


def _checked(cfg: DictConfig):
    """The dataclass instance, once every required value is set and `__post_init__` accepts it."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"missing required value(s): {', '.join(missing)} (set them in the file or as key=value)")
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:  # raised by the dataclass's own __post_init__ checks
        raise ConfigError(str(e)) from None


def to_dict(cfg: object) -> dict:
    """The fully resolved config as plain dicts, lists and values (enums by their names' values)."""
    if not dataclasses.is_dataclass(cfg):
        raise TypeError(f"expected a dataclass instance, got {type(cfg).__name__}")
    return OmegaConf.to_container(OmegaConf.structured(cfg), enum_to_str=True)


def to_yaml(cfg: object) -> str:
    """The fully resolved config as YAML, the form written beside every output."""
    if not dataclasses.is_dataclass(cfg):
        raise TypeError(f"expected a dataclass instance, got {type(cfg).__name__}")
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
