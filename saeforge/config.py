"""Typed run configs: dataclass defaults < TOML section < command-line flags.

Every stage declares a dataclass; `parse_config` builds the argparse flags from its fields
(`--field-name`), reads an optional TOML file given as the first positional argument, and
returns the validated instance. `config_dict` gives the resolved config for saving beside outputs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

from saeforge.errors import UserError

T = TypeVar("T")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Strip Optional[...] and return (inner type, is_optional)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _convert(name: str, tp: Any, value: Any) -> Any:
    """Convert a TOML or command-line value to the field's type, with a clear error."""
    inner, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "")):
        return None
    origin = typing.get_origin(inner)
    try:
        if origin in (list, tuple):
            (item_t,) = typing.get_args(inner)[:1] or (str,)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return [_convert(name, item_t, v) for v in value]
        if inner is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if inner is int and isinstance(value, str):
            return int(float(value)) if ("e" in value.lower() and "." not in value) else int(value)
        if inner in (int, float, str):
            return inner(value)
    except (TypeError, ValueError):
        raise UserError(f"--{name.replace('_', '-')}: cannot read {value!r} as {getattr(inner, '__name__', inner)}")
    return value


def load_toml_section(path: str | Path | None, section: str) -> dict[str, Any]:
    """Read one section of a TOML run config; missing file gets a clear error."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {str(path)!r} not found; pass an existing .toml file (e.g. configs/quickstart.toml)")
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {str(path)!r} is not valid TOML: {e}")
    sec = data.get(section, {})
    if not isinstance(sec, dict):
        raise UserError(f"config file {str(path)!r}: [{section}] must be a table")
    return sec


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add a `--field-name` flag for every dataclass field (default None = not given)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        flag = "--" + f.name.replace("_", "-")
        inner, _ = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if inner is bool:
            parser.add_argument(flag, dest=f.name, nargs="?", const="true", default=None, metavar="BOOL", help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_text)


def build_config(cls: type[T], section: dict[str, Any], overrides: dict[str, Any]) -> T:
    """Merge defaults < TOML section < overrides, convert types and validate."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(section) - names)
    if unknown:
        raise UserError(f"unknown config key(s) {unknown} for {cls.__name__}; known keys: {sorted(names)}")
    values: dict[str, Any] = {}
    for src in (section, {k: v for k, v in overrides.items() if v is not None and k in names}):
        for k, v in src.items():
            values[k] = _convert(k, hints[k], v)
    cfg = cls(**values)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def parse_config(cls: type[T], argv: Sequence[str] | None, section: str, prog: str,
                 description: str = "", extra: typing.Callable[[argparse.ArgumentParser], None] | None = None
                 ) -> tuple[T, argparse.Namespace]:
    """Parse `[CONFIG.toml] --flags` into a validated config; returns (config, namespace)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("config", nargs="?", default=None, help="TOML run config (e.g. configs/quickstart.toml)")
    add_config_arguments(parser, cls)
    if extra is not None:
        extra(parser)
    ns = parser.parse_args(argv)
    cfg = build_config(cls, load_toml_section(ns.config, section), vars(ns))
    return cfg, ns


def config_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain JSON-able values."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, directory: str | Path) -> Path:
    """Write the resolved config as `config.json` beside a run's outputs; returns its path."""
    path = Path(directory) / "config.json"
    path.write_text(json.dumps(config_dict(cfg), indent=1, default=str))
    return path
