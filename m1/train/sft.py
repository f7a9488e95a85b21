r"""``m1 sft``: supervised fine-tuning on step-by-step math solutions (M1, stage 2), on TRL's SFTTrainer.

What is trained
---------------
Each example is one chat: the user turn is the problem with m1's instruction ("Please reason step by
step, and put your final answer within \boxed{}." -- :func:`m1.tasks.prompts.build_messages`, the
same prompt ``m1 eval`` and ``m1 grpo`` use) and the assistant turn is a worked solution that ends
in ``\boxed{answer}``. The dataset is in TRL's *conversational prompt/completion* format
(``{"prompt": [user turn], "completion": [assistant turn]}``), so TRL renders both with the model's
chat template and sets ``labels = -100`` on every prompt token: the loss is on completion tokens
only (the assistant's answer and its end-of-turn token), see :func:`collate_preview`.

Data (``--data``)
-----------------
* ``gsm8k-train``: the 7,473 GSM8K train problems; the solutions have their ``<<48/2=24>>``
  calculator annotations removed and the final ``#### N`` turned into ``The answer is \boxed{N}.``
* ``arith`` or ``arith:steps=2,digits=1``: procedural arithmetic word problems (train split;
  ``--limit`` problems, default 2,000; ``--seed`` picks them).
* any other ``m1.tasks`` name with a train split (``gsm8k:split=train`` is the same as gsm8k-train).
* ``FILE.jsonl``: one JSON object per line, either ``{"question" (or "problem"), "solution"}``
  (optionally with ``"answer"``: appended as ``\boxed{answer}`` when the solution has no box), a
  raw GSM8K row ``{"question", "answer": "... #### 72"}``, or ``{"messages": [..., {"role":
  "assistant", ...}]}`` (the last assistant turn is the completion). A row without a usable
  solution is an error naming ``FILE:LINE``.
Examples longer than ``--max-length`` tokens are dropped (and counted), never truncated: a cut
solution would teach the model not to finish.

Training is never packed and never padding-free: packing would carry a Mamba layer's state from one
sample into the next (transformers raises on CPU rather than honouring ``seq_idx``), so every
sample is its own right-padded row.

Files (the same layout as ``m1 distill``)
-----------------------------------------
The training state lives in ``<out>.work/``: ``checkpoints/checkpoint-N/`` (TRL/transformers
checkpoints: model, optimizer, scheduler, RNG, trainer state) and ``metrics.jsonl`` (one JSON row
per logging step). A checkpoint counts only once ``sft_config.json`` -- the run's settings -- has
been written into it as its last file, so a checkpoint cut short by a kill is ignored on
``--resume`` (and deleted). ``--resume`` refuses a run whose saved settings differ from the current
ones (nothing is touched). At the end ``<out>`` is written atomically as a normal m1 checkpoint
(config, safetensors, tokenizer, generation config, ``m1.json`` with ``stage: sft`` and the
settings, plus ``sft_config.json`` and ``sft_metrics.jsonl``), and the work directory is removed
(``keep_checkpoints=True`` keeps it).

The run machinery it shares with :mod:`m1.train.grpo` (work directory, resume checks, checkpoint marker,
metrics callback, final save, precision) is :mod:`m1.train.run`.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..errors import M1Error
from ..model.checkpoint import check_model_dir
from ..settings import setting
from .data import SFTExample, load_sft_examples
from .run import (CHECKPOINTS, METRICS_FILE, barrier, base_dtype, check_max_steps, finalize, lineage_record,
                  load_policy, make_divergence_guard, make_metrics_callback, mamba_mixer_param_ids, model_fingerprint,
                  on_cuda, open_work_dir, prepare_run, quiet_trainer, quiet_transformers, read_metrics,
                  resolve_precision, run_state, set_mamba_chunk_size, train_guarded, with_checkpoint_marker,
                  with_mamba_lr, work_dir)

SFT_CONFIG_FILE = "sft_config.json"


# =================================================================================================
# SFT data in TRL's format (the examples are m1.train.data.load_sft_examples, shared with distillation)
# =================================================================================================
def to_dataset(examples: list[SFTExample]):
    """A ``datasets.Dataset`` in TRL's conversational prompt/completion format."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": e.prompt, "completion": [{"role": "assistant", "content": e.solution}],
                               "where": e.where} for e in examples])


def example_lengths(examples: list[SFTExample], tokenizer) -> list[int]:
    """Tokens of each rendered prompt+completion (what the trainer will see)."""
    return [len(tokenizer.apply_chat_template(e.prompt + [{"role": "assistant", "content": e.solution}],
                                              tokenize=True, return_dict=True)["input_ids"]) for e in examples]


# =================================================================================================
# SFT
# =================================================================================================
@dataclass
class SFTSettings:
    """Every setting of an SFT run; saved as ``sft_config.json`` in each checkpoint and in the output.
    The `m1 sft` flags are generated from these fields (m1.settings)."""
    model: str = setting(help="checkpoint directory to fine-tune (from m1 convert / distill / ...)", group="what")
    data: str = setting("arith", "gsm8k-train, arith[:steps=S,digits=D], TASK[:split=train] or FILE.jsonl",
                        group="what")
    limit: int | None = setting(None, "use at most this many examples (arith: how many to generate, default 2000)",
                                group="what")
    epochs: float = setting(1.0, "passes over the data", group="budget and batches")
    max_steps: int = setting(-1, "stop after this many optimizer steps (overrides --epochs; -1: use --epochs)",
                             group="budget and batches")
    batch_size: int = setting(8, "examples per device per step", group="budget and batches")
    grad_accum: int = setting(1, "gradient accumulation steps", group="budget and batches")
    max_length: int = setting(1024, "examples longer than this many tokens are dropped, not cut",
                              group="budget and batches")
    learning_rate: float = setting(2e-5, "peak learning rate", flag="--lr", group="optimizer")
    mamba_lr: float | None = setting(None, "peak learning rate of the Mamba mixers; the MLPs, attention and "
                                           "embeddings keep --lr (default: --lr for all)", group="optimizer")
    lr_scheduler: str = setting("cosine", "transformers scheduler name", group="optimizer")
    warmup_ratio: float = setting(0.03, "warm-up fraction of the steps", group="optimizer")
    weight_decay: float = setting(0.0, "AdamW weight decay", group="optimizer")
    max_grad_norm: float = setting(1.0, "gradient clipping", group="optimizer")
    seed: int = setting(0, "seed for data order, arith problems, init", group="optimizer")
    bf16: str = setting("auto", "bf16 mixed precision: auto = on a CUDA GPU that supports it, else float32; "
                        "on = also on a CPU with AVX512-BF16/AMX", choices=("auto", "on", "off"), group="hardware")
    gradient_checkpointing: bool = setting(False, "recompute activations (saves memory)", group="hardware")
    mamba_chunk_size: int | None = setting(None, "Mamba2 scan chunk while training (default: 64 on CPU -- 2-3x "
                                           "faster there -- the model's own on GPU); the saved config is unchanged",
                                           group="hardware")
    save_steps: int = setting(200, "steps between checkpoints", group="run")
    save_total_limit: int = setting(2, "checkpoints kept (at least 2)", group="run")
    logging_steps: int = setting(10, "steps between progress/metrics rows", group="run")

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum", "max_length", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise M1Error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise M1Error(f"--limit must be >= 1, got {self.limit}")
        if self.learning_rate <= 0 or not math.isfinite(self.learning_rate):
            raise M1Error(f"--lr must be > 0, got {self.learning_rate}")
        if self.mamba_lr is not None and (self.mamba_lr <= 0 or not math.isfinite(self.mamba_lr)):
            raise M1Error(f"--mamba-lr must be > 0, got {self.mamba_lr}")
        check_max_steps(self.max_steps)
        if self.max_steps <= 0 and self.epochs <= 0:
            raise M1Error("give a training budget: --epochs > 0 or --max-steps N")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise M1Error(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.save_total_limit < 1:
            raise M1Error(f"--save-total-limit must be >= 1, got {self.save_total_limit}")


# settings that may change between a run and its --resume (they do not change the numbers)
SFT_RESUME_NEUTRAL = ("save_steps", "save_total_limit", "logging_steps", "mamba_chunk_size")


@dataclass
class SFTResult:
    out: Path
    steps: int
    examples: int
    dropped: int
    train_loss: float | None
    seconds: float
    metrics: list[dict] = field(default_factory=list)


SFT_COLUMNS = [("loss", "loss"), ("mean_token_accuracy", "tok_acc"), ("entropy", "entropy"),
               ("learning_rate", "lr"), ("grad_norm", "grad")]


def sft(cfg: SFTSettings, out: str | Path, *, resume: bool = False, force: bool = False,
        keep_checkpoints: bool = False, log: Callable[[str], None] = print, callbacks: list | None = None
        ) -> SFTResult:
    """Fine-tune ``cfg.model`` on ``cfg.data`` and write the result to ``out``; see the module docstring.

    ``callbacks``: extra ``transformers.TrainerCallback`` objects (tests use one to stop a run part-way,
    as a kill would). Every user-facing problem raises :class:`M1Error`, before anything is loaded.
    """
    cfg = replace(cfg, model=str(cfg.model), data=str(cfg.data))  # paths welcome; the record is JSON
    cfg.validate()
    out = Path(out)
    base = check_model_dir(cfg.model)
    settings = {**asdict(cfg), "model_fingerprint": model_fingerprint(base)}
    ckpt = prepare_run(out, settings, stage="sft", marker=SFT_CONFIG_FILE, neutral=SFT_RESUME_NEUTRAL,
                       resume=resume, force=force)
    barrier()  # every process has checked the directories before the main one writes anything
    undo = quiet_transformers()
    try:
        return _sft(cfg, settings, base, out, ckpt, force, keep_checkpoints, log, callbacks or [])
    finally:
        undo()


def build_sft_trainer(cfg: SFTSettings, settings: dict, model, tokenizer, dataset, work: Path,
                      callbacks: list, log=print):
    """The TRL ``SFTTrainer`` of an m1 run (prompt/completion data, completion-only loss, unpacked)."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(work / CHECKPOINTS),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a fraction of the steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=resolve_precision(cfg.bf16),
        fp16=False,
        activation_checkpointing=cfg.gradient_checkpointing,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=max(2, cfg.save_total_limit),  # the previous complete checkpoint survives a kill
        report_to="none",
        disable_tqdm=True,
        # the M1 recipe on our data: chat prompt -> solution, loss on the solution only, never packed
        completion_only_loss=True,
        assistant_only_loss=False,
        packing=False,
        padding_free=False,
        max_length=cfg.max_length,
        dataset_num_proc=None,
        dataloader_num_workers=0,
        dataloader_pin_memory=on_cuda(),
        use_cpu=not on_cuda(),
        router_aux_loss_coef=0.0,  # GraniteMoeHybrid has the attribute but no experts: keep TRL's aux loss off
        save_only_model=False,
    )
    if cfg.mamba_lr is not None and not mamba_mixer_param_ids(model):
        raise M1Error("--mamba-lr: the model has no Mamba layers")
    trainer_cls = SFTTrainer if cfg.mamba_lr is None else with_mamba_lr(SFTTrainer, cfg.mamba_lr)
    trainer_cls = with_checkpoint_marker(trainer_cls, SFT_CONFIG_FILE,
                                         lambda tr: {"stage": "sft", "settings": settings})
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          callbacks=callbacks)
    return quiet_trainer(trainer)


def collate_preview(trainer, n: int = 2) -> dict:
    """The first collated training batch of ``trainer`` (input_ids, attention_mask, labels) -- for tests."""
    batch = [trainer.train_dataset[i] for i in range(min(n, len(trainer.train_dataset)))]
    return trainer.data_collator(batch)


def _sft(cfg, settings, base, out, ckpt, force, keep_checkpoints, log, callbacks) -> SFTResult:
    state = run_state()
    main = state.is_main_process
    say = log if main else (lambda *a, **k: None)
    work = work_dir(out)
    # ---- data and model (nothing written yet)
    examples = load_sft_examples(cfg.data, cfg.limit, cfg.seed)
    model, tokenizer = load_policy(base, say)
    set_mamba_chunk_size(model, cfg.mamba_chunk_size)
    lengths = example_lengths(examples, tokenizer)
    kept = [e for e, n in zip(examples, lengths) if n <= cfg.max_length]
    dropped = len(examples) - len(kept)
    if not kept:
        raise M1Error(f"every example is longer than --max-length {cfg.max_length} tokens "
                      f"(shortest: {min(lengths)}): raise --max-length")
    if dropped:
        say(f"dropped {dropped} of {len(examples)} examples longer than --max-length {cfg.max_length} tokens")
    n_tokens = sum(n for n in lengths if n <= cfg.max_length)
    say(f"sft {base} on {cfg.data}: {len(kept):,} examples ({n_tokens:,} tokens), batch {cfg.batch_size} x "
        f"{cfg.grad_accum} accumulation x {state.num_processes} process(es), lr {cfg.learning_rate:g}")

    # ---- the work directory
    if main:
        open_work_dir(work, ckpt, SFT_CONFIG_FILE, {"stage": "sft", "settings": settings}, say)
    state.wait_for_everyone()

    metrics_cb = make_metrics_callback(work / METRICS_FILE, say, SFT_COLUMNS)
    guard = make_divergence_guard()
    trainer = build_sft_trainer(cfg, settings, model, tokenizer, to_dataset(kept), work,
                                [metrics_cb, guard, *callbacks], say)
    t0 = time.perf_counter()
    result = train_guarded(trainer, guard, work, SFT_CONFIG_FILE, ckpt)
    seconds = time.perf_counter() - t0
    rows = read_metrics(work / METRICS_FILE)
    section = {"settings": settings, "data": {"spec": cfg.data, "examples": len(kept), "dropped_too_long": dropped,
                                              "tokens": n_tokens},
               "steps": trainer.state.global_step, "train_loss": result.training_loss,
               "seconds": round(seconds, 1), "processes": state.num_processes,
               "last_log": next((r for r in reversed(rows) if "loss" in r), None)}
    record = lineage_record(base, "sft", section)
    finalize(trainer, out, tokenizer=tokenizer, record=record, force=force, save_dtype=base_dtype(base),
             extra_files={SFT_CONFIG_FILE: work / SFT_CONFIG_FILE, "sft_metrics.jsonl": work / METRICS_FILE},
             log=say)
    if main and not keep_checkpoints:
        shutil.rmtree(work, ignore_errors=True)
    return SFTResult(out=out, steps=trainer.state.global_step, examples=len(kept), dropped=dropped,
                     train_loss=result.training_loss, seconds=seconds, metrics=rows)
