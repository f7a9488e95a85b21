"""Reading and writing m1 checkpoint directories atomically.

An m1 checkpoint is a plain Hugging Face directory (config.json, model.safetensors, tokenizer
files, generation_config.json) plus ``m1.json``, a record of how it was made. Writers build the
directory under a temporary name beside the target and rename it into place, so a crash or a bad
input never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import M1Error

M1_RECORD = "m1.json"

# Layer-type names in config.json. transformers 5.x names a GraniteMoeHybrid layer "full_attention" or
# "linear_attention" in memory and writes those names back, but llama.cpp's converter counts a layer as
# attention only where config.json says "attention" (a "full_attention" layer silently becomes Mamba),
# and transformers 4.x knows only "attention"/"mamba". transformers 5.x and vLLM map the older pair to
# the new names when they load a config, so m1 writes the older pair and reads both.
WRITTEN_LAYER_TYPE = {"full_attention": "attention", "linear_attention": "mamba"}
MAMBA_LAYER_TYPES = ("mamba", "linear_attention")
ATTENTION_LAYER_TYPES = ("attention", "full_attention")
# transformers 5.x writes tokenizer_class "TokenizersBackend", a name transformers 4.x and llama.cpp's
# converter do not know; "PreTrainedTokenizerFast" is what 5.x itself maps that class's old name to.
WRITTEN_TOKENIZER_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def mamba_layer_mask(cfg) -> list[bool]:
    """Per layer of config ``cfg`` (a config.json dict or a transformers config): is it a Mamba layer?

    The one place m1 decides this from a config, for either spelling of the layer types. A
    GraniteMoeHybrid config without layer types is all Mamba (transformers' default); other
    architectures have attention only.
    """
    cfg = cfg if isinstance(cfg, dict) else cfg.to_dict()
    n = cfg["num_hidden_layers"]
    if cfg.get("model_type") != "granitemoehybrid":
        return [False] * n
    types = cfg.get("layer_types") or cfg.get("layers_block_type") or ["mamba"] * n
    unknown = sorted({str(t) for t in types} - set(MAMBA_LAYER_TYPES + ATTENTION_LAYER_TYPES))
    if unknown:
        raise M1Error(f"config layer_types has {', '.join(map(repr, unknown))}: m1 knows "
                      f"{'/'.join(ATTENTION_LAYER_TYPES)} and {'/'.join(MAMBA_LAYER_TYPES)} layers")
    if len(types) != n:
        raise M1Error(f"config layer_types names {len(types)} layers but num_hidden_layers is {n}")
    return [t in MAMBA_LAYER_TYPES for t in types]


def saved_dtype(cfg: dict) -> str | None:
    """The weights' dtype a config.json records ("float32", ...): ``dtype`` in transformers 5.x,
    ``torch_dtype`` before; None when it records neither."""
    d = cfg.get("dtype") or cfg.get("torch_dtype")
    return str(d).replace("torch.", "") if d else None


def make_portable(directory: str | os.PathLike) -> None:
    """Rewrite a saved checkpoint's config.json and tokenizer_config.json with the names every reader
    knows (see WRITTEN_LAYER_TYPE); the weights and every other setting stay as saved."""
    d = Path(directory)
    if (d / "config.json").is_file():
        cfg = read_config(d)
        types = cfg.get("layer_types")
        if cfg.get("model_type") == "granitemoehybrid" and isinstance(types, list):
            written = [WRITTEN_LAYER_TYPE.get(t, t) for t in types]
            if written != types:
                cfg["layer_types"] = written
                write_json_atomic(d / "config.json", cfg)
    tok = d / "tokenizer_config.json"
    if tok.is_file() and (d / "tokenizer.json").is_file():  # PreTrainedTokenizerFast reads tokenizer.json
        try:
            tc = json.loads(tok.read_text())
        except ValueError as e:
            raise M1Error(f"{tok} is not valid JSON: {e}") from None
        if tc.get("tokenizer_class") in WRITTEN_TOKENIZER_CLASS:
            tc["tokenizer_class"] = WRITTEN_TOKENIZER_CLASS[tc["tokenizer_class"]]
            write_json_atomic(tok, tc)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, force: bool = False):
    """Yield a temporary directory that becomes ``out`` only if the block finishes without error.

    Every m1 checkpoint is written through here, so this is also where its config gets the names
    all readers understand (:func:`make_portable`; a no-op for directories without a config)."""
    out = Path(out)
    if out.exists() and not force:
        raise M1Error(f"output directory {out} already exists: pass --force to replace it, or choose another --out")
    if out.exists() and not out.is_dir():
        raise M1Error(f"output path {out} exists and is not a directory: remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException as e:
        full = disk_full_error(out, tmp, e)
        if full is not None:
            raise full from e
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        make_portable(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def disk_full_error(out: Path, partial: Path, e: BaseException) -> M1Error | None:
    """If ``e`` is a full disk, remove the ``partial`` write and return the error to raise instead."""
    if not _is_disk_full(e):
        return None
    written = _dir_bytes(partial) if partial.is_dir() else 0
    shutil.rmtree(partial, ignore_errors=True)
    free = shutil.disk_usage(out.parent).free
    return M1Error(f"writing {out} failed: the disk holding it is full ({free / 1e6:,.0f} MB free after removing "
                   f"the partial write of {written / 1e6:,.0f} MB). Free space there, or choose an --out on "
                   "another disk (a training run keeps its work directory beside --out), then run again (with "
                   "--resume where the command has it)")


def _is_disk_full(e: BaseException) -> bool:
    """torch.save reports a full disk as a RuntimeError from its zip writer ("file write failed", or
    "unexpected pos A vs B" when the short write surfaces at the end of the file), not as ENOSPC."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(e, RuntimeError):
        msg = str(e)
        return "PytorchStreamWriter failed writing" in msg or "unexpected pos" in msg
    return False


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def eos_token_ids(model, tokenizer) -> frozenset:
    """Every token that ends a sequence: the generation config's ``eos_token_id`` (an int or a list:
    chat models often end on several) and the tokenizer's. The one EOS set of the engine and GRPO."""
    eos = set()
    gc = getattr(model, "generation_config", None)
    for src in (getattr(gc, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            eos.add(src)
        elif src:
            eos.update(int(x) for x in src)
    return frozenset(eos)


def read_record(directory: str | os.PathLike) -> dict:
    """The m1.json record of a checkpoint ({} for a plain HF directory)."""
    p = Path(directory) / M1_RECORD
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        raise M1Error(f"{p} is not valid JSON ({e}); the checkpoint may be damaged") from None


def check_model_dir(directory: str | os.PathLike) -> Path:
    """Validate that ``directory`` looks like a loadable HF causal-LM checkpoint."""
    d = Path(directory).expanduser()
    if not d.exists():
        raise M1Error(f"model directory {d} does not exist: create one with `m1 convert --teacher T --out {d}`")
    if not d.is_dir():
        raise M1Error(f"{d} is not a directory: --model takes a checkpoint directory written by m1")
    if not (d / "config.json").is_file():
        raise M1Error(f"{d} has no config.json: it is not a model checkpoint (make one with `m1 convert`)")
    return d


def read_config(directory: str | os.PathLike) -> dict:
    """A checkpoint directory's config.json as a dict, failures as one-line M1Errors."""
    p = Path(directory) / "config.json"
    try:
        return json.loads(p.read_text())
    except OSError as e:
        raise M1Error(f"cannot read {p}: {e}") from None
    except ValueError as e:
        raise M1Error(f"{p} is not valid JSON: {e}") from None


def context_length(config) -> int:
    """Most tokens a model takes (prompt + completion), from its config (dict or PretrainedConfig)."""
    get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
    return int(get("max_position_embeddings", 0) or 1 << 30)


def check_fits_context(directory: str | os.PathLike, new_tokens: int, flag: str) -> int:
    """Refuse, before any loading, a generation length that leaves no room for a prompt in the model's
    context (a model past its trained positions writes garbage, and a long run would only then fail).
    Returns the context length."""
    context = context_length(read_config(directory))
    if new_tokens >= context:
        raise M1Error(f"{flag} {new_tokens} does not fit the model's context of {context} tokens (prompt included): "
                      f"lower it")
    return context


def read_pretrained(directory, dtype, what: str = "model"):
    """(model, tokenizer) straight from ``from_pretrained``, failures as one-line M1Errors. The Mamba2
    scan is routed to the Triton kernel first (CUDA + fla-core; a no-op elsewhere)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .kernels import enable as enable_fast_scan

    enable_fast_scan()
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype)
    except Exception as e:
        raise M1Error(f"cannot load the {what} in {directory}: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:300] if str(e) else ''}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as e:
        raise M1Error(f"cannot load the tokenizer in {directory}: {type(e).__name__}") from None
    return model, tokenizer


def load_model(directory: str | os.PathLike, dtype=None, device: str | None = None):
    """Load (model, tokenizer) from an m1 or plain HF checkpoint directory, with clear errors."""
    import torch

    d = check_model_dir(directory)
    model, tokenizer = read_pretrained(d, dtype or "auto")
    if device:
        model.to(torch.device(device))
    model.eval()
    return model, tokenizer
