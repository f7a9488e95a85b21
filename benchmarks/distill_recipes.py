"""Distillation recipe study: which recipe makes the SmolLM2 hybrid keep its fine-tuned teacher's accuracy.

    python benchmarks/distill_recipes.py --out runs/recipes                      # every recipe, resumable
    python benchmarks/distill_recipes.py --out runs/recipes --only kd-task,onpolicy
    python benchmarks/distill_recipes.py --out runs/recipes --report docs/distill-recipes   # table + plot only

Every recipe starts from the same converted hybrid (``m1 convert``, default layout, 24 of 30 layers
Mamba2) and learns from the same teacher: SmolLM2-135M-Instruct converted exactly and fine-tuned with
the demo's SFT (40 steps x 8 arith solutions, lr 5e-5). A recipe is a chain of m1 stages; after each
stage the model is evaluated, so each recipe is a line of accuracy against the seconds of training it
has had. What is measured after a stage:

* held-out pass@1 on ``arith:steps=2,digits=1`` (the task every recipe trains on; test split, 40
  problems x 4 samples at temperature 0.7, 96 new tokens) with a 95% bootstrap interval over problems;
* pass@1 on ``arith:steps=3,digits=1``, a harder level no recipe trains on (40 x 2);
* KL(teacher || student) on the teacher's own greedy answers to 40 held-out prompts: over all
  completion tokens, and over the tokens that hold digits (the results of the arithmetic);
* perplexity on 16 held-out GSM8K chats (the demo's generality measure; the chats ``--data gsm8k-train``
  holds out with seed 0);
* training seconds, steps and tokens (cumulative), and the decode speed seen in the eval.

Each finished stage's model stays in ``OUT/<recipe>/<k>-<stage>/`` and each evaluation is appended to
``OUT/results.jsonl`` as it finishes, so a rerun skips finished work. Give every recipe the same
budget by choosing its steps (``RECIPES`` below); the table reports the seconds it actually took.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

TASK = "arith:steps=2,digits=1"
HARD = "arith:steps=3,digits=1"
TEACHER = "smollm2-135m"

# name -> (what it tests, [(stage kind, settings)]); distill settings are DistillConfig fields, and
# teacher "base" means the original (not fine-tuned) teacher
RECIPES = {
    "today": ("the demo's recipe before this study, scaled down: base teacher, GSM8K chats, then SFT on arith",
              [("distill", dict(teacher="base", data="gsm8k-train", stage="both", align_steps=20, steps=20)),
               ("sft", dict(max_steps=40))]),
    "kd-task": ("kd from the SFT'd teacher on arith solutions, completion tokens only",
                [("distill", dict(stage="align,kd", align_steps=30, steps=60, loss_on="completion"))]),
    "onpolicy": ("kd then on-policy distillation (student samples, teacher scores; reverse KL)",
                 [("distill", dict(stage="align,kd", align_steps=30, steps=30, loss_on="completion")),
                  ("distill", dict(stage="onpolicy", steps=20, num_samples=2, max_new_tokens=96))]),
    "kd-task-mamba-lr": ("kd-task with a 5x higher learning rate for the Mamba mixers than for the copied MLPs",
                         [("distill", dict(stage="align,kd", align_steps=30, steps=60, loss_on="completion",
                                           mamba_lr=5e-4))]),
    "kd-task-frozen-mlp": ("kd-task training only the Mamba mixers (MLPs, attention, embeddings frozen)",
                           [("distill", dict(stage="align,kd", align_steps=30, steps=60, loss_on="completion",
                                             trainable="mamba", lr=5e-4))]),
    "kd-task-attn-0.33": ("kd-task on a hybrid with 10 of 30 layers attention (--attn-fraction 0.33)",
                          [("distill", dict(stage="align,kd", align_steps=30, steps=60, loss_on="completion"))]),
    "kd-task-attn-0.5": ("kd-task on a hybrid with 15 of 30 layers attention (--attn-fraction 0.5)",
                         [("distill", dict(stage="align,kd", align_steps=30, steps=60, loss_on="completion"))]),
    "gsm8k-then-task": ("general distillation first (today's first stage), then kd from the SFT'd teacher on arith",
                        [("distill", dict(teacher="base", data="gsm8k-train", stage="both", align_steps=20, steps=20)),
                         ("distill", dict(stage="kd", steps=40, loss_on="completion"))]),
}
# recipes that continue from the demo's distilled hybrid (general distillation from the base teacher on
# GSM8K chats, in the demo's layout): they need --from-demo, and compare what follows that stage
AFTER_GENERAL = {
    "general-sft": ("the demo's hybrid recipe: general distillation (the demo's), then the demo's SFT on arith",
                    [("sft", dict(max_steps=40))]),
    "general-kd-task": ("general distillation, then 40 kd steps from the SFT'd teacher on arith completions "
                        "(in place of SFT)",
                        [("distill", dict(stage="kd", steps=40, loss_on="completion"))]),
    "general-kd-task-ce": ("general-kd-task plus the next-token cross-entropy on the reference solutions "
                           "(--ce-weight 1)",
                           [("distill", dict(stage="kd", steps=40, loss_on="completion", ce_weight=1.0))]),
    "general-sft-kd-task": ("general distillation, the demo's SFT, then 40 kd steps from the SFT'd teacher",
                            [("sft", dict(max_steps=40)),
                             ("distill", dict(stage="kd", steps=40, loss_on="completion"))]),
    "general-sft-kd-fwd": ("general-sft-kd-task with forward KL, KL(teacher||student), at SFT's learning rate (5e-5)",
                           [("sft", dict(max_steps=40)),
                            ("distill", dict(stage="kd", steps=40, loss_on="completion", loss="forward_kl", lr=5e-5))]),
    "general-sft-onpolicy": ("general distillation, the demo's SFT, then 20 on-policy steps from the SFT'd teacher "
                             "(the student samples 2 completions per prompt, reverse KL on its own tokens)",
                             [("sft", dict(max_steps=40)),
                              ("distill", dict(stage="onpolicy", steps=20, num_samples=2, max_new_tokens=96))]),
    "general-kd-final": ("general distillation, then 40 kd steps on arith completions from the teacher after SFT "
                         "and GRPO (the demo's final teacher) instead of after SFT",
                         [("distill", dict(stage="kd", steps=40, loss_on="completion", teacher="final"))]),
    "general-kd-task-80": ("general-kd-task with twice the steps (80)",
                           [("distill", dict(stage="kd", steps=80, loss_on="completion"))]),
    "general-sft-kd-general": ("general distillation, the demo's SFT, then 10 kd steps from the SFT'd teacher on "
                               "GSM8K chats (all tokens): does it give back what SFT took from the hybrid's "
                               "general language modelling?",
                               [("sft", dict(max_steps=40)),
                                ("distill", dict(stage="kd", steps=10, data="gsm8k-train"))]),
    "general-sft-kd-mix": ("general-sft-kd-general on half GSM8K chats, half arith solutions (all tokens): "
                           "the teacher after SFT on both kinds of text",
                           [("sft", dict(max_steps=40)),
                            ("distill", dict(stage="kd", steps=10, data="gsm8k-train," + TASK + ",n=7473"))]),
    "general-sft-kd-mix-lr2e-5": ("general-sft-kd-mix at a fifth of the learning rate (2e-5)",
                                  [("sft", dict(max_steps=40)),
                                   ("distill", dict(stage="kd", steps=10, data="gsm8k-train," + TASK + ",n=7473",
                                                    lr=2e-5))]),
    "general-sft-kd-mix-lr2e-5-20": ("general-sft-kd-mix-lr2e-5 with 20 kd steps",
                                     [("sft", dict(max_steps=40)),
                                      ("distill", dict(stage="kd", steps=20, data="gsm8k-train," + TASK + ",n=7473",
                                                       lr=2e-5))]),
    "general-sft-kd-general-20": ("general-sft-kd-general with 20 kd steps",
                                  [("sft", dict(max_steps=40)),
                                   ("distill", dict(stage="kd", steps=20, data="gsm8k-train"))]),
}
RECIPES.update(AFTER_GENERAL)
FRACTIONS = {"attn-0.33": 0.33, "attn-0.5": 0.5}  # recipe-name suffix -> the hybrid it starts from
# the demo's SFT (m1.demo.Demo._sft at the small budget), less its step count
SFT = dict(limit=2000, batch_size=8, learning_rate=5e-5, save_steps=10, max_length=256)
COMMON = dict(seq_len=256, batch_size=8, bf16="auto", heldout=16, checkpoint_every=25, lr=1e-4)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def setup(out: Path, bf16: str, demo: Path | None = None, names: list[str] = ()) -> dict:
    """The shared starting points (built once): converted hybrids and the SFT'd teacher. With ``demo``
    (an `m1 demo` output directory), its teacher/base, teacher/sft and hybrid/base are linked instead
    of being made again: the same commands, already run."""
    from m1.model.convert import ConvertSettings, convert
    from m1.train.sft import SFTSettings, sft

    paths = {"teacher-base": out / "teacher-base", "teacher-sft": out / "teacher-sft", "hybrid": out / "hybrid",
             "hybrid-distill": out / "hybrid-distill", "teacher-final": out / "teacher-final",
             **{f"hybrid-{k}": out / f"hybrid-{k}" for k in FRACTIONS}}
    if demo is not None:
        for key, sub in (("teacher-base", "teacher/base"), ("teacher-sft", "teacher/sft"), ("hybrid", "hybrid/base"),
                         ("hybrid-distill", "hybrid/distill"), ("teacher-final", "teacher/grpo")):
            if not paths[key].exists() and (demo / sub / "config.json").exists():
                paths[key].symlink_to((demo / sub).resolve())
    if not (paths["teacher-base"] / "config.json").exists():
        convert(ConvertSettings(teacher=TEACHER, attn_layers="all"), paths["teacher-base"], log=log)
    if not (paths["hybrid"] / "config.json").exists():
        convert(ConvertSettings(teacher=TEACHER), paths["hybrid"], log=log)
    for k, frac in FRACTIONS.items():
        if any(n.endswith(k) for n in names) and not (paths[f"hybrid-{k}"] / "config.json").exists():
            convert(ConvertSettings(teacher=TEACHER, attn_fraction=frac), paths[f"hybrid-{k}"], log=log)
    if not (paths["teacher-sft"] / "config.json").exists():
        sft(SFTSettings(model=str(paths["teacher-base"]), data=TASK, max_steps=40, **SFT, bf16=bf16),
            paths["teacher-sft"], force=True, log=log)
    return paths


def run_stage(kind: str, settings: dict, src: Path, dst: Path, paths: dict, bf16: str) -> dict:
    """Train one stage from ``src`` into ``dst``; returns its seconds, steps and tokens."""
    t0 = time.time()
    if kind == "distill":
        from m1.train.distill import DistillConfig, distill

        s = {**COMMON, "data": TASK, "bf16": bf16, **settings}
        which = {"base": "teacher-base", "final": "teacher-final"}.get(s.get("teacher"), "teacher-sft")
        s["teacher"] = str(paths[which])
        res = distill(DistillConfig(student=str(src), out=str(dst), **s), force=True, log=log, progress=False)
        return {"seconds": time.time() - t0, "steps": res.steps, "tokens": res.tokens}
    from m1.demo_report import training_budget
    from m1.train.sft import SFTSettings, sft

    sft(SFTSettings(model=str(src), data=TASK, **SFT, bf16=bf16, **settings), dst, force=True, log=log)
    return {"seconds": time.time() - t0, "steps": settings["max_steps"], "tokens": training_budget(dst)["tokens"]}


def teacher_answers(paths: dict, out: Path, n: int = 40) -> tuple[list[list[int]], list[int]]:
    """The SFT'd teacher's greedy answers to the ``n`` held-out prompts the pass@1 eval scores, cached."""
    cache = out / "teacher_answers.json"
    if cache.exists():
        d = json.loads(cache.read_text())
        return d["rows"], d["prompt_lens"]
    from m1.model.checkpoint import write_json_atomic
    from m1.train.heldout import teacher_answers as answers

    rows, plens = answers(paths["teacher-sft"], TASK, n, max_new_tokens=96)
    write_json_atomic(cache, {"rows": rows, "prompt_lens": plens})
    return rows, plens


def evaluate(model: Path, paths: dict, out: Path) -> dict:
    from m1.eval.metrics import bootstrap_interval
    from m1.eval.run import EvalConfig, run_eval
    from m1.model.checkpoint import load_model
    from m1.train.heldout import completion_report

    res = {}
    for key, task, n in (("pass1", TASK, 4), ("pass1_hard", HARD, 2)):
        ev = model.parent / f"{model.name}-eval-{key}"  # shared stages share their evals too
        summ = run_eval(EvalConfig(model=str(model), task=task, n=n, ks=(1,), limit=40, temperature=0.7,
                                   max_new_tokens=96, seed=0), ev, progress=False, log=lambda m: None)
        per = {}
        for line in (ev / "results.jsonl").read_text().splitlines():
            r = json.loads(line)
            per.setdefault(r["problem_id"], []).append(float(r["correct"]))
        vals = [sum(v) / len(v) for v in per.values()]
        res[key] = summ["pass@1"]
        res[key + "_ci"] = [100 * x for x in bootstrap_interval(vals)]
        if key == "pass1":
            res["decode_tok_s"] = summ.get("mean_tokens", 0) / max(summ.get("mean_seconds", 1e-9), 1e-9)
    rows, plens = teacher_answers(paths, out)
    student, tok = load_model(model, dtype="float32")
    teacher, _ = load_model(paths["teacher-sft"], dtype="float32")
    res["completion_kl"] = completion_report(student, teacher, tok, rows, plens)
    res["ppl"] = perplexity(model, student, tok)
    return res


def perplexity(path: Path, model=None, tok=None) -> float:
    """GSM8K-chat perplexity of the model at ``path`` on the demo's 16 held-out chats, cached beside it."""
    cache = path.parent / f"{path.name}-ppl.json"
    if cache.exists():
        return json.loads(cache.read_text())["perplexity"]
    from m1.model.checkpoint import load_model, write_json_atomic
    from m1.train.heldout import gsm8k_chat_texts, heldout_loss

    if model is None:
        model, tok = load_model(path, dtype="float32")
    r = heldout_loss(model, tok, gsm8k_chat_texts(tok, 16), max_len=256)
    write_json_atomic(cache, {"perplexity": r.perplexity, "nll": r.nll, "tokens": r.tokens})
    return r.perplexity


def finished(results: Path) -> set[tuple[str, int]]:
    if not results.exists():
        return set()
    return {(r["recipe"], r["stage_index"]) for r in map(json.loads, results.read_text().splitlines()) if r}


def run(out: Path, names: list[str], bf16: str, demo: Path | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if any(n in AFTER_GENERAL for n in names) and demo is None:
        sys.exit(f"error: {', '.join(n for n in names if n in AFTER_GENERAL)} start from the demo's distilled "
                 "hybrid: give --from-demo DIR (an `m1 demo --budget small` output)")
    paths = setup(out, bf16, demo, names)
    results = out / "results.jsonl"
    for name in names:
        what, chain = RECIPES[name]
        src = paths["hybrid-distill" if name in AFTER_GENERAL else
                    next((f"hybrid-{k}" for k in FRACTIONS if name.endswith(k)), "hybrid")]
        cum = {"seconds": 0.0, "steps": 0, "tokens": 0}
        for k, (kind, settings) in enumerate(chain):
            # a stage is named by what it starts from and its settings: recipes that share a first
            # stage (today, gsm8k-then-task) train it once
            import hashlib

            key = hashlib.sha256(json.dumps([str(src), kind, settings], sort_keys=True).encode()).hexdigest()[:10]
            dst = out / "stages" / f"{kind}-{key}"
            timing = dst.parent / f"{kind}-{key}.timing.json"
            if not timing.exists():
                log(f"{name}: stage {k} ({kind}) ...")
                t = run_stage(kind, settings, src, dst, paths, bf16)
                timing.write_text(json.dumps(t))
            t = json.loads(timing.read_text())
            cum = {"seconds": cum["seconds"] + t["seconds"], "steps": cum["steps"] + t["steps"],
                   "tokens": cum["tokens"] + (t["tokens"] or 0)}
            if (name, k) not in finished(results):
                log(f"{name}: evaluating after stage {k} ...")
                row = {"recipe": name, "what": what, "stage_index": k, "stage": kind, "settings": settings,
                       "stage_dir": dst.name,
                       **{f"train_{a}": b for a, b in cum.items()}, **evaluate(dst, paths, out)}
                with open(results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                log(f"{name} after stage {k}: pass@1 {row['pass1']:.1f}  hard {row['pass1_hard']:.1f}  "
                    f"KL {row['completion_kl']['kl']:.3f} (digits {row['completion_kl']['kl_digits']:.3f})")
            src = dst


def report(out: Path, dest: Path) -> None:
    """Markdown table + accuracy-vs-training-seconds plot of the results so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]
    dest.mkdir(parents=True, exist_ok=True)
    lines = ["| recipe | after stage | train s | steps | tokens | pass@1 arith (95% CI) | pass@1 steps=3 | "
             "KL completion | KL digits | GSM8K-chat ppl | tok/s per sample (eval) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["recipe"] for r in rows):
        rs = sorted((r for r in rows if r["recipe"] == name), key=lambda r: r["stage_index"])
        ax.plot([0] + [r["train_seconds"] for r in rs], [0] + [r["pass1"] for r in rs], marker="o", label=name)
        for r in rs:
            lo, hi = r["pass1_ci"]
            ck = r["completion_kl"]
            stage = r["settings"].get("stage", r["stage"]) if r["stage"] == "distill" else r["stage"]
            ppl = f"{r['ppl']:.2f}" if "ppl" in r else "-"  # rows from before the column have none
            lines.append(f"| {name} | {r['stage_index']} {stage} | {r['train_seconds']:.0f} | {r['train_steps']} | "
                         f"{int(r['train_tokens']):,} | {r['pass1']:.1f} [{lo:.0f}, {hi:.0f}] | {r['pass1_hard']:.1f} | "
                         f"{ck['kl']:.3f} | {ck['kl_digits']:.3f} | {ppl} | {r['decode_tok_s']:.1f} |")
    ax.set_xlabel("seconds of training (2-core CPU)")
    ax.set_ylabel(f"pass@1 on held-out {TASK} (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dest / "accuracy_vs_seconds.png", dpi=110)
    (dest / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    global TEACHER
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/recipes", help="work and results directory (resumable)")
    ap.add_argument("--only", default=None, help=f"comma-separated recipes (default all: {', '.join(RECIPES)})")
    ap.add_argument("--bf16", default="auto", choices=["auto", "on", "off"],
                    help="bf16 autocast for training (auto: on where the CPU/GPU has bf16 matmuls)")
    ap.add_argument("--report", default=None, help="write table.md and accuracy_vs_seconds.png here and stop")
    ap.add_argument("--teacher", default="smollm2-135m",
                    help="teacher spec (default smollm2-135m; a tiny teacher dir tries the script in a minute)")
    ap.add_argument("--from-demo", default=None,
                    help="an `m1 demo --budget small` output dir whose converted models and SFT'd teacher to reuse")
    a = ap.parse_args()
    TEACHER = a.teacher
    out = Path(a.out)
    if a.report:
        return report(out, Path(a.report))
    names = a.only.split(",") if a.only else list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        sys.exit(f"error: unknown recipe(s) {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    bf16 = a.bf16
    if bf16 == "auto":
        from m1.train.run import cpu_bf16_supported, resolve_precision

        bf16 = "on" if (resolve_precision("auto") or cpu_bf16_supported()) else "off"
    run(out, names, bf16, Path(a.from_demo) if a.from_demo else None)


if __name__ == "__main__":
    main()
