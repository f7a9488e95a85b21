"""``m1 generate``: argument parsing and output only; the work is :mod:`m1.engine` and :mod:`m1.scaling`."""

from __future__ import annotations

import argparse
import json
import os
import sys

DESCRIPTION = """\
Sample completions from a checkpoint with m1's batched engine: each prompt is prefilled once, its
KV cache and Mamba state are replicated to the n samples, and all samples decode together (finished
ones leave the batch). Sample j of a prompt uses seed --seed + j, so any sample can be reproduced
alone. With one prompt and -n 1 the text streams to stdout; otherwise one JSON row per prompt is
written to --output (or stdout):

  {"index", "prompt", "completions": [...], "num_tokens": [...], "seconds": [...],
   "finish_reasons": [...], "seeds": [...]}  (+ "answers", "vote", "votes" with --vote;
   + "scores", "best_index", "weighted_answer" with --verifier; + "arrival_seconds", "rounds" with
   --budget-seconds), and "generation": the settings that produced it.

--output is written row by row as prompts finish; run the same command again after an interruption
and it resumes, skipping the prompts already there (the prompts and settings must match;
--overwrite starts over)."""

EPILOG = """\
examples:
  m1 generate --model runs/hybrid --prompt "What is 12 * 7?" --temperature 0
  m1 generate --model runs/hybrid --prompt "What is 12 * 7?" -n 16 --vote
  m1 generate --model runs/hybrid --file problems.jsonl -n 8 --output samples.jsonl
  m1 generate --model runs/hybrid --prompt "..." --budget-seconds 30 --vote   # sample until 30 s are spent

--file: JSON lines, each a string or an object with "prompt" (or "problem" / "question"); other
fields ("id", "answer", ...) are copied to the output row ("answer" also as "gold", so the output
feeds `m1 eval --from-samples`)."""


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="fast batched sampling, majority vote, best-of-N, time budgets",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (m1 or a plain HF Llama/Qwen2 directory)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--file", help="prompts, one JSON line each")
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--n", type=int, default=1, help="samples per prompt (default 1)")
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling, in (0, 1] (default 1 = off)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability (default 0)")
    g.add_argument("--max-new-tokens", type=int, default=512, help="per sample (default 512)")
    g.add_argument("--seed", type=int, default=0, help="sample j of a prompt uses seed+j (default 0)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable); cut from the text")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS (benchmarks)")
    g.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="render prompts with the chat template (default: when the tokenizer has one)")
    g = p.add_argument_group("test-time scaling")
    g.add_argument("--vote", action="store_true", help="majority vote over the extracted final answers")
    g.add_argument("--verifier", default=None,
                   help="'self' (the model's P(Yes) to 'Is this solution correct?') or a reward-model directory: "
                        "adds scores, best-of-N and a verifier-weighted vote")
    g.add_argument("--budget-seconds", type=float, default=None,
                   help="sample each prompt in rounds of -n until this many seconds are spent; records arrival times")
    g = p.add_argument_group("engine")
    g.add_argument("--output", default=None,
                   help="write JSON rows here instead of stdout, each as soon as its prompt is done; rerunning "
                        "with the same --output resumes (prompts already there are skipped; the prompts and "
                        "sampling settings must match)")
    g.add_argument("--overwrite", action="store_true", help="with --output: start the file over instead of resuming")
    g.add_argument("--backend", choices=["auto", "fast", "hf", "vllm"], default="auto",
                   help="auto (default: fast when supported), fast, hf (reference: model.forward + HF cache), vllm")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights dtype (default: as saved)")
    g.add_argument("--max-batch-size", type=int, default=None, help="sample rows decoded together (default 64 CPU / 256 CUDA)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (CPU or CUDA; compiling takes ~1 min per batch shape; "
                        "SmolLM2 on CPU: 1.1-1.2x faster at batch 1, can be slower at batch 16; see docs/generate.md)")
    g.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="on CUDA, decode eagerly instead of replaying CUDA graphs (the default there)")
    g.add_argument("--fused-decode", action="store_true",
                   help="on CUDA, update the Mamba state with one Triton kernel per layer (opt-in, see docs/benchmarks.md)")
    p.set_defaults(func=_run)


def _read_prompts(a) -> list[dict]:
    from pathlib import Path

    from ..errors import M1Error

    if a.prompt is not None:
        if not a.prompt.strip():
            raise M1Error("empty prompt: --prompt needs some text")
        return [{"prompt": a.prompt}]
    path = Path(a.file)
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


def _run(a) -> None:
    from ..engine import Engine, SamplingParams
    from ..errors import M1Error

    params = SamplingParams(n=a.n, max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                            top_k=a.top_k, min_p=a.min_p, seed=a.seed, stop=tuple(a.stop),
                            ignore_eos=a.ignore_eos).validate()
    if a.budget_seconds is not None and not a.budget_seconds > 0:
        raise M1Error(f"--budget-seconds must be positive, got {a.budget_seconds}")
    if a.max_batch_size is not None and a.max_batch_size < 1:
        raise M1Error(f"--max-batch-size must be at least 1, got {a.max_batch_size}")
    rows = _read_prompts(a)
    if a.output and os.path.isdir(a.output):
        raise M1Error(f"--output {a.output} is a directory: give a file path (e.g. {os.path.join(a.output, 'samples.jsonl')})")
    from ..checkpoint import check_model_dir

    check_model_dir(a.model)
    device = a.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else None
    dtype = None if a.dtype == "auto" else a.dtype
    kw = {"max_batch_size": a.max_batch_size} if a.backend != "vllm" else {}
    if a.compile and a.backend != "vllm":
        kw["compile"] = True
    if a.backend != "vllm" and str(device or "cpu").startswith("cuda"):
        kw["cuda_graphs"] = a.cuda_graphs
    if a.fused_decode and a.backend != "vllm":
        kw["fused_decode"] = True
    engine = Engine.from_pretrained(a.model, device=device, dtype=dtype, backend=a.backend, **kw)
    tok = engine.tokenizer
    chat = a.chat if a.chat is not None else bool(getattr(tok, "chat_template", None))
    for r in rows:  # all prompts are checked before anything is written
        engine.tokenize(r["prompt"], chat=chat)
    verifier = None
    if a.verifier:
        from ..scaling import load_verifier

        verifier = load_verifier(a.verifier, engine)

    stream = len(rows) == 1 and a.n == 1 and a.output is None and a.budget_seconds is None \
        and not a.vote and verifier is None
    if stream:
        _stream_one(engine, rows[0]["prompt"], params, chat)
        return

    settings = _settings(a, chat)
    todo = list(range(len(rows)))
    if a.output:
        from ..evaluate import ResultsWriter

        done = _finished_rows(a.output, rows, settings, a.overwrite)
        todo = [i for i in todo if i not in done]
        if done:
            print(f"resuming: {len(done)} of {len(rows)} prompts already in {a.output}", file=sys.stderr)
        out = ResultsWriter(a.output)
    else:
        out = sys.stdout
    checker = None  # votes merge answers the checker calls equivalent, as m1 eval's maj@k does
    if a.vote or verifier is not None or a.budget_seconds is not None:
        from ..grading import Checker

        checker = Checker(timeout=5.0)
    bar = None
    if len(todo) > 1:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), file=sys.stderr, unit="prompt", dynamic_ncols=True, desc="generate")
    try:
        if a.budget_seconds is not None:
            from ..scaling import sample_until_budget

            for i in todo:
                r = rows[i]
                res = sample_until_budget(engine, r["prompt"], a.budget_seconds, params, chat=chat)
                row = {"index": i, **r, **res.as_dict(checker=checker)}
                if verifier is not None:
                    _add_verifier(row, verifier, r["prompt"], [s.text for s in res.completed()], checker)
                _write(out, row, settings)
                if bar is not None:
                    bar.update(1)
        else:
            per_call = max(1, (getattr(engine, "max_batch_size", 64) or 64) // max(1, a.n))
            for b in range(0, len(todo), per_call):
                idx = todo[b:b + per_call]
                chunk = [rows[i] for i in idx]
                outputs = engine.generate([r["prompt"] for r in chunk], params, chat=chat)
                for i, r, o in zip(idx, chunk, outputs):
                    row = {"index": i, **r, **_completions(o)}
                    if a.vote:
                        from ..scaling import majority_vote

                        v = majority_vote(row["completions"], checker=checker)
                        row.update(answers=v.answers, vote=v.answer, votes={g.answer: g.count for g in v.groups})
                    if verifier is not None:
                        _add_verifier(row, verifier, r["prompt"], row["completions"], checker)
                    _write(out, row, settings)
                if bar is not None:
                    bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
        if checker is not None:
            checker.close()
        if out is not sys.stdout:
            out.close()
    if a.output:
        print(f"wrote {len(todo)} rows to {a.output} ({len(rows)} in all)", file=sys.stderr)


def _completions(o) -> dict:
    cs = o.completions
    return {"completions": [c.text for c in cs], "num_tokens": [c.num_tokens for c in cs],
            "seconds": [round(c.seconds, 4) for c in cs], "finish_reasons": [c.finish_reason for c in cs],
            "seeds": [c.seed for c in cs]}


def _add_verifier(row: dict, verifier, prompt: str, texts: list[str], checker=None) -> None:
    from ..scaling import best_of_n, weighted_vote

    scores = verifier.score([prompt] * len(texts), texts)
    row["scores"] = [round(s, 6) for s in scores]
    if texts:
        i, _, _ = best_of_n(texts, scores)
        row["best_index"] = i
        row["weighted_answer"] = weighted_vote(texts, scores, checker=checker).answer


def _settings(a, chat: bool) -> dict:
    """What decides a row's samples (recorded in each --output row; a resume must match it)."""
    return {"model": str(a.model), "n": a.n, "temperature": a.temperature, "top_p": a.top_p, "top_k": a.top_k,
            "min_p": a.min_p, "max_new_tokens": a.max_new_tokens, "seed": a.seed, "stop": list(a.stop),
            "ignore_eos": a.ignore_eos, "chat": chat, "dtype": a.dtype, "budget_seconds": a.budget_seconds,
            "vote": a.vote, "verifier": a.verifier}


def _finished_rows(path, rows: list[dict], settings: dict, overwrite: bool) -> set[int]:
    """Indices of the prompts an earlier run already wrote to ``path`` (emptied first with ``overwrite``).

    Every complete row must be for the same prompt at its index and carry the same settings: a file
    from another run is an error rather than something to append to."""
    from pathlib import Path

    from ..errors import M1Error

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
            raise M1Error(f"{p}:{ln} is not a JSON row: not an m1 generate output? Use --overwrite or another --output") from None
        i = row.get("index") if isinstance(row, dict) else None
        if not isinstance(i, int) or not 0 <= i < len(rows) or row.get("prompt") != rows[i]["prompt"]:
            raise M1Error(f"{p}:{ln} holds a result for other prompts than these: use --overwrite or another --output")
        if row.get("generation") != settings:
            old = row.get("generation") or {}
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            raise M1Error(f"{p} was written with other settings {diff}: use --overwrite or another --output")
        done.add(i)
    return done


def _write(out, row: dict, settings: dict) -> None:
    row = {**row, "generation": settings}
    if out is sys.stdout:
        out.write(json.dumps(row, ensure_ascii=False) + "\n")
        out.flush()
    else:
        out.write(row)  # a ResultsWriter: flushed and fsynced, so a killed run keeps every finished row


def _stream_one(engine, prompt, params, chat) -> None:
    import time

    t0 = time.perf_counter()

    def on_token(ev):
        if ev.text:
            sys.stdout.write(ev.text)
            sys.stdout.flush()

    if getattr(engine, "backend", None) == "vllm":
        o = engine.generate([prompt], params, chat=chat)[0]
        sys.stdout.write(o.completions[0].text)
    else:
        o = engine.generate([prompt], params, chat=chat, on_token=on_token)[0]
    sys.stdout.write("\n")
    sys.stdout.flush()
    c = o.completions[0]
    dt = time.perf_counter() - t0
    print(f"[{c.num_tokens} tokens, {dt:.2f} s, {c.num_tokens / max(dt, 1e-9):.1f} tokens/s, finish: {c.finish_reason}]",
          file=sys.stderr)
