"""The engine: requests in, completions out (see the package docstring for the whole flow)."""

from __future__ import annotations

import os
import random
import sys
import time
from typing import Callable, Sequence

from ..errors import M1Error
from ..model.checkpoint import eos_token_ids, load_model
from .arch import Arch
from .backends import FastBackend, HFBackend
from .graphs import StaticRunner
from .params import BACKENDS, FINISH_BUDGET, RequestOutput, SamplingParams, StreamEvent, requests_of
from .prompts import check_context, encode_prompt
from .sampling import sample_tokens, sampling_tensors
from .scheduler import Request, Row, plan_groups, prefill_batches, row_bytes
from .step import DecodeStep
from .stopping import Stopping



class Engine:
    """Batched sampler over a loaded model; see the package docstring.

    ``backend``: "auto" (fast when the architecture is supported, else hf), "fast", "hf".
    ``max_batch_size``: most sample rows decoded together (default 64 on CPU, 256 on CUDA).
    ``max_cache_bytes``: bound on the preallocated decode state of one batch (default: a quarter of
    RAM on CPU, half of free GPU memory). ``prefill_tokens``: most (padded) tokens per prefill forward.
    ``compile``: the static step under torch.compile; ``cuda_graphs``: replay it as CUDA graphs (CUDA,
    fast backend; default on there); ``fused_decode``: the Triton Mamba state update;
    ``ssm_dtype``: float32 (default), bfloat16, float16 or "model".
    """

    def __init__(self, model, tokenizer, *, backend: str = "auto", max_batch_size: int | None = None,
                 max_cache_bytes: int | None = None, prefill_tokens: int = 8192, compile: bool = False,
                 cuda_graphs: bool | None = None, fused_decode: bool = False, ssm_dtype=None):
        import torch

        if backend not in ("auto", "fast", "hf"):
            raise M1Error(f"backend must be one of auto, fast, hf for a loaded model (vllm: Engine.from_pretrained), got '{backend}'")
        self.model = model.eval()
        self.tokenizer = tokenizer
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        why = Arch.unsupported(model)
        if backend == "fast" and why:
            raise M1Error(f"the fast backend does not support this model ({why}); use backend='hf'")
        self.backend = "hf" if (backend == "hf" or why) else "fast"
        cuda = self.device.type == "cuda"
        if cuda_graphs and not cuda:
            raise M1Error("cuda_graphs needs the model on a CUDA device")
        self.max_batch_size = max_batch_size or (256 if cuda else 64)
        self.max_cache_bytes = int(max_cache_bytes if max_cache_bytes is not None else self._default_cache_bytes())
        self.prefill_tokens = int(prefill_tokens)
        self.max_context = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        eos = eos_token_ids(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (min(eos) if eos else 0)
        self.stopping = Stopping(tokenizer, eos)
        self.ssm_dtype = self._resolve_ssm_dtype(ssm_dtype)
        if self.backend == "hf":
            self.arch = None
            self.runner = HFBackend(model, self.device, self.pad_id)
            return
        self.arch = Arch(model)
        compiled = bool(compile)
        # CUDA: decode steps replayed as CUDA graphs (one launch instead of ~50 per layer) unless turned off
        graphs = cuda and not compiled and cuda_graphs is not False
        slice_head = self.device.type == "cpu" and self.dtype == torch.float32 and not compiled
        decode = DecodeStep(self.arch, self._state_step(fused_decode), slice_head=slice_head)
        static = StaticRunner(decode, self.device, compile=compiled) if (compiled or graphs) else None
        self.runner = FastBackend(model, self.device, self.pad_id, decode, static, self.dtype, self.ssm_dtype,
                                  self.prefill_tokens)

    def _default_cache_bytes(self) -> int:
        import torch

        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return free // 2
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
        except (ValueError, OSError, AttributeError):
            return 4 << 30

    def _resolve_ssm_dtype(self, ssm_dtype):
        """The Mamba SSM state's dtype between decode steps: float32 by default (what transformers' scan
        returns); the model dtype halves the bytes a step moves for it (vLLM's default), updates still
        run in float32."""
        import torch

        dt = torch.float32 if ssm_dtype in (None, "float32") else (
            self.dtype if ssm_dtype == "model" else getattr(torch, ssm_dtype, None) if isinstance(ssm_dtype, str)
            else ssm_dtype)
        if dt not in (torch.float32, torch.bfloat16, torch.float16):
            raise M1Error(f"ssm_dtype must be float32, bfloat16, float16 or 'model', got {ssm_dtype}")
        return dt

    def _state_step(self, fused: bool):
        from ..model import kernels

        if not fused:
            return kernels.mamba_state_step
        why = kernels.fused_decode_unavailable(self.device)
        if why:
            raise M1Error(f"fused_decode: {why}")
        return kernels.mamba_state_step_fused

    @property
    def eos_ids(self):
        """The token ids that end a sample (the model's generation_config and the tokenizer's EOS)."""
        return self.stopping.eos_ids

    @eos_ids.setter
    def eos_ids(self, ids) -> None:
        self.stopping.eos_ids = ids

    @property
    def decode(self) -> DecodeStep | None:
        """The fast backend's decode step (None on the hf backend)."""
        return getattr(self.runner, "decode", None)

    @property
    def static(self) -> StaticRunner | None:
        """The static-shape runner (torch.compile / CUDA graphs), None when decoding eagerly."""
        return getattr(self.runner, "static", None)

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, directory, *, device: str | None = None, dtype=None, backend: str = "auto", **kw):
        """Load a checkpoint directory (m1 or plain HF) with :func:`m1.model.checkpoint.load_model`."""
        if backend not in BACKENDS:
            raise M1Error(f"backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
        if backend == "vllm":
            from .vllm import VLLMEngine

            return VLLMEngine(directory, dtype=dtype, **kw)
        model, tokenizer = load_model(directory, dtype=dtype, device=device)
        return cls(model, tokenizer, backend=backend, **kw)

    def release(self) -> None:
        """Free the decode buffers (and CUDA graphs) kept for the next call of the same shape."""
        self.runner.release()

    # ------------------------------------------------------------------------------- tokenising
    def encode(self, prompt, chat: bool = False) -> list[int]:
        """Token ids of a prompt: a token-id list is used as is; a string optionally via the chat template."""
        return encode_prompt(self.tokenizer, prompt, chat)

    def tokenize(self, prompt, chat: bool = False) -> list[int]:
        """:meth:`encode` plus the context check that :meth:`generate` applies."""
        return check_context(self.encode(prompt, chat=chat), self.max_context)

    def row_bytes(self, length: int) -> int:
        """Bytes one row of ``length`` tokens holds in the decode buffers (state, bias, position)."""
        return row_bytes(self.model.config, length, self.dtype, self.ssm_dtype)

    # ----------------------------------------------------------------------------------- public
    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 chat: bool = False, on_token: Callable[[StreamEvent], None] | None = None,
                 progress: bool = False, deadline: float | None = None,
                 on_output: Callable[[RequestOutput], None] | None = None) -> list[RequestOutput]:
        """Sample completions for ``prompts`` (a string, a token-id list, or a list of either).

        ``params``: one :class:`SamplingParams` for all prompts or one per prompt. ``on_token`` is
        called after every generated token of every sample. ``on_output`` is called with a prompt's
        :class:`RequestOutput` the moment its last sample ends, while the rest of the batch decodes
        (``m1 eval`` grades and saves each problem there, so a kill loses only unfinished problems).
        ``deadline`` (a ``time.perf_counter()`` value): stop everything then; unfinished samples end
        with finish_reason "budget".
        """
        import torch

        prompts, plist = requests_of(prompts, params)
        if not prompts:
            return []
        reqs, rows_by_req = [], []
        for i, (pr, sp) in enumerate(zip(prompts, plist)):
            sp.validate()
            ids = self.tokenize(pr, chat=chat)
            max_new = min(sp.max_new_tokens, self.max_context - len(ids))
            base = sp.seed if sp.seed is not None else random.SystemRandom().randrange(1 << 62)
            reqs.append(Request(i, pr, ids, sp))
            rows_by_req.append([Row(i, j, base + j, sp, max_new) for j in range(sp.n)])
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(reqs), file=sys.stderr, unit="prompt", dynamic_ncols=True)
        outputs: list[RequestOutput | None] = [None] * len(reqs)
        pending = {r.index: sp.n for r, sp in zip(reqs, plist)}

        def row_done(row: Row) -> None:
            pending[row.req] -= 1
            if pending[row.req] == 0:
                outputs[row.req] = self.stopping.request_output(reqs[row.req], rows_by_req[row.req])
                if bar is not None:
                    bar.update(1)
                if on_output is not None:
                    on_output(outputs[row.req])

        try:
            with torch.inference_mode():
                for group in plan_groups(reqs, rows_by_req, self.max_batch_size, self.max_cache_bytes,
                                         self.row_bytes):
                    if deadline is not None and time.perf_counter() >= deadline:
                        now = time.perf_counter()
                        for row in group:  # the budget is spent before this batch started
                            self.stopping.finish(row, FINISH_BUDGET, now, now, None)
                            row_done(row)
                    else:
                        self._run_group(reqs, group, on_token, deadline, row_done)
        finally:
            if bar is not None:
                bar.close()
        return outputs  # type: ignore[return-value]

    def next_token_logits(self, prompts, chat: bool = False):
        """Float32 logits (prompts, vocab) of the token after each prompt (batched, left-padded)."""
        import torch

        ids = [self.encode(p, chat=chat) for p in prompts]
        with torch.inference_mode():
            chunks = []
            for batch in prefill_batches(list(range(len(ids))), [len(x) for x in ids], self.prefill_tokens):
                _, logits, _, _ = self.runner.prefill([ids[i] for i in batch])
                chunks.append((batch, logits))
            vocab = chunks[0][1].shape[1]
            out = torch.empty(len(ids), vocab, dtype=torch.float32, device=self.device)
            for batch, logits in chunks:
                out[torch.tensor(batch, device=self.device)] = logits
        return out

    def _run_group(self, reqs, rows, on_token, deadline, row_done) -> None:
        """Decode one group of rows to the end; ``row_done(row)`` once for each row, as it ends."""
        import torch

        t0 = time.perf_counter()
        dev = self.device
        for row in rows:
            g = torch.Generator()  # on CPU whatever the device: a row draws one number per step
            g.manual_seed(row.seed)
            row.gen = g
        req_ids = sorted({row.req for row in rows})
        st, logits = self.runner.start(reqs, req_ids, rows)
        active = list(rows)
        samp = sampling_tensors([r.params for r in active], dev)
        while True:
            toks = sample_tokens(logits, *samp, [r.gen for r in active])
            now = time.perf_counter()
            finished = []
            for slot, (row, t) in enumerate(zip(active, toks.tolist())):
                self.stopping.append(row, t, on_token, now, t0)
                if row.done:
                    finished.append(slot)
            for slot in finished:
                row_done(active[slot])
            if deadline is not None and now >= deadline:
                for row in active:
                    if not row.done:
                        self.stopping.finish(row, FINISH_BUDGET, now, t0, on_token)
                        row_done(row)
                break
            if finished:
                alive = [s for s in range(len(active)) if not active[s].done]
                if not alive:
                    break
                order = self.runner.compact(st, alive)
                active = [active[s] for s in order]
                idx = torch.tensor(order, device=dev)
                toks = toks.index_select(0, idx)
                samp = sampling_tensors([r.params for r in active], dev)
            logits = self.runner.step(st, toks)
