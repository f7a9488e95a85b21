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

This module also holds the run machinery that :mod:`m1.grpo` shares (work directory, resume checks,
checkpoint marker, metrics callback, final save).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .checkpoint import M1_RECORD, atomic_dir, check_model_dir, read_record, write_json_atomic
from .errors import M1Error

CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.jsonl"
SFT_CONFIG_FILE = "sft_config.json"
GSM8K_TRAIN = "gsm8k-train"
DEFAULT_ARITH_EXAMPLES = 2000


# =================================================================================================
# Run machinery shared by m1.sft and m1.grpo
# =================================================================================================
def work_dir(out: str | Path) -> Path:
    """``<out>.work``: where checkpoints and metrics of an unfinished run live (beside ``out``)."""
    out = Path(out)
    return out.parent / f"{out.name}.work"


def model_fingerprint(directory: str | Path) -> dict:
    """A cheap identity of a checkpoint directory: its config, weight file sizes and m1.json date.

    Stored with a run's settings so that ``--resume`` notices when ``--model`` now points at a
    different checkpoint than the one the run started from.
    """
    import hashlib

    d = Path(directory)
    h = hashlib.sha256()
    cfg = d / "config.json"
    if cfg.is_file():
        h.update(cfg.read_bytes())
    for p in sorted(d.glob("*.safetensors")) + sorted(d.glob("*.bin")):
        h.update(f"{p.name}:{p.stat().st_size}".encode())
    rec = read_record(d)
    h.update(str(rec.get("created", "")).encode())
    return {"path": str(d.resolve()), "sha256": h.hexdigest()[:16]}


def config_diff(saved: dict, now: dict, neutral: tuple[str, ...] = ()) -> list[str]:
    """Human-readable differences between two settings dicts, ignoring ``neutral`` keys."""
    keys = sorted((set(saved) | set(now)) - set(neutral))
    return [f"{k}: {saved.get(k)!r} (saved) != {now.get(k)!r} (now)" for k in keys if saved.get(k) != now.get(k)]


def _step_of(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def find_checkpoints(work: Path, marker: str) -> tuple[Path | None, list[Path]]:
    """(latest complete checkpoint, incomplete checkpoint dirs) under ``work/checkpoints``."""
    root = work / CHECKPOINTS
    if not root.is_dir():
        return None, []
    dirs = sorted((p for p in root.glob("checkpoint-*") if p.is_dir() and _step_of(p) >= 0), key=_step_of)
    complete = [p for p in dirs if (p / marker).is_file()]
    incomplete = [p for p in dirs if not (p / marker).is_file()]
    return (complete[-1] if complete else None), incomplete


def prepare_run(out: Path, settings: dict, *, stage: str, marker: str, neutral: tuple[str, ...],
                resume: bool, force: bool) -> Path | None:
    """Check the output and work directories before anything is loaded or written.

    Returns the checkpoint to resume from (None: start fresh). Raises :class:`M1Error` -- having
    changed nothing -- when ``out`` exists without ``force``, when an unfinished run is in the way,
    or when ``resume`` finds nothing to resume or a run made with different settings.
    """
    work = work_dir(out)
    if resume and force:
        raise M1Error("--resume and --force contradict each other: --resume continues the run in "
                      f"{work}, --force discards it")
    if out.exists() and not force:
        raise M1Error(f"output directory {out} already exists: pass --force to replace it, or choose another --out")
    ckpt, _ = find_checkpoints(work, marker) if work.exists() else (None, [])
    if resume:
        if ckpt is None:
            raise M1Error(f"nothing to resume: no complete checkpoint in {work / CHECKPOINTS} "
                          "(start without --resume)")
        try:
            saved = json.loads((ckpt / marker).read_text())
        except ValueError as e:
            raise M1Error(f"{ckpt / marker} is not valid JSON ({e}); the checkpoint is damaged") from None
        if saved.get("stage") != stage:
            raise M1Error(f"--resume: {ckpt} is a checkpoint of an `m1 {saved.get('stage')}` run, not `m1 {stage}`")
        diff = config_diff(saved.get("settings", {}), settings, neutral)
        if diff:
            raise M1Error(f"--resume: the run in {work} was started with different settings ({'; '.join(diff)}); "
                          "rerun with the original settings, or drop --resume and pass --force to start over "
                          "(nothing was changed)")
        return ckpt
    if work.exists() and not force:
        if ckpt is not None:
            raise M1Error(f"{work} holds a checkpoint of an unfinished run ({ckpt.name}): pass --resume to continue "
                          "it, or --force to start over")
        raise M1Error(f"{work} exists (left by an unfinished run): pass --force to start over")
    return None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows logged after ``step`` (by a killed run that is being resumed)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a row cut short by the kill
        if row.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.4g}"
    return str(v)


def make_metrics_callback(path: Path, progress: Callable[[str], None] | None, columns: list[tuple[str, str]],
                          stats: Callable[[], dict] | None = None):
    """A ``TrainerCallback`` appending every log row to ``path`` (JSONL) and printing a progress line.

    ``columns``: (log key, label) pairs shown in the progress line when present. ``stats``: a
    function whose dict is merged into every row (e.g. running counts of failed rewards).
    """
    from transformers import TrainerCallback

    class MetricsJSONL(TrainerCallback):
        def __init__(self):
            self.t0 = time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            row = {"step": state.global_step, "epoch": state.epoch, "elapsed": round(time.time() - self.t0, 2)}
            row.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str, bool)) or v is None})
            if stats is not None:
                row.update(stats())
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
                f.flush()
            if progress is not None and "train_runtime" not in logs:
                parts = [f"step {state.global_step}/{state.max_steps}"]
                parts += [f"{label} {_fmt(logs[k])}" for k, label in columns if logs.get(k) is not None]
                progress("  ".join(parts))

    return MetricsJSONL()


def with_checkpoint_marker(trainer_cls, marker: str, payload: Callable[[Any], dict]):
    """Subclass ``trainer_cls`` so each checkpoint gets ``marker`` (JSON) written as its last file.

    transformers writes ``checkpoint-N`` in place, file by file; the marker -- the run's stage and
    settings -- is what makes a checkpoint count. Written by the main process after every process
    finished saving.
    """

    class Marked(trainer_cls):
        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

                ckpt = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
                write_json_atomic(ckpt / marker, {**payload(self), "step": self.state.global_step})

    Marked.__name__ = f"M1{trainer_cls.__name__}"
    return Marked


def lineage_record(base_dir: Path, stage: str, section: dict) -> dict:
    """The m1.json of a trained checkpoint: the parent's record (layout, teacher) updated for ``stage``."""
    from .convert import versions

    parent = read_record(base_dir)
    rec = dict(parent)
    for k in ("sft", "grpo", "distill"):  # settings of earlier stages stay in history, not at top level
        rec.pop(k, None)
    rec.update(stage=stage, versions=versions(), created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    rec.setdefault("teacher", parent.get("teacher", "?"))
    rec["base_model"] = str(base_dir)
    rec[stage] = section
    rec["history"] = list(parent.get("history", [])) + [
        {"stage": parent.get("stage", "hf"), "created": parent.get("created"), "path": str(base_dir)}]
    return rec


def finalize(trainer, out: Path, *, tokenizer, record: dict, extra_files: dict[str, Path], force: bool,
             save_dtype: str | None, log) -> None:
    """Write ``out`` atomically as a normal m1 checkpoint from the trained model (all processes call this)."""
    import torch

    acc = trainer.accelerator
    model = trainer.model
    if save_dtype and acc.num_processes == 1 and save_dtype != "float32":
        model = model.to(getattr(torch, save_dtype))
    tmp_model = work_dir(out) / "final-model"
    if acc.is_main_process and tmp_model.exists():
        shutil.rmtree(tmp_model)
    acc.wait_for_everyone()
    trainer.save_model(str(tmp_model))  # gathers FSDP / DeepSpeed shards; writes on the main process
    acc.wait_for_everyone()
    if acc.is_main_process:
        with atomic_dir(out, force=force) as tmp:
            for p in tmp_model.iterdir():
                if p.name == "training_args.bin":
                    continue
                shutil.move(str(p), tmp / p.name)
            tokenizer.save_pretrained(tmp)
            gen = getattr(trainer.accelerator.unwrap_model(trainer.model), "generation_config", None)
            if gen is not None and not (tmp / "generation_config.json").exists():
                gen.save_pretrained(tmp)
            _clean_config(tmp / "config.json")
            for name, src in extra_files.items():
                if Path(src).exists():
                    shutil.copyfile(src, tmp / name)
            write_json_atomic(tmp / M1_RECORD, record)
        log(f"wrote {out}")
    acc.wait_for_everyone()


def _clean_config(path: Path) -> None:
    """Training flips ``use_cache`` off (gradient checkpointing); a saved model should decode with a cache."""
    if not path.exists():
        return
    cfg = json.loads(path.read_text())
    changed = False
    if cfg.get("use_cache") is False:
        cfg["use_cache"] = True
        changed = True
    if cfg.pop("quantization_config", None) is not None:
        changed = True
    if changed:
        write_json_atomic(path, cfg)


def load_policy(directory: Path, log):
    """(model, tokenizer) for training: float32 master weights, a pad token, right-size chat template check."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .kernels import enable as enable_fast_scan

    enable_fast_scan()  # CUDA + fla-core: Triton Mamba2 scan; a no-op elsewhere
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    except Exception as e:
        raise M1Error(f"cannot load the model in {directory}: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:300] if str(e) else ''}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as e:
        raise M1Error(f"cannot load the tokenizer in {directory}: {type(e).__name__}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        raise M1Error(f"the tokenizer in {directory} has no chat template: m1 sft/grpo train on chat-formatted "
                      "problems (convert from an instruct teacher, or add a chat template)")
    aux = getattr(model.config, "router_aux_loss_coef", None)
    if aux not in (None, 0, 0.0) and getattr(model.config, "num_local_experts", 0) == 0:
        # TRL turns the MoE auxiliary loss on from this value, and it crashes with no experts
        model.config.router_aux_loss_coef = 0.0
        log("note: set router_aux_loss_coef=0.0 (the model has no experts)")
    return model, tokenizer


def run_state():
    """accelerate's process state. On a machine without CUDA it is created with ``cpu=True``, so that
    ``accelerate launch --multi_gpu --num_processes N`` (torchrun) gives DDP over CPU processes (gloo)
    instead of N independent single-process runs (``--cpu`` alone starts one process: multi-CPU needs mpirun).
    """
    from accelerate import PartialState

    return PartialState(cpu=not _cuda())


def _barrier() -> None:
    run_state().wait_for_everyone()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def quiet_trainer(trainer):
    """Drop transformers' own print-every-log callback: m1's metrics callback prints one line per log."""
    import warnings

    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated.*", category=FutureWarning)
    trainer.remove_callback(PrinterCallback)
    if trainer.args.disable_tqdm:
        trainer.remove_callback(ProgressCallback)
    return trainer


def set_mamba_chunk_size(model, chunk: int | None) -> int | None:
    """Use ``chunk`` as the Mamba2 scan chunk size while training (the saved config is not changed).

    ``None``: 64 on CPU when the checkpoint says more (the reference torch scan pads every sequence
    to a multiple of the chunk and costs ~chunk x length per layer: 2-3x faster training for
    sequences of a few hundred tokens, measured), the checkpoint's own value on a GPU. The result
    is the same up to float rounding. Returns the chunk size in use (None: no Mamba layers).
    """
    mixers = [m for m in model.modules() if hasattr(m, "chunk_size") and "mamba" in type(m).__name__.lower()]
    if not mixers:
        return None
    if chunk is None:
        chunk = mixers[0].chunk_size if _cuda() else min(64, mixers[0].chunk_size)
    if chunk < 1:
        raise M1Error(f"--mamba-chunk-size must be >= 1, got {chunk}")
    for m in mixers:
        m.chunk_size = int(chunk)
    return int(chunk)


def cpu_bf16_supported() -> bool:
    """True when this CPU has native bfloat16 matmuls (AVX512-BF16 / AMX) that oneDNN uses.

    Measured on a 2-core Xeon with AMX (1 thread): a 2048x576x1536 matmul runs at 1.6 TFLOP/s in bf16 vs
    0.18 in float32, and a SmolLM2-135M training step (8 x 256 tokens) takes 5.6 s instead of 12.3 s.
    """
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # private op: absent in some builds
        return False


def resolve_precision(bf16: str | bool | None) -> bool:
    """``auto``: bf16 mixed precision on a CUDA GPU that supports it, float32 elsewhere (CPU: exact and
    reproducible; ask for ``on`` to train in bf16 autocast on a CPU with bf16 instructions, ~2x faster)."""
    import torch

    if bf16 in (None, "auto"):
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if isinstance(bf16, str):
        if bf16.lower() in ("1", "true", "yes", "on"):
            bf16 = True
        elif bf16.lower() in ("0", "false", "no", "off"):
            bf16 = False
        else:
            raise M1Error(f"--bf16 must be auto, on or off, got '{bf16}'")
    if bf16:
        ok = torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_bf16_supported()
        if not ok:
            raise M1Error("--bf16 on needs a CUDA GPU with bfloat16 support or a CPU with bf16 instructions "
                          "(AVX512-BF16 or AMX); use --bf16 off (float32) here")
    return bool(bf16)


def quiet_transformers() -> Callable[[], None]:
    """Silence per-checkpoint 'Writing model shards' bars and library chatter; returns the undo function."""
    import warnings

    from transformers.utils import logging as hf_logging

    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*falling back to its reference PyTorch implementation.*")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated.*", category=FutureWarning)
    try:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass

    def undo() -> None:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()

    return undo


def unknown_options(cls, options: dict) -> None:
    names = {f.name for f in fields(cls)}
    bad = sorted(set(options) - names)
    if bad:
        raise M1Error(f"unknown option(s) {', '.join(bad)}; known: {', '.join(sorted(names))}")


# =================================================================================================
# SFT data
# =================================================================================================
@dataclass
class SFTExample:
    """One training pair: the prompt messages and the assistant's solution, and where it came from."""
    prompt: list[dict]
    solution: str
    where: str


def _has_box(text: str) -> bool:
    from .grading import extract_answer

    return "\\boxed" in text and extract_answer(text) is not None


def solution_from_fields(row: dict, where: str) -> str:
    r"""The worked solution of a question row, ending in ``\boxed{answer}`` (GSM8K rows converted)."""
    from .tasks.base import boxed, integer_answer, strip_calculator

    sol = row.get("solution")
    ans = row.get("answer")
    if sol is not None and not isinstance(sol, str):
        raise M1Error(f"{where}: 'solution' must be a string, got {type(sol).__name__}")
    if isinstance(ans, (int, float)) and not isinstance(ans, bool):
        ans = str(int(ans)) if float(ans).is_integer() else str(ans)
    if ans is not None and not isinstance(ans, str):
        raise M1Error(f"{where}: 'answer' must be a string or a number, got {type(ans).__name__}")
    if (sol is None or not sol.strip()) and isinstance(ans, str) and "####" in ans:
        body, _, final = ans.rpartition("####")  # a raw GSM8K row
        try:
            gold = integer_answer(final)
        except ValueError:
            gold = final.strip()
        if not gold:
            raise M1Error(f"{where}: the '#### N' line of 'answer' has no number")
        return f"{strip_calculator(body).strip()}\nThe answer is {boxed(gold)}."
    if sol is None or not sol.strip():
        raise M1Error(f"{where}: row has no solution: SFT needs a 'solution' (a worked solution ending in "
                      "\\boxed{...}) or a GSM8K-style 'answer' ending in '#### N'")
    sol = strip_calculator(sol).strip()
    if "####" in sol:
        body, _, final = sol.rpartition("####")
        if final.strip():
            return f"{body.strip()}\nThe answer is {boxed(final.strip().replace(',', ''))}."
    if _has_box(sol):
        return sol
    if isinstance(ans, str) and ans.strip():
        return f"{sol}\nThe answer is {boxed(ans.strip())}."
    raise M1Error(f"{where}: the solution does not end in \\boxed{{...}} and the row has no 'answer' to box; "
                  "m1 trains the model to put its final answer in \\boxed{}")


def _question_of(row: dict, where: str) -> str:
    for key in ("question", "problem", "prompt"):
        q = row.get(key)
        if isinstance(q, str) and q.strip():
            return q
    raise M1Error(f"{where}: row has no question: give a non-empty 'question' (or 'problem') string")


def read_sft_jsonl(path: Path) -> list[SFTExample]:
    """Rows of an SFT JSONL file (see the module docstring); errors name ``FILE:LINE``."""
    from .data import jsonl_objects
    from .tasks.base import Problem
    from .tasks.prompts import build_messages

    out = []
    for n, where, row in jsonl_objects(path, "data",
                                       "give gsm8k-train, arith[:options], a task name or a .jsonl file"):
        if not isinstance(row, dict):
            raise M1Error(f"{where}: expected a JSON object, got {type(row).__name__}")
        if "messages" in row:
            msgs = row["messages"]
            if (not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs)):
                raise M1Error(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} string objects")
            last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
            if last is None or last == 0 or not msgs[last]["content"].strip():
                raise M1Error(f"{where}: 'messages' needs a non-empty assistant turn after at least one prompt turn")
            out.append(SFTExample([{"role": m["role"], "content": m["content"]} for m in msgs[:last]],
                                  msgs[last]["content"].strip(), where))
            continue
        q = _question_of(row, where)
        sol = solution_from_fields(row, where)
        out.append(SFTExample(build_messages(Problem(id=where, question=q, answer="")), sol, where))
    if not out:
        raise M1Error(f"data file {path} has no rows")
    return out


def load_sft_examples(data: str, limit: int | None = None, seed: int = 0) -> list[SFTExample]:
    """Training pairs for ``--data`` (see the module docstring)."""
    from .tasks import TASKS, load_task, parse_task_spec
    from .tasks.prompts import build_messages

    if not data or not str(data).strip():
        raise M1Error("--data is empty: give gsm8k-train, arith[:options], a task name or a .jsonl file")
    data = str(data).strip()
    if data.endswith((".jsonl", ".json")) or os.sep in data or Path(data).exists():
        examples = read_sft_jsonl(Path(data).expanduser())
        return examples if limit is None else examples[:limit]
    spec = "gsm8k:split=train" if data == GSM8K_TRAIN else data
    try:
        name, opts = parse_task_spec(spec)
    except ValueError as e:
        raise M1Error(f"--data {data}: {e}") from None
    if name not in TASKS:
        raise M1Error(f"--data {data}: unknown data; give {GSM8K_TRAIN}, a task ({', '.join(sorted(TASKS))}) "
                      "or a .jsonl file")
    info = TASKS[name]
    split = opts.pop("split", "train")
    if split not in info.splits:
        raise M1Error(f"--data {data}: task {name} has no '{split}' split (it has {', '.join(info.splits)}); "
                      "SFT trains on a train split")
    if info.generated and limit is None and "n" not in opts:
        limit = DEFAULT_ARITH_EXAMPLES
    try:
        problems = load_task(name, split=split, limit=limit, seed=seed if info.generated else None, **opts)
    except (ValueError, TypeError) as e:
        raise M1Error(f"--data {data}: {e}") from None
    out = []
    for p in problems:
        where = f"{name}:{p.id}"
        sol = solution_from_fields({"solution": p.solution, "answer": p.answer}, where)
        out.append(SFTExample(build_messages(p), sol, where))
    if not out:
        raise M1Error(f"--data {data}: no examples (check --limit)")
    return out


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
    """Every setting of an SFT run; saved as ``sft_config.json`` in each checkpoint and in the output."""
    model: str  # checkpoint directory to fine-tune
    data: str = "arith"  # gsm8k-train | arith[:opts] | task[:opts] | FILE.jsonl
    limit: int | None = None  # examples (arith: how many to generate, default 2000)
    epochs: float = 1.0
    max_steps: int = -1  # > 0: stop after this many optimizer steps (overrides epochs)
    learning_rate: float = 2e-5
    batch_size: int = 8  # rows per device per step
    grad_accum: int = 1
    max_length: int = 1024  # longer examples are dropped
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    bf16: str = "auto"  # auto (CUDA bf16 when available) | on | off
    gradient_checkpointing: bool = False
    mamba_chunk_size: int | None = None  # training-time Mamba2 scan chunk (None: 64 on CPU, the model's on GPU)
    save_steps: int = 200
    save_total_limit: int = 2
    logging_steps: int = 10

    def validate(self) -> None:
        for name in ("batch_size", "grad_accum", "max_length", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise M1Error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise M1Error(f"--limit must be >= 1, got {self.limit}")
        if self.learning_rate <= 0 or not math.isfinite(self.learning_rate):
            raise M1Error(f"--lr must be > 0, got {self.learning_rate}")
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


def sft(model: str | Path, data: str, out: str | Path, *, resume: bool = False, force: bool = False,
        keep_checkpoints: bool = False, log: Callable[[str], None] = print, callbacks: list | None = None,
        **options) -> SFTResult:
    """Fine-tune ``model`` on ``data`` and write the result to ``out``; see the module docstring.

    ``options`` are :class:`SFTSettings` fields (``learning_rate``, ``epochs``, ``max_steps``,
    ``batch_size``, ...). ``callbacks``: extra ``transformers.TrainerCallback`` objects (tests use
    one to stop a run part-way, as a kill would). Every user-facing problem raises :class:`M1Error`.
    """
    unknown_options(SFTSettings, options)
    cfg = SFTSettings(model=str(model), data=str(data), **options)
    cfg.validate()
    out = Path(out)
    base = check_model_dir(cfg.model)
    settings = {**asdict(cfg), "model_fingerprint": model_fingerprint(base)}
    ckpt = prepare_run(out, settings, stage="sft", marker=SFT_CONFIG_FILE, neutral=SFT_RESUME_NEUTRAL,
                       resume=resume, force=force)
    _barrier()  # every process has checked the directories before the main one writes anything
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
        dataloader_pin_memory=_cuda(),
        use_cpu=not _cuda(),
        router_aux_loss_coef=0.0,  # GraniteMoeHybrid has the attribute but no experts: keep TRL's aux loss off
        save_only_model=False,
    )
    trainer_cls = with_checkpoint_marker(SFTTrainer, SFT_CONFIG_FILE,
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
        if ckpt is None and work.exists():
            shutil.rmtree(work)  # --force: start over
        work.mkdir(parents=True, exist_ok=True)
        if ckpt is not None:
            _, incomplete = find_checkpoints(work, SFT_CONFIG_FILE)
            for p in incomplete:
                shutil.rmtree(p, ignore_errors=True)
                say(f"removed incomplete checkpoint {p.name}")
            truncate_metrics(work / METRICS_FILE, _step_of(ckpt))
            say(f"resuming from {ckpt}")
        write_json_atomic(work / SFT_CONFIG_FILE, {"stage": "sft", "settings": settings})
    state.wait_for_everyone()

    metrics_cb = make_metrics_callback(work / METRICS_FILE, say, SFT_COLUMNS)
    trainer = build_sft_trainer(cfg, settings, model, tokenizer, to_dataset(kept), work,
                                [metrics_cb, *callbacks], say)
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(ckpt) if ckpt is not None else None)
    seconds = time.perf_counter() - t0
    rows = _read_metrics(work / METRICS_FILE)
    section = {"settings": settings, "data": {"spec": cfg.data, "examples": len(kept), "dropped_too_long": dropped,
                                              "tokens": n_tokens},
               "steps": trainer.state.global_step, "train_loss": result.training_loss,
               "seconds": round(seconds, 1), "processes": state.num_processes,
               "last_log": next((r for r in reversed(rows) if "loss" in r), None)}
    record = lineage_record(base, "sft", section)
    finalize(trainer, out, tokenizer=tokenizer, record=record, force=force, save_dtype=_base_dtype(base),
             extra_files={SFT_CONFIG_FILE: work / SFT_CONFIG_FILE, "sft_metrics.jsonl": work / METRICS_FILE},
             log=say)
    if main and not keep_checkpoints:
        shutil.rmtree(work, ignore_errors=True)
    return SFTResult(out=out, steps=trainer.state.global_step, examples=len(kept), dropped=dropped,
                     train_loss=result.training_loss, seconds=seconds, metrics=rows)


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def _base_dtype(base: Path) -> str | None:
    try:
        cfg = json.loads((base / "config.json").read_text())
    except (OSError, ValueError):
        return None
    d = cfg.get("dtype") or cfg.get("torch_dtype")
    return d if d in ("float32", "bfloat16", "float16") else None
