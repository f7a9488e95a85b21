"""Shared pieces of the benchmark loaders: the `Problem` record and file access.

Every benchmark module turns its own file layout into the same `Problem` so that
prompting, grading and metrics never need to know where a problem came from. Gold
answers are normalised *at load time* (AIME zero padding, AMC floats, GSM8K
``#### 1,080``...), because each quirk is a property of one data file, not of
answer checking.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any


@dataclass
class Problem:
    """One benchmark problem.

    ``answer`` is the gold answer as a normalised string (LaTeX allowed, no
    ``$``, no ``\\boxed``); ``solution`` is a worked solution ending in
    ``\\boxed{answer}`` when the source has one; ``meta`` holds per-benchmark
    fields such as ``level`` and ``subject`` used by metric breakdowns.
    """

    id: str
    question: str
    answer: str
    solution: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def data_path(task: str, filename: str):
    """Traversable for a data file shipped in ``m1/tasks/data/<task>/``."""
    return resources.files("m1.tasks").joinpath("data", task, filename)


def read_jsonl(task: str, filename: str) -> list[dict]:
    """Rows of a packaged JSON Lines file (found via importlib.resources, so
    it works from a wheel or a source checkout alike)."""
    with data_path(task, filename).open("r", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


_CALC_RE = re.compile(r"<<[^>]*>>")


def strip_calculator(text: str) -> str:
    """Drop GSM8K calculator annotations: ``48/2 = <<48/2=24>>24`` -> ``48/2 = 24``."""
    return _CALC_RE.sub("", text)


def integer_answer(value: Any) -> str:
    """Canonical integer string: ``"025"`` -> ``"25"``, ``27.0`` -> ``"27"``,
    ``"1,080"`` -> ``"1080"``.  Raises ValueError if not an integer."""
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"not an integer answer: {value!r}")
        return str(int(value))
    s = str(value).strip().replace(",", "")
    return str(int(s))


def boxed(answer: str) -> str:
    return "\\boxed{" + answer + "}"



def aops_problems(task: str, url_pattern: str) -> list[Problem]:
    """AIME/AMC rows (``id``, ``problem``, integer ``answer``, AoPS ``url``, optional ``solution``) with
    the readable id ``YEAR-CONTEST-N`` recovered from the AoPS URL (the numeric ids follow URL string
    order, not problem order). ``url_pattern`` captures (year, contest, number)."""
    import re

    url_re = re.compile(url_pattern)
    problems = []
    for row in read_jsonl(task, "test.jsonl"):
        m = url_re.search(row.get("url", ""))
        pid = f"{m.group(1)}-{m.group(2)}-{m.group(3)}" if m else str(row["id"])
        problems.append(Problem(id=pid, question=row["problem"], answer=integer_answer(row["answer"]),
                                solution=row.get("solution") or None,
                                meta={"source_id": row["id"], "url": row.get("url")}))
    return problems
