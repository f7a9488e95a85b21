"""``m1 sft``: argument parsing only; the work is :func:`m1.sft.sft`."""

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
    g = p.add_argument_group("what")
    g.add_argument("--model", required=True, help="checkpoint directory to fine-tune (from m1 convert / distill / ...)")
    g.add_argument("--data", default="arith",
                   help="gsm8k-train, arith[:steps=S,digits=D], TASK[:split=train] or FILE.jsonl (default arith)")
    g.add_argument("--out", required=True, help="output checkpoint directory (must not exist unless --force)")
    g.add_argument("--limit", type=int, default=None,
                   help="use at most this many examples (arith: how many to generate, default 2000)")
    g = p.add_argument_group("budget and batches")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    g.add_argument("--max-steps", type=int, default=-1,
                   help="stop after this many optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, default=8, help="examples per device per step (default 8)")
    g.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (default 1)")
    g.add_argument("--max-length", type=int, default=1024,
                   help="examples longer than this many tokens are dropped, not cut (default 1024)")
    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (default 2e-5)")
    g.add_argument("--lr-scheduler", default="cosine", help="transformers scheduler name (default cosine)")
    g.add_argument("--warmup-ratio", type=float, default=0.03, help="warm-up fraction of the steps (default 0.03)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (default 1)")
    g.add_argument("--seed", type=int, default=0, help="seed for data order, arith problems, init (default 0)")
    g = p.add_argument_group("hardware")
    g.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 mixed precision: auto = on a CUDA GPU that supports it, else float32 (default auto)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (saves GPU memory)")
    g.add_argument("--mamba-chunk-size", type=int, default=None,
                   help="Mamba2 scan chunk while training (default: 64 on CPU -- 2-3x faster there -- the model's "
                        "own on GPU); the saved config is unchanged")
    g = p.add_argument_group("run")
    g.add_argument("--save-steps", type=int, default=200, help="steps between checkpoints (default 200)")
    g.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept (at least 2; default 2)")
    g.add_argument("--logging-steps", type=int, default=10, help="steps between progress/metrics rows (default 10)")
    g.add_argument("--resume", action="store_true", help="continue the unfinished run in OUT.work/")
    g.add_argument("--force", action="store_true", help="replace OUT, and discard an unfinished run in OUT.work/")
    g.add_argument("--keep-checkpoints", action="store_true", help="keep OUT.work/ (checkpoints, metrics) at the end")
    p.set_defaults(func=run)


def run(a) -> None:
    from ..sft import sft

    res = sft(a.model, a.data, a.out, resume=a.resume, force=a.force, keep_checkpoints=a.keep_checkpoints,
              log=lambda m: print(m, file=sys.stderr, flush=True),
              limit=a.limit, epochs=a.epochs, max_steps=a.max_steps, batch_size=a.batch_size,
              grad_accum=a.grad_accum, max_length=a.max_length, learning_rate=a.lr, lr_scheduler=a.lr_scheduler,
              warmup_ratio=a.warmup_ratio, weight_decay=a.weight_decay, max_grad_norm=a.max_grad_norm, seed=a.seed,
              bf16=a.bf16, gradient_checkpointing=a.gradient_checkpointing, mamba_chunk_size=a.mamba_chunk_size,
              save_steps=a.save_steps, save_total_limit=a.save_total_limit, logging_steps=a.logging_steps)
    loss = f"{res.train_loss:.4f}" if res.train_loss is not None else "n/a"
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch only the main process reports
        return
    print(f"sft: {res.steps} steps on {res.examples} examples ({res.dropped} dropped as too long), "
          f"mean train loss {loss}, {res.seconds:.0f} s -> {res.out}")
