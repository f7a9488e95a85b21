"""`m1 demo --budget smoke`: every stage runs, the report has every stage's numbers, reruns skip work."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from m1.cli import main


@pytest.mark.parametrize("recipe", ["general", "from-teacher"])
def test_smoke_demo_end_to_end_and_resume(tmp_path, capsys, monkeypatch, recipe):
    out = tmp_path / "demo"
    argv = ["demo", "--budget", "smoke", "--out", str(out), "--no-progress", "--recipe", recipe]
    assert main(argv) == 0
    general = recipe == "general"
    stages_of_hybrid = ["base", "distill", "sft", "kd", "grpo"] if general else ["base", "distill", "grpo"]
    report = (out / "report.md").read_text()
    for png in ("accuracy_vs_k.png", "accuracy_vs_seconds.png", "bench/bench.png"):
        assert (out / png).stat().st_size > 1000, png
    number = r"\d+\.\d \[\d+, \d+\]"
    for stage in ("base", "sft", "grpo") if general else ("base", "grpo"):
        assert re.search(rf"^\| {stage} \| {number} \| {number} \|$", report, re.M), stage
    assert re.search(rf"^\| distill \| — \| {number} \|$", report, re.M)
    if general:  # kd from the teacher after SFT, on GSM8K chats and task solutions
        assert re.search(rf"^\| kd \| — \| {number} \|$", report, re.M)
        assert re.search(r"^\| hybrid \| kd \| 2 \| [\d,]+ \| \d+ \|$", report, re.M)
        kd = json.loads((out / "hybrid" / "kd" / "distill_config.json").read_text())
        assert kd["teacher"] == str(out / "teacher" / "sft") and kd["student"] == str(out / "hybrid" / "sft")
        assert kd["data"] == "gsm8k-train,arith:steps=1,digits=1,n=7473" and kd["loss_on"] == "all"
        assert kd["lr"] == 2e-5 and kd["steps"] == 2
    if not general:
        assert re.search(rf"^\| sft \| {number} \| — \|$", report, re.M)  # the hybrid learns from the teacher
    # every model's training budget, and generality before/after
    for who in ("teacher", "hybrid"):
        assert re.search(rf"^\| \*\*{who}\*\* \| \*\*total\*\* \| \*\*\d+\*\* \| \*\*[\d,]+\*\* \| \*\*\d+\*\* \|$",
                         report, re.M), who
    # 3 align + 3 kd (+ 2 onpolicy)
    assert re.search(rf"^\| hybrid \| distill \| {6 if general else 8} \| [\d,]+ \| \d+ \|$", report, re.M)
    for who in ("teacher base", "teacher", "hybrid"):
        assert re.search(rf"^\| {who} \| 2 \| {number} \|$", report, re.M), who
    for who in ("teacher base", "teacher", "hybrid distill", "hybrid"):
        assert re.search(rf"^\| {who} \| [\d.]+ \| [\d,]+ \|$", report, re.M), who
    assert re.search(r"^\| hybrid \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", report, re.M)  # pass@k/maj@k
    assert re.search(r"^\| hybrid \| 4 \| 16 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", report, re.M)
    assert re.search(r"the hybrid's pass@1 is \*\*[\d.]+x\*\* the teacher's \([\d.]+ / [\d.]+; 95% interval "
                     r"(\d+\.\d\d|nan)-(\d+\.\d\d|nan), bootstrap over problems", report) or "| grpo | 0.0 " in report
    assert "Not evaluated on the task" not in report
    # KL to the final teacher on its own answers, for every hybrid stage after conversion; the teacher's
    # answers are its greedy output, so its own NLL there is small, and the random tiny hybrid is far from it

    task_kl = json.loads((out / "eval" / "task-kl.json").read_text())
    assert list(task_kl) == [f"hybrid {st}" for st in stages_of_hybrid[1:]]
    for name, r in task_kl.items():
        assert r["teacher"] == str(out / "teacher" / "grpo") and r["tokens"] > 0 and r["kl"] > 0, name
        assert re.search(rf"^\| {name.removeprefix('hybrid ')} \| {r['kl']:.3f} \| ", report, re.M), name
    # the hybrid's layout is chosen by sensitivity and the report says which layers it kept
    layout = re.search(r"^Hybrid layout: attention at layers ([\d,]+) of 5 .*`--attn-layers auto`", report, re.M)
    assert layout, report[:2000]

    record = json.loads((out / "hybrid" / "base" / "m1.json").read_text())
    assert layout.group(1) == ",".join(map(str, record["attn_layers"])) and len(record["layer_sensitivity"]) == 5
    assert "m1 convert --teacher" in report and "--attn-layers auto" in report
    assert "m1 distill --student" in report and "m1 grpo --model" in report and "m1 bench --model" in report
    # "Reproduce" is exact: the printed distill command parses to the settings the demo trained with
    import shlex
    from dataclasses import asdict

    from m1.cli import build_parser
    from m1.settings import from_args
    from m1.train.distill import CONFIG_FILE, DistillConfig

    line = next(line for line in report.splitlines() if line.startswith("m1 distill "))
    printed = from_args(DistillConfig, build_parser().parse_args(shlex.split(line)[1:]))
    assert asdict(printed) == json.loads((out / "hybrid" / "distill" / CONFIG_FILE).read_text())
    # ... and so do the printed convert commands (the settings each conversion recorded)
    from m1.model.convert import ConvertSettings

    convert_lines = [line for line in report.splitlines() if line.startswith("m1 convert ")]
    assert len(convert_lines) == 2
    for line, who in zip(convert_lines, ("teacher", "hybrid")):
        saved = json.loads((out / who / "base" / "m1.json").read_text())["settings"]
        a = build_parser().parse_args(shlex.split(line)[1:])
        assert a.out == str(out / who / "base") and asdict(from_args(ConvertSettings, a)) == saved, line
    # ... and so does every printed sft command (teacher and, in the general recipe, hybrid)
    from m1.train.sft import SFT_CONFIG_FILE, SFTSettings

    sft_lines = [line for line in report.splitlines() if line.startswith("m1 sft ")]
    assert len(sft_lines) == (2 if general else 1)
    for line in sft_lines:
        a = build_parser().parse_args(shlex.split(line)[1:])
        saved = json.loads((Path(a.out) / SFT_CONFIG_FILE).read_text())["settings"]
        saved.pop("model_fingerprint")
        assert asdict(from_args(SFTSettings, a)) == saved, line
    from m1.train.grpo import GRPO_CONFIG_FILE, GRPOSettings

    grpo_lines = [line for line in report.splitlines() if line.startswith("m1 grpo ")]
    assert len(grpo_lines) == 2
    for line in grpo_lines:
        a = build_parser().parse_args(shlex.split(line)[1:])
        saved = json.loads((Path(a.out) / GRPO_CONFIG_FILE).read_text())["settings"]
        saved.pop("model_fingerprint"), saved.pop("reward_weights")  # not settings: Python API only
        assert asdict(from_args(GRPOSettings, a)) == saved, line
    # ... and every printed eval command: what it parses to is what that eval recorded as its settings
    from m1.eval.run import EvalConfig

    eval_lines = [line for line in report.splitlines() if line.startswith("m1 eval ")]
    assert len(eval_lines) == 3 + len(stages_of_hybrid) + 3  # teacher base/sft/grpo, the hybrid's, 3 GSM8K
    for line in eval_lines:
        a = build_parser().parse_args(shlex.split(line)[1:])
        saved = json.loads((Path(a.out) / "eval_config.json").read_text())
        printed = from_args(EvalConfig, a)
        assert printed.identity() == saved["identity"] and list(printed.ks) == saved["ks"], line
    # ... and the printed bench command: the cells it asks for are the cells bench.json holds
    from m1.bench import BenchSettings

    (line,) = [line for line in report.splitlines() if line.startswith("m1 bench ")]
    printed = from_args(BenchSettings, build_parser().parse_args(shlex.split(line)[1:]))
    bench = json.loads(Path(printed.json_path).read_text())
    assert printed.model == str(out / "hybrid" / "grpo") and printed.baseline == str(out / "teacher" / "grpo")
    assert {(r["batch"], r["prompt_len"], r["gen_len"]) for r in bench["rows"]} == {
        (b, printed.prompt_len, g) for b in printed.batches for g in printed.gen_lens}
    for d in ("teacher/base", "hybrid/base", "hybrid/distill", "teacher/sft", "teacher/grpo", "hybrid/grpo") + (
            ("hybrid/sft", "hybrid/kd") if general else ()):
        assert (out / d / "config.json").exists() and (out / d / "m1.json").exists(), d
    wall = report.split("## Wall time and memory")[1].split("## Reproduce")[0]
    peaks = [float(g) for g in re.findall(r"^\| [^|]+ \| \d+ \| ([\d.]+) \|$", wall, re.M)]
    n_stages = 22 if general else 18
    assert len(peaks) == n_stages and peaks[0] > 0.1 and peaks == sorted(peaks)  # one process: its peak only grows
    capsys.readouterr()
    # a rerun finds every stage done and only rewrites the report (--out named another way: the same run)
    monkeypatch.chdir(tmp_path)
    assert main(argv[:4] + ["demo"] + argv[5:]) == 0
    err = capsys.readouterr().err
    assert err.count("done already") == n_stages and "distill hybrid ..." not in err
    # ... and its wall-time table still has every stage, with the seconds of the run that did it
    wall2 = (out / "report.md").read_text().split("## Wall time and memory")[1].split("## Reproduce")[0]
    first = dict(re.findall(r"^\| ([^|]+?) \| (\d+) \| [\d.]+ \|$", wall, re.M))
    again = dict(re.findall(r"^\| ([^|]+?) \| (\d+) \| \(earlier invocation\) \|$", wall2, re.M))
    assert again == first and len(again) == n_stages
    assert re.search(r"^\| total \(all stages, earlier invocations included\) \| \d+ \| +\|$", wall2, re.M)
    # a rerun with other settings into the same --out refuses a stage that another command made (it would
    # be silently stale), before touching it
    from dataclasses import replace

    from m1.demo import Demo
    from m1.errors import M1Error

    changed = Demo("smoke", out, log=lambda m: None, progress=False, recipe=recipe)
    changed.b = replace(changed.b, sft_steps=changed.b.sft_steps + 1)
    made = (out / "teacher" / "sft" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(M1Error, match=r"teacher/sft was made by another command than this run's \('sft teacher' "
                                      r"ran `m1 sft .*--max-steps 4 .*this run would run `m1 sft .*--max-steps 5 .*--out OUT/teacher/sft`"):
        changed.run()
    assert (out / "teacher" / "sft" / "model.safetensors").stat().st_mtime_ns == made


def test_small_budget_follows_the_hardware(monkeypatch, tmp_path):
    import torch

    import m1.train.run as training
    from m1.demo import BUDGETS, Demo

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(training, "cpu_bf16_supported", lambda: True)
    fast = Demo("small", tmp_path, log=lambda m: None)
    assert fast.bf16 and fast.b == BUDGETS["small"] and fast.b.distill_steps == 20 and fast.b.recipe == "general"
    assert fast.b.sft_steps == 80 and fast.b.eval_stages == ("sft", "grpo") and fast.b.final_eval_problems == 200
    monkeypatch.setattr(training, "cpu_bf16_supported", lambda: False)
    said = []
    slow = Demo("small", tmp_path, log=said.append)
    assert not slow.bf16 and slow.bf16_flag == " --bf16 off"
    assert (slow.b.distill_steps, slow.b.grpo_steps, slow.b.distill_align_steps, slow.b.hybrid_kd_steps) == (10, 2, 10, 10)
    assert any("float32" in m for m in said)
    assert Demo("smoke", tmp_path, log=lambda m: None).b == BUDGETS["smoke"]  # smoke is never cut


def test_smoke_demo_with_task_kd_in_place_of_sft(tmp_path):
    """The general recipe's optional task-kd stage: the hybrid goes distill -> kd (from the teacher after
    SFT, on the task's completions) -> grpo, and the report shows the kd row and its budget."""
    from dataclasses import replace

    from m1.demo import Demo

    demo = Demo("smoke", tmp_path / "demo", log=lambda m: None, progress=False)
    demo.b = replace(demo.b, hybrid_kd_steps=2, hybrid_kd_data="task", hybrid_sft=False,
                     eval_stages=("sft", "kd", "grpo"), final_eval_problems=6)
    report = demo.run().read_text()
    number = r"\d+\.\d \[\d+, \d+\]"
    # `small`'s final_eval_problems: the last stage is judged on more problems, and also scored on the
    # problems the earlier rows used, so the table's column compares like with like
    ev = tmp_path / "demo" / "eval"
    rows = {w: [json.loads(x) for x in (ev / f"{w}-grpo" / "results.jsonl").read_text().splitlines()]
            for w in ("teacher", "hybrid")}
    early = {json.loads(x)["problem_id"] for x in (ev / "teacher-sft" / "results.jsonl").read_text().splitlines()}
    assert len(early) == 4 and all(len({r["problem_id"] for r in rows[w]}) == 6 for w in rows)
    assert early < {r["problem_id"] for r in rows["hybrid"]}
    same = {w: 100 * sum(r["correct"] for r in rows[w] if r["problem_id"] in early) / (4 * 2) for w in rows}
    assert re.search(rf"^\| grpo \(the same 4 problems\) \| {same['teacher']:.1f} \[\d+, \d+\] \| "
                     rf"{same['hybrid']:.1f} \[\d+, \d+\] \|$", report, re.M), report[:3000]
    assert re.search(rf"^\| grpo \(6 problems\) \| {number} \| {number} \|$", report, re.M)
    assert "(4 held-out problems after each stage, 6 after the last, 2 samples each" in report
    # `small`'s eval_stages: the other stages are not judged on the task, and the report says so instead
    # of dropping the rows silently
    assert "Not evaluated on the task in this budget: base, distill (" in report
    accuracy = report.split("## Accuracy after each stage")[1].split("## ")[0]
    assert re.search(rf"^\| sft \| {number} \| — \|$", accuracy, re.M)
    assert not re.search(r"^\| (base|distill) \|", accuracy, re.M)
    evals = sorted(p.name for p in (tmp_path / "demo" / "eval").iterdir() if p.is_dir())
    assert evals == ["hybrid-grpo", "hybrid-grpo-gsm8k", "hybrid-kd", "teacher-base-gsm8k", "teacher-grpo",
                     "teacher-grpo-gsm8k", "teacher-sft"], evals
    assert re.search(rf"^\| kd \| — \| {number} \|$", report, re.M)
    assert re.search(rf"^\| sft \| {number} \| — \|$", report, re.M)  # the teacher's SFT only
    assert re.search(r"^\| hybrid \| kd \| 2 \| [\d,]+ \| \d+ \|$", report, re.M)
    assert not (tmp_path / "demo" / "hybrid" / "sft").exists()
    kd = json.loads((tmp_path / "demo" / "hybrid" / "kd" / "distill_config.json").read_text())
    assert kd["teacher"] == str(tmp_path / "demo" / "teacher" / "sft") and kd["loss_on"] == "completion"
    assert kd["student"] == str(tmp_path / "demo" / "hybrid" / "distill") and kd["stage"] == "kd"
    grpo = json.loads((tmp_path / "demo" / "hybrid" / "grpo" / "m1.json").read_text())
    assert "kd" in json.dumps(grpo)  # the hybrid's GRPO started from the kd stage's output
    line = next(line for line in report.splitlines() if line.startswith("m1 distill ") and "--stage kd" in line)
    assert "--loss-on completion" in line
