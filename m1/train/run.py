"""Run machinery shared by ``m1 sft`` and ``m1 grpo`` (and the precision/chunk helpers ``m1 distill`` uses).

A run writes into ``<out>.work/``: ``checkpoints/checkpoint-N/`` (TRL/transformers checkpoints) and
``metrics.jsonl``. A checkpoint counts only once the run's settings file (the *marker*) has been
written into it as its last file; ``--resume`` refuses settings that differ from the saved ones
(``config_diff``, except the *neutral* ones); at the end ``<out>`` is written atomically as a normal
m1 checkpoint (``finalize``) with an ``m1.json`` lineage record.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from ..errors import M1Error
from ..model.checkpoint import M1_RECORD, atomic_dir, disk_full_error, read_record, saved_dtype, write_json_atomic

CHECKPOINTS = "checkpoints"
METRICS_FILE = "metrics.jsonl"


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


def step_of(path: Path) -> int:
    try:
        return int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def find_checkpoints(work: Path, marker: str) -> tuple[Path | None, list[Path]]:
    """(latest complete checkpoint, incomplete checkpoint dirs) under ``work/checkpoints``."""
    root = work / CHECKPOINTS
    if not root.is_dir():
        return None, []
    dirs = sorted((p for p in root.glob("checkpoint-*") if p.is_dir() and step_of(p) >= 0), key=step_of)
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


def open_work_dir(work: Path, ckpt: Path | None, marker: str, record: dict, say) -> None:
    """The main process's work directory before training: a fresh run starts it empty (``--force``
    discards what was there); a resumed one drops incomplete checkpoints and the metrics the killed run
    logged after ``ckpt``. Then ``record`` (stage and settings) is written beside the checkpoints."""
    if ckpt is None and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if ckpt is not None:
        _, incomplete = find_checkpoints(work, marker)
        for p in incomplete:
            shutil.rmtree(p, ignore_errors=True)
            say(f"removed incomplete checkpoint {p.name}")
        truncate_metrics(work / METRICS_FILE, step_of(ckpt))
        say(f"resuming from {ckpt}")
    write_json_atomic(work / marker, record)


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
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            ckpt = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            try:
                super()._save_checkpoint(model, trial)
            except (OSError, RuntimeError) as e:
                full = disk_full_error(ckpt, ckpt, e)  # the partial checkpoint (no marker) goes
                if full is None:
                    raise
                raise full from e
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                if weights_finite(model):  # a checkpoint of broken weights never counts as good
                    write_json_atomic(ckpt / marker, {**payload(self), "step": self.state.global_step})

    Marked.__name__ = f"M1{trainer_cls.__name__}"
    return Marked


def mamba_mixer_param_ids(model) -> set[int]:
    """``id()`` of every parameter of the model's Mamba mixers (empty for an all-attention model): what
    ``--mamba-lr`` trains at its own learning rate in distill and sft."""
    from ..model.checkpoint import mamba_layer_mask

    layers = model.model.layers
    return {id(p) for i, mamba in enumerate(mamba_layer_mask(model.config)) if mamba
            for p in layers[i].mamba.parameters()}


def with_mamba_lr(trainer_cls, mamba_lr: float):
    """Subclass a transformers ``Trainer`` so the Mamba mixers train at ``mamba_lr`` and every other
    parameter at ``args.learning_rate`` (same optimizer, weight-decay split and schedule shape). The
    mixers are the new parts of a converted model; the MLPs and attention are the teacher's."""

    class MambaLR(trainer_cls):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                model = model if model is not None else self.model
                mixers, decay = mamba_mixer_param_ids(model), set(self.get_decay_parameter_names(model))
                groups = []
                for in_mixer, lr in ((False, self.args.learning_rate), (True, mamba_lr)):
                    for decayed in (True, False):
                        params = [p for n, p in model.named_parameters()
                                  if p.requires_grad and (id(p) in mixers) == in_mixer and (n in decay) == decayed]
                        if params:
                            groups.append({"params": params, "lr": lr,
                                           "weight_decay": self.args.weight_decay if decayed else 0.0})
                cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
                self.optimizer = cls(groups, **kwargs)
            return self.optimizer

    MambaLR.__name__ = trainer_cls.__name__
    return MambaLR


def weights_finite(model) -> bool:
    """True when every parameter of ``model`` is finite."""
    import torch

    with torch.no_grad():
        return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def make_divergence_guard():
    """A ``TrainerCallback`` that stops a run at the first non-finite logged loss / gradient norm or
    non-finite weight after a step, before that step can be saved; ``guard.bad`` then says what and
    where, and :func:`train_guarded` turns it into an error."""
    from transformers import TrainerCallback

    class DivergenceGuard(TrainerCallback):
        def __init__(self):
            self.bad: tuple[int, str, Any] | None = None

        def _stop(self, state, control, what, value):
            if self.bad is None:
                self.bad = (state.global_step, what, value)
            control.should_training_stop = True
            control.should_save = False

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            bad = first_nonfinite(loss=logs.get("loss"), grad_norm=logs.get("grad_norm"))
            if bad is not None:
                self._stop(state, control, *bad)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if model is not None and not weights_finite(model):
                self._stop(state, control, "weights", "non-finite")

    return DivergenceGuard()


def check_max_steps(max_steps: int) -> None:
    """``--max-steps``: a positive count, or -1 (transformers' "off": the epochs decide)."""
    if max_steps == 0 or max_steps < -1:
        raise M1Error(f"--max-steps must be >= 1 (or -1: train for --epochs), got {max_steps}")


def first_nonfinite(**values) -> tuple[str, Any] | None:
    """The first of ``values`` (name -> number) that is NaN or inf, as ``(name, value)`` with underscores read
    as spaces; ``None`` when every value is finite. The one test of a diverged step, for sft, grpo and distill."""
    import math

    for name, v in values.items():
        if isinstance(v, (int, float)) and not math.isfinite(v):
            return name.replace("_", " "), v
    return None


def diverged_error(what: str, value, step: int, last: tuple[Path, int] | None, work: Path,
                   lr_flag: str = "--lr", where: str = "") -> M1Error:
    """The one error of a run that diverged (sft, grpo, distill): what became non-finite and where, that the
    output was not written, which checkpoint is kept (``last``: its folder and step), and what to try."""
    kept = (f"the last good checkpoint (step {last[1]}) is kept in {last[0]}" if last is not None
            else f"no good checkpoint had been written yet ({work} is kept)")
    at = f"step {step}" + (f" ({where})" if where else "")
    return M1Error(f"training diverged: the {what} became {value} at {at}; stopped without writing the output; "
                   f"{kept}. Try a lower {lr_flag}")


def train_guarded(trainer, guard, work: Path, marker: str, resume_from: Path | None, lr_flag: str = "--lr"):
    """``trainer.train()``, except that a run that diverged raises :class:`M1Error` (exit status 1)
    instead of finishing: a non-finite loss, gradient norm or weight (``guard``), or the sampler's
    error on the non-finite probabilities of blown-up weights (GRPO). The work directory and its
    last good checkpoint are kept; nothing is finalised."""
    def diverged(step, what, value):
        last, _ = find_checkpoints(work, marker)
        return diverged_error(what, value, step, (last, step_of(last)) if last else None, work, lr_flag)

    from ..engine import NonFiniteLogits

    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from is not None else None)
    except (RuntimeError, NonFiniteLogits) as e:
        # GRPO's rollouts sample from the weights being trained: blown-up (even finite) weights give NaN/inf
        # logits, which transformers' sampler reports as a RuntimeError and m1's engine as NonFiniteLogits
        msg = str(e)
        if isinstance(e, NonFiniteLogits) or "inf" in msg or "nan" in msg:
            bad = "weights" if not weights_finite(trainer.model) else "next-token logits of the rollouts"
            raise diverged(trainer.state.global_step, bad, "non-finite") from None
        raise
    if guard.bad is not None:
        raise diverged(*guard.bad)
    if not weights_finite(trainer.model):
        raise diverged(trainer.state.global_step, "weights", "non-finite")
    return result


def lineage_record(base_dir: Path, stage: str, section: dict) -> dict:
    """The m1.json of a trained checkpoint: the parent's record (layout, teacher) updated for ``stage``."""
    from ..model.convert import versions

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

    from ..model.checkpoint import read_pretrained

    model, tokenizer = read_pretrained(directory, torch.float32)
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

    return PartialState(cpu=not on_cuda())


def barrier() -> None:
    run_state().wait_for_everyone()


def on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


MICRO_BATCH_CAP = {"cpu": 4, "cuda": 8}


def default_micro_batch(per_process: int, cuda: bool) -> int:
    """Rows per forward when the user gives no ``--micro-batch-size``: the largest divisor of the
    rows per process and step that is at most 4 on CPU (8 on CUDA, TRL's default batch), the rest
    being gradient accumulation (same gradients). Why a cap on CPU: activation memory grows with the
    rows of a forward while a 2-core CPU gains nothing from bigger ones. SmolLM2 hybrid, float32,
    peak RSS / wall: GRPO 16 completions x 96 tokens in one forward 14.8 GB / 160 s, in 4 forwards of
    4 6.3 GB / 138 s; distill kd 8 x 256 tokens 10.4 GB -> 8.7 GB, align 9.6 GB -> 6.1 GB, as fast
    (docs/training.md)."""
    cap = MICRO_BATCH_CAP["cuda" if cuda else "cpu"]
    return max(d for d in range(1, min(cap, per_process) + 1) if per_process % d == 0)


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
    from ..model.kernels import CPU_SCAN_CHUNK, mamba_mixers

    mixers = mamba_mixers(model)
    if not mixers:
        return None
    if chunk is None:
        chunk = mixers[0].chunk_size if on_cuda() else min(CPU_SCAN_CHUNK, mixers[0].chunk_size)
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


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def base_dtype(base: Path) -> str | None:
    try:
        cfg = json.loads((base / "config.json").read_text())
    except (OSError, ValueError):
        return None
    d = saved_dtype(cfg)
    return d if d in ("float32", "bfloat16", "float16") else None
