r"""Sampling metrics: pass@k, maj@k, best-of-k, confidence intervals, breakdowns.

All functions are pure (no model, no grading) and take per-problem lists of
per-sample facts, so any metric can be recomputed from a results JSONL.

Definitions (n samples per problem, c of them correct):

* **pass@k** -- the unbiased estimator of Chen et al. (2021),
  ``1 - C(n-c, k) / C(n, k)``, computed in the stable product form
  ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` (no huge binomials).
* **maj@k** -- expected correctness of a majority vote over ``k`` samples,
  estimated from ``n >= k`` samples by averaging over k-subsets: all
  ``C(n, k)`` of them when that is at most ``max_exact`` (exact), otherwise
  ``num_subsets`` random ones (seeded).  Within a subset, samples are taken
  in their original order; answers are grouped (same key, or merged by an
  ``equivalent`` callable), the biggest group wins, **ties go to the group
  seen first**, samples without an answer (``None``) do not vote, and the
  vote is correct if the first member of the winning group is correct.
* **best_of_k** -- same subsets, the sample with the highest score wins
  (ties: first in sample order); its correctness counts.
* **weighted_maj_at_k** -- as maj@k, but a group's weight is the sum of its
  members' scores (use non-negative scores, e.g. probabilities, for a
  meaningful vote).

Percentages are the caller's business: every function here returns a
fraction in [0, 1].
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from itertools import combinations
from statistics import mean
from typing import Any, Callable, Hashable, Iterable, Sequence

__all__ = [
    "pass_at_k", "group_labels", "vote_winner", "maj_at_k", "best_of_k", "weighted_maj_at_k",
    "subsets", "wilson_interval", "bootstrap_interval", "paired_ratio_interval", "mean_of", "breakdown",
    "accuracy_vs_k", "accuracy_vs_seconds", "accuracy_at_budget",
]

MAX_EXACT_SUBSETS = 5000
DEFAULT_NUM_SUBSETS = 1000


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for ``c`` correct out of ``n`` samples."""
    if not (0 <= c <= n) or n < 1:
        raise ValueError(f"need 0 <= c <= n and n >= 1, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..n={n}, got {k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def group_labels(answers: Sequence[Hashable | None],
                 equivalent: Callable[[Any, Any], bool] | None = None) -> list[int | None]:
    """Group ids for answers: equal answers share a group; with
    ``equivalent``, groups whose first answers are equivalent are merged
    (so ``equivalent`` is called once per pair of distinct answers).
    ``None`` (no answer) stays ``None``."""
    reps: list[Hashable] = []
    label_of: dict[Hashable, int] = {}
    out: list[int | None] = []
    for a in answers:
        if a is None:
            out.append(None)
            continue
        if a not in label_of:
            label = len(reps)
            if equivalent is not None:
                for j, r in enumerate(reps):
                    if label_of[r] == j and equivalent(a, r):
                        label = j
                        break
            label_of[a] = label
            reps.append(a)
        out.append(label_of[a])
    return out


def subsets(n: int, k: int, *, max_exact: int = MAX_EXACT_SUBSETS,
            num_subsets: int = DEFAULT_NUM_SUBSETS, seed: int = 0) -> list[tuple[int, ...]]:
    """The k-subsets of ``range(n)`` averaged over: all of them when there are
    at most ``max_exact``, else ``num_subsets`` random ones (sorted indices)."""
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..n={n}, got {k}")
    if math.comb(n, k) <= max_exact:
        return list(combinations(range(n), k))
    rng = random.Random(seed)
    return [tuple(sorted(rng.sample(range(n), k))) for _ in range(num_subsets)]


def vote_winner(labels: Sequence[int | None], idx: Iterable[int],
                weights: Sequence[float] | None = None) -> int | None:
    """Index of the first member of the winning group among samples ``idx`` (the largest count, or
    summed ``weights``; ties to the group seen first), or None when no sample has an answer."""
    tally: dict[int, float] = defaultdict(float)
    first: dict[int, int] = {}
    for i in idx:
        g = labels[i]
        if g is None:
            continue
        tally[g] += 1.0 if weights is None else float(weights[i])
        first.setdefault(g, i)
    if not tally:
        return None
    best = max(tally.values())
    # ties -> the group seen first (smallest first index)
    winner = min((g for g, v in tally.items() if v == best), key=first.__getitem__)
    return first[winner]


def _check_lengths(answers, correct, k, scores=None):
    n = len(answers)
    if len(correct) != n:
        raise ValueError(f"{n} answers but {len(correct)} correctness flags")
    if scores is not None and len(scores) != n:
        raise ValueError(f"{n} answers but {len(scores)} scores")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..n={n}, got {k}")


def maj_at_k(answers: Sequence[Hashable | None], correct: Sequence[bool], k: int, *,
             equivalent: Callable[[Any, Any], bool] | None = None,
             max_exact: int = MAX_EXACT_SUBSETS, num_subsets: int = DEFAULT_NUM_SUBSETS,
             seed: int = 0) -> float:
    """Majority-vote accuracy at ``k`` for one problem (see module docstring)."""
    _check_lengths(answers, correct, k)
    labels = group_labels(answers, equivalent)
    subs = subsets(len(answers), k, max_exact=max_exact, num_subsets=num_subsets, seed=seed)
    hits = 0
    for sub in subs:
        w = vote_winner(labels, sub)
        hits += bool(w is not None and correct[w])
    return hits / len(subs)


def weighted_maj_at_k(answers: Sequence[Hashable | None], correct: Sequence[bool],
                      scores: Sequence[float], k: int, *,
                      equivalent: Callable[[Any, Any], bool] | None = None,
                      max_exact: int = MAX_EXACT_SUBSETS,
                      num_subsets: int = DEFAULT_NUM_SUBSETS, seed: int = 0) -> float:
    """Score-weighted vote at ``k``: a group's weight is its summed scores."""
    _check_lengths(answers, correct, k, scores)
    labels = group_labels(answers, equivalent)
    subs = subsets(len(answers), k, max_exact=max_exact, num_subsets=num_subsets, seed=seed)
    hits = 0
    for sub in subs:
        w = vote_winner(labels, sub, scores)
        hits += bool(w is not None and correct[w])
    return hits / len(subs)


def best_of_k(correct: Sequence[bool], scores: Sequence[float], k: int, *,
              max_exact: int = MAX_EXACT_SUBSETS, num_subsets: int = DEFAULT_NUM_SUBSETS,
              seed: int = 0) -> float:
    """Verifier best-of-k: correctness of the top-scored sample, averaged over
    k-subsets (ties: first in sample order)."""
    _check_lengths(correct, correct, k, scores)
    subs = subsets(len(correct), k, max_exact=max_exact, num_subsets=num_subsets, seed=seed)
    hits = 0
    for sub in subs:
        top = max(sub, key=lambda i: (scores[i], -i))
        hits += bool(correct[top])
    return hits / len(subs)


# --------------------------------------------------------------------------
# Uncertainty
# --------------------------------------------------------------------------

def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion (good at 0%/100% and small n)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_interval(values: Sequence[float], *, confidence: float = 0.95,
                       resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-problem ``values``
    (use for pass@k/maj@k, whose per-problem values are not 0/1)."""
    if not values:
        return (0.0, 0.0)
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    return _percentiles(means, confidence)


def _percentiles(draws: Sequence[float], confidence: float) -> tuple[float, float]:
    """The two-sided percentile interval of sorted bootstrap ``draws``."""
    last = len(draws) - 1
    return draws[int((1 - confidence) / 2 * last)], draws[int((1 + confidence) / 2 * last)]


def paired_ratio_interval(a: dict[Hashable, float], b: dict[Hashable, float], *, confidence: float = 0.95,
                          resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """mean(a) / mean(b) over the problems both scored, with a percentile bootstrap interval that resamples
    *problems* (the same draw for both): two models judged on the same problems share each problem's
    difficulty, so resampling them independently would count that shared variance twice and widen the
    interval. ``a``/``b`` map problem id -> per-problem accuracy. Returns (ratio, lo, hi); nan where b's
    mean is 0."""
    ids = sorted(set(a) & set(b), key=str)
    if not ids:
        raise ValueError("the two results share no problem: a paired ratio needs the same problems")
    n, rng = len(ids), random.Random(seed)

    def ratio(sample) -> float:
        den = sum(b[i] for i in sample)
        return sum(a[i] for i in sample) / den if den else float("nan")

    draws = sorted((ratio([ids[rng.randrange(n)] for _ in range(n)]) for _ in range(resamples)),
                   key=lambda r: (math.isnan(r), r))  # nan (a draw where b scored 0) sorts last
    return (ratio(ids), *_percentiles(draws, confidence))


# --------------------------------------------------------------------------
# Aggregation helpers
# --------------------------------------------------------------------------

def mean_of(rows: Iterable[dict], field: str) -> float | None:
    """Mean of a numeric field over rows that have it (e.g. ``"tokens"``,
    ``"seconds"``); None when no row has it."""
    vals = [float(r[field]) for r in rows if r.get(field) is not None]
    return mean(vals) if vals else None


def breakdown(rows: Iterable[dict], key: str | Callable[[dict], Any],
              value: str = "correct") -> dict[Any, dict[str, float]]:
    """Mean of ``value`` per group of ``key`` (e.g. MATH level or subject):
    ``{group: {"n": count, "accuracy": mean}}``, groups sorted."""
    groups: dict[Any, list[float]] = defaultdict(list)
    get = key if callable(key) else (lambda r: r.get(key))
    for r in rows:
        groups[get(r)].append(float(r[value]))
    return {g: {"n": len(v), "accuracy": sum(v) / len(v)}
            for g, v in sorted(groups.items(), key=lambda kv: str(kv[0]))}


def accuracy_vs_k(problems: Sequence[dict], ks: Sequence[int], *,
                  seed: int = 0) -> dict[str, list[tuple[int, float]]]:
    """pass@k and maj@k curves (fractions) averaged over problems.

    Each problem dict has ``"correct"`` (list of bool) and optionally
    ``"answers"`` (hashable vote keys) for maj@k.
    """
    out: dict[str, list[tuple[int, float]]] = {"pass": [], "maj": []}
    for k in ks:
        out["pass"].append((k, mean(pass_at_k(len(p["correct"]), sum(map(bool, p["correct"])), k)
                                    for p in problems)))
        if all("answers" in p for p in problems):
            out["maj"].append((k, mean(maj_at_k(p["answers"], p["correct"], k, seed=seed)
                                       for p in problems)))
    if not out["maj"]:
        del out["maj"]
    return out


def accuracy_vs_seconds(seconds_by_k: dict[int, float],
                        accuracy_by_k: dict[int, float]) -> list[tuple[float, float, int]]:
    """Join "time to produce k samples" with "accuracy with k samples" into
    a ``(seconds, accuracy, k)`` series sorted by time -- the M1 plot of
    accuracy at a fixed generation-time budget.  ``seconds_by_k`` comes
    from measured batched generation (one batch of k samples per problem)."""
    ks = sorted(set(seconds_by_k) & set(accuracy_by_k))
    return sorted(((float(seconds_by_k[k]), float(accuracy_by_k[k]), k) for k in ks))


def accuracy_at_budget(series: Sequence[tuple[float, float, int]], budget: float) -> float | None:
    """Best accuracy reachable within ``budget`` seconds on such a series."""
    ok = [acc for secs, acc, _ in series if secs <= budget]
    return max(ok) if ok else None

