"""AMC 2023 (12A and 12B), 40 problems rewritten as open-answer questions.

The gold ``answer`` is a JSON float (``27.0``, one ``-1.0``), all integral; we
store it as an integer string so ``str()`` never yields ``"27.0"``.
"""

from __future__ import annotations

import re

from .base import Problem, integer_answer, read_jsonl

NAME = "amc23"
SPLITS = ("test",)
DESCRIPTION = "AMC 12 2023 A+B, open-answer form (integer answers)"

_URL_RE = re.compile(r"(\d{4})_AMC_(\w+?)_Problems/Problem_(\d+)")


def load(split: str = "test") -> list[Problem]:
    if split not in SPLITS:
        raise ValueError(f"amc23 has splits {SPLITS}, not {split!r}")
    problems = []
    for row in read_jsonl(NAME, "test.jsonl"):
        m = _URL_RE.search(row.get("url", ""))
        pid = f"{m.group(1)}-{m.group(2)}-{m.group(3)}" if m else str(row["id"])
        problems.append(Problem(id=pid, question=row["problem"],
                                answer=integer_answer(row["answer"]),
                                meta={"source_id": row["id"], "url": row.get("url")}))
    return problems
