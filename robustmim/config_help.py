"""`--print-config`: a stage's resolved settings, every key with its value, its default and its
help, read from the comments beside (or above) each field of the config dataclasses, so the
source stays the one place a setting is documented.

    robustmim pretrain --print-config --config configs/pretrain/mae_tiny_fmnist.yaml seed=3

Each line is `key=value` (usable as an override as it stands), then `# help [default: ...]`
where the value differs from the dataclass default. Required values not yet given read `???`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import re
import textwrap
import tokenize
from pathlib import Path
from typing import Sequence


def add_config_arguments(parser: argparse.ArgumentParser, files: str, example: str) -> None:
    """--config, the key=value overrides and --print-config, alike for every stage that has a config
    (the stage's run prints `describe_config` and returns when --print-config is given)."""
    parser.add_argument("--config", help=f"experiment YAML ({files})")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=f"dotted overrides, e.g. {example}")
    parser.add_argument("--print-config", action="store_true",
                        help="print every setting (resolved value, default, help) and exit")


@functools.lru_cache(maxsize=None)
def field_help(schema: type) -> dict[str, str]:
    """Field name -> its comment: the one on the field's line, else the comment lines right above
    it; a field a subclass re-declares without a comment keeps its base class's."""
    found: dict[str, str] = {}
    for cls in reversed(schema.__mro__):
        if dataclasses.is_dataclass(cls):
            found.update({name: text for name, text in _own_field_help(cls).items() if text or name not in found})
    return found


def _own_field_help(schema: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(schema))
    except (OSError, TypeError):
        return {}
    comments = {token.start[0]: token.string.lstrip("#").strip()
                for token in tokenize.generate_tokens(io.StringIO(source).readline) if token.type == tokenize.COMMENT}
    lines = source.splitlines()
    found: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        match = re.match(r"    (\w+)\s*:", line)
        if not match or match.group(1) in found or line.lstrip().startswith("def "):
            continue
        if number in comments and not line.lstrip().startswith("#"):
            found[match.group(1)] = comments[number]
            continue
        above, previous = [], number - 1
        while previous in comments and lines[previous - 1].lstrip().startswith("#"):
            above.insert(0, comments[previous])
            previous -= 1
        found[match.group(1)] = " ".join(above)
    return found


def _text(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_text(v)}" for k, v in value.items()) + "}"
    return str(value)


def config_entries(schema: type, node, default, prefix: str):
    """(key, value, default, help) for every leaf of a dataclass node; lists of dataclasses
    (e.g. eval's attacks) by item, `attacks.0.norm`."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    helps = field_help(schema)
    for f in dataclasses.fields(schema):
        key, value = f"{prefix}{f.name}", node[f.name] if f.name in node else None
        default_value = default.get(f.name) if isinstance(default, (DictConfig, dict)) else None
        inner = _dataclass_of(schema, f.name)
        if inner is not None and isinstance(value, DictConfig):
            yield from config_entries(inner, value, default_value, f"{key}.")
            continue
        item = _list_item_dataclass(schema, f.name)
        if item is not None and isinstance(value, ListConfig) and len(value):
            yield key, f"[{len(value)} item(s)]", None, helps.get(f.name, "")
            for number, element in enumerate(value):
                yield from config_entries(item, element, OmegaConf.structured(item), f"{key}.{number}.")
            continue
        yield key, _value_of(node, f.name), _value_of(default, f.name), helps.get(f.name, "")


def _value_of(node, name: str):
    from omegaconf import DictConfig, OmegaConf

    if not isinstance(node, DictConfig):
        return None
    if OmegaConf.is_missing(node, name):
        return "???"
    return OmegaConf.to_container(node, enum_to_str=True, resolve=False)[name]


@functools.lru_cache(maxsize=None)
def _hints(schema: type) -> dict:
    import typing

    return typing.get_type_hints(schema)


def _dataclass_of(schema: type, name: str):
    hint = _hints(schema).get(name)
    return hint if dataclasses.is_dataclass(hint) else None


def _list_item_dataclass(schema: type, name: str):
    import typing

    hint = _hints(schema).get(name)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return item if dataclasses.is_dataclass(item) else None
    return None


def describe_config(schema: type, path: str | Path | None, overrides: Sequence[str]) -> str:
    """The resolved settings as `key=value  # help [default: ...]` lines (unknown keys and bad
    values are refused as in a run; missing required values show as ???)."""
    from omegaconf import OmegaConf

    from robustmim.config import resolved_tree

    tree = resolved_tree(schema, path, overrides)
    default = OmegaConf.structured(schema)
    source = f" from {path}" if path else ""
    lines = [f"# {schema.__name__}{source}{' with ' + ' '.join(overrides) if overrides else ''}"]
    for key, value, default_value, help_text in config_entries(schema, tree, default, ""):
        note = help_text
        if default_value is not None and _text(value) != _text(default_value):
            note = f"{note} [default: {_text(default_value)}]".strip()
        lines.append(f"{key}={_text(value)}" + (f"  # {note}" if note else ""))
    return "\n".join(lines) + "\n"
