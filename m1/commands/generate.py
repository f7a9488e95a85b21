"""``m1 generate``: argument parsing and printing only; the work is :func:`m1.generate.generate`."""

from __future__ import annotations

import argparse
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
    from ..generate import GenerateSettings
    from ..settings import add_arguments

    add_arguments(p, GenerateSettings, groups={"prompts": p.add_mutually_exclusive_group(required=True)})
    p.set_defaults(func=_run)


def _run(a) -> None:
    from ..generate import GenerateSettings, generate
    from ..settings import from_args

    cfg = from_args(GenerateSettings, a)
    res = generate(cfg, log=lambda m: print(m, file=sys.stderr))
    c = res.streamed
    if c is not None:
        print(f"[{c.num_tokens} tokens, {res.seconds:.2f} s, {c.num_tokens / max(res.seconds, 1e-9):.1f} tokens/s, "
              f"finish: {c.finish_reason}]", file=sys.stderr)
    elif cfg.output:
        print(f"wrote {res.written} rows to {cfg.output} ({res.prompts} in all)", file=sys.stderr)
