"""Benchmarks and the ``arith`` generator behind one loader.

``load_task(name, split="test", limit=None, seed=None, **options)`` returns a
list of :class:`Problem`.  ``name`` may carry options after a colon, so a
whole configuration fits in one CLI argument::

    load_task("math500", limit=50, seed=0)           # 50 random MATH-500 problems
    load_task("gsm8k", split="train")
    load_task("arith:steps=3,digits=2", n=200, seed=1)
    load_task("gsm8k:split=train,limit=8")

Option values in the string are parsed as integers when they look like one,
otherwise kept as strings; keyword arguments win over the string.  For file
benchmarks ``seed`` shuffles the problems (deterministically) before
``limit`` is applied, and ``seed=None`` keeps file order.  For ``arith``,
``seed`` selects the random stream and ``n``/``limit`` the count (see
:mod:`m1.tasks.arith`).

The data files live in ``m1/tasks/data/<name>/`` with their licence and
``SOURCE.md``, and are found with :mod:`importlib.resources`, so they are
available after ``pip install``.
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import M1Error
from . import aime24, aime25, amc23, arith, gsm8k, math500, olympiadbench
from .base import Problem

__all__ = ["Problem", "TaskInfo", "TASKS", "UnknownTaskError", "load_task", "parse_task_spec"]


class UnknownTaskError(M1Error, ValueError):
    """Raised for a task name that is not in :data:`TASKS`."""


@dataclass(frozen=True)
class TaskInfo:
    name: str
    splits: tuple[str, ...]
    description: str
    loader: Callable[..., list[Problem]]
    generated: bool = False  # procedural (unlimited) rather than a data file


TASKS: dict[str, TaskInfo] = {
    m.NAME: TaskInfo(m.NAME, m.SPLITS, m.DESCRIPTION, m.load, generated=(m is arith))
    for m in (gsm8k, math500, aime24, aime25, amc23, olympiadbench, arith)
}


def _coerce(value: str) -> Any:
    v = value.strip()
    try:
        return int(v)
    except ValueError:
        return v


def parse_task_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"arith:steps=3,digits=2"`` -> ``("arith", {"steps": 3, "digits": 2})``."""
    name, _, rest = spec.partition(":")
    opts: dict[str, Any] = {}
    if rest.strip():
        for part in rest.split(","):
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"bad task option {part!r} in {spec!r}: expected key=value")
            opts[key.strip()] = _coerce(value)
    return name.strip().lower(), opts


def load_task(name: str, split: str = "test", limit: int | None = None,
              seed: int | None = None, **options: Any) -> list[Problem]:
    """Load a benchmark (or generate ``arith`` problems); see module docstring."""
    base, spec_opts = parse_task_spec(name)
    if base not in TASKS:
        raise UnknownTaskError(
            f"unknown task {base!r}; known tasks: {', '.join(sorted(TASKS))}")
    opts = {**spec_opts, **options}
    split = opts.pop("split", split)
    limit = opts.pop("limit", limit)
    seed = opts.pop("seed", seed)
    if limit is not None and int(limit) < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    info = TASKS[base]
    if split not in info.splits:
        raise ValueError(f"task {base!r} has splits {info.splits}, not {split!r}")
    accepted = inspect.signature(info.loader).parameters
    unknown = [k for k in opts if k not in accepted or k in ("split",)]
    if unknown:
        valid = [p for p in accepted if p not in ("split", "n", "seed")]
        raise ValueError(f"task {base!r} does not take option(s) {', '.join(unknown)}"
                         + (f"; it takes: {', '.join(valid)}" if valid else ""))
    if info.generated:
        if "n" not in opts and limit is not None:
            opts["n"] = int(limit)
        problems = info.loader(split, seed=seed, **opts)
        return problems if limit is None else problems[:int(limit)]
    problems = info.loader(split, **opts)
    if seed is not None:
        problems = problems[:]
        random.Random(seed).shuffle(problems)
    return problems if limit is None else problems[:int(limit)]
