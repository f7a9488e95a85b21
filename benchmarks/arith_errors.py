"""Where arith answers go wrong: every "a OP b = c" a model wrote, checked, per operation.

    python benchmarks/arith_errors.py RESULTS.jsonl [RESULTS.jsonl ...] [--examples 8]

Reads `m1 eval` results files (one row per sample, the completion in ``completion``) and prints, per
file, how many equations of each operation were written and how many are wrong, the wrong samples
whose equations are all right (a plan error, not an arithmetic one), and the commonest wrong
equations. The `arith` task's solutions write every step as "a OP b = c", so this separates "cannot
compute 9 - 6" from "chose the wrong step".
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (-?\d+)")
OPS = "+-*/"


def value(a: int, op: str, b: int) -> int | None:
    if op == "/":
        return a // b if b and a % b == 0 else None  # arith divides exactly; anything else is wrong
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def equations(completion: str) -> list[tuple[int, str, int, int, bool]]:
    out = []
    for a, op, b, c in EQUATION.findall(completion):
        a, b, c = int(a), int(b), int(c)
        out.append((a, op, b, c, value(a, op, b) == c))
    return out


def summarise(path: Path) -> dict:
    written, wrong, examples = Counter(), Counter(), Counter()
    samples = plan_errors = failed = 0
    for line in path.read_text().splitlines():
        row = json.loads(line)
        samples += 1
        eqs = equations(row.get("completion") or "")
        for a, op, b, c, ok in eqs:
            written[op] += 1
            if not ok:
                wrong[op] += 1
                examples[f"{a} {op} {b} = {c}"] += 1
        if not row.get("correct"):
            failed += 1
            plan_errors += all(ok for *_, ok in eqs)
    return {"file": str(path), "samples": samples, "wrong_samples": failed, "wrong_with_every_equation_right": plan_errors,
            "equations": {op: {"written": written[op], "wrong": wrong[op]} for op in OPS if written[op]},
            "commonest_wrong": examples.most_common()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--examples", type=int, default=8, help="commonest wrong equations to print per file")
    a = ap.parse_args()
    print("| results | wrong samples | ... with every equation right | " +
          " | ".join(f"`{op}` wrong / written" for op in OPS) + " |")
    print("|---|---:|---:|" + "---:|" * len(OPS))
    rows = [summarise(p) for p in a.results]
    for s in rows:
        cells = [f"{s['equations'][op]['wrong']} / {s['equations'][op]['written']} "
                 f"({100 * s['equations'][op]['wrong'] / s['equations'][op]['written']:.0f}%)"
                 if op in s["equations"] else "-" for op in OPS]
        print(f"| {s['file']} | {s['wrong_samples']} / {s['samples']} | {s['wrong_with_every_equation_right']} | "
              + " | ".join(cells) + " |")
    for s in rows:
        print(f"\n{s['file']}: " + ", ".join(f"{e} (x{n})" for e, n in s["commonest_wrong"][:a.examples]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
