"""Does stock llama.cpp run what `m1 export --gguf` writes? Greedy tokens against transformers.

    python benchmarks/llama_cpp_check.py --llama-python VENV/bin/python [--llama-cpp .llama.cpp]
                                          [--hybrid DIR] [--tokens 24] [--json PATH]

``--llama-python`` is a Python with llama-cpp-python installed (a compiled package: `pip install
llama-cpp-python==0.3.36` builds llama.cpp from source, ~15-25 min on 2 cores, so it is not part of
`make test`). The script converts SmolLM2-135M twice (all attention, and the default hybrid unless
``--hybrid`` names one), exports both in float32 with `m1 export --gguf`, and decodes the same prompt
token ids greedily with transformers (float32) and with llama.cpp, each model in its own subprocess:
llama.cpp aborts the process on a failed GGML_ASSERT. Prints one row per model and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPTS = ["Tom has 12 apples and gives 5 away. How many apples does he have left?",
           "The capital of France is", "def fibonacci(n):"]

CHILD = r"""
import json, sys
from llama_cpp import Llama
path, n, prompts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
llm = Llama(model_path=path, n_ctx=512, n_threads=2, verbose=True)  # verbose=False also hides a failed assert
out = []
for ids in prompts:
    llm.reset()
    got = []
    for t in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        if t == llm.token_eos() or len(got) == n:
            break
        got.append(int(t))
    out.append(got)
print(json.dumps(out))
"""


def hf_greedy(model_dir: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    out = []
    for ids in prompts:
        with torch.no_grad():
            g = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
        out.append(g[:next((i for i, t in enumerate(g) if t in eos), len(g))])
    return out


def llama_cpp_greedy(python: str, gguf: Path, prompts: list[list[int]], n: int) -> dict:
    run = subprocess.run([python, "-c", CHILD, str(gguf), str(n), json.dumps(prompts)], capture_output=True, text=True)
    if run.returncode != 0:
        lines = [ln for ln in run.stderr.splitlines() if "GGML_ASSERT" in ln] or run.stderr.splitlines()[-1:] or [""]
        return {"loaded": False, "exit": run.returncode, "error": lines[0].strip()}
    return {"loaded": True, "tokens": json.loads(run.stdout.strip().splitlines()[-1])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-python", required=True, help="a Python with llama-cpp-python installed")
    ap.add_argument("--llama-cpp", default=".llama.cpp", help="llama.cpp source with convert_hf_to_gguf.py")
    ap.add_argument("--hybrid", help="an m1 hybrid checkpoint (default: SmolLM2-135M converted, default layout)")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()

    from transformers import AutoTokenizer

    from m1.model.convert import ConvertSettings, convert
    from m1.model.export import ExportSettings, export_gguf

    version = subprocess.run([a.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = {"all-attention": convert(ConvertSettings(teacher="smollm2-135m", attn_layers="all"),
                                           tmp / "exact", log=lambda m: None),
                  "hybrid": Path(a.hybrid) if a.hybrid else convert(ConvertSettings(teacher="smollm2-135m"),
                                                                    tmp / "hybrid", log=lambda m: None)}
        tok = AutoTokenizer.from_pretrained(models["all-attention"])
        prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
        for name, d in models.items():
            gguf = export_gguf(ExportSettings(model=str(d), gguf=str(tmp / f"{name}.gguf"), outtype="f32",
                                              llama_cpp=a.llama_cpp), log=lambda m: None)
            ref = hf_greedy(d, prompts, a.tokens)
            got = llama_cpp_greedy(a.llama_python, gguf, prompts, a.tokens)
            if got["loaded"]:
                got["equal_prompts"] = sum(x == y for x, y in zip(ref, got["tokens"]))
                got["text"] = [tok.decode(t) for t in got["tokens"]]
            rows[name] = {"checkpoint": str(d), **got, "transformers_text": [tok.decode(t) for t in ref]}
            status = (f"loaded; greedy tokens equal transformers' on {got['equal_prompts']}/{len(prompts)} prompts"
                      if got["loaded"] else f"refused (exit {got['exit']}): {got['error']}")
            print(f"{name:14s} llama-cpp-python {version}: {status}")
    result = {"llama_cpp_python": version, "tokens": a.tokens, "prompts": PROMPTS, "models": rows}
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
