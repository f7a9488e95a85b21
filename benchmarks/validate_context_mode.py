"""Check `m1 bench --context` against whole generations: the integrated figure vs the measured one.

For one shape, batch and generation (prompt P + gen G), both models (hybrid layout and
all-attention) are measured twice through the same engine: by `m1 bench` as a whole generation
(`measure`: decode tok/s over the G - 1 decode steps) and by the decode-at-context mode at a few
L covering P .. P + G, integrated over the generation (`integrate_generation`). The two estimate
the same number; the script prints both, their difference, and exits 1 if any model differs by
more than --tolerance (default 10%). A benchmark, not a test: timings, so run it on a quiet
machine (docs/benchmarks.md records its numbers and commands).

    OMP_NUM_THREADS=1 python benchmarks/validate_context_mode.py --shape smollm2-135m --batch 4 \
        --prompt-len 64 --gen-len 128 --context 64,112,160 --steps 24 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from m1.bench import _add_ratios, parse_ints


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="smollm2-135m")
    p.add_argument("--layout", default="m1")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--context", default="64,112,160", help="the L of the --context run")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--repeats", type=int, default=3,
                   help="alternate the two modes this many times and compare their medians (a shared machine's "
                        "load drifts: alternating exposes both modes to it alike)")
    p.add_argument("--json", dest="json_path", default="runs/bench/context_validation.json")
    a = p.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    import torch

    from m1.bench import (SHAPES, _NullTokenizer, generation_row, layout_layers, measure, measure_at_context,
                          measure_bandwidth, shape_model)
    from m1.engine import Engine
    from m1.model.kernels import enable

    enable()
    contexts = sorted(set(parse_ints(a.context, "--context")))
    n = SHAPES[a.shape]["num_hidden_layers"]
    layouts = {f"{a.shape} {a.layout}": layout_layers(a.layout, n), f"{a.shape} all-attention": list(range(n))}
    bandwidth = measure_bandwidth(a.device)
    cuda = a.device.startswith("cuda")
    ctx_runs, gen_runs, t_ctx, t_gen = [[] for _ in range(a.repeats)], [[] for _ in range(a.repeats)], 0.0, 0.0
    for name, layers in layouts.items():
        # one engine per model, the two modes alternated on it: a shared machine's load drifts, and
        # alternating exposes both modes to it alike (the same engine settings as `m1 bench`)
        engine = Engine(shape_model(a.shape, layers, getattr(torch, a.dtype), a.device), _NullTokenizer(),
                        max_cache_bytes=1 << 62, cuda_graphs=cuda, max_batch_size=a.batch)
        for rep in range(a.repeats):
            t0 = time.perf_counter()
            per_l = [measure_at_context(engine, name, a.batch, c, a.steps, bandwidth) for c in contexts]
            engine.release()
            ctx_runs[rep] += per_l + [generation_row(engine, per_l, a.prompt_len, a.gen_len, bandwidth)]
            t_ctx += time.perf_counter() - t0
            t0 = time.perf_counter()
            gen_runs[rep].append(measure(engine, name, a.batch, a.prompt_len, a.gen_len, bandwidth))
            t_gen += time.perf_counter() - t0
            log(f"{name} repeat {rep + 1}: full {gen_runs[rep][-1].decode_tokens_per_s:.1f} tok/s, "
                f"integrated {ctx_runs[rep][-1].decode_tokens_per_s:.1f} tok/s "
                f"(per L: {', '.join(f'{r.decode_tokens_per_s:.1f}' for r in per_l)})")
        del engine
    # medians over the repeats, in copies (the per-repeat rows stay as measured); ratios from them
    gen_rows = [replace(r, decode_tokens_per_s=statistics.median(run[i].decode_tokens_per_s for run in gen_runs))
                for i, r in enumerate(gen_runs[0])]
    ctx_rows = [replace(r, decode_tokens_per_s=statistics.median(run[i].decode_tokens_per_s for run in ctx_runs))
                for i, r in enumerate(ctx_runs[0])]
    names = list(layouts)
    _add_ratios(gen_rows, names)
    _add_ratios(ctx_rows, names)
    integrated = {r.model: r for r in ctx_rows if r.context is None}
    print(f"| model | batch | gen | full generation tok/s | integrated tok/s ({len(contexts)} L x "
          f"{a.steps} steps) | difference | full ratio | integrated ratio | byte-limit ratio (full / integrated) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    worst, out = 0.0, []
    for gi, g in enumerate(gen_rows):
        c = integrated[g.model]
        ci = ctx_rows.index(c)
        diff = c.decode_tokens_per_s / g.decode_tokens_per_s - 1
        worst = max(worst, abs(diff))
        fmt = lambda v: "" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"| {g.model} | {g.batch} | {a.prompt_len}+{a.gen_len} | {g.decode_tokens_per_s:.1f} | "
              f"{c.decode_tokens_per_s:.1f} | {diff:+.1%} | {fmt(g.ratio)} | {fmt(c.ratio)} | "
              f"{fmt(g.byte_limit_ratio)} / {fmt(c.byte_limit_ratio)} |")
        out.append({"model": g.model, "full_tokens_per_s": g.decode_tokens_per_s,
                    "integrated_tokens_per_s": c.decode_tokens_per_s, "difference": round(diff, 4),
                    "full_per_repeat": [run[gi].decode_tokens_per_s for run in gen_runs],
                    "integrated_per_repeat": [run[ci].decode_tokens_per_s for run in ctx_runs]})
    print(f"wall: context mode {t_ctx:.0f} s, full generations {t_gen:.0f} s; worst difference {worst:.1%} "
          f"(tolerance {a.tolerance:.0%})")
    if a.json_path:
        path = Path(a.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"args": vars(a), "comparison": out, "wall_s": {"context": t_ctx, "full": t_gen},
                                    "context_rows": [[asdict(r) for r in run] for run in ctx_runs],
                                    "full_rows": [[asdict(r) for r in run] for run in gen_runs]}, indent=2))
    return 0 if worst <= a.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
