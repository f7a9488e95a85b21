"""OlympiadBench, English text-only open-ended math subset, 675 problems.

``final_answer`` is a one-element list of strings, often wrapped in ``$...$``
(sometimes several ``$``-groups for multiple answers, once with a trailing
period); we join and strip those into one bare LaTeX answer.  ``unit``,
``answer_type``, ``is_multiple_answer`` and ``error`` (a numeric tolerance in one
row) are kept in ``meta``; grading does not apply units or tolerances.
"""

from __future__ import annotations

from .base import Problem, read_jsonl

NAME = "olympiadbench"
SPLITS = ("test",)
DESCRIPTION = "OlympiadBench EN text-only math, open-ended (LaTeX answers)"


def clean_final_answer(final_answer: list[str]) -> str:
    """``["$2n-2$"]`` -> ``"2n-2"``; ``["$69$,$84$"]`` -> ``"69,84"``."""
    s = ",".join(final_answer).strip()
    s = s.replace("\\$", "\0").replace("$", "").replace("\0", "\\$")
    return s.strip().rstrip(".").strip()


def load(split: str = "test") -> list[Problem]:
    if split not in SPLITS:
        raise ValueError(f"olympiadbench has splits {SPLITS}, not {split!r}")
    problems = []
    for row in read_jsonl(NAME, "test.jsonl"):
        sols = row.get("solution") or []
        problems.append(Problem(
            id=str(row["id"]), question=row["question"],
            answer=clean_final_answer(row["final_answer"]),
            solution=sols[0] if sols else None,
            meta={"subject": row.get("subfield"), "answer_type": row.get("answer_type"),
                  "unit": row.get("unit"), "is_multiple_answer": row.get("is_multiple_answer"),
                  "error": row.get("error")}))
    return problems
