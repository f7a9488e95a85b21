"""Agreement of m1's answer checker and of plain math-verify with the labelled grading corpus.

    python benchmarks/grading_agreement.py [--json PATH] [--list] [--workers 2] [--cases FILE.jsonl]

The corpus (``tests/grading_corpus.py``) holds model outputs, gold answers and
the verdict a careful human grader gives.  Both graders see the same pairs:

* m1: one :class:`m1.eval.grading.Checker`, ``check_many`` over all pairs, defaults
  (``last_number=False``, ``lists="unordered"``);
* math-verify, called directly with its defaults:
  ``verify(parse(gold), parse(output))``; an exception counts as False.
  With its default extraction a bare LaTeX gold (``\\frac34``, ``(3,4)``)
  is not inside a math environment and parses to nothing, so a second row
  wraps the gold as ``$gold$`` (how math-verify's README parses a LaTeX
  gold): ``verify(parse("$" + gold + "$"), parse(output))``.

Prints cases, agreement, false positives (graded correct where the corpus says
wrong; "hard" = on the corpus's hard negatives) and per-category agreement;
``--json`` writes the same numbers, ``--list`` also prints every disagreement.
``--cases FILE.jsonl`` runs the same comparison on other cases instead of the
corpus: one JSON object per line with ``output``, ``gold``, ``expected`` and
``category`` (and ``source``, which adds a per-source table); none count as hard
negatives.  ``benchmarks/data/grading_public.jsonl`` is such a set, harvested
from other projects' public test suites (see its ``.SOURCE.md``).
The ``__main__`` guard is required: the checker's workers use a forkserver.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from grading_corpus import CASES, Case  # noqa: E402

from m1.eval.grading import Checker  # noqa: E402


def load_cases(path: Path) -> list[Case]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Case(r["category"], r["output"], r["gold"], bool(r["expected"]), False, r.get("source", ""))
            for r in rows]


def grade_m1(cases: list[Case], workers: int) -> tuple[list[bool], float]:
    t0 = time.perf_counter()
    with Checker(workers) as checker:
        verdicts = checker.check_many([(c.output, c.gold) for c in cases])
    return [v.correct for v in verdicts], time.perf_counter() - t0


def grade_math_verify(cases: list[Case], wrap_gold: bool) -> tuple[list[bool], float]:
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.CRITICAL)
    out = []
    t0 = time.perf_counter()
    for c in cases:
        gold = "$" + c.gold + "$" if wrap_gold else c.gold
        try:
            out.append(bool(verify(parse(gold), parse(c.output))))
        except Exception:  # noqa: BLE001 - a crash is a failed check
            out.append(False)
    return out, time.perf_counter() - t0


def agreement_by(agree: list[bool], keys: list[str]) -> dict:
    """{key: agree, cases, agreement_pct} over the cases that share a key (a category, a source)."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for a, k in zip(agree, keys):
        counts[k][0] += a
        counts[k][1] += 1
    return {k: {"agree": a, "cases": n, "agreement_pct": round(100 * a / n, 1)} for k, (a, n) in sorted(counts.items())}


def summarize(got: list[bool], cases: list[Case]) -> dict:
    agree = [g == c.expected for g, c in zip(got, cases)]
    fp = [g and not c.expected for g, c in zip(got, cases)]
    out = {
        "agree": sum(agree),
        "agreement_pct": round(100 * sum(agree) / len(cases), 1),
        "false_positives": sum(fp),
        "false_positives_hard": sum(f and c.hard for f, c in zip(fp, cases)),
        "false_negatives": sum(not g and c.expected for g, c in zip(got, cases)),
        "per_category": agreement_by(agree, [c.category for c in cases]),
    }
    if cases is not CASES:  # a --cases file keeps each case's source in its note
        out["per_source"] = agreement_by(agree, [c.note.split(":")[0] for c in cases])
    return out


def print_breakdown(key: str, label: str, m1: dict, mv: dict, mvw: dict) -> None:
    print(f"\n| {label} | cases | m1 | math-verify | math-verify, `$gold$` |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, a in m1[key].items():
        b, w = mv[key][name], mvw[key][name]
        print(f"| {name} | {a['cases']} | {a['agreement_pct']:.0f}% | {b['agreement_pct']:.0f}% "
              f"| {w['agreement_pct']:.0f}% |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", type=Path, help="write the numbers to this file")
    ap.add_argument("--list", action="store_true", help="print every disagreement")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cases", type=Path, help="grade the cases in this JSONL file instead of the corpus")
    args = ap.parse_args()
    cases = load_cases(args.cases) if args.cases else CASES

    m1_got, m1_s = grade_m1(cases, args.workers)
    mv_got, mv_s = grade_math_verify(cases, wrap_gold=False)
    mvw_got, mvw_s = grade_math_verify(cases, wrap_gold=True)
    m1, mv, mvw = summarize(m1_got, cases), summarize(mv_got, cases), summarize(mvw_got, cases)
    n = len(cases)
    n_false = sum(not c.expected for c in cases)
    n_hard = sum(c.hard for c in cases)

    print(f"{args.cases or 'corpus'}: {n} cases ({n - n_false} expected True, {n_false} expected False, "
          f"{n_hard} of them hard negatives), {len(m1['per_category'])} categories\n")
    print("| grader | agreement | false positives (hard) | false negatives | seconds |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, s, secs in (("m1 Checker", m1, m1_s), ("math-verify defaults", mv, mv_s),
                          ("math-verify defaults, gold as `$gold$`", mvw, mvw_s)):
        print(f"| {name} | {s['agree']}/{n} = {s['agreement_pct']:.1f}% | "
              f"{s['false_positives']} ({s['false_positives_hard']}) | {s['false_negatives']} | {secs:.1f} |")
    print_breakdown("per_category", "category", m1, mv, mvw)
    if "per_source" in m1:
        print_breakdown("per_source", "source", m1, mv, mvw)

    if args.list:
        for name, got in (("m1", m1_got), ("math-verify", mv_got), ("math-verify, $gold$", mvw_got)):
            print(f"\n{name} disagreements:")
            for g, c in zip(got, cases):
                if g != c.expected:
                    src = f" source={c.note}" if args.cases else ""
                    print(f"  [{c.category}] expected={c.expected} got={g} gold={c.gold!r} output={c.output!r}{src}")

    if args.json:
        versions = {}
        for pkg in ("math-verify", "latex2sympy2_extended", "sympy"):
            try:
                versions[pkg] = metadata.version(pkg)
            except metadata.PackageNotFoundError:
                versions[pkg] = None
        record = {"cases": n, "expected_false": n_false, "hard_negatives": n_hard,
                  "m1": {**m1, "seconds": round(m1_s, 2)},
                  "math_verify": {**mv, "seconds": round(mv_s, 2)},
                  "math_verify_gold_in_dollars": {**mvw, "seconds": round(mvw_s, 2)},
                  "versions": versions}
        if args.cases:
            record["cases_file"] = str(args.cases)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
