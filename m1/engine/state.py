"""The preallocated decode state of one group of rows: K/V buffers written in place, Mamba conv and
SSM states, the padding bias, positions; filled from a prefill cache, compacted as rows finish."""

from __future__ import annotations

from .arch import Arch

KEY_BUCKET = 256  # see DecodeState.bucket
STATIC_CAPACITY_BUCKET = 256  # static (compiled / CUDA-graph) buffers: capacity in multiples of this


class DecodeState:
    """Preallocated decode state of one group: K/V buffers, Mamba conv/SSM states, padding bias."""

    def __init__(self, arch: Arch, rows: int, prompt_len: int, capacity: int, dtype, device, ssm_dtype,
                 static: bool = False):
        import torch

        a = arch
        self.static = static
        if static:  # compiled / CUDA-graph mode: few distinct shapes
            capacity = static_capacity(capacity)
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

    def fill(self, cache, arch: Arch, dest, src, mask, lengths) -> None:
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
        self.nbb = min(pow2_at_least(nb), self.rows) if self.static else nb
        return order


def static_capacity(tokens: int) -> int:
    """The capacity a static state allocates for ``tokens``: rounded up, so few shapes exist."""
    return -(-tokens // STATIC_CAPACITY_BUCKET) * STATIC_CAPACITY_BUCKET


def pow2_at_least(n: int) -> int:
    """Smallest power of two >= n."""
    return 1 << max(0, (n - 1).bit_length())
