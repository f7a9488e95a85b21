"""AMC 2023 (12A and 12B), 40 problems rewritten as open-answer questions.

The gold ``answer`` is a JSON float (``27.0``, one ``-1.0``), all integral; we
store it as an integer string so ``str()`` never yields ``"27.0"``.
"""

from __future__ import annotations

from .base import Problem, aops_problems

NAME = "amc23"
SPLITS = ("test",)
DESCRIPTION = "AMC 12 2023 A+B, open-answer form (integer answers)"

_URL = r"(\d{4})_AMC_(\w+?)_Problems/Problem_(\d+)"


def load(split: str = "test") -> list[Problem]:
    if split not in SPLITS:
        raise ValueError(f"amc23 has splits {SPLITS}, not {split!r}")
    return aops_problems(NAME, _URL)
