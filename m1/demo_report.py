"""The demo's ``report.md``: teacher vs hybrid after each stage, pass@k / maj@k, accuracy vs seconds,
throughput and memory, and the commands that reproduce every number."""

from __future__ import annotations

import json
from pathlib import Path


def _per_problem_accuracy(results: Path) -> dict[str, float]:
    by: dict[str, list[bool]] = {}
    for line in results.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            by.setdefault(r["problem_id"], []).append(bool(r["correct"]))
    return {k: sum(v) / len(v) for k, v in by.items()}


def _acc_cell(summary: dict, only: set | None = None) -> str:
    """pass@1 with its bootstrap interval; ``only``: on those problems of the eval alone."""
    from .eval.metrics import bootstrap_interval

    acc = _per_problem_accuracy(Path(summary["file"]))
    values = [v for k, v in acc.items() if only is None or k in only]
    lo, hi = bootstrap_interval(values)
    mean = summary["pass@1"] if only is None else 100 * sum(values) / max(len(values), 1)
    return f"{mean:.1f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def _plot_lines(series: dict[str, list], path: Path, xlabel: str, title: str, logx: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for label, pts in series.items():
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def training_budget(model_dir: Path) -> dict:
    """Steps, tokens and seconds of every training stage behind a checkpoint (from its m1.json)."""
    from .model.checkpoint import read_record

    rec = read_record(model_dir)
    stage = rec.get("stage")
    sec = rec.get(stage, {}) if stage in ("distill", "sft", "grpo") else {}
    tokens = sec.get("tokens")
    metrics = model_dir / f"{stage}_metrics.jsonl"
    if tokens is None and metrics.is_file():  # TRL logs the running count of trained tokens
        seen = [json.loads(x).get("num_tokens") for x in metrics.read_text().splitlines() if x.strip()]
        tokens = max((t for t in seen if t is not None), default=None)
    return {"stage": stage, "steps": sec.get("steps"), "tokens": tokens, "seconds": sec.get("seconds")}


def _layout_line(base: Path) -> str:
    """Which layers the hybrid kept as attention, and how they were chosen (from its m1.json)."""
    from .model.checkpoint import read_record

    rec = read_record(base)
    conv = rec.get("convert", rec)
    attn, n = conv.get("attn_layers"), conv.get("num_layers")
    how = ("the most sensitive layers (`--attn-layers auto`)" if conv.get("layer_sensitivity")
           else "the default spread")
    return (f"Hybrid layout: attention at layers {','.join(map(str, attn))} of {n} ({len(attn)} attention, "
            f"{n - len(attn)} Mamba2), chosen as {how}.") if attn is not None and n else "Hybrid layout: unknown."


def _ratio_lines(evals: dict) -> list[str]:
    """The headline: the final hybrid's pass@1 over the final teacher's, with a paired bootstrap interval
    over the problems both were judged on."""
    from .eval.metrics import paired_ratio_interval

    t, h = evals["teacher"]["grpo"], evals["hybrid"]["grpo"]
    if not t.get("pass@1"):
        return []
    r, lo, hi = paired_ratio_interval(_per_problem_accuracy(Path(h["file"])), _per_problem_accuracy(Path(t["file"])))
    return [f"After each model's last stage the hybrid's pass@1 is **{r:.3f}x** the teacher's "
            f"({h['pass@1']:.1f} / {t['pass@1']:.1f}; 95% interval {lo:.2f}-{hi:.2f}, bootstrap over problems, "
            "both models on the same draw; m1's target for this demo: at least 0.9x).", ""]


def _task_kl_lines(task_kl: dict) -> list[str]:
    first = next(iter(task_kl.values()))
    lines = ["## How close the hybrid is to the teacher on the task", "",
             f"KL(teacher || hybrid) in nats per token on the teacher's own greedy answers to the held-out "
             f"problems ({first['tokens']:,} completion tokens, {first['digit_tokens']:,} of them digit tokens: the "
             f"results of the arithmetic); teacher = `{first.get('teacher', 'the teacher after GRPO')}`, its own NLL "
             f"there {first['teacher_nll']:.3f}. m1's target: at most 0.15 for the final hybrid.", "",
             "| hybrid after | KL, completion tokens | KL, digit tokens | hybrid NLL |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name.removeprefix('hybrid ')} | {r['kl']:.3f} | {r['kl_digits']:.3f} | {r['student_nll']:.3f} |"
              for name, r in task_kl.items()]
    return lines + [""]


def _budget_lines(stages: dict, models: dict) -> list[str]:
    """Each model's training steps, tokens and seconds per stage and in total (from the checkpoints' m1.json)."""
    lines = ["", "## Training budget of each model", "",
             "What each stage cost (from the checkpoints' m1.json; tokens = trained tokens as each trainer counts "
             "them, prompt tokens included for SFT/GRPO, loss positions for distillation).", "",
             "| model | stage | steps | tokens | seconds |", "| --- | --- | ---: | ---: | ---: |"]
    for w in ("teacher", "hybrid"):
        total = [0, 0, 0.0]
        for st in stages[w][1:]:
            tb = training_budget(models[w] / st)
            total = [total[0] + (tb["steps"] or 0), total[1] + int(tb["tokens"] or 0), total[2] + (tb["seconds"] or 0)]
            lines.append(f"| {w} | {st} | {tb['steps'] or 0} | {int(tb['tokens'] or 0):,} | {tb['seconds'] or 0:.0f} |")
        lines.append(f"| **{w}** | **total** | **{total[0]}** | **{total[1]:,}** | **{total[2]:.0f}** |")
    return lines


def _wall_time_lines(demo) -> list[str]:
    lines = ["## Wall time and memory", "", "| stage | seconds | peak RSS so far, GB |", "| --- | ---: | ---: |"]
    lines += [f"| {k} | {v:.0f} | {demo.peak_rss[k]:.1f} |" if k in demo.peak_rss else
              f"| {k} | {v:.0f} | {'(earlier invocation)' if k in demo.reused else ''} |"
              for k, v in demo.timings.items()]
    return lines + ["", "(a stage done by an earlier invocation shows the seconds it took then; all stages of one "
                    "invocation run in one process, so the peak RSS column only grows: the stage where it jumps "
                    "needed the memory)", ""]


def _intro_lines(demo, models: dict | None) -> list[str]:
    b = demo.b
    if b.recipe == "from-teacher":
        how = ("The teacher is fine-tuned (SFT) and trained with GRPO; the hybrid is distilled from that final "
               "teacher on the task's solutions (align, kd on completion tokens, on-policy), then gets the same "
               "GRPO budget.")
    else:
        how = ("Both models get the same SFT and GRPO budget on the same data; the hybrid is first distilled "
               "from the base teacher on GSM8K chats (align, then kd).")
        if b.hybrid_kd_steps:
            how += (f" Before its GRPO the hybrid also gets {b.hybrid_kd_steps} kd steps (`kd`) from the teacher "
                    "after SFT on " + ("GSM8K chats and the task's solutions, as many of each (all tokens)."
                                       if b.hybrid_kd_data == "mix" else "the task's solutions (completion tokens)."))
        if not b.hybrid_sft:
            how += " The hybrid skips SFT: the `kd` stage takes its place."
    lines = [f"# m1 demo ({demo.name})", "",
             f"Teacher: `{b.teacher}`; task: `{b.task}` ({b.eval_problems} held-out problems"
             + (f" after each stage, {b.final_eval_problems} after the last" if b.final_eval_problems else "")
             + f", {b.eval_n} samples each at temperature 0.7, {b.max_new_tokens} new tokens at most). " + how, ""]
    return lines + ([_layout_line(models["hybrid"] / "base"), ""] if models is not None else [])


def _accuracy_lines(stages: dict, evals: dict) -> list[str]:
    lines = ["## Accuracy after each stage", "",
             "pass@1 (%) = mean correctness over all samples, with a 95% bootstrap interval over problems.", "",
             "| stage | teacher | hybrid |", "| --- | ---: | ---: |"]
    final = {w: evals[w]["grpo"] for w in ("teacher", "hybrid")}
    earlier = [e for w in ("teacher", "hybrid") for st, e in evals[w].items() if st != "grpo"]
    common = set(_per_problem_accuracy(Path(earlier[0]["file"]))) if earlier else None
    more = common is not None and any(e["n_problems"] > len(common) for e in final.values())
    for st in ("base", "distill", "sft", "kd", "grpo"):
        if not any(st in evals[w] for w in ("teacher", "hybrid")):
            continue
        if st == "grpo" and more:  # the last stage on the earlier rows' problems too, so the column compares
            cells = [_acc_cell(final[w], only=common) for w in final]
            lines.append(f"| grpo (the same {len(common)} problems) | {cells[0]} | {cells[1]} |")
            st_label = f"grpo ({final['hybrid']['n_problems']} problems)"
        else:
            st_label = st
        cells = [(_acc_cell(evals[w][st]) if st in evals[w] else "—") for w in ("teacher", "hybrid")]
        lines.append(f"| {st_label} | {cells[0]} | {cells[1]} |")
    lines.append("")
    skipped = [st for st in stages["hybrid"] if st not in evals["hybrid"]]
    if skipped:
        lines += [f"Not evaluated on the task in this budget: {', '.join(skipped)} (before SFT no model writes the "
                  "`\\boxed{}` answer: every earlier `small` run scored 0.0 there; the kd stage after SFT moved "
                  "pass@1 within noise in them, and its effect shows in the task KL below).", ""]
    return lines + _ratio_lines(evals)


def _final_sampling_lines(demo, evals: dict) -> list[str]:
    """pass@k / maj@k of the final models, and maj@k against decode seconds (with their plots)."""
    out, ks = demo.out, list(demo.b.eval_ks)
    final = {w: evals[w]["grpo"] for w in ("teacher", "hybrid")}
    lines = ["## pass@k and maj@k after GRPO", "", "| model | " + " | ".join(
        [f"pass@{k}" for k in ks] + [f"maj@{k}" for k in ks]) + " |", "| --- |" + " ---: |" * (2 * len(ks))]
    for w, s in final.items():
        lines.append(f"| {w} | " + " | ".join([f"{s.get(f'pass@{k}', 0):.1f}" for k in ks] +
                                              [f"{s.get(f'maj@{k}', 0):.1f}" for k in ks]) + " |")
    vs_k = _plot_lines({f"{w} {m}@k": [(k, s.get(f"{m}@{k}", 0)) for k in ks]
                        for w, s in final.items() for m in ("pass", "maj")},
                       out / "accuracy_vs_k.png", "k (samples per problem)", "pass@k and maj@k after GRPO", logx=True)
    vs_s = _plot_lines({w: [(p[0], p[1]) for p in s.get("accuracy_vs_seconds", [])] for w, s in final.items()},
                       out / "accuracy_vs_seconds.png", "generation seconds per problem", "maj@k vs time (after GRPO)")
    lines += ["", f"![accuracy vs k]({vs_k.name})", "",
              "## Accuracy at equal wall-clock", "",
              "Each point is maj@k against the measured decode seconds it takes to draw k samples per problem "
              "(mean seconds per sample x k). A faster model reaches more samples, and so more votes, in the same "
              "time.", "", f"![accuracy vs seconds]({vs_s.name})", "",
              "| model | seconds per sample | " + " | ".join(f"maj@{k}" for k in ks) + " |",
              "| --- | ---: |" + " ---: |" * len(ks)]
    for w, s in final.items():
        lines.append(f"| {w} | {s.get('mean_seconds', float('nan')):.2f} | " +
                     " | ".join(f"{s.get(f'maj@{k}', 0):.1f}" for k in ks) + " |")
    return lines


def _generality_lines(gsm: dict, ppl: dict | None) -> list[str]:
    lines = ["", "## Generality: GSM8K (greedy) and GSM8K-chat perplexity, before and after", "",
             "`teacher base` is where both models start (the hybrid is converted from it).", "",
             "| model | GSM8K problems | GSM8K accuracy (%) |", "| --- | ---: | ---: |"]
    lines += [f"| {w} | {r['n_problems']} | {_acc_cell(r)} |" for w, r in gsm.items()]
    if ppl:
        lines += ["", "| model | held-out GSM8K chats: perplexity | tokens |", "| --- | ---: | ---: |"]
        lines += [f"| {w} | {r['perplexity']:.2f} | {r['tokens']:,} |" for w, r in ppl.items()]
    return lines


def _throughput_lines(bench: dict) -> list[str]:
    from .bench import BenchRow, markdown_table

    rows = [BenchRow(**r) for r in bench["rows"]]
    return ["", "## Throughput and memory", "",
            "Decode through the same engine, EOS ignored; `ratio` = hybrid tokens/s over teacher tokens/s at the "
            "same batch and length; `byte-limit ratio` = the speed-up that bytes read per step allow.", "",
            markdown_table(rows), "", "![throughput](bench/bench.png)", ""]


def write_report(demo, stages: dict, evals: dict, gsm: dict, bench: dict, ppl: dict | None = None,
                 models: dict | None = None, task_kl: dict | None = None) -> Path:
    """``<out>/report.md`` (and ``timings.json``): one section per helper above, in reading order."""
    lines = _intro_lines(demo, models) + _accuracy_lines(stages, evals)
    if task_kl:
        lines += _task_kl_lines(task_kl)
    lines += _final_sampling_lines(demo, evals)
    if models:
        lines += _budget_lines(stages, models)
    lines += _generality_lines(gsm, ppl) + _throughput_lines(bench)
    lines += _wall_time_lines(demo) + ["## Reproduce", "", "```"] + demo.commands + ["```", ""]
    report = demo.out / "report.md"
    report.write_text("\n".join(lines))
    (demo.out / "timings.json").write_text(json.dumps(demo.timings, indent=2))
    return report
