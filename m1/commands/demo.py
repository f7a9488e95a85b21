"""``m1 demo``: the whole pipeline end to end on the embedded teacher."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser(
        "demo", help="the whole M1 pipeline end to end (convert, distill, sft, grpo, eval, bench) with a report",
        description="Convert the teacher into an exact all-attention copy and a hybrid, distill the hybrid, give both "
                    "the same SFT and GRPO budget on the arith task, evaluate after every stage, benchmark decoding, "
                    "and write report.md with plots. Every stage is skipped when its output exists, so rerunning "
                    "an interrupted demo continues it.",
        epilog="budgets:\n  smoke  tiny random teacher, a few minutes (CI)\n"
               "  small  SmolLM2-135M on a laptop CPU, ~1 hour on 2 cores with bf16 (AMX), longer in float32 (the README's main job)\n"
               "  full   a GPU: longer training, more samples\n",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", default="small", choices=["smoke", "small", "full"])
    p.add_argument("--out", default=None, help="run directory (default runs/demo-<budget>)")
    p.add_argument("--recipe", default=None, choices=["general", "from-teacher"],
                   help="how the hybrid is trained: general = distil from the base teacher on GSM8K chats, then the "
                        "teacher's SFT + GRPO (the default: measured better on CPU); from-teacher = distil from "
                        "the teacher after SFT + GRPO on the task (align, kd, on-policy), then GRPO")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(a) -> None:
    from ..demo import run_demo

    report = run_demo(a.budget, a.out, progress=not a.no_progress, recipe=a.recipe)
    print(report)
