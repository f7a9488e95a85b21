"""Model-driven half of ``m1 eval``: sample, grade, append results, summarise, report.

Every problem's samples are graded and appended to ``results.jsonl`` the moment its last sample
ends, while the rest of its batch still decodes (``Engine.generate(on_output=...)``;
``ResultsWriter``: flush + fsync), so a killed run loses only the problems still decoding; a rerun with the same settings skips
problems whose samples are all there. Seeds are per problem (``seed`` + the problem's index in the
task), so a resumed run draws exactly the samples the first run would have drawn.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import M1Error
from ..model.checkpoint import check_fits_context, check_model_dir, write_json_atomic
from ..engine.params import BACKENDS, DTYPES
from ..settings import setting
from .grading import LIST_POLICIES


def parse_ks_flag(ks) -> list[int]:
    """``--k`` as text ("1,4,16") or as numbers: sorted, distinct, positive."""
    from .evaluate import parse_ks

    try:
        return parse_ks(ks)
    except ValueError as e:
        raise M1Error(f"--k {ks if isinstance(ks, str) else ','.join(map(str, ks))}: {e}") from None




@dataclass
class EvalConfig:
    """What ``m1 eval --model`` samples and how it scores; its flags are generated from these fields
    (m1.settings). ``n``, ``ks`` and ``temperature`` left at None are derived from each other in
    ``__post_init__``, the one place that does it for the CLI and for Python callers alike."""
    model: str = setting(help="checkpoint directory to evaluate", group="source")
    task: str = setting("gsm8k", "task name")
    n: int | None = setting(None, "samples per problem (default: the largest k, else 1)", flag="-n")
    ks: tuple[int, ...] | None = setting(None, "comma-separated k values for pass@k / maj@k (default: 1 and n)",
                                         flag="--k", metavar="K")
    limit: int | None = setting(None, "evaluate a seeded random subset of N problems")
    temperature: float | None = setting(None, "0 = greedy (default 0 for n=1, else 0.7)")
    top_p: float = setting(1.0, "nucleus sampling (1 = off)")
    max_new_tokens: int = setting(512, "new tokens per sample")
    few_shot: int = setting(0, "few-shot examples in the prompt (for base models)")
    seed: int = setting(0, "seed of the problem subset and of the samples")
    dtype: str = setting("auto", "weights dtype while sampling (default: as saved); bfloat16 is ~2x faster on GPUs "
                                 "and on CPUs with AMX, at bf16 precision", choices=DTYPES)
    backend: str = setting("auto", "sampler: m1's engine (auto = fast where the model supports it; fast; hf, the "
                                   "reference) or vllm (needs vllm importable; --dtype auto passes the saved dtype)",
                           choices=BACKENDS)
    lists: str = setting("unordered", "how a list answer matches a list gold: unordered (as sets: '3, 1' = "
                                      "'1, 3') or ordered (as tuples); an interval or ordered pair is always ordered",
                         choices=LIST_POLICIES, group="grading")
    last_number: bool = setting(False, "grade a completion with no \\boxed{}, 'the answer is' or final-answer line "
                                       "by its last number (default: such a completion is wrong: it gave no answer)",
                                group="grading")
    # problems handed to the engine together (None: as many as fill its max_batch_size rows, n rows each):
    # not a flag, and not part of what is sampled (each sample has its own seed)
    batch_problems: int | None = None

    def __post_init__(self):
        if self.ks is not None:
            self.ks = tuple(parse_ks_flag(self.ks))
        if self.n is None:
            self.n = max(self.ks) if self.ks else 1
        if self.ks is None:
            self.ks = tuple(sorted({1, self.n}))
        if self.temperature is None:
            self.temperature = 0.0 if self.n == 1 else 0.7
        if self.temperature < 0:
            raise M1Error(f"--temperature must be >= 0, got {self.temperature}")

    def identity(self) -> dict:
        """Settings that change what is sampled: a resume must match them."""
        d = asdict(self)
        for k in ("ks", "batch_problems"):
            d.pop(k)
        if d["dtype"] == "auto":
            d.pop("dtype")  # evals written before --dtype existed stay resumable
        # ... and before the grading policies and --backend (another sampler draws other samples: not "auto"
        # is part of what was sampled)
        for k, default in (("lists", "unordered"), ("last_number", False), ("backend", "auto")):
            if d[k] == default:
                d.pop(k)
        return d


def run_eval(cfg: EvalConfig, out: str | Path, budget_seconds: float | None = None, progress: bool = True,
             engine=None, log=print) -> dict:
    """Evaluate ``cfg.model`` on ``cfg.task``; write results/summary/report under ``out``; return the summary."""
    from tqdm import tqdm

    from ..tasks import load_task
    from .evaluate import ResultsWriter, load_finished, result_row, summarize_results
    from .grading import Checker

    if cfg.n < 1:
        raise M1Error(f"-n must be at least 1, got {cfg.n}")
    if cfg.dtype not in DTYPES:
        raise M1Error(f"--dtype must be one of {', '.join(DTYPES)}, got '{cfg.dtype}'")
    if cfg.backend not in BACKENDS:
        raise M1Error(f"--backend must be one of {', '.join(BACKENDS)}, got '{cfg.backend}'")
    if max(cfg.ks) > cfg.n:
        raise M1Error(f"--k {max(cfg.ks)} is larger than -n {cfg.n}: sample at least as many completions as the largest k")
    if cfg.n > 1 and cfg.temperature == 0:
        raise M1Error("-n > 1 with --temperature 0 gives n identical greedy samples: set --temperature (e.g. 0.7)")
    check_model_dir(cfg.model)
    try:
        problems = load_task(cfg.task, limit=cfg.limit, seed=cfg.seed if cfg.limit else None)
    except M1Error:
        raise
    except ValueError as e:
        raise M1Error(f"--task {cfg.task}: {e}") from None
    if not problems:
        raise M1Error(f"task {cfg.task} gave no problems")
    check_fits_context(cfg.model, cfg.max_new_tokens, "--max-new-tokens")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path, results = out / "eval_config.json", out / "results.jsonl"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if old.get("identity") != cfg.identity():
            diff = {k: (old.get("identity", {}).get(k), v) for k, v in cfg.identity().items()
                    if old.get("identity", {}).get(k) != v}
            raise M1Error(f"{out} holds an eval with other settings {diff}: use another --out, or delete it")
    elif results.exists() and results.stat().st_size > 0:
        # samples drawn with unknown settings must not count as finished work of this eval
        raise M1Error(f"{out} holds a results.jsonl but no eval_config.json, so its settings are unknown: use another "
                      "--out, or delete the results file")
    finished = load_finished(results)
    todo = [(i, p) for i, p in enumerate(problems) if any((p.id, j) not in finished for j in range(cfg.n))]
    if todo and engine is None:  # before the settings are recorded: a sampler that cannot start leaves no trace
        from ..engine import Engine
        engine = Engine.from_pretrained(cfg.model, dtype=None if cfg.dtype == "auto" else cfg.dtype,
                                        backend=cfg.backend)
    write_json_atomic(cfg_path, {"identity": cfg.identity(), "ks": list(cfg.ks)})
    if len(todo) < len(problems):
        log(f"resuming: {len(problems) - len(todo)} of {len(problems)} problems already done")
    if todo:
        _sample_and_grade(cfg, engine, todo, finished, results, budget_seconds, progress, log,
                          ResultsWriter, result_row, Checker, tqdm)
    summary = summarize_results(results, cfg.ks, seed=cfg.seed)
    summary.update({"model": cfg.model, "task": cfg.task, "n": cfg.n, "temperature": cfg.temperature,
                    "problems_total": len(problems), "lists": cfg.lists, "last_number": cfg.last_number})
    _write_report(out, summary, results)
    return summary


def _sample_and_grade(cfg, engine, todo, finished, results, budget_seconds, progress, log,
                      ResultsWriter, result_row, Checker, tqdm):
    from ..engine import SamplingParams
    from ..tasks.prompts import build_messages, render_prompt

    tok = engine.tokenizer
    start = time.monotonic()
    bar = tqdm(total=len(todo), desc=f"eval {cfg.task}", unit="problem", disable=not progress)
    checker = Checker(timeout=5.0, lists=cfg.lists, last_number=cfg.last_number)
    with ResultsWriter(results) as writer, checker:
        per_batch = cfg.batch_problems or max(1, getattr(engine, "max_batch_size", 64) // cfg.n)
        for b in range(0, len(todo), per_batch):
            if budget_seconds is not None and time.monotonic() - start > budget_seconds:
                log(f"time budget of {budget_seconds:g}s spent: stopped with {len(todo) - b} problems left "
                    "(rerun the same command to continue)")
                break
            chunk = todo[b:b + per_batch]
            prompts = [render_prompt(tok, build_messages(p, few_shot=cfg.few_shot)) for _, p in chunk]
            params = [SamplingParams(n=cfg.n, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                     top_p=cfg.top_p, seed=cfg.seed * 1_000_003 + i) for i, _ in chunk]

            def save(o, chunk=chunk):
                """Grade and append one problem's samples as soon as they are drawn (the rest of the
                batch is still decoding), so a kill loses only the problems not yet finished."""
                p = chunk[o.index][1]
                todo_samples = [(j, c) for j, c in enumerate(o.completions) if (p.id, j) not in finished]
                verdicts = checker.check_many([(c.text, p.answer) for _, c in todo_samples])
                for (j, c), v in zip(todo_samples, verdicts):
                    writer.write(result_row(p.id, j, c.text, p.answer, v, tokens=c.num_tokens,
                                            seconds=round(c.seconds, 4), finish_reason=c.finish_reason,
                                            **{k: p.meta[k] for k in ("level", "subject") if k in p.meta}))
                bar.update(1)

            engine.generate(prompts, params, on_output=save)
    bar.close()


def _write_report(out: Path, summary: dict, results: Path) -> None:
    from .evaluate import plot_accuracy_vs_k, plot_accuracy_vs_seconds, write_report_md
    from .metrics import breakdown

    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    plots = [plot_accuracy_vs_k(summary, out / "accuracy_vs_k.png")]
    series = _seconds_series(rows, summary)
    if series:
        plots.append(plot_accuracy_vs_seconds({Path(summary["model"]).name: series}, out / "accuracy_vs_seconds.png"))
        summary["accuracy_vs_seconds"] = series
    breakdowns = {key: breakdown(rows, key) for key in ("level", "subject") if any(key in r for r in rows)}
    write_json_atomic(out / "summary.json", summary)
    write_report_md(out / "report.md", summary, title=f"m1 eval: {summary['task']}", plots=plots,
                    breakdowns=breakdowns)


def _seconds_series(rows: list[dict], summary: dict) -> list:
    """(seconds per problem to draw k samples, maj@k accuracy %, k): the fixed-time-budget view.

    Seconds are the measured mean per-sample decode time times k (samples of one problem are
    drawn in one batch, so this is an upper bound on the batched cost)."""
    from .metrics import accuracy_vs_seconds

    secs = [r["seconds"] for r in rows if isinstance(r.get("seconds"), (int, float))]
    if not secs:
        return []
    per_sample = sum(secs) / len(secs)
    acc = {k: summary[f"maj@{k}"] for k in summary["ks"] if f"maj@{k}" in summary}
    return [list(x) for x in accuracy_vs_seconds({k: per_sample * k for k in acc}, acc)]
