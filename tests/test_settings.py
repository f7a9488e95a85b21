"""m1.settings: the CLI is generated from the config dataclass, and to_argv inverts the parse."""

from __future__ import annotations

import argparse
import shlex
from dataclasses import asdict, dataclass

import pytest

from m1.cli import build_parser
from m1.settings import add_arguments, from_args, setting, to_argv
from m1.train.distill import DistillConfig


@dataclass
class _Cfg:
    out: str = setting(help="where")
    steps: int | None = setting(None, "how many", group="budget")
    lr: float = setting(1e-4, "peak", group="budget")
    mode: str = setting("a", "which", choices=("a", "b"))
    lmbda: float = setting(0.0, "share", flag="--lambda")
    fast: bool = setting(False, "go fast")
    internal: int = 3  # no setting(): not a flag


def _parser():
    p = argparse.ArgumentParser()
    add_arguments(p, _Cfg)
    return p


def test_parse_defaults_required_choices_and_help():
    p = _parser()
    cfg = from_args(_Cfg, p.parse_args(["--out", "x"]))
    assert cfg == _Cfg(out="x")
    cfg = from_args(_Cfg, p.parse_args(["--out", "x", "--steps", "5", "--lambda", "0.25", "--fast", "--mode", "b"]))
    assert (cfg.steps, cfg.lmbda, cfg.fast, cfg.mode, cfg.internal) == (5, 0.25, True, "b", 3)
    with pytest.raises(SystemExit):
        p.parse_args([])  # --out is required
    with pytest.raises(SystemExit):
        p.parse_args(["--out", "x", "--mode", "c"])
    with pytest.raises(SystemExit):
        p.parse_args(["--out", "x", "--internal", "4"])
    text = p.format_help()
    assert "peak (default 0.0001)" in text and "share (default 0.0)" in text
    assert "how many\n" in text  # a None default is not printed
    assert "budget:" in text


@pytest.mark.parametrize("cfg", [_Cfg(out="o"), _Cfg(out="a b", steps=7, lr=3e-3, mode="b", lmbda=0.5, fast=True)])
def test_to_argv_inverts_the_parse(cfg):
    argv = to_argv(cfg)
    assert from_args(_Cfg, _parser().parse_args(argv)) == cfg
    assert to_argv(_Cfg(out="o")) == ["--out", "o"]  # defaults are left out


def test_to_argv_refuses_what_no_flag_can_say():
    with pytest.raises(ValueError, match="lr=None"):
        to_argv(_Cfg(out="o", lr=None))


def test_distill_cli_is_the_config():
    """Every DistillConfig field is a flag of `m1 distill`, and a non-default config survives
    to_argv -> the real CLI parser -> from_args."""
    cfg = DistillConfig(student="s", out="o", teacher="t", data="arith:steps=2", stage="align,kd,onpolicy",
                        loss="jsd", beta=0.3, trainable="mamba", loss_on="completion", mamba_lr=2e-4,
                        onpolicy_steps=5, lmbda=0.5, num_samples=2, steps=10, align_steps=3, seq_len=128,
                        lr=5e-5, heldout=4, bf16="on", gradient_checkpointing=True)
    a = build_parser().parse_args(shlex.split("distill " + shlex.join(to_argv(cfg))))
    assert asdict(from_args(DistillConfig, a)) == asdict(cfg)
    assert not a.resume and not a.force


def test_sft_cli_is_the_config():
    """Every SFTSettings field is a flag of `m1 sft` (--lr for learning_rate), and a non-default
    config survives to_argv -> the real CLI parser -> from_args."""
    from m1.train.sft import SFTSettings

    cfg = SFTSettings(model="m", data="gsm8k-train", limit=50, epochs=2.0, max_steps=7, batch_size=3, grad_accum=2,
                      max_length=128, learning_rate=3e-4, lr_scheduler="linear", warmup_ratio=0.1, weight_decay=0.01,
                      max_grad_norm=0.5, seed=3, bf16="on", gradient_checkpointing=True, mamba_chunk_size=32,
                      save_steps=5, save_total_limit=3, logging_steps=1)
    argv = to_argv(cfg)
    assert "--lr" in argv and "--learning-rate" not in argv
    a = build_parser().parse_args(["sft", *argv, "--out", "o"])
    assert asdict(from_args(SFTSettings, a)) == asdict(cfg) and a.out == "o"


def test_grpo_cli_is_the_config():
    """Every GRPOSettings field but the Python-only reward_funcs is a flag of `m1 grpo`; an optional
    number takes "none" (the flag's old spelling for the default)."""
    from m1.train.grpo import GRPOSettings

    cfg = GRPOSettings(model="m", task="gsm8k", limit=9, few_shot=1, num_generations=4, prompts_per_step=2,
                       loss_type="dapo", beta=0.1, entropy_coef=0.0, epsilon=0.1, epsilon_high=0.28, num_iterations=2,
                       scale_rewards="none", format_reward=0.1, mask_truncated=True, reward_timeout=2.0,
                       max_completion_length=64, temperature=0.7, top_p=0.9, top_k=5, rollout="engine",
                       vllm_mode="server", vllm_gpu_memory_utilization=0.5, max_steps=3, epochs=2.0,
                       micro_batch_size=2, learning_rate=1e-5, lr_scheduler="linear", warmup_ratio=0.1,
                       weight_decay=0.01, max_grad_norm=0.5, seed=4, bf16="off", gradient_checkpointing=True,
                       mamba_chunk_size=16, save_steps=3, save_total_limit=3, logging_steps=2)
    a = build_parser().parse_args(["grpo", *to_argv(cfg), "--out", "o"])
    assert asdict(from_args(GRPOSettings, a)) == asdict(cfg)
    a = build_parser().parse_args(["grpo", "--model", "m", "--out", "o", "--epsilon-high", "none"])
    assert a.epsilon_high is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["grpo", "--model", "m", "--out", "o", "--epsilon-high", "x"])


@dataclass
class _Lists:
    model: str | None = setting(help="which model", group="source")
    ks: tuple[int, ...] | None = setting(None, "comma-separated", flag="--k", metavar="K")
    lens: tuple[int, ...] = setting((1, 16), "lengths")
    n: int = setting(1, "samples", short="-n")
    stop: tuple[str, ...] = setting((), "stop string (repeatable)", repeat=True)
    graphs: bool = setting(True, "turn graphs off")
    chat: bool | None = setting(None, "chat template (default: when there is one)")

    def __post_init__(self):
        # what a settings class does with a comma-separated flag: its text becomes the tuple
        if isinstance(self.ks, str):
            self.ks = tuple(int(k) for k in self.ks.split(","))
        if isinstance(self.lens, str):
            self.lens = tuple(int(k) for k in self.lens.split(","))


def _lists_parser():
    p = argparse.ArgumentParser()
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-file")  # first: argparse shows a group in the usage line only when it is contiguous
    add_arguments(p, _Lists, groups={"source": src})
    return p


def test_lists_switches_short_options_and_exclusive_groups():
    p = _lists_parser()
    cfg = from_args(_Lists, p.parse_args(["--model", "m"]))
    assert cfg == _Lists(model="m") and cfg.stop == () and cfg.graphs is True and cfg.chat is None
    a = p.parse_args(["--model", "m", "--k", "1,4", "--lens", "8", "-n", "3", "--stop", "a,b", "--stop", "\n",
                      "--no-graphs", "--no-chat"])
    cfg = from_args(_Lists, a)
    assert (cfg.ks, cfg.lens, cfg.n, cfg.stop, cfg.graphs, cfg.chat) == ((1, 4), (8,), 3, ("a,b", "\n"), False, False)
    assert from_args(_Lists, p.parse_args(["--from-file", "f", "--chat"])).chat is True
    for bad in ([], ["--model", "m", "--from-file", "f"]):
        with pytest.raises(SystemExit):
            p.parse_args(bad)  # one of the exclusive group, exactly
    text = p.format_help()
    assert "(--from-file FROM_FILE | --model MODEL)" in text and "--k K" in text and "-n N, --n N" in text
    assert "lengths (default 1,16)" in text and "--chat, --no-chat" in text and "--no-graphs" in text
    assert "turn graphs off\n" in text  # a switch's default is not printed


@pytest.mark.parametrize("cfg", [
    _Lists(model="m"),
    _Lists(model="m", ks=(1, 4, 16), lens=(8,), n=2, stop=("x", "a,b"), graphs=False, chat=True),
    _Lists(model="m", chat=False),
])
def test_to_argv_inverts_lists_and_switches(cfg):
    assert from_args(_Lists, _lists_parser().parse_args(to_argv(cfg))) == cfg


@pytest.mark.parametrize("argv,derived", [
    ([], (1, (1,), 0.0)),                            # one greedy sample
    (["-n", "8"], (8, (1, 8), 0.7)),                 # ks: 1 and n; sampling at 0.7
    (["--k", "4,1,4"], (4, (1, 4), 0.7)),            # n: the largest k
    (["-n", "16", "--k", "1,4"], (16, (1, 4), 0.7)),
    (["-n", "2", "--temperature", "0"], (2, (1, 2), 0.0)),  # an explicit value is kept (run_eval refuses it)
])
def test_eval_derived_defaults(argv, derived):
    """`m1 eval`'s -n, --k and --temperature default to each other, as they always did, and the
    Python API derives them the same way."""
    from m1.eval.run import EvalConfig

    cfg = from_args(EvalConfig, build_parser().parse_args(["eval", "--model", "m", *argv]))
    assert (cfg.n, cfg.ks, cfg.temperature) == derived
    assert EvalConfig(model="m") == EvalConfig(model="m", task="gsm8k", n=1, ks=(1,), temperature=0.0)


@pytest.mark.parametrize("kw", [{}, dict(task="arith:steps=2,digits=1", n=4, ks=(1, 2, 4), limit=40, temperature=0.9,
                                        top_p=0.95, max_new_tokens=96, few_shot=2, seed=3, dtype="bfloat16")])
def test_eval_cli_is_the_config(kw):
    """Every EvalConfig setting is a flag of `m1 eval` (-n, --k), and a config survives to_argv -> the
    real CLI parser -> from_args; --model and --from-samples exclude each other."""
    from m1.eval.run import EvalConfig

    cfg = EvalConfig(model="m", **kw)
    a = build_parser().parse_args(["eval", *to_argv(cfg), "--out", "o"])
    assert from_args(EvalConfig, a) == cfg and a.out == "o" and a.from_samples is None
    assert to_argv(EvalConfig(model="m", n=4)) == ["--model", "m", "-n", "4", "--k", "1,4", "--temperature", "0.7"]
    assert build_parser().parse_args(["eval", "--from-samples", "s.jsonl", "--k", "1,8"]).ks == "1,8"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--model", "m", "--from-samples", "s.jsonl"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval", "--task", "gsm8k"])  # neither


def test_eval_bad_k_and_temperature_are_one_line_errors():
    from m1.errors import M1Error
    from m1.eval.run import EvalConfig

    with pytest.raises(M1Error, match="--k 0,2: --k must be comma-separated positive integers"):
        EvalConfig(model="m", ks="0,2")
    with pytest.raises(M1Error, match="--temperature must be >= 0"):
        EvalConfig(model="m", temperature=-1.0)


@pytest.mark.parametrize("kw", [dict(shape="tiny"), dict(
    model="h", baseline="t", batches=(1, "max"), prompt_len=64, gen_lens=(128, 256), dtype="bfloat16", device="cuda",
    cuda_graphs=False, fused_decode=True, compile=True, ssm_dtype="model", contexts=(1024, 2048), steps=8,
    memory_gib=74.5, json_path="b.json", resume=True, plot_path="b2.png")])
def test_bench_cli_is_the_config(kw):
    """Every BenchSettings field is a flag of `m1 bench` (--batch, --gen-len, --context, --json, --plot,
    --no-cuda-graphs), and a config survives to_argv -> the real CLI parser -> from_args."""
    from m1.bench import BenchSettings

    cfg = BenchSettings(**kw)
    a = build_parser().parse_args(["bench", *to_argv(cfg)])
    assert from_args(BenchSettings, a) == cfg
    argv = to_argv(cfg)
    if cfg.model:
        assert "--no-cuda-graphs" in argv and argv[argv.index("--batch") + 1] == "1,max"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--shape", "tiny", "--model", "m"])


def test_bench_derived_plot_path_and_list_text():
    from m1.bench import BenchSettings
    from m1.errors import M1Error

    assert BenchSettings(shape="tiny").plot_file() is None
    assert BenchSettings(shape="tiny", json_path="runs/b.json").plot_file() == "runs/b.png"  # beside --json
    assert BenchSettings(shape="tiny", json_path="runs/b.json", plot_path="p.png").plot_file() == "p.png"
    assert BenchSettings(shape="tiny", batches="1, max", gen_lens=[64]).batches == (1, "max")
    with pytest.raises(M1Error, match="--context must be"):
        BenchSettings(shape="tiny", contexts="64,x")


def test_optional_text_stays_text():
    """"none" means None for an optional number only: a prompt, path or name is what was typed."""
    from m1.generate import GenerateSettings

    for text in ("none", ""):
        a = build_parser().parse_args(["generate", "--model", "m", "--prompt", text, "--output", text])
        assert (a.prompt, a.output) == (text, text)
    assert build_parser().parse_args(["bench", "--model", "none"]).model == "none"
    assert from_args(GenerateSettings, build_parser().parse_args(
        ["generate", "--model", "m", "--prompt", "hi", "--max-batch-size", "none"])).max_batch_size is None


@pytest.mark.parametrize("kw", [dict(prompt="hi"), dict(
    file="p.jsonl", n=8, temperature=0.0, top_p=0.9, top_k=5, min_p=0.05, max_new_tokens=64, seed=3,
    stop=("\n\n", "a,b"), ignore_eos=True, chat=False, vote=True, verifier="self", budget_seconds=30.0,
    output="s.jsonl", overwrite=True, backend="hf", device="cpu", dtype="bfloat16", max_batch_size=16, compile=True,
    cuda_graphs=False, fused_decode=True)])
def test_generate_cli_is_the_config(kw):
    """Every GenerateSettings field is a flag of `m1 generate` (-n/--n, repeated --stop, --chat/--no-chat,
    --no-cuda-graphs), and a config survives to_argv -> the real CLI parser -> from_args."""
    from m1.generate import GenerateSettings

    cfg = GenerateSettings(model="m", **kw)
    a = build_parser().parse_args(["generate", *to_argv(cfg)])
    assert from_args(GenerateSettings, a) == cfg
    a = build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "-n", "3", "--stop", "x", "--chat"])
    assert (a.n, a.stop, a.chat) == (3, ["x"], True)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--model", "m", "--prompt", "p", "--file", "f"])
