"""``m1 export --gguf``: an m1 checkpoint as one GGUF file for llama.cpp / Ollama.

The conversion itself is llama.cpp's own ``convert_hf_to_gguf.py`` (its GraniteHybrid support maps the
tensors, permutes q/k for ggml's RoPE, reshapes the Mamba2 parameters and writes the tokenizer); a
second implementation of that in m1 would drift from what llama.cpp loads. m1 runs it on the
checkpoint and then fixes what the converter gets wrong for m1's models:

- it switches RoPE off for every GraniteMoeHybrid that has Mamba layers (IBM's Granite 4 hybrids use
  no positional encoding) and sets the context length to 2**20; an m1 hybrid's attention layers are
  the teacher's and use RoPE (``position_embedding_type: rope``), so m1 sets
  ``granitehybrid.rope.scaling.finetuned`` (llama.cpp's switch for RoPE in this architecture) and the
  teacher's context length back, in place;
- an m1 checkpoint written before m1 used the layer-type names llama.cpp reads (``attention`` /
  ``mamba``) is exported through a portable copy of its config, so no layer silently becomes Mamba.

Then it reads the file back and checks that the attention layers are the ones the checkpoint has.

What stock llama.cpp does with the file (docs/readers.md): an all-attention checkpoint (``--attn-layers
all``) is written as a ``granite`` model and runs. A hybrid is refused when it loads: llama.cpp's
GraniteHybrid loader asserts ``GGML_ASSERT(2 * n_embd == d_inner)`` (src/models/granite-hybrid.cpp),
i.e. ``mamba_expand = 2``, while m1's attention-initialised mixers have ``d_inner = n_embd``
(``mamba_expand = 1``: the value/output projections are the attention's). The file itself is complete;
a llama.cpp with that assert removed runs it (docs/readers.md).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import M1Error
from ..settings import setting
from .checkpoint import check_model_dir, make_portable, mamba_layer_mask, read_config, read_record

OUTTYPES = ("f32", "f16", "bf16", "q8_0", "auto")
LLAMA_CPP_ENV = "M1_LLAMA_CPP_DIR"
CONVERTER = "convert_hf_to_gguf.py"
EXPAND_ASSERT = "GGML_ASSERT(2 * n_embd == d_inner)"


@dataclass
class ExportSettings:
    """Every setting of `m1 export`; its flags are generated from these fields (m1.settings)."""
    model: str = setting(help="the m1 checkpoint directory to export")
    gguf: str = setting(help="the .gguf file to write (must not exist unless --force)")
    outtype: str = setting("auto", "tensor type in the file: f32, f16, bf16, q8_0, or auto (llama.cpp's choice: "
                                   "the highest-fidelity 16-bit type for the weights)", choices=OUTTYPES)
    llama_cpp: str | None = setting(None, f"llama.cpp source directory holding {CONVERTER} (a git checkout, or "
                                          "vendor/llama.cpp of the llama-cpp-python sdist; `make llama-cpp-src` "
                                          f"fetches one into .llama.cpp) (default: ${LLAMA_CPP_ENV})")

    def validate(self) -> None:
        if self.outtype not in OUTTYPES:
            raise M1Error(f"--outtype must be one of {', '.join(OUTTYPES)}, got '{self.outtype}'")
        if not str(self.gguf).endswith(".gguf"):
            raise M1Error(f"--gguf must name a .gguf file, got '{self.gguf}'")


def find_converter(llama_cpp: str | None) -> Path:
    """``convert_hf_to_gguf.py`` in ``llama_cpp`` (or $M1_LLAMA_CPP_DIR), or one error saying how to get it."""
    src = llama_cpp or os.environ.get(LLAMA_CPP_ENV)
    if not src:
        raise M1Error(f"m1 export --gguf runs llama.cpp's {CONVERTER}: pass --llama-cpp DIR (a llama.cpp checkout) "
                      f"or set {LLAMA_CPP_ENV}; `make llama-cpp-src` puts one in .llama.cpp")
    script = Path(src) / CONVERTER
    if not script.is_file():
        raise M1Error(f"{src} has no {CONVERTER}: point --llama-cpp at the top of a llama.cpp source tree "
                      "(for the llama-cpp-python sdist, its vendor/llama.cpp)")
    return script


def _read_config(model: Path) -> dict:
    cfg = read_config(check_model_dir(model))
    if cfg.get("model_type") != "granitemoehybrid":
        raise M1Error(f"{model} is a '{cfg.get('model_type')}' checkpoint; m1 export writes m1 checkpoints "
                      "(GraniteMoeHybrid, from `m1 convert`). For the teacher itself, use llama.cpp's converter "
                      "directly")
    return cfg


def _portable_view(model: Path, tmp: Path) -> Path:
    """A directory of links to ``model``'s files whose config and tokenizer config carry the names
    llama.cpp reads (:func:`make_portable`); the checkpoint itself is never modified."""
    view = tmp / model.name
    view.mkdir()
    for f in model.iterdir():
        if f.name in ("config.json", "tokenizer_config.json"):
            shutil.copyfile(f, view / f.name)  # make_portable may rewrite these two
        elif f.is_file():
            (view / f.name).symlink_to(f.resolve())
    make_portable(view)
    return view


def _set_scalar(field, value) -> None:
    """Overwrite a scalar GGUF value in place (the file is opened writable; the size is unchanged)."""
    field.parts[field.data[0]][0] = value


def export_gguf(cfg: ExportSettings, *, force: bool = False, log=print) -> Path:
    """Write ``cfg.model`` as the GGUF file ``cfg.gguf`` (atomically); returns its path."""
    cfg.validate()
    model, out = Path(cfg.model), Path(cfg.gguf)
    hf = _read_config(model)
    script = find_converter(cfg.llama_cpp)
    if out.exists() and not force:
        raise M1Error(f"{out} already exists: pass --force to replace it, or choose another --gguf")
    mamba = mamba_layer_mask(hf)
    attn = [i for i, m in enumerate(mamba) if not m]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".m1-export-", dir=out.parent) as tmp:
        tmp = Path(tmp)
        src = _portable_view(model, tmp)
        part = tmp / out.name
        name = read_record(model).get("teacher") or model.name
        cmd = [sys.executable, str(script), str(src), "--outfile", str(part), "--outtype", cfg.outtype,
               "--model-name", f"m1 {'hybrid' if any(mamba) else 'all-attention'} of {name}"]
        log(f"[export] llama.cpp's converter: {script}")
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0 or not part.is_file():
            tail = "\n".join((run.stderr or run.stdout).strip().splitlines()[-8:])
            raise M1Error(f"llama.cpp's {CONVERTER} failed on {model} (exit {run.returncode}):\n{tail}")
        arch = _fix_and_check(part, hf, attn, any(mamba))
        os.replace(part, out)
    log(f"[export] wrote {out} ({out.stat().st_size / 1e6:,.0f} MB, llama.cpp architecture '{arch}', "
        f"attention layers {','.join(map(str, attn)) or 'none'})")
    if any(mamba) and hf.get("mamba_expand", 2) != 2:
        log(f"[export] note: stock llama.cpp refuses this hybrid when it loads: {EXPAND_ASSERT} in "
            f"src/models/granite-hybrid.cpp expects mamba_expand = 2, and m1's mixers have mamba_expand = "
            f"{hf['mamba_expand']} (d_inner = {hf['mamba_expand'] * hf['hidden_size']}). See docs/readers.md")
    return out


def _fix_and_check(path: Path, hf: dict, attn: list[int], hybrid: bool) -> str:
    """Set RoPE and the context length for an m1 hybrid, then check the layout llama.cpp will read."""
    import gguf

    reader = gguf.GGUFReader(path, "r+")
    arch = str(reader.fields["general.architecture"].contents())
    if hybrid:
        rope = hf.get("position_embedding_type", "rope") == "rope"
        _set_scalar(reader.fields[f"{arch}.rope.scaling.finetuned"], rope)
        ctx = reader.fields.get(f"{arch}.context_length")
        if ctx is not None and hf.get("max_position_embeddings"):
            _set_scalar(ctx, int(hf["max_position_embeddings"]))
        kv = reader.fields[f"{arch}.attention.head_count_kv"].contents()
        got = [i for i, h in enumerate(kv) if h]
        if got != attn:
            raise M1Error(f"llama.cpp's converter wrote attention at layers {got}, but the checkpoint has it at "
                          f"{attn}: this llama.cpp version reads the layer layout differently; nothing was written")
    reader.data.flush()
    return arch

