"""The fast backend's decode step: one token for every live row through the model's own modules.

Preallocated K/V buffers written in place (no per-step ``torch.cat``), a padding bias instead of
HF's per-step mask construction, a precomputed RoPE table, the Mamba2 recurrent update written for
one token, and the model's RMSNorm / MLP / gated-norm modules called directly so the arithmetic
matches HF's. Weights are referenced, never copied: the step always sees the current weights
(RL rollouts on a model being trained). Two variants with the same arithmetic: :meth:`DecodeStep.dynamic`
(exact shapes) and :meth:`DecodeStep.static` (fixed shapes, for torch.compile and CUDA graphs).
"""

from __future__ import annotations

from .arch import Arch
from .state import DecodeState

LM_HEAD_SLICE = 1024  # vocabulary rows per slice of the CPU output projection (see DecodeStep.lm_head)


class DecodeStep:
    """``arch``: the model's layout; ``state_step``: the Mamba state update
    (:func:`m1.model.kernels.mamba_state_step` or its fused kernel); ``slice_head``: project to the
    vocabulary in slices (CPU float32, see :meth:`lm_head`)."""

    def __init__(self, arch: Arch, state_step, slice_head: bool = False):
        self.arch, self.state_step = arch, state_step
        self.head_slices = None
        if slice_head:
            w, b = arch.lm_head.weight, arch.lm_head.bias
            self.head_slices = [(w[i:i + LM_HEAD_SLICE], None if b is None else b[i:i + LM_HEAD_SLICE])
                                for i in range(0, w.shape[0], LM_HEAD_SLICE)]

    def dynamic(self, st: DecodeState, toks):
        """One decode step for the first ``st.nb`` rows; returns logits (nb, vocab)."""
        nb, c = st.nb, st.col
        if c >= st.cap:
            raise RuntimeError("decode state is full (a max_new_tokens bookkeeping bug)")
        h, cos, sin = self.embed(toks, st, nb)
        bias = None
        if st.bias is not None:
            st.bias[:nb, c] = 0
            if st.bucket:
                bias = st.bias[:nb, None, None, :min(st.cap, -(-(c + 1) // st.bucket) * st.bucket)]
            elif st.padded:
                bias = st.bias[:nb, None, None, :c + 1]
        logits = self.blocks(h, st, nb, c, cos, sin, bias)
        st.pos[:nb] += 1
        st.col = c + 1
        return logits

    def static(self, st: DecodeState, toks, kb: int | None = None):
        """The decode step with static shapes, for torch.compile / CUDA graphs: ``st.nbb`` rows (the
        live ones padded to a power of two), attention over the first ``kb`` key columns (default:
        the whole capacity) behind the bias, the write column a tensor. Same arithmetic as
        :meth:`dynamic` otherwise."""
        nb = st.nbb
        col = st.col_t
        h, cos, sin = self.embed(toks, st, nb)
        bias = None
        if st.bias is not None:
            st.bias[:nb].index_fill_(1, col, 0)
            bias = st.bias[:nb, None, None, :kb]
        logits = self.blocks(h, st, nb, col, cos, sin, bias)
        st.pos[:nb] += 1
        st.col_t += 1
        return logits

    def embed(self, toks, st: DecodeState, nb: int):
        """Token embeddings (nb, hidden) and the RoPE cos/sin at each row's position (None without RoPE)."""
        import torch.nn.functional as F

        a = self.arch
        h = F.embedding(toks, a.embed.weight)
        if a.emb_mult != 1.0:
            h = h * a.emb_mult
        if st.cos is None:
            return h, None, None
        pos = st.pos[:nb]
        return h, st.cos.index_select(0, pos)[:, None, :], st.sin.index_select(0, pos)[:, None, :]

    def blocks(self, h, st: DecodeState, nb: int, col, cos, sin, bias):
        """Embedded tokens (nb, 1, hidden) -> logits through every layer, writing at column ``col``
        (an int, or a one-element tensor in the static step)."""
        a = self.arch
        rm = a.res_mult
        for kind, slot, layer in a.layers:
            res = h
            x = layer.input_layernorm.forward(h)
            if kind == "attn":
                x = self.attention(layer.self_attn, x, st, slot, nb, col, cos, sin, bias)
            else:
                x = self.mamba(layer.mamba, x, st, slot, nb)
            h = res + x * rm if rm != 1.0 else res + x
            res = h
            x = getattr(layer, a.mlp_name).forward(layer.post_attention_layernorm.forward(h))
            h = res + x * rm if rm != 1.0 else res + x
        h = a.norm.forward(h)
        logits = self.lm_head(h)
        if a.logit_scale != 1.0:
            logits = logits / a.logit_scale
        return logits

    def lm_head(self, h):
        """Logits (rows, vocab). On CPU in float32 the output projection runs in slices of
        ``LM_HEAD_SLICE`` vocabulary rows: the BLAS's single GEMM with few rows and a 49k-wide output
        runs at ~30 GFLOP/s on an AVX2 core, slices at ~45 (SmolLM2's head at 16 rows: 35 -> 24 ms in
        isolation; a whole batch-16 decode ~5% faster); each logit is the same dot product either way."""
        import torch
        import torch.nn.functional as F

        head = self.arch.lm_head
        if self.head_slices is None:
            return F.linear(h, head.weight, head.bias)
        return torch.cat([F.linear(h, w, b) for w, b in self.head_slices], dim=-1)

    def attention(self, attn, x, st, slot, nb, c, cos, sin, bias):
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

    def mamba(self, mx, x, st, slot, nb):
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
        y = self.state_step(st.ssm[slot][:nb], xs, dt, A, B.view(nb, G, N), C.view(nb, G, N))
        y = (y + xs * mx.D[:, None]).to(x.dtype)
        y = mx.norm.forward(y.reshape(nb, I), gate)
        return F.linear(y.to(x.dtype), mx.out_proj.weight, mx.out_proj.bias)
