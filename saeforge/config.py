"""Typed run configs: dataclass defaults < TOML section < command-line flags, for every command.

Each command declares one dataclass whose fields are made with `option(default, help)`.
`parse_config` builds the command line from it:

- every field is a `--field-name` flag; `--help` shows its type, choices and default;
- fields declared `positional=True` may also be given as bare arguments, in order
  (`saeforge eval SAE_DIR`, `saeforge align A B`); a list-typed positional takes all the rest;
- a first bare argument ending in `.toml` is the run config, whose `[section]` table sets fields;
  an unknown key there is refused;
- choices come from the type: `Literal["add", "ablate"]`, `list[Literal[...]]`, or
  `option(..., choices=REGISTRY)` for a registry of names; TOML values are checked the same way;
- list fields take comma-separated values (`--k 16,32`) or TOML arrays.

Every bad value is one `UserError` line naming the flag, the value and what would work.
`validate()` on the dataclass runs last for checks across fields.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from saeforge.errors import UserError
from saeforge.urls import write_json

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def option(default: Any, help: str, *, positional: bool = False,  # noqa: A002 - mirrors argparse
           choices: Sequence[str] | None = None, metavar: str | None = None) -> Any:
    """A config field: its default, its help line, and how the command line takes it."""
    meta = {"help": help, "positional": positional, "choices": tuple(choices) if choices else None,
            "metavar": metavar}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _strip_optional(tp: Any) -> Any:
    """Optional[X] → X."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _list_item(tp: Any) -> Any | None:
    """The item type of list[X] / tuple[X, ...], or None for a scalar type."""
    inner = _strip_optional(tp)
    if typing.get_origin(inner) in (list, tuple):
        args = typing.get_args(inner)
        return args[0] if args else str
    return None


def _choices(tp: Any, f: dataclasses.Field[Any]) -> tuple[Any, ...] | None:
    if f.metadata.get("choices"):
        return tuple(f.metadata["choices"])
    item = _list_item(tp)
    base = _strip_optional(item if item is not None else tp)
    if typing.get_origin(base) is typing.Literal:
        return typing.get_args(base)
    return None


def _type_name(tp: Any) -> str:
    base = _strip_optional(tp)
    if typing.get_origin(base) is typing.Literal:
        return "choice"
    return getattr(base, "__name__", str(base))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar(flag: str, tp: Any, value: Any, choices: tuple[Any, ...] | None) -> Any:
    base = _strip_optional(tp)
    if typing.get_origin(base) is typing.Literal:
        base = type(typing.get_args(base)[0])
    try:
        if base is bool:
            if isinstance(value, bool):
                out: Any = value
            elif str(value).lower() in ("1", "true", "yes", "on"):
                out = True
            elif str(value).lower() in ("0", "false", "no", "off"):
                out = False
            else:
                raise ValueError(value)
        elif base is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, str) and "e" in value.lower() and "." not in value:
                out = int(float(value))  # 1e6
            elif isinstance(value, float):
                if not value.is_integer():
                    raise ValueError(value)
                out = int(value)
            else:
                out = int(value)
        elif base is float:
            if isinstance(value, bool):
                raise ValueError(value)
            out = float(value)
        elif base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(value)
            out = str(value)
        else:
            out = value
    except (TypeError, ValueError):
        raise UserError(f"{flag}: cannot read {value!r} as {_type_name(tp)}") from None
    if choices is not None and out not in choices:
        raise UserError(f"{flag} {out!r} is not known; use one of {', '.join(map(str, choices))}")
    return out


def convert(name: str, tp: Any, value: Any, choices: tuple[Any, ...] | None = None) -> Any:
    """A TOML or command-line value as the field's type, or one UserError line."""
    flag = _flag(name)
    if value is None:
        return None
    if _is_optional(tp) and isinstance(value, str) and value.lower() in ("none", ""):
        return None
    item = _list_item(tp)
    if item is not None:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        return [_scalar(flag, item, v, choices) for v in value]
    return _scalar(flag, tp, value, choices)


def load_toml_section(path: str | Path | None, section: str) -> dict[str, Any]:
    """One `[section]` table of a TOML run config, with one-line errors for every way it can be bad."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {str(path)!r} not found; pass an existing .toml file (e.g. configs/quickstart.toml)")
    try:
        data = tomllib.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"config file {str(path)!r} is not UTF-8 text ({e}); save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    sec = data.get(section, {})
    if not isinstance(sec, dict):
        raise UserError(f"config file {str(path)!r}: [{section}] must be a table")
    return sec


def _fields(cls: type) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return None


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) if value else "(none)"
    if value is None or value == "":
        return "(none)"
    return str(value)


def build_parser(cls: type, prog: str, description: str = "") -> argparse.ArgumentParser:
    """The argparse parser of a config dataclass (every flag's default None = not given)."""
    hints = typing.get_type_hints(cls)
    pos = [f for f in _fields(cls) if f.metadata.get("positional")]
    usage_pos = " ".join(f.name.upper() + ("…" if _list_item(hints[f.name]) is not None else "") for f in pos)
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     usage=f"{prog} [CONFIG.toml] {usage_pos + ' ' if usage_pos else ''}[--flags]")
    for f in pos:
        many = _list_item(hints[f.name]) is not None
        parser.add_argument(f"_pos_{f.name}", nargs="*" if many else "?", default=None,
                            metavar=f.name.upper(), help=f"{f.metadata.get('help', '')} (or {_flag(f.name)})")
    for f in _fields(cls):
        tp = hints[f.name]
        choices = _choices(tp, f)
        base = _strip_optional(tp)
        help_text = f.metadata.get("help", "")
        help_text = f"{help_text} (default: {_show(_default(f))})".replace("%", "%%")
        metavar = f.metadata.get("metavar")
        if metavar is None:
            if choices is not None:
                metavar = "{" + ",".join(map(str, choices)) + "}" + (",…" if _list_item(tp) is not None else "")
            elif _list_item(tp) is not None:
                metavar = f"{_type_name(_list_item(tp)).upper()}[,…]"
            else:
                metavar = _type_name(tp).upper()
        if base is bool:
            parser.add_argument(_flag(f.name), dest=f.name, nargs="?", const="true", default=None, metavar="BOOL",
                                help=help_text)
        else:
            parser.add_argument(_flag(f.name), dest=f.name, default=None, metavar=metavar, help=help_text)
    return parser


def build_config(cls: type[T], section: dict[str, Any], overrides: dict[str, Any]) -> T:
    """Merge defaults < TOML section < overrides, convert and check types, then `validate()`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in _fields(cls)}
    unknown = sorted(set(section) - set(fields))
    if unknown:
        raise UserError(f"unknown config key(s) {unknown} for {cls.__name__}; known keys: {sorted(fields)}")
    values: dict[str, Any] = {}
    for src in (section, {k: v for k, v in overrides.items() if v is not None and k in fields}):
        for k, v in src.items():
            values[k] = convert(k, hints[k], v, _choices(hints[k], fields[k]))
    cfg = cls(**values)
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        validate()
    return cfg


def parse_config(cls: type[T], argv: Sequence[str] | None, section: str, prog: str, description: str = "",
                 extra: Callable[[argparse.ArgumentParser], None] | None = None) -> tuple[T, argparse.Namespace]:
    """`[CONFIG.toml] [POSITIONALS…] --flags` → (validated config, the argparse namespace)."""
    args = list(sys.argv[1:] if argv is None else argv)
    toml = args.pop(0) if args and not args[0].startswith("-") and args[0].endswith(".toml") else None
    parser = build_parser(cls, prog, description)
    if extra is not None:
        extra(parser)
    ns = parser.parse_args(args)
    given = dict(vars(ns))
    for f in _fields(cls):
        if not f.metadata.get("positional"):
            continue
        pos = given.pop(f"_pos_{f.name}", None)
        if pos in (None, []):
            continue
        if given.get(f.name) is not None:
            raise UserError(f"{f.name.upper()} given twice (as an argument and as {_flag(f.name)}); give it once")
        given[f.name] = pos
    cfg = build_config(cls, load_toml_section(toml, section), given)
    return cfg, ns


def check_choices(cfg: Any) -> None:
    """Check a config built in code (not parsed) the way the parser would: types with fixed
    choices (Literal, option(choices=…)) must hold one of them. Configs call it from validate()."""
    hints = typing.get_type_hints(type(cfg))
    for f in _fields(type(cfg)):
        choices = _choices(hints[f.name], f)
        value = getattr(cfg, f.name)
        if choices is None or value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v not in choices:
                raise UserError(f"{_flag(f.name)} {v!r} is not known; use one of {', '.join(map(str, choices))}")


def config_dict(cfg: Any) -> dict[str, Any]:
    """The resolved config as plain JSON-able values."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, directory: str | Path) -> str:
    """Write the resolved config as `config.json` beside a run's outputs; returns its path."""
    from saeforge.urls import join
    path = join(directory, "config.json")
    write_json(path, config_dict(cfg))
    return path
