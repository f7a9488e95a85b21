"""m1 sft: settings checks, completion-only labels, resume checks, a tiny end-to-end run (its data: test_data.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from m1.errors import M1Error
from m1.train.data import load_sft_examples
from m1.train.run import find_checkpoints
from m1.train.sft import (SFT_CONFIG_FILE, SFTSettings, build_sft_trainer, collate_preview, set_mamba_chunk_size, sft,
                          to_dataset, work_dir)

QUIET = dict(log=lambda m: None)


# -------------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("steps", [0, -3])
def test_max_steps_other_than_positive_or_minus_one_is_refused(tiny_hybrid, tmp_path, steps):
    # -3 used to mean "off" silently and train a whole epoch instead
    with pytest.raises(M1Error, match=rf"--max-steps must be >= 1 \(or -1: train for --epochs\), got {steps}"):
        sft(SFTSettings(model=tiny_hybrid, data="arith:steps=1,digits=1", max_steps=steps), tmp_path / "s")
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------ completion-only loss
def test_collated_labels_cover_exactly_the_completion(tiny_hybrid, tmp_path):
    """The loss mask: every prompt and padding position is -100, every completion token is a label."""
    from m1.train.sft import load_policy

    model, tok = load_policy(Path(tiny_hybrid), lambda m: None)
    examples = load_sft_examples("arith:steps=1,digits=1", limit=3, seed=1)
    examples[1].solution += " Extra words make this row longer than the others."  # forces padding
    cfg = SFTSettings(model=str(tiny_hybrid), max_steps=1, batch_size=3)
    trainer = build_sft_trainer(cfg, {}, model, tok, to_dataset(examples), tmp_path / "w", [])
    assert not trainer.args.packing and not trainer.args.padding_free
    batch = collate_preview(trainer, 3)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape[0] == 3 and ids.shape[1] == max(int(m.sum()) for m in mask)
    for i, e in enumerate(examples):
        prompt_ids = tok.apply_chat_template(e.prompt, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
        full_ids = tok.apply_chat_template(e.prompt + [{"role": "assistant", "content": e.solution}],
                                           tokenize=True, return_dict=True)["input_ids"]
        n = len(full_ids)
        assert ids[i, :n].tolist() == full_ids
        assert mask[i, :n].all() and not mask[i, n:].any()
        # prompt positions and padding are masked ...
        assert (labels[i, :len(prompt_ids)] == -100).all()
        assert (labels[i, n:] == -100).all()
        # ... and every completion token (the solution and its end-of-turn token) is a label
        assert labels[i, len(prompt_ids):n].tolist() == full_ids[len(prompt_ids):]
        completion = tok.decode(labels[i, len(prompt_ids):n])
        assert completion.startswith(e.solution) and tok.eos_token in completion[len(e.solution):]


def test_mamba_chunk_size_is_a_runtime_setting(tiny_hybrid):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_hybrid)
    assert set_mamba_chunk_size(model, 16) == 16
    assert all(m.chunk_size == 16 for m in model.modules() if type(m).__name__.endswith("Mamba2Mixer")
               or (hasattr(m, "chunk_size") and "mamba" in type(m).__name__.lower()))
    assert model.config.mamba_chunk_size == 256  # what gets saved is unchanged


# -------------------------------------------------------------------------- run, kill, resume
class _Kill(Exception):
    pass


def _killer(at_step: int):
    from transformers import TrainerCallback

    class Kill(TrainerCallback):  # raises right after the metrics row of `at_step` was written
        def on_log(self, args, state, control, **kw):
            if state.global_step >= at_step:
                raise _Kill()

    return Kill()


RUN = dict(limit=16, max_steps=4, batch_size=4, learning_rate=1e-3, save_steps=2, logging_steps=1)


def test_sft_run_resume_and_mismatch(tiny_hybrid, tmp_path):
    from transformers import AutoModelForCausalLM

    from m1.model.checkpoint import read_record
    from m1.model.info import model_info

    out = tmp_path / "sft"
    data = "arith:steps=1,digits=1"
    with pytest.raises(_Kill):  # "killed" after step 3: checkpoint-2 is complete, step 3 is lost
        sft(SFTSettings(model=tiny_hybrid, data=data, **RUN), out, callbacks=[_killer(3)], **QUIET)
    work = work_dir(out)
    ckpt, incomplete = find_checkpoints(work, SFT_CONFIG_FILE)
    assert ckpt is not None and ckpt.name == "checkpoint-2" and not incomplete
    assert not out.exists()
    # a half-written later checkpoint (no marker) must be ignored
    (work / "checkpoints" / "checkpoint-3").mkdir()
    before = sorted(p.relative_to(work).as_posix() for p in work.rglob("*"))

    with pytest.raises(M1Error, match="unfinished run"):
        sft(SFTSettings(model=tiny_hybrid, data=data, **RUN), out, **QUIET)
    with pytest.raises(M1Error, match=r"different settings.*learning_rate"):
        sft(SFTSettings(model=tiny_hybrid, data=data, **{**RUN, "learning_rate": 5e-4}), out, resume=True, **QUIET)
    with pytest.raises(M1Error, match=r"different settings.*data"):
        sft(SFTSettings(model=tiny_hybrid, data="arith:steps=2,digits=1", **RUN), out, resume=True, **QUIET)
    assert sorted(p.relative_to(work).as_posix() for p in work.rglob("*")) == before  # nothing touched
    assert not out.exists()

    res = sft(SFTSettings(model=tiny_hybrid, data=data, **{**RUN, "save_steps": 3}),
              out, resume=True, **QUIET)  # save_steps is neutral
    assert res.steps == 4 and not work.exists()
    steps = [r["step"] for r in res.metrics if "loss" in r]
    assert steps == [1, 2, 3, 4]  # the killed run's step-3 row was dropped, then logged again
    rec = read_record(out)
    assert rec["stage"] == "sft" and rec["sft"]["settings"]["data"] == data
    assert rec["attn_layers"] == [1, 3] and rec["history"][-1]["stage"] == "convert"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "m1.json",
                 SFT_CONFIG_FILE, "sft_metrics.jsonl"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["mamba_chunk_size"] == 256
    assert model_info(out).record["stage"] == "sft"
    AutoModelForCausalLM.from_pretrained(out)
    with pytest.raises(M1Error, match="already exists"):
        sft(SFTSettings(model=tiny_hybrid, data=data, **RUN), out, **QUIET)
    with pytest.raises(M1Error, match="nothing to resume"):
        sft(SFTSettings(model=tiny_hybrid, data=data, **RUN), tmp_path / "other", resume=True, **QUIET)


def test_options_are_checked_before_anything_runs(tiny_hybrid, tmp_path):
    with pytest.raises(M1Error, match="--batch-size"):
        sft(SFTSettings(model=tiny_hybrid, data="arith", batch_size=0), tmp_path / "x", **QUIET)
    with pytest.raises(M1Error, match="contradict"):
        sft(SFTSettings(model=tiny_hybrid, data="arith"), tmp_path / "x", resume=True, force=True, **QUIET)
    with pytest.raises(M1Error, match="does not exist"):
        sft(SFTSettings(model=tmp_path / "nope", data="arith"), tmp_path / "x", **QUIET)
    assert not (tmp_path / "x").exists() and not work_dir(tmp_path / "x").exists()


def test_cli_sft_help_and_error(capsys, tmp_path):
    from m1.cli import main

    with pytest.raises(SystemExit) as e:
        main(["sft", "--help"])
    assert e.value.code == 0
    assert "completion" in capsys.readouterr().out
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"question": "q"}) + "\n")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert main(["sft", "--model", str(tmp_path / "m"), "--data", str(f), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{f}:1" in err


def test_two_process_accelerate_launch(tiny_hybrid, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on a CPU machine: DDP over gloo, one output."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "m1", "sft",
           "--model", str(tiny_hybrid), "--data", "arith:steps=1,digits=1", "--limit", "16", "--max-steps", "2",
           "--batch-size", "2", "--logging-steps", "1", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads((out / "m1.json").read_text())
    assert rec["sft"]["processes"] == 2 and rec["sft"]["steps"] == 2
    assert p.stdout.count("sft: 2 steps") == 1  # only the main process reports
    assert [json.loads(x)["step"] for x in (out / "sft_metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(x)] == [1, 2]


def test_distill_task_data_is_what_sft_trains_on(tiny_hybrid, tmp_path):
    """m1 distill --data arith:... tokenizes each problem exactly as TRL's SFTTrainer does in m1 sft:
    the same input_ids row by row, and the completion (TRL's labels != -100) starts at prompt_len."""
    from m1.train.data import load_data
    from m1.train.sft import load_policy

    spec = "arith:steps=1,digits=1,n=20"
    model, tok = load_policy(Path(tiny_hybrid), lambda m: None)
    trainer = build_sft_trainer(SFTSettings(model=str(tiny_hybrid), max_steps=1, batch_size=2), {}, model, tok,
                                to_dataset(load_sft_examples(spec)), tmp_path / "w", [])
    ds = trainer.train_dataset
    data = load_data(spec, tok, seq_len=4096, heldout=0)  # heldout 0: the rows in task order
    assert len(ds) == len(data.train) == 20
    for i in range(20):
        ids, labels = ds[i]["input_ids"], ds[i]["labels"]
        assert data.train[i] == list(ids), i
        n = data.prompt_lens[i]
        assert 0 < n < len(ids)
        assert all(x == -100 for x in labels[:n]), i  # TRL: the prompt carries no loss
        assert list(labels[n:]) == list(ids[n:]), i  # ... and every completion token does
    # the same held-out prompt is what distill's onpolicy stage samples from and m1 eval feeds the model
    held = load_data(spec, tok, seq_len=4096, heldout=5)
    assert all(tok.decode(r[:n]).endswith("<|im_start|>assistant\n") for r, n in
               zip(held.heldout_ids, held.heldout_prompt_lens))


def test_diverged_run_stops_with_an_error_and_keeps_the_last_finite_checkpoint(tiny_hybrid, tmp_path):
    """`m1 sft --lr 1e9` used to exit 0 with a finished checkpoint of NaN weights and delete its work dir."""
    from safetensors.torch import load_file

    out = tmp_path / "sft"
    opts = {**RUN, "learning_rate": 1e9, "max_steps": 6, "save_steps": 2}
    with pytest.raises(M1Error, match=r"training diverged: the (weights|loss|grad norm) became .* at step \d.*--lr"):
        sft(SFTSettings(model=tiny_hybrid, data="arith:steps=1,digits=1", **opts), out, **QUIET)
    assert not out.exists()  # nothing finalised
    ckpt, _ = find_checkpoints(work_dir(out), SFT_CONFIG_FILE)
    assert ckpt is not None  # the work dir and its last counted checkpoint survive
    weights = load_file(str(ckpt / "model.safetensors"))
    assert all(bool(t.isfinite().all()) for t in weights.values())  # a checkpoint of broken weights never counts


def test_mamba_lr_trains_the_mixers_at_their_own_rate(tiny_hybrid, tiny_teachers, tmp_path):
    # mixers at a vanishing rate, the rest at 1e-3: after 3 steps only the non-mixer weights moved; and the
    # other way round. Adam's step is ~lr whatever the gradient, so "moved" is unambiguous
    from safetensors.torch import load_file

    before = load_file(str(tiny_hybrid / "model.safetensors"))
    run = dict(model=tiny_hybrid, data="arith:steps=1,digits=1", limit=16, max_steps=3, batch_size=4,
               save_steps=10, logging_steps=1)
    for name, lr, mamba_lr in (("slow", 1e-3, 1e-30), ("fast", 1e-30, 1e-3)):
        sft(SFTSettings(**run, learning_rate=lr, mamba_lr=mamba_lr), tmp_path / name, **QUIET)
        after = load_file(str(tmp_path / name / "model.safetensors"))
        moved = {k for k in before if not torch.allclose(before[k].float(), after[k].float(), atol=1e-7, rtol=0)}
        mixer = {k for k in before if ".mamba." in k}
        assert mixer and moved == (set(before) - mixer if name == "slow" else mixer), name
    assert json.loads((tmp_path / "fast" / SFT_CONFIG_FILE).read_text())["settings"]["mamba_lr"] == 1e-3
    with pytest.raises(M1Error, match="--mamba-lr: the model has no Mamba layers"):
        sft(SFTSettings(**{**run, "model": tiny_teachers["llama_tied"]}, mamba_lr=1e-3), tmp_path / "t", **QUIET)
    with pytest.raises(M1Error, match="--mamba-lr must be > 0"):
        sft(SFTSettings(**run, mamba_lr=0.0), tmp_path / "z", **QUIET)
