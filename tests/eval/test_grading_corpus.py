"""The labelled grading corpus (tests/grading_corpus.py) through m1's checker (issue #18).

The corpus states what a careful human grader says; this test states how
close m1 must stay to it: >= 97% agreement, false positives on at most 1% of
all cases, and none at all on the ``hard`` negatives (no answer, a plainly
wrong value, a lucky last number).  ``benchmarks/grading_agreement.py``
prints the same numbers next to math-verify's.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from grading_corpus import CASES, Case
from m1.eval.grading import Checker

MIN_CASES, MIN_FALSE, MIN_PER_CATEGORY = 300, 60, 5
MIN_AGREEMENT = 0.97
MAX_FALSE_POSITIVE_SHARE = 0.01


@pytest.fixture(scope="module")
def verdicts():
    t0 = time.perf_counter()
    with Checker(2, timeout=5.0) as checker:
        out = checker.check_many([(c.output, c.gold) for c in CASES])
    elapsed = time.perf_counter() - t0
    assert elapsed < 60, f"corpus took {elapsed:.1f}s"
    return out


def _describe(rows) -> str:
    return "\n".join(f"  [{c.category}] output={c.output!r} gold={c.gold!r} expected={c.expected} "
                     f"got={v.correct} (pred={v.pred!r}, status={v.status})" for c, v in rows)


def test_corpus_shape():
    assert all(isinstance(c, Case) for c in CASES)
    assert all(isinstance(c.expected, bool) and isinstance(c.hard, bool) for c in CASES)
    assert all(isinstance(c.output, str) and isinstance(c.gold, str) and c.gold for c in CASES)
    assert len(CASES) >= MIN_CASES, len(CASES)
    assert sum(not c.expected for c in CASES) >= MIN_FALSE
    per_category = Counter(c.category for c in CASES)
    thin = {k: n for k, n in per_category.items() if n < MIN_PER_CATEGORY}
    assert not thin, f"categories with fewer than {MIN_PER_CATEGORY} cases: {thin}"
    assert not [c for c in CASES if c.hard and c.expected], "only expected-False cases can be hard negatives"
    dupes = [k for k, n in Counter((c.output, c.gold) for c in CASES).items() if n > 1]
    assert not dupes, f"duplicate (output, gold) pairs: {dupes}"


def test_corpus_agreement(verdicts):
    rows = list(zip(CASES, verdicts))
    disagree = [(c, v) for c, v in rows if v.correct != c.expected]
    false_pos = [(c, v) for c, v in disagree if v.correct]
    hard_false_pos = [(c, v) for c, v in false_pos if c.hard]
    agreement = 1 - len(disagree) / len(rows)
    print(f"\ngrading corpus: {len(rows) - len(disagree)}/{len(rows)} agree ({100 * agreement:.1f}%), "
          f"{len(false_pos)} false positives ({len(hard_false_pos)} on hard negatives)")
    report = (f"{len(disagree)} of {len(rows)} cases disagree ({100 * agreement:.1f}% agreement), "
              f"{len(false_pos)} false positives, {len(hard_false_pos)} on hard negatives:\n"
              + _describe(disagree))
    assert agreement >= MIN_AGREEMENT, report
    assert len(false_pos) <= MAX_FALSE_POSITIVE_SHARE * len(rows), report
    assert not hard_false_pos, report
    # every check is decided, none comes near the timeout
    slow = [(c, v) for c, v in rows if v.status not in ("ok", "no_answer")]
    assert not slow, "checks not decided:\n" + _describe(slow)
