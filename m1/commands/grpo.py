"""``m1 grpo``: argument parsing only; the work is :func:`m1.grpo.grpo`."""

from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = """\
RL with verifiable math rewards (M1 stage 3): GRPO on TRL's GRPOTrainer.

Every step samples --num-generations completions (the group, default 8) for each of
--prompts-per-step problems, rewards each completion 1 if its final \\boxed{} answer is right
(checked by m1.grading, exactly as `m1 eval` scores) and optionally --format-reward for a finished,
boxed answer, and takes a clipped policy-gradient step on advantages relative to the group.
M1's choices are the defaults: no KL term (--beta 0, no reference model) and an entropy bonus
(--entropy-coef). A reward that raises or times out scores 0 for that sample and is reported;
completions that hit --max-completion-length are counted (per step: `trunc`) and reported.

Rollouts: vLLM when it is installed and a CUDA GPU is present (--rollout auto), else transformers'
generate (hf); --rollout engine samples with m1's batched engine (faster on CPU).
The training state lives in OUT.work/; --resume continues a killed run (different settings are
refused). At the end OUT is a normal m1 checkpoint (m1.json: stage grpo).
Multi-process / GPU: `accelerate launch [--num_processes N] $(which m1) grpo ...`."""

EPILOG = """\
task (--task):
  arith[:steps=S,digits=D]  procedural arithmetic word problems (train split; --limit, default 1000)
  gsm8k | gsm8k-train       GSM8K train problems
  TASK[:split=...]          any m1 task (test splits only when asked for explicitly)
  FILE.jsonl                rows {"question", "answer"} (or a "solution" ending in \\boxed{} / '#### N')

examples:
  m1 grpo --model runs/sft --task arith:steps=1,digits=1 --out runs/grpo --max-steps 100 --lr 1e-6
  m1 grpo --model runs/sft --task gsm8k --out runs/grpo --loss-type dr_grpo --format-reward 0.1
  m1 grpo ... --resume        # continue a killed run (same settings)"""


def _opt_float(s: str):
    return None if s.lower() in ("none", "") else float(s)


def register(subparsers) -> None:
    p = subparsers.add_parser("grpo", help="RL with verifiable math rewards (GRPO on TRL)",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what")
    g.add_argument("--model", required=True, help="checkpoint directory to train (usually from m1 sft)")
    g.add_argument("--task", default="arith", help="arith[:opts], gsm8k, TASK[:opts] or FILE.jsonl (default arith)")
    g.add_argument("--out", required=True, help="output checkpoint directory (must not exist unless --force)")
    g.add_argument("--limit", type=int, default=None, help="use at most this many problems (arith: default 1000)")
    g.add_argument("--few-shot", type=int, default=0, help="solved examples before each problem (default 0)")
    g = p.add_argument_group("GRPO")
    g.add_argument("--num-generations", type=int, default=8, help="completions per problem, the group (default 8)")
    g.add_argument("--prompts-per-step", type=int, default=4,
                   help="problems per optimizer step over all processes (default 4)")
    g.add_argument("--loss-type", choices=["grpo", "dr_grpo", "dapo"], default="grpo",
                   help="grpo (per-sequence mean, M1), dr_grpo (constant normaliser), dapo (token mean); default grpo")
    g.add_argument("--beta", type=float, default=0.0, help="KL coefficient; 0 = no KL term and no reference model (M1)")
    g.add_argument("--entropy-coef", type=float, default=1e-3,
                   help="entropy bonus: loss - coef x mean token entropy (default 1e-3; 0 = off)")
    g.add_argument("--epsilon", type=float, default=0.2, help="PPO clip range (default 0.2)")
    g.add_argument("--epsilon-high", type=_opt_float, default=None, help="upper clip (DAPO: 0.28; default = epsilon)")
    g.add_argument("--num-iterations", type=int, default=1, help="updates per generated batch (default 1)")
    g.add_argument("--scale-rewards", choices=["group", "batch", "none"], default="group",
                   help="divide advantages by the group / batch reward std, or not (Dr. GRPO); default group")
    g.add_argument("--format-reward", type=float, default=0.0,
                   help="weight of a reward for a finished completion with a closed \\boxed{} (default 0 = off)")
    g.add_argument("--mask-truncated", action="store_true",
                   help="leave completions that hit --max-completion-length out of the loss (DAPO)")
    g.add_argument("--reward-timeout", type=float, default=5.0, help="seconds per answer check (default 5)")
    g = p.add_argument_group("sampling")
    g.add_argument("--max-completion-length", type=int, default=512, help="new tokens per completion (default 512)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1 = off)")
    g.add_argument("--top-k", type=int, default=0, help="top-k sampling (default 0 = off)")
    g.add_argument("--rollout", choices=["auto", "vllm", "hf", "engine"], default="auto",
                   help="auto = vllm on a CUDA machine with vllm installed, else hf (transformers generate); "
                        "engine = m1's batched sampler")
    g.add_argument("--vllm-mode", choices=["colocate", "server"], default="colocate",
                   help="vllm in the training process (default) or a `trl vllm-serve` server")
    g.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.3,
                   help="GPU memory fraction for colocated vLLM (default 0.3)")
    g = p.add_argument_group("budget and optimizer")
    g.add_argument("--max-steps", type=int, default=200, help="optimizer steps (default 200; <= 0: use --epochs)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the problems when --max-steps <= 0")
    g.add_argument("--micro-batch-size", type=int, default=None,
                   help="completions per forward per process; the rest is accumulation (default: the largest "
                        "divisor of the completions per process <= 4 on CPU, <= 8 on CUDA)")
    g.add_argument("--lr", type=float, default=1e-6, help="learning rate (default 1e-6)")
    g.add_argument("--lr-scheduler", default="constant", help="transformers scheduler name (default constant)")
    g.add_argument("--warmup-ratio", type=float, default=0.0, help="warm-up fraction of the steps (default 0)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (default 1)")
    g.add_argument("--seed", type=int, default=0, help="seed for sampling, data order and arith problems (default 0)")
    g = p.add_argument_group("hardware")
    g.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bf16 mixed precision: auto = on a CUDA GPU that supports it, else float32 (default auto)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (saves GPU memory)")
    g.add_argument("--mamba-chunk-size", type=int, default=None,
                   help="Mamba2 scan chunk while training (default: 64 on CPU, the model's own on GPU)")
    g = p.add_argument_group("run")
    g.add_argument("--save-steps", type=int, default=50, help="steps between checkpoints (default 50)")
    g.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept (at least 2; default 2)")
    g.add_argument("--logging-steps", type=int, default=1, help="steps between progress/metrics rows (default 1)")
    g.add_argument("--resume", action="store_true", help="continue the unfinished run in OUT.work/")
    g.add_argument("--force", action="store_true", help="replace OUT, and discard an unfinished run in OUT.work/")
    g.add_argument("--keep-checkpoints", action="store_true", help="keep OUT.work/ (checkpoints, metrics) at the end")
    p.set_defaults(func=run)


def run(a) -> None:
    from ..grpo import grpo

    res = grpo(a.model, a.task, a.out, resume=a.resume, force=a.force, keep_checkpoints=a.keep_checkpoints,
               log=lambda m: print(m, file=sys.stderr, flush=True),
               limit=a.limit, few_shot=a.few_shot, num_generations=a.num_generations,
               prompts_per_step=a.prompts_per_step, loss_type=a.loss_type, beta=a.beta, entropy_coef=a.entropy_coef,
               epsilon=a.epsilon, epsilon_high=a.epsilon_high, num_iterations=a.num_iterations,
               scale_rewards=a.scale_rewards, format_reward=a.format_reward, mask_truncated=a.mask_truncated,
               reward_timeout=a.reward_timeout, max_completion_length=a.max_completion_length,
               temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, rollout=a.rollout, vllm_mode=a.vllm_mode,
               vllm_gpu_memory_utilization=a.vllm_gpu_memory_utilization, max_steps=a.max_steps, epochs=a.epochs,
               micro_batch_size=a.micro_batch_size, learning_rate=a.lr, lr_scheduler=a.lr_scheduler,
               warmup_ratio=a.warmup_ratio, weight_decay=a.weight_decay, max_grad_norm=a.max_grad_norm, seed=a.seed,
               bf16=a.bf16, gradient_checkpointing=a.gradient_checkpointing, mamba_chunk_size=a.mamba_chunk_size,
               save_steps=a.save_steps, save_total_limit=a.save_total_limit, logging_steps=a.logging_steps)
    last = next((m for m in reversed(res.metrics) if "reward" in m), {})
    s = res.stats
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch only the main process reports
        return
    print(f"grpo: {res.steps} steps, {res.seconds:.0f} s; last reward {last.get('reward', float('nan')):.3f}, "
          f"accuracy {last.get('accuracy', float('nan')):.3f}; {s['truncated_total']} of {s['completions_total']} "
          f"completions truncated, {s['reward_failures_total']} reward failures -> {res.out}")
