"""m1.train.distill on tiny models: resume = uninterrupted, align touches only mixers, kd lowers KL, bad input."""

from __future__ import annotations

import json
import re
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
from m1.errors import M1Error
from m1.train.distill import DistillConfig, distill, work_dir


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


def _ckpt(work):
    """The newest complete checkpoint of an unfinished run (the layout every m1 training stage uses)."""
    from m1.train.distill import CONFIG_FILE
    from m1.train.run import find_checkpoints

    ckpt, _ = find_checkpoints(work, CONFIG_FILE)
    assert ckpt is not None, f"no complete checkpoint in {work}"
    return ckpt


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
    state = json.loads((_ckpt(work) / "state.json").read_text())
    assert state["step"] == 4 and state["stage"] == "kd"
    assert len((work / "metrics.jsonl").read_text().splitlines()) == 5  # step 5 ran, after the checkpoint

    # a different configuration is refused and nothing is touched
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (_ckpt(work)).iterdir())
    with pytest.raises(M1Error, match=r"different settings.*lr: 0\.001 \(saved\) != 0\.002 \(now\)"):
        _run(replace(cfg, lr=2e-3), resume=True)
    with pytest.raises(M1Error, match="--resume to continue"):
        _run(cfg)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (_ckpt(work)).iterdir()) == before

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
    from m1.model.checkpoint import load_model
    from m1.model.info import model_info
    load_model(res.out)
    assert model_info(res.out).record["stage"] == "distill"


def test_keep_checkpoints_leaves_the_last_checkpoint_equal_to_the_output(tiny_hybrid, data_file, tmp_path):
    out = tmp_path / "kept"
    args = ["distill", "--student", str(tiny_hybrid), "--out", str(out), "--data", str(data_file), "--stage", "kd",
            "--steps", "3", "--seq-len", "40", "--batch-size", "4", "--heldout", "6", "--checkpoint-every", "2",
            "--no-progress"]
    assert main(args + ["--keep-checkpoints"]) == 0
    work = work_dir(out)
    assert json.loads((_ckpt(work) / "state.json").read_text())["step"] == 3
    final, last = _weights(out), _weights(_ckpt(work))
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert len((work / "metrics.jsonl").read_text().splitlines()) == 3
    # without the flag (and with --force over the kept run) the work directory goes, as in m1 sft / m1 grpo
    assert main(args + ["--force"]) == 0
    assert not work.exists() and (out / "model.safetensors").exists()


@pytest.mark.parametrize("loss,ce_weight", [("reverse_kl", 0.0), ("jsd", 0.5), ("forward_kl", 1.0)])
def test_kd_micro_loss_equals_full_logits(tiny_hybrid, loss, ce_weight):
    # the chunked head loss gives the loss, the reported KL / CE and the gradients of the plain
    # formula on full logits; Granite's logits_scaling is honoured; padding carries no loss
    from m1.model.checkpoint import load_model
    from m1.train.distill import hidden_out, kd_micro_loss
    from m1.train.losses import cross_entropy, forward_kl, kd_loss

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


@pytest.mark.skipif(not __import__("m1.train.run", fromlist=["x"]).cpu_bf16_supported(),
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
    import m1.train.run as sft

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

    with pytest.raises(M1Error, match=r"training diverged: the loss became nan at step 3.*last good checkpoint \(step 2\)"):
        _run(cfg, on_step=poison)
    ckpt = _ckpt(work_dir(cfg.out))
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
    from m1.model.convert import ConvertSettings, convert
    exact = convert(ConvertSettings(teacher=str(tiny_teachers["llama_tied"]), attn_layers="all"),
                    tmp_path / "exact", log=lambda m: None)
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
    # torchrun, and with no CUDA visible m1.train.distill runs DDP over gloo on CPU
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


# ------------------------------------------------------------------------------ task data and onpolicy
ARITH = "arith:steps=1,digits=1,n=24"  # prompts of 74-141 tiny-tokenizer tokens, completions of 30-70


def _op_cfg(student, out, **kw):
    """An onpolicy run on arith prompts (seq_len 256 keeps every prompt whole)."""
    base = dict(stage="onpolicy", steps=4, seq_len=256, heldout=4, eval_batch_size=4, max_new_tokens=8)
    base.update(kw)
    return _cfg(student, base.pop("data", ARITH), out, **base)


def test_onpolicy_loss_equals_float64_formula_on_completion_positions(tiny_hybrid, tiny_teachers):
    """kd_micro_loss with a completion loss_mask = sum over exactly the positions that predict a
    completion token of sum_v q(v) (log q(v) - log p(v)) (q student, p teacher) / their count, in
    value and in every gradient; prompt, last and padding positions take no part."""
    from transformers import AutoModelForCausalLM

    from m1.model.checkpoint import load_model
    from m1.train.data import collate
    from m1.train.distill import hidden_out, kd_micro_loss
    from m1.train.onpolicy import loss_span, span_mask

    student = load_model(tiny_hybrid)[0].double()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teachers["llama_untied"]).double().eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)  # a peaked teacher, so the KL is of order 1 and not ~0.006
    rows = [[5, 9, 13, 7, 2, 11, 30], [4, 8, 3, 6, 12], [20, 21, 22, 23, 24, 25]]
    plens = [3, 2, 4]
    ids, mask = collate(rows, pad_id=0)  # right padding: row 1 has 2 pads, row 2 one
    spans = [loss_span(len(r), n) for r, n in zip(rows, plens)]
    assert spans == [(2, 6), (1, 4), (3, 5)]
    lmask = span_mask(spans, ids.shape[1])
    n_tok = sum(hi - lo for lo, hi in spans)
    assert int(lmask.sum()) == n_tok == 9
    cfg = DistillConfig(student="s", out="o", steps=1, stage="onpolicy")
    assert cfg.loss == "reverse_kl" and cfg.temperature == 1.0

    # the formula, written out position by position on the full float64 logits
    s_logits = student(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=mask).logits
    want, want_fkl = 0.0, 0.0
    for r, (lo, hi) in enumerate(spans):
        for t in range(lo, hi):
            log_q, log_p = torch.log_softmax(s_logits[r, t], -1), torch.log_softmax(t_logits[r, t], -1)
            want = want + (log_q.exp() * (log_q - log_p)).sum()
            want_fkl += (log_p.exp() * (log_p - log_q)).sum().item()
    want = want / n_tok
    params = dict(student.named_parameters())
    want_grads = dict(zip(params, torch.autograd.grad(want, list(params.values()))))

    with hidden_out(student, teacher):
        with torch.no_grad():
            t_hidden = teacher(input_ids=ids, attention_mask=mask).logits
        s_hidden = student(input_ids=ids, attention_mask=mask).logits

    def micro(s_h, t_h):
        return kd_micro_loss(cfg, student, teacher, s_h, t_h, ids, mask, kd_norm=float(n_tok), ce_norm=1.0,
                             chunk=4, loss_mask=lmask)

    got, kl_sum, ce_sum = micro(s_hidden, t_hidden)
    assert want.item() > 0.5  # far from a trivial 0
    assert abs(got.item() - want.item()) < 1e-10 * want.item()
    assert abs(kl_sum.item() - want_fkl) < 1e-9 * want_fkl and ce_sum.item() == 0.0  # the reported KL(t||s) sum
    g_hidden, *g_params = torch.autograd.grad(got, [s_hidden] + list(params.values()), allow_unused=True)
    for (k, g), w in zip(zip(params, g_params), want_grads.values()):
        g = torch.zeros_like(w) if g is None else g
        assert (g - w).abs().max() <= 1e-9 * (1 + w.abs().max()), k
    assert want_grads["lm_head.weight"].abs().max() > 0 and want_grads["model.embed_tokens.weight"].abs().max() > 0
    # the loss reads the student's hidden state only at loss positions ...
    touched = g_hidden.abs().amax(-1) > 0
    assert torch.equal(touched, lmask.bool()), touched

    # ... and the teacher's too: moving it at a prompt, last-token or padding position changes nothing
    g = torch.Generator().manual_seed(0)

    def with_teacher_moved(r, t):
        th = t_hidden.clone()
        th[r, t] += 3.0 * torch.randn(th.shape[-1], generator=g, dtype=th.dtype)
        return micro(s_hidden.detach(), th)[0].item()

    base = got.item()
    prompt = [(0, 0), (0, 1), (1, 0), (2, 0), (2, 2)]  # prompt tokens before the last one
    last = [(0, 6), (1, 4), (2, 5)]  # the last real token of each row predicts nothing
    padding = [(1, 5), (1, 6), (2, 6)]
    for r, t in prompt + last + padding:
        assert abs(with_teacher_moved(r, t) - base) < 1e-12, (r, t)
    # the last prompt token predicts the first completion token: it counts, as do the completion tokens
    for r, t in [(0, 2), (0, 5), (1, 1), (1, 3), (2, 3), (2, 4)]:
        assert abs(with_teacher_moved(r, t) - base) > 1e-4, (r, t)


def test_rollouts_are_the_students_engine_samples(tiny_hybrid, monkeypatch):
    """Rollouts.sample: rows = a training prompt + exactly the tokens m1's Engine samples for it with the
    seeds it was given; spans = exactly the positions that predict a sampled token; a pure function
    of (seed, step), whatever the global RNG."""
    import copy

    from m1.engine import Engine
    from m1.model.checkpoint import load_model
    from m1.train.data import load_data
    from m1.train.onpolicy import Rollouts, span_mask

    student, tok = load_model(tiny_hybrid)
    cfg = _op_cfg(tiny_hybrid, "unused", batch_size=6, num_samples=3, max_new_tokens=6, gen_temperature=1.3, seed=5)
    data = load_data(cfg.data, tok, cfg.seq_len, cfg.heldout, cfg.seed)
    calls, real = [], Engine.generate

    def spy(self, prompts, params=None, **kw):
        calls.append(([list(p) for p in prompts], [copy.copy(sp) for sp in params]))
        return real(self, prompts, params, **kw)

    monkeypatch.setattr(Engine, "generate", spy)
    ro = Rollouts(student, tok, data, cfg, contexts=(512, 512))
    torch.manual_seed(1)
    seqs, spans, extra = ro.sample(3)
    ((prompts, params),) = calls
    assert len(prompts) == 2 and len(seqs) == 6  # batch 6 = 2 prompts x 3 samples
    assert all(sp.n == 3 and sp.max_new_tokens == 6 and sp.temperature == 1.3 for sp in params)
    assert len({sp.seed + j for sp in params for j in range(sp.n)}) == 6  # no two samples share a seed
    whole = {tuple(r[:n]) for r, n in zip(data.train, data.prompt_lens)}
    assert all(tuple(p) in whole and tok.decode(p).endswith("<|im_start|>assistant\n") for p in prompts)

    ref = real(Engine(student, tok), prompts, params)  # the engine, called directly with those seeds
    want = [p + c.token_ids for p, out in zip(prompts, ref) for c in out.completions]
    assert seqs == want
    assert extra["onpolicy"] is True and extra["gen_tokens"] == sum(len(s) - len(p) for s, p in
                                                                    zip(seqs, [p for p in prompts for _ in range(3)]))
    refs = {tuple(r) for r in data.train}
    assert not any(tuple(s) in refs for s in seqs)  # sampled, not the reference solutions
    assert len({tuple(s) for s in seqs[:3]}) > 1  # the 3 samples of a prompt differ
    m = span_mask(spans, max(map(len, seqs)))
    for k, s in enumerate(seqs):
        p = prompts[k // 3]
        assert s[:len(p)] == p and len(s) > len(p)
        assert m[k].nonzero().flatten().tolist() == list(range(len(p) - 1, len(s) - 1))  # predict sampled tokens

    # same (seed, step): the same rollouts, from a fresh object and another global RNG state (a resume)
    torch.manual_seed(2)
    fresh = Rollouts(load_model(tiny_hybrid)[0], tok, data, cfg, contexts=(512, 512))
    assert fresh.sample(3)[:2] == (seqs, spans)
    assert ro.sample(4)[0] != seqs  # another step
    assert Rollouts(student, tok, data, replace(cfg, seed=6), contexts=(512, 512)).sample(3)[0] != seqs


@pytest.fixture(scope="module")
def sharp_pair(tiny_hybrid, tmp_path_factory):
    """(teacher, student) m1 checkpoints that agree on every context made of the arith data's tokens
    and disagree after any other token -- which only the student's own samples contain.

    teacher: the tiny hybrid with its lm_head x 5 (peaked: KL of order 0.3 instead of ~0.006);
    student: the same, plus one shared random offset (3 std) on the embedding rows of the tokens the
    data never uses. So the loss on prompts or reference completions is exactly 0 (nothing to
    learn there); only on-policy samples show the student where it is wrong."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from m1.train.data import load_data

    root = tmp_path_factory.mktemp("sharp")
    tok = AutoTokenizer.from_pretrained(tiny_hybrid)
    data = load_data(SHARP_DATA, tok, 256, SHARP_HELDOUT, 0)
    used = {t for r in data.train + data.heldout_ids for t in r} | set(tok.all_special_ids)
    unused = torch.tensor(sorted(set(range(len(tok))) - used))
    assert len(unused) > len(tok) // 2  # 253 of 384 when measured
    model = AutoModelForCausalLM.from_pretrained(tiny_hybrid)
    dirs = root / "teacher", root / "student"
    with torch.no_grad():
        model.lm_head.weight.mul_(5.0)
        shutil.copytree(tiny_hybrid, dirs[0])
        model.save_pretrained(dirs[0])
        emb = model.model.embed_tokens.weight
        g = torch.Generator().manual_seed(0)
        emb[unused] += 3.0 * emb.std() * torch.randn(1, emb.shape[1], generator=g)
        shutil.copytree(tiny_hybrid, dirs[1])
        model.save_pretrained(dirs[1])
    return dirs


SHARP_DATA, SHARP_HELDOUT, SHARP_NEW = "arith:steps=1,digits=1,n=60", 8, 12


def _kl_on_own_samples(student_dir, teacher_dir):
    """Mean KL(student || teacher) over the completion tokens the student samples (2 per prompt, fixed
    seeds) for the held-out prompts of SHARP_DATA: the on-policy objective, measured."""
    from m1.engine import Engine, SamplingParams
    from m1.model.checkpoint import load_model
    from m1.train.data import load_data
    from m1.train.losses import reverse_kl_per_token

    student, tok = load_model(student_dir)
    teacher = load_model(teacher_dir)[0]
    data = load_data(SHARP_DATA, tok, 256, SHARP_HELDOUT, 0)  # distill's held-out split (seed 0)
    prompts = [r[:n] for r, n in zip(data.heldout_ids, data.heldout_prompt_lens)]
    outs = Engine(student, tok).generate(prompts, [SamplingParams(n=2, max_new_tokens=SHARP_NEW, temperature=1.0,
                                                                  seed=100 + 2 * i) for i in range(len(prompts))])
    total, count = 0.0, 0
    with torch.no_grad():
        for p, out in zip(prompts, outs):
            for c in out.completions:
                ids = torch.tensor([p + c.token_ids])
                s, t = (m(input_ids=ids).logits[0, len(p) - 1:-1] for m in (student, teacher))
                total += reverse_kl_per_token(s, t).double().sum().item()
                count += s.shape[0]
    return total / count


def test_onpolicy_lowers_kl_on_the_students_own_samples(sharp_pair, tmp_path):
    """20 onpolicy steps cut KL(student || teacher) on the student's own samples of held-out prompts
    by >= 3x. Measured: 0.293 -> 0.034 (8.5x), 2.5 s of training. Mutations, each made in m1/train/distill.py
    and reverted: loss sign flipped -> 0.293 -> 4.65 (0.06x); loss mask on the prompt instead of the
    completion -> 0.293 -> 0.271 (1.08x); rows = the reference solutions instead of the samples ->
    0.293 -> 0.306 (0.96x). (With this pair a loss on data tokens is exactly 0: only sampling teaches.)"""
    teacher, student = sharp_pair
    before = _kl_on_own_samples(student, teacher)
    assert before > 0.2  # measured 0.293
    res = _run(_cfg(student, SHARP_DATA, tmp_path / "op", teacher=str(teacher), stage="onpolicy", steps=20,
                    seq_len=256, batch_size=4, micro_batch_size=4, heldout=SHARP_HELDOUT, eval_batch_size=8,
                    checkpoint_every=1000, lr=1e-3, max_new_tokens=SHARP_NEW))
    after = _kl_on_own_samples(res.out, teacher)
    assert after * 3 <= before, (before, after)
    m = _metrics(res.out)
    assert len(m) == 20 and all(r["onpolicy"] is True and r["stage"] == "onpolicy" for r in m)
    assert all(0 < r["gen_tokens"] <= 4 * SHARP_NEW and r["gen_s"] >= 0 and r["kl"] >= 0 for r in m)
    assert m[0]["step_tokens"] == m[0]["gen_tokens"]  # the loss positions are the sampled tokens
    assert sum(r["loss"] for r in m[-5:]) * 3 < sum(r["loss"] for r in m[:5])


def test_killed_onpolicy_run_resumes_like_an_uninterrupted_one(tiny_hybrid, tmp_path):
    # lambda 0.5, seed 0: steps 1 and 3 sample (3 is the first after the resume), 2, 4, 5 train on the
    # reference completions
    kw = dict(steps=5, lmbda=0.5, num_samples=2, checkpoint_every=2)
    full = _run(_op_cfg(tiny_hybrid, tmp_path / "full", **kw))
    cfg = _op_cfg(tiny_hybrid, tmp_path / "part", **kw)

    def kill(step, m, model):
        if step == 3:
            raise Kill

    with pytest.raises(Kill):
        _run(cfg, on_step=kill)
    state = json.loads((_ckpt(work_dir(cfg.out)) / "state.json").read_text())
    assert state["step"] == 2 and state["stage"] == "onpolicy"
    resumed = _run(cfg, resume=True)
    a, b = _metrics(full.out), _metrics(resumed.out)
    assert [m["step"] for m in b] == [1, 2, 3, 4, 5]
    assert [m["onpolicy"] for m in a] == [m["onpolicy"] for m in b] == [True, False, True, False, False]
    for x, y in zip(a, b):
        assert x.get("gen_tokens") == y.get("gen_tokens") and x["step_tokens"] == y["step_tokens"]
        assert abs(x["loss"] - y["loss"]) <= 1e-6, (x, y)
        assert abs(x["kl"] - y["kl"]) <= 1e-6 and abs(x["lr"] - y["lr"]) <= 1e-12
    assert all("gen_tokens" in m for m in a if m["onpolicy"]) and not any("gen_tokens" in m for m in a
                                                                          if not m["onpolicy"])
    wa, wb = _weights(full.out), _weights(resumed.out)
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    assert any(not torch.equal(wa[k], v) for k, v in _weights(tiny_hybrid).items())  # it did train


@pytest.mark.parametrize("kw,needle", [
    (dict(stage="kd", data="math500"), "math500 has no train split"),
    (dict(data="DATA_FILE"), "--stage onpolicy samples from task prompts"),  # text/messages rows: no prompts
    (dict(max_new_tokens=512), "--max-new-tokens 512 does not fit the model's context of 512"),
    (dict(max_new_tokens=450), r"the longest prompt \(\d+ tokens\) \+ --max-new-tokens 450 exceeds the context"),
    (dict(lmbda=-0.1), "--lambda"),
    (dict(lmbda=1.5), "--lambda"),
    (dict(batch_size=4, num_samples=3), "--batch-size 4 must be a multiple of --num-samples 3"),
    (dict(stage="kd,foo"), "--stage must be"),
    (dict(stage="onpolicy,onpolicy"), "--stage must be"),
    (dict(steps=None, max_tokens=1000), "--stage onpolicy needs a step budget"),
    (dict(gen_temperature=0.0), "--gen-temperature"),
    (dict(seq_len=60), "--seq-len 60 cuts 20 of 20 task rows off inside their prompt"),
    (dict(stage="kd", loss_on="completion", seq_len=60), "--seq-len 60 cuts"),
    (dict(stage="kd", loss_on="prompt"), "--loss-on"),
])
def test_bad_onpolicy_and_task_settings(tiny_hybrid, data_file, tmp_path, kw, needle):
    if kw.get("data") == "DATA_FILE":
        kw = dict(kw, data=str(data_file))
    out = tmp_path / "o"
    with pytest.raises(M1Error, match=needle) as e:
        _run(_op_cfg(tiny_hybrid, out, **kw))
    assert "\n" not in str(e.value)
    assert not out.exists() and not work_dir(out).exists()  # refused before anything was written


@pytest.mark.parametrize("lmbda,needle", [
    (1.0, r"the student's weights became non-finite at step 3 \(onpolicy\)"),  # caught before sampling
    (0.0, r"the loss became nan at step 3 \(onpolicy\)"),  # lambda 0: every step on the reference completions
])
def test_nan_in_onpolicy_stops_and_keeps_last_good_checkpoint(tiny_hybrid, tmp_path, lmbda, needle):
    cfg = _op_cfg(tiny_hybrid, tmp_path / "n", steps=5, lmbda=lmbda, checkpoint_every=2)

    def poison(step, m, model):
        if step == 2:  # after the step-2 checkpoint
            with torch.no_grad():
                model.model.norm.weight.fill_(float("nan"))

    with pytest.raises(M1Error, match=needle + r".*last good checkpoint \(step 2\)") as e:
        _run(cfg, on_step=poison)
    assert "\n" not in str(e.value)
    ckpt = _ckpt(work_dir(cfg.out))
    assert json.loads((ckpt / "state.json").read_text())["step"] == 2
    assert torch.isfinite(_weights(ckpt)["model.norm.weight"]).all()
    assert len((work_dir(cfg.out) / "metrics.jsonl").read_text().splitlines()) == 2
    assert not Path(cfg.out).exists()


def test_m1_checkpoint_as_teacher(tiny_teachers, tiny_hybrid, data_file, tmp_path):
    """An all-attention m1 convert of the teacher (GraniteMoeHybrid) teaches exactly like the teacher."""
    from m1.model.convert import ConvertSettings, convert

    exact = convert(ConvertSettings(teacher=str(tiny_teachers["llama_untied"]), attn_layers="all"),
                    tmp_path / "exact", log=lambda m: None)
    assert json.loads((exact / "config.json").read_text())["model_type"] == "granitemoehybrid"
    runs = {name: _run(_cfg(tiny_hybrid, data_file, tmp_path / name, teacher=str(t), stage="kd", steps=2))
            for name, t in [("llama", tiny_teachers["llama_untied"]), ("m1", exact)]}
    a, b = _metrics(runs["llama"].out), _metrics(runs["m1"].out)
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) <= 1e-4 * x["loss"], (x, y)
    assert runs["m1"].before["kl"] == pytest.approx(runs["llama"].before["kl"], rel=1e-4)
    assert runs["m1"].before["kl"] > 0
    rec = json.loads((runs["m1"].out / "m1.json").read_text())
    assert rec["distill"]["teacher"] == str(exact)
    # the student as its own teacher: nothing to learn
    same = _run(_cfg(tiny_hybrid, data_file, tmp_path / "self", teacher=str(tiny_hybrid), stage="kd", steps=1))
    assert abs(same.before["kl"]) < 1e-6 and abs(_metrics(same.out)[0]["loss"]) < 1e-6


def test_cli_onpolicy_flags(capsys, tiny_hybrid, tmp_path, monkeypatch):
    import m1.train.distill as distill_module

    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    text = capsys.readouterr().out
    for flag in ("onpolicy", "--lambda", "--num-samples", "--max-new-tokens", "--gen-temperature",
                 "--onpolicy-steps", "--loss-on", "--mamba-lr", "kd,onpolicy"):
        assert flag in text, flag
    seen = []
    monkeypatch.setattr(distill_module, "distill", lambda cfg, **kw: seen.append((cfg, kw)))
    code = main(["distill", "--student", str(tiny_hybrid), "--out", str(tmp_path / "o"), "--data", ARITH,
                 "--stage", "kd,onpolicy", "--lambda", "0.5", "--num-samples", "2", "--max-new-tokens", "32",
                 "--gen-temperature", "0.7", "--onpolicy-steps", "7", "--steps", "3", "--loss-on", "completion",
                 "--mamba-lr", "2e-3", "--loss", "forward_kl", "--no-progress"])
    assert code == 0
    ((cfg, kw),) = seen
    assert cfg.stages() == ["kd", "onpolicy"] and cfg.stage == "kd,onpolicy"
    assert (cfg.lmbda, cfg.num_samples, cfg.max_new_tokens, cfg.gen_temperature) == (0.5, 2, 32, 0.7)
    assert (cfg.onpolicy_steps, cfg.steps, cfg.loss_on, cfg.mamba_lr, cfg.loss) == (7, 3, "completion", 2e-3,
                                                                                      "forward_kl")
    assert cfg.data == ARITH and kw["progress"] is False and kw["resume"] is False
    cfg.validate()
    # defaults: lambda 1 (all on-policy), one sample per prompt
    seen.clear()
    main(["distill", "--student", str(tiny_hybrid), "--out", str(tmp_path / "o"), "--stage", "onpolicy",
          "--steps", "2"])
    assert (seen[0][0].lmbda, seen[0][0].num_samples, seen[0][0].loss, seen[0][0].loss_on) == (
        1.0, 1, "reverse_kl", "all")
    # a bad value is one error line
    monkeypatch.undo()
    code, lines = _cli(capsys, "distill", "--student", str(tiny_hybrid), "--out", str(tmp_path / "o2"),
                       "--data", ARITH, "--stage", "onpolicy", "--steps", "1", "--lambda", "2", "--no-progress")
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: --lambda")


def test_report_of_task_data_has_completion_and_digit_kl(tiny_hybrid, tmp_path):
    from m1.model.checkpoint import load_model
    from m1.train.data import load_data
    from m1.train.heldout import completion_report

    res = _run(_cfg(tiny_hybrid, "arith:steps=1,digits=1,n=40", tmp_path / "c", stage="kd", steps=2, seq_len=256,
                    loss_on="completion", heldout=4))
    after = res.after
    assert after["completion_tokens"] > 0 and after["digit_tokens"] > 0
    assert after["digit_tokens"] < after["completion_tokens"] < after["tokens"]
    student, tok = load_model(res.out)
    from m1.model.teachers import KD_TEACHER_ARCHS, load_teacher

    t = load_teacher(  # the teacher the student's m1.json names (the tiny llama it was converted from)
        json.loads((Path(tiny_hybrid) / "m1.json").read_text())["teacher"], archs=KD_TEACHER_ARCHS)
    data = load_data("arith:steps=1,digits=1,n=40", tok, 256, 4, 0)
    direct = completion_report(student.eval(), t.model, tok, data.heldout_ids, data.heldout_prompt_lens)
    assert direct["tokens"] == after["completion_tokens"]
    assert abs(direct["kl"] - after["kl_completion"]) < 1e-5 and abs(direct["kl_digits"] - after["kl_digits"]) < 1e-5
    # several students in one pass (the teacher's forward shared) report what each one alone does
    from m1.train.heldout import completion_reports

    before, _ = load_model(tiny_hybrid)
    both = completion_reports({"after": student.eval(), "before": before.eval()}, t.model, tok, data.heldout_ids,
                              data.heldout_prompt_lens)
    alone = completion_report(before, t.model, tok, data.heldout_ids, data.heldout_prompt_lens)
    assert both["after"] == pytest.approx(direct, rel=1e-6) and both["before"] == pytest.approx(alone, rel=1e-6)
    assert both["before"]["kl"] > both["after"]["kl"]


def test_no_progress_logs_a_line_every_tenth_of_a_stage(tiny_hybrid, data_file, tmp_path):
    """Without a progress bar (--no-progress, a log file) a long run still says where it is."""
    said = []
    distill(_cfg(tiny_hybrid, data_file, tmp_path / "o", stage="both", align_steps=2, steps=20),
            log=said.append, progress=False)
    lines = [s for s in said if re.match(r"(align|kd) step \d+/\d+: ", s)]
    assert [s.split(":")[0] for s in lines] == ["align step 1/2", "align step 2/2"] + [
        f"kd step {k}/20" for k in range(2, 21, 2)]
    assert all(re.search(r"loss [\d.]+, .*tok/s \d+, \d+s$", s) for s in lines)
    assert all("kl " in s for s in lines if s.startswith("kd"))
