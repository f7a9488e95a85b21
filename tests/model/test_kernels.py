"""m1.model.kernels: the Mamba2 scan = simple GLA mapping, against a sequential float64 reference.

On CPU the kernel is stood in for by a sequential torch simple-GLA with fla's documented contract; on
CUDA with fla-core installed the real Triton kernel is checked against the same reference.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from m1.model import kernels
from m1.model.kernels import simple_gla_sequential, ssd_sequential, ssd_via_simple_gla


def _inputs(b=2, l=37, h=4, p=3, g=2, n=5, seed=0, device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x, dt_raw, B, C = r(b, l, h, p), r(b, l, h), r(b, l, g, n), r(b, l, g, n)
    A = -torch.rand(h, generator=gen, dtype=torch.float64) * 2 - 0.1
    D, dt_bias, h0 = r(h), r(h) * 0.5, r(b, h, p, n)
    return {k: v.to(device=device, dtype=dtype) for k, v in dict(x=x, dt_raw=dt_raw, A=A, B=B, C=C, D=D,
                                                                    dt_bias=dt_bias, h0=h0).items()}


def _reference(t, limit=(0.0, float("inf"))):
    import torch.nn.functional as F

    dt = torch.clamp(F.softplus(t["dt_raw"].double() + t["dt_bias"].double()), *limit)
    return ssd_sequential(t["x"].double(), dt, t["A"].double(), t["B"].double(), t["C"].double(), t["D"].double(),
                          t["h0"].double())


def _scan(fn, t, chunk=8, limit=(0.0, float("inf")), **kw):
    return fn(t["x"], t["dt_raw"], t["A"], t["B"], t["C"], chunk_size=chunk, D=t["D"], dt_bias=t["dt_bias"],
              initial_states=t["h0"], dt_softplus=True, dt_limit=limit, return_final_states=True, **kw)


def test_sequential_reference_equals_transformers_chunk_scan():
    # the reference and HF's torch scan agree: groups < heads, a length no chunk size divides, an
    # initial state, D, dt bias, softplus and a dt clamp that bites
    from transformers.models.granitemoehybrid.modeling_granitemoehybrid import mamba2_chunk_scan

    t = _inputs()
    for limit in [(0.0, float("inf")), (0.3, 1.2)]:
        y_ref, s_ref = _reference(t, limit)
        for chunk in (4, 16, 64):
            y, s = _scan(mamba2_chunk_scan, t, chunk, limit)
            assert (y.double() - y_ref).abs().max() < 1e-4, chunk
            assert (s.double() - s_ref).abs().max() < 1e-4, chunk


def test_simple_gla_mapping_equals_reference():
    t = _inputs(seed=1)
    y_ref, s_ref = _reference(t)
    y, s = _scan(ssd_via_simple_gla, {k: v.double() for k, v in t.items()}, gla=simple_gla_sequential)
    assert y.shape == y_ref.shape and s.shape == s_ref.shape == (2, 4, 3, 5)
    assert (y.double() - y_ref).abs().max() < 1e-5 and (s.double() - s_ref).abs().max() < 1e-5
    # without an initial state and without asking for the final state
    y2 = ssd_via_simple_gla(t["x"], t["dt_raw"], t["A"], t["B"], t["C"], 8, D=None, dt_bias=t["dt_bias"],
                            dt_softplus=True, gla=simple_gla_sequential)
    y2_ref, _ = ssd_sequential(t["x"].double(), torch.nn.functional.softplus(t["dt_raw"] + t["dt_bias"]).double(),
                               t["A"].double(), t["B"].double(), t["C"].double())
    assert (y2.double() - y2_ref).abs().max() < 1e-4


def test_simple_gla_reference_state_layouts_agree():
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 6, 2, 3, generator=gen), torch.randn(1, 6, 2, 3, generator=gen)
    v, g = torch.randn(1, 6, 2, 4, generator=gen), -torch.rand(1, 6, 2, generator=gen)
    h0 = torch.randn(1, 2, 3, 4, generator=gen)
    o1, s1 = simple_gla_sequential(q, k, v, g, scale=1.0, initial_state=h0, output_final_state=True)
    o2, s2 = simple_gla_sequential(q, k, v, g, scale=1.0, initial_state=h0.transpose(-1, -2).contiguous(),
                                   output_final_state=True, state_v_first=True)
    assert torch.allclose(o1, o2) and torch.allclose(s1, s2.transpose(-1, -2))


@pytest.mark.parametrize("b,l,h,g,chunk", [(2, 37, 4, 2, 8), (2, 37, 4, 2, 1), (1, 64, 4, 4, 16),
                                             (3, 20, 6, 1, 64), (1, 5, 2, 2, 3)])
def test_ssd_chunked_equals_sequential_reference(b, l, h, g, chunk):
    # chunk sizes that divide the length, do not, are 1 and exceed it; groups < heads; dt clamp
    from m1.model.kernels import ssd_chunked

    t = {k: v.double() for k, v in _inputs(b, l, h, 3, g, 5, seed=l + chunk).items()}
    for limit in [(0.0, float("inf")), (0.3, 1.2)]:
        y_ref, s_ref = _reference(t, limit)
        y, s = _scan(ssd_chunked, t, chunk, limit)
        assert y.shape == y_ref.shape and s.shape == s_ref.shape
        assert (y.double() - y_ref).abs().max() < 1e-5 * y_ref.abs().max()
        assert (s.double() - s_ref).abs().max() < 1e-5 * s_ref.abs().max()
    # no initial state, no D, no final state asked for
    y = ssd_chunked(t["x"], t["dt_raw"], t["A"], t["B"], t["C"], chunk, dt_bias=t["dt_bias"], dt_softplus=True)
    y_ref, _ = ssd_sequential(t["x"], torch.nn.functional.softplus(t["dt_raw"] + t["dt_bias"]), t["A"], t["B"], t["C"])
    assert (y.double() - y_ref).abs().max() < 1e-5 * y_ref.abs().max()


def test_ssd_chunked_float32_with_strong_decay():
    # float32 inputs (what training feeds it) against the float64 reference, with decays up to
    # exp(-16 * 2) per step and a 256-token chunk: the cumulative log decays reach the thousands
    from m1.model.kernels import ssd_chunked

    t = _inputs(2, 300, 4, 8, 2, 8, seed=7)
    t["A"] = torch.tensor([-16.0, -4.0, -1.0, -0.01])
    t["dt_raw"] = t["dt_raw"] + 1.0
    y_ref, s_ref = _reference(t)
    for chunk in (64, 256):
        y, s = _scan(ssd_chunked, t, chunk)
        assert y.dtype == s.dtype == torch.float32
        assert (y.double() - y_ref).abs().max() < 1e-4 * y_ref.abs().max(), chunk
        assert (s.double() - s_ref).abs().max() < 1e-4 * s_ref.abs().max(), chunk
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the state is never summed in bf16
        y, s = _scan(ssd_chunked, t, 64)
    assert y.dtype == torch.float32 and (y.double() - y_ref).abs().max() < 1e-4 * y_ref.abs().max()


def test_ssd_chunked_gradients_equal_sequential_reference():
    from m1.model.kernels import ssd_chunked

    t = {k: v.double() for k, v in _inputs(2, 23, 4, 3, 2, 5, seed=9).items()}

    def grads(fn):
        leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
        if fn is ssd_sequential:
            dt = torch.nn.functional.softplus(leaves["dt_raw"] + leaves["dt_bias"])
            y, s = ssd_sequential(leaves["x"], dt, leaves["A"], leaves["B"], leaves["C"], leaves["D"], leaves["h0"])
        else:
            y, s = _scan(fn, leaves, chunk=6)
        w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)  # a loss that weighs every output differently
        ((y * w).sum() + (s * s).sum()).backward()
        return {k: v.grad for k, v in leaves.items()}

    want, got = grads(ssd_sequential), grads(ssd_chunked)
    for k in t:
        assert got[k] is not None and (got[k] - want[k]).abs().max() < 1e-8 * (1 + want[k].abs().max()), k


def test_dispatcher_sends_cpu_to_ssd_chunked(monkeypatch, tiny_hybrid):
    from transformers.models.granitemoehybrid import modeling_granitemoehybrid as mod

    from m1.model.checkpoint import load_model

    model = load_model(tiny_hybrid)[0]
    kernels.disable()
    original = mod.mamba2_chunk_scan
    ids = torch.tensor([[3, 8, 1, 9, 4, 4, 7], [5, 5, 2, 1, 9, 8, 6]])
    before = model(input_ids=ids).logits
    monkeypatch.setattr(kernels, "fla_available", lambda: True)  # fla installed or not, CPU tensors skip it
    calls = []
    real = kernels.ssd_chunked
    monkeypatch.setattr(kernels, "ssd_via_simple_gla", lambda *a, **k: calls.append("fla"))
    monkeypatch.setattr(kernels, "ssd_chunked", lambda *a, **k: calls.append("ours") or real(*a, **k))
    try:
        assert kernels.enable() and kernels.enable()  # idempotent
        assert mod.mamba2_chunk_scan is not original and mod.mamba2_chunk_scan.__wrapped__ is original
        after = model(input_ids=ids).logits
        assert kernels.scan_backend("cpu") == "torch (m1 ssd_chunked)"
    finally:
        kernels.disable()
    assert mod.mamba2_chunk_scan is original
    assert calls and set(calls) == {"ours"}
    assert (after - before).abs().max() < 1e-4 * before.abs().max()
    assert kernels.scan_backend("cpu") == "torch (transformers' chunked scan)"


needs_fla_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and importlib.util.find_spec("fla") is not None),
    reason="needs CUDA and fla-core (pip install fla-core)")


@pytest.mark.gpu
@needs_fla_cuda
def test_fla_kernel_equals_reference_on_cuda():
    for b, l, h, p, g, n in [(2, 37, 4, 16, 2, 16), (1, 300, 8, 64, 1, 64)]:
        t = _inputs(b, l, h, p, g, n, seed=3, device="cuda")
        y_ref, s_ref = _reference({k: v.cpu() for k, v in t.items()})
        y, s = _scan(ssd_via_simple_gla, t)
        scale = y_ref.abs().max().item()
        assert (y.double().cpu() - y_ref).abs().max() < 5e-3 * scale
        assert (s.double().cpu() - s_ref).abs().max() < 5e-3 * s_ref.abs().max().item()


def _grads(fn, t):
    leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    y, s = _scan(fn, leaves, chunk=16)
    (y.square().sum() + s.sum()).backward()
    return {k: v.grad for k, v in leaves.items()}


@pytest.mark.gpu
@needs_fla_cuda
def test_fla_kernel_gradients_match_torch_scan_on_cuda():
    from transformers.models.granitemoehybrid.modeling_granitemoehybrid import mamba2_chunk_scan

    if not kernels.fla_backward_ok("cuda"):
        pytest.skip("fla's gated backward is refused on this GPU/Triton (fla #640); training uses the torch scan")
    t = _inputs(2, 64, 4, 16, 2, 16, seed=4, device="cuda")
    torch_scan = getattr(mamba2_chunk_scan, "__wrapped__", mamba2_chunk_scan)
    a, b = _grads(ssd_via_simple_gla, t), _grads(torch_scan, t)
    for k in ("x", "dt_raw", "B", "C", "A", "h0"):
        assert (a[k] - b[k]).abs().max() < 1e-2 * b[k].abs().max(), k


@pytest.mark.gpu
@needs_fla_cuda
def test_dispatcher_training_gradients_on_cuda():
    """Through the installed dispatcher, training works on every GPU/Triton: the kernel's backward
    where fla trusts it, else the torch scan; forward-only calls use the kernel either way."""
    from transformers.models.granitemoehybrid import modeling_granitemoehybrid as mod

    t = _inputs(2, 64, 4, 16, 2, 16, seed=4, device="cuda")
    torch_scan = getattr(mod.mamba2_chunk_scan, "__wrapped__", mod.mamba2_chunk_scan)  # transformers' own
    try:
        assert kernels.enable()
        calls = []
        real = kernels.ssd_via_simple_gla
        kernels.ssd_via_simple_gla = lambda *a, **k: calls.append(1) or real(*a, **k)
        got = _grads(mod.mamba2_chunk_scan, t)
        used_kernel_for_grad = bool(calls)
        with torch.no_grad():
            _scan(mod.mamba2_chunk_scan, t)
        assert len(calls) == used_kernel_for_grad + 1  # inference always takes the kernel
    finally:
        kernels.ssd_via_simple_gla = real
        kernels.disable()
    assert used_kernel_for_grad == kernels.fla_backward_ok("cuda")
    want = _grads(torch_scan, t)
    for k in ("x", "dt_raw", "B", "C", "A", "h0"):
        assert (got[k] - want[k]).abs().max() < 1e-2 * want[k].abs().max(), k


@pytest.mark.gpu
@needs_fla_cuda
def test_hybrid_on_cuda_with_kernel_matches_torch_scan(tiny_hybrid):
    from m1.engine import Engine, SamplingParams
    from m1.model.checkpoint import load_model

    model = load_model(tiny_hybrid, device="cuda")[0]
    ids = torch.randint(0, model.config.vocab_size, (3, 50), device="cuda")
    plain = model(input_ids=ids).logits
    try:
        assert kernels.enable()
        fast = model(input_ids=ids).logits
        assert kernels.scan_backend("cuda").startswith("fla")
        eng = Engine.from_pretrained(tiny_hybrid, device="cuda")
        greedy = SamplingParams(n=1, max_new_tokens=12, temperature=0.0, ignore_eos=True)
        greedy_fast = eng.generate([[5, 9, 2, 7]], greedy)
    finally:
        kernels.disable()
    assert (fast - plain).abs().max() < 2e-3 * plain.abs().max()
    greedy_plain = Engine.from_pretrained(tiny_hybrid, device="cuda").generate([[5, 9, 2, 7]], greedy)
    assert greedy_fast[0].completions[0].token_ids == greedy_plain[0].completions[0].token_ids


# ------------------------------------------------------------------------- decode: one token
def _decode_inputs(b=3, h=6, p=20, n=12, g=3, seed=5, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    return dict(state=r(b, h, p, n), x=r(b, h, p), dt=torch.rand(b, h, generator=gen) + 0.05,
                A=-torch.rand(h, generator=gen) * 2, B=r(b, g, n), C=r(b, g, n))


def test_state_step_equals_sequential_ssd_over_several_tokens():
    """Three decode steps of the torch state update = the float64 sequential SSD from the same state."""
    from m1.model.kernels import mamba_state_step

    t = [_decode_inputs(seed=s) for s in (5, 6, 7)]
    state = t[0]["state"].clone()
    ys = [mamba_state_step(state, d["x"], d["dt"], t[0]["A"], d["B"], d["C"]) for d in t]
    stack = lambda k: torch.stack([d[k] for d in t], dim=1).double()  # noqa: E731  (b, l, ...)
    y_ref, s_ref = ssd_sequential(stack("x"), stack("dt"), t[0]["A"].double(), stack("B"), stack("C"),
                                  initial_states=t[0]["state"].double())
    assert torch.allclose(torch.stack(ys, dim=1).double(), y_ref, atol=1e-4, rtol=1e-4)
    assert torch.allclose(state.double(), s_ref, atol=1e-5, rtol=1e-5)


def test_state_step_keeps_a_low_precision_state_but_updates_in_float32():
    from m1.model.kernels import mamba_state_step

    d = _decode_inputs()
    low = d["state"].bfloat16()
    exact = low.float()  # the same starting values, kept in float32
    y_low = mamba_state_step(low, d["x"], d["dt"], d["A"], d["B"], d["C"])
    y = mamba_state_step(exact, d["x"], d["dt"], d["A"], d["B"], d["C"])
    assert low.dtype == torch.bfloat16 and torch.equal(y_low, y)  # y from the float32 new state
    assert torch.equal(low, exact.bfloat16())  # stored rounded once


needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")


def _in_triton_interpreter(code: str) -> str:
    """Run ``code`` in a fresh Python with TRITON_INTERPRET=1 set before triton is imported (Triton's
    own library functions are compiled or interpreted depending on that flag at import time, and
    torch/transformers import triton early in this process)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@needs_triton
def test_fused_state_step_equals_reference_in_triton_interpreter():
    """The Triton decode kernel's arithmetic (masks for p, n not powers of two, groups < heads), run
    by Triton's CPU interpreter; the GPU test below runs it compiled."""
    out = _in_triton_interpreter("""
import torch
from m1.model.kernels import mamba_state_step, mamba_state_step_fused
from tests.model.test_kernels import _decode_inputs
for b, h, p, n, g in [(3, 6, 20, 12, 3), (2, 4, 64, 64, 1), (1, 2, 40, 16, 2)]:
    d = _decode_inputs(b, h, p, n, g)
    s1, s2 = d["state"].clone(), d["state"].clone()
    y1 = mamba_state_step(s1, d["x"], d["dt"], d["A"], d["B"], d["C"])
    y2 = mamba_state_step_fused(s2, d["x"], d["dt"], d["A"], d["B"], d["C"])
    print((y1 - y2).abs().max().item(), (s1 - s2).abs().max().item(), (s1 - d["state"]).abs().max().item())
# a bfloat16 state: updated in float32, stored rounded, like the torch reference
s1, s2 = d["state"].bfloat16(), d["state"].bfloat16()
y1 = mamba_state_step(s1, d["x"], d["dt"], d["A"], d["B"], d["C"])
y2 = mamba_state_step_fused(s2, d["x"], d["dt"], d["A"], d["B"], d["C"])
rel = ((s1.float() - s2.float()).abs() / s1.float().abs().clamp_min(1e-3)).max().item()
print("bf16", (y1 - y2).abs().max().item(), rel, s2.dtype)
try:
    mamba_state_step_fused(d["state"].double(), d["x"], d["dt"], d["A"], d["B"], d["C"])
except ValueError as e:
    print("refused:", e)
""")
    lines = out.strip().splitlines()
    errs = [[float(v) for v in line.split()] for line in lines[:3]]
    assert all(ey < 1e-5 and es < 1e-6 and moved > 1e-2 for ey, es, moved in errs), errs
    _, ey, es, dtype = lines[3].split()
    assert float(ey) < 1e-4 and float(es) <= 2 ** -7 and dtype == "torch.bfloat16", lines[3]  # <= 1 bf16 ulp
    assert lines[4].startswith("refused:") and "float32" in lines[4]


@needs_triton
def test_engine_with_fused_decode_equals_plain_engine(tiny_hybrid):
    from m1.engine import Engine
    from m1.errors import M1Error
    from m1.model.checkpoint import load_model

    model, tok = load_model(tiny_hybrid)
    with pytest.raises(M1Error, match="fused_decode: .*CUDA"):
        Engine(model, tok, fused_decode=True)
    out = _in_triton_interpreter(f"""
from m1.model.checkpoint import load_model
from m1.engine import Engine, SamplingParams
model, tok = load_model({str(tiny_hybrid)!r})
params = SamplingParams(n=2, max_new_tokens=10, temperature=0.7, seed=3, ignore_eos=True)
prompts = ["Tom has 12 apples.", "Solve"]
fused = Engine(model, tok, fused_decode=True).generate(prompts, params)
plain = Engine(model, tok).generate(prompts, params)
print([[c.token_ids for c in o.completions] for o in fused])
print([[c.token_ids for c in o.completions] for o in plain])
""")
    fused, plain = out.strip().splitlines()[-2:]
    assert fused == plain and len(fused) > 40


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                    reason="needs CUDA and triton")
def test_fused_state_step_on_cuda(tiny_hybrid):
    from m1.engine import Engine, SamplingParams
    from m1.model.checkpoint import load_model
    from m1.model.kernels import mamba_state_step, mamba_state_step_fused

    for shape in [(3, 6, 20, 12, 3), (64, 24, 128, 128, 1)]:  # the second: the llama-3.2-3b hybrid's heads
        d = {k: v.cuda() for k, v in _decode_inputs(*shape).items()}
        s1, s2 = d["state"].clone(), d["state"].clone()
        y1 = mamba_state_step(s1, d["x"], d["dt"], d["A"], d["B"], d["C"])
        y2 = mamba_state_step_fused(s2, d["x"], d["dt"], d["A"], d["B"], d["C"])
        assert torch.allclose(y1, y2, atol=1e-4, rtol=1e-4) and torch.allclose(s1, s2, atol=1e-5, rtol=1e-5)
    model, tok = load_model(tiny_hybrid, device="cuda")
    params = SamplingParams(n=3, max_new_tokens=16, temperature=0)
    prompts = ["Tom has 12 apples.", "Solve"]
    want = Engine(model, tok, cuda_graphs=False).generate(prompts, params)
    got = Engine(model, tok, fused_decode=True).generate(prompts, params)  # with CUDA graphs
    assert [[c.token_ids for c in o.completions] for o in got] == [[c.token_ids for c in o.completions] for o in want]


@needs_triton
@pytest.mark.parametrize("capability,version,ok", [((9, 0), "3.6.0", False), ((9, 0), "3.7.1", True),
                                                    ((9, 0), "3.3.1", True), ((8, 0), "3.6.0", True)])
def test_fla_backward_refused_only_on_hopper_with_affected_triton(monkeypatch, capability, version, ok):
    import triton

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: capability)
    monkeypatch.setattr(triton, "__version__", version)
    assert kernels.fla_backward_ok("cuda") is ok
    assert kernels.fla_backward_ok("cpu") is False
