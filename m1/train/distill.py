"""``m1 distill``: layerwise alignment, then end-to-end distillation from the teacher (M1, stage 1).

Two stages, run one after the other on the same student checkpoint (``stage="both"``):

``align``  Every Mamba layer ``i`` of the student is fed the teacher's input to its attention at
           layer ``i`` (the teacher's normalised hidden state, captured with forward hooks) and its
           mixer ``model.layers[i].mamba`` is trained to reproduce that attention's output (MSE,
           :func:`m1.train.losses.hidden_mse`, summed over layers). Only mixer parameters train, and the
           layers train independently of each other: no error compounds through the depth.
``kd``     End-to-end distillation on the next-token distributions: ``reverse_kl`` (default, as in
           M1), ``forward_kl`` or ``jsd`` with ``beta``, at ``temperature``, plus optionally
           ``ce_weight`` times the usual next-token cross-entropy. ``trainable="all"`` trains every
           parameter, ``"mamba"`` only the Mamba mixers.

The recipe (:func:`_distill`) is named parts, as torchtune's recipes are: ``_check`` (every cheap
check, before loading), ``_setup`` (accelerator, models, data, stage plan), ``_start`` (resume or the
held-out report), ``_train_stage`` per stage (``_optimizer``: AdamW, linear warm-up then cosine decay per
stage; each step: ``_global_batch``, ``_accumulate_gradients`` over micro-batches with ``_align_loss`` or
``_kd_loss``, clipping), ``_save_checkpoint`` and ``_finish``. It runs in one process by default and
unchanged under ``accelerate launch`` (DDP): the global batch (``batch_size`` rows per optimizer
step) is fixed, each process takes its share of micro-batches, and every loss is a sum over
tokens divided by the token count of the *whole global batch*, so accumulation steps and processes
add up to exactly the gradient of one big batch.

Files. Training state lives in ``<out>.work/`` beside the output, in the layout ``m1 sft`` and
``m1 grpo`` use (:mod:`m1.train.run`): ``checkpoints/checkpoint-<step>/`` (the latest atomic
checkpoint: model, tokenizer, optimizer, scheduler, RNG, ``state.json`` with the data position = the
step, and ``distill_config.json`` = {stage, settings}, which marks it complete), ``metrics.jsonl``
(one row per step) and ``report_before.json``. A checkpoint is written to a temporary directory and
renamed into place every ``checkpoint_every`` steps and at the end of each stage. ``resume=True``
continues a killed run from it; a run made with different settings is refused (nothing is
overwritten). A NaN/inf loss or gradient stops the run with an error and leaves the last good
checkpoint alone.
At the end ``<out>`` is written atomically as a normal m1 checkpoint (the files ``m1 convert``
writes, with ``m1.json`` saying ``stage: distill`` and recording the settings and the held-out
report) and the work directory is removed (``keep_checkpoints=True``, ``--keep-checkpoints``, keeps it).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import M1Error
from ..model.checkpoint import (M1_RECORD, atomic_dir, check_fits_context, check_model_dir, context_length,
                                mamba_layer_mask, read_record, write_json_atomic)
from ..settings import setting
from .onpolicy import Rollouts, loss_span, span_mask
from .run import (METRICS_FILE, diverged_error, first_nonfinite, mamba_mixer_param_ids, truncate_metrics,
                  weights_finite, work_dir)

STAGE_NAMES = ("align", "kd", "onpolicy")  # run in the order given: --stage align,kd,onpolicy
STAGES = STAGE_NAMES + ("both",)  # both = align,kd
TRAINABLE = ("all", "mamba")
LOSS_ON = ("all", "completion")
CONFIG_FILE = "distill_config.json"
# settings that may change between a run and its --resume (they do not change the numbers)
RESUME_NEUTRAL = ("checkpoint_every", "gradient_checkpointing")  # change how, not what, a run computes


@dataclass
class DistillConfig:
    """Every setting of a distillation run; saved as ``distill_config.json`` beside each checkpoint.
    The `m1 distill` flags are generated from these fields (m1.settings)."""
    # what
    student: str = setting(help="hybrid checkpoint directory (from `m1 convert`)", group="what")
    out: str = setting(help="output checkpoint directory (must not exist unless --force)", group="what")
    teacher: str | None = setting(None, "teacher: smollm2-135m, an HF or m1 directory (e.g. the teacher after `m1 sft`) "
                                  "or a .gguf (default: the one in the student's m1.json)", group="what")
    data: str = setting("gsm8k-train", "a training task (gsm8k-train, arith:steps=2,digits=1, ...) or .jsonl file(s) "
                        "with text/messages rows, comma-separated", group="what")
    stage: str = setting("both", "align | kd | onpolicy | both (= align,kd), or a comma-separated order", group="what")
    # loss
    loss: str = setting("reverse_kl", "kd/onpolicy loss: reverse_kl = KL(student||teacher) (M1), forward_kl = "
                        "KL(teacher||student), jsd = generalised Jensen-Shannon with --beta",
                        choices=("reverse_kl", "forward_kl", "jsd"), group="loss")
    beta: float = setting(0.5, "jsd: weight of the teacher in the mixture", group="loss")
    temperature: float = setting(1.0, "softmax temperature of both models", group="loss")
    ce_weight: float = setting(0.0, "add this times the next-token cross-entropy on the data", group="loss")
    trainable: str = setting("all", "kd/onpolicy: train every parameter, or only the Mamba mixers",
                             choices=TRAINABLE, group="loss")
    loss_on: str = setting("all", "kd: loss on every token, or only on the completion tokens of task rows "
                           "(prompt tokens carry no loss)", choices=LOSS_ON, group="loss")
    # onpolicy
    onpolicy_steps: int | None = setting(None, "onpolicy stage steps (default: --steps)", group="onpolicy")
    lmbda: float = setting(1.0, "share of onpolicy steps on the student's own samples; the rest train on the data's "
                           "reference completions (GKD's lambda)", flag="--lambda", group="onpolicy")
    num_samples: int = setting(1, "samples per prompt, prefilled once; each step samples batch-size / num-samples "
                               "prompts", group="onpolicy")
    max_new_tokens: int = setting(128, "most tokens per sampled completion", group="onpolicy")
    gen_temperature: float = setting(1.0, "sampling temperature of the rollouts", group="onpolicy")
    # budget and batches
    steps: int | None = setting(None, "optimizer steps per stage", group="budget and batches")
    max_tokens: int | None = setting(None, "training tokens per stage (non-padding); with --steps, whichever ends "
                                     "first", group="budget and batches")
    align_steps: int | None = setting(None, "align stage steps (default: --steps)", group="budget and batches")
    align_max_tokens: int | None = setting(None, "align stage tokens (default: --max-tokens)",
                                           group="budget and batches")
    seq_len: int = setting(512, "truncate samples to this many tokens (never packed)", group="budget and batches")
    batch_size: int = setting(8, "rows per optimizer step over all processes", group="budget and batches")
    micro_batch_size: int | None = setting(None, "rows per forward pass per process; the rest is gradient "
                                           "accumulation (default: the largest divisor of batch size / processes "
                                           "<= 4 on CPU, <= 8 on CUDA)", group="budget and batches")
    # optimizer
    lr: float = setting(1e-4, "kd/onpolicy peak learning rate", group="optimizer")
    # SmolLM2: align loss 117 after 6 steps at 3e-3 vs 241 at 1e-3
    align_lr: float = setting(3e-3, "align peak learning rate", group="optimizer")
    mamba_lr: float | None = setting(None, "kd/onpolicy peak learning rate of the Mamba mixers (default: --lr)",
                                     group="optimizer")
    weight_decay: float = setting(0.0, "AdamW weight decay", group="optimizer")
    warmup: float = setting(0.05, "warm-up fraction of each stage's steps", group="optimizer")
    min_lr_ratio: float = setting(0.1, "cosine floor as a fraction of the peak", group="optimizer")
    grad_clip: float = setting(1.0, "max global gradient norm, 0 = off", group="optimizer")
    seed: int = setting(0, "data order and held-out split", group="optimizer")
    # run
    heldout: int = setting(64, "rows held out of training for the before/after report", group="run")
    eval_batch_size: int = setting(8, "batch size of the held-out report", group="run")
    checkpoint_every: int = setting(50, "steps between checkpoints", group="run")
    bf16: str = setting("auto", "bf16 autocast for the training forwards: auto = on a CUDA GPU that supports it, "
                        "else float32; on = also on a CPU with AVX512-BF16/AMX (~2x faster there)",
                        choices=("auto", "on", "off"), group="run")
    gradient_checkpointing: bool = setting(False, "recompute activations during backward: much less memory "
                                           "(SmolLM2 hybrid, 8 x 256 tokens: peak RSS 12.8 -> 5.8 GB), ~10-20% "
                                           "more compute", group="run")

    def stages(self) -> list[str]:
        """The stages to run, in order."""
        names = [n.strip() for n in str(self.stage).split(",") if n.strip()]
        return ["align", "kd"] if names == ["both"] else names

    def validate(self) -> None:
        names = self.stages()
        if not names or any(n not in STAGE_NAMES for n in names) or len(set(names)) != len(names):
            raise M1Error(f"--stage must be one of {', '.join(STAGES)} or a comma-separated order of "
                          f"{', '.join(STAGE_NAMES)} (each once), got '{self.stage}'")
        if self.loss_on not in LOSS_ON:
            raise M1Error(f"--loss-on must be one of {', '.join(LOSS_ON)}, got '{self.loss_on}'")
        if not 0.0 <= self.lmbda <= 1.0:
            raise M1Error(f"--lambda is the share of on-policy steps, in [0, 1], got {self.lmbda}")
        if self.num_samples < 1 or self.max_new_tokens < 1:
            raise M1Error("--num-samples and --max-new-tokens must be >= 1")
        if self.batch_size % self.num_samples:
            raise M1Error(f"--batch-size {self.batch_size} must be a multiple of --num-samples {self.num_samples} "
                          "(each step samples batch-size / num-samples prompts)")
        if self.gen_temperature <= 0:
            raise M1Error(f"--gen-temperature must be > 0 (the student samples its own completions), got "
                          f"{self.gen_temperature}")
        if self.mamba_lr is not None and self.mamba_lr <= 0:
            raise M1Error(f"--mamba-lr must be > 0, got {self.mamba_lr}")
        if "onpolicy" in names and self.onpolicy_steps is None and self.steps is None:
            raise M1Error("--stage onpolicy needs a step budget: --steps N or --onpolicy-steps N (its rollouts' "
                          "lengths are not known up front, so --max-tokens cannot size it)")
        from .losses import LOSSES

        if self.loss not in LOSSES:
            raise M1Error(f"--loss must be one of {', '.join(LOSSES)}, got '{self.loss}'")
        if self.trainable not in TRAINABLE:
            raise M1Error(f"--trainable must be one of {', '.join(TRAINABLE)}, got '{self.trainable}'")
        if self.loss == "jsd" and not 0.0 < self.beta < 1.0:
            raise M1Error(f"--beta must be strictly between 0 and 1 for jsd, got {self.beta}")
        if self.temperature <= 0:
            raise M1Error(f"--temperature must be > 0, got {self.temperature}")
        if self.ce_weight < 0:
            raise M1Error(f"--ce-weight must be >= 0, got {self.ce_weight}")
        for name in ("steps", "max_tokens", "align_steps", "align_max_tokens", "onpolicy_steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise M1Error(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if self.steps is None and self.max_tokens is None and "kd" in names:
            raise M1Error("give a training budget: --steps N and/or --max-tokens N")
        if "align" in names and all(v is None for v in (self.steps, self.max_tokens, self.align_steps,
                                                         self.align_max_tokens)):
            raise M1Error("give a training budget: --steps N and/or --max-tokens N")
        for name in ("batch_size", "seq_len", "checkpoint_every", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise M1Error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise M1Error(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}")
        if self.lr <= 0 or self.align_lr <= 0:
            raise M1Error("--lr and --align-lr must be > 0")
        if not 0.0 <= self.warmup < 1.0:
            raise M1Error(f"--warmup is a fraction of the steps in [0, 1), got {self.warmup}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise M1Error(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not self.out:
            raise M1Error("--out is required")
        if str(self.bf16).lower() not in ("auto", "on", "off", "true", "false", "1", "0", "yes", "no"):
            raise M1Error(f"--bf16 must be auto, on or off, got '{self.bf16}'")


@dataclass
class Stage:
    name: str  # align | kd
    start: int  # first global step (= data batch index) of the stage
    end: int  # one past its last step
    lr: float

    @property
    def steps(self) -> int:
        return self.end - self.start


@dataclass
class DistillResult:
    out: Path
    before: dict  # held-out report of the student as it came in
    after: dict  # ... and as it goes out
    steps: int
    tokens: int
    seconds: float


# ------------------------------------------------------------------------------ small pieces
def lr_lambda(stage_steps: int, warmup: float, min_ratio: float):
    """Multiplier of the peak lr at stage step k: linear warm-up, then cosine down to ``min_ratio``."""
    w = int(round(warmup * stage_steps))

    def f(k: int) -> float:
        if k < w:
            return (k + 1) / w
        progress = min(1.0, (k - w) / max(1, stage_steps - w))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def mamba_layers(model) -> list[int]:
    """Indices of the Mamba layers of an in-memory model (from its config, as every m1 reader decides)."""
    return [i for i, m in enumerate(mamba_layer_mask(model.config)) if m]


def _steps_for_budget(plan, lengths, start: int, steps, max_tokens) -> int:
    """Number of steps from ``start`` until ``steps`` or ``max_tokens`` (trained tokens) is reached."""
    if max_tokens is None:
        return steps
    n, seen = 0, 0
    while seen < max_tokens and (steps is None or n < steps):
        seen += sum(lengths[r] for r in plan.rows(start + n))
        n += 1
    return n


def _rng_state() -> dict:
    import numpy as np
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    # plain tensors and numbers only, so the checkpoint loads with torch.load(weights_only=True)
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}


def _set_rng_state(s: dict) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def _load_student(directory, dtype):
    from ..model.checkpoint import read_pretrained

    return read_pretrained(directory, dtype, what="student")


def check_compatible(student, teacher, s_tok, t_tok, need_layers: bool) -> None:
    """Teacher and student must share the vocabulary (and, for align, the layer structure)."""
    sv, tv = student.config.vocab_size, teacher.config.vocab_size
    if sv != tv:
        raise M1Error(f"vocabulary mismatch: the student has {sv} tokens and the teacher {tv}; distill from the "
                      "teacher the student was converted from (or one with the same tokenizer)")
    if s_tok.get_vocab() != t_tok.get_vocab():
        raise M1Error("vocabulary mismatch: the student's and the teacher's tokenizers map tokens to different ids; "
                      "distill from the teacher the student was converted from")
    if need_layers:
        sc, tc = student.config, teacher.config
        if (sc.num_hidden_layers, sc.hidden_size) != (tc.num_hidden_layers, tc.hidden_size):
            raise M1Error(f"--stage align needs the teacher's layer structure: student has {sc.num_hidden_layers} layers "
                          f"of width {sc.hidden_size}, teacher {tc.num_hidden_layers} of width {tc.hidden_size}")


# ------------------------------------------------------------------------------ align pieces
def _mixer_stack(mixers, recompute: bool = False):
    import torch.nn as nn
    from torch.utils.checkpoint import checkpoint

    class _MixerStack(nn.Module):
        """The student's Mamba mixers as one module, so DDP can wrap exactly the trainable part.
        ``recompute``: keep only each mixer's input for backward and run the mixer again there."""

        def __init__(self, mixers):
            super().__init__()
            self.mixers = nn.ModuleList(mixers)

        def forward(self, inputs, attention_mask=None):
            if recompute and self.training:
                return [checkpoint(m, x, attention_mask=attention_mask, use_reentrant=False)
                        for m, x in zip(self.mixers, inputs)]
            return [m(hidden_states=x, attention_mask=attention_mask) for m, x in zip(self.mixers, inputs)]

    return _MixerStack(mixers)


def teacher_attention_io(teacher, ids, mask, layers: list[int]):
    """[(input, output)] of the teacher's attention at ``layers`` for one batch (hooks, no grad)."""
    import torch

    captured, handles = {}, []
    for i in layers:
        def hook(module, args, kwargs, out, i=i):
            x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            captured[i] = (x.detach(), out[0].detach())
        handles.append(teacher.model.layers[i].self_attn.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            teacher(input_ids=ids, attention_mask=mask, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    return [captured[i] for i in layers]


# ------------------------------------------------------------------------------ kd pieces
PLAIN_HEAD_TYPES = ("llama", "qwen2", "granitemoehybrid")  # logits = lm_head(final hidden) [/ logits_scaling]


@contextlib.contextmanager
def hidden_out(*models):
    """Inside, ``model(...).logits`` is the final (normed) hidden state instead of the logits: the
    output heads are the identity (an instance attribute; weights and state dict untouched). Granite's
    ``logits_scaling`` still divides it, which :func:`head_of` accounts for. The kd loss then applies
    the head chunk by chunk (:func:`m1.train.losses.chunked_head_loss`) instead of materialising the
    (tokens, vocab) logits of both models."""
    for m in models:
        mt = getattr(m.config, "model_type", None)
        if mt not in PLAIN_HEAD_TYPES:
            raise M1Error(f"distill: architecture '{mt}' is not supported here (its logits may be more than "
                          f"lm_head(hidden)); supported: {', '.join(PLAIN_HEAD_TYPES)}")
    heads = [m.get_output_embeddings() for m in models]
    for h in heads:
        h.forward = lambda x: x
    try:
        yield
    finally:
        for h in heads:
            del h.forward


def head_of(model):
    """(weight (V, d), bias (V,) or None) such that logits = F.linear(hidden_out output, weight, bias)."""
    head = model.get_output_embeddings()
    scale = float(getattr(model.config, "logits_scaling", 1.0) or 1.0) \
        if model.config.model_type == "granitemoehybrid" else 1.0
    bias = None if head.bias is None else head.bias / scale  # the hidden state came out divided by scale
    return head.weight, bias


def kd_micro_loss(cfg, student, teacher, s_hidden, t_hidden, ids, mask, kd_norm: float, ce_norm: float,
                  chunk: int | None = None, loss_mask=None):
    """The kd (and onpolicy) stage's loss on one micro-batch, from both models' ``hidden_out`` outputs (b, t, d):

        sum over loss positions of kd(student || teacher) / kd_norm  [+ ce_weight * sum of next-token CE / ce_norm]

    Loss positions: every real token, or where ``loss_mask`` (b, t) is 1 (the positions that predict a
    completion token: prompt and padding carry no loss).

    computed through :func:`m1.train.losses.chunked_head_loss`, so no (tokens, vocab) tensor outlives its
    chunk (measured on SmolLM2 8 x 256: see docs/distill.md). Returns (loss, kl_sum, ce_sum), the last
    two summed, not normalised and not differentiable: KL(teacher || student) at T = 1 over the real
    tokens (what is reported whichever loss trains) and the summed cross-entropy (0 without --ce-weight).
    """
    import torch
    import torch.nn.functional as F

    from .losses import chunked_head_loss, forward_kl_per_token, kd_per_token

    real = mask.bool()
    next_real = torch.zeros_like(real)
    next_real[:, :-1] = real[:, 1:]  # positions that predict a real token (cross-entropy)
    if loss_mask is not None:
        next_real &= loss_mask.bool()  # completion-only: the cross-entropy too
    use_ce = cfg.ce_weight > 0
    kd_pos = real if loss_mask is None else (loss_mask.bool() & real)
    rows = (real | next_real) if use_ce else kd_pos  # the head runs only where a loss is taken
    hs, ht = s_hidden[rows], t_hidden[rows].detach()  # (N, d)
    w_kd = kd_pos[rows].float()
    w_ce = next_real[rows].float()
    labels = torch.zeros_like(ids)
    labels[:, :-1] = ids[:, 1:]
    labels = labels[rows]
    f = torch.float64 if s_hidden.dtype == torch.float64 else torch.float32  # the dtype of the chunks' logits
    tw, tb = head_of(teacher)
    tw, tb = tw.detach().to(f), None if tb is None else tb.detach().to(f)

    def token_loss(z, sl):  # z: (c, V) student logits of rows sl, float32
        with torch.no_grad():
            t = F.linear(ht[sl].to(f), tw, tb)
            kl = (forward_kl_per_token(z, t) * w_kd[sl]).sum()
        loss = (kd_per_token(cfg.loss, z, t, cfg.temperature, cfg.beta) * w_kd[sl]).sum() / kd_norm
        ce = z.new_zeros(())
        if use_ce:
            ce = (F.cross_entropy(z, labels[sl], reduction="none") * w_ce[sl]).sum()
            loss = loss + cfg.ce_weight * ce / ce_norm
        return loss, torch.stack([kl, ce.detach()])

    sw, sb = head_of(student)
    loss, parts = chunked_head_loss(hs, sw, sb, token_loss, chunk)
    return loss, parts[0], parts[1]


def _mamba_mask(mask):
    """What GraniteMoeHybrid passes its mixers: the 2-D padding mask, or None when nothing is padded."""
    return None if bool((mask == 1).all()) else mask


def layer_mse(student, teacher, batches, layers: list[int] | None = None) -> list[float]:
    """Per-layer token-mean MSE between each student mixer and the teacher attention it replaces."""
    import torch

    from .losses import hidden_mse_per_token

    layers = mamba_layers(student) if layers is None else layers
    sums, count = [0.0] * len(layers), 0
    for ids, mask in batches:
        io = teacher_attention_io(teacher, ids, mask, layers)
        with torch.no_grad():
            for k, (i, (x, y)) in enumerate(zip(layers, io)):
                out = student.model.layers[i].mamba(hidden_states=x, attention_mask=_mamba_mask(mask))
                sums[k] += (hidden_mse_per_token(out, y) * mask).double().sum().item()
        count += int(mask.sum().item())
    return [s / max(count, 1) for s in sums]


# ------------------------------------------------------------------------------ reports
def _report(acc, student, teacher, tokenizer, data, cfg, align_layers) -> dict:
    """Held-out KL / perplexities (texts sharded over processes), plus per-layer MSE if aligning."""
    import torch

    from .data import collate
    from .heldout import HeldoutReport, completion_reports

    rank, world = acc.process_index, acc.num_processes
    student.eval()
    plens = data.heldout_prompt_lens or [0] * len(data.heldout_ids)  # 0: a text row, no completion
    ids, plens = data.heldout_ids[rank::world], plens[rank::world]
    # every predicted position, and for task rows the KL where the answer is written (the reference
    # completion) and on its digit tokens: both from one forward of each model
    part = completion_reports({"s": student}, teacher, tokenizer, ids, plens, cfg.eval_batch_size,
                              all_tokens=True)["s"] if ids else {}
    whole = part.get("all", HeldoutReport(0.0, 0.0, 0.0, 0))
    vec = torch.tensor([whole.kl * whole.tokens, whole.student_nll * whole.tokens, whole.teacher_nll * whole.tokens,
                        whole.tokens], dtype=torch.float64, device=acc.device)
    vec = acc.reduce(vec, reduction="sum")
    n = max(vec[3].item(), 1.0)
    rep = HeldoutReport(kl=vec[0].item() / n, student_nll=vec[1].item() / n, teacher_nll=vec[2].item() / n,
                        tokens=int(vec[3].item())).as_dict()
    rep["texts"] = len(data.heldout_texts)
    if any(n > 0 for n in data.heldout_prompt_lens):
        vec = torch.tensor([part.get("kl", 0.0) * part.get("tokens", 0), part.get("tokens", 0),
                            part.get("kl_digits", 0.0) * part.get("digit_tokens", 0), part.get("digit_tokens", 0)],
                           dtype=torch.float64, device=acc.device)
        vec = acc.reduce(vec, reduction="sum")
        rep.update(kl_completion=vec[0].item() / max(vec[1].item(), 1.0), completion_tokens=int(vec[1].item()),
                   kl_digits=vec[2].item() / max(vec[3].item(), 1.0), digit_tokens=int(vec[3].item()))
    if align_layers:
        ids_list = data.heldout_ids[rank::world]
        pad = tokenizer.pad_token_id or 0
        batches = [tuple(t.to(acc.device) for t in collate(ids_list[i:i + cfg.eval_batch_size], pad))
                   for i in range(0, len(ids_list), cfg.eval_batch_size)]
        mse = layer_mse(student, teacher, batches, align_layers)
        count = sum(int(m.sum()) for _, m in batches)
        vec = torch.tensor([x * count for x in mse] + [count], dtype=torch.float64, device=acc.device)
        vec = acc.reduce(vec, reduction="sum")
        n = max(vec[-1].item(), 1.0)
        rep["layer_mse"] = {str(i): vec[k].item() / n for k, i in enumerate(align_layers)}
    return rep


def format_report(before: dict, after: dict | None = None) -> str:
    rows = [("KL(teacher||student)", "kl", "{:.4f}"), ("student perplexity", "student_ppl", "{:.3f}"),
            ("teacher perplexity", "teacher_ppl", "{:.3f}")]
    head = f"held-out: {before.get('texts', '?')} texts, {before.get('tokens', 0):,} predicted tokens"
    lines = [head, f"{'':24}{'before':>12}" + (f"{'after':>12}" if after else "")]
    for label, key, fmt in rows:
        line = f"{label:24}{fmt.format(before[key]):>12}"
        if after:
            line += f"{fmt.format(after[key]):>12}"
        lines.append(line)
    for label, key in (("KL on completions", "kl_completion"), ("KL on digit tokens", "kl_digits")):
        if key in before:
            lines.append(f"{label:24}{before[key]:>12.4f}" + (f"{after[key]:>12.4f}" if after and key in after else ""))
    if "layer_mse" in before:
        b = before["layer_mse"]
        a = (after or {}).get("layer_mse", {})
        mean_b = sum(b.values()) / max(len(b), 1)
        line = f"{'mean layer MSE':24}{mean_b:>12.4g}"
        if a:
            line += f"{sum(a.values()) / max(len(a), 1):>12.4g}"
        lines.append(line)
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the run
def distill(cfg: DistillConfig, resume: bool = False, force: bool = False, log=print, progress: bool = True,
            on_step=None, keep_checkpoints: bool = False) -> DistillResult:
    """Run the configured stages and write ``cfg.out``; see the module docstring. ``keep_checkpoints``
    leaves the work directory (checkpoints, metrics) in place at the end.

    ``on_step(step, metrics, student)`` is called after every optimizer step and checkpoint (tests use
    it to stop a run part-way, as a kill would). Every user-facing problem raises :class:`m1.errors.M1Error`.
    """
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" at every checkpoint would break our bar
    try:
        return _distill(cfg, resume, force, log, progress, on_step, keep_checkpoints)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _distill(cfg, resume, force, log, progress, on_step, keep_checkpoints) -> DistillResult:
    """The recipe, top to bottom: check -> setup -> (resume or report) -> train each stage -> save."""
    checked = _check(cfg, resume, force)
    run = _setup(cfg, checked, resume, log)
    cursor, before = _start(run, checked.ckpt, resume)
    for stage in run.stages:
        if cursor.step < stage.end:
            _train_stage(run, stage, cursor, checked.ckpt if resume else None, progress, on_step)
    return _finish(run, cursor, before, force, keep_checkpoints)


# ------------------------------------------------------------------------------ the run, in parts
@dataclass
class _Checked:
    """What is known before anything is loaded: every cheap check has passed."""
    student_dir: Path
    ckpt: Path | None  # the checkpoint to resume from
    teacher_spec: str
    rows: list  # the data's rows, read (bad data fails here)
    context: int | None  # the student's context length (onpolicy only)


@dataclass
class _Run:
    """What setup builds once and every stage uses."""
    cfg: DistillConfig
    acc: object  # accelerate.Accelerator
    say: object  # log on the main process, nothing elsewhere
    autocast: object  # () -> context manager for the forwards
    bf16: bool
    micro: int  # rows per forward per process
    student: object
    tokenizer: object
    t_model: object
    teacher_spec: str
    teacher_path: str
    student_dir: Path
    layers: list  # the student's Mamba layers
    data: object  # m1.train.data.DistillData
    plan: object  # m1.train.data.BatchPlan
    rollouts: Rollouts | None
    stages: list
    work: Path
    out: Path

    @property
    def main(self) -> bool:
        return self.acc.is_main_process

    @property
    def align_layers(self) -> list:
        return self.layers if "align" in self.cfg.stages() else []


@dataclass
class _Cursor:
    """Where the run is: global step (= data batch index), trained tokens, wall clock origin."""
    step: int
    tokens: int
    t_start: float


def _check(cfg: DistillConfig, resume: bool, force: bool) -> _Checked:
    """Settings, directories, teacher name and data: every check before anything is loaded or written
    (the directory checks are the ones `m1 sft` and `m1 grpo` make: :func:`m1.train.run.prepare_run`)."""
    from .data import read_rows
    from .run import prepare_run

    cfg.validate()
    student_dir = check_model_dir(cfg.student)
    ckpt = prepare_run(Path(cfg.out), asdict(cfg), stage="distill", marker=CONFIG_FILE, neutral=RESUME_NEUTRAL,
                       resume=resume, force=force)
    teacher_spec = cfg.teacher or read_record(student_dir).get("teacher")
    if not teacher_spec:
        raise M1Error(f"{student_dir}/m1.json names no teacher: pass --teacher")
    rows = read_rows(cfg.data, cfg.seed)  # bad data (a task without a train split, bad rows) fails before loading
    context = None
    if "onpolicy" in cfg.stages():
        if not any(r.prompt is not None for r in rows):
            raise M1Error(f"--stage onpolicy samples from task prompts, and --data {cfg.data} has none: give a "
                          "training task (arith:..., gsm8k-train, ...)")
        context = check_fits_context(student_dir, cfg.max_new_tokens, "--max-new-tokens")
    return _Checked(student_dir, ckpt, teacher_spec, rows, context)


def _setup(cfg: DistillConfig, checked: _Checked, resume: bool, log) -> _Run:
    """Accelerator and precision, teacher and student, data, and the stage plan."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    from ..model.teachers import KD_TEACHER_ARCHS, load_teacher
    from .data import BatchPlan, load_data
    from .run import default_micro_batch, resolve_precision, set_mamba_chunk_size

    # `accelerate launch --multi_gpu` / torchrun on a machine without CUDA: DDP over CPU processes (gloo)
    cpu_ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # a TRL trainer run earlier in this process (m1 demo's sft with --bf16 on, a notebook) leaves its
    # mixed-precision setting in accelerate's process-wide state, which would silently autocast our
    # forwards; precision here is ours alone (--bf16), so start from a clean state
    AcceleratorState._reset_state()
    acc = Accelerator(cpu=cpu_ddp, mixed_precision="no")
    # float32 weights, optimizer and losses; only the forwards' matmuls run in bf16 (reports stay float32)
    bf16 = resolve_precision(cfg.bf16)
    autocast = (lambda: torch.autocast(acc.device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    say = log if acc.is_main_process else (lambda *a, **k: None)
    world = acc.num_processes
    micro = cfg.micro_batch_size or default_micro_batch(max(1, cfg.batch_size // world), acc.device.type == "cuda")
    if cfg.batch_size % (micro * world):
        raise M1Error(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch-size {micro} x "
                      f"{world} process(es)")
    set_seed(cfg.seed)
    work = work_dir(cfg.out)
    if acc.is_main_process and work.exists() and not resume:
        shutil.rmtree(work)  # --force: start over
    acc.wait_for_everyone()

    teacher = load_teacher(checked.teacher_spec, archs=KD_TEACHER_ARCHS)
    t_model = teacher.model.to(acc.device).eval()
    for p in t_model.parameters():
        p.requires_grad_(False)
    student, tokenizer = _load_student(checked.ckpt if resume else checked.student_dir, torch.float32)
    student.to(acc.device)
    set_mamba_chunk_size(student, None)  # CPU: chunk 64, far less memory and time in the torch scan
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    stages_wanted = cfg.stages()
    layers = mamba_layers(student) if hasattr(student, "model") and hasattr(student.model, "layers") else []
    if "align" in stages_wanted and not layers:
        raise M1Error("the student has no Mamba layers, so there is nothing to align: use --stage kd")
    if cfg.trainable == "mamba" and set(stages_wanted) & {"kd", "onpolicy"} and not layers:
        raise M1Error("--trainable mamba: the student has no Mamba layers")
    check_compatible(student, t_model, tokenizer, teacher.tokenizer, need_layers="align" in stages_wanted)
    data = load_data(cfg.data, tokenizer, cfg.seq_len, cfg.heldout, cfg.seed, rows=checked.rows)
    if (cfg.loss_on == "completion" and "kd" in stages_wanted) or "onpolicy" in stages_wanted:
        # a task row cut off inside its prompt has no completion token to train on (a batch of only
        # such rows would divide by zero) and no whole prompt for the onpolicy stage to sample from
        cut = sum(1 for r, n in zip(data.train, data.prompt_lens) if n > 0 and len(r) <= n)
        if cut:
            raise M1Error(f"--seq-len {cfg.seq_len} cuts {cut} of {sum(n > 0 for n in data.prompt_lens)} task rows "
                          "off inside their prompt, leaving no completion token to train on: raise --seq-len")
    plan = BatchPlan(len(data.train), cfg.batch_size, cfg.seed)
    rollouts = None
    if "onpolicy" in stages_wanted:
        rollouts = Rollouts(student, tokenizer, data, cfg, contexts=(checked.context, context_length(t_model.config)))
    stages = _plan_stages(cfg, plan, [len(r) for r in data.train])
    run = _Run(cfg, acc, say, autocast, bf16, micro, student, tokenizer, t_model, checked.teacher_spec, teacher.path,
               checked.student_dir, layers, data, plan, rollouts, stages, work, Path(cfg.out))
    say(f"teacher {teacher.path}; student {checked.student_dir}: {len(layers)} mamba layers of "
        f"{student.config.num_hidden_layers}")
    say(f"data {cfg.data}: {len(data.train):,} training rows ({data.train_tokens:,} tokens), "
        f"{len(data.heldout_texts)} held out; global batch {cfg.batch_size} = {micro} rows x "
        f"{cfg.batch_size // (micro * world)} accumulation x {world} process(es)")
    say("plan: " + ", ".join(f"{s.name} {s.steps} steps (lr {s.lr:g})" for s in stages))
    return run


def _plan_stages(cfg: DistillConfig, plan, lengths: list[int]) -> list[Stage]:
    """Each stage's global step range: steps, or as many steps as its token budget takes."""
    stages, start = [], 0
    for name in cfg.stages():
        if name == "align" and (cfg.align_steps is not None or cfg.align_max_tokens is not None):
            n = _steps_for_budget(plan, lengths, start, cfg.align_steps, cfg.align_max_tokens)
        elif name == "onpolicy":
            n = cfg.onpolicy_steps or cfg.steps
        else:
            n = _steps_for_budget(plan, lengths, start, cfg.steps, cfg.max_tokens)
        stages.append(Stage(name, start, start + n, cfg.align_lr if name == "align" else cfg.lr))
        start += n
    return stages


def _start(run: _Run, ckpt: Path | None, resume: bool) -> tuple[_Cursor, dict]:
    """Where training starts: a resumed run's step, tokens, clock and RNG, or step 0 after the
    held-out report of the student as it came in."""
    import torch

    if resume:
        state = json.loads((ckpt / "state.json").read_text())
        _set_rng_state(torch.load(ckpt / "rng.pt", weights_only=True))
        run.say(f"resuming at step {state['step']} of {run.stages[-1].end} from {ckpt}")
        before = json.loads((run.work / "report_before.json").read_text())
        if run.main:  # drop metrics logged after the checkpoint by the killed run
            truncate_metrics(run.work / METRICS_FILE, state["step"])
        cursor = _Cursor(state["step"], state["tokens"], time.perf_counter() - state["elapsed"])
    else:
        before = _report(run.acc, run.student, run.t_model, run.tokenizer, run.data, run.cfg, run.align_layers)
        if run.main:
            run.work.mkdir(parents=True, exist_ok=True)
            write_json_atomic(run.work / "report_before.json", before)
        run.say(format_report(before))
        cursor = _Cursor(0, 0, time.perf_counter())
    run.acc.wait_for_everyone()
    return cursor, before


def _trainable(run: _Run, stage: Stage):
    """(module to train, its parameters, optimizer param groups) of a stage; everything else frozen."""
    student, cfg, layers = run.student, run.cfg, run.layers
    for p in student.parameters():
        p.requires_grad_(False)
    if stage.name == "align":
        trainable = _mixer_stack([student.model.layers[i].mamba for i in layers], cfg.gradient_checkpointing)
    elif cfg.trainable == "mamba":
        trainable = _mixer_stack([student.model.layers[i].mamba for i in layers])
    else:
        trainable = student
    for p in trainable.parameters():
        p.requires_grad_(True)
    params = [p for p in trainable.parameters() if p.requires_grad]
    groups = [{"params": params, "lr": stage.lr}]
    if stage.name != "align" and cfg.mamba_lr is not None and layers:
        mixer_ids = mamba_mixer_param_ids(student)
        groups = [{"params": [p for p in params if id(p) not in mixer_ids], "lr": stage.lr},
                  {"params": [p for p in params if id(p) in mixer_ids], "lr": cfg.mamba_lr}]
    return trainable, params, groups


def _global_batch(run: _Run, stage: Stage, step: int):
    """The rows of step ``step``, each row's loss span [lo, hi), and metrics of how they were made."""
    cfg, data = run.cfg, run.data
    if stage.name == "onpolicy" and run.rollouts.on_policy(step):
        seqs, spans, extra = run.rollouts.sample(step)
        run.student.train()
        return seqs, spans, extra
    rows = run.plan.rows(step)
    # onpolicy's data steps train on the reference completions, as GKD's off-policy share does
    # (align always matches every token's mixer output)
    on_completion = stage.name == "onpolicy" or (cfg.loss_on == "completion" and stage.name == "kd")
    spans = [loss_span(len(data.train[r]), data.prompt_lens[r] if on_completion else 0) for r in rows]
    return [data.train[r] for r in rows], spans, ({"onpolicy": False} if stage.name == "onpolicy" else {})


def _align_loss(run: _Run, model, ids, mask, n_tok: int, sums):
    """Align: each Mamba mixer on the teacher's input to that layer vs the teacher attention's output."""
    from .losses import hidden_mse

    world = run.acc.num_processes
    with run.autocast():
        io = teacher_attention_io(run.t_model, ids, mask, run.layers)
        outs = model([x for x, _ in io], attention_mask=_mamba_mask(mask))
    per_layer = [hidden_mse(o, y, mask, normalizer=n_tok / world) for o, (_, y) in zip(outs, io)]
    for k, v in enumerate(per_layer):
        sums[3 + k] += v.detach().double() / world
    return sum(per_layer)


def _kd_loss(run: _Run, model, ids, mask, lmask, n_tok: int, n_ce: int, sums):
    """kd / onpolicy: the configured divergence on the loss spans (+ ce_weight x cross-entropy)."""
    import torch

    world = run.acc.num_processes
    with run.autocast(), hidden_out(run.student, run.t_model):
        with torch.no_grad():
            t_hidden = run.t_model(input_ids=ids, attention_mask=mask).logits
        s_hidden = model(input_ids=ids, attention_mask=mask).logits
    loss, kl_sum, ce_sum = kd_micro_loss(run.cfg, run.student, run.t_model, s_hidden, t_hidden, ids, mask,
                                         kd_norm=n_tok / world, ce_norm=n_ce / world, loss_mask=lmask)
    sums[1] += kl_sum.double() / n_tok
    sums[2] += ce_sum.double() / n_ce
    return loss


def _train_stage(run: _Run, stage: Stage, cursor: _Cursor, ckpt: Path | None, progress: bool, on_step) -> None:
    """One stage's optimizer steps, from ``cursor.step`` to ``stage.end``; advances ``cursor``.

    Every loss is a sum over tokens divided by the token count of the whole global batch, so that
    accumulation and DDP's gradient average add up to the gradient of one big batch."""
    import torch

    cfg, acc, student = run.cfg, run.acc, run.student
    trainable, params, groups = _trainable(run, stage)
    model = acc.prepare_model(trainable if stage.name == "align" else student)
    optimizer, scheduler = _optimizer(run, stage, groups, ckpt if cursor.step > stage.start else None)
    if cfg.gradient_checkpointing and stage.name != "align":
        # transformers' per-decoder-layer recompute; non-reentrant: the embeddings' output needs no grad
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    bar = None
    if progress and run.main:
        from tqdm.auto import tqdm
        bar = tqdm(total=stage.steps, initial=cursor.step - stage.start, desc=stage.name, unit="step",
                   dynamic_ncols=True)

    def stop_nonfinite(what, value):
        if bar is not None:
            bar.close()
        _stop_nonfinite(run, stage, cursor.step + 1, what, value)

    while cursor.step < stage.end:
        t0 = time.perf_counter()
        # NaN/inf weights: the engine would refuse to sample, before any loss could show the NaN
        if stage.name == "onpolicy" and run.rollouts.on_policy(cursor.step) and not weights_finite(student):
            stop_nonfinite("student's weights", "non-finite")
        seqs, spans, extra = _global_batch(run, stage, cursor.step)
        n_tok = sum(hi - lo for lo, hi in spans)  # loss positions of the global batch
        sums = _accumulate_gradients(run, stage, model, seqs, spans, n_tok)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        loss_value, grad_value = sums[0].item(), float(grad_norm)
        bad = first_nonfinite(loss=loss_value, grad_norm=grad_value)
        if bad is not None:
            stop_nonfinite(*bad)
        lr_now = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        cursor.step += 1
        cursor.tokens += n_tok
        m = {"step": cursor.step, "stage": stage.name, "loss": loss_value, "lr": lr_now, "grad_norm": grad_value,
             "tokens": cursor.tokens, "step_tokens": n_tok, "tokens_per_s": n_tok / (time.perf_counter() - t0),
             "epoch": run.plan.epoch(cursor.step), "elapsed": time.perf_counter() - cursor.t_start, **extra}
        _record(run, stage, m, sums, bar)
        if cursor.step % cfg.checkpoint_every == 0 or cursor.step == stage.end:
            _save_checkpoint(run, stage, optimizer, scheduler, cursor)
        if on_step is not None:
            on_step(cursor.step, m, student)
    if bar is not None:
        bar.close()
    student.eval()
    if student.is_activation_checkpointing:
        student.activation_checkpointing_disable()


def _optimizer(run: _Run, stage: Stage, groups, ckpt: Path | None):
    """The stage's AdamW and warmup-cosine schedule; from ``ckpt`` if it was saved mid-way through this stage
    (a checkpoint at a stage boundary holds the previous stage's optimizer, which this one does not continue)."""
    import torch

    cfg = run.cfg
    optimizer = torch.optim.AdamW(groups, lr=stage.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(stage.steps, cfg.warmup, cfg.min_lr_ratio))
    if ckpt is not None and json.loads((ckpt / "state.json").read_text()).get("optimizer_stage") == stage.name:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    return optimizer, scheduler


def _accumulate_gradients(run: _Run, stage: Stage, model, seqs: list, spans: list, n_tok: int):
    """Backward of one global batch, in this process's micro-batches; returns the summed metrics (loss, kl, ce,
    per-layer mse), reduced over processes."""
    import torch

    from .data import collate, micro_batches

    acc = run.acc
    world = acc.num_processes
    blen = [len(x) for x in seqs]
    # positions with a next token (cross-entropy), inside the loss spans
    n_ce = max(1, sum(max(0, min(hi, n - 1) - lo) for (lo, hi), n in zip(spans, blen)))
    # this process's share; each micro-loss is (sum over its tokens) / (global count / world)
    # so that DDP's gradient *average* over processes is the global token mean
    share = micro_batches(list(range(len(seqs))), blen, run.micro, world, acc.process_index)
    sums = torch.zeros(3 + len(run.layers), dtype=torch.float64, device=acc.device)  # loss, kl, ce, mse...
    for a, chunk in enumerate(share):
        ids, mask = (t.to(acc.device) for t in collate([seqs[r] for r in chunk], run.tokenizer.pad_token_id))
        lmask = span_mask([spans[r] for r in chunk], ids.shape[1]).to(acc.device)
        with contextlib.nullcontext() if a == len(share) - 1 else acc.no_sync(model):
            if stage.name == "align":
                loss = _align_loss(run, model, ids, mask, n_tok, sums)
            else:
                loss = _kd_loss(run, model, ids, mask, lmask, n_tok, n_ce, sums)
            sums[0] += loss.detach().double() / world
            acc.backward(loss)
    return acc.reduce(sums, reduction="sum")


def _stop_nonfinite(run: _Run, stage: Stage, step: int, what: str, value) -> None:
    """A NaN/inf at ``step``: stop before the optimizer step; the last good checkpoint is left alone."""
    from .run import find_checkpoints

    last, _ = find_checkpoints(run.work, CONFIG_FILE)
    kept = (last, json.loads((last / "state.json").read_text())["step"]) if last else None
    raise diverged_error(what, value, step, kept, run.work, where=stage.name,
                         lr_flag="--align-lr" if stage.name == "align" else "--lr")


def _record(run: _Run, stage: Stage, m: dict, sums, bar) -> None:
    """One step's metrics: a row of metrics.jsonl (main process) and the progress bar."""
    if stage.name != "align":
        m["kl"] = sums[1].item()
        if run.cfg.ce_weight > 0:
            m["ce"] = sums[2].item()
    else:
        m["layer_mse"] = [sums[3 + k].item() for k in range(len(run.layers))]
    if run.main:
        with open(run.work / METRICS_FILE, "a") as f:
            f.write(json.dumps(m) + "\n")
    post = {"loss": f"{m['loss']:.4f}", **({"kl": f"{m['kl']:.4f}"} if "kl" in m else {}),
            "tok/s": f"{m['tokens_per_s']:.0f}"}
    if bar is not None:
        bar.set_postfix(post, refresh=False)
        bar.update(1)
    elif (m["step"] - stage.start) % max(1, stage.steps // 10) == 0 or m["step"] == stage.end:
        # without a bar (--no-progress, logs to a file) a line every tenth of the stage
        run.say(f"{stage.name} step {m['step'] - stage.start}/{stage.steps}: " +
                ", ".join(f"{k} {v}" for k, v in post.items()) + f", {m['elapsed']:.0f}s")


def _save_checkpoint(run: _Run, stage: Stage, optimizer, scheduler, cursor: _Cursor) -> None:
    """``work/checkpoints/checkpoint-<step>/``, written atomically, the layout `m1 sft` and `m1 grpo`
    use; ``distill_config.json`` ({stage, settings}) marks it complete. Older ones are removed after."""
    import torch

    from .run import CHECKPOINTS

    if run.main:
        root = run.work / CHECKPOINTS
        with atomic_dir(root / f"checkpoint-{cursor.step}", force=True) as tmp:
            run.student.save_pretrained(tmp)
            run.tokenizer.save_pretrained(tmp)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            write_json_atomic(tmp / "state.json", {"step": cursor.step, "stage": stage.name, "tokens": cursor.tokens,
                                                   "elapsed": time.perf_counter() - cursor.t_start,
                                                   "optimizer_stage": stage.name})
            write_json_atomic(tmp / CONFIG_FILE, {"stage": "distill", "settings": asdict(run.cfg)})
        for old in root.glob("checkpoint-*"):
            if old.name != f"checkpoint-{cursor.step}":
                shutil.rmtree(old, ignore_errors=True)
    run.acc.wait_for_everyone()


def _finish(run: _Run, cursor: _Cursor, before: dict, force: bool, keep_checkpoints: bool) -> DistillResult:
    """The held-out report after training, then ``out`` as a normal m1 checkpoint (atomically) with the
    run's lineage, settings, report and metrics; the work directory goes unless ``keep_checkpoints``."""
    from .run import lineage_record

    cfg = run.cfg
    after = _report(run.acc, run.student, run.t_model, run.tokenizer, run.data, cfg, run.align_layers)
    run.say(format_report(before, after))
    seconds = time.perf_counter() - cursor.t_start
    if run.main:
        rec = lineage_record(run.student_dir, "distill", {
            "student": str(run.student_dir), "teacher": run.teacher_spec, "teacher_path": run.teacher_path,
            "settings": asdict(cfg), "stages": [asdict(s) for s in run.stages], "steps": cursor.step,
            "tokens": cursor.tokens, "seconds": round(seconds, 1), "processes": run.acc.num_processes,
            "precision": "bf16 autocast" if run.bf16 else "float32", "report": {"before": before, "after": after}})
        rec["dtype"] = "float32"
        if rec.get("teacher") in (None, "?"):  # the model it was converted from; a plain HF student has none
            rec["teacher"] = run.teacher_spec
        with atomic_dir(run.out, force=force) as tmp:
            run.student.save_pretrained(tmp)
            run.tokenizer.save_pretrained(tmp)
            write_json_atomic(tmp / M1_RECORD, rec)
            write_json_atomic(tmp / CONFIG_FILE, asdict(cfg))
            write_json_atomic(tmp / "distill_report.json", {"before": before, "after": after})
            if (run.work / METRICS_FILE).exists():
                shutil.copyfile(run.work / METRICS_FILE, tmp / "distill_metrics.jsonl")
        if not keep_checkpoints:
            shutil.rmtree(run.work, ignore_errors=True)
        run.say(f"wrote {run.out}")
    run.acc.wait_for_everyone()
    return DistillResult(out=run.out, before=before, after=after, steps=cursor.step, tokens=cursor.tokens,
                         seconds=seconds)
