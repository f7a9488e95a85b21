"""``m1 export``: argument parsing only; the work is :func:`m1.model.export.export_gguf`."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Write an m1 checkpoint as one GGUF file for llama.cpp / Ollama, with llama.cpp's own converter
(convert_hf_to_gguf.py, from --llama-cpp or $M1_LLAMA_CPP_DIR), then fix what it gets wrong for m1's
hybrids (RoPE in the attention layers, the context length) and check the layer layout it wrote.

An all-attention checkpoint runs in stock llama.cpp. A hybrid's file is complete, but stock llama.cpp
refuses it when it loads (GGML_ASSERT(2 * n_embd == d_inner): it expects mamba_expand = 2, m1's
mixers have 1); see docs/readers.md."""

EPILOG = """\
examples:
  make llama-cpp-src    # llama.cpp's converter into .llama.cpp (from the llama-cpp-python sdist on PyPI)
  m1 export --model runs/exact --gguf exact.gguf --llama-cpp .llama.cpp
  M1_LLAMA_CPP_DIR=~/llama.cpp m1 export --model runs/demo/hybrid/grpo --gguf hybrid.gguf --outtype q8_0"""


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="m1 checkpoint -> GGUF file (llama.cpp / Ollama)",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    from ..model.export import ExportSettings
    from ..settings import add_arguments

    add_arguments(p, ExportSettings)
    p.add_argument("--force", action="store_true", help="replace --gguf if it exists")
    p.set_defaults(func=run)


def run(a) -> None:
    from ..model.export import ExportSettings, export_gguf
    from ..settings import from_args

    print(export_gguf(from_args(ExportSettings, a), force=a.force, log=lambda m: print(m, file=sys.stderr)))
