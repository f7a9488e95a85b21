r"""Model-free half of ``m1 eval``: score sample files, keep resumable results,
plot and write a report.

``m1 eval --from-samples FILE.jsonl --k 1,4,8`` calls :func:`summarize_samples`.
Each line of the file is one problem::

    {"id": "test-0", "gold": "18", "completions": ["...\\boxed{18}", ...],
     "scores": [0.9, ...]}            # scores optional (reward-model scores)

Every completion is graded by :mod:`m1.eval.grading` (worker processes, hard
timeouts), answers are grouped for voting (all samples that match the gold
form one group; the others are grouped by normalised answer and merged when
the checker calls them equivalent), and :mod:`m1.eval.metrics` turns that into
pass@k, maj@k and -- with scores -- best_of@k, as percentages.

A malformed file is a user error: :class:`SamplesFileError` names the file
and line.  A gold answer that cannot be parsed is *not* an error: it is
counted (``unparseable_gold``), its problem is still graded (by string
comparison), and the run goes on.

Generation writes one JSON row per sample through :class:`ResultsWriter`
(append + flush + fsync, so a crash loses at most the row being written);
:func:`load_finished` reads back which ``(problem_id, sample_idx)`` are done so
a rerun resumes instead of starting over.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from statistics import mean
from typing import Any, Iterable, Sequence

from . import metrics
from ..errors import M1Error
from .grading import Checker, answer_key

__all__ = [
    "SamplesFileError", "read_samples", "summarize_samples", "summarize_results", "result_row",
    "vote_labels", "parse_ks",
    "ResultsWriter", "load_finished", "plot_accuracy_vs_k", "plot_accuracy_vs_seconds",
    "write_report_md",
]


class SamplesFileError(M1Error, ValueError):
    """A samples/results file is malformed; the message names file and line."""


# --------------------------------------------------------------------------
# Reading sample files
# --------------------------------------------------------------------------

def parse_ks(ks: str | Iterable[int]) -> list[int]:
    """``"1,4,8"`` or ``[1, 4, 8]`` -> sorted unique positive ints."""
    items = ks.split(",") if isinstance(ks, str) else list(ks)
    try:
        out = sorted({int(str(k).strip()) for k in items if str(k).strip()})
    except ValueError:
        raise ValueError(f"--k must be comma-separated positive integers, got {ks!r}") from None
    if not out or out[0] < 1:
        raise ValueError(f"--k must be comma-separated positive integers, got {ks!r}")
    return out


def _gold_str(value: Any) -> str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float, str)):
        return str(value)
    return None


def read_samples(path: str | os.PathLike) -> list[dict]:
    """Validated rows of a samples file, each with ``line`` added."""
    path = Path(path)
    if not path.is_file():
        raise SamplesFileError(f"{path}: no such samples file")
    rows, seen = [], {}
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SamplesFileError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise SamplesFileError(f"{where}: expected a JSON object, got {type(row).__name__}")
            for key in ("id", "gold", "completions"):
                if key not in row:
                    raise SamplesFileError(f"{where}: missing field {key!r}")
            pid = row["id"]
            if isinstance(pid, bool) or not isinstance(pid, (str, int)):
                raise SamplesFileError(f"{where}: 'id' must be a string")
            pid = str(pid)
            if pid in seen:
                raise SamplesFileError(f"{where}: duplicate id {pid!r} (first on line {seen[pid]})")
            seen[pid] = lineno
            gold = _gold_str(row["gold"])
            if gold is None:
                raise SamplesFileError(f"{where}: 'gold' must be a string, got {row['gold']!r}")
            comps = row["completions"]
            if not isinstance(comps, list) or not comps or not all(isinstance(c, str) for c in comps):
                raise SamplesFileError(f"{where}: 'completions' must be a non-empty list of strings")
            scores = row.get("scores")
            if scores is not None:
                if (not isinstance(scores, list) or len(scores) != len(comps) or not all(
                        isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores)):
                    raise SamplesFileError(
                        f"{where}: 'scores' must be a list of {len(comps)} numbers "
                        "(one per completion)")
            rows.append({"id": pid, "gold": gold, "completions": comps,
                         "scores": [float(s) for s in scores] if scores is not None else None,
                         "line": lineno})
    if not rows:
        raise SamplesFileError(f"{path}: no samples (empty file)")
    with_scores = sum(r["scores"] is not None for r in rows)
    if 0 < with_scores < len(rows):
        first = next(r for r in rows if r["scores"] is None)
        raise SamplesFileError(f"{path}:{first['line']}: 'scores' missing here but present on "
                               "other lines; give scores for every problem or for none")
    return rows


# --------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------

def vote_labels(preds: Sequence[str | None], correct: Sequence[bool] | None = None, checker: Checker | None = None,
                *, timeout: float | None = None) -> list[int | None]:
    """Vote groups for one problem's samples: the one grouping behind every vote in m1
    (``m1 eval``'s maj@k here, ``m1 generate --vote`` through :func:`m1.eval.scaling.majority_vote`).

    Samples that match the gold (``correct``, when known) are all equivalent to it, hence to each
    other: one group.  The other answers are grouped by :func:`~m1.eval.grading.answer_key`,
    and, with a ``checker``, distinct answers the checker calls equivalent are merged.
    No answer -> ``None`` (does not vote).
    """
    keys: list[Any] = []
    for p, ok in zip(preds, correct if correct is not None else [False] * len(preds)):
        keys.append(("gold",) if ok else (answer_key(p) if p is not None else None))
    if checker is not None:
        reps: dict[str, str] = {}
        for p, k in zip(preds, keys):
            if isinstance(k, str) and k not in reps:
                reps[k] = p
        items = list(reps.items())[:64]
        if len(items) > 1:
            pairs = [(items[i], items[j]) for i in range(len(items)) for j in range(i)]
            verdicts = checker.check_many([(a[1], b[1]) for a, b in pairs], extracted=True,
                                          timeout=timeout)
            equal = {(a[0], b[0]) for (a, b), v in zip(pairs, verdicts) if v.correct}
            return metrics.group_labels(
                keys, lambda x, y: (x, y) in equal or (y, x) in equal)
    return metrics.group_labels(keys)


def summarize_samples(path: str | os.PathLike, ks: str | Iterable[int] = (1,), *,
                      timeout: float = 5.0, workers: int | None = None,
                      checker: Checker | None = None, seed: int = 0,
                      merge_equivalent: bool = True) -> dict[str, Any]:
    """Grade a samples file and compute pass@K / maj@K (/ best_of@K) in %.

    Returns ``{"pass@K": .., "maj@K": .., ["best_of@K": ..,] "n_problems",
    "n_samples", "unparseable_gold", "unparseable_gold_ids", "no_answer",
    "timeouts", "ks", "file"}``.
    """
    ks = parse_ks(ks)
    rows = read_samples(path)
    for r in rows:
        if ks[-1] > len(r["completions"]):
            raise SamplesFileError(
                f"{path}:{r['line']}: --k {ks[-1]} is larger than the {len(r['completions'])} "
                f"completions of problem {r['id']!r}; use k <= {len(r['completions'])}")
    own = checker is None
    checker = checker or Checker(workers, timeout=timeout)
    try:
        pairs = [(c, r["gold"]) for r in rows for c in r["completions"]]
        verdicts = checker.check_many(pairs, timeout=timeout)
        gold_ok = checker.gold_parses([r["gold"] for r in rows], timeout=timeout)
        per_problem, pos = [], 0
        for r in rows:
            vs = verdicts[pos:pos + len(r["completions"])]
            pos += len(vs)
            correct = [v.correct for v in vs]
            labels = vote_labels([v.pred for v in vs], correct,
                                 checker if merge_equivalent else None, timeout=timeout)
            per_problem.append((r, correct, labels))
    finally:
        if own:
            checker.close()
    summary: dict[str, Any] = {
        "file": str(path), "ks": ks, "n_problems": len(rows), "n_samples": len(verdicts),
        "unparseable_gold": sum(not ok for ok in gold_ok),
        "unparseable_gold_ids": [r["id"] for r, ok in zip(rows, gold_ok) if not ok],
        "no_answer": sum(v.status == "no_answer" for v in verdicts),
        "timeouts": sum(v.status == "timeout" for v in verdicts),
    }
    summary.update(_metrics_at_k([(c, lab, r["scores"]) for r, c, lab in per_problem], ks, seed))
    return summary


def _metrics_at_k(per_problem: list[tuple[list[bool], list, list[float] | None]],
                  ks: list[int], seed: int) -> dict[str, float]:
    """pass@K, maj@K and (if every problem has scores) best_of@K in percent."""
    out: dict[str, float] = {}
    has_scores = all(sc is not None for _, _, sc in per_problem)
    for k in ks:
        out[f"pass@{k}"] = 100 * mean(metrics.pass_at_k(len(c), sum(c), k)
                                      for c, _, _ in per_problem)
        out[f"maj@{k}"] = 100 * mean(metrics.maj_at_k(lab, c, k, seed=seed)
                                     for c, lab, _ in per_problem)
        if has_scores:
            out[f"best_of@{k}"] = 100 * mean(metrics.best_of_k(c, sc, k, seed=seed)
                                             for c, _, sc in per_problem)
    return out


def result_row(problem_id: str, sample_idx: int, completion: str, gold: str, verdict,
               **extra: Any) -> dict[str, Any]:
    """One results-JSONL row: everything needed to recompute any metric
    (``extra`` carries e.g. ``tokens``, ``seconds``, ``score``, ``level``)."""
    return {"problem_id": str(problem_id), "sample_idx": int(sample_idx), "gold": gold,
            "completion": completion, "pred": verdict.pred, "correct": bool(verdict.correct),
            "status": verdict.status, **extra}


def summarize_results(path: str | os.PathLike, ks: str | Iterable[int] = (1,), *,
                      seed: int = 0, checker: Checker | None = None) -> dict[str, Any]:
    """Metrics from a per-sample results file (rows of :func:`result_row`)
    without re-grading: the stored ``correct`` and ``pred`` are used (pass a
    ``checker`` to merge equivalent wrong answers for voting).  Rows with a
    ``score`` on every sample give best_of@K; rows with ``tokens`` /
    ``seconds`` give their means."""
    ks = parse_ks(ks)
    path = Path(path)
    if not path.is_file():
        raise SamplesFileError(f"{path}: no such results file")
    by_problem: dict[str, dict[int, dict]] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            by_problem.setdefault(str(row["problem_id"]), {})[int(row["sample_idx"])] = row
            bool(row["correct"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise SamplesFileError(f"{path}:{lineno}: bad results row ({e})") from None
    if not by_problem:
        raise SamplesFileError(f"{path}: no results")
    per_problem, all_rows = [], []
    for pid, samples in by_problem.items():
        rows = [samples[i] for i in sorted(samples)]
        if ks[-1] > len(rows):
            raise SamplesFileError(f"{path}: --k {ks[-1]} is larger than the {len(rows)} samples "
                                   f"of problem {pid!r}")
        correct = [bool(r["correct"]) for r in rows]
        labels = vote_labels([r.get("pred") for r in rows], correct, checker)
        scores = [r["score"] for r in rows] if all("score" in r for r in rows) else None
        per_problem.append((correct, labels, scores))
        all_rows += rows
    summary: dict[str, Any] = {"file": str(path), "ks": ks, "n_problems": len(per_problem),
                               "n_samples": len(all_rows),
                               "no_answer": sum(r.get("pred") is None for r in all_rows),
                               "timeouts": sum(r.get("status") == "timeout" for r in all_rows)}
    for field in ("tokens", "seconds"):
        m = metrics.mean_of(all_rows, field)
        if m is not None:
            summary[f"mean_{field}"] = m
    summary.update(_metrics_at_k(per_problem, ks, seed))
    return summary


# --------------------------------------------------------------------------
# Resumable per-sample results
# --------------------------------------------------------------------------

class ResultsWriter:
    """Append one JSON row per sample, durably (flush + fsync per row).

    If the file ends in a partial line (a crash mid-write), that fragment is
    cut off on open so new rows start on a fresh line.  Use as a context
    manager.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_last_line(self.path)
        self._f = self.path.open("a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_partial_last_line(path: Path) -> None:
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return
        # find the last newline, reading backwards in blocks
        pos = size
        while pos > 0:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            block = f.read(step)
            nl = block.rfind(b"\n")
            if nl != -1:
                f.truncate(pos + nl + 1)
                return
        f.truncate(0)


def load_finished(path: str | os.PathLike) -> set[tuple[str, int]]:
    """``{(problem_id, sample_idx)}`` already in a results file.

    A missing file means nothing is done.  A last line without its trailing
    newline (a crash mid-write) is ignored -- that sample will be redone;
    a malformed complete line raises :class:`SamplesFileError`.
    """
    path = Path(path)
    if not path.exists():
        return set()
    done: set[tuple[str, int]] = set()
    with path.open("r", encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    # text after the last "\n" is an unfinished row (or "" for a clean file);
    # ResultsWriter cuts it off on open, so it never counts as done
    for lineno, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            done.add((str(row["problem_id"]), int(row["sample_idx"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise SamplesFileError(f"{path}:{lineno}: bad results row ({e})") from None
    return done


# --------------------------------------------------------------------------
# Plots and report
# --------------------------------------------------------------------------

def _figure():
    # Figure + Agg canvas directly: no pyplot global state, no display needed
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8), dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def plot_accuracy_vs_k(summary: dict, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Line plot of pass@k / maj@k / best_of@k (percent) against k."""
    fig, ax = _figure()
    for metric, style in (("pass", "o-"), ("maj", "s-"), ("best_of", "^-")):
        pts = sorted((int(key.split("@")[1]), val) for key, val in summary.items()
                     if key.startswith(metric + "@") and isinstance(val, (int, float)))
        if pts:
            ax.plot([k for k, _ in pts], [v for _, v in pts], style, label=f"{metric}@k")
    ax.set_xscale("log", base=2)
    return _finish(fig, ax, path, "k (samples per problem)", title or "accuracy vs k")


def plot_accuracy_vs_seconds(series: dict[str, Sequence[tuple]], path: str | os.PathLike, *,
                             title: str | None = None) -> Path:
    """Accuracy (%) against generation seconds, one line per model/method.

    ``series`` maps a label to ``(seconds, accuracy_percent[, k])`` points
    (see :func:`m1.eval.metrics.accuracy_vs_seconds`); k is written next to each
    point when given.
    """
    fig, ax = _figure()
    for label, pts in series.items():
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        for p in pts:
            if len(p) > 2:
                ax.annotate(f"k={p[2]}", (p[0], p[1]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7)
    return _finish(fig, ax, path, "generation time (s)", title or "accuracy at a fixed time budget")


def _finish(fig, ax, path, xlabel: str, title: str) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_report_md(path: str | os.PathLike, summary: dict, *, title: str = "m1 eval",
                    plots: Sequence[str | os.PathLike] = (),
                    breakdowns: dict[str, dict] | None = None,
                    notes: Sequence[str] = ()) -> Path:
    """Markdown report: metric table per k, counts, breakdowns and plots
    (linked relative to the report)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ks = summary.get("ks") or sorted({int(k.split("@")[1]) for k in summary if "@" in k})
    cols = [m for m in ("pass", "maj", "best_of") if any(f"{m}@{k}" in summary for k in ks)]
    lines = [f"# {title}", ""]
    if summary.get("file"):
        lines += [f"Samples: `{summary['file']}`", ""]
    lines += ["| k | " + " | ".join(f"{c}@k (%)" for c in cols) + " |",
              "|---|" + "---|" * len(cols)]
    for k in ks:
        cells = [f"{summary[f'{c}@{k}']:.1f}" if f"{c}@{k}" in summary else "" for c in cols]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("")
    for key in ("n_problems", "n_samples", "unparseable_gold", "no_answer", "timeouts"):
        if key in summary:
            lines.append(f"- {key.replace('_', ' ')}: {summary[key]}")
    if summary.get("unparseable_gold_ids"):
        ids = ", ".join(f"`{i}`" for i in summary["unparseable_gold_ids"][:20])
        lines.append(f"- problems with unparseable gold: {ids}")
    lines.append("")
    for name, table in (breakdowns or {}).items():
        lines += [f"## By {name}", "", f"| {name} | n | accuracy (%) |", "|---|---|---|"]
        for group, stats in table.items():
            lines.append(f"| {group} | {stats['n']} | {100 * stats['accuracy']:.1f} |")
        lines.append("")
    for p in plots:
        p = Path(p)
        try:
            rel = os.path.relpath(p, path.parent)
        except ValueError:
            rel = str(p)
        lines += [f"![{p.stem}]({rel})", ""]
    for n in notes:
        lines.append(f"> {n}")
    path.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return path
