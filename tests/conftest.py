"""Shared fixtures: tiny random teachers (fast) and the real SmolLM2-135M teacher (converted once)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# One intra-op thread: the tiny models gain nothing from more, and the checker's worker processes
# and other jobs on a 2-core machine make OpenMP's spinning threads 10-30x slower.
import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory):
    """name -> directory of a tiny random teacher: llama3-rope tied/untied Llama and a Qwen2 with biases."""
    from m1.model.tiny import make_tiny_teacher

    root = tmp_path_factory.mktemp("teachers")
    return {
        "llama_tied": make_tiny_teacher(root / "llama_tied", arch="llama", tie=True),
        "llama_untied": make_tiny_teacher(root / "llama_untied", arch="llama", tie=False, seed=1),
        "qwen2": make_tiny_teacher(root / "qwen2", arch="qwen2", tie=False, seed=2),
    }


@pytest.fixture(scope="session")
def tiny_hybrid(tiny_teachers, tmp_path_factory):
    """A converted tiny Llama hybrid (default layout: 1 of 4 layers attention)."""
    from m1.model.convert import ConvertSettings, convert

    out = tmp_path_factory.mktemp("hybrids") / "llama_hybrid"
    return convert(ConvertSettings(teacher=str(tiny_teachers["llama_untied"]), attn_layers="1,3"),
                   out, log=lambda m: None)


@pytest.fixture(scope="session")
def smollm2_teacher():
    from m1.errors import M1Error
    from m1.model.teachers import load_teacher

    try:
        return load_teacher("smollm2-135m")
    except M1Error as e:
        pytest.skip(f"SmolLM2 teacher unavailable: {e}")


@pytest.fixture(scope="session")
def smollm2_hybrid(smollm2_teacher, tmp_path_factory):
    """SmolLM2-135M converted once per session with the default layout (6 of 30 attention)."""
    from m1.model.convert import ConvertSettings, convert

    out = tmp_path_factory.mktemp("smollm2") / "hybrid"
    return convert(ConvertSettings(teacher="smollm2-135m"), out, log=lambda m: None)


class FakeVLLM:
    """Stands in for the ``vllm`` module: records what m1 passes and answers like vLLM's
    ``LLM.generate`` (RequestOutput.outputs of CompletionOutput with index, text, token_ids,
    finish_reason)."""

    def __init__(self, tokenizer):
        from types import SimpleNamespace

        fake = self
        self.calls, self.llm_kw = [], None

        class LLM:
            def __init__(self, model, dtype, **kw):
                fake.llm_kw = dict(model=model, dtype=dtype, **kw)

            def get_tokenizer(self):
                return tokenizer

            def generate(self, inputs, params, use_tqdm=False):
                fake.calls.append((inputs, params))
                outs = []
                for inp, sp in zip(inputs, params):
                    ids = inp["prompt_token_ids"]
                    comps = [SimpleNamespace(index=j, token_ids=ids[-2:], text=tokenizer.decode(ids[-2:]),
                                             finish_reason=("length", "abort")[j % 2]) for j in range(sp.n)]
                    outs.append(SimpleNamespace(prompt_token_ids=ids, outputs=comps))
                return outs

        self.LLM = LLM
        self.SamplingParams = lambda **kw: SimpleNamespace(**kw)


@pytest.fixture
def fake_vllm(monkeypatch):
    """install(tokenizer) -> a :class:`FakeVLLM` put in ``sys.modules["vllm"]`` for this test."""
    import sys

    def install(tokenizer):
        fake = FakeVLLM(tokenizer)
        monkeypatch.setitem(sys.modules, "vllm", fake)
        return fake

    return install


@pytest.fixture(scope="module")
def one_torch_thread():
    """Decode steps are tiny: on 2 shared cores OpenMP spinning makes 2 threads up to 20x slower than 1.
    Modules of decode tests take it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
