"""``m1 convert``: argument parsing only; the work is :func:`m1.model.convert.convert`."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Convert a Llama or Qwen2 teacher into a GraniteMoeHybridForCausalLM checkpoint whose Mamba2 layers are
initialised from the attention weights (Mamba-in-the-Llama). The output is a plain Hugging Face
directory (config, safetensors, tokenizer, generation config) plus m1.json."""

EPILOG = """\
examples:
  m1 convert --teacher smollm2-135m --out runs/hybrid
  m1 convert --teacher ./Llama-3.2-1B --out runs/l1b --attn-layers 3,8,13
  m1 convert --teacher smollm2-135m --out runs/half --attn-layers auto --attn-fraction 0.5
  m1 convert --teacher smollm2-135m --out runs/exact --attn-layers all"""


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="teacher (Llama/Qwen2) -> hybrid Mamba2/attention checkpoint",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    from ..model.convert import ConvertSettings
    from ..settings import add_arguments

    add_arguments(p, ConvertSettings)
    p.add_argument("--out", required=True, help="output checkpoint directory (must not exist unless --force)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(a) -> None:
    from ..model.convert import ConvertSettings, convert
    from ..model.info import format_info, model_info
    from ..settings import from_args

    out = convert(from_args(ConvertSettings, a), a.out, force=a.force, log=lambda m: print(m, file=sys.stderr))
    print(format_info(model_info(out)))
