"""The Mamba2 scan: fla's Triton simple-GLA kernel on a GPU, our own chunked torch scan elsewhere.

Mamba2's SSD recurrence, per sequence and head h (A < 0 a scalar per head, dt_t > 0 per step and head):

    S_t = exp(A dt_t) S_{t-1} + (dt_t x_t) B_t^T        S: (p, n)   x_t: (p,)   B_t, C_t: (n,)
    y_t = S_t C_t + D x_t                               y_t: (p,)

is exactly *simple GLA* (a linear attention with one scalar forget gate per head and step) with
q = C, k = B, v = dt x, log-gate g = A dt and scale 1. fla-core's ``chunk_simple_gla`` computes that
with chunked Triton kernels, forward and backward, so it serves prefill and training; its state in
``state_v_first`` layout (N, H, V, K) is transformers' Mamba2 state layout (b, h, p, n) as is.

transformers (5.x) runs ``GraniteMoeHybridMambaLayer`` through module-level functions with fixed
signatures (``mamba2_chunk_scan`` among them), which call mamba_ssm when it is installed and fall back
to a torch implementation written against a (b, chunk, l, h) layout whose einsums spend much of their
time in permute copies. ``enable()`` replaces that one function with a dispatcher: CUDA tensors with
fla installed (and no mamba_ssm) go to the kernel, mamba_ssm (when installed) is left to transformers,
and everything else goes to ``ssd_chunked``, the same chunked SSD algorithm written heads-first so that
every contraction is a batched matmul on contiguous blocks (CPU, and GPUs without a kernel). The conv1d
and the gated RMSNorm stay in torch (a depthwise conv and an elementwise norm; not where the time goes).

Why not only mamba_ssm: it needs a CUDA toolchain to build and pins torch versions; fla-core is pure
Python + Triton. When mamba_ssm is installed transformers already uses it, and we step aside.

``ssd_sequential`` is the obviously-correct reference (a loop over t, any dtype, float64 in tests);
``ssd_chunked`` is tested against it in float64, values and gradients; ``ssd_via_simple_gla`` is the
argument mapping, tested on CPU against the reference with a torch ``simple_gla_sequential`` standing
in for the kernel, and on CUDA with the kernel itself.
"""

from __future__ import annotations

import importlib.util

_PATCHED = {}  # module -> original mamba2_chunk_scan


# The Mamba2 scan chunk on CPU (checkpoints say 256): the torch scan pads every sequence to a multiple
# of the chunk and its intra-chunk work grows with it, so 64 is 1.3-3x faster for the few-hundred-token
# sequences m1 trains and prefills on CPU (measured: docs/training.md, engine.prefill.cpu_scan_chunk).
CPU_SCAN_CHUNK = 64


def mamba_mixers(model) -> list:
    """The Mamba2 mixer modules of ``model`` (those with a scan ``chunk_size``), in order."""
    return [m for m in model.modules() if hasattr(m, "chunk_size") and "mamba" in type(m).__name__.lower()]


def fla_available() -> bool:
    return importlib.util.find_spec("fla") is not None and importlib.util.find_spec("triton") is not None


def mamba_ssm_available() -> bool:
    return importlib.util.find_spec("mamba_ssm") is not None


def scan_backend(device) -> str:
    """Which implementation runs the Mamba2 prefill/training scan on ``device`` after ``enable()``."""
    dev = str(device)
    ours = "torch (m1 ssd_chunked)" if _PATCHED else "torch (transformers' chunked scan)"
    if not dev.startswith("cuda"):
        return ours
    if mamba_ssm_available():
        return "mamba_ssm"
    if fla_available() and _PATCHED:
        if not fla_backward_ok(dev):
            return (f"fla chunk_simple_gla (Triton) for inference; {ours} for training "
                    "(fla backward off on this GPU/Triton)")
        return "fla chunk_simple_gla (Triton)"
    return f"{ours}; install fla-core for the Triton kernel"


# ------------------------------------------------------------------------------ references
def ssd_sequential(x, dt, A, B, C, D=None, initial_states=None):
    """Mamba2 SSD one step at a time. Shapes (paper notation):
    x: (b, l, h, p)   dt: (b, l, h) (already softplus'ed and clamped)   A: (h,)
    B, C: (b, l, g, n) with h % g == 0   D: (h,) or None   initial_states: (b, h, p, n) or None
    -> y: (b, l, h, p), final state (b, h, p, n); computed in x's dtype.
    """
    import torch

    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    rep = h // g
    Bh = B.repeat_interleave(rep, dim=2)  # (b, l, h, n)
    Ch = C.repeat_interleave(rep, dim=2)
    S = x.new_zeros(b, h, p, n) if initial_states is None else initial_states.to(x.dtype).clone()
    ys = []
    for t in range(l):
        decay = torch.exp(A.to(x.dtype) * dt[:, t].to(x.dtype))  # (b, h)
        S = decay[..., None, None] * S + (dt[:, t, :, None].to(x.dtype) * x[:, t])[..., None] * Bh[:, t, :, None, :]
        y = torch.einsum("bhpn,bhn->bhp", S, Ch[:, t].to(x.dtype))
        if D is not None:
            y = y + D.to(x.dtype)[:, None] * x[:, t]
        ys.append(y)
    return torch.stack(ys, dim=1), S


def simple_gla_sequential(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
                          state_v_first=False):
    """fla's ``chunk_simple_gla`` contract, one step at a time (the stand-in for the kernel on CPU).
    q, k: (B, T, H, K)   v: (B, T, H, V)   g: (B, T, H) log forget gate   state (B, H, K, V) or (B, H, V, K)
    S_t = exp(g_t) S_{t-1} + k_t v_t^T;  o_t = scale * q_t^T S_t.
    """
    import torch

    b, t_len, h, kd = q.shape
    vd = v.shape[-1]
    scale = kd ** -0.5 if scale is None else scale
    S = q.new_zeros(b, h, kd, vd) if initial_state is None else (
        initial_state.transpose(-1, -2) if state_v_first else initial_state).to(q.dtype).clone()
    out = []
    for t in range(t_len):
        S = torch.exp(g[:, t])[..., None, None].to(q.dtype) * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    final = (S.transpose(-1, -2) if state_v_first else S) if output_final_state else None
    return torch.stack(out, dim=1), final


# ------------------------------------------------------------------------- the torch fast path
def _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, dtype):
    """transformers' ``mamba2_chunk_scan`` step sizes: + bias, softplus if asked, clamped to the limit."""
    import torch
    import torch.nn.functional as F

    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    return torch.clamp(dt.to(dtype), min=dt_limit[0], max=dt_limit[1])


def ssd_chunked(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None,
                dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, **kwargs):
    """transformers' ``mamba2_chunk_scan`` signature and semantics (float32 result), computed by the
    chunked SSD algorithm of the Mamba2 paper (as in state-spaces' ``ssd_minimal``) in a heads-first
    layout: split the sequence into chunks of Q tokens; within a chunk the scan is a masked, decayed
    "attention" (C B^T * L) X; across chunks a short recurrence carries one (n, p) state per head.

    Why our own rather than transformers' torch version of the same algorithm: that one keeps
    (b, c, l, h, .) tensors and contracts them with einsums whose operands get permuted copies, and
    it builds the causal decay through an (l, l, l)-sized cumsum; here every contraction is a
    batched matmul over (b, g, rep, c) blocks, the decay is a difference of cumulative sums, and a
    group's C B^T is computed once for all the heads sharing it. Measured on a 2-core AVX2 CPU at
    SmolLM2-hybrid shapes (8 x 256 tokens, 9 heads, p = n = 64, Q = 64): forward 41 -> 25 ms,
    forward + backward 88 -> 64 ms, 23% fewer float32 values saved for backward. The scan runs in
    float32 whatever the autocast (the state is a long running sum); float64 inputs stay float64.

    Shapes (paper notation): x: (b, l, h, p)   dt: (b, l, h) raw or softplus'ed   A: (h,)
    B, C: (b, l, g, n), h % g == 0   D: (h,)   initial_states: (b, h, p, n)   -> y (b, l, h, p)
    [, final state (b, h, p, n)].
    """
    import torch
    import torch.nn.functional as F

    with torch.autocast(hidden_states.device.type, enabled=False):
        f = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32  # float64: for tests
        b, l, h, p = hidden_states.shape
        g, n = B.shape[2], B.shape[3]
        rep = h // g  # heads per group: head i reads group i // rep (transformers' repeat_interleave)
        dt = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, f)  # (b, l, h)
        x = hidden_states.to(f)
        q = max(1, min(int(chunk_size), l))  # Q: tokens per chunk
        c = -(-l // q)  # chunks
        pad = c * q - l  # zero steps at the end: dt = 0 there, so they change nothing
        X = (x * dt[..., None]).transpose(1, 2)  # (b, h, l, p): the input scaled by dt
        a = (dt * A.to(f)).transpose(1, 2)  # (b, h, l): log decay per step, <= 0
        Bt, Ct = B.to(f).transpose(1, 2), C.to(f).transpose(1, 2)  # (b, g, l, n)
        if pad:
            X, a = F.pad(X, (0, 0, 0, pad)), F.pad(a, (0, pad))
            Bt, Ct = F.pad(Bt, (0, 0, 0, pad)), F.pad(Ct, (0, 0, 0, pad))
        X = X.reshape(b, g, rep, c, q, p)
        a = a.reshape(b, g, rep, c, q)
        Bc = Bt.reshape(b, g, 1, c, q, n)
        Cc = Ct.reshape(b, g, 1, c, q, n)
        acs = torch.cumsum(a, dim=-1)  # (b, g, rep, c, Q): log decay from the chunk start to each step

        # 1. within each chunk: y_t += sum_{s <= t} (C_t . B_s) exp(acs_t - acs_s) dt_s x_s
        causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
        L = torch.exp((acs[..., :, None] - acs[..., None, :]).masked_fill(~causal, float("-inf")))  # (.., Q, Q)
        Y = ((Cc @ Bc.transpose(-1, -2)) * L) @ X  # (b, g, rep, c, Q, p)

        # 2. each chunk's own contribution to the state at its end: sum_s exp(acs_end - acs_s) B_s (dt_s x_s)^T
        to_end = torch.exp(acs[..., -1:] - acs)  # (b, g, rep, c, Q)
        chunk_states = (Bc * to_end[..., None]).transpose(-1, -2) @ X  # (b, g, rep, c, n, p)

        # 3. across chunks, sequentially (c = l / Q steps): the state entering each chunk
        S = (x.new_zeros(b, g, rep, n, p) if initial_states is None
             else initial_states.to(f).reshape(b, g, rep, p, n).transpose(-1, -2))  # (b, g, rep, n, p)
        chunk_decay = torch.exp(acs[..., -1])  # (b, g, rep, c)
        entering = []
        for k in range(c):
            entering.append(S)
            S = chunk_decay[..., k, None, None] * S + chunk_states[..., k, :, :]
        S_in = torch.stack(entering, dim=3)  # (b, g, rep, c, n, p)

        # 4. the entering state read out at each step: y_t += exp(acs_t) C_t S_in
        Y = Y + (Cc * torch.exp(acs)[..., None]) @ S_in
        y = Y.reshape(b, h, c * q, p)[:, :, :l].transpose(1, 2)  # (b, l, h, p)
        if D is not None:
            y = y + D.to(f)[:, None] * x
        y = y.contiguous()  # callers .view() it
        if return_final_states:
            return y, S.transpose(-1, -2).reshape(b, h, p, n)
        return y


# ------------------------------------------------------------------------------ the mapping
def ssd_via_simple_gla(hidden_states, dt, A, B, C, chunk_size=None, D=None, dt_bias=None, initial_states=None,
                       dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=False, gla=None,
                       **kwargs):
    """transformers' ``mamba2_chunk_scan`` signature and semantics, computed by a simple-GLA ``gla``
    (default: fla's ``chunk_simple_gla``). Returns float32 like the torch scan it replaces."""
    import torch

    if gla is None:
        from fla.ops.simple_gla import chunk_simple_gla as gla
    b, l, h, p = hidden_states.shape
    g = B.shape[2]
    dt = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit, torch.float32)  # (b, l, h)
    x = hidden_states.float()
    q = C.float().repeat_interleave(h // g, dim=2)  # (b, l, h, n)
    k = B.float().repeat_interleave(h // g, dim=2)
    v = x * dt[..., None]  # (b, l, h, p)
    log_gate = A.float()[None, None, :] * dt  # (b, l, h), <= 0
    y, final = gla(q, k, v, g=log_gate, scale=1.0,
                   initial_state=None if initial_states is None else initial_states.float(),
                   output_final_state=return_final_states, state_v_first=True)
    y = y.float()
    if D is not None:
        y = y + D.float()[:, None] * x
    return (y, final.float()) if return_final_states else y


def fla_backward_ok(device) -> bool:
    """Whether fla's simple-GLA *backward* gives correct gradients on ``device``.

    fla-core refuses its gated backward on Hopper (sm_90) with Triton >= 3.4.0 and < 3.7.1 (a Triton
    miscompile, fla issue #640) unless tilelang is installed; seen on an H100 with torch 2.11 /
    Triton 3.6. Training there falls back to transformers' torch scan (forward-only use, i.e. prefill
    and generation, keeps the kernel)."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return False
    if torch.cuda.get_device_capability(dev)[0] != 9 or importlib.util.find_spec("tilelang") is not None:
        return True
    try:
        import triton
        from packaging.version import Version

        v = Version(triton.__version__.split("+")[0])
    except Exception:  # unknown version: trust fla's own check to raise if needed
        return True
    return not (Version("3.4.0") <= v < Version("3.7.1"))


def _needs_grad(*tensors) -> bool:
    import torch

    return torch.is_grad_enabled() and any(torch.is_tensor(t) and t.requires_grad for t in tensors)


def _dispatcher(original):
    def mamba2_chunk_scan(hidden_states, dt, A, B, C, chunk_size, *args, **kwargs):
        if hidden_states.is_cuda and mamba_ssm_available():
            return original(hidden_states, dt, A, B, C, chunk_size, *args, **kwargs)  # transformers uses it
        if hidden_states.is_cuda and fla_available():
            if not (_needs_grad(hidden_states, dt, A, B, C, *args, *kwargs.values())
                    and not fla_backward_ok(hidden_states.device)):
                return ssd_via_simple_gla(hidden_states, dt, A, B, C, chunk_size, *args, **kwargs)
        return ssd_chunked(hidden_states, dt, A, B, C, chunk_size, *args, **kwargs)

    mamba2_chunk_scan.__wrapped__ = original
    return mamba2_chunk_scan


def enable() -> bool:
    """Route transformers' Mamba2 chunk scan to fla's kernel (CUDA tensors, fla-core installed) or
    to ``ssd_chunked`` (everything else). Idempotent; returns True once the dispatcher is installed."""
    from transformers.models.granitemoehybrid import modeling_granitemoehybrid as mod

    if mod not in _PATCHED:
        _PATCHED[mod] = mod.mamba2_chunk_scan
        mod.mamba2_chunk_scan = _dispatcher(mod.mamba2_chunk_scan)
    return True


def disable() -> None:
    for mod, original in list(_PATCHED.items()):
        mod.mamba2_chunk_scan = original
        del _PATCHED[mod]


# ------------------------------------------------------------------------- decode: one token
def mamba_state_step(state, x, dt, A, B, C):
    """One Mamba2 token for every row, updating ``state`` in place (the reference, plain torch):

        state <- exp(A dt) state + (dt x) B^T      y = state C          (per row and head)

    state: (b, h, p, n), any float dtype (updated in float32)   x: (b, h, p)   dt: (b, h) (softplus'ed)
    A: (h,)   B, C: (b, g, n) with h % g == 0   -> y: (b, h, p) float32, from the float32 new state
    (D x and the gate are the caller's). Several passes over the state (decay, rank-1 update, output
    product; see ``mamba_state_step_fused``)."""
    import torch

    if state.dtype != torch.float32:
        s = state.float()
        y = mamba_state_step(s, x, dt, A, B, C)
        state.copy_(s)
        return y
    b, h, p, n = state.shape
    rep = h // B.shape[1]
    Bh = B.float().repeat_interleave(rep, dim=1)  # (b, h, n)
    Ch = C.float().repeat_interleave(rep, dim=1)
    dtf = dt.float()
    state.mul_(torch.exp(dtf * A.float())[:, :, None, None])
    state.view(b * h, p, n).baddbmm_((x.float() * dtf[:, :, None]).reshape(b * h, p, 1), Bh.reshape(b * h, 1, n))
    # y^T = C^T state^T: as a (1 x n)(n x p) product per head; state (p x n) times C (n x 1) is the
    # same arithmetic but hits a batched-gemv path ~4x slower in CPU BLAS (665 vs 176 us, 16 x 9 heads)
    return torch.bmm(Ch.reshape(b * h, 1, n), state.view(b * h, p, n).transpose(1, 2)).view(b, h, p)


_DECODE_KERNELS = {}


def _decode_kernel(interpret: bool):
    """The Triton kernel of ``mamba_state_step_fused`` (built on first use; ``interpret`` = Triton's
    CPU interpreter, for tests without a GPU)."""
    if interpret in _DECODE_KERNELS:
        return _DECODE_KERNELS[interpret]
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(S, X, DT, A, B, C, Y, H, REP, sS_b, sS_h, sS_p, sX_b, sX_h, sDT_b, sB_b, sB_g, sC_b, sC_g,
               sY_b, sY_h, P: tl.constexpr, N: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
        # one program: row b, head h, a block of BP of the head's p channels, all n state columns
        pid = tl.program_id(0)
        b = pid // H
        h = pid % H
        g = h // REP
        offs_p = tl.program_id(1) * BP + tl.arange(0, BP)
        offs_n = tl.arange(0, BN)
        mp = offs_p < P
        mn = offs_n < N
        dt = tl.load(DT + b * sDT_b + h).to(tl.float32)
        decay = tl.exp(dt * tl.load(A + h).to(tl.float32))
        x = tl.load(X + b * sX_b + h * sX_h + offs_p, mask=mp, other=0.0).to(tl.float32)
        bv = tl.load(B + b * sB_b + g * sB_g + offs_n, mask=mn, other=0.0).to(tl.float32)
        cv = tl.load(C + b * sC_b + g * sC_g + offs_n, mask=mn, other=0.0).to(tl.float32)
        ptr = S + b * sS_b + h * sS_h + offs_p[:, None] * sS_p + offs_n[None, :]
        m2 = mp[:, None] & mn[None, :]
        s = tl.load(ptr, mask=m2, other=0.0).to(tl.float32)
        s = s * decay + (dt * x)[:, None] * bv[None, :]
        tl.store(ptr, s.to(S.dtype.element_ty), mask=m2)
        tl.store(Y + b * sY_b + h * sY_h + offs_p, tl.sum(s * cv[None, :], axis=1), mask=mp)

    _DECODE_KERNELS[interpret] = kernel
    return kernel


def fused_decode_unavailable(device) -> str | None:
    """Why ``mamba_state_step_fused`` cannot run on ``device`` (None when it can)."""
    import os

    if importlib.util.find_spec("triton") is None:
        return "needs Triton (pip install triton; it comes with CUDA builds of torch)"
    if str(device).startswith("cuda") or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "the fused Mamba decode kernel needs a CUDA device (or TRITON_INTERPRET=1 for tests)"


def mamba_state_step_fused(state, x, dt, A, B, C):
    """``mamba_state_step`` as one Triton kernel: the state is read once and written once (the
    torch version moves it about 2.5 times as often; at large batch the Mamba state dominates the
    bytes a hybrid's decode step moves). Written here rather than taken from a library because the
    engine's CUDA graphs need the state updated in place in fixed buffers: fla's fused-recurrent
    kernel returns a new state tensor, mamba_ssm's ``selective_state_update`` needs a CUDA build.
    Same arguments and result as the reference; runs on CPU tensors under TRITON_INTERPRET=1."""
    import os

    import torch
    import triton

    b, h, p, n = state.shape
    if state.dtype not in (torch.float32, torch.bfloat16, torch.float16) or state.stride(-1) != 1 or x.stride(-1) != 1 or B.stride(-1) != 1 \
            or C.stride(-1) != 1 or dt.stride(-1) != 1:
        raise ValueError("mamba_state_step_fused needs a float32/bfloat16/float16 state and unit-stride last dimensions")
    y = torch.empty(b, h, p, dtype=torch.float32, device=state.device)
    bp = min(32, triton.next_power_of_2(p))
    kernel = _decode_kernel(os.environ.get("TRITON_INTERPRET") == "1")
    kernel[(b * h, triton.cdiv(p, bp))](
        state, x, dt, A, B, C, y, h, h // B.shape[1], state.stride(0), state.stride(1), state.stride(2),
        x.stride(0), x.stride(1), dt.stride(0), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        y.stride(0), y.stride(1), P=p, N=n, BP=bp, BN=triton.next_power_of_2(n))
    return y
