"""Answer-checking throughput (checks per second) of m1.eval.grading.

    python benchmarks/bench_grading.py [--workers 2] [--timeout 5]

Three workloads, each on a fresh Checker (empty result cache; the workers are
started before the clock starts, startup is reported separately):

* ``gsm8k+math``: realistic model output -- GSM8K example solutions (4 x 1,319,
  ``A: N`` endings), the MATH CoT fixture (800 boxed LaTeX answers) and the
  MATH-500 reference solutions.  Most are decided by the in-process fast path.
* ``sympy-only``: 400 distinct symbolic pairs that must go through math-verify
  in the worker processes (the worst case for throughput).
* ``equal-numbers``: 20,000 plain-number checks (the fast path alone).

Not a test: it only prints numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from m1.eval.grading import Checker
from m1.tasks import load_task

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def realistic_pairs() -> list[tuple[str, str]]:
    pairs = []
    gsm = SHARED / "gsm8k" / "example_model_solutions.jsonl"
    if gsm.exists():
        for line in gsm.open():
            row = json.loads(line)
            gold = row["ground_truth"].strip().split("\n")[-1][3:]
            for f in ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification"):
                pairs.append((row[f]["solution"], gold))
    cot = SHARED / "math_cot_100" / "math_cot_100.jsonl"
    if cot.exists():
        for line in cot.open():
            row = json.loads(line)
            pairs += [(r, row["answer"]) for r in row["response"]]
    pairs += [(p.solution, p.answer) for p in load_task("math500")]
    return pairs


def sympy_pairs(n: int = 400) -> list[tuple[str, str]]:
    out = []
    for i in range(n):
        a, b = i % 17 + 2, i // 17 + 3
        forms = [(f"\\boxed{{\\frac{{\\sqrt{{{a}}}}}{{{b}}}}}", f"\\frac{{{a}}}{{{b}\\sqrt{{{a}}}}}"),
                 (f"\\boxed{{{a}(x+{b})}}", f"{a}x+{a * b + (i // 4) % 2}"),
                 (f"\\boxed{{(x+{a})^2}}", f"x^2+{2 * a}x+{a * a + i % 2}"),
                 (f"\\boxed{{{a}\\pi/{b}}}", f"\\frac{{{a}\\pi}}{{{b}}}")]
        out.append(forms[i % 4])
    return out


def run(name: str, pairs, workers: int, timeout: float) -> None:
    with Checker(workers, timeout=timeout) as c:
        t0 = time.perf_counter()
        c.check_many([("\\boxed{x+1}", "1+x")] * workers)  # start + warm workers
        startup = time.perf_counter() - t0
        t0 = time.perf_counter()
        verdicts = c.check_many(pairs)
        dt = time.perf_counter() - t0
    correct = sum(v.correct for v in verdicts)
    print(f"{name:14s} {len(pairs):6d} checks in {dt:6.2f}s = {len(pairs) / dt:9.0f} checks/s "
          f"({correct} correct; worker startup {startup:.2f}s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=5.0)
    args = ap.parse_args()
    run("gsm8k+math", realistic_pairs(), args.workers, args.timeout)
    run("sympy-only", sympy_pairs(), args.workers, args.timeout)
    run("equal-numbers", [(f"\\boxed{{{i}}}", f"{i % 7 + i - i % 7}") for i in range(20_000)],
        args.workers, args.timeout)


if __name__ == "__main__":
    main()
