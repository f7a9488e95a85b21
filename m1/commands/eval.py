"""``m1 eval``: benchmark a checkpoint, or recompute metrics from a samples file."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "eval", help="math benchmarks: pass@k, maj@k, best-of-N, accuracy vs seconds, with a report",
        description="Evaluate a checkpoint on a math task (results appended per sample, resumable; summary.json, "
                    "report.md and PNG plots in --out), or recompute metrics from a samples file without a model.",
        epilog="tasks: gsm8k, math500, aime24, aime25, amc23, olympiadbench, arith[:steps=S,digits=D]\n"
               "examples:\n  m1 eval --model runs/hybrid --task gsm8k --limit 50\n"
               "  m1 eval --model runs/hybrid --task math500 -n 16 --k 1,4,16 --temperature 0.7 --out runs/eval\n"
               "  m1 eval --from-samples samples.jsonl --k 1,4,8",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    from ..eval.run import EvalConfig
    from ..settings import add_arguments

    src = p.add_mutually_exclusive_group(required=True)
    # before --model (EvalConfig's first flag): argparse shows the pair as one choice only when adjacent
    src.add_argument("--from-samples", metavar="FILE.jsonl",
                     help='rows {"id", "gold", "completions": [...], "scores": [...] (optional)}: print metrics JSON')
    add_arguments(p, EvalConfig, groups={"source": src})
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="stop starting new problems after this much wall time (rerun to continue)")
    p.add_argument("--out", default=None, help="output directory (default runs/eval-<task>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(a) -> None:
    if a.from_samples:
        from ..eval.evaluate import summarize_samples
        from ..eval.run import parse_ks_flag

        summary = summarize_samples(a.from_samples, parse_ks_flag(a.ks or "1"))
        print(json.dumps(summary, indent=2))
        return
    from ..eval.run import EvalConfig, run_eval
    from ..settings import from_args

    cfg = from_args(EvalConfig, a)
    out = a.out or f"runs/eval-{cfg.task.split(':')[0]}"
    summary = run_eval(cfg, out, budget_seconds=a.budget_seconds, progress=not a.no_progress,
                       log=lambda m: print(m, file=sys.stderr))
    keys = [k for k in summary if "@" in k and not k.startswith("accuracy")]
    print(json.dumps({k: summary[k] for k in ["task", "n_problems", "n_samples", *keys] if k in summary}, indent=2))
    print(f"report: {out}/report.md", file=sys.stderr)
