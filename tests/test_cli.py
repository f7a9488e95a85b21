"""The m1 CLI on bad input: one clear line on stderr, non-zero exit, no traceback, nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from m1.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_clean_failure(code, err, out_dir, *needles):
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not out_dir.exists()
    leftovers = [p.name for p in out_dir.parent.iterdir() if p.name.startswith(f".{out_dir.name}.")]
    assert leftovers == []


def test_missing_teacher(capsys, tmp_path):
    code, _, err = _run(capsys, "convert", "--teacher", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    _assert_clean_failure(code, err, tmp_path / "o", "not found")


def test_unsupported_architecture(capsys, tmp_path):
    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    code, _, err = _run(capsys, "convert", "--teacher", str(d), "--out", str(tmp_path / "o"))
    _assert_clean_failure(code, err, tmp_path / "o", "unsupported architecture 'gpt2'")


def test_head_dim_mismatch(capsys, tmp_path):
    from m1.model.tiny import make_tiny_teacher

    d = make_tiny_teacher(tmp_path / "t", head_dim=32)  # 4 heads x 32 != hidden 64
    code, _, err = _run(capsys, "convert", "--teacher", str(d), "--out", str(tmp_path / "o"))
    _assert_clean_failure(code, err, tmp_path / "o", "head_dim")


@pytest.mark.parametrize("layers,needle", [("9", "out of range"), ("1,1", "twice"), (",", "no layers")])
def test_bad_layer_layouts(capsys, tmp_path, tiny_teachers, layers, needle):
    code, _, err = _run(capsys, "convert", "--teacher", str(tiny_teachers["llama_tied"]), "--out",
                        str(tmp_path / "o"), "--attn-layers", layers)
    _assert_clean_failure(code, err, tmp_path / "o", needle)


def _tiny_gguf(path):
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((64, 4096), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_gguf(capsys, tmp_path, damage):
    f = _tiny_gguf(tmp_path / "model.gguf")
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 3] if damage == "truncate" else os.urandom(4096))
    code, _, err = _run(capsys, "convert", "--teacher", str(f), "--out", str(tmp_path / "o"))
    _assert_clean_failure(code, err, tmp_path / "o", str(f))


def test_truncated_safetensors(capsys, tmp_path, tiny_teachers):
    d = tmp_path / "t"
    shutil.copytree(tiny_teachers["llama_tied"], d)
    st = d / "model.safetensors"
    st.write_bytes(st.read_bytes()[:5000])
    code, _, err = _run(capsys, "convert", "--teacher", str(d), "--out", str(tmp_path / "o"))
    _assert_clean_failure(code, err, tmp_path / "o", "cannot load teacher weights")


def test_existing_output_needs_force(capsys, tmp_path, tiny_teachers):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _run(capsys, "convert", "--teacher", str(tiny_teachers["llama_tied"]), "--out", str(out))
    assert code != 0 and err.startswith("error: ") and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"
    code, stdout, _ = _run(capsys, "convert", "--teacher", str(tiny_teachers["llama_tied"]), "--out", str(out), "--force")
    assert code == 0 and not (out / "keep.txt").exists() and (out / "m1.json").exists()
    assert "1 attention, 3 mamba2" in stdout


def test_info_reports_layers_and_state_bytes(capsys, tiny_hybrid):
    code, out, _ = _run(capsys, "info", str(tiny_hybrid), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["attention_layers"] == [1, 3] and info["mamba_layers"] == [0, 2]
    # 2 attention layers x (K and V) x 2 KV heads x head_dim 16 x 4 bytes
    assert info["kv_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    # per Mamba layer: conv (64 + 2*4*16) x 4 taps + SSM 4 heads x 16 x 16, float32, two layers
    assert info["mamba_state_bytes_per_sequence"] == 2 * ((64 + 2 * 4 * 16) * 4 + 4 * 16 * 16) * 4
    from safetensors.torch import load_file
    assert info["parameters"] == sum(t.numel() for t in load_file(str(tiny_hybrid / "model.safetensors")).values())


def test_info_on_missing_dir(capsys, tmp_path):
    code, _, err = _run(capsys, "info", str(tmp_path / "missing"))
    assert code == 1 and err.startswith("error: ") and "does not exist" in err


def test_console_script_help_and_error():
    r = subprocess.run([sys.executable, "-m", "m1", "convert", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--attn-layers" in r.stdout and "--teacher" in r.stdout
    r = subprocess.run([sys.executable, "-m", "m1", "info", "/definitely/not/here"], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.startswith("error: ")
