"""Static-shape decode for torch.compile and CUDA graphs.

Eager decode on CUDA is launch-bound (5.6x slower at the 3B shape, batch 1, on an H100; see
docs/generate.md), so the step runs with static shapes (live rows padded to a power of two,
attention over key columns rounded up to ``GRAPH_KEY_BUCKET`` behind the bias, the write column a
tensor, buffers at fixed addresses reused by later groups of the same shape) and is either captured
as CUDA graphs and replayed, or wrapped in ``torch.compile`` (``mode="reduce-overhead"`` on CUDA;
key length and row count become symbolic after their first change, so a long generation compiles
~3 times, not once per key bucket).
"""

from __future__ import annotations

from .state import DecodeState
from .step import DecodeStep

GRAPH_KEY_BUCKET = 256  # static decode: one graph per (rows, key length rounded up to this)


class StaticRunner:
    """Runs :meth:`DecodeStep.static` compiled (``compile=True``) or as CUDA graphs (on CPU, where
    there are none, the static step runs eagerly: how the tests exercise it). ``kept`` is the last
    static state, reused by a group of the same shape so its graphs stay valid."""

    def __init__(self, decode: DecodeStep, device, compile: bool = False):
        import torch

        self.decode, self.device = decode, device
        self.mode = "compile" if compile else "graphs"
        self.kept: DecodeState | None = None
        self.compiled = None
        if compile:
            mode = "reduce-overhead" if device.type == "cuda" else "default"  # reduce-overhead = CUDA graphs
            # dynamic=None: the key length (bucketed) and the live rows become symbolic once they change,
            # so a long generation compiles ~3 times instead of once per key bucket
            self.compiled = torch.compile(decode.static, mode=mode, dynamic=None)

    def run(self, st: DecodeState, toks):
        """One static-shape decode step for the ``len(toks)`` live rows -> float32 logits."""
        nb = toks.shape[0]
        st.tok_in[:nb].copy_(toks)
        if nb < st.nbb:
            st.tok_in[nb:st.nbb].zero_()  # padding rows: dead slots, their outputs are dropped
        kb = min(st.cap, -(-(st.col + 1) // GRAPH_KEY_BUCKET) * GRAPH_KEY_BUCKET)  # keys read, bucketed
        if self.compiled is not None:
            out = self.compiled(st, st.tok_in[:st.nbb], kb)
        else:
            out = self._graph_step(st, kb)
        st.col += 1
        return out[:nb].float()

    def _graph_step(self, st: DecodeState, kb: int):
        """:meth:`DecodeStep.static` replayed from a CUDA graph captured per (rows, key-length bucket).

        The first step at a new shape runs eagerly (on a side stream, as CUDA graph capture wants
        its libraries warmed up), the second captures the step and replays it, later ones replay.
        Capturing records the step's writes into the state buffers without running them, which is
        why the captured step is then replayed to actually take it. Graphs share one memory pool:
        they never run concurrently and only their logits outlive a replay (read at once).
        On CPU (tests) the same static step runs eagerly."""
        import torch

        key = (st.nbb, kb)
        g = st.graphs.get(key)
        if g is not None:
            g.replay()
            return st.outs[key]
        toks = st.tok_in[:st.nbb]
        if self.device.type != "cuda":
            return self.decode.static(st, toks, kb)
        if key not in st.warm:
            st.warm.add(key)
            side, main = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                out = self.decode.static(st, toks, kb)
            main.wait_stream(side)
            return out
        if st.pool is None:
            st.pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=st.pool):
            st.outs[key] = self.decode.static(st, toks, kb)
        st.graphs[key] = g
        g.replay()
        return st.outs[key]
