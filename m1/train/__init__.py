"""Training: the three stages that turn a converted hybrid into a reasoning model, and what they share.

- ``distill.py``: layerwise alignment, then end-to-end distillation from the teacher (``m1 distill``)
- ``onpolicy.py``: the on-policy stage's batches: the student's own samples, drawn with m1's engine
- ``sft.py``: supervised fine-tuning on step-by-step math solutions, on TRL's SFTTrainer (``m1 sft``)
- ``grpo.py``: RL with verifiable math rewards, on TRL's GRPOTrainer (``m1 grpo``)
- ``run.py``: the run machinery the stages share: work dir, resume checks, checkpoints, divergence guard, precision
- ``losses.py``: distillation losses as small named functions (forward/reverse KL, JSD, hidden-state MSE)
- ``data.py``: training data: m1 sft's prompt + solution examples, distillation's rows, tokenized, batched without packing
- ``heldout.py``: held-out NLL / perplexity and KL(teacher||student) reports
"""
