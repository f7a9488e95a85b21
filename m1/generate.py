"""The generate stage (``m1 generate``): sample completions of a prompt or a file of prompts with m1's
batched engine, optionally vote, score with a verifier, or sample until a time budget is spent.

    cfg = GenerateSettings(model="runs/hybrid", file="problems.jsonl", n=8, vote=True, output="samples.jsonl")
    result = generate(cfg)

One prompt with ``n=1`` and no ``output`` streams its text; otherwise one JSON row per prompt goes to
``output`` (or the stream), each as soon as its prompt is done. A rerun with the same ``output``
skips the prompts already there, provided the prompts and the settings that decide the samples
(:meth:`GenerateSettings.record`) match. The sampling itself is :mod:`m1.engine`; votes, verifiers
and budgets are :mod:`m1.eval.scaling`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .engine.params import BACKENDS, DTYPES
from .errors import M1Error
from .settings import setting


@dataclass
class GenerateSettings:
    """Every setting of a generate run; the `m1 generate` flags are generated from these fields
    (m1.settings). ``prompt`` and ``file`` exclude each other."""
    model: str = setting(help="checkpoint directory (m1 or a plain HF Llama/Qwen2 directory)")
    prompt: str | None = setting(None, "one prompt", group="prompts")
    file: str | None = setting(None, "prompts, one JSON line each", group="prompts")
    n: int = setting(1, "samples per prompt", short="-n", group="sampling")
    temperature: float = setting(0.7, "0 = greedy", group="sampling")
    top_p: float = setting(1.0, "nucleus sampling, in (0, 1] (default 1 = off)", group="sampling")
    top_k: int = setting(0, "keep the k most likely tokens (default 0 = off)", group="sampling")
    min_p: float = setting(0.0, "drop tokens below min-p x the top probability (default 0)", group="sampling")
    max_new_tokens: int = setting(512, "per sample", group="sampling")
    seed: int = setting(0, "sample j of a prompt uses seed+j", group="sampling")
    stop: tuple[str, ...] = setting((), "stop string (repeatable); cut from the text", repeat=True, group="sampling")
    ignore_eos: bool = setting(False, "keep generating past EOS (benchmarks)", group="sampling")
    chat: bool | None = setting(None, "render prompts with the chat template (default: when the tokenizer has one)",
                                group="sampling")
    vote: bool = setting(False, "majority vote over the extracted final answers", group="test-time scaling")
    verifier: str | None = setting(None, "'self' (the model's P(Yes) to 'Is this solution correct?') or a "
                                         "reward-model directory: adds scores, best-of-N and a verifier-weighted vote",
                                   group="test-time scaling")
    budget_seconds: float | None = setting(None, "sample each prompt in rounds of -n until this many seconds are "
                                                 "spent; records arrival times", group="test-time scaling")
    output: str | None = setting(None, "write JSON rows here instead of stdout, each as soon as its prompt is done; "
                                       "rerunning with the same --output resumes (prompts already there are skipped; "
                                       "the prompts and sampling settings must match)", group="engine")
    overwrite: bool = setting(False, "with --output: start the file over instead of resuming", group="engine")
    backend: str = setting("auto", "auto (default: fast when supported), fast, hf (reference: model.forward + HF "
                                   "cache), vllm", choices=BACKENDS, group="engine")
    device: str | None = setting(None, "cpu, cuda, cuda:1 ... (default: cuda when available)", group="engine")
    dtype: str = setting("auto", "weights dtype (default: as saved)", choices=DTYPES, group="engine")
    max_batch_size: int | None = setting(None, "sample rows decoded together (default 64 CPU / 256 CUDA)",
                                         group="engine")
    compile: bool = setting(False, "torch.compile the decode step (CPU or CUDA; compiling takes ~1 min per batch "
                                   "shape; SmolLM2 on CPU: 1.1-1.2x faster at batch 1, can be slower at batch 16; "
                                   "see docs/generate.md)", group="engine")
    cuda_graphs: bool = setting(True, "on CUDA, decode eagerly instead of replaying CUDA graphs (the default there)",
                                group="engine")
    fused_decode: bool = setting(False, "on CUDA, update the Mamba state with one Triton kernel per layer (opt-in, "
                                        "see docs/benchmarks.md)", group="engine")

    def sampling_params(self):
        from .engine import SamplingParams

        return SamplingParams(n=self.n, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k, min_p=self.min_p, seed=self.seed,
                              stop=tuple(self.stop), ignore_eos=self.ignore_eos).validate()

    def record(self, chat: bool) -> dict:
        """What decides a row's samples (recorded in each output row; a resume must match it)."""
        return {"model": str(self.model), "n": self.n, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "min_p": self.min_p, "max_new_tokens": self.max_new_tokens, "seed": self.seed,
                "stop": list(self.stop), "ignore_eos": self.ignore_eos, "chat": chat, "dtype": self.dtype,
                "budget_seconds": self.budget_seconds, "vote": self.vote, "verifier": self.verifier}


@dataclass
class GenerateResult:
    """What a generate run did: ``written`` rows of ``prompts`` in all (the rest were already in the
    output), or, when it streamed one completion, that completion and its wall seconds."""
    prompts: int
    written: int = 0
    streamed: object | None = None  # the engine's Completion
    seconds: float = 0.0


def read_prompts(cfg: GenerateSettings) -> list[dict]:
    """The prompt rows: ``{"prompt"}``, plus a file row's other fields ("answer" also as "gold")."""
    if cfg.prompt is not None:
        if not cfg.prompt.strip():
            raise M1Error("empty prompt: --prompt needs some text")
        return [{"prompt": cfg.prompt}]
    if cfg.file is None:
        raise M1Error("give --prompt TEXT or --file FILE.jsonl")
    path = Path(cfg.file)
    if not path.is_file():
        raise M1Error(f"prompt file {path} does not exist")
    rows = []
    for ln, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise M1Error(f"{path}:{ln}: not valid JSON ({e})") from None
        if isinstance(obj, str):
            obj = {"prompt": obj}
        if not isinstance(obj, dict):
            raise M1Error(f"{path}:{ln}: expected a string or an object with a 'prompt' field")
        text = next((obj[k] for k in ("prompt", "problem", "question") if k in obj), None)
        if not isinstance(text, str) or not text.strip():
            raise M1Error(f"{path}:{ln}: empty or missing prompt (give a 'prompt', 'problem' or 'question' string)")
        row = {**{k: v for k, v in obj.items() if k != "prompt"}, "prompt": text}
        if "answer" in row and "gold" not in row:
            row["gold"] = row["answer"]  # so that `m1 eval --from-samples` reads the output as it is
        rows.append(row)
    if not rows:
        raise M1Error(f"{path} holds no prompts")
    return rows


def load_engine(cfg: GenerateSettings):
    from .engine import Engine
    from .model.checkpoint import check_model_dir

    check_model_dir(cfg.model)
    device = cfg.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else None
    dtype = None if cfg.dtype == "auto" else cfg.dtype
    kw = {"max_batch_size": cfg.max_batch_size} if cfg.backend != "vllm" else {}
    if cfg.compile and cfg.backend != "vllm":
        kw["compile"] = True
    if cfg.backend != "vllm" and str(device or "cpu").startswith("cuda"):
        kw["cuda_graphs"] = cfg.cuda_graphs
    if cfg.fused_decode and cfg.backend != "vllm":
        kw["fused_decode"] = True
    return Engine.from_pretrained(cfg.model, device=device, dtype=dtype, backend=cfg.backend, **kw)


def generate(cfg: GenerateSettings, stream=None, log=None, progress: bool = True) -> GenerateResult:
    """Run ``cfg``. ``stream`` (default stdout) gets the streamed text, or the JSON rows when there is
    no ``cfg.output``; ``log`` (default: stderr) the messages; ``progress`` a bar over the prompts."""
    stream = stream or sys.stdout
    log = log or (lambda m: print(m, file=sys.stderr))
    params = cfg.sampling_params()
    if cfg.budget_seconds is not None and not cfg.budget_seconds > 0:
        raise M1Error(f"--budget-seconds must be positive, got {cfg.budget_seconds}")
    if cfg.max_batch_size is not None and cfg.max_batch_size < 1:
        raise M1Error(f"--max-batch-size must be at least 1, got {cfg.max_batch_size}")
    rows = read_prompts(cfg)
    if cfg.output and os.path.isdir(cfg.output):
        raise M1Error(f"--output {cfg.output} is a directory: give a file path (e.g. "
                      f"{os.path.join(cfg.output, 'samples.jsonl')})")
    engine = load_engine(cfg)
    chat = cfg.chat if cfg.chat is not None else bool(getattr(engine.tokenizer, "chat_template", None))
    for r in rows:  # all prompts are checked before anything is written
        engine.tokenize(r["prompt"], chat=chat)
    verifier = None
    if cfg.verifier:
        from .eval.scaling import load_verifier

        verifier = load_verifier(cfg.verifier, engine)
    if len(rows) == 1 and cfg.n == 1 and cfg.output is None and cfg.budget_seconds is None \
            and not cfg.vote and verifier is None:
        return _stream_one(engine, rows[0]["prompt"], params, chat, stream)
    record = cfg.record(chat)
    todo = list(range(len(rows)))
    if cfg.output:
        from .eval.evaluate import ResultsWriter

        done = _finished_rows(cfg.output, rows, record, cfg.overwrite)
        todo = [i for i in todo if i not in done]
        if done:
            log(f"resuming: {len(done)} of {len(rows)} prompts already in {cfg.output}")
        out = ResultsWriter(cfg.output)
    else:
        out = stream
    try:
        _sample_rows(cfg, engine, verifier, params, chat, rows, todo, lambda row: _write(out, row, record, stream),
                     progress)
    finally:
        if out is not stream:
            out.close()
    return GenerateResult(prompts=len(rows), written=len(todo))


def _sample_rows(cfg, engine, verifier, params, chat, rows, todo, write, progress) -> None:
    """Sample, vote and score the ``todo`` prompts, handing each finished row to ``write``."""
    checker = None  # votes merge answers the checker calls equivalent, as m1 eval's maj@k does
    if cfg.vote or verifier is not None or cfg.budget_seconds is not None:
        from .eval.grading import Checker

        checker = Checker(timeout=5.0)
    bar = None
    if len(todo) > 1 and progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), file=sys.stderr, unit="prompt", dynamic_ncols=True, desc="generate")
    try:
        if cfg.budget_seconds is not None:
            from .eval.scaling import sample_until_budget

            for i in todo:
                r = rows[i]
                res = sample_until_budget(engine, r["prompt"], cfg.budget_seconds, params, chat=chat)
                row = {"index": i, **r, **res.as_dict(checker=checker)}
                if verifier is not None:
                    _add_verifier(row, verifier, r["prompt"], [s.text for s in res.completed()], checker)
                write(row)
                if bar is not None:
                    bar.update(1)
            return
        per_call = max(1, (getattr(engine, "max_batch_size", 64) or 64) // max(1, cfg.n))
        for b in range(0, len(todo), per_call):
            idx = todo[b:b + per_call]
            chunk = [rows[i] for i in idx]
            outputs = engine.generate([r["prompt"] for r in chunk], params, chat=chat)
            for i, r, o in zip(idx, chunk, outputs):
                row = {"index": i, **r, **_completions(o)}
                if cfg.vote:
                    from .eval.scaling import majority_vote

                    v = majority_vote(row["completions"], checker=checker)
                    row.update(answers=v.answers, vote=v.answer, votes={g.answer: g.count for g in v.groups})
                if verifier is not None:
                    _add_verifier(row, verifier, r["prompt"], row["completions"], checker)
                write(row)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
        if checker is not None:
            checker.close()


def _completions(o) -> dict:
    cs = o.completions
    return {"completions": [c.text for c in cs], "num_tokens": [c.num_tokens for c in cs],
            "seconds": [round(c.seconds, 4) for c in cs], "finish_reasons": [c.finish_reason for c in cs],
            "seeds": [c.seed for c in cs]}


def _add_verifier(row: dict, verifier, prompt: str, texts: list[str], checker=None) -> None:
    from .eval.scaling import best_of_n, weighted_vote

    scores = verifier.score([prompt] * len(texts), texts)
    row["scores"] = [round(s, 6) for s in scores]
    if texts:
        i, _, _ = best_of_n(texts, scores)
        row["best_index"] = i
        row["weighted_answer"] = weighted_vote(texts, scores, checker=checker).answer


def _finished_rows(path, rows: list[dict], record: dict, overwrite: bool) -> set[int]:
    """Indices of the prompts an earlier run already wrote to ``path`` (emptied first with ``overwrite``).

    Every complete row must be for the same prompt at its index and carry the same settings: a file
    from another run is an error rather than something to append to."""
    p = Path(path)
    if overwrite and p.exists():
        p.unlink()
    if not p.exists():
        return set()
    done = set()
    lines = p.read_text(encoding="utf-8").split("\n")
    for ln, line in enumerate(lines[:-1], 1):  # the text after the last newline is a partial row: redone
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise M1Error(f"{p}:{ln} is not a JSON row: not an m1 generate output? Use --overwrite or another "
                          "--output") from None
        i = row.get("index") if isinstance(row, dict) else None
        if not isinstance(i, int) or not 0 <= i < len(rows) or row.get("prompt") != rows[i]["prompt"]:
            raise M1Error(f"{p}:{ln} holds a result for other prompts than these: use --overwrite or another --output")
        if row.get("generation") != record:
            old = row.get("generation") or {}
            diff = {k: (old.get(k), v) for k, v in record.items() if old.get(k) != v}
            raise M1Error(f"{p} was written with other settings {diff}: use --overwrite or another --output")
        done.add(i)
    return done


def _write(out, row: dict, record: dict, stream) -> None:
    row = {**row, "generation": record}
    if out is stream:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        out.flush()
    else:
        out.write(row)  # a ResultsWriter: flushed and fsynced, so a killed run keeps every finished row


def _stream_one(engine, prompt, params, chat, stream) -> GenerateResult:
    t0 = time.perf_counter()

    def on_token(ev):
        if ev.text:
            stream.write(ev.text)
            stream.flush()

    if getattr(engine, "backend", None) == "vllm":
        o = engine.generate([prompt], params, chat=chat)[0]
        stream.write(o.completions[0].text)
    else:
        o = engine.generate([prompt], params, chat=chat, on_token=on_token)[0]
    stream.write("\n")
    stream.flush()
    return GenerateResult(prompts=1, written=1, streamed=o.completions[0], seconds=time.perf_counter() - t0)
