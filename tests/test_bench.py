"""m1.bench: byte accounting, ratios, bad input. (Speed itself is measured by `m1 bench`, not tested.)"""

from __future__ import annotations

import json

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
    from m1.checkpoint import load_model
    from m1.engine import Engine

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
    from m1.checkpoint import load_model
    from m1.engine import Engine

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
    kw = dict(model=str(tiny_hybrid), baseline=str(tiny_teachers["llama_untied"]), labels=("hyb", "base"),
              batches=(1, 2), prompt_len=5, gen_lens=(4,), json_path=out, log=lambda m: None)
    full = bench.run_bench(**kw)
    assert measured == [("hyb", 1), ("hyb", 2), ("base", 1), ("base", 2)]
    data = json.loads(out.read_text())
    data["rows"] = data["rows"][:3]  # killed while measuring the baseline at batch 2
    out.write_text(json.dumps(data))
    measured.clear()
    rows = bench.run_bench(**kw, resume=True)
    assert measured == [("base", 2)]
    assert [(r.model, r.batch) for r in rows] == [(r.model, r.batch) for r in full]
    assert rows[0].decode_tokens_per_s == full[0].decode_tokens_per_s  # kept, not re-measured
    assert all(r.ratio is not None for r in rows if r.model == "hyb")
    assert len(json.loads(out.read_text())["rows"]) == 4
    measured.clear()
    bench.run_bench(**kw, resume=True)
    assert measured == []  # nothing left to measure
    with pytest.raises(M1Error, match="other settings"):
        bench.run_bench(**{**kw, "dtype": "bfloat16"}, resume=True)
    with pytest.raises(M1Error, match="needs --json"):
        bench.run_bench(**{**kw, "json_path": None}, resume=True)


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
