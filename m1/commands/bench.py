"""``m1 bench``: decode throughput and memory, hybrid vs same-size transformer."""

from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "bench", help="decode tokens/s and memory vs batch and length, hybrid vs all-attention, vs byte limits",
        description="Measure decode throughput, time to first token and memory of a hybrid against its all-attention "
                    "twin through the same engine (EOS ignored), with the byte-limit ratio that memory traffic allows "
                    "and, on CUDA, the fraction of the bandwidth roofline. --shape builds random-weight models.",
        epilog="examples:\n  m1 bench --shape smollm2-135m --batch 1,16 --gen-len 256,1024\n"
               "  m1 bench --shape llama-3.2-3b --device cuda --dtype bfloat16 --batch 1,max --gen-len 8192\n"
               "  m1 bench --model runs/hybrid --baseline runs/teacher --batch 16\n"
               "  m1 bench --shape llama-3.2-3b --device cuda --dtype bfloat16 --batch max --gen-len 8192 "
               "--context 1024,2048,4096,8192",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    from ..bench import BenchSettings
    from ..settings import add_arguments

    add_arguments(p, BenchSettings, groups={"source": p.add_mutually_exclusive_group(required=True)})
    p.set_defaults(func=run)


def run(a) -> None:
    from ..bench import BenchSettings, markdown_table, run_bench
    from ..settings import from_args

    rows = run_bench(from_args(BenchSettings, a), log=lambda m: print(m, file=sys.stderr))
    print(markdown_table(rows))
