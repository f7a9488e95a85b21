"""The two in-process backends behind one interface: ``start`` a group (prefill its prompts, fill the
decode state, return the first logits), ``step`` (one token per live row -> float32 logits),
``compact`` (drop finished rows, return the new order of the live ones), ``release``.

``FastBackend``: m1's own decode step over preallocated buffers (:mod:`m1.engine.step`), static
shapes under torch.compile / CUDA graphs when asked (:mod:`m1.engine.graphs`).
``HFBackend``: the reference, ``model.forward`` with the transformers cache at every step
(replication and compaction on the cache's own tensors); used for architectures the fast step
does not know.
"""

from __future__ import annotations

from .arch import Arch
from .graphs import StaticRunner
from .prefill import cache_apply, prefill
from .scheduler import prefill_batches
from .state import DecodeState, static_capacity
from .step import DecodeStep


class Backend:
    """What both share: the model, its device, the padding id, and the prefill."""

    def __init__(self, model, device, pad_id: int):
        self.model, self.device, self.pad_id = model, device, pad_id

    def prefill(self, ids_list):
        """(cache, last logits, mask, lengths) of the prompts (:func:`m1.engine.prefill.prefill`)."""
        return prefill(self.model, ids_list, self.pad_id, self.device)

    def release(self) -> None:
        """Free what is kept for the next call (the fast backend's static buffers and graphs)."""


class HFBackend(Backend):
    def start(self, reqs, req_ids, rows):
        import torch

        cache, last, mask, lengths = self.prefill([reqs[i].ids for i in req_ids])
        where = {r: k for k, r in enumerate(req_ids)}
        idx = torch.tensor([where[r.req] for r in rows], device=self.device)
        cache_apply(cache, lambda t: t.index_select(0, idx.to(t.device)))
        st = {"cache": cache, "mask": mask.index_select(0, idx), "pos": lengths.index_select(0, idx).clone()}
        return st, last.index_select(0, idx)

    def step(self, st, toks):
        import torch

        mask = torch.cat([st["mask"], torch.ones_like(st["mask"][:, :1])], dim=1)
        st["mask"] = mask
        out = self.model(input_ids=toks[:, None], attention_mask=mask, position_ids=st["pos"][:, None],
                         past_key_values=st["cache"], use_cache=True, logits_to_keep=1)
        st["pos"] = st["pos"] + 1
        return out.logits[:, -1, :].float()

    def compact(self, st, alive: list[int]) -> list[int]:
        import torch

        idx = torch.tensor(alive, device=self.device)
        cache_apply(st["cache"], lambda t: t.index_select(0, idx.to(t.device)))
        st["mask"] = st["mask"].index_select(0, idx)
        st["pos"] = st["pos"].index_select(0, idx)
        return alive


class FastBackend(Backend):
    """``decode``: the step; ``static``: a :class:`StaticRunner` (compiled / CUDA graphs) or None for
    the dynamic step; ``prefill_tokens``: most padded tokens per prefill forward."""

    def __init__(self, model, device, pad_id: int, decode: DecodeStep, static: StaticRunner | None,
                 dtype, ssm_dtype, prefill_tokens: int):
        super().__init__(model, device, pad_id)
        self.decode, self.static = decode, static
        self.arch: Arch = decode.arch
        self.dtype, self.ssm_dtype, self.prefill_tokens = dtype, ssm_dtype, prefill_tokens

    def state(self, rows: int, prompt_len: int, capacity: int) -> DecodeState:
        """Empty decode buffers for ``rows`` rows: the kept static state when its shape matches (its
        CUDA graphs stay valid), else new ones (static mode keeps them for the next group)."""
        st = self.static.kept if self.static is not None else None
        if st is not None and st.rows == rows and st.cap == static_capacity(capacity):
            st.reset(prompt_len)
            return st
        if self.static is not None:
            self.static.kept = None  # free the old buffers (and graphs) before allocating new ones
        st = DecodeState(self.arch, rows, prompt_len, capacity, self.dtype, self.device, self.ssm_dtype,
                         static=self.static is not None)
        if self.static is not None:
            self.static.kept = st
        return st

    def start(self, reqs, req_ids, rows):
        import torch

        dev = self.device
        lens = {i: len(reqs[i].ids) for i in req_ids}
        lp = max(lens.values())
        st = self.state(len(rows), lp, lp + max(r.max_new for r in rows))
        st.nb = len(rows)
        logits = None
        for batch in prefill_batches(req_ids, [lens[i] for i in req_ids], self.prefill_tokens):
            cache, last, mask, lengths = self.prefill([reqs[i].ids for i in batch])
            pos_in_batch = {req: k for k, req in enumerate(batch)}
            dest = [s for s, r in enumerate(rows) if r.req in pos_in_batch]
            src = torch.tensor([pos_in_batch[rows[s].req] for s in dest], device=dev)
            dest_t = torch.tensor(dest, device=dev)
            st.fill(cache, self.arch, dest_t, src, mask, lengths)
            if logits is None:
                logits = torch.empty(len(rows), last.shape[1], dtype=torch.float32, device=dev)
            logits[dest_t] = last.index_select(0, src)
            del cache
        self.rope_table(st)
        return st, logits

    def rope_table(self, st: DecodeState) -> None:
        """The RoPE cos/sin for every position of the buffers (once: the same for their lifetime)."""
        import torch

        a = self.arch
        if a.rotary is not None and a.n_attn and st.cos is None:
            positions = torch.arange(st.cap, device=self.device)[None]
            dummy = torch.empty(1, dtype=self.dtype, device=self.device)
            cos, sin = a.rotary(dummy, positions)
            st.cos, st.sin = cos[0], sin[0]

    def step(self, st: DecodeState, toks):
        if self.static is not None:
            return self.static.run(st, toks)
        return self.decode.dynamic(st, toks).float()

    def compact(self, st: DecodeState, alive: list[int]) -> list[int]:
        return st.compact(alive)

    def release(self) -> None:
        if self.static is not None:
            self.static.kept = None
