"""MATH-500 (the PRM800K test subset of Hendrycks et al.'s MATH), 500 problems.

``answer`` is already a bare LaTeX string (``\\frac{14}{3}``, ``10,\\!080``,
``\\text{(C)}``); we keep it as is and let `m1.eval.grading` normalise both sides the
same way.  ``level`` (1-5) and ``subject`` go into ``meta`` for breakdowns.
"""

from __future__ import annotations

from .base import Problem, read_jsonl

NAME = "math500"
SPLITS = ("test",)
DESCRIPTION = "MATH-500 competition problems, levels 1-5 (LaTeX answers)"


def load(split: str = "test") -> list[Problem]:
    if split not in SPLITS:
        raise ValueError(f"math500 has splits {SPLITS}, not {split!r}")
    return [
        Problem(id=row["unique_id"], question=row["problem"], answer=row["answer"].strip(),
                solution=row["solution"],
                meta={"level": row["level"], "subject": row["subject"]})
        for row in read_jsonl(NAME, "test.jsonl")
    ]
