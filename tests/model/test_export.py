"""m1 export --gguf: llama.cpp's own converter (M1_LLAMA_CPP_DIR; `make test` fetches it into .llama.cpp),
then m1's fixes for its hybrids, checked by reading the file back with gguf-py.

Whether llama.cpp *runs* the file is benchmarks/llama_cpp_check.py (it needs llama-cpp-python, a
compiled package); its recorded result is in docs/readers.md.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from m1.errors import M1Error
from m1.model.checkpoint import read_record
from m1.model.export import ExportSettings, export_gguf

LLAMA_CPP = os.environ.get("M1_LLAMA_CPP_DIR")
needs_converter = pytest.mark.skipif(not LLAMA_CPP or not (Path(LLAMA_CPP) / "convert_hf_to_gguf.py").is_file(),
                                     reason="M1_LLAMA_CPP_DIR is not set to llama.cpp's source (make llama-cpp-src)")
QUIET = dict(log=lambda m: None)


def _fields(path):
    import gguf

    r = gguf.GGUFReader(path)
    return r, {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")}


def _tensor(reader, name):
    import numpy as np

    t = next(t for t in reader.tensors if t.name == name)
    return np.asarray(t.data).reshape([int(d) for d in reversed(t.shape)])


@pytest.mark.slow
@needs_converter
def test_hybrid_gets_rope_its_context_length_and_its_attention_layers(smollm2_hybrid, tmp_path):
    import numpy as np
    from safetensors.torch import load_file

    out = export_gguf(ExportSettings(model=str(smollm2_hybrid), gguf=str(tmp_path / "h.gguf"), outtype="f32",
                                     llama_cpp=LLAMA_CPP), **QUIET)
    reader, kv = _fields(out)
    cfg = json.loads((smollm2_hybrid / "config.json").read_text())
    assert kv["general.architecture"] == "granitehybrid"
    # the converter writes False and 2**20 for every GraniteMoeHybrid with Mamba layers; m1's attention uses RoPE
    assert kv["granitehybrid.rope.scaling.finetuned"] is True
    assert kv["granitehybrid.context_length"] == cfg["max_position_embeddings"] == 8192
    heads = kv["granitehybrid.attention.head_count_kv"]
    assert [i for i, h in enumerate(heads) if h] == read_record(smollm2_hybrid)["attn_layers"] == [4, 9, 14, 19, 24, 29]
    assert kv["granitehybrid.ssm.inner_size"] == cfg["mamba_expand"] * cfg["hidden_size"]
    # the file holds this checkpoint's weights (f32: exact), Mamba's A as llama.cpp wants it (-exp(A_log))
    w = load_file(str(smollm2_hybrid / "model.safetensors"))
    assert np.array_equal(_tensor(reader, "token_embd.weight"), w["model.embed_tokens.weight"].numpy())
    a = _tensor(reader, "blk.0.ssm_a").reshape(-1)
    assert np.allclose(a, -np.exp(w["model.layers.0.mamba.A_log"].float().numpy()), rtol=1e-6)
    assert kv["general.name"] == "m1 hybrid of smollm2-135m"


@pytest.mark.slow
@needs_converter
def test_checkpoint_with_transformers5_layer_names_exports_the_same_layout(smollm2_hybrid, tmp_path):
    # m1 checkpoints written before m1 wrote "attention"/"mamba": llama.cpp's converter would count no layer as
    # attention; m1 exports them through a portable copy of the config and leaves the checkpoint as it was
    old = tmp_path / "old"
    old.mkdir()
    for f in smollm2_hybrid.iterdir():
        (old / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, old / f.name)
    cfg = json.loads((old / "config.json").read_text())
    cfg["layer_types"] = ["full_attention" if t == "attention" else "linear_attention" for t in cfg["layer_types"]]
    (old / "config.json").write_text(json.dumps(cfg))
    before = (old / "config.json").read_text()
    out = export_gguf(ExportSettings(model=str(old), gguf=str(tmp_path / "o.gguf"), outtype="bf16",
                                     llama_cpp=LLAMA_CPP), **QUIET)
    _, kv = _fields(out)
    assert [i for i, h in enumerate(kv["granitehybrid.attention.head_count_kv"]) if h] == [4, 9, 14, 19, 24, 29]
    assert (old / "config.json").read_text() == before
    with pytest.raises(M1Error, match="already exists.*--force"):
        export_gguf(ExportSettings(model=str(old), gguf=str(out), llama_cpp=LLAMA_CPP), **QUIET)


@pytest.mark.slow
@needs_converter
def test_all_attention_checkpoint_becomes_a_plain_granite_model(smollm2_teacher, tmp_path):
    from m1.model.convert import ConvertSettings, convert

    exact = convert(ConvertSettings(teacher="smollm2-135m", attn_layers="all"), tmp_path / "exact", **QUIET)
    notes = []
    out = export_gguf(ExportSettings(model=str(exact), gguf=str(tmp_path / "e.gguf"), llama_cpp=LLAMA_CPP),
                      log=notes.append)
    _, kv = _fields(out)
    assert kv["general.architecture"] == "granite"
    assert kv["granite.block_count"] == 30 and kv["granite.rope.freq_base"] == 100000.0
    assert not any("refuses" in n for n in notes)  # the mamba_expand note is for hybrids only


def test_bad_input_is_one_clear_error_before_anything_runs(tiny_hybrid, tiny_teachers, tmp_path, monkeypatch):
    monkeypatch.delenv("M1_LLAMA_CPP_DIR", raising=False)
    gguf = str(tmp_path / "x.gguf")
    with pytest.raises(M1Error, match=r"--llama-cpp DIR.*make llama-cpp-src"):
        export_gguf(ExportSettings(model=str(tiny_hybrid), gguf=gguf), **QUIET)
    with pytest.raises(M1Error, match="has no convert_hf_to_gguf.py"):
        export_gguf(ExportSettings(model=str(tiny_hybrid), gguf=gguf, llama_cpp=str(tmp_path)), **QUIET)
    with pytest.raises(M1Error, match="must name a .gguf file"):
        export_gguf(ExportSettings(model=str(tiny_hybrid), gguf=str(tmp_path / "x.bin")), **QUIET)
    with pytest.raises(M1Error, match="'llama' checkpoint.*llama.cpp's converter directly"):
        export_gguf(ExportSettings(model=str(tiny_teachers["llama_tied"]), gguf=gguf), **QUIET)
    with pytest.raises(M1Error, match="no config.json"):
        export_gguf(ExportSettings(model=str(tmp_path), gguf=gguf), **QUIET)
    assert not (tmp_path / "x.gguf").exists()


@needs_converter
def test_converter_failure_names_its_last_lines_and_writes_nothing(tiny_hybrid, tmp_path):
    # the real converter refuses the tiny test model (llama3 RoPE scaling has no GraniteHybrid tensor in GGUF,
    # and its toy tokenizer is no pre-tokenizer llama.cpp knows): its own last words reach the user
    with pytest.raises(M1Error, match=r"(?s)convert_hf_to_gguf.py failed on .* \(exit 1\):\n.*Error"):
        export_gguf(ExportSettings(model=str(tiny_hybrid), gguf=str(tmp_path / "x.gguf"), llama_cpp=LLAMA_CPP),
                    **QUIET)
    assert list(tmp_path.iterdir()) == []  # no temporary left


def test_cli_export(capsys, tiny_hybrid, tmp_path, monkeypatch):
    from m1.cli import main

    monkeypatch.delenv("M1_LLAMA_CPP_DIR", raising=False)
    assert main(["export", "--model", str(tiny_hybrid), "--gguf", str(tmp_path / "x.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "--llama-cpp" in err
