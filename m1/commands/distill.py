"""``m1 distill``: argument parsing only; the work is :func:`m1.distill.distill`."""

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
The teacher may be any m1 checkpoint, e.g. the teacher after `m1 sft` (same tokenizer). The training state lives in OUT.work/ (checkpoint
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
    g = p.add_argument_group("what")
    g.add_argument("--student", required=True, help="hybrid checkpoint directory (from `m1 convert`)")
    g.add_argument("--teacher", default=None,
                   help="teacher: smollm2-135m, an HF directory or a .gguf (default: the one in the student's m1.json)")
    g.add_argument("--data", default="gsm8k-train",
                   help="gsm8k-train, or .jsonl file(s) with text/messages rows, comma-separated (default gsm8k-train)")
    g.add_argument("--out", required=True, help="output checkpoint directory (must not exist unless --force)")
    g.add_argument("--stage", default="both",
                   help="align | kd | onpolicy | both (= align,kd), or a comma-separated order (default both)")
    g = p.add_argument_group("loss")
    g.add_argument("--loss", choices=["reverse_kl", "forward_kl", "jsd"], default="reverse_kl",
                   help="kd loss: reverse_kl = KL(student||teacher) (default, M1), forward_kl = KL(teacher||student), "
                        "jsd = generalised Jensen-Shannon with --beta")
    g.add_argument("--beta", type=float, default=0.5, help="jsd: weight of the teacher in the mixture (default 0.5)")
    g.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of both models (default 1)")
    g.add_argument("--ce-weight", type=float, default=0.0,
                   help="add this times the next-token cross-entropy on the data (default 0)")
    g.add_argument("--trainable", choices=["all", "mamba"], default="all",
                   help="kd/onpolicy: train every parameter (default) or only the Mamba mixers")
    g.add_argument("--loss-on", choices=["all", "completion"], default="all",
                   help="kd: loss on every token (default), or only on the completion tokens of task rows")
    g = p.add_argument_group("onpolicy")
    g.add_argument("--onpolicy-steps", type=int, default=None, help="onpolicy stage steps (default: --steps)")
    g.add_argument("--lambda", dest="lmbda", type=float, default=1.0,
                   help="share of onpolicy steps on the student's own samples; the rest train on the data's "
                        "reference completions (GKD's lambda; default 1)")
    g.add_argument("--num-samples", type=int, default=1,
                   help="samples per prompt, prefilled once; each step samples batch-size / num-samples prompts (default 1)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="most tokens per sampled completion (default 128)")
    g.add_argument("--gen-temperature", type=float, default=1.0, help="sampling temperature of the rollouts (default 1)")
    g = p.add_argument_group("budget and batches")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps per stage")
    g.add_argument("--max-tokens", type=int, default=None,
                   help="training tokens per stage (non-padding); with --steps, whichever ends first")
    g.add_argument("--align-steps", type=int, default=None, help="align stage steps (default: --steps)")
    g.add_argument("--align-max-tokens", type=int, default=None, help="align stage tokens (default: --max-tokens)")
    g.add_argument("--seq-len", type=int, default=512, help="truncate samples to this many tokens (default 512)")
    g.add_argument("--batch-size", type=int, default=8, help="rows per optimizer step over all processes (default 8)")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="rows per forward pass per process; the rest is gradient accumulation "
                        "(default: the largest divisor of batch size / processes <= 4 on CPU, <= 8 on CUDA)")
    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, default=1e-4, help="kd peak learning rate (default 1e-4)")
    g.add_argument("--align-lr", type=float, default=3e-3, help="align peak learning rate (default 3e-3)")
    g.add_argument("--mamba-lr", type=float, default=None,
                   help="kd/onpolicy peak learning rate of the Mamba mixers (default: --lr)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--warmup", type=float, default=0.05, help="warm-up fraction of each stage (default 0.05)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a fraction of the peak (default 0.1)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 = off (default 1)")
    g.add_argument("--seed", type=int, default=0, help="data order and held-out split (default 0)")
    g = p.add_argument_group("run")
    g.add_argument("--heldout", type=int, default=64, help="rows held out for the before/after report (default 64)")
    g.add_argument("--eval-batch-size", type=int, default=8, help="batch size of the held-out report (default 8)")
    g.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 autocast for the training forwards: auto = on a CUDA GPU that supports it, else "
                        "float32; on = also on a CPU with AVX512-BF16/AMX (~2x faster there) (default auto)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations during backward: much less memory (SmolLM2 hybrid, 8 x 256 tokens: "
                        "peak RSS 12.8 -> 5.8 GB), ~10-20%% more compute")
    g.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (default 50)")
    g.add_argument("--resume", action="store_true", help="continue the unfinished run in OUT.work/")
    g.add_argument("--force", action="store_true", help="replace OUT, and discard an unfinished run in OUT.work/")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(a) -> None:
    from ..distill import DistillConfig, distill

    cfg = DistillConfig(
        student=a.student, out=a.out, teacher=a.teacher, data=a.data, stage=a.stage, loss=a.loss, beta=a.beta,
        temperature=a.temperature, ce_weight=a.ce_weight, trainable=a.trainable, loss_on=a.loss_on,
        mamba_lr=a.mamba_lr, onpolicy_steps=a.onpolicy_steps, lmbda=a.lmbda, num_samples=a.num_samples,
        max_new_tokens=a.max_new_tokens, gen_temperature=a.gen_temperature, steps=a.steps,
        max_tokens=a.max_tokens, align_steps=a.align_steps, align_max_tokens=a.align_max_tokens, seq_len=a.seq_len,
        batch_size=a.batch_size, micro_batch_size=a.micro_batch_size, lr=a.lr, align_lr=a.align_lr,
        weight_decay=a.weight_decay, warmup=a.warmup, min_lr_ratio=a.min_lr_ratio, grad_clip=a.grad_clip,
        seed=a.seed, heldout=a.heldout, eval_batch_size=a.eval_batch_size, checkpoint_every=a.checkpoint_every,
        bf16=a.bf16, gradient_checkpointing=a.gradient_checkpointing)
    distill(cfg, resume=a.resume, force=a.force, log=lambda m: print(m, file=sys.stderr),
            progress=not a.no_progress)
