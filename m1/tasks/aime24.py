"""AIME 2024 (I and II), 30 problems.

Quirks handled here: answers are zero-padded strings in 7 rows (``"025"`` ->
``"25"``), and rows are ordered by URL string, so the readable id
(``2024-I-1``) is recovered from the AoPS URL rather than the numeric ``id``.
"""

from __future__ import annotations

from .base import Problem, aops_problems

NAME = "aime24"
SPLITS = ("test",)
DESCRIPTION = "AIME 2024 I+II (integer answers 0-999)"

_URL = r"(\d{4})_AIME_(I+)_Problems/Problem_(\d+)"


def load(split: str = "test") -> list[Problem]:
    if split not in SPLITS:
        raise ValueError(f"aime24 has splits {SPLITS}, not {split!r}")
    return aops_problems(NAME, _URL)
