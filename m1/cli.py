"""The ``m1`` command line: parses arguments, calls the Python API, prints errors in one line.

No logic lives here: each subcommand's parser is in ``m1.commands.<name>`` and calls one function of
the package (``m1.model.convert.convert``, ``m1.train.sft.sft``, ...), so anything the CLI does can be
done from Python.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import M1Error


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub is reachable; fail fast instead of retrying
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="m1", description="Hybrid Mamba reasoning models: convert -> distill -> sft -> grpo -> generate -> eval -> bench.")
    parser.add_argument("--version", action="version", version=f"m1 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    import importlib

    from .commands import COMMAND_MODULES

    for name in COMMAND_MODULES:
        importlib.import_module(f"m1.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        args.func(args)
    except M1Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
