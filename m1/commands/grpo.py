"""``m1 grpo``: argument parsing only; the work is :func:`m1.train.grpo.grpo`."""

from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = """\
RL with verifiable math rewards (M1 stage 3): GRPO on TRL's GRPOTrainer.

Every step samples --num-generations completions (the group, default 8) for each of
--prompts-per-step problems, rewards each completion 1 if its final \\boxed{} answer is right
(checked by m1.eval.grading, exactly as `m1 eval` scores) and optionally --format-reward for a finished,
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


def register(subparsers) -> None:
    p = subparsers.add_parser("grpo", help="RL with verifiable math rewards (GRPO on TRL)",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    from ..settings import add_arguments
    from . import add_run_flags
    from ..train.grpo import GRPOSettings

    add_run_flags(add_arguments(p, GRPOSettings))
    p.set_defaults(func=run)


def run(a) -> None:
    from ..settings import from_args
    from ..train.grpo import GRPOSettings, grpo

    res = grpo(from_args(GRPOSettings, a), a.out, resume=a.resume, force=a.force,
               keep_checkpoints=a.keep_checkpoints, log=lambda m: print(m, file=sys.stderr, flush=True))
    last = next((m for m in reversed(res.metrics) if "reward" in m), {})
    s = res.stats
    if os.environ.get("RANK", "0") != "0":  # under accelerate launch only the main process reports
        return
    print(f"grpo: {res.steps} steps, {res.seconds:.0f} s; last reward {last.get('reward', float('nan')):.3f}, "
          f"accuracy {last.get('accuracy', float('nan')):.3f}; {s['truncated_total']} of {s['completions_total']} "
          f"completions truncated, {s['reward_failures_total']} reward failures -> {res.out}")
