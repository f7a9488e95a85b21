"""m1.bench: byte accounting, ratios, bad input. (Speed itself is measured by `m1 bench`, not tested.)"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from m1.bench import (BenchRow, _add_ratios, layout_layers, markdown_table, parse_ints, state_bytes_per_row,
                      step_bytes_per_row)
from m1.cli import main
from m1.errors import M1Error


def _row(model, batch, tps, bytes_per_step):
    return BenchRow(model=model, batch=batch, prompt_len=8, gen_len=64, ttft_s=0.1, decode_tokens_per_s=tps,
                    step_ms=1.0, state_bytes=0, peak_memory_bytes=None, bytes_per_step=bytes_per_step)


def test_ratios_compare_equal_batch_and_length():
    rows = [_row("h", 1, 30.0, 100.0), _row("h", 16, 300.0, 200.0), _row("b", 1, 20.0, 150.0),
            _row("b", 16, 100.0, 500.0)]
    _add_ratios(rows, ["h", "b"])
    assert rows[0].ratio == 1.5 and rows[0].byte_limit_ratio == 1.5 and rows[0].fraction_of_limit == 1.0
    assert rows[1].ratio == 3.0 and rows[1].byte_limit_ratio == 2.5 and rows[1].fraction_of_limit == 1.2
    assert rows[2].ratio is None
    table = markdown_table(rows)
    assert "| h | 16 | 64 | 300.0 |" in table and "2.50" in table


def test_state_bytes_grow_only_for_attention_layers(tiny_hybrid):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_hybrid)
    kv_per_token = 2 * 2 * 2 * 16  # 2 attention layers x K,V x 2 KV heads x head_dim 16
    assert state_bytes_per_row(cfg, 100, 4) - state_bytes_per_row(cfg, 10, 4) == 90 * kv_per_token * 4
    conv, ssm = 2 * (64 + 2 * 4 * 16) * 4, 2 * 4 * 16 * 16  # 2 Mamba layers: conv window, SSM state
    assert state_bytes_per_row(cfg, 0, 2) == conv * 2 + ssm * 4  # the SSM state is kept in float32
    assert step_bytes_per_row(cfg, 0, 2) == 2 * (conv * 2 + ssm * 4)  # read and written back each step


def test_max_batch_pairs_the_two_maxima():
    rows = [_row("h", 300, 900.0, 100.0), _row("b", 70, 300.0, 400.0), _row("h", 16, 50.0, 10.0),
            _row("b", 16, 40.0, 12.0)]
    rows[0].at_max_batch = rows[1].at_max_batch = True
    _add_ratios(rows, ["h", "b"])
    # tokens per byte: hybrid 300 rows / 100 bytes, baseline 70 / 400 -> limit 17.14x
    assert rows[0].ratio == 3.0 and rows[0].byte_limit_ratio == 17.143 and rows[2].ratio == 1.25
    assert "| h | 300 (max) |" in markdown_table(rows)
    assert parse_ints("1,max", "--batch", allow_max=True) == [1, "max"]
    with pytest.raises(M1Error, match="positive"):
        parse_ints("max", "--batch")


def test_largest_batch_counts_the_state_at_full_length(tiny_hybrid, monkeypatch):
    import m1.bench as bench
    from m1.engine import Engine
    from m1.model.checkpoint import load_model

    model, _ = load_model(tiny_hybrid)
    eng = Engine(model, bench._NullTokenizer())
    monkeypatch.setattr(bench, "_available_ram", lambda: 40 << 30)
    short, long = bench.largest_batch(eng, 256, 256), bench.largest_batch(eng, 256, 4096)
    assert short > long > 0  # longer generations hold more K/V per row
    monkeypatch.setattr(bench, "_available_ram", lambda: 1 << 30)
    with pytest.raises(M1Error, match="not even one sequence"):
        bench.largest_batch(eng, 256, 4096)


def test_layouts():
    assert layout_layers("m1", 30) == [4, 9, 14, 19, 24, 29]
    assert layout_layers("all-attention", 4) == [0, 1, 2, 3]
    assert layout_layers("0.5", 4) == [1, 3]
    with pytest.raises(M1Error, match="--layout"):
        layout_layers("most", 4)
    with pytest.raises(M1Error, match="positive"):
        parse_ints("16,0", "--batch")


def test_measure_on_a_tiny_hybrid(tiny_hybrid):
    from m1.bench import _NullTokenizer, measure
    from m1.engine import Engine
    from m1.model.checkpoint import load_model

    model, _ = load_model(tiny_hybrid)
    row = measure(Engine(model, _NullTokenizer()), "tiny", batch=3, prompt_len=5, gen_len=8, bandwidth=None)
    assert row.decode_tokens_per_s > 0 and row.ttft_s > 0
    assert row.state_bytes == 3 * state_bytes_per_row(model.config, 13, 4)


def test_resume_measures_only_the_missing_cells(tiny_hybrid, tiny_teachers, tmp_path, monkeypatch):
    """--resume keeps the rows an interrupted run wrote (same settings) and measures the rest."""
    import m1.bench as bench

    measured = []
    real = bench.measure
    monkeypatch.setattr(bench, "measure", lambda eng, name, b, *a, **k: measured.append((name, b)) or real(eng, name, b, *a, **k))
    out = tmp_path / "b.json"
    cfg = bench.BenchSettings(model=str(tiny_hybrid), baseline=str(tiny_teachers["llama_untied"]), batches=(1, 2),
                              prompt_len=5, gen_lens=(4,), json_path=str(out))

    def run(**changes):
        return bench.run_bench(replace(cfg, **changes), labels=("hyb", "base"), log=lambda m: None)

    full = run()
    assert measured == [("hyb", 1), ("hyb", 2), ("base", 1), ("base", 2)]
    assert (tmp_path / "b.png").stat().st_size > 1000  # the plot goes beside --json
    data = json.loads(out.read_text())
    data["rows"] = data["rows"][:3]  # killed while measuring the baseline at batch 2
    out.write_text(json.dumps(data))
    measured.clear()
    rows = run(resume=True)
    assert measured == [("base", 2)]
    assert [(r.model, r.batch) for r in rows] == [(r.model, r.batch) for r in full]
    assert rows[0].decode_tokens_per_s == full[0].decode_tokens_per_s  # kept, not re-measured
    assert all(r.ratio is not None for r in rows if r.model == "hyb")
    assert len(json.loads(out.read_text())["rows"]) == 4
    measured.clear()
    run(resume=True)
    assert measured == []  # nothing left to measure
    with pytest.raises(M1Error, match="other settings"):
        run(dtype="bfloat16", resume=True)
    with pytest.raises(M1Error, match="needs --json"):
        run(json_path=None, resume=True)


@pytest.mark.parametrize("argv,needle", [
    (["--shape", "gpt-9"], "unknown --shape"),
    (["--shape", "smollm2-135m", "--layout", "most"], "--layout"),
    (["--shape", "smollm2-135m", "--batch", "0"], "positive"),
    (["--shape", "smollm2-135m", "--gen-len", "-5"], "positive"),
    (["--shape", "smollm2-135m", "--device", "cuda"], "no CUDA"),
    (["--shape", "smollm2-135m", "--gen-len", "9000"], "exceeds the model context"),
])
def test_bad_input(capsys, argv, needle):
    import torch

    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert main(["bench", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------- --context mode
def test_context_mode_rows(tmp_path):
    """Per-L rows and one integrated row per model, paired for ratios, written as JSON."""
    from m1.bench import BenchSettings, ContextRow, run_bench

    out = tmp_path / "ctx.json"
    rows = run_bench(BenchSettings(shape="tiny", batches=(2,), prompt_len=8, gen_lens=(24,), contexts=[16, 8, 24],
                                   steps=3, json_path=str(out)), log=lambda m: None)
    assert all(isinstance(r, ContextRow) for r in rows) and len(rows) == 8
    hyb, base = rows[:4], rows[4:]
    assert [r.context for r in hyb] == [8, 16, 24, None] and [r.model for r in base] == ["tiny all-attention"] * 4
    for r in hyb[:3]:
        assert r.steps == 3 and r.batch == 2 and r.decode_tokens_per_s > 0 and r.prefill_s > 0
        assert r.decode_tokens_per_s == pytest.approx(2 / (r.step_ms / 1000), rel=1e-3)
        assert r.ratio is not None and r.byte_limit_ratio is not None and r.fraction_of_limit is not None
    g = hyb[3]
    assert (g.prompt_len, g.gen_len, g.steps, g.extrapolated) == (8, 24, 3, True)  # 7.5 .. 30.5 vs 9 .. 25
    assert g.ratio is not None and base[3].ratio is None
    data = json.loads(out.read_text())
    assert data["mode"] == "context" and data["steps"] == 3 and data["contexts"] == [8, 16, 24]
    assert len(data["rows"]) == 8 and data["rows"][3]["gen_len"] == 24
    table = markdown_table(rows)
    assert "| tiny m1 | 2 | 16 |" in table and "gen 8+24, integrated (extrapolated)" in table


def test_context_state_holds_L_tokens_in_every_row(tiny_hybrid):
    """The one prefill copied to every row gives the state the engine's own n-samples start gives."""
    import torch

    from m1.bench import _NullTokenizer, context_state
    from m1.engine import Engine, SamplingParams
    from m1.engine.scheduler import Request, Row
    from m1.model.checkpoint import load_model

    model, _ = load_model(tiny_hybrid)
    eng = Engine(model, _NullTokenizer())
    ids = list(range(3, 40))  # L = 37
    with torch.inference_mode():
        st, logits, secs = context_state(eng, 3, ids, len(ids) + 5, time_prefill=True)
        params = SamplingParams(n=3, max_new_tokens=5, temperature=0.0)
        ref, ref_logits = eng.runner.start([Request(0, ids, ids, params)], [0], [Row(0, j, j, params, 5) for j in range(3)])
    assert st.col == 37 and st.pos.tolist() == [37] * 3 and st.cap == ref.cap and secs > 0
    assert bool((st.bias[:, :37] == 0).all()) and bool((st.bias[:, 37:] == st.neg).all())
    assert st.k[0][:, :, 36].abs().sum() > 0  # (columns past L are uninitialised in eager mode, as in the engine)
    for a, b in zip(st.k + st.v, ref.k + ref.v):
        assert torch.equal(a[:, :, :37], b[:, :, :37])
    for a, b in zip(st.conv + st.ssm + [st.pos, st.bias], ref.conv + ref.ssm + [ref.pos, ref.bias]):
        assert torch.equal(a, b)
    assert torch.equal(logits, ref_logits)


def test_context_mode_times_K_steps_after_a_warm_up_over_the_same_columns(tiny_hybrid, monkeypatch):
    import m1.bench as bench
    from m1.engine import Engine
    from m1.model.checkpoint import load_model

    model, _ = load_model(tiny_hybrid)
    eng = Engine(model, bench._NullTokenizer())
    cols, real = [], eng.decode.dynamic
    monkeypatch.setattr(eng.decode, "dynamic", lambda st, toks: cols.append((st.col, int(st.pos[0]))) or real(st, toks))
    timed = []

    def fake_timer(device):  # every timed interval lasts 0.5 s; records how many steps ran inside it
        return (lambda: len(cols)), (lambda t0: timed.append(len(cols) - t0) or 0.5)
    monkeypatch.setattr(bench, "_timer", fake_timer)
    row = bench.measure_at_context(eng, "t", 2, 10, 5, bandwidth=None)
    assert cols == [(c, c) for c in range(10, 15)] * 2  # warm-up, rewind to L, the same columns timed
    assert timed == [0, 5]  # the prefill (no decode step inside), then exactly K = 5 steps
    assert row.step_ms == 100.0 and row.decode_tokens_per_s == 20.0 and row.prefill_s == 0.5
    assert row.context == 10 and row.steps == 5


def test_integration_equals_the_sum_over_the_generation_steps():
    from m1.bench import ContextRow, generation_row, integrate_generation

    s = lambda c: 0.01 + 2e-5 * c  # noqa: E731  (seconds per step, affine in the context)
    P, G = 100, 900
    direct = sum(s(c) for c in range(P, P + G - 1))  # the G - 1 decode steps write columns P .. P+G-2
    for xs in ([300.0, 700.0], [50.0, 400.0, 1200.0], [100.0, 250.0, 500.0, 998.0]):
        secs, extra = integrate_generation([(x, s(x)) for x in xs], P, G)
        assert secs == pytest.approx(direct, rel=1e-12)
        assert extra == (xs[0] > P - 0.5 or xs[-1] < P + G - 1.5)
    # a kinked profile: the trapezoid on the points equals a fine numerical integral of the interpolant
    pts = [(200.0, 0.02), (500.0, 0.05), (600.0, 0.03)]

    def interp(c):
        (c0, s0), (c1, s1) = (pts[0], pts[1]) if c <= 500 else (pts[1], pts[2])
        return s0 + (s1 - s0) * (c - c0) / (c1 - c0)
    lo, hi, n = P - 0.5, P + G - 1.5, 200000
    fine = sum(interp(lo + (i + 0.5) * (hi - lo) / n) for i in range(n)) * (hi - lo) / n
    assert integrate_generation(pts, P, G)[0] == pytest.approx(fine, rel=1e-6)
    assert integrate_generation([(400.0, 0.02)], P, G) == (pytest.approx(0.02 * (G - 1)), True)
    with pytest.raises(M1Error, match="distinct"):
        integrate_generation([(1.0, 0.1), (1.0, 0.2)], P, G)

    class Eng:  # what generation_row reads off an engine: weights and dtypes for the byte accounting
        import torch
        model = torch.nn.Linear(4, 4, bias=False)
        model.config = type("C", (), {"to_dict": lambda self: {"num_hidden_layers": 1, "hidden_size": 4,
                                                                 "num_attention_heads": 1, "layer_types": ["full_attention"]}})()
        ssm_dtype = torch.float32
    rows = [ContextRow(model="m", batch=8, context=int(x), steps=1, step_ms=s(x) * 1000, decode_tokens_per_s=0,
                       bytes_per_step=0, state_bytes=0) for x in (300, 700)]
    g = generation_row(Eng(), rows, P, G, None)
    assert g.decode_tokens_per_s == pytest.approx(8 * (G - 1) / direct, abs=0.005) and g.gen_len == G  # rounded


@pytest.mark.parametrize("argv,needle", [
    (["--shape", "tiny", "--context", "5000"], "exceeds the model's 4096 positions"),
    (["--shape", "tiny", "--context", "4090", "--steps", "8"], "4090 + --steps 8 exceeds"),
    (["--shape", "tiny", "--context", "64", "--steps", "0"], "--steps must be at least 1"),
    (["--shape", "tiny", "--context", ","], "--context must be"),
    (["--shape", "tiny", "--context", "64,x"], "--context must be"),
    (["--shape", "tiny", "--context", "64", "--gen-len", "64,128"], "the one generation"),
    (["--shape", "tiny", "--context", "64", "--json", "x.json", "--resume"], "--resume is for"),
    (["--shape", "tiny", "--batch", "max", "--memory-gib", "0"], "--memory-gib must be positive"),
])
def test_context_bad_input_before_any_model_is_built(capsys, monkeypatch, argv, needle):
    import m1.bench as bench

    monkeypatch.setattr(bench, "shape_model", lambda *a, **k: pytest.fail("built a model before checking input"))
    assert main(["bench", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1


def test_context_beyond_a_checkpoints_positions_fails_before_loading(tiny_hybrid, capsys, monkeypatch):
    import m1.model.checkpoint

    monkeypatch.setattr(m1.model.checkpoint, "load_model", lambda *a, **k: pytest.fail("loaded the weights"))
    assert main(["bench", "--model", str(tiny_hybrid), "--context", "1000000"]) == 1
    err = capsys.readouterr().err
    assert "exceeds the model's" in err and len(err.strip().splitlines()) == 1


def test_max_batch_in_a_smaller_device(tiny_hybrid, monkeypatch):
    """--memory-gib: the batch that fits a device of that size (what is in use counted against it)."""
    import m1.bench as bench
    from m1.engine import Engine
    from m1.model.checkpoint import load_model

    model, _ = load_model(tiny_hybrid)
    eng = Engine(model, bench._NullTokenizer())
    monkeypatch.setattr(bench, "_available_ram", lambda: 40 << 30)
    full = bench.largest_batch(eng, 64, 64)
    small = bench.largest_batch(eng, 64, 64, memory_bytes=(2 << 30) + (1 << 28))  # 2 GiB are kept free
    assert 0 < small < full
    assert small == bench.largest_batch(eng, 64, 64, memory_bytes=(2 << 30) + (1 << 28))  # depends on the size, not on RAM


def test_gpu_check_dry_run_machinery(tmp_path):
    """benchmarks/gpu_check.sh --cpu-dry-run, its cheapest stage (the whole dry run takes minutes on a
    shared 2-core CPU; docs/benchmarks.md has the command): the log, results.json and stage times."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_CHECK_WORK": str(tmp_path), "PYTHON": sys.executable}
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu-dry-run", "env", "no-such-stage"], cwd=repo, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]  # the unknown stage fails the run
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["cpu_dry_run"] is True and [s["stage"] for s in res["stages"]] == ["env", "no-such-stage"]
    assert res["stages"][0]["rc"] == 0 and res["stages"][1]["rc"] == 2
    log = (tmp_path / "out" / "gpu_check.log").read_text()
    assert "=== env: rc 0 in" in log and "=== stage times" in log and "unknown stage no-such-stage" in log
