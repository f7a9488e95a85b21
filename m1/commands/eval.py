"""``m1 eval``: benchmark a checkpoint, or recompute metrics from a samples file."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import M1Error


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
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="checkpoint directory to evaluate")
    src.add_argument("--from-samples", metavar="FILE.jsonl",
                     help='rows {"id", "gold", "completions": [...], "scores": [...] (optional)}: print metrics JSON')
    p.add_argument("--task", default="gsm8k", help="task name (default gsm8k)")
    p.add_argument("-n", type=int, default=None, help="samples per problem (default: the largest k, else 1)")
    p.add_argument("--k", default=None, help="comma-separated k values for pass@k / maj@k (default: 1 and n)")
    p.add_argument("--limit", type=int, default=None, help="evaluate a seeded random subset of N problems")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 0 for n=1, else 0.7)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--few-shot", type=int, default=0, help="few-shot examples in the prompt (for base models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights dtype while sampling (default: as saved); bfloat16 is ~2x faster on GPUs and "
                        "on CPUs with AMX, at bf16 precision")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="stop starting new problems after this much wall time (rerun to continue)")
    p.add_argument("--out", default=None, help="output directory (default runs/eval-<task>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _ks(text):
    from ..evaluate import parse_ks

    try:
        return parse_ks(text)
    except ValueError as e:
        raise M1Error(f"--k {text}: {e}") from None


def run(a) -> None:
    if a.from_samples:
        from ..evaluate import summarize_samples

        summary = summarize_samples(a.from_samples, _ks(a.k or "1"))
        print(json.dumps(summary, indent=2))
        return
    from ..eval_run import EvalConfig, run_eval

    ks = _ks(a.k) if a.k else None
    n = a.n if a.n is not None else (max(ks) if ks else 1)
    ks = ks or sorted({1, n})
    temperature = a.temperature if a.temperature is not None else (0.0 if n == 1 else 0.7)
    if temperature < 0:
        raise M1Error(f"--temperature must be >= 0, got {temperature}")
    cfg = EvalConfig(model=a.model, task=a.task, n=n, ks=tuple(ks), limit=a.limit, temperature=temperature,
                     top_p=a.top_p, max_new_tokens=a.max_new_tokens, seed=a.seed, few_shot=a.few_shot,
                     dtype=a.dtype)
    out = a.out or f"runs/eval-{a.task.split(':')[0]}"
    summary = run_eval(cfg, out, budget_seconds=a.budget_seconds, progress=not a.no_progress,
                       log=lambda m: print(m, file=sys.stderr))
    keys = [k for k in summary if "@" in k and not k.startswith("accuracy")]
    print(json.dumps({k: summary[k] for k in ["task", "n_problems", "n_samples", *keys] if k in summary}, indent=2))
    print(f"report: {out}/report.md", file=sys.stderr)
