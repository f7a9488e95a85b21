"""m1.distill on tiny models: resume = uninterrupted, align touches only mixers, kd lowers KL, bad input."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from m1.cli import main
from m1.distill import DistillConfig, distill, work_dir
from m1.errors import M1Error


class Kill(Exception):
    """Stands in for a kill -9 between two steps."""


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    r = random.Random(0)
    rows = []
    for i in range(40):
        a, b = r.randint(1, 99), r.randint(1, 99)
        rows.append({"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                                  {"role": "assistant", "content": f"First, {a} + {b} = {a + b}. "
                                                                   f"The answer is \\boxed{{{a + b}}}."}]})
    for i in range(8):
        rows.append({"text": f"Tom has {i} apples. He buys {i + 3} more. So the total is {2 * i + 3}."})
    f = tmp_path_factory.mktemp("data") / "train.jsonl"
    f.write_text("".join(json.dumps(x) + "\n" for x in rows))
    return f


def _cfg(student, data, out, **kw):
    base = dict(student=str(student), out=str(out), data=str(data), seq_len=40, batch_size=4, micro_batch_size=2,
                heldout=6, eval_batch_size=6, checkpoint_every=2, lr=1e-3, align_lr=3e-3, warmup=0.0)
    base.update(kw)
    return DistillConfig(**base)


def _run(cfg, **kw):
    return distill(cfg, log=lambda m: None, progress=False, **kw)


def _metrics(out):
    return [json.loads(ln) for ln in (Path(out) / "distill_metrics.jsonl").read_text().splitlines()]


def _weights(d):
    return load_file(str(Path(d) / "model.safetensors"))


def test_killed_and_resumed_run_matches_uninterrupted(tiny_hybrid, data_file, tmp_path):
    kw = dict(stage="both", align_steps=3, steps=4)
    full = _run(_cfg(tiny_hybrid, data_file, tmp_path / "full", **kw))
    assert full.steps == 7

    cfg = _cfg(tiny_hybrid, data_file, tmp_path / "part", **kw)

    def kill(step, m, model):
        if step == 5:
            raise Kill

    with pytest.raises(Kill):
        _run(cfg, on_step=kill)
    work = work_dir(cfg.out)
    assert not Path(cfg.out).exists()
    state = json.loads((work / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and state["stage"] == "kd"
    assert len((work / "metrics.jsonl").read_text().splitlines()) == 5  # step 5 ran, after the checkpoint

    # a different configuration is refused and nothing is touched
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (work / "checkpoint").iterdir())
    with pytest.raises(M1Error, match=r"different settings.*lr: 0\.001 -> 0\.002"):
        _run(replace(cfg, lr=2e-3), resume=True)
    with pytest.raises(M1Error, match="--resume to continue"):
        _run(cfg)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (work / "checkpoint").iterdir()) == before

    resumed = _run(cfg, resume=True)
    a, b = _metrics(full.out), _metrics(resumed.out)
    assert [m["step"] for m in b] == list(range(1, 8))
    for x, y in zip(a, b):
        assert x["stage"] == y["stage"]
        assert abs(x["loss"] - y["loss"]) <= 1e-6, (x, y)
        assert abs(x["lr"] - y["lr"]) <= 1e-12
    wa, wb = _weights(full.out), _weights(resumed.out)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    assert not work.exists()  # cleaned up after success
    assert abs(full.after["kl"] - resumed.after["kl"]) <= 1e-6


def test_align_trains_only_mixers_and_lowers_layer_mse(tiny_hybrid, data_file, tmp_path):
    res = _run(_cfg(tiny_hybrid, data_file, tmp_path / "a", stage="align", steps=8))
    before, after = _weights(tiny_hybrid), _weights(res.out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".mamba." in k for k in changed), sorted(changed)
    assert {k.split(".mamba.")[1] for k in changed} >= {"in_proj.weight", "out_proj.weight", "A_log", "D"}
    for layer, mse in res.after["layer_mse"].items():
        assert mse < 0.8 * res.before["layer_mse"][layer], (layer, res.before["layer_mse"], res.after["layer_mse"])
    rec = json.loads((res.out / "m1.json").read_text())
    assert rec["stage"] == "distill" and rec["attn_layers"] == [1, 3]
    assert rec["distill"]["settings"]["stage"] == "align" and rec["history"][0]["stage"] == "convert"


def test_kd_lowers_heldout_kl(tiny_hybrid, data_file, tmp_path):
    res = _run(_cfg(tiny_hybrid, data_file, tmp_path / "k", stage="kd", steps=8))
    assert res.after["kl"] < 0.7 * res.before["kl"], (res.before, res.after)
    assert res.after["teacher_ppl"] == pytest.approx(res.before["teacher_ppl"])
    m = _metrics(res.out)
    assert m[-1]["kl"] < m[0]["kl"] and {"loss", "kl", "lr", "tokens_per_s", "grad_norm"} <= set(m[0])
    # the output is a normal checkpoint that m1 reads
    from m1.checkpoint import load_model
    from m1.info import model_info
    load_model(res.out)
    assert model_info(res.out).record["stage"] == "distill"


@pytest.mark.parametrize("loss,ce_weight", [("reverse_kl", 0.0), ("jsd", 0.5), ("forward_kl", 1.0)])
def test_kd_micro_loss_equals_full_logits(tiny_hybrid, loss, ce_weight):
    # the chunked head loss gives the loss, the reported KL / CE and the gradients of the plain
    # formula on full logits; Granite's logits_scaling is honoured; padding carries no loss
    from m1.checkpoint import load_model
    from m1.distill import hidden_out, kd_micro_loss
    from m1.losses import cross_entropy, forward_kl, kd_loss

    student = load_model(tiny_hybrid)[0].double()
    teacher = load_model(tiny_hybrid)[0].double()
    student.config.logits_scaling = 1.7
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.tensor([[1, 5, 9, 13, 7, 2], [4, 4, 8, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    cfg = DistillConfig(student="s", out="o", steps=1, loss=loss, ce_weight=ce_weight, beta=0.3, temperature=1.3)

    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits
    s_logits = student(input_ids=ids, attention_mask=mask).logits
    want = kd_loss(loss, s_logits, t_logits, mask, cfg.temperature, cfg.beta, normalizer=7.0)
    want_ce = cross_entropy(s_logits[:, :-1], ids[:, 1:], mask[:, 1:], normalizer=5.0)
    want = want + ce_weight * want_ce
    want.backward()
    want_grads = {k: p.grad.clone() for k, p in student.named_parameters()}
    student.zero_grad()

    with hidden_out(student, teacher):
        with torch.no_grad():
            t_hidden = teacher(input_ids=ids, attention_mask=mask).logits
        s_hidden = student(input_ids=ids, attention_mask=mask).logits
    assert s_hidden.shape[-1] == student.config.hidden_size
    # chunks of 3 rows: several, one ragged
    got, kl_sum, ce_sum = kd_micro_loss(cfg, student, teacher, s_hidden, t_hidden, ids, mask, 7.0, 5.0, chunk=3)
    got.backward()
    assert abs(got.item() - want.item()) < 1e-10
    assert abs(kl_sum.item() / 10 - forward_kl(s_logits, t_logits, mask).item()) < 1e-10
    assert abs(ce_sum.item() - (want_ce.item() * 5.0 if ce_weight else 0.0)) < 1e-10
    for k, p in student.named_parameters():
        assert (p.grad - want_grads[k]).abs().max() < 1e-10 * (1 + want_grads[k].abs().max()), k
    assert "forward" not in vars(student.lm_head) and "forward" not in vars(teacher.lm_head)  # restored


@pytest.mark.skipif(not __import__("m1.training", fromlist=["x"]).cpu_bf16_supported(),
                    reason="this CPU has no bf16 instructions")
def test_kd_in_bf16_autocast_tracks_float32(tiny_hybrid, data_file, tmp_path):
    runs = {b: _run(_cfg(tiny_hybrid, data_file, tmp_path / b, stage="kd", steps=6, bf16=b)) for b in ("off", "on")}
    m32, m16 = _metrics(runs["off"].out), _metrics(runs["on"].out)
    assert abs(m16[0]["loss"] - m32[0]["loss"]) < 0.02 * m32[0]["loss"]  # same step 1, up to bf16 rounding
    assert runs["on"].after["kl"] < 0.7 * runs["on"].before["kl"]  # and it learns
    assert runs["on"].after["kl"] < 1.2 * runs["off"].after["kl"]
    rec = json.loads((runs["on"].out / "m1.json").read_text())
    assert rec["distill"]["precision"] == "bf16 autocast" and rec["dtype"] == "float32"


def test_precision_left_in_accelerate_state_does_not_leak_in(tiny_hybrid, data_file, tmp_path):
    # a TRL trainer (e.g. the demo's sft with --bf16 on) earlier in the same process leaves bf16 in
    # accelerate's shared state; a float32 distill run afterwards must still be float32
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    clean = _run(_cfg(tiny_hybrid, data_file, tmp_path / "a", stage="kd", steps=2))
    AcceleratorState._reset_state()
    Accelerator(cpu=True, mixed_precision="bf16")
    after = _run(_cfg(tiny_hybrid, data_file, tmp_path / "b", stage="kd", steps=2))
    assert [r["loss"] for r in _metrics(clean.out)] == [r["loss"] for r in _metrics(after.out)]


def test_bf16_on_without_bf16_hardware_is_refused(monkeypatch):
    import m1.training as sft

    monkeypatch.setattr(sft, "cpu_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(M1Error, match="AVX512-BF16 or AMX"):
        sft.resolve_precision("on")
    assert sft.resolve_precision("auto") is False and sft.resolve_precision("off") is False
    with pytest.raises(M1Error, match="--bf16"):
        sft.resolve_precision("maybe")


def test_kd_jsd_mamba_only_with_ce(tiny_hybrid, data_file, tmp_path):
    res = _run(_cfg(tiny_hybrid, data_file, tmp_path / "j", stage="kd", steps=3, loss="jsd", beta=0.3,
                    temperature=2.0, ce_weight=0.5, trainable="mamba", max_tokens=10_000))
    before, after = _weights(tiny_hybrid), _weights(res.out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".mamba." in k for k in changed)
    assert "ce" in _metrics(res.out)[0]


def test_max_tokens_budget(tiny_hybrid, data_file, tmp_path):
    res = _run(_cfg(tiny_hybrid, data_file, tmp_path / "t", stage="kd", max_tokens=200, heldout=2))
    m = _metrics(res.out)
    assert m[-1]["tokens"] >= 200 and m[-2]["tokens"] < 200 and res.steps == len(m)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_hybrid, data_file, tmp_path):
    cfg = _cfg(tiny_hybrid, data_file, tmp_path / "n", stage="kd", steps=6)

    def poison(step, m, model):
        if step == 2:  # corrupt the weights after the step-2 checkpoint was written
            with torch.no_grad():
                model.model.norm.weight.fill_(float("nan"))

    with pytest.raises(M1Error, match=r"loss became nan at step 3.*last good checkpoint \(step 2\)"):
        _run(cfg, on_step=poison)
    ckpt = work_dir(cfg.out) / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2
    assert torch.isfinite(_weights(ckpt)["model.norm.weight"]).all()
    assert not Path(cfg.out).exists()


def test_vocabulary_mismatch(tiny_hybrid, data_file, tmp_path, tiny_teachers):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    other = tmp_path / "other"
    m = AutoModelForCausalLM.from_pretrained(tiny_teachers["llama_untied"])
    m.resize_token_embeddings(m.config.vocab_size + 8, mean_resizing=False)
    m.save_pretrained(other)
    AutoTokenizer.from_pretrained(tiny_teachers["llama_untied"]).save_pretrained(other)
    n = m.config.vocab_size
    with pytest.raises(M1Error, match=f"vocabulary mismatch: the student has {n - 8} tokens and the teacher {n}"):
        _run(_cfg(tiny_hybrid, data_file, tmp_path / "o", teacher=str(other), stage="kd", steps=1))
    assert not (tmp_path / "o").exists() and not work_dir(tmp_path / "o").exists()


@pytest.mark.parametrize("kw,needle", [
    (dict(steps=None), "budget"),
    (dict(loss="kl"), "--loss"),
    (dict(loss="jsd", beta=1.0), "--beta"),
    (dict(stage="distill"), "--stage"),
    (dict(batch_size=3), "multiple of --micro-batch-size"),
    (dict(temperature=0.0), "--temperature"),
    (dict(data="/nonexistent/x.jsonl"), "not found"),
])
def test_bad_settings(tiny_hybrid, data_file, tmp_path, kw, needle):
    base = dict(stage="kd", steps=2)
    base.update(kw)
    data = base.pop("data", data_file)
    with pytest.raises(M1Error, match=needle):
        _run(_cfg(tiny_hybrid, data, tmp_path / "o", **base))
    assert not (tmp_path / "o").exists()


def test_align_needs_mamba_layers(tiny_teachers, data_file, tmp_path):
    from m1.convert import convert
    exact = convert(str(tiny_teachers["llama_tied"]), tmp_path / "exact", attn_layers="all", log=lambda m: None)
    with pytest.raises(M1Error, match="no Mamba layers"):
        _run(_cfg(exact, data_file, tmp_path / "o", stage="align", steps=1))


def _cli(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    return code, lines


def test_cli_errors_are_one_line(capsys, tiny_hybrid, data_file, tmp_path):
    out = tmp_path / "o"
    code, lines = _cli(capsys, "distill", "--student", str(tmp_path / "missing"), "--data", str(data_file),
                       "--out", str(out), "--steps", "1")
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "does not exist" in lines[0]
    code, lines = _cli(capsys, "distill", "--student", str(tiny_hybrid), "--data", str(data_file), "--out",
                       str(out), "--steps", "1", "--resume")
    assert code == 1 and len(lines) == 1 and "nothing to resume" in lines[0]
    out.mkdir()
    code, lines = _cli(capsys, "distill", "--student", str(tiny_hybrid), "--data", str(data_file), "--out",
                       str(out), "--steps", "1")
    assert code == 1 and len(lines) == 1 and "already exists" in lines[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": ""}\n')
    code, lines = _cli(capsys, "distill", "--student", str(tiny_hybrid), "--data", str(bad), "--out",
                       str(tmp_path / "o2"), "--steps", "1", "--no-progress")
    assert code == 1 and lines[-1] == f"error: {bad}:2: empty 'text'"


def test_cli_help(capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = capsys.readouterr().out
    for flag in ("--stage", "--loss", "--beta", "--ce-weight", "--temperature", "--trainable", "--max-tokens",
                 "--resume", "--micro-batch-size", "reverse_kl", "accelerate launch"):
        assert flag in text


def test_two_process_accelerate_launch_matches_one_process(tiny_hybrid, data_file, tmp_path):
    """Same global batch (4 rows): 1 process x 2 accumulation steps vs 2 processes x 1 (CPU, gloo)."""
    common = ["distill", "--student", str(tiny_hybrid), "--data", str(data_file), "--stage", "both",
              "--align-steps", "2", "--steps", "3", "--seq-len", "40", "--batch-size", "4", "--micro-batch-size", "2",
              "--heldout", "6", "--lr", "1e-3", "--align-lr", "3e-3", "--warmup", "0", "--no-progress"]
    one = _run(_cfg(tiny_hybrid, data_file, tmp_path / "one", align_steps=2, steps=3))
    # `--cpu` would make accelerate start a single process (multi-CPU needs mpirun); `--multi_gpu` starts
    # torchrun, and with no CUDA visible m1.distill runs DDP over gloo on CPU
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "m1"] + common + [
           "--out", str(tmp_path / "two")]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = _metrics(one.out), _metrics(tmp_path / "two")
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-6 * max(1.0, abs(x["loss"])), (x, y)  # bit-identical when measured
    rec = json.loads((tmp_path / "two" / "m1.json").read_text())
    assert rec["distill"]["processes"] == 2
    wa, wb = _weights(one.out), _weights(tmp_path / "two")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6


@pytest.mark.slow
def test_smollm2_align_and_kd_smoke(smollm2_hybrid, tmp_path):
    """The real teacher (GGUF Llama) through both stages: hooks, chat-rendered GSM8K, a loadable output."""
    cfg = DistillConfig(student=str(smollm2_hybrid), out=str(tmp_path / "d"), teacher="smollm2-135m",
                        data="gsm8k-train", stage="both", align_steps=2, steps=1, seq_len=48, batch_size=2,
                        heldout=2, eval_batch_size=2, align_lr=3e-3)
    res = _run(cfg)
    assert res.steps == 3
    assert res.after["kl"] < res.before["kl"]
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731  (single layers may go up: kd trains end to end)
    assert mean(res.after["layer_mse"]) < 0.8 * mean(res.before["layer_mse"])
    assert json.loads((res.out / "m1.json").read_text())["attn_layers"] == [4, 9, 14, 19, 24, 29]


def test_gradient_checkpointing_trains_the_same_weights(tiny_hybrid, data_file, tmp_path, monkeypatch):
    # recomputing activations in backward changes memory, not the result: align (per-mixer recompute)
    # then kd (transformers' per-layer recompute) end at the same weights, and the saved config is clean
    from transformers.models.granitemoehybrid.modeling_granitemoehybrid import GraniteMoeHybridMambaLayer

    calls = []
    forward = GraniteMoeHybridMambaLayer.forward
    monkeypatch.setattr(GraniteMoeHybridMambaLayer, "forward",
                        lambda self, *a, **k: calls.append(torch.is_grad_enabled()) or forward(self, *a, **k))
    plain = _run(_cfg(tiny_hybrid, data_file, tmp_path / "plain", stage="both", steps=3))
    n_plain, calls[:] = len(calls), []
    recomputed = _run(_cfg(tiny_hybrid, data_file, tmp_path / "gc", stage="both", steps=3, gradient_checkpointing=True))
    # 2 mixers x 2 micro-batches x 6 steps run again in backward
    assert len(calls) == n_plain + 2 * 2 * 6, (n_plain, len(calls))
    a, b = _weights(plain.out), _weights(recomputed.out)
    before = _weights(tiny_hybrid)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], before[k]) for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    assert json.loads((plain.out / "config.json").read_text()) == json.loads((recomputed.out / "config.json").read_text())


def test_gradient_checkpointing_is_resume_neutral(tiny_hybrid, data_file, tmp_path):
    # a run started without it can be resumed with it (e.g. after an out-of-memory kill)
    out = tmp_path / "r"
    cfg = _cfg(tiny_hybrid, data_file, out, stage="kd", steps=4)

    def kill(step, m, model):
        if step == 3:
            raise Kill

    with pytest.raises(Kill):
        _run(cfg, on_step=kill)
    res = _run(replace(cfg, gradient_checkpointing=True), resume=True)
    assert res.steps == 4 and [m["step"] for m in _metrics(res.out)] == [1, 2, 3, 4]


def test_micro_batch_size_changes_memory_not_the_run(tiny_hybrid, data_file, tmp_path):
    """The same global batch of 4 rows in forwards of 4, 2 or 1 rows (accumulated): the same losses
    and weights up to float rounding (what lets the CPU default cap forwards at 4 rows)."""
    runs = {m: _run(_cfg(tiny_hybrid, data_file, tmp_path / f"m{m}", stage="both", align_steps=2, steps=3,
                         micro_batch_size=m)) for m in (4, 2, 1)}
    ref = _metrics(runs[4].out)
    w4 = _weights(runs[4].out)
    for m in (2, 1):
        got = _metrics(runs[m].out)
        assert len(got) == len(ref) == 5
        for x, y in zip(ref, got):
            assert abs(x["loss"] - y["loss"]) <= 1e-6 * max(1.0, abs(x["loss"])), (m, x, y)  # measured <= 3e-8
        w = _weights(runs[m].out)
        assert max((w4[k] - w[k]).abs().max().item() for k in w4) <= 3e-5, m  # measured ~3e-6
