"""``m1 bench``: decode throughput and memory, hybrid vs a same-size transformer, against byte limits.

Decoding is memory-bound: every step reads all weights plus each sequence's KV cache (attention
layers, growing with length) or fixed state (Mamba layers). So at a given batch the speed-up a
hybrid can have over its all-attention twin is capped by the ratio of bytes read per step; the
bench prints that *byte-limit ratio* beside each measured ratio, and on CUDA the fraction of the
memory-bandwidth roofline each run reaches.

With ``--shape`` it builds random-weight models (decode speed does not depend on the weight
values), the hybrid with ``--layout`` and its all-attention baseline, and runs both through the
same engine (``m1.engine``) with EOS ignored.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import M1Error
from .model.info import mamba_state_sizes, state_bytes_per_row  # noqa: F401 (state_bytes_per_row: re-exported)
from .settings import setting

# Shapes of public models (config.json values), so nobody needs the weights to benchmark them.
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192, rope_theta=100000.0),
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0),
    "llama-3.2-3b": dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8,
                         intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0),
    # not a public model: a few-MB shape for tests and `benchmarks/gpu_check.sh --cpu-dry-run`
    "tiny": dict(hidden_size=128, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=1024, tie_word_embeddings=True,
                 max_position_embeddings=4096, rope_theta=10000.0),
}


@dataclass
class BenchRow:
    model: str
    batch: int
    prompt_len: int
    gen_len: int
    ttft_s: float  # prefill of the whole batch until the first token of every row
    decode_tokens_per_s: float  # generated tokens of all rows / decode seconds
    step_ms: float
    state_bytes: int  # KV + Mamba state of the batch at the end of generation
    peak_memory_bytes: int | None
    bytes_per_step: float  # weights + mean per-step state read, averaged over the generation
    roofline_fraction: float | None = None  # CUDA only
    at_max_batch: bool = False  # --batch max: the largest batch that fits this model (ratios pair these)
    ratio: float | None = None  # hybrid tokens/s / baseline tokens/s (hybrid rows)
    byte_limit_ratio: float | None = None
    fraction_of_limit: float | None = None

    @property
    def cell(self) -> tuple:
        """(model, batch or "max", gen_len): what this row measured (ratios and --resume pair on it)."""
        return self.model, "max" if self.at_max_batch else self.batch, self.gen_len


def layout_layers(layout: str, n_layers: int) -> list[int]:
    from .model.convert import default_attention_layers

    if layout == "m1":
        return default_attention_layers(n_layers, 0.2)
    if layout == "all-attention":
        return list(range(n_layers))
    try:
        fraction = float(layout)
    except ValueError:
        raise M1Error(f"--layout must be m1, all-attention or a fraction of attention layers like 0.25; got '{layout}'") from None
    if not 0 <= fraction <= 1:
        raise M1Error(f"--layout fraction must be between 0 and 1, got {fraction}")
    return default_attention_layers(n_layers, fraction)


def shape_model(shape: str, attn_layers: list[int], dtype, device):
    """A random-weight GraniteMoeHybrid with the given public model shape and layout."""
    import torch
    from transformers import GraniteMoeHybridForCausalLM, LlamaConfig

    from .model.convert import hybrid_config

    if shape not in SHAPES:
        raise M1Error(f"unknown --shape '{shape}': choose one of {', '.join(SHAPES)}")
    s = dict(SHAPES[shape])
    theta = s.pop("rope_theta")
    tc = LlamaConfig(**s, rope_parameters={"rope_type": "default", "rope_theta": theta}, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0)
    cfg = hybrid_config(tc, attn_layers)
    torch.manual_seed(0)
    with torch.device(device):
        model = GraniteMoeHybridForCausalLM(cfg).to(dtype)
    return model.eval()


class _NullTokenizer:
    """The engine only needs ids here: prompts are token lists and EOS is ignored."""
    eos_token_id = None
    pad_token_id = 0
    chat_template = None

    def decode(self, ids, **kw):
        return ""

    def convert_ids_to_tokens(self, ids):
        return [""] * len(ids) if isinstance(ids, list) else ""


def step_bytes_per_row(cfg, context: int, esize: int, ssm_esize: int = 4) -> int:
    """Bytes one decode step moves for one sequence at ``context`` tokens: its K/V are read, its Mamba
    state read and written back (conv window and SSM state)."""
    conv, ssm = mamba_state_sizes(cfg.to_dict())
    return state_bytes_per_row(cfg, context, esize, ssm_esize) + conv * esize + ssm * ssm_esize


def largest_batch(engine, prompt_len: int, gen_len: int, memory_bytes: int | None = None) -> int:
    """Most sequences of ``prompt_len + gen_len`` tokens whose decode state fits the free memory.

    Counts what the engine allocates per row (K/V at full capacity, Mamba state) plus the step's
    per-row temporaries (logits in the model dtype and float32, float32 attention scores), and keeps
    8% of the device (at least 2 GiB) for the allocator, prefill and libraries. ``memory_bytes``: fit into a device of that size instead (what is in use
    now counted against it), e.g. an 80 GB H100's batch on a 141 GB H200, or tiny dry runs."""
    import torch

    model = engine.model
    cfg = model.config
    dev = engine.device
    cap = -(-(prompt_len + gen_len) // 256) * 256
    esize = next(model.parameters()).element_size()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
    else:
        free = total = _available_ram()
    if memory_bytes is not None:
        used = (total - free) if dev.type == "cuda" else weight_bytes(model)
        free, total = min(free, memory_bytes - used), memory_bytes
    heads = cfg.num_attention_heads
    per_row = (engine.row_bytes(cap) + cfg.vocab_size * (esize + 8) + heads * cap * (4 + 2 * esize)
               + 4 * cfg.intermediate_size * esize)
    room = free - max(2 << 30, int(0.08 * total))
    if room < per_row:
        raise M1Error(f"not even one sequence of {prompt_len + gen_len} tokens fits the free memory "
                      f"({free / 2**30:.1f} GiB) beside the model")
    return int(room // per_row)


def _available_ram() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def _step_and_state_bytes(engine, batch: int, step_context: int, final_length: int) -> tuple[float, int]:
    """(bytes one decode step of ``batch`` rows moves at ``step_context`` tokens: the weights once plus
    each row's state read (and Mamba state written back), the batch's state at ``final_length``
    tokens). The one byte accounting of both modes, so their byte-limit ratios compare."""
    import torch

    model = engine.model
    esize = next(model.parameters()).element_size()
    ssm_esize = getattr(engine, "ssm_dtype", torch.float32).itemsize
    per_step = weight_bytes(model) + batch * step_bytes_per_row(model.config, step_context, esize, ssm_esize)
    return float(per_step), batch * state_bytes_per_row(model.config, final_length, esize, ssm_esize)


def measure(engine, name: str, batch: int, prompt_len: int, gen_len: int, bandwidth: float | None) -> BenchRow:
    import torch

    from .engine import SamplingParams

    model = engine.model
    dev = next(model.parameters()).device
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(batch * 7919 + prompt_len)
    prompts = [torch.randint(3, vocab, (prompt_len,), generator=g).tolist() for _ in range(batch)]

    def run(new_tokens):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.generate(prompts, SamplingParams(n=1, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    # warm-up (allocations, lazy init, CUDA graph capture). CUDA: a short generation in full, so the timed
    # run replays graphs; a long one pays its ~cap/256 captures inside the timed run (under 2% of it).
    # CPU: nothing is captured, and 16 steps do the lazy init; a full-length warm-up doubled the demo's
    # bench stage (220 s) and its tokens/s moved within the run-to-run noise (+-15% on 2 cores)
    if dev.type == "cuda":
        run(gen_len if gen_len <= 1024 else 2)
    else:
        run(min(gen_len, 16))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    ttft = run(1)
    total = run(gen_len)
    decode = max(total - ttft, 1e-9)
    per_step, state = _step_and_state_bytes(engine, batch, int(prompt_len + gen_len / 2), prompt_len + gen_len)
    step_s = decode / max(gen_len - 1, 1)
    peak = None
    if dev.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(dev))
    else:
        import resource

        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # process high-water mark
    return BenchRow(
        model=name, batch=batch, prompt_len=prompt_len, gen_len=gen_len, ttft_s=round(ttft, 4),
        decode_tokens_per_s=round(batch * (gen_len - 1) / decode, 2), step_ms=round(step_s * 1000, 3),
        state_bytes=state, peak_memory_bytes=peak, bytes_per_step=per_step,
        roofline_fraction=round(per_step / step_s / bandwidth, 4) if bandwidth else None)


# --------------------------------------------------------------------------- decode at a given context
@dataclass
class ContextRow:
    """Decode at a fixed context (``--context``): one point per L, plus the generation average.

    Per-L rows (``context`` set): every row of the batch holds ``context`` tokens when the ``steps``
    timed decode steps start. The integrated row (``context`` None, ``gen_len`` set): the decode
    throughput of a ``prompt_len + gen_len`` generation estimated from the per-L points (see
    :func:`integrate_generation`), comparable to :class:`BenchRow`'s ``decode_tokens_per_s``."""
    model: str
    batch: int
    context: int | None
    steps: int  # timed decode steps (per-L rows) / measured points used (integrated row)
    step_ms: float  # per-L: mean of the timed steps; integrated: mean over the generation's steps
    decode_tokens_per_s: float
    bytes_per_step: float  # weights + the batch's state read at the mean context of those steps
    state_bytes: int
    prefill_s: float | None = None  # per-L: one prompt of L tokens (batch-1 time to first token)
    prompt_len: int | None = None  # integrated row: the generation it stands for
    gen_len: int | None = None
    extrapolated: bool = False  # integrated row: part of the generation lies outside the measured L
    peak_memory_bytes: int | None = None
    roofline_fraction: float | None = None
    at_max_batch: bool = False
    ratio: float | None = None
    byte_limit_ratio: float | None = None
    fraction_of_limit: float | None = None

    @property
    def cell(self) -> tuple:
        """What this row measured; :func:`_add_ratios` pairs hybrid and baseline rows on it."""
        what = ("context", self.context) if self.context is not None else ("gen", self.prompt_len, self.gen_len)
        return self.model, "max" if self.at_max_batch else self.batch, what


def integrate_generation(points, prompt_len: int, gen_len: int) -> tuple[float, bool]:
    """Seconds the ``gen_len - 1`` decode steps of a generation after a ``prompt_len`` prompt take,
    from seconds per step measured at a few contexts; returns (seconds, extrapolated).

    ``points``: (context, seconds per step) pairs, the context being the mean write column of the
    timed steps (``L + (K - 1) / 2``). Seconds per step s(c) is taken piecewise linear through the
    points and continued beyond the first and last point along the end segments (a decode step's
    bytes are affine in the context; one point alone: constant). Like :func:`measure`, the first
    token comes from the prefill and the decode steps write columns ``P .. P + G - 2``; their time
    is the integral of s over ``[P - 1/2, P + G - 3/2]`` (for affine s exactly the sum over those
    columns), computed by the trapezoid rule on the measured points inside that range plus its two
    ends (exact for a piecewise linear s). tok/s of the generation is then ``batch (G - 1) / seconds``.
    """
    pts = sorted((float(c), float(s)) for c, s in points)
    if not pts:
        raise M1Error("no measured contexts to integrate over")
    if gen_len < 2:
        raise M1Error(f"a generation of {gen_len} token(s) has no decode step to integrate")
    if len({c for c, _ in pts}) != len(pts):
        raise M1Error(f"measured contexts must be distinct, got {[c for c, _ in pts]}")
    lo, hi = prompt_len - 0.5, prompt_len + gen_len - 1.5

    def s(c: float) -> float:
        if len(pts) == 1:
            return pts[0][1]
        i = 1
        while i < len(pts) - 1 and c > pts[i][0]:
            i += 1
        (c0, s0), (c1, s1) = pts[i - 1], pts[i]
        return s0 + (s1 - s0) * (c - c0) / (c1 - c0)

    xs = [lo] + [c for c, _ in pts if lo < c < hi] + [hi]
    secs = sum((x1 - x0) * (s(x0) + s(x1)) / 2 for x0, x1 in zip(xs, xs[1:]))
    return secs, lo < pts[0][0] or hi > pts[-1][0]


def _timer(device):
    """(start, stop) -> seconds: CUDA events on CUDA (device time between the two marks), else
    perf_counter. ``stop`` waits for the device, so the steps' work is inside the interval."""
    import torch

    if device.type == "cuda":
        def start():
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e

        def stop(e0):
            e1 = torch.cuda.Event(enable_timing=True)
            e1.record()
            e1.synchronize()
            return e0.elapsed_time(e1) / 1000
        return start, stop
    return time.perf_counter, lambda t0: time.perf_counter() - t0


# rows filled from the one prefill at a time: st.fill copies its prompt's K/V row per destination
# row (index_select), ~16 GB at once for 490 rows x 8k tokens of one llama-3.2-3b attention layer
_FILL_BYTES = 1 << 30


def context_state(engine, batch: int, ids: list[int], capacity: int, time_prefill: bool = False):
    """The engine's decode state for ``batch`` rows that all hold the prompt ``ids`` (one prefill,
    its state copied to every row: decode speed does not depend on the values), with capacity for
    ``capacity`` tokens. Returns (state, first logits (batch, vocab) float32, prefill seconds).

    The buffers come from the fast backend as for a generation (the same reuse of a static state
    and its CUDA graphs); the rows are filled in chunks to bound the copy. With ``time_prefill`` the
    prefill runs twice and the second is timed (the first pays kernel compilation and autotuning)."""
    import torch

    if engine.backend != "fast":
        raise M1Error("--context needs the engine's fast backend (this model runs on the hf backend)")
    runner = engine.runner
    dev, lp = engine.device, len(ids)
    st = runner.state(batch, lp, capacity)
    st.nb = batch
    secs = None
    if time_prefill:
        runner.prefill([ids])
        start, stop = _timer(dev)
        t0 = start()
        cache, last, mask, lengths = runner.prefill([ids])
        secs = stop(t0)
    else:
        cache, last, mask, lengths = runner.prefill([ids])
    chunk = max(1, _FILL_BYTES // max(1, engine.row_bytes(lp)))
    for i in range(0, batch, chunk):
        j = min(batch, i + chunk)
        st.fill(cache, engine.arch, torch.arange(i, j, device=dev), torch.zeros(j - i, dtype=torch.long, device=dev),
                mask, lengths)
    del cache
    runner.rope_table(st)
    return st, last.expand(batch, -1).contiguous(), secs


def _rewind(st, context: int) -> None:
    """Back to the moment every row held ``context`` tokens, for the timed pass after the warm-up.
    Only the counters and the padding bias need it: the K/V columns past ``context`` are rewritten by
    the next steps, and the Mamba state's values do not change what a step costs."""
    st.col = context
    st.pos[:st.nb].fill_(context)
    if st.static:
        st.col_t.fill_(context)
    if st.bias is not None:
        st.bias[:, context:].fill_(st.neg)


def _decode_steps(engine, st, toks, n: int, temps):
    """``n`` decode steps as ``Engine._run_group`` takes them for greedy rows: the step (CUDA graph /
    compiled / eager), sampling, and the host reading the tokens (the engine does, every step, for
    its stop rules and streaming)."""
    from .engine import sample_tokens

    for _ in range(n):
        logits = engine.runner.step(st, toks)
        toks = sample_tokens(logits, temps, None, None, None, None)
        toks.tolist()
    return toks


def measure_at_context(engine, name: str, batch: int, context: int, steps: int, bandwidth: float | None) -> ContextRow:
    """Decode speed of ``batch`` rows at ``context`` tokens: bring every row there (one prefill of a
    random prompt of ``context`` tokens, copied to every row; that prefill is timed as the batch-1
    time to first token), run ``steps`` decode steps as a warm-up (CUDA graphs captured for every key
    length the timed steps use, kernels compiled), rewind to ``context`` and time ``steps`` steps
    (CUDA events on CUDA, perf_counter on CPU)."""
    import torch

    model = engine.model
    dev = engine.device
    cfg = model.config
    g = torch.Generator().manual_seed(context)
    ids = torch.randint(3, cfg.vocab_size, (context,), generator=g).tolist()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with torch.inference_mode():
        st, logits, prefill_s = context_state(engine, batch, ids, context + steps, time_prefill=True)
        temps = torch.zeros(batch, dtype=torch.float32, device=dev)  # greedy
        from .engine import sample_tokens

        first = sample_tokens(logits, temps, None, None, None, None)
        _decode_steps(engine, st, first, steps, temps)  # warm-up over the same columns
        _rewind(st, context)
        start, stop = _timer(dev)
        t0 = start()
        _decode_steps(engine, st, first, steps, temps)
        secs = stop(t0)
    del st
    if dev.type == "cuda":
        peak = int(torch.cuda.max_memory_allocated(dev))
    else:
        import resource

        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    step_s = secs / steps
    per_step, state = _step_and_state_bytes(engine, batch, context + steps // 2, context + steps)
    return ContextRow(
        model=name, batch=batch, context=context, steps=steps, step_ms=round(step_s * 1000, 4),
        decode_tokens_per_s=round(batch / step_s, 2), bytes_per_step=per_step, state_bytes=state,
        prefill_s=round(prefill_s, 4), peak_memory_bytes=peak,
        roofline_fraction=round(per_step / step_s / bandwidth, 4) if bandwidth else None)


def generation_row(engine, rows: list[ContextRow], prompt_len: int, gen_len: int,
                   bandwidth: float | None) -> ContextRow:
    """One model's integrated row from its per-L rows (one batch): the generation of ``gen_len``
    tokens after ``prompt_len``, timed by :func:`integrate_generation`, its bytes per step charged as
    :func:`measure` charges a generation (the state at the mean context ``prompt_len + gen_len / 2``)."""
    pts = [(r.context + (r.steps - 1) / 2, r.step_ms / 1000) for r in rows]
    secs, extrapolated = integrate_generation(pts, prompt_len, gen_len)
    r0 = rows[0]
    per_step, state = _step_and_state_bytes(engine, r0.batch, int(prompt_len + gen_len / 2), prompt_len + gen_len)
    step_s = secs / (gen_len - 1)
    return ContextRow(
        model=r0.model, batch=r0.batch, context=None, steps=len(rows), step_ms=round(step_s * 1000, 4),
        decode_tokens_per_s=round(r0.batch * (gen_len - 1) / secs, 2), bytes_per_step=per_step,
        state_bytes=state, prompt_len=prompt_len, gen_len=gen_len, extrapolated=extrapolated,
        at_max_batch=r0.at_max_batch, roofline_fraction=round(per_step / step_s / bandwidth, 4) if bandwidth else None)


def measure_bandwidth(device) -> float | None:
    """Device memory bandwidth (bytes/s) from a large copy: the roofline's denominator (CUDA only)."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    x = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    reps = 20
    for _ in range(reps):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * reps / (time.perf_counter() - t0)


def parse_ints(text, what: str, allow_max: bool = False) -> list:
    """Comma-separated positive integers (and, where ``allow_max``, the word ``max``)."""
    try:
        values = [v.strip() if allow_max and v.strip() == "max" else int(v) for v in str(text).split(",")
                  if v.strip()]
    except ValueError:
        raise M1Error(f"{what} must be comma-separated positive integers, got '{text}'") from None
    if not values or any(v != "max" and v <= 0 for v in values):
        raise M1Error(f"{what} must be positive integers{' or max' if allow_max else ''}, got '{text}'")
    return values


@dataclass
class BenchSettings:
    """Every setting of an ``m1 bench`` run; the flags are generated from these fields (m1.settings).
    ``batches``, ``gen_lens`` and ``contexts`` are the comma-separated --batch, --gen-len and
    --context: Python callers may pass tuples (or lists) or that text."""
    shape: str | None = setting(None, "smollm2-135m | llama-3.2-1b | llama-3.2-3b | tiny (random weights; tiny: tests, "
                                      "dry runs)", group="source")
    model: str | None = setting(None, "checkpoint directory (the hybrid)", group="source")
    baseline: str | None = setting(None, "with --model: the checkpoint to compare against (e.g. the teacher)")
    layout: str = setting("m1", "with --shape: m1 (1 in 5 attention) | all-attention | FRACTION")
    batches: tuple[int | str, ...] = setting((1, 16), "comma-separated batch sizes; 'max' = the largest batch whose "
                                                      "state fits, per model", flag="--batch", metavar="BATCH")
    prompt_len: int = setting(256, "prompt tokens per row")
    gen_lens: tuple[int, ...] = setting((1024,), "comma-separated generation lengths", flag="--gen-len",
                                        metavar="GEN_LEN")
    dtype: str = setting("float32", "float32 | bfloat16 | float16")
    device: str = setting("cpu", "cpu | cuda")
    cuda_graphs: bool = setting(True, "on CUDA, decode eagerly instead of replaying CUDA graphs (to see what they buy)")
    fused_decode: bool = setting(False, "on CUDA, update the Mamba state with the fused Triton kernel "
                                        "(m1.model.kernels.mamba_state_step_fused)")
    compile: bool = setting(False, "decode with the torch.compile'd static step (fuses the elementwise kernels; "
                                   "compiling takes minutes)")
    ssm_dtype: str = setting("float32", "dtype of the Mamba SSM state between steps: float32 (default) or the model "
                                        "dtype (vLLM's default)", choices=("float32", "model"))
    contexts: tuple[int, ...] | None = setting(
        None, "comma-separated contexts L (e.g. 1024,2048,4096,8192): time --steps decode steps with every row at L "
              "tokens (one prefill) instead of whole generations, and integrate them into the throughput of the "
              "--prompt-len + --gen-len generation (see m1.bench.integrate_generation)",
        flag="--context", metavar="CONTEXT")
    steps: int = setting(32, "with --context: timed decode steps per L (default 32)")
    memory_gib: float | None = setting(None, "with --batch max: fit the batch into a device of this many GiB instead "
                                             "of the free memory (e.g. 80 for an H100's batch on an H200)")
    json_path: str | None = setting(None, "write all rows as JSON here (rewritten after each measurement)",
                                    flag="--json")
    resume: bool = setting(False, "with --json: keep the rows an interrupted run already measured there (same "
                                  "settings) and measure only the missing ones")
    plot_path: str | None = setting(None, "PNG of tokens/s vs batch (default: beside --json)", flag="--plot")

    def __post_init__(self):
        self.batches = _ints(self.batches, "--batch", allow_max=True)
        self.gen_lens = _ints(self.gen_lens, "--gen-len")
        if self.contexts is not None:
            self.contexts = _ints(self.contexts, "--context")

    def plot_file(self) -> str | None:
        """Where the plot goes: --plot, else beside --json, else nowhere."""
        if self.plot_path or not self.json_path:
            return self.plot_path
        return str(Path(self.json_path).with_suffix(".png"))


def _ints(value, what: str, allow_max: bool = False) -> tuple:
    """A comma-separated flag's text, or the numbers themselves (checked later, by run_bench)."""
    return tuple(parse_ints(value, what, allow_max) if isinstance(value, str) else value)


def _check_settings(cfg: BenchSettings) -> list[int] | None:
    """Every check that needs no model, so that bad input fails before anything is built; returns the
    sorted distinct contexts of a --context run."""
    import torch

    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise M1Error("--device cuda was asked for, but no CUDA device is available here: use --device cpu")
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise M1Error(f"--dtype must be float32, bfloat16 or float16, got '{cfg.dtype}'")
    if cfg.prompt_len <= 0:
        raise M1Error(f"--prompt-len must be positive, got {cfg.prompt_len}")
    if any(b != "max" and b <= 0 for b in cfg.batches) or any(g <= 0 for g in cfg.gen_lens):
        raise M1Error("--batch and --gen-len values must be positive")
    if cfg.memory_gib is not None and cfg.memory_gib <= 0:
        raise M1Error(f"--memory-gib must be positive, got {cfg.memory_gib}")
    if cfg.contexts is None:
        return None
    contexts = sorted(set(cfg.contexts))
    if not contexts or any(c <= 0 for c in contexts):
        raise M1Error(f"--context must be positive token counts, got {contexts}")
    if cfg.steps < 1:
        raise M1Error(f"--steps must be at least 1, got {cfg.steps}")
    if len(cfg.gen_lens) != 1 or cfg.gen_lens[0] < 2:
        raise M1Error("with --context, --gen-len is the one generation (>= 2 tokens) to integrate over; "
                      f"got {','.join(map(str, cfg.gen_lens))}")
    if cfg.resume:
        raise M1Error("--resume is for whole-generation runs; a --context run is short: run it again")
    return contexts


def _model_makers(cfg: BenchSettings, labels, contexts) -> tuple[dict, int | None]:
    """{name: a function that builds that model} for the --shape or --model pair, and the context
    the shape allows (None for checkpoints: read from each model once built)."""
    import torch

    tdtype = getattr(torch, cfg.dtype)
    if (cfg.shape is None) == (cfg.model is None):
        raise M1Error("give either --shape NAME or --model DIR")
    if cfg.shape is not None:
        shape, layout = cfg.shape, cfg.layout
        if shape not in SHAPES:
            raise M1Error(f"unknown --shape '{shape}': choose one of {', '.join(SHAPES)}")
        n = SHAPES[shape]["num_hidden_layers"]
        models = {f"{shape} {layout}": (lambda: shape_model(shape, layout_layers(layout, n), tdtype, cfg.device)),
                  f"{shape} all-attention": (lambda: shape_model(shape, list(range(n)), tdtype, cfg.device))}
        context = SHAPES[shape]["max_position_embeddings"]
        _check_contexts(contexts, cfg.steps, context)
        _check_fits(cfg, context)
        return models, context
    from .model.checkpoint import load_model

    names = labels or (cfg.model, cfg.baseline)
    models = {names[0]: (lambda: load_model(cfg.model, dtype=tdtype, device=cfg.device)[0])}
    if cfg.baseline:
        models[names[1]] = lambda: load_model(cfg.baseline, dtype=tdtype, device=cfg.device)[0]
    if contexts is not None:  # from config.json, before any weights are loaded
        from .model.checkpoint import check_model_dir, read_config

        for d in filter(None, (cfg.model, cfg.baseline)):
            _check_contexts(contexts, cfg.steps, read_config(check_model_dir(d)).get("max_position_embeddings"))
    return models, None


def _check_fits(cfg: BenchSettings, context: int | None) -> None:
    if context and cfg.prompt_len + max(cfg.gen_lens) > context:
        raise M1Error(f"--prompt-len {cfg.prompt_len} + --gen-len {max(cfg.gen_lens)} exceeds the model context of "
                      f"{context} tokens")


def _json_settings(cfg: BenchSettings, contexts) -> dict:
    """What the JSON records and a --resume must match (as the engine will run: "model" = the weights' dtype)."""
    cuda = cfg.device.startswith("cuda")
    settings = {"device": cfg.device, "dtype": cfg.dtype,
                "ssm_dtype": "float32" if cfg.ssm_dtype == "float32" else cfg.dtype,
                "decode": "torch.compile" if cfg.compile else ("cuda graphs" if cfg.cuda_graphs and cuda else "eager"),
                "mamba_state_step": "mamba_state_step_fused" if cfg.fused_decode else "mamba_state_step"}
    if contexts is not None:
        settings.update(mode="context", contexts=contexts, steps=cfg.steps, prompt_len=cfg.prompt_len,
                        gen_len=cfg.gen_lens[0])
    if cfg.memory_gib is not None:
        settings["memory_gib"] = cfg.memory_gib
    return settings


def run_bench(cfg: BenchSettings, log=print, labels: tuple[str, str] | None = None) -> list:
    """Benchmark a --shape pair or a --model [--baseline] pair; ``labels`` names the two in the output.

    ``cfg.batches`` may hold ``"max"``: each model at the largest batch whose state fits (see
    :func:`largest_batch`; ``memory_gib``: into a device of that size), the ratio then compares the
    two maxima. Rows are written to ``json_path`` (atomically) as they are measured; with ``resume``
    the rows already there for the same settings are kept and only the missing (model, batch,
    length) cells are measured.

    ``cfg.contexts`` (``--context``): decode at those contexts instead of over whole generations:
    for each batch, :func:`measure_at_context` at every L (``steps`` timed steps), then one
    integrated row per model for the generation ``prompt_len + gen_lens[0]``
    (:func:`generation_row`); rows are :class:`ContextRow`. A max batch is the one that fits that
    generation (and the longest L + steps), so the integrated figure stands for the same run as a
    full-generation ``--batch max`` row."""
    import torch

    from .model.kernels import enable as enable_fast_scan
    from .model.kernels import scan_backend

    contexts = _check_settings(cfg)
    enable_fast_scan()
    models, context = _model_makers(cfg, labels, contexts)
    settings = _json_settings(cfg, contexts)
    rows: list[BenchRow] = []
    if cfg.resume:
        if not cfg.json_path:
            raise M1Error("--resume needs --json FILE (the rows of the interrupted run)")
        rows = _rows_to_keep(cfg.json_path, settings, list(models), cfg.prompt_len, cfg.batches, cfg.gen_lens)
        log(f"resuming: {len(rows)} measured rows kept from {cfg.json_path}")
    kept = {r.cell for r in rows}
    bandwidth = measure_bandwidth(cfg.device)
    if cfg.device.startswith("cuda"):
        log(f"mamba2 prefill scan on {cfg.device}: {scan_backend(cfg.device)}")

    def save():
        if cfg.json_path:
            _write_json(cfg.json_path, settings, bandwidth, scan_backend(cfg.device), rows)

    for name, make in models.items():
        if all((name, b, g) in kept for g in cfg.gen_lens for b in cfg.batches):
            continue
        m = make()
        _check_fits(cfg, context or getattr(m.config, "max_position_embeddings", None))
        engine = _engine(cfg, m)
        if contexts is not None:
            _context_runs(engine, name, cfg.batches, contexts, cfg.steps, cfg.prompt_len, cfg.gen_lens[0],
                          _memory(cfg), bandwidth, rows, list(models), log, save)
        else:
            _generation_runs(engine, name, cfg, kept, bandwidth, rows, list(models), log, save)
        del m, engine
        gc.collect()  # free the model, its buffers and graphs now (before the next model is built)
        if cfg.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if cfg.plot_file() and contexts is None:
        plot(rows, cfg.plot_file())
    return rows


def _memory(cfg: BenchSettings) -> int | None:
    return None if cfg.memory_gib is None else int(cfg.memory_gib * 2**30)


def _engine(cfg: BenchSettings, model):
    from .engine import Engine

    # one group per run: the engine's own limits (256 rows, half the free memory) would split it
    return Engine(model, _NullTokenizer(), max_cache_bytes=1 << 62,
                  cuda_graphs=cfg.cuda_graphs and cfg.device.startswith("cuda"), fused_decode=cfg.fused_decode,
                  compile=cfg.compile, ssm_dtype=cfg.ssm_dtype,
                  max_batch_size=max([b for b in cfg.batches if b != "max"], default=1))


def _generation_runs(engine, name: str, cfg: BenchSettings, kept: set, bandwidth, rows: list, names: list[str],
                     log, save) -> None:
    """Whole generations for one model: a row per (length, batch) not already ``kept`` (appended to ``rows``)."""
    for g in cfg.gen_lens:
        for b in cfg.batches:
            if (name, b, g) in kept:
                continue
            at_max = b == "max"
            if at_max:
                engine.release()  # free the last run's buffers before measuring what fits
                b = largest_batch(engine, cfg.prompt_len, g, _memory(cfg))
                engine.max_batch_size = max(engine.max_batch_size, b)
                log(f"{name}: largest batch that fits at {cfg.prompt_len}+{g} tokens: {b}")
            row = measure(engine, name, b, cfg.prompt_len, g, bandwidth)
            row.at_max_batch = at_max
            log(f"{name:32s} batch {b:4d} gen {g:6d}: {row.decode_tokens_per_s:10.1f} tok/s, "
                f"TTFT {row.ttft_s:.3f}s, state {row.state_bytes / 2**20:.1f} MiB"
                + (f", roofline {row.roofline_fraction:.0%}" if row.roofline_fraction else ""))
            rows.append(row)
            _add_ratios(rows, names)
            save()


def _check_contexts(contexts, steps: int, max_positions) -> None:
    """Each L plus its timed steps must fit the model's positions (the steps write columns L .. L+K-1)."""
    if contexts is None or not max_positions:
        return
    too_long = [c for c in contexts if c + steps > max_positions]
    if too_long:
        raise M1Error(f"--context {','.join(map(str, too_long))} + --steps {steps} exceeds the model's "
                      f"{max_positions} positions")


def _context_runs(engine, name: str, batches, contexts, steps: int, prompt_len: int, gen_len: int, memory,
                  bandwidth, rows: list, names: list[str], log, save) -> None:
    """--context for one model: per batch, a row per L and the integrated row (appended to ``rows``)."""
    for b in batches:
        at_max = b == "max"
        if at_max:
            engine.release()  # free the last run's buffers before measuring what fits
            longest = max(prompt_len + gen_len, contexts[-1] + steps)
            b = largest_batch(engine, prompt_len, longest - prompt_len, memory)
            log(f"{name}: largest batch that fits at {longest} tokens: {b}")
        per_l = []
        for c in contexts:
            engine.release()  # each L has its own capacity: free the previous one's buffers first
            r = measure_at_context(engine, name, b, c, steps, bandwidth)
            r.at_max_batch = at_max
            per_l.append(r)
            rows.append(r)
            log(f"{name:32s} batch {b:4d} context {c:6d}: {r.decode_tokens_per_s:10.1f} tok/s, "
                f"step {r.step_ms:.2f} ms, prefill(1 x {c}) {r.prefill_s:.3f}s"
                + (f", roofline {r.roofline_fraction:.0%}" if r.roofline_fraction else ""))
            _add_ratios(rows, names)
            save()
        engine.release()
        g = generation_row(engine, per_l, prompt_len, gen_len, bandwidth)
        rows.append(g)
        _add_ratios(rows, names)
        log(f"{name:32s} batch {b:4d} gen {prompt_len}+{gen_len} (integrated over {len(per_l)} contexts"
            f"{', extrapolated' if g.extrapolated else ''}): {g.decode_tokens_per_s:10.1f} tok/s")
        save()


def _rows_to_keep(path, settings: dict, names: list[str], prompt_len: int, batches, gen_lens) -> list[BenchRow]:
    """The rows of an earlier run in ``path`` that this run would measure again (same settings)."""
    p = Path(path)
    if not p.exists():
        return []
    try:
        old = json.loads(p.read_text())
        old_rows = [BenchRow(**r) for r in old["rows"]]
    except (ValueError, KeyError, TypeError) as e:
        raise M1Error(f"--resume: {p} is not an m1 bench JSON ({e}); drop --resume to start over") from None
    diff = {k: (old.get(k), v) for k, v in settings.items() if str(old.get(k)) != str(v)}
    if diff:
        raise M1Error(f"--resume: {p} was measured with other settings {diff}; drop --resume to start over")
    want = {(n, b, g) for n in names for b in batches for g in gen_lens}
    return [r for r in old_rows if r.prompt_len == prompt_len and r.cell in want]


def _write_json(path, settings: dict, bandwidth, scan, rows) -> None:
    import torch

    meta = {**settings, "bandwidth_bytes_per_s": bandwidth, "mamba_scan": scan, "torch": torch.__version__}
    if settings["device"].startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name(settings["device"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({**meta, "rows": [asdict(r) for r in rows]}, indent=2))
    tmp.replace(path)


def _add_ratios(rows: list[BenchRow], names: list[str]) -> None:
    """Hybrid (first model) vs baseline (second) at equal batch and length (or both at their max batch)."""
    if len(names) < 2:
        return
    base = {r.cell[1:]: r for r in rows if r.model == names[1]}
    for r in rows:
        b = base.get(r.cell[1:])
        if r.model != names[0] or b is None:
            continue
        r.ratio = round(r.decode_tokens_per_s / b.decode_tokens_per_s, 3)
        # tokens per byte moved, hybrid over baseline (= bytes ratio at equal batch)
        r.byte_limit_ratio = round((r.batch / r.bytes_per_step) / (b.batch / b.bytes_per_step), 3)
        r.fraction_of_limit = round(r.ratio / r.byte_limit_ratio, 3)


def markdown_table(rows: list) -> str:
    if rows and isinstance(rows[0], ContextRow):
        return context_table(rows)
    head = ("| model | batch | gen | tok/s | TTFT s | state MiB | ratio | byte-limit ratio | of limit | roofline |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    lines = [head] + [
        f"| {r.model} | {r.batch}{' (max)' if r.at_max_batch else ''} | {r.gen_len} | {r.decode_tokens_per_s:.1f} | {r.ttft_s:.3f} | "
        f"{r.state_bytes / 2**20:.1f} | {fmt(r.ratio, '.2f')} | {fmt(r.byte_limit_ratio, '.2f')} | "
        f"{fmt(r.fraction_of_limit, '.0%')} | {fmt(r.roofline_fraction, '.0%')} |" for r in rows]
    return "\n".join(lines)


def context_table(rows: list[ContextRow]) -> str:
    head = ("| model | batch | context | tok/s | step ms | prefill 1xL s | ratio | byte-limit ratio | of limit | roofline |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
    lines = [head]
    for r in rows:
        what = (str(r.context) if r.context is not None else
                f"gen {r.prompt_len}+{r.gen_len}, integrated{' (extrapolated)' if r.extrapolated else ''}")
        lines.append(f"| {r.model} | {r.batch}{' (max)' if r.at_max_batch else ''} | {what} | {r.decode_tokens_per_s:.1f} | "
                     f"{r.step_ms:.2f} | {fmt(r.prefill_s, '.3f')} | {fmt(r.ratio, '.2f')} | "
                     f"{fmt(r.byte_limit_ratio, '.2f')} | {fmt(r.fraction_of_limit, '.0%')} | {fmt(r.roofline_fraction, '.0%')} |")
    return "\n".join(lines)


def plot(rows: list[BenchRow], path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (model, g) in sorted({(r.model, r.gen_len) for r in rows}):
        pts = sorted((r.batch, r.decode_tokens_per_s) for r in rows if r.model == model and r.gen_len == g)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{model}, gen {g}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s")
    ax.set_title("decode throughput")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
