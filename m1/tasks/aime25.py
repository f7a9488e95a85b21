"""AIME 2025 (I and II), 30 problems, assembled and repaired by us (see the
data folder's SOURCE.md).  Answers are plain integer strings; no solutions."""

from __future__ import annotations

from .base import Problem, integer_answer, read_jsonl

NAME = "aime25"
SPLITS = ("test",)
DESCRIPTION = "AIME 2025 I+II (integer answers 0-999)"


def load(split: str = "test") -> list[Problem]:
    if split not in SPLITS:
        raise ValueError(f"aime25 has splits {SPLITS}, not {split!r}")
    return [Problem(id=row["id"], question=row["problem"], answer=integer_answer(row["answer"]))
            for row in read_jsonl(NAME, "test.jsonl")]
