"""AIME 2024 (I and II), 30 problems.

Quirks handled here: answers are zero-padded strings in 7 rows (``"025"`` ->
``"25"``), and rows are ordered by URL string, so the readable id
(``2024-I-1``) is recovered from the AoPS URL rather than the numeric ``id``.
"""

from __future__ import annotations

import re

from .base import Problem, integer_answer, read_jsonl

NAME = "aime24"
SPLITS = ("test",)
DESCRIPTION = "AIME 2024 I+II (integer answers 0-999)"

_URL_RE = re.compile(r"(\d{4})_AIME_(I+)_Problems/Problem_(\d+)")


def load(split: str = "test") -> list[Problem]:
    if split not in SPLITS:
        raise ValueError(f"aime24 has splits {SPLITS}, not {split!r}")
    problems = []
    for row in read_jsonl(NAME, "test.jsonl"):
        m = _URL_RE.search(row.get("url", ""))
        pid = f"{m.group(1)}-{m.group(2)}-{m.group(3)}" if m else str(row["id"])
        problems.append(Problem(id=pid, question=row["problem"],
                                answer=integer_answer(row["answer"]),
                                solution=row.get("solution") or None,
                                meta={"source_id": row["id"], "url": row.get("url")}))
    return problems
