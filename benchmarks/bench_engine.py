"""Decode throughput of m1's engine vs transformers' ``generate`` (not a test; prints a markdown table).

For each checkpoint and batch size B: one prompt, B greedy samples of exactly --new-tokens tokens
(EOS ignored). HF ``generate`` gets the prompt repeated B times (that is what ``num_return_sequences``
does too); the engine gets ``SamplingParams(n=B)`` (prefill once, replicate the state). tokens/s =
B * new_tokens / wall seconds of the whole call (prefill included). Each cell is the best of
--repeats runs, taken in interleaved order so that load from other processes hits all alike.

    python benchmarks/bench_engine.py --convert /tmp/bench   # converts SmolLM2 (hybrid + all-attention) first
    python benchmarks/bench_engine.py --model hybrid=/tmp/bench/hybrid --model attention=/tmp/bench/attn \\
        --batch 1,16 --new-tokens 64 --repeats 2 --threads 1
    python benchmarks/bench_engine.py --shape llama-3.2-3b --device cuda --dtype bfloat16   # random weights, token prompts
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _convert(root: Path) -> list[tuple[str, str]]:
    from m1.model.convert import ConvertSettings, convert

    out = []
    for name, layers in (("hybrid", None), ("attention", "all")):
        d = root / name
        if not d.exists():
            convert(ConvertSettings(teacher="smollm2-135m", attn_layers=layers),
                    d, log=lambda m: print(m, file=sys.stderr))
        out.append((name, str(d)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="NAME=DIR (repeatable)")
    ap.add_argument("--convert", default=None, help="convert SmolLM2 (hybrid + all-attention) into this folder first")
    ap.add_argument("--shape", default=None, help="random-weight hybrid (M1 layout) + all-attention of an m1 bench shape "
                                                 "(no checkpoint or tokenizer needed; the prompt is --prompt-len random ids)")
    ap.add_argument("--prompt-len", type=int, default=35, help="with --shape")
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--reference", action="store_true", help="also time the engine's hf backend (model.forward + HF cache)")
    ap.add_argument("--sampled", action="store_true", help="also time the engine sampling at temperature 1")
    ap.add_argument("--compiled", action="store_true",
                    help="also time Engine(compile=True) (its warm-up run, which compiles, is not timed)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 for both (default: as saved)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--prompt", default="Natalia sold clips to 48 of her friends in April, and then she sold half as "
                                        "many clips in May. How many clips did Natalia sell altogether?")
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from m1.engine import Engine, SamplingParams
    from m1.model.checkpoint import load_model
    from m1.model.kernels import enable as enable_fast_scan

    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype) if a.dtype else None
    models = [(name, lambda d=d: load_model(d, device=a.device, dtype=dtype)) for name, d in
              (m.split("=", 1) for m in a.model)]
    if a.convert:
        models += [(name, lambda d=d: load_model(d, device=a.device, dtype=dtype)) for name, d in _convert(Path(a.convert))]
    if a.shape:
        from m1.bench import SHAPES, _NullTokenizer, layout_layers, shape_model

        n = SHAPES[a.shape]["num_hidden_layers"]
        for name, layers in (("hybrid", layout_layers("m1", n)), ("attention", list(range(n)))):
            models.append((f"{a.shape} {name}", lambda layers=layers: (
                shape_model(a.shape, layers, dtype or torch.float32, a.device or "cpu"), _NullTokenizer())))
    if not models:
        ap.error("give --model NAME=DIR, --convert DIR or --shape NAME")
    enable_fast_scan()  # the Triton Mamba2 scan on CUDA (when fla-core is installed), for HF and the engine alike
    batches = [int(b) for b in a.batch.split(",")]
    N = a.new_tokens
    results = []
    for name, load in models:
        model, tok = load()
        eng = Engine(model, tok, backend="fast")
        ref = Engine(model, tok, backend="hf")
        if a.shape:
            g = torch.Generator().manual_seed(0)
            prompt = torch.randint(3, model.config.vocab_size, (a.prompt_len,), generator=g).tolist()
            enc = {"input_ids": torch.tensor([prompt], device=model.device)}
            enc["attention_mask"] = torch.ones_like(enc["input_ids"])
        else:
            prompt = a.prompt
            enc = tok(a.prompt, return_tensors="pt").to(model.device)
        plen = enc["input_ids"].shape[1]

        def hf(B):
            ids = {k: v.repeat(B, 1) for k, v in enc.items()}
            with torch.inference_mode():
                out = model.generate(**ids, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                                     pad_token_id=0)
            assert out.shape[1] - plen == N

        def engine(e, temp):
            def run(B):
                o = e.generate(prompt, SamplingParams(n=B, max_new_tokens=N, temperature=temp, seed=0,
                                                        ignore_eos=True))[0]
                assert all(c.num_tokens == N for c in o.completions)
            return run

        sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
        runners = {"hf_generate": hf, "engine": engine(eng, 0.0)}
        if a.reference:
            runners["engine_hf_backend"] = engine(ref, 0.0)
        if a.sampled:
            runners["engine_sampled"] = engine(eng, 1.0)
        if a.compiled:
            runners["engine_compiled"] = engine(Engine(model, tok, backend="fast", compile=True), 0.0)
        for B in batches:
            for fn in runners.values():  # warm-up at this batch (allocations; CUDA graph capture on CUDA)
                fn(B)
            best = {k: float("inf") for k in runners}
            for _ in range(a.repeats):
                for k, fn in runners.items():
                    sync()
                    t = time.perf_counter()
                    fn(B)
                    sync()
                    best[k] = min(best[k], time.perf_counter() - t)
            row = {"model": name, "batch": B, "new_tokens": N, "prompt_tokens": plen,
                   **{f"{k}_tok_s": round(B * N / v, 2) for k, v in best.items()}}
            row["speedup"] = round(best["hf_generate"] / best["engine"], 2)
            results.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        model = eng = ref = runners = None  # free this model before loading the next
    cols = [k for k in results[0] if k.endswith("_tok_s")]
    print(f"| model | batch | new tokens | {' | '.join(c[:-6] + ' tok/s' for c in cols)} | engine / HF |")
    print("|---|---|---|" + "---|" * len(cols) + "---|")
    for r in results:
        print(f"| {r['model']} | {r['batch']} | {r['new_tokens']} | " + " | ".join(f"{r[c]:.1f}" for c in cols)
              + f" | {r['speedup']:.2f}x |")
    print(f"\ntorch {torch.__version__}, threads {torch.get_num_threads()}, device {a.device or 'cpu'}, "
          f"dtype {a.dtype or 'as saved'}, "
          f"prompt {results[0]['prompt_tokens']} tokens, best of {a.repeats}")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
