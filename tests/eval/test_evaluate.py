"""`m1 eval --from-samples`: summaries, file errors, resumable results, plots, report."""

from __future__ import annotations

import json
from collections import Counter
from itertools import combinations
from pathlib import Path

import pytest

from m1.eval.evaluate import (ResultsWriter, SamplesFileError, load_finished, parse_ks, result_row, plot_accuracy_vs_k,
                              plot_accuracy_vs_seconds, read_samples, summarize_results, summarize_samples, vote_labels,
                              write_report_md)
from m1.eval.grading import Checker

MATH_COT_100 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "math_cot_100" / \
    "math_cot_100.jsonl"


# independent references (same definitions as in test_metrics.py, kept local
# so each test file stands alone)
def brute_pass(flags, k):
    subs = list(combinations(range(len(flags)), k))
    return sum(any(flags[i] for i in s) for s in subs) / len(subs)


def brute_maj(preds, flags, k):
    hits, subs = 0, list(combinations(range(len(preds)), k))
    for s in subs:
        counts = Counter(preds[i] for i in s)
        winner = next(preds[i] for i in s if counts[preds[i]] == max(counts.values()))
        hits += flags[next(i for i in s if preds[i] == winner)]
    return hits / len(subs)


def brute_best(flags, scores, k):
    hits, subs = 0, list(combinations(range(len(flags)), k))
    for s in subs:
        hits += flags[next(i for i in s if scores[i] == max(scores[j] for j in s))]
    return hits / len(subs)


@pytest.fixture(scope="module")
def checker():
    with Checker(2) as c:
        yield c


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ------------------------------------------------------------ summaries

@pytest.mark.skipif(not MATH_COT_100.exists(), reason="math_cot_100 fixture absent")
def test_summary_on_math_cot_100_matches_brute_force(tmp_path, checker):
    rows = [json.loads(line) for line in MATH_COT_100.open()]
    samples = write_rows(tmp_path / "s.jsonl", [
        {"id": str(r["idx"]), "gold": r["answer"], "completions": r["response"],
         "scores": [s[0] for s in r["pred_score"]]} for r in rows])
    ks = [1, 2, 4, 8]
    summary = summarize_samples(samples, ks, checker=checker)
    # reference: the fixture's own labels, with its one label error fixed
    # (problem 72 sample 7 answers 10000 for gold 10{,}000; see test_grading)
    flags = [list(r["score"]) for r in rows]
    flags[72][7] = True
    for k in ks:
        assert summary[f"pass@{k}"] == pytest.approx(
            sum(brute_pass(f, k) for f in flags))
        assert summary[f"maj@{k}"] == pytest.approx(
            sum(brute_maj(r["pred"], f, k) for r, f in zip(rows, flags)))
        assert summary[f"best_of@{k}"] == pytest.approx(
            sum(brute_best(f, [s[0] for s in r["pred_score"]], k) for r, f in zip(rows, flags)))
    assert summary["maj@8"] == pytest.approx(93.0)
    assert (summary["n_problems"], summary["n_samples"]) == (100, 800)
    # the gold "\text{4:30 p.m.}" of problem 3 has no math reading
    assert summary["unparseable_gold"] == 1 and summary["unparseable_gold_ids"] == ["3"]


def test_summary_small_file_exact_values(tmp_path, checker):
    path = write_rows(tmp_path / "s.jsonl", [
        {"id": "a", "gold": "1,080", "completions": ["\\boxed{1080}", "\\boxed{7}", "\\boxed{7}",
                                                       "no idea"]},
        {"id": "b", "gold": 27.0, "completions": ["#### 27", "\\boxed{\\frac{54}{2}}",
                                                   "\\boxed{26}", "\\boxed{0.5}"]},
        {"id": "c", "gold": "\\frac12", "completions": ["\\boxed{0.4}", "\\boxed{\\frac{2}{5}}",
                                                         "\\boxed{0.5}", "\\boxed{3}"]},
    ])
    s = summarize_samples(path, "1,4", checker=checker)
    assert s["pass@1"] == pytest.approx(100 * (1 / 4 + 2 / 4 + 1 / 4) / 3)
    assert s["pass@4"] == pytest.approx(100.0)
    # a: "7" x2 beats 1080 -> wrong; b: 27 x2 -> right;
    # c: 0.4 and 2/5 are one wrong group (checker equivalence) and beat 0.5 -> wrong
    assert s["maj@4"] == pytest.approx(100 / 3)
    assert s["no_answer"] == 1 and s["unparseable_gold"] == 0
    assert "best_of@1" not in s
    assert s["n_samples"] == 12


def test_vote_labels_merge_equivalent_wrong_answers(checker):
    labels = vote_labels(["0.4", "\\frac{2}{5}", "0.5", None, "\\frac12"],
                         [False, False, True, False, True], checker)
    assert labels[0] == labels[1] != labels[2] == labels[4]
    assert labels[3] is None
    # answer keys already merge equal numbers; the checker merges the rest
    assert vote_labels(["0.4", "\\frac{2}{5}"], [False, False]) == [0, 0]
    plain = vote_labels(["2", "\\sqrt{4}"], [False, False])
    assert plain[0] != plain[1]
    assert vote_labels(["2", "\\sqrt{4}"], [False, False], checker) == [0, 0]


def test_unparseable_gold_is_counted_not_fatal(tmp_path, checker):
    path = write_rows(tmp_path / "s.jsonl", [
        {"id": "x", "gold": "", "completions": ["\\boxed{1}"]},
        {"id": "y", "gold": "\\frac{", "completions": ["\\boxed{\\frac{}"]},
        {"id": "z", "gold": "3", "completions": ["\\boxed{3}"]},
    ])
    s = summarize_samples(path, [1], checker=checker)
    assert s["unparseable_gold"] == 2 and s["unparseable_gold_ids"] == ["x", "y"]
    assert s["n_problems"] == 3 and s["pass@1"] == pytest.approx(100 / 3)


@pytest.mark.parametrize("lines, message", [
    (['{"id": "a", "gold": "1", "completions": ["x"]}', "{not json"], ":2: not valid JSON"),
    (['[1, 2]'], ":1: expected a JSON object"),
    (['{"gold": "1", "completions": ["x"]}'], ":1: missing field 'id'"),
    (['{"id": "a", "completions": ["x"]}'], "missing field 'gold'"),
    (['{"id": "a", "gold": "1", "completions": "x"}'], "'completions' must be a non-empty list"),
    (['{"id": "a", "gold": "1", "completions": []}'], "'completions' must be a non-empty list"),
    (['{"id": "a", "gold": null, "completions": ["x"]}'], "'gold' must be a string"),
    (['{"id": "a", "gold": "1", "completions": ["x", "y"], "scores": [1]}'],
     "'scores' must be a list of 2 numbers"),
    (['{"id": "a", "gold": "1", "completions": ["x"]}',
      '{"id": "a", "gold": "2", "completions": ["y"]}'], ":2: duplicate id 'a'"),
    (['{"id": "a", "gold": "1", "completions": ["x"], "scores": [0.5]}',
      '{"id": "b", "gold": "2", "completions": ["y"]}'], ":2: 'scores' missing here"),
    ([], "no samples"),
])
def test_malformed_samples_file(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    with pytest.raises(SamplesFileError) as e:
        read_samples(path)
    assert str(path) in str(e.value) and message in str(e.value)
    assert isinstance(e.value, ValueError)


def test_k_larger_than_completions_is_a_clear_error(tmp_path):
    path = write_rows(tmp_path / "s.jsonl", [
        {"id": "a", "gold": "1", "completions": ["x"] * 8},
        {"id": "b", "gold": "1", "completions": ["x"] * 2}])
    with pytest.raises(SamplesFileError, match=r"s\.jsonl:2: --k 4 is larger than the 2 "
                                                r"completions of problem 'b'"):
        summarize_samples(path, "1,4")
    with pytest.raises(SamplesFileError, match="no such samples file"):
        summarize_samples(tmp_path / "missing.jsonl", "1")


def test_parse_ks():
    assert parse_ks("8, 1,4,4") == [1, 4, 8]
    assert parse_ks([2, 1]) == [1, 2]
    for bad in ("", "0", "1,x", "-1"):
        with pytest.raises(ValueError):
            parse_ks(bad)


# ------------------------------------------------------------ results files

def test_results_writer_and_resume(tmp_path):
    path = tmp_path / "run" / "results.jsonl"
    assert load_finished(path) == set()
    with ResultsWriter(path) as w:
        for pid in ("p1", "p2"):
            for j in range(2):
                w.write({"problem_id": pid, "sample_idx": j, "text": "\u00e9 \\boxed{1}"})
    assert load_finished(path) == {("p1", 0), ("p1", 1), ("p2", 0), ("p2", 1)}
    # simulate a crash mid-row: a complete-looking row without its newline
    # and a torn one are both "not finished"
    with path.open("a") as f:
        f.write('{"problem_id": "p3", "sample_idx": 0}')
    assert ("p3", 0) not in load_finished(path)
    with path.open("a") as f:
        f.write('\n{"problem_id": "p3", "sample_idx": 1, "te')
    assert load_finished(path) == {("p1", 0), ("p1", 1), ("p2", 0), ("p2", 1), ("p3", 0)}
    # reopening drops the torn fragment so new rows start on a clean line
    with ResultsWriter(path) as w:
        w.write({"problem_id": "p3", "sample_idx": 1})
    assert ("p3", 1) in load_finished(path)
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_load_finished_rejects_corrupt_middle_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"problem_id": "a", "sample_idx": 0}\ngarbage\n'
                    '{"problem_id": "a", "sample_idx": 1}\n')
    with pytest.raises(SamplesFileError, match=r"r\.jsonl:2"):
        load_finished(path)


# ------------------------------------------------------------ plots and report

def test_plots_and_report(tmp_path):
    summary = {"file": "s.jsonl", "ks": [1, 4, 8], "n_problems": 3, "n_samples": 24,
               "unparseable_gold": 1, "unparseable_gold_ids": ["x"], "no_answer": 0,
               "timeouts": 0, "pass@1": 50.0, "pass@4": 70.0, "pass@8": 80.0,
               "maj@1": 50.0, "maj@4": 60.0, "maj@8": 65.0}
    k_png = plot_accuracy_vs_k(summary, tmp_path / "plots" / "k.png")
    s_png = plot_accuracy_vs_seconds({"hybrid": [(1.0, 50.0, 1), (2.0, 65.0, 8)],
                                      "teacher": [(3.0, 60.0, 1)]}, tmp_path / "plots" / "s.png")
    for png in (k_png, s_png):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    report = write_report_md(tmp_path / "report.md", summary, plots=[k_png, s_png],
                             breakdowns={"level": {1: {"n": 2, "accuracy": 0.5}}})
    text = report.read_text()
    assert "| 4 | 70.0 | 60.0 |" in text
    assert "best_of" not in text
    assert "](plots/k.png)" in text and "| 1 | 2 | 50.0 |" in text
    assert "`x`" in text


def test_results_rows_recompute_the_same_metrics(tmp_path, checker):
    samples = write_rows(tmp_path / "s.jsonl", [
        {"id": "a", "gold": "12", "completions": ["\\boxed{12}", "\\boxed{13}", "\\boxed{13}"],
         "scores": [0.9, 0.1, 0.2]},
        {"id": "b", "gold": "\\frac12", "completions": ["\\boxed{0.5}", "x", "\\boxed{0.4}"],
         "scores": [0.1, 0.5, 0.3]},
    ])
    expected = summarize_samples(samples, "1,2,3", checker=checker)
    results = tmp_path / "results.jsonl"
    with ResultsWriter(results) as w:
        for row in read_samples(samples):
            verdicts = checker.check_many([(c, row["gold"]) for c in row["completions"]])
            for j, (c, v) in enumerate(zip(row["completions"], verdicts)):
                w.write(result_row(row["id"], j, c, row["gold"], v, score=row["scores"][j],
                                   tokens=10 * (j + 1), seconds=0.5))
    got = summarize_results(results, "1,2,3", checker=checker)
    for key in ("pass@1", "pass@3", "maj@2", "maj@3", "best_of@1", "best_of@2", "best_of@3"):
        assert got[key] == pytest.approx(expected[key]), key
    assert got["best_of@3"] == pytest.approx(50.0)   # a: 0.9 -> right; b: 0.5 -> "x", wrong
    assert (got["n_problems"], got["n_samples"], got["no_answer"]) == (2, 6, 1)
    assert got["mean_tokens"] == pytest.approx(20.0) and got["mean_seconds"] == 0.5
    with pytest.raises(SamplesFileError, match="larger than the 3 samples"):
        summarize_results(results, "4")
