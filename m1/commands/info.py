"""``m1 info``: argument parsing only; the work is :func:`m1.model.info.model_info`.

Its one setting is which checkpoint (a positional argument) and one output switch, so it has no
settings dataclass: there is nothing to save beside a checkpoint or to resume."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="layers, parameters, KV-cache vs Mamba-state bytes of a checkpoint",
                              description="Describe a checkpoint: layers by type, parameter count, dtype, KV-cache "
                                          "bytes per token of the attention layers and the fixed Mamba state bytes "
                                          "per sequence.")
    p.add_argument("model", help="checkpoint directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def run(a) -> None:
    from ..model.info import format_info, info_json, model_info

    info = model_info(a.model)
    print(info_json(info) if a.json else format_info(info))
