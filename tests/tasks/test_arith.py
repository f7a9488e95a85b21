"""The procedural arithmetic task: determinism, exactness, difficulty knobs."""

from __future__ import annotations

import re
import time

import pytest

from m1.eval.grading import extract_answer
from m1.tasks import load_task
from m1.tasks.arith import iter_problems

STEP_RE = re.compile(r"^.*: (-?\d+) ([-+*/]) (\d+) = (-?\d+)\.$")
MUL_WORDS = {2: "doubles", 3: "triples", 4: "quadruples"}
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def replay(problem):
    """Re-derive the answer from the solution text, checking every step."""
    lines = problem.solution.split("\n")
    start = int(re.search(r"starts with (-?\d+) ", lines[0]).group(1))
    assert str(start) in problem.question.split(".")[0]
    value, ops = start, []
    for line in lines[1:-1]:
        m = STEP_RE.match(line)
        assert m, line
        a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
        assert a == value, "steps must chain"
        if op == "/":
            assert a % b == 0, "division must be exact"
            assert c == a // b
        else:
            assert c == OPS[op](a, b)
        assert str(b) in problem.question or MUL_WORDS.get(b, "?") in problem.question
        value, ops = c, ops + [(op, b, c)]
    assert lines[-1] == f"The answer is \\boxed{{{value}}}."
    return start, ops, value


@pytest.mark.parametrize("steps, digits", [(1, 1), (2, 2), (3, 2), (4, 3), (6, 2)])
def test_solutions_are_exact_and_match_settings(steps, digits):
    problems = load_task("arith", n=150, seed=7, steps=steps, digits=digits)
    assert len(problems) == 150
    for p in problems:
        start, ops, value = replay(p)
        assert p.answer == str(value)
        assert extract_answer(p.solution) == p.answer
        assert len(ops) == steps and p.meta["steps"] == steps
        lo = 1 if digits == 1 else 10 ** (digits - 1)
        assert lo <= start < 10 ** digits
        for op, b, c in ops:
            assert c >= 0, "no negatives unless asked"
            if op in "+-":
                assert 1 <= b < 10 ** digits
            else:
                assert 2 <= b <= 9
        assert p.question.endswith("have now?")
    used = {op for p in problems for op, _, _ in replay(p)[1]}
    assert used == {"+", "-", "*", "/"} or steps == 1


def test_same_seed_same_problems_other_seed_or_split_differs():
    a = load_task("arith", n=50, seed=0, steps=3, digits=2)
    b = load_task("arith", n=50, seed=0, steps=3, digits=2)
    assert [(p.question, p.answer, p.solution) for p in a] == \
        [(p.question, p.answer, p.solution) for p in b]
    assert [p.question for p in a] != [p.question for p in load_task("arith", n=50, seed=1,
                                                                       steps=3, digits=2)]
    train = load_task("arith", split="train", n=50, seed=0, steps=3, digits=2)
    assert [p.question for p in a] != [p.question for p in train]
    assert len({p.question for p in a}) == 50


def test_level_string_equals_keywords():
    s = load_task("arith:steps=3,digits=2", n=5, seed=1)
    k = load_task("arith", n=5, seed=1, steps=3, digits=2)
    assert [p.question for p in s] == [p.question for p in k]
    assert len(load_task("arith:steps=2,digits=1", limit=7)) == 7
    assert s[0].meta["level"] == "steps=3,digits=2"


def test_ops_and_negatives():
    only_add_sub = load_task("arith", n=100, seed=2, steps=4, digits=2, ops="+-")
    assert all(op in "+-" for p in only_add_sub for op, _, _ in replay(p)[1])
    neg = load_task("arith:steps=4,digits=2,negatives=1", n=200, seed=3)
    values = [c for p in neg for _, _, c in replay(p)[1]]
    assert min(values) < 0
    assert all("points" in p.question for p in neg)


def test_bad_settings_are_rejected():
    for kw in ({"steps": 0}, {"steps": 7}, {"digits": 0}, {"digits": 7}, {"ops": "%"},
               {"ops": ""}, {"negatives": "maybe"}):
        with pytest.raises(ValueError):
            load_task("arith", n=1, **kw)


def test_unlimited_and_fast():
    t0 = time.perf_counter()
    problems = load_task("arith", n=5000, seed=9, steps=3, digits=3)
    assert time.perf_counter() - t0 < 5
    assert len({p.id for p in problems}) == 5000
    it = iter_problems(seed=9, steps=3, digits=3)
    assert [next(it).question for _ in range(3)] == [p.question for p in problems[:3]]
    assert not re.search(r"\b1 (points|apples|marbles)\b", " ".join(p.question for p in problems))


def test_arith_errors_checks_each_written_equation(tmp_path):
    """benchmarks/arith_errors.py: the per-operation table of the recipe study (docs/distill.md)."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "arith_errors.py"
    spec = importlib.util.spec_from_file_location("arith_errors", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.equations("He sells 1: 7 - 1 = 6.\nHe gives away 4: 6 - 4 = 3.") == [(7, "-", 1, 6, True),
                                                                                   (6, "-", 4, 3, False)]
    assert [ok for *_, ok in mod.equations("7 / 2 = 3. 8 / 2 = 4. 3 * 5 = 15. 0 / 0 = 0")] == [False, True, True, False]
    rows = [{"completion": "9 - 6 = 1. The answer is \\boxed{1}.", "correct": False},
            {"completion": "9 - 6 = 3. 3 + 3 = 6. The answer is \\boxed{6}.", "correct": False},
            {"completion": "2 * 3 = 6. The answer is \\boxed{6}.", "correct": True}]
    f = tmp_path / "results.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = mod.summarise(f)
    assert s["equations"] == {"+": {"written": 1, "wrong": 0}, "-": {"written": 2, "wrong": 1},
                              "*": {"written": 1, "wrong": 0}}
    assert (s["wrong_samples"], s["wrong_with_every_equation_right"]) == (2, 1)
    assert s["commonest_wrong"] == [("9 - 6 = 1", 1)]
