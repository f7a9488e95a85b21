"""m1 grpo: rewards (guarded, the m1 eval checker), problems, the rollout batch (mask, advantages, log-probs
under left padding), learning a trivially learnable reward (and unlearning it when flipped), resume checks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from m1.errors import M1Error
from m1.train.grpo import (GRPO_CONFIG_FILE, AccuracyReward, FormatReward, GRPOSettings, GuardedReward, RewardStats,
                           build_grpo_trainer, grpo, load_rl_problems, read_rl_jsonl, resolve_rollout, to_rl_dataset)
from m1.train.run import find_checkpoints, work_dir

QUIET = dict(log=lambda m: None)
EOS = 2


# ---------------------------------------------------------------------------------------- rewards
def test_guarded_reward_scores_failing_samples_zero_and_reports_them():
    stats = RewardStats()

    def picky(prompts, completions, completion_ids, problem_id, **kw):
        if len(completions) > 1:
            raise RuntimeError("batch mode broken")
        if problem_id[0] == "p1":
            raise ValueError("cannot score this one")
        if problem_id[0] == "p2":
            time.sleep(1.0)  # longer than the timeout
        if problem_id[0] == "p3":
            return [float("nan")]
        return [0.5]

    g = GuardedReward(picky, stats, timeout=0.2, eos_ids=[EOS], count_completions=True)
    assert g.__name__ == "picky"
    logged = {}
    scores = g(prompts=["q"] * 4, completions=["a", "b", "c", "d"], completion_ids=[[5, EOS], [5], [5, EOS], [6, EOS]],
               problem_id=["p0", "p1", "p2", "p3"], log_metric=lambda k, v: logged.__setitem__(k, v))
    assert scores == [0.5, 0.0, 0.0, 0.0]
    assert stats.failures == 3 and stats.timeouts == 1
    assert stats.completions == 4 and stats.truncated == 1 and logged["truncated"] == 0.25
    assert any("p1" in m and "ValueError" in m for m in stats.examples)

    def wrong_length(prompts, completions, **kw):
        return [1.0] * (len(completions) + 1)

    assert GuardedReward(wrong_length, stats)(prompts=["q"], completions=["a"]) == [0.0]


def test_accuracy_reward_uses_the_eval_checker_and_logs_accuracy():
    stats = RewardStats()
    acc = AccuracyReward(stats, timeout=5.0)
    logged = {}
    completions = [[{"role": "assistant", "content": "5 + 3 = 8. The answer is \\boxed{8}."}],
                   [{"role": "assistant", "content": "The answer is \\boxed{9}."}],
                   [{"role": "assistant", "content": "I do not know"}],
                   [{"role": "assistant", "content": "So \\boxed{1,080} apples"}]]
    scores = acc(prompts=[None] * 4, completions=completions, answer=["8", "8", "8", "1080"],
                 log_metric=lambda k, v: logged.__setitem__(k, v))
    assert scores == [1.0, 0.0, 0.0, 1.0]
    assert logged == {"accuracy": 0.5, "no_answer": 0.25}
    with pytest.raises(M1Error, match="answer"):
        acc(prompts=[None], completions=["x"])


def test_format_reward_needs_a_finished_closed_box():
    f = FormatReward([EOS])
    got = f(prompts=[None] * 4, completions=["so \\boxed{3}", "so \\boxed{3", "no box", "so \\boxed{3}"],
            completion_ids=[[7, EOS], [7, EOS], [7, EOS], [7, 8]])
    assert got == [1.0, 0.0, 0.0, 0.0]


# --------------------------------------------------------------------------------------- problems
def test_rl_problem_rows_and_their_errors(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"question": "1+1?", "answer": "2"},
        {"problem": "half?", "answer": "\\frac{1}{2}"},
        {"question": "gsm", "answer": "a lot <<2*3=6>>6\n#### 1,080"},
        {"question": "sol", "solution": "so it is \\boxed{7}"},
        {"question": "num", "answer": 12},
    ]) + "\n")
    probs = read_rl_jsonl(f)
    assert [p.answer for p in probs] == ["2", "\\frac{1}{2}", "1080", "7", "12"]
    assert load_rl_problems(str(f), limit=2)[1].answer == "\\frac{1}{2}"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n\n"
                   + json.dumps({"question": "no gold"}) + "\n")
    with pytest.raises(M1Error, match=rf"{bad}:3: row has no answer"):
        load_rl_problems(str(bad))
    bad.write_text(json.dumps({"answer": "2"}) + "\n")
    with pytest.raises(M1Error, match=rf"{bad}:1: row has no question"):
        load_rl_problems(str(bad))
    arith = load_rl_problems("arith:steps=1,digits=1", limit=5, seed=2)
    assert len(arith) == 5 and all(p.answer.lstrip("-").isdigit() for p in arith)
    assert len(load_rl_problems("gsm8k", limit=3)) == 3
    with pytest.raises(M1Error, match="no train split"):
        load_rl_problems("math500")
    assert load_rl_problems("math500:split=test", limit=2)[0].answer
    ds = to_rl_dataset(arith)
    assert ds[0]["prompt"][-1]["role"] == "user" and "\\boxed{}" in ds[0]["prompt"][-1]["content"]
    assert ds[0]["answer"] == arith[0].answer and ds[0]["problem_id"] == arith[0].id


def test_settings_and_rollout_checks(tiny_hybrid, tmp_path):
    assert resolve_rollout("hf") == "hf"
    try:
        import vllm  # noqa: F401
    except ImportError:
        assert resolve_rollout("auto") == "hf"
        with pytest.raises(M1Error, match="vllm is not installed"):
            resolve_rollout("vllm")
    for bad, match in [({"loss_type": "ppo"}, "--loss-type"), ({"num_generations": 1}, "num-generations"),
                       ({"temperature": 0}, "temperature"), ({"rollout": "magic"}, "--rollout"),
                       ({"reward_funcs": ["f"]}, "pass reward functions as grpo")]:
        with pytest.raises(M1Error, match=match):
            grpo(GRPOSettings(model=tiny_hybrid, task="arith", **bad), tmp_path / "x", **QUIET)
    assert not (tmp_path / "x").exists() and not work_dir(tmp_path / "x").exists()


# ------------------------------------------------------------- the rollout batch the loss sees
def test_rollout_batch_mask_advantages_and_logprobs_under_left_padding(tiny_hybrid, tmp_path):
    """TRL's batch on our hybrid: completion mask ends at the first EOS, advantages are (r - group mean) / std
    with the right sign, and the per-token log-probs of left-padded prompts equal an unpadded forward."""
    import torch

    from m1.train.sft import load_policy

    model, tok = load_policy(Path(tiny_hybrid), lambda m: None)
    stops = [tok.eos_token_id] + list(range(3, 33))  # ~8% of the vocabulary ends a completion: varied lengths
    model.generation_config.eos_token_id = stops
    problems = load_rl_problems("arith:steps=2,digits=2", limit=2)
    ds = to_rl_dataset(problems)
    seen = {}

    def length(prompts, completions, completion_ids, **kw):
        seen["ids"] = completion_ids
        return [float(len(c)) for c in completion_ids]

    T, G = 0.7, 4
    cfg = GRPOSettings(model=str(tiny_hybrid), prompts_per_step=2, num_generations=G, max_completion_length=12,
                       temperature=T)
    stats = RewardStats()
    tr = build_grpo_trainer(cfg, {}, model, tok, ds, tmp_path / "w", rewards=[GuardedReward(length, stats)],
                            weights=[1.0], rollout="hf", num_processes=1, callbacks=[])
    # 8 completions per step: forwards of 4 on CPU by default, accumulated (m1.train.run.default_micro_batch)
    assert (tr.args.per_device_train_batch_size, tr.args.gradient_accumulation_steps) == (4, 2)
    torch.manual_seed(0)
    tr.model.train()
    out = tr._generate_and_score_completions([ds[0]] * G + [ds[1]] * G)
    pm, cm = out["prompt_mask"], out["completion_mask"]
    assert len(set(pm.sum(1).tolist())) == 2  # two prompt lengths: the shorter one is left-padded
    lens = cm.sum(1).tolist()
    assert lens == [len(c) for c in seen["ids"]] and len(set(lens)) > 1
    for i, n in enumerate(lens):
        assert cm[i, :n].all() and not cm[i, n:].any()  # contiguous, from the first completion token
        ids = out["completion_ids"][i, :n].tolist()
        assert all(t not in stops for t in ids[:-1])  # nothing after the first EOS is trained on
        assert n == cfg.max_completion_length or ids[-1] in stops
    r = torch.tensor(lens, dtype=torch.float).view(-1, G)
    adv = out["advantages"].view(-1, G)
    expect = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)
    assert torch.allclose(adv, expect, atol=1e-4)
    assert ((adv > 0) == (r > r.mean(1, keepdim=True))).all()

    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    mask = torch.cat([pm, cm], 1)
    with torch.no_grad():
        logps, _, _ = tr._get_per_token_logps_and_entropies(tr.model, ids, mask, out["completion_ids"].size(1))
        for i in range(ids.size(0)):
            p = out["prompt_ids"][i][pm[i].bool()]
            c = out["completion_ids"][i][cm[i].bool()]
            logits = model(input_ids=torch.cat([p, c])[None]).logits[0].float() / T
            ref = torch.log_softmax(logits, -1)[len(p) - 1:-1].gather(-1, c[:, None])[:, 0]
            assert torch.allclose(logps[i, :len(c)], ref, atol=1e-4), i


# ---------------------------------------------------------------------------------------- learning
def _set_reward(vocab: int, sign: float):
    target = set(range(vocab - vocab // 8, vocab))  # the top eighth of the ids: ~12% of random samples

    def in_target_set(prompts, completions, completion_ids, **kw):
        return [sign * sum(t in target for t in c) / max(1, len(c)) for c in completion_ids]

    return target, in_target_set


def _target_mass(model_dir, tok, target) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    total = 0.0
    for q in ("Tom has 5 apples.", "Anna has 12 coins. She loses 3.", "What is 7 + 8?"):
        enc = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            p = m(**enc).logits[0, -1].softmax(-1)
        total += p[sorted(target)].sum().item() / 3
    return total


@pytest.mark.parametrize("sign,rollout", [(1.0, "hf"), (-1.0, "engine")])
def test_grpo_learns_a_token_reward_and_unlearns_it_when_flipped(tiny_hybrid, tmp_path, sign, rollout):
    """reward = fraction of completion tokens in a target set. With the right advantage sign, completion mask and
    log-probs the mean reward rises within a dozen steps; negated, the same quantity falls. A flipped advantage,
    a mask that trains on the wrong tokens or misaligned log-probs break one of the two directions."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_hybrid)
    target, reward = _set_reward(len(tok), sign)
    out = tmp_path / "g"
    cfg = GRPOSettings(model=tiny_hybrid, task="arith:steps=1,digits=1", limit=64, max_steps=12, prompts_per_step=2,
                       num_generations=8, max_completion_length=8, learning_rate=2e-2, entropy_coef=0.0,
                       rollout=rollout, save_steps=100)
    res = grpo(cfg, out, reward_funcs=[reward], **QUIET)
    frac = [sign * m["reward"] for m in res.metrics if "reward" in m]  # the fraction itself, whatever the sign
    assert len(frac) == 12
    start, end = sum(frac[:3]) / 3, sum(frac[-3:]) / 3
    before, after = _target_mass(tiny_hybrid, tok, target), _target_mass(out, tok, target)
    if sign > 0:
        assert end > start + 0.25, frac
        assert after > 2 * before, (before, after)
    else:
        assert end < start - 0.05, frac
        assert after < before / 2, (before, after)
    assert all("entropy" in m and "completions/mean_length" in m for m in res.metrics if "reward" in m)


# ----------------------------------------------------------------------------- failures in a run
def test_reward_failures_in_a_run_score_zero_and_are_reported(tiny_hybrid, tmp_path):
    """A flaky reward costs samples, not the run; with beta > 0 TRL's reference model is rebuilt from the
    --model directory on disk (the KL is logged)."""
    calls = {"n": 0}

    def flaky(prompts, completions, completion_ids, **kw):
        calls["n"] += 1
        if len(completions) > 1 or calls["n"] % 3 == 0:
            raise RuntimeError("flaky reward")
        return [1.0]

    cfg = GRPOSettings(model=tiny_hybrid, task="arith:steps=1,digits=1", limit=8, max_steps=1, prompts_per_step=2,
                       num_generations=2, max_completion_length=4, rollout="hf", reward_timeout=2.0, beta=0.04)
    res = grpo(cfg, tmp_path / "g", reward_funcs=[flaky], **QUIET)
    assert res.steps == 1 and res.metrics[0]["kl"] is not None
    assert res.stats["reward_failures_total"] >= 1 and res.stats["completions_total"] == 4
    assert res.stats["truncated_total"] >= 1  # 4 new tokens: most completions never finish
    assert res.metrics[0]["reward_failures_total"] == res.stats["reward_failures_total"]


class _Kill(Exception):
    pass


def _killer(at_step: int):
    from transformers import TrainerCallback

    class Kill(TrainerCallback):
        def on_log(self, args, state, control, **kw):
            if state.global_step >= at_step:
                raise _Kill()

    return Kill()


RUN = dict(limit=16, max_steps=3, prompts_per_step=2, num_generations=2, max_completion_length=8, save_steps=2,
           learning_rate=1e-4, format_reward=0.5, rollout="engine")


def test_grpo_run_resume_mismatch_and_output(tiny_hybrid, tmp_path):
    from transformers import AutoModelForCausalLM

    from m1.model.checkpoint import read_record

    out, task = tmp_path / "g", "arith:steps=1,digits=1"
    with pytest.raises(_Kill):
        grpo(GRPOSettings(model=tiny_hybrid, task=task, **RUN), out, callbacks=[_killer(3)], **QUIET)
    work = work_dir(out)
    ckpt, _ = find_checkpoints(work, GRPO_CONFIG_FILE)
    assert ckpt is not None and ckpt.name == "checkpoint-2"
    before = sorted(p.relative_to(work).as_posix() for p in work.rglob("*"))
    with pytest.raises(M1Error, match=r"different settings.*loss_type"):
        grpo(GRPOSettings(model=tiny_hybrid, task=task, **{**RUN, "loss_type": "dapo"}), out, resume=True, **QUIET)
    with pytest.raises(M1Error, match=r"different settings.*reward_funcs"):
        grpo(GRPOSettings(model=tiny_hybrid, task=task, **RUN),
             out, resume=True, reward_funcs=[lambda **kw: [0.0]], **QUIET)
    with pytest.raises(M1Error, match="unfinished run"):
        grpo(GRPOSettings(model=tiny_hybrid, task=task, **RUN), out, **QUIET)
    assert sorted(p.relative_to(work).as_posix() for p in work.rglob("*")) == before and not out.exists()

    res = grpo(GRPOSettings(model=tiny_hybrid, task=task, **{**RUN, "rollout": "hf"}),
               out, resume=True, **QUIET)  # rollout is neutral
    assert res.steps == 3 and not work.exists()
    assert [m["step"] for m in res.metrics if "reward" in m] == [1, 2, 3]
    row = res.metrics[-2]
    for key in ("reward", "accuracy", "entropy", "completions/mean_length", "truncated", "rewards/format/mean"):
        assert key in row, key
    rec = read_record(out)
    assert rec["stage"] == "grpo" and rec["grpo"]["settings"]["loss_type"] == "grpo"
    assert rec["grpo"]["settings"]["beta"] == 0.0 and rec["grpo"]["rewards"] == ["accuracy", "format"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", GRPO_CONFIG_FILE,
                 "grpo_metrics.jsonl"):
        assert (out / name).is_file(), name
    AutoModelForCausalLM.from_pretrained(out)


def test_eos_ids_include_generation_config_and_tokenizer(tiny_hybrid):
    from m1.train.sft import load_policy

    model, tok = load_policy(Path(tiny_hybrid), lambda m: None)
    from m1.engine import Engine
    from m1.model.checkpoint import eos_token_ids

    model.generation_config.eos_token_id = [7, 9]
    assert eos_token_ids(model, tok) == {7, 9, tok.eos_token_id} == Engine(model, tok).eos_ids


def test_cli_grpo_help_and_bad_row(capsys, tmp_path, tiny_hybrid):
    from m1.cli import main

    with pytest.raises(SystemExit) as e:
        main(["grpo", "--help"])
    assert e.value.code == 0
    assert "--loss-type" in capsys.readouterr().out
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"question": "what?"}) + "\n")
    assert main(["grpo", "--model", str(tiny_hybrid), "--task", str(f), "--out", str(tmp_path / "o"),
                 "--max-completion-length", "32"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{f}:1: row has no answer" in err
    assert not (tmp_path / "o").exists()


def test_two_process_accelerate_launch(tiny_hybrid, tmp_path):
    """GRPO under `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): rewards and counts gathered."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "m1", "grpo",
           "--model", str(tiny_hybrid), "--task", "arith:steps=1,digits=1", "--limit", "16", "--max-steps", "2",
           "--prompts-per-step", "2", "--num-generations", "4", "--max-completion-length", "6",
           "--rollout", "engine", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads((out / "m1.json").read_text())
    assert rec["grpo"]["processes"] == 2 and rec["grpo"]["steps"] == 2
    assert rec["grpo"]["session_counts"]["completions_total"] == 16  # 2 steps x 2 problems x 4, both processes
    assert p.stdout.count("grpo: 2 steps") == 1



def test_completion_length_beyond_the_context_is_refused_before_loading(tiny_hybrid, tmp_path):
    with pytest.raises(M1Error, match="--max-completion-length 600 does not fit the model's context of 512"):
        grpo(GRPOSettings(model=tiny_hybrid, task="arith:steps=1,digits=1", **{**RUN, "max_completion_length": 600}),
             tmp_path / "g")
    assert not (tmp_path / "g").exists()

@pytest.mark.parametrize("rollout", ["engine", "hf"])
def test_diverged_run_is_one_error_not_a_sampler_traceback(tiny_hybrid, tmp_path, rollout):
    """`m1 grpo --lr 1e9` used to die in transformers' sampler with a 58-line traceback."""
    out = tmp_path / "g"
    opts = {**RUN, "learning_rate": 1e9, "max_steps": 4, "rollout": rollout}
    with pytest.raises(M1Error, match=r"training diverged: the .* at step \d.*--lr"):
        grpo(GRPOSettings(model=tiny_hybrid, task="arith:steps=1,digits=1", **opts), out, **QUIET)
    assert not out.exists() and work_dir(out).exists()
