"""``m1 distill``: argument parsing only; the work is :func:`m1.train.distill.distill`."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Distill a converted hybrid from its teacher, as in M1 stage 1:

  align  each Mamba layer's mixer is trained, on the teacher's own input to that layer, to reproduce
         the output of the teacher attention it replaced (MSE); only Mamba mixer weights change
  kd       end-to-end distillation of the next-token distributions (reverse KL by default, as in M1)
  onpolicy the student samples completions of task prompts (m1's engine), the teacher scores every
           token, and the loss is the per-token divergence (reverse KL) on the student's own tokens
           (GKD); --lambda < 1 mixes in steps on the data's reference completions

--stage both (the default) runs align, then kd; or give an order, e.g. --stage align,kd,onpolicy.
The teacher may be any m1 checkpoint, e.g. the teacher after `m1 sft` (same tokenizer).
The training state lives in OUT.work/ (checkpoint
every --checkpoint-every steps, metrics.jsonl); a killed run continues with the same command plus
--resume. At the end OUT is a normal m1 checkpoint (m1.json: stage distill) and a held-out report
(KL(teacher||student), student and teacher perplexity, before and after) is printed.
Multi-process (DDP): `accelerate launch --multi_gpu --num_processes N $(which m1) distill ...` (or
torchrun); with the same --batch-size it trains the same as one process. Without CUDA the
processes run on CPU over gloo (accelerate's own --cpu flag starts only one process)."""

EPILOG = """\
examples:
  m1 distill --student runs/hybrid --teacher smollm2-135m --data gsm8k-train --out runs/distilled --steps 200
  m1 distill --student runs/hybrid --data my.jsonl --out runs/d --stage kd --loss jsd --beta 0.5 --max-tokens 2000000
  m1 distill --student runs/hybrid --teacher runs/teacher-sft --data arith:steps=2,digits=1 --out runs/d \
      --stage kd,onpolicy --steps 100 --loss-on completion      # learn the task from the fine-tuned teacher
  m1 distill ... --resume          # continue a killed run (same settings)

data: a training task -- gsm8k-train, arith[:steps=2,digits=1,n=2000], or any task with a train split --
rendered as prompt + reference solution exactly as `m1 sft` renders it; or .jsonl files (comma-separated)
whose rows are {"text": "..."} or {"messages": [...]} (rendered with the chat template).
budget: --steps and/or --max-tokens apply to each stage; --align-steps / --align-max-tokens
override them for the align stage."""


def register(subparsers) -> None:
    p = subparsers.add_parser("distill", help="layerwise alignment + end-to-end KD from the teacher",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    from ..settings import add_arguments
    from . import add_run_flags
    from ..train.distill import DistillConfig

    groups = add_arguments(p, DistillConfig)
    add_run_flags(groups, out=False)  # --out is a DistillConfig field
    groups["run"].add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(a) -> None:
    from ..settings import from_args
    from ..train.distill import DistillConfig, distill

    distill(from_args(DistillConfig, a), resume=a.resume, force=a.force, log=lambda m: print(m, file=sys.stderr),
            progress=not a.no_progress, keep_checkpoints=a.keep_checkpoints)
