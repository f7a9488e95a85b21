"""GSM8K (OpenAI grade-school-math), train 7,473 / test 1,319 problems.

The source ``answer`` field is a chain of thought with ``<<a*b=c>>`` calculator
annotations and a last line ``#### N`` where N may carry thousands commas
(``#### 1,080``) or a minus sign.  We keep the integer as the gold answer and turn
the chain of thought into a clean solution ending in ``\\boxed{N}`` so the train
split doubles as SFT data and few-shot examples.
"""

from __future__ import annotations

from .base import Problem, boxed, integer_answer, read_jsonl, strip_calculator

NAME = "gsm8k"
SPLITS = ("train", "test")
DESCRIPTION = "GSM8K grade-school word problems (integer answers)"


def split_answer(raw: str) -> tuple[str, str]:
    """``(reasoning, gold)`` from a GSM8K answer field ending in ``#### N``."""
    body, _, final = raw.rpartition("####")
    if not _:
        raise ValueError("GSM8K answer without a '#### N' line")
    return body.strip(), integer_answer(final)


def load(split: str = "test") -> list[Problem]:
    if split not in SPLITS:
        raise ValueError(f"gsm8k has splits {SPLITS}, not {split!r}")
    problems = []
    for i, row in enumerate(read_jsonl(NAME, f"{split}.jsonl")):
        reasoning, gold = split_answer(row["answer"])
        solution = f"{strip_calculator(reasoning)}\nThe answer is {boxed(gold)}."
        problems.append(Problem(id=f"{split}-{i}", question=row["question"], answer=gold,
                                solution=solution, meta={"split": split}))
    return problems
