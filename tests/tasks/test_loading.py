"""Benchmark loaders: counts, gold normalisation, registry, packaged licences, prompts."""

from __future__ import annotations

import re
from importlib import resources

import pytest

from m1.tasks import TASKS, Problem, UnknownTaskError, load_task, parse_task_spec
from m1.tasks.base import read_jsonl
from m1.tasks.prompts import INSTRUCTION, build_messages, few_shot_examples

COUNTS = {("gsm8k", "train"): 7473, ("gsm8k", "test"): 1319, ("math500", "test"): 500,
          ("aime24", "test"): 30, ("aime25", "test"): 30, ("amc23", "test"): 40,
          ("olympiadbench", "test"): 675}


@pytest.mark.parametrize("name, split", sorted(COUNTS))
def test_counts_ids_and_fields(name, split):
    problems = load_task(name, split=split)
    assert len(problems) == COUNTS[name, split]
    assert all(isinstance(p, Problem) for p in problems)
    assert len({p.id for p in problems}) == len(problems)
    for p in problems:
        assert p.question.strip() and p.answer.strip()
        assert "$" not in p.answer.replace("\\$", "")
        assert "\\boxed" not in p.answer


def test_registry_lists_all_benchmarks():
    assert set(TASKS) == {"gsm8k", "math500", "aime24", "aime25", "amc23", "olympiadbench", "arith"}
    assert TASKS["gsm8k"].splits == ("train", "test") and TASKS["arith"].generated


def test_gsm8k_gold_and_solution():
    raw = read_jsonl("gsm8k", "test.jsonl")
    problems = load_task("gsm8k")
    comma_rows = 0
    for r, p in zip(raw, problems):
        final = r["answer"].rsplit("####", 1)[1].strip()
        comma_rows += "," in final
        assert p.answer == final.replace(",", "")
        assert re.fullmatch(r"-?\d+", p.answer)
        assert p.solution.endswith(f"\\boxed{{{p.answer}}}.") and "<<" not in p.solution
    assert comma_rows == 14
    assert any(p.answer.startswith("-") for p in problems)


def test_aime_amc_integer_answers():
    aime24 = load_task("aime24")
    assert [p.id for p in aime24[:3]] == ["2024-I-1", "2024-I-10", "2024-I-11"]
    raw = {str(r["id"]): r["answer"] for r in read_jsonl("aime24", "test.jsonl")}
    padded = [p for p in aime24 if raw[str(p.meta["source_id"])].startswith("0")]
    assert len(padded) == 7 and all(not p.answer.startswith("0") for p in padded)
    assert int(raw[str(padded[0].meta["source_id"])]) == int(padded[0].answer)
    amc = load_task("amc23")
    assert amc[0].answer == "27" and amc[0].id == "2023-12A-1"
    assert "-1" in {p.answer for p in amc}
    assert all(re.fullmatch(r"-?\d+", p.answer) for p in amc + load_task("aime25"))


def test_olympiadbench_answers_stripped():
    problems = {p.id: p for p in load_task("olympiadbench")}
    raw = {str(r["id"]): r["final_answer"][0] for r in read_jsonl("olympiadbench", "test.jsonl")}
    joined = next(pid for pid, a in raw.items() if a == "$69$,$84$")
    assert problems[joined].answer == "69,84"
    assert all(not p.answer.endswith(".") for p in problems.values())
    assert sum(p.meta["is_multiple_answer"] for p in problems.values()) == 94
    assert sum(p.meta["unit"] is not None for p in problems.values()) == 8


def test_math500_meta():
    problems = load_task("math500")
    assert problems[0].id == "test/precalculus/807.json"
    assert {p.meta["level"] for p in problems} == {1, 2, 3, 4, 5}
    assert sum(p.meta["subject"] == "Algebra" for p in problems) == 124
    assert all("\\boxed" in p.solution for p in problems)


def test_limit_and_seed():
    first = load_task("math500", limit=5)
    assert [p.id for p in first] == [p.id for p in load_task("math500")[:5]]
    a = load_task("math500", limit=5, seed=3)
    assert [p.id for p in a] == [p.id for p in load_task("math500", limit=5, seed=3)]
    assert [p.id for p in a] != [p.id for p in first]
    assert len(load_task("gsm8k:split=train,limit=8")) == 8
    assert load_task("aime25", limit=0) == []
    with pytest.raises(ValueError):
        load_task("aime25", limit=-1)


def test_unknown_task_and_bad_options():
    with pytest.raises(UnknownTaskError) as e:
        load_task("gsm9k")
    assert isinstance(e.value, ValueError)
    for name in TASKS:
        assert name in str(e.value)
    with pytest.raises(ValueError, match="splits"):
        load_task("math500", split="train")
    with pytest.raises(ValueError, match="does not take option"):
        load_task("math500", steps=3)
    with pytest.raises(ValueError, match="key=value"):
        load_task("arith:steps")


def test_parse_task_spec():
    assert parse_task_spec("arith:steps=3,digits=2") == ("arith", {"steps": 3, "digits": 2})
    assert parse_task_spec(" GSM8K ") == ("gsm8k", {})
    assert parse_task_spec("arith:ops=+-") == ("arith", {"ops": "+-"})


def test_packaged_data_has_licences_and_no_fixtures():
    root = resources.files("m1.tasks").joinpath("data")
    for name in ("gsm8k", "math500", "aime24", "aime25", "amc23", "olympiadbench"):
        files = {f.name for f in root.joinpath(name).iterdir()}
        assert "SOURCE.md" in files
        if name != "aime25":  # public MAA problems assembled by us: no upstream licence
            assert "LICENSE" in files
    assert "LICENSE.prm800k" in {f.name for f in root.joinpath("math500").iterdir()}
    assert not root.joinpath("gsm8k", "example_model_solutions.jsonl").is_file()
    assert not root.joinpath("math_cot_100").is_dir()


# ------------------------------------------------------------ prompts

def test_build_messages_zero_shot():
    p = load_task("math500", limit=1)[0]
    msgs = build_messages(p)
    assert msgs == [{"role": "user", "content": f"{p.question.strip()}\n\n{INSTRUCTION}"}]
    assert "\\boxed{}" in INSTRUCTION and "step by step" in INSTRUCTION
    sys_msgs = build_messages(p, system="You are helpful.")
    assert sys_msgs[0] == {"role": "system", "content": "You are helpful."}


def test_build_messages_few_shot_from_train_splits():
    p = load_task("gsm8k", limit=1)[0]
    msgs = build_messages(p, few_shot=3)
    assert [m["role"] for m in msgs] == ["user", "assistant"] * 3 + ["user"]
    train_questions = {q.question for q in load_task("gsm8k", split="train")}
    for u, a in zip(msgs[0:6:2], msgs[1:6:2]):
        assert u["content"].split("\n\n" + INSTRUCTION)[0] in train_questions
        assert re.search(r"\\boxed\{-?\d+\}\.$", a["content"])
    assert msgs == build_messages(p, few_shot=3)              # deterministic
    assert msgs != build_messages(p, few_shot=3, seed=1)
    arith_p = load_task("arith:steps=3,digits=2", n=1)[0]
    shots = few_shot_examples(arith_p, 2)
    assert all(s.id.startswith("arith-train-s3d2") for s in shots)
    assert arith_p.question not in {s.question for s in shots}
