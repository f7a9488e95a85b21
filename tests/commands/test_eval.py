"""`m1 eval` end to end through the CLI: samples files and a model run that resumes."""

from __future__ import annotations

import json

import pytest

from m1.cli import main


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_from_samples_prints_percentages(tmp_path, capsys):
    f = _write(tmp_path / "s.jsonl", [
        {"id": "a", "gold": "4", "completions": ["\\boxed{4}", "\\boxed{5}", "\\boxed{5}"], "scores": [0.1, 0.9, 0.8]},
        {"id": "b", "gold": "\\frac{1}{2}", "completions": ["\\boxed{0.5}", "\\boxed{\\dfrac12}", "no idea"],
         "scores": [0.3, 0.2, 0.1]},
    ])
    assert main(["eval", "--from-samples", str(f), "--k", "1,3"]) == 0
    out = json.loads(capsys.readouterr().out)
    # a: 1 of 3 correct; b: 2 of 3 correct ("0.5" == 1/2)
    assert out["pass@1"] == pytest.approx(100 * (1 / 3 + 2 / 3) / 2)
    assert out["pass@3"] == 100.0
    assert out["maj@3"] == 50.0  # a votes 5 (wrong), b votes 1/2 (right)
    assert out["best_of@3"] == 50.0  # a's best score is a wrong sample, b's is right


@pytest.mark.parametrize("rows,needle", [
    ([{"id": "a", "completions": ["x"]}], ":1: missing field 'gold'"),
    ([{"id": "a", "gold": "1", "completions": ["x"]}], "--k 2 is larger"),
])
def test_from_samples_bad_input(tmp_path, capsys, rows, needle):
    f = _write(tmp_path / "s.jsonl", rows)
    assert main(["eval", "--from-samples", str(f), "--k", "1,2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1


def test_unknown_task_is_a_clear_error(tiny_hybrid, tmp_path, capsys):
    assert main(["eval", "--model", str(tiny_hybrid), "--task", "nosuch", "--out", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "gsm8k" in err


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_model_eval_writes_results_and_resumes(tiny_hybrid, tmp_path, capsys):
    out = tmp_path / "e"
    argv = ["eval", "--model", str(tiny_hybrid), "--task", "arith:steps=1,digits=1", "--limit", "3", "-n", "2",
            "--k", "1,2", "--max-new-tokens", "8", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    rows = _rows(out / "results.jsonl")
    assert len(rows) == 6 and {(r["problem_id"], r["sample_idx"]) for r in rows} == {
        (pid, j) for pid in {r["problem_id"] for r in rows} for j in (0, 1)}
    assert all({"completion", "pred", "correct", "tokens", "seconds", "gold"} <= set(r) for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_samples"] == 6 and printed["pass@2"] == summary["pass@2"]
    assert (out / "report.md").exists() and (out / "accuracy_vs_k.png").stat().st_size > 1000
    # kill simulation: drop the last problem's rows and leave half a line behind
    keep = [r for r in rows if r["problem_id"] != rows[-1]["problem_id"]]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep) + '{"problem_id": "x", "sam')
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "resuming: 2 of 3 problems already done" in err
    again = _rows(out / "results.jsonl")
    assert len(again) == 6
    # the redone problem's samples equal the first run's (per-problem seeds)
    assert {(r["problem_id"], r["sample_idx"], r["completion"]) for r in again} == {
        (r["problem_id"], r["sample_idx"], r["completion"]) for r in rows}
    # other settings in the same directory are refused, nothing changed
    assert main([*argv[:-3], "--temperature", "0.9", "--out", str(out), "--no-progress"]) == 1
    assert "other settings" in capsys.readouterr().err and len(_rows(out / "results.jsonl")) == 6
    # so is another --dtype; the bf16 run in its own directory samples from bf16 weights
    assert main([*argv[:-3], "--dtype", "bfloat16", "--out", str(out), "--no-progress"]) == 1
    assert "other settings" in capsys.readouterr().err
    bf = tmp_path / "bf16"
    assert main([*argv[:-3], "--dtype", "bfloat16", "--out", str(bf), "--no-progress"]) == 0
    cfg = json.loads((bf / "eval_config.json").read_text())["identity"]
    assert cfg["dtype"] == "bfloat16" and "dtype" not in json.loads((out / "eval_config.json").read_text())["identity"]
    assert len(_rows(bf / "results.jsonl")) == 6
    # samples without their settings file are not reused as finished work
    capsys.readouterr()
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / "results.jsonl").write_text((out / "results.jsonl").read_text())
    assert main([*argv[:-3], "--out", str(orphan), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "no eval_config.json" in err and len(err.strip().splitlines()) == 1
    assert len(_rows(orphan / "results.jsonl")) == 6 and not (orphan / "eval_config.json").exists()


def test_k_larger_than_n_is_refused(tiny_hybrid, tmp_path, capsys):
    assert main(["eval", "--model", str(tiny_hybrid), "--task", "arith", "-n", "2", "--k", "4",
                 "--out", str(tmp_path / "e")]) == 1
    assert "larger than -n" in capsys.readouterr().err


def test_max_new_tokens_beyond_the_context_is_refused_before_loading(tiny_hybrid, tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["eval", "--model", str(tiny_hybrid), "--task", "arith", "--max-new-tokens", "512",
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "--max-new-tokens 512 does not fit the model's context of 512" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


class _KilledAfter:
    """A real engine whose run dies (KeyboardInterrupt) right after its k-th problem is handed over,
    while the rest of the batch is still decoding; counts the prompts it is asked for."""

    def __init__(self, engine, k=None):
        self.engine, self.k, self.prompts = engine, k, 0
        self.tokenizer = engine.tokenizer

    def generate(self, prompts, params, on_output=None, **kw):
        self.prompts += len(prompts)
        handed = []

        def hook(o):
            on_output(o)
            handed.append(o.index)
            if len(handed) == self.k:
                raise KeyboardInterrupt

        return self.engine.generate(prompts, params, on_output=hook, **kw)


def test_kill_mid_batch_keeps_every_problem_graded_before_it(tiny_hybrid, tmp_path):
    from m1.engine import Engine
    from m1.eval.run import EvalConfig, run_eval

    cfg = EvalConfig(model=str(tiny_hybrid), task="arith:steps=1,digits=1", n=2, ks=(1, 2), limit=6,
                     temperature=1.0, max_new_tokens=8, batch_problems=8)  # all six problems in one batch
    engine = Engine.from_pretrained(tiny_hybrid)
    whole = run_eval(cfg, tmp_path / "whole", progress=False, engine=engine, log=lambda m: None)
    ref = {(r["problem_id"], r["sample_idx"]): r for r in _rows(tmp_path / "whole" / "results.jsonl")}

    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_eval(cfg, out, progress=False, engine=_KilledAfter(engine, k=4), log=lambda m: None)
    kept = _rows(out / "results.jsonl")
    # the four problems handed over before the kill are on disk, graded, both samples each
    assert len(kept) == 8 and len({r["problem_id"] for r in kept}) == 4
    for r in kept:
        assert r == {**ref[(r["problem_id"], r["sample_idx"])], "seconds": r["seconds"]}
    logs = []
    resumed = _KilledAfter(engine)
    again = run_eval(cfg, out, progress=False, engine=resumed, log=logs.append)
    assert resumed.prompts == 2 and "resuming: 4 of 6 problems already done" in logs
    rows = _rows(out / "results.jsonl")
    assert len(rows) == 12 and {(r["problem_id"], r["sample_idx"], r["completion"], r["correct"]) for r in rows} == {
        (r["problem_id"], r["sample_idx"], r["completion"], r["correct"]) for r in ref.values()}
    assert again["pass@1"] == whole["pass@1"] and again["pass@2"] == whole["pass@2"]


def test_problems_fill_the_engines_batch_rows(tiny_hybrid, tmp_path):
    """By default an eval hands the engine as many problems as fill its max_batch_size rows (n rows each),
    not a fixed few: 8 problems at n=1 used 8 of 64 rows on a CPU (GSM8K evals ran ~2x longer). The
    samples do not depend on the grouping (each has its own seed)."""
    from m1.engine import Engine
    from m1.eval.run import EvalConfig, run_eval

    calls = []

    class Counting(_KilledAfter):
        max_batch_size = 6  # the wrapped engine's

        def generate(self, prompts, params, on_output=None, **kw):
            calls.append(len(prompts))
            return super().generate(prompts, params, on_output=on_output, **kw)

    engine = Engine.from_pretrained(tiny_hybrid, max_batch_size=6)
    cfg = EvalConfig(model=str(tiny_hybrid), task="arith:steps=1,digits=1", n=2, ks=(1, 2), limit=7,
                     temperature=1.0, max_new_tokens=6)
    filled = run_eval(cfg, tmp_path / "filled", progress=False, engine=Counting(engine), log=lambda m: None)
    assert calls == [3, 3, 1]  # 6 rows // 2 samples = 3 problems per call
    calls.clear()
    cfg.batch_problems = 1
    one = run_eval(cfg, tmp_path / "one", progress=False, engine=Counting(engine), log=lambda m: None)
    assert calls == [1] * 7
    rows = {d: {(r["problem_id"], r["sample_idx"]): r["completion"] for r in _rows(tmp_path / d / "results.jsonl")}
            for d in ("filled", "one")}
    assert rows["filled"] == rows["one"] and filled["pass@1"] == one["pass@1"]


class _Answers:
    """A real engine whose completions are replaced, before grading, by the gold answer written as a
    bare last number (no box, no "the answer is"): model output under the test's control. ``golds``
    by prompt index: the eval must hand over its problems in one batch (limit <= batch_problems)."""

    def __init__(self, engine, golds):
        self.engine, self.golds, self.tokenizer = engine, golds, engine.tokenizer

    def generate(self, prompts, params, on_output=None, **kw):
        def hook(o):
            for c in o.completions:
                c.text = f"Step by step: 3 + 4 = 7, and then we get {self.golds[o.index]}"
            on_output(o)

        return self.engine.generate(prompts, params, on_output=hook, **kw)


@pytest.mark.parametrize("last_number", [False, True])
def test_last_number_policy_is_an_eval_option(tiny_hybrid, tmp_path, capsys, last_number):
    """--last-number decides whether an answer given only as the last number counts; the policy is part
    of the eval's identity (a resume with the other policy is refused) and recorded in the summary."""
    from m1.engine import Engine
    from m1.eval.run import EvalConfig, run_eval
    from m1.tasks import load_task

    task = "arith:steps=1,digits=1"
    cfg = EvalConfig(model=str(tiny_hybrid), task=task, limit=4, max_new_tokens=4, last_number=last_number)
    problems = load_task(task, limit=4, seed=0)
    engine = Engine.from_pretrained(tiny_hybrid)
    golds = [p.answer for p in problems]
    summary = run_eval(cfg, tmp_path / "e", progress=False, engine=_Answers(engine, golds), log=lambda m: None)
    assert summary["pass@1"] == (100.0 if last_number else 0.0) and summary["last_number"] is last_number
    rows = _rows(tmp_path / "e" / "results.jsonl")
    assert len(rows) == 4 and all(r["correct"] is last_number for r in rows)
    other = main(["eval", "--model", str(tiny_hybrid), "--task", task, "--limit", "4", "--max-new-tokens", "4",
                  "--out", str(tmp_path / "e")] + ([] if last_number else ["--last-number"]))
    assert other == 1 and "other settings" in capsys.readouterr().err
