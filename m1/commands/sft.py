"""``m1 sft``: argument parsing only; the work is :func:`m1.train.sft.sft`."""

from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = """\
Supervised fine-tuning on step-by-step math solutions (M1 stage 2), on TRL's SFTTrainer.

Each example is a chat: the problem with m1's instruction (the prompt `m1 eval` and `m1 grpo` use)
-> a worked solution ending in \\boxed{answer}. The loss is on the solution tokens only (TRL's
prompt/completion format masks the prompt); samples are never packed (a Mamba layer's state would
leak from one sample into the next).

The training state lives in OUT.work/ (checkpoints every --save-steps, metrics.jsonl); a killed run
continues with the same command plus --resume (different settings are refused, nothing is touched).
At the end OUT is a normal m1 checkpoint (m1.json: stage sft) that every m1 command accepts.
Multi-process / GPU: `accelerate launch [--num_processes N] $(which m1) sft ...`."""

EPILOG = """\
data (--data):
  gsm8k-train             GSM8K train (7,473): <<...>> annotations removed, '#### N' -> \\boxed{N}
  arith[:steps=S,digits=D] procedural arithmetic word problems (train split; --limit of them, default 2000)
  TASK[:split=train]      any m1 task with a train split
  FILE.jsonl              rows {"question", "solution"[, "answer"]}, raw GSM8K {"question", "answer": "... #### N"},
                          or {"messages": [..., {"role": "assistant", ...}]}

examples:
  m1 sft --model runs/hybrid --data arith:steps=1,digits=1 --limit 2000 --out runs/sft
  m1 sft --model runs/distilled --data gsm8k-train --out runs/sft --epochs 2 --lr 2e-5 --batch-size 16
  m1 sft ... --resume          # continue a killed run (same settings)"""


def register(subparsers) -> None:
    p = subparsers.add_parser("sft", help="supervised fine-tuning on math solutions (TRL SFTTrainer)",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    from ..settings import add_arguments
    from . import add_run_flags
    from ..train.sft import SFTSettings

    add_run_flags(add_arguments(p, SFTSettings))
    p.set_defaults(func=run)


def run(a) -> None:
    from ..settings import from_args
    from ..train.sft import SFTSettings, sft

    res = sft(from_args(SFTSettings, a), a.out, resume=a.resume, force=a.force, keep_checkpoints=a.keep_checkpoints,
              log=lambda m: print(m, file=sys.stderr, flush=True))
    loss = f"{res.train_loss:.4f}" if res.train_loss is not None else "n/a"
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch only the main process reports
        return
    print(f"sft: {res.steps} steps on {res.examples} examples ({res.dropped} dropped as too long), "
          f"mean train loss {loss}, {res.seconds:.0f} s -> {res.out}")
