"""pass@k / maj@k / best-of-k against brute force on the labelled MATH fixture."""

from __future__ import annotations

import json
import math
from collections import Counter
from itertools import combinations
from pathlib import Path

import pytest

from m1.eval import metrics
from m1.eval.metrics import (accuracy_at_budget, accuracy_vs_k, accuracy_vs_seconds, best_of_k, bootstrap_interval,
                             breakdown, group_labels, maj_at_k, mean_of, paired_ratio_interval, pass_at_k, subsets,
                             weighted_maj_at_k, wilson_interval)

MATH_COT_100 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "math_cot_100" / \
    "math_cot_100.jsonl"
needs_fixture = pytest.mark.skipif(not MATH_COT_100.exists(), reason="math_cot_100 fixture absent")


@pytest.fixture(scope="module")
def fixture_rows():
    return [json.loads(line) for line in MATH_COT_100.open()]


# ------------------------------------------------------------ independent references

def brute_pass(flags, k):
    subs = list(combinations(range(len(flags)), k))
    return sum(any(flags[i] for i in s) for s in subs) / len(subs)


def brute_maj(preds, flags, k):
    """Majority over every k-subset; ties -> the answer seen first in the subset."""
    subs = list(combinations(range(len(preds)), k))
    hits = 0
    for s in subs:
        counts = Counter(preds[i] for i in s)
        top = max(counts.values())
        winner = next(preds[i] for i in s if counts[preds[i]] == top)
        first = next(i for i in s if preds[i] == winner)
        hits += flags[first]
    return hits / len(subs)


def brute_best(flags, scores, k):
    subs = list(combinations(range(len(flags)), k))
    hits = 0
    for s in subs:
        best = max(scores[i] for i in s)
        top = next(i for i in s if scores[i] == best)
        hits += flags[top]
    return hits / len(subs)


# ------------------------------------------------------------ pass@k

@needs_fixture
def test_pass_at_k_matches_enumeration(fixture_rows):
    for row in fixture_rows:
        flags = row["score"]
        for k in range(1, 9):
            assert pass_at_k(8, sum(flags), k) == pytest.approx(brute_pass(flags, k), abs=1e-12)
    # documented fixture totals: 728/800 correct samples, pass@8 = 96/100
    assert sum(pass_at_k(8, sum(r["score"]), 1) for r in fixture_rows) == pytest.approx(91.0)
    assert sum(pass_at_k(8, sum(r["score"]), 8) for r in fixture_rows) == pytest.approx(96.0)


def test_pass_at_k_formula_and_edges():
    for n, c, k in [(100, 37, 10), (64, 1, 8), (20, 19, 2), (5, 0, 3)]:
        expected = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 6, 5) == 1.0          # fewer than k wrong samples
    assert pass_at_k(1000, 3, 1) == pytest.approx(0.003)
    for bad in [(4, 1, 5), (4, 5, 1), (4, 1, 0), (0, 0, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


# ------------------------------------------------------------ maj@k / best-of-k

@needs_fixture
def test_maj_at_k_matches_enumeration(fixture_rows):
    totals = Counter()
    for row in fixture_rows:
        for k in range(1, 9):
            got = maj_at_k(row["pred"], row["score"], k)
            assert got == pytest.approx(brute_maj(row["pred"], row["score"], k), abs=1e-12), \
                (row["idx"], k)
            totals[k] += got
    assert totals[8] == pytest.approx(93.0)   # SOURCE.md: maj@8 = 93/100 (exact-string vote)
    assert totals[1] == pytest.approx(91.0)   # maj@1 is plain accuracy


@needs_fixture
def test_best_of_k_matches_enumeration(fixture_rows):
    total8 = 0.0
    for row in fixture_rows:
        scores = [s[0] for s in row["pred_score"]]
        for k in (1, 2, 3, 5, 8):
            got = best_of_k(row["score"], scores, k)
            assert got == pytest.approx(brute_best(row["score"], scores, k), abs=1e-12)
        total8 += best_of_k(row["score"], scores, 8)
    assert total8 == pytest.approx(94.0)      # SOURCE.md: rm@8 = 94/100


def test_maj_ties_go_to_first_seen_and_none_does_not_vote():
    assert maj_at_k(["a", "b"], [False, True], 2) == 0.0
    assert maj_at_k(["b", "a"], [True, False], 2) == 1.0
    assert maj_at_k([None, None, "x"], [False, False, True], 3) == 1.0
    assert maj_at_k([None, None], [False, False], 2) == 0.0
    # 2 votes beat 1 even when the single vote comes first
    assert maj_at_k(["w", "r", "r"], [False, True, True], 3) == 1.0


def test_equivalence_merges_groups():
    answers = ["1/2", "0.5", "3", "3"]
    flags = [True, True, False, False]
    # without equivalence "3" wins 2 to 1 (1/2 and 0.5 split), with it: tie -> first seen
    assert maj_at_k(answers, flags, 4) == 0.0
    same = {frozenset(["1/2", "0.5"])}
    eq = lambda a, b: frozenset([a, b]) in same  # noqa: E731
    assert maj_at_k(answers, flags, 4, equivalent=eq) == 1.0
    assert group_labels(answers, eq) == [0, 0, 2, 2]
    assert group_labels(["a", None, "a"]) == [0, None, 0]


def test_weighted_vote():
    answers, flags, scores = ["a", "b", "b"], [True, False, False], [5.0, 1.0, 1.0]
    assert weighted_maj_at_k(answers, flags, scores, 3) == 1.0
    assert maj_at_k(answers, flags, 3) == 0.0
    # over the three 2-subsets: {a,b} -> a (5 > 1) twice, {b,b} -> b once
    assert weighted_maj_at_k(answers, flags, scores, 2) == pytest.approx(2 / 3)


def test_random_subsets_when_enumeration_is_too_big():
    n, k = 40, 20
    assert math.comb(n, k) > metrics.MAX_EXACT_SUBSETS
    subs = subsets(n, k, num_subsets=300, seed=1)
    assert len(subs) == 300 and all(len(set(s)) == k and list(s) == sorted(s) for s in subs)
    assert subs == subsets(n, k, num_subsets=300, seed=1)
    assert subs != subsets(n, k, num_subsets=300, seed=2)
    flags = [i % 3 == 0 for i in range(n)]
    est = best_of_k(flags, list(range(n)), k, num_subsets=2000)
    # exact value: P(top-scored = highest index in subset is a multiple of 3)
    exact = sum(math.comb(m, k - 1) for m in range(n) if m % 3 == 0) / math.comb(n, k)
    assert est == pytest.approx(exact, abs=0.03)
    assert len(subsets(8, 4)) == 70            # exact enumeration below the cap


def test_length_and_k_validation():
    with pytest.raises(ValueError):
        maj_at_k(["a"], [True, False], 1)
    with pytest.raises(ValueError):
        maj_at_k(["a", "b"], [True, False], 3)
    with pytest.raises(ValueError):
        best_of_k([True], [1.0, 2.0], 1)


# ------------------------------------------------------------ intervals and helpers

def test_wilson_interval_known_values():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    lo, hi = wilson_interval(91, 100)
    assert lo < 0.91 < hi and hi - lo < 0.13


def test_bootstrap_interval():
    values = [1.0] * 70 + [0.0] * 30
    lo, hi = bootstrap_interval(values, seed=0)
    assert lo < 0.7 < hi and 0.55 < lo and hi < 0.85
    assert bootstrap_interval(values, seed=0) == (lo, hi)
    assert bootstrap_interval([0.5] * 10) == (0.5, 0.5)


def test_paired_ratio_interval_resamples_problems_together():
    import random

    rng = random.Random(1)
    b = {f"p{i}": rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]) for i in range(60)}
    # the same problems for both: every paired draw has ratio exactly 1 (an unpaired one would not)
    assert paired_ratio_interval(b, dict(b)) == (1.0, 1.0, 1.0)
    half = {k: v / 2 for k, v in b.items()}
    assert paired_ratio_interval(half, b) == pytest.approx((0.5, 0.5, 0.5))
    # correlated but not proportional: the interval holds the point estimate, and it is narrower than
    # resampling the two models' problems independently (what pairing is for)
    a = {k: min(1.0, max(0.0, v - 0.25 + rng.choice([0.0, 0.25]))) for k, v in b.items()}
    r, lo, hi = paired_ratio_interval(a, b, seed=0)
    assert r == pytest.approx(sum(a.values()) / sum(b.values()))
    assert lo < r < hi
    ids, n = sorted(b), len(b)
    rng2 = random.Random(0)
    unpaired = sorted(sum(a[ids[rng2.randrange(n)]] for _ in range(n)) / sum(b[ids[rng2.randrange(n)]] for _ in range(n))
                      for _ in range(2000))
    assert hi - lo < 0.7 * (unpaired[int(0.975 * 1999)] - unpaired[int(0.025 * 1999)])
    # only shared problems count; none shared is an error
    assert paired_ratio_interval({**a, "extra": 1.0}, b, seed=0) == (r, lo, hi)
    with pytest.raises(ValueError, match="share no problem"):
        paired_ratio_interval({"x": 1.0}, {"y": 1.0})


def test_breakdown_and_means():
    rows = [{"level": 1, "correct": True, "tokens": 10, "seconds": 1.0},
            {"level": 1, "correct": False, "tokens": 30},
            {"level": 2, "correct": True, "tokens": 20, "seconds": 3.0}]
    assert breakdown(rows, "level") == {1: {"n": 2, "accuracy": 0.5}, 2: {"n": 1, "accuracy": 1.0}}
    assert breakdown(rows, lambda r: r["tokens"] > 15)[True]["n"] == 2
    assert mean_of(rows, "tokens") == 20
    assert mean_of(rows, "seconds") == 2.0
    assert mean_of(rows, "missing") is None


def test_accuracy_series():
    problems = [{"correct": [True, False], "answers": ["1", "2"]},
                {"correct": [False, False], "answers": ["3", "3"]}]
    curves = accuracy_vs_k(problems, [1, 2])
    assert curves["pass"] == [(1, 0.25), (2, 0.5)]
    assert curves["maj"] == [(1, 0.25), (2, 0.5)]   # tie -> first-seen "1" is correct
    series = accuracy_vs_seconds({1: 2.0, 4: 3.0, 8: 5.0}, {8: 0.6, 1: 0.4, 4: 0.5, 16: 0.9})
    assert series == [(2.0, 0.4, 1), (3.0, 0.5, 4), (5.0, 0.6, 8)]
    assert accuracy_at_budget(series, 4.0) == 0.5
    assert accuracy_at_budget(series, 1.0) is None
