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

How a field's type becomes a flag:

    int, float, str              --name VALUE
    X | None                     --name VALUE; for a number "none" means None
    bool = False                 --name, a switch
    bool = True                  --no-name, a switch that turns it off
    bool | None = None           --name / --no-name (None: decided later, e.g. from the model)
    tuple[X, ...]                --name A,B,C in one argument, e.g. --k 1,4,16
    tuple[str, ...], repeat=True --name A --name B, once per value (for values that may hold commas)

A comma-separated flag reaches the dataclass as the text it was given: the dataclass turns it into
its tuple (``__post_init__``), so that a bad value is the command's own one-line error, naming the
flag, rather than an argparse usage error, and Python callers may pass either form.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import MISSING, field, fields

__all__ = ["setting", "add_arguments", "from_args", "to_argv"]


def setting(default=MISSING, help: str = "", *, flag: str | None = None, short: str | None = None, choices=None,
            group: str | None = None, metavar: str | None = None, repeat: bool = False):
    """A dataclass field with its CLI metadata. ``help`` gets "(default X)" appended unless it
    already says what the default is or the default is None, a switch or empty. ``short`` is an
    extra spelling (``-n`` beside ``--n``); ``repeat`` makes a tuple flag one value per use."""
    return field(default=default, metadata={"help": help, "flag": flag, "short": short, "choices": choices,
                                            "group": group, "metavar": metavar, "repeat": repeat})


def _flag(f: dataclasses.Field) -> str:
    if f.metadata.get("flag"):
        return f.metadata["flag"]
    name = f.name.replace("_", "-")
    return f"--no-{name}" if f.default is True else f"--{name}"


def _is_tuple(typ) -> bool:
    return typ is tuple or typing.get_origin(typ) is tuple


def _value_type(annotation):
    """``int | None`` -> int; ``str`` -> str."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"a setting has one value type, got {annotation}")
        return args[0]
    return annotation


def _or_none(typ):
    """The value type of an optional number, where "none" on the command line means None."""
    def parse(text: str):
        return None if text.strip().lower() in ("none", "") else typ(text)

    parse.__name__ = typ.__name__  # argparse names the type in its errors
    return parse


def _show(value) -> str:
    """A value as it is written on the command line."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return repr(value) if isinstance(value, float) else str(value)


def _help(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    if f.default not in (MISSING, None, ()) and not isinstance(f.default, bool) and "(default" not in text:
        text = f"{text} (default {_show(f.default)})"
    return text.replace("%", "%%")  # argparse formats help with %


def _cli_fields(cls):
    return [f for f in fields(cls) if "help" in f.metadata]


def _switch(cls, f: dataclasses.Field, optional: bool) -> dict:
    if optional:
        if f.default is not None:
            raise TypeError(f"{cls.__name__}.{f.name}: an optional switch defaults to None")
        return {"action": argparse.BooleanOptionalAction}
    if not isinstance(f.default, bool):
        raise TypeError(f"{cls.__name__}.{f.name}: a switch defaults to False or True")
    return {"action": "store_false" if f.default else "store_true"}


def _argument(cls, f: dataclasses.Field, annotation) -> dict:
    """add_argument's keywords for one field, its flags and default aside."""
    typ = _value_type(annotation)
    optional = typ is not annotation
    kw: dict = {"dest": f.name, "help": _help(f)}
    if typ is bool:
        return {**kw, **_switch(cls, f, optional)}
    if f.metadata.get("repeat"):
        if not _is_tuple(typ) or f.default != ():
            raise TypeError(f"{cls.__name__}.{f.name}: a repeated flag is a tuple that defaults to ()")
        return {**kw, "action": "append", "type": str, "default": None, "metavar": f.metadata.get("metavar")}
    if _is_tuple(typ):
        typ = str  # the dataclass splits the text (see the module docstring)
    # "none" is None only for numbers: text stays text (a prompt, a path or a name may be "none" or "")
    kw["type"] = _or_none(typ) if optional and typ is not str else typ
    if f.metadata.get("choices"):
        kw["choices"] = list(f.metadata["choices"])
    elif f.metadata.get("metavar"):
        kw["metavar"] = f.metadata["metavar"]
    return kw


def add_arguments(parser: argparse.ArgumentParser, cls, groups: dict | None = None) -> dict:
    """One argument per declared field of ``cls``, in declaration order, grouped by ``group``.
    ``groups`` are containers the command made itself, by group name (e.g. a required mutually
    exclusive group: ``--model`` or ``--from-samples``). Returns the groups by name, for a
    command's own flags (``--resume``, ...)."""
    hints = typing.get_type_hints(cls)
    groups = {None: parser, **(groups or {})}
    for f in _cli_fields(cls):
        group = f.metadata.get("group")
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        kw = _argument(cls, f, hints[f.name])
        if f.default is MISSING:
            # argparse refuses a required member of an exclusive group: there the group is what is required
            if not isinstance(groups[group], argparse._MutuallyExclusiveGroup):
                kw["required"] = True
        elif "default" not in kw:
            kw["default"] = f.default
        names = [f.metadata["short"]] if f.metadata.get("short") else []
        groups[group].add_argument(*names, _flag(f), **kw)
    return groups


def from_args(cls, namespace: argparse.Namespace, **extra):
    """The dataclass the parsed flags describe (``extra`` fills fields that have no flag)."""
    values = {f.name: getattr(namespace, f.name) for f in _cli_fields(cls)}
    for f in _cli_fields(cls):
        if f.metadata.get("repeat"):
            values[f.name] = tuple(values[f.name] or ())  # argparse's append collects a list, None when unused
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
        if isinstance(value, bool):
            # a switch that differs from its default: --name, --no-name, or (optional) --name / --no-name
            flag = _flag(f)
            argv.append(flag if f.default is not None or value else "--no-" + flag[2:])
        elif f.metadata.get("repeat"):
            for v in value:
                argv += [_flag(f), str(v)]
        else:
            argv += [_flag(f), _show(value)]
    return argv
