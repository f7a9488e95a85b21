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
