"""One declaration per setting: a config dataclass's fields carry their default, help, flag and
argument group, and the command line is derived from them, both ways.

    @dataclass
    class Config:
        out: str = setting(help="output directory")                    # no default: a required flag
        steps: int | None = setting(None, "optimizer steps", group="budget")

    add_arguments(parser, Config)      # --out (required), --steps (help says "(default ...)")
    cfg = from_args(Config, namespace)  # the parsed flags, as the dataclass
    to_argv(cfg)                       # ["--out", ..., only the flags whose value is not the default]

Why not transformers' ``HfArgumentParser`` (what TRL's CLI uses): it registers every
underscored field twice (``--seq_len`` and ``--seq-len``, both shown in ``--help``), puts a
dataclass in a single argument group, turns booleans into ``--flag [true|false]``, and lives on its
own ``ArgumentParser`` rather than on the subcommand parsers m1's CLI is made of. m1's flags are
dashed, grouped by topic and plain switches; this keeps them exactly so.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import MISSING, field, fields

__all__ = ["setting", "add_arguments", "from_args", "to_argv"]


def setting(default=MISSING, help: str = "", *, flag: str | None = None, choices=None, group: str | None = None):
    """A dataclass field with its CLI metadata. ``help`` gets "(default X)" appended unless it
    already says what the default is or the default is None/False."""
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "group": group})


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _value_type(annotation):
    """``int | None`` -> int; ``str`` -> str."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"a setting has one value type, got {annotation}")
        return args[0]
    return annotation


def _or_none(typ):
    """The value type of an optional setting, where "none" on the command line means None."""
    def parse(text: str):
        return None if text.strip().lower() in ("none", "") else typ(text)

    parse.__name__ = typ.__name__  # argparse names the type in its errors
    return parse


def _help(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    if f.default is not MISSING and f.default is not None and f.default is not False and "(default" not in text:
        text = f"{text} (default {f.default})"
    return text.replace("%", "%%")  # argparse formats help with %


def _cli_fields(cls):
    return [f for f in fields(cls) if "help" in f.metadata]


def add_arguments(parser: argparse.ArgumentParser, cls) -> dict:
    """One argument per declared field of ``cls``, in declaration order, grouped by ``group``.
    Returns the groups by name, for a command's own flags (``--resume``, ...)."""
    hints = typing.get_type_hints(cls)
    groups: dict[str | None, typing.Any] = {None: parser}
    for f in _cli_fields(cls):
        group = f.metadata.get("group")
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        kw: dict = {"dest": f.name, "help": _help(f)}
        typ = _value_type(hints[f.name])
        optional = typ is not hints[f.name]
        if typ is bool:
            if f.default is not False:
                raise TypeError(f"{cls.__name__}.{f.name}: a switch defaults to False")
            kw["action"] = "store_true"
        else:
            kw["type"] = _or_none(typ) if optional else typ
            if f.metadata.get("choices"):
                kw["choices"] = list(f.metadata["choices"])
        if f.default is MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default
        groups[group].add_argument(_flag(f), **kw)
    return groups


def from_args(cls, namespace: argparse.Namespace, **extra):
    """The dataclass the parsed flags describe (``extra`` fills fields that have no flag)."""
    values = {f.name: getattr(namespace, f.name) for f in _cli_fields(cls)}
    return cls(**values, **extra)


def to_argv(cfg) -> list[str]:
    """The flags that rebuild ``cfg`` through :func:`add_arguments`: required ones always, the others
    only where they differ from their default."""
    argv: list[str] = []
    for f in _cli_fields(type(cfg)):
        value = getattr(cfg, f.name)
        if f.default is not MISSING and value == f.default:
            continue
        if value is None:
            raise ValueError(f"{type(cfg).__name__}.{f.name}=None has no flag (its default is {f.default!r})")
        if value is True:
            argv.append(_flag(f))
        elif value is not None and value is not False:
            argv += [_flag(f), repr(value) if isinstance(value, float) else str(value)]
    return argv
