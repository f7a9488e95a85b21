r"""``m1 grpo``: RL with verifiable math rewards (M1, stage 3), on TRL's GRPOTrainer.

The loop (TRL's): each optimizer step takes ``prompts_per_step`` problems, samples
``num_generations`` completions of each (the *group*, 8 by default), scores every completion, and
turns the scores into advantages relative to the group (reward minus the group mean, divided by the
group's standard deviation with ``scale_rewards="group"``). The policy-gradient loss on the
completion tokens is clipped PPO-style (``epsilon``) and aggregated per ``loss_type``:

* ``grpo``    -- the GRPO paper / M1: mean over each sequence's tokens, then over sequences;
* ``dr_grpo`` -- Dr. GRPO: sum over tokens divided by a constant (``max_completion_length``);
* ``dapo``    -- DAPO: mean over all tokens of the batch.

M1's choices are the defaults: **no KL term** (``beta=0``: no reference model is loaded at all) and
an **entropy bonus** (``entropy_coef``: the loss is ``L_policy - entropy_coef * H``, with ``H`` the
mean per-token entropy of the policy on the completion tokens; TRL >= 1.x implements it natively as
``GRPOConfig.entropy_coef``). The default coefficient 1e-3 is our choice, not a number from the
paper. With ``beta > 0`` TRL builds the reference model from ``config._name_or_path`` -- the
``--model`` directory as it is on disk -- so the policy must always be loaded from a saved
checkpoint (it is, here).

Rewards
-------
``accuracy`` (weight 1): 1.0 when the completion's final answer equals the gold answer according to
:func:`m1.eval.grading.check_many` -- the very checker ``m1 eval`` reports with (last ``\boxed{}``,
math-verify in worker processes with a hard timeout) -- else 0.0. Optionally ``format`` (weight
``format_reward``): 1.0 when the completion finished (ended with EOS) and its last ``\boxed{...}``
is closed. Python callers may pass their own ``reward_funcs`` (TRL's signature:
``f(prompts, completions, completion_ids, **columns) -> list[float]``).

Every reward function runs guarded (:class:`GuardedReward`): if it raises, or the built-in check
times out (worker killed), or a custom function overruns ``reward_timeout`` seconds, the affected
completions score 0, a warning names the problem, and the counts are reported (``reward_failures``
in the metrics). Completions that hit ``max_completion_length`` without an end-of-sequence token are
counted (``truncated`` per step, a total at the end); by default they are trained on like any other
(they usually score 0), ``mask_truncated=True`` leaves them out of the loss (DAPO).

Rollouts
--------
``rollout="auto"``: vLLM (``use_vllm``, colocated in the training process, or ``vllm_mode="server"``
with ``trl vllm-serve``) when ``vllm`` is importable and a CUDA GPU is present, else transformers'
``generate``. ``rollout="engine"`` samples with :class:`m1.engine.Engine` instead (prefill once per
problem, the group's ``num_generations`` rows share the prompt's state; the engine reads the live
weights, so nothing needs syncing) -- usually much faster than ``generate`` on CPU.

Files: as ``m1 sft`` (see :mod:`m1.train.sft`): ``<out>.work/`` holds ``checkpoints/checkpoint-N/`` (each
made complete by ``grpo_config.json``) and ``metrics.jsonl``; ``--resume`` continues an
unfinished run and refuses different settings; ``<out>`` is written atomically at the end as a
normal m1 checkpoint with ``m1.json`` ``stage: grpo``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..errors import M1Error
from ..model.checkpoint import check_fits_context, check_model_dir, eos_token_ids
from ..settings import setting
from .run import (CHECKPOINTS, METRICS_FILE, barrier, base_dtype, check_max_steps, default_micro_batch, finalize,
                  lineage_record, load_policy, make_divergence_guard, make_metrics_callback, model_fingerprint, on_cuda,
                  open_work_dir, prepare_run, quiet_trainer, quiet_transformers, read_metrics, resolve_precision,
                  run_state, set_mamba_chunk_size, train_guarded, with_checkpoint_marker, work_dir)

logger = logging.getLogger("m1.train.grpo")

GRPO_CONFIG_FILE = "grpo_config.json"
LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
ROLLOUTS = ("auto", "vllm", "hf", "engine")
SCALE_REWARDS = ("group", "batch", "none")
DEFAULT_ARITH_PROBLEMS = 1000


# =================================================================================================
# Rewards
# =================================================================================================
class RewardStats:
    """Running counts over a run: completions seen, truncated ones, reward failures (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.completions = 0
        self.truncated = 0
        self.failures = 0  # samples scored 0 because a reward raised or timed out
        self.timeouts = 0
        self.no_answer = 0
        self.examples: list[str] = []  # a few failure messages

    def note_failure(self, msg: str, n: int = 1, timeout: bool = False) -> None:
        with self.lock:
            self.failures += n
            if timeout:
                self.timeouts += n
            if len(self.examples) < 20:
                self.examples.append(msg)
        logger.warning(msg)

    def as_dict(self) -> dict:
        with self.lock:
            return {"completions_total": self.completions, "truncated_total": self.truncated,
                    "reward_failures_total": self.failures, "reward_timeouts_total": self.timeouts}


def _no_op(*args, **kwargs) -> None:
    return None


def completion_text(c) -> str:
    """The text of one TRL completion (a string, or a list of chat messages)."""
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c and isinstance(c[-1], dict):
        return "".join(str(m.get("content", "")) for m in c if m.get("role", "assistant") == "assistant")
    return str(c)


def _finished(ids, eos_ids: frozenset) -> bool:
    return bool(ids) and int(ids[-1]) in eos_ids


class AccuracyReward:
    r"""1.0 when the final answer matches ``answer`` (:func:`m1.eval.grading.check_many`, as ``m1 eval``), else 0.0.

    Logs ``accuracy`` and ``no_answer`` (fraction without an extractable answer) per batch. A check
    that times out or errors in the worker scores 0 and is reported as a reward failure.
    """

    __name__ = "accuracy"

    def __init__(self, stats: RewardStats, timeout: float = 5.0, workers: int | None = None):
        self.stats, self.timeout, self.workers = stats, float(timeout), workers

    def __call__(self, prompts, completions, answer=None, log_metric=None, problem_id=None, **kw):
        from ..eval.grading import check_many

        if answer is None:
            raise M1Error("the accuracy reward needs an 'answer' column in the training data")
        texts = [completion_text(c) for c in completions]
        verdicts = check_many(list(zip(texts, [str(a) for a in answer])), timeout=self.timeout,
                              workers=self.workers)
        scores = []
        for i, v in enumerate(verdicts):
            if v.status in ("timeout", "error"):
                pid = problem_id[i] if problem_id else i
                self.stats.note_failure(f"answer check {v.status} on problem {pid} (answer {str(v.pred)[:80]!r}): "
                                        "scored 0", timeout=v.status == "timeout")
            scores.append(1.0 if v.correct else 0.0)
        no_ans = sum(v.status == "no_answer" for v in verdicts)
        with self.stats.lock:
            self.stats.no_answer += no_ans
        if log_metric is not None and scores:
            log_metric("accuracy", sum(scores) / len(scores))
            log_metric("no_answer", no_ans / len(scores))
        return scores


def _closed_last_box(text: str) -> bool:
    """Whether the last ``\\boxed{`` in ``text`` has its closing brace."""
    i = text.rfind("\\boxed{")
    if i < 0:
        return False
    depth = 0
    for ch in text[i + len("\\boxed"):]:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return True
    return False


class FormatReward:
    r"""1.0 when the completion finished (ended with EOS) and its last ``\boxed{...}`` is closed, else 0.0."""

    __name__ = "format"

    def __init__(self, eos_ids):
        self.eos_ids = frozenset(eos_ids)

    def __call__(self, prompts, completions, completion_ids=None, **kw):
        texts = [completion_text(c) for c in completions]
        ids = completion_ids or [[]] * len(texts)
        return [1.0 if (_finished(c, self.eos_ids) and _closed_last_box(t)) else 0.0 for t, c in zip(texts, ids)]


class GuardedReward:
    """Run a reward function so that a failure costs the affected samples their reward, not the run.

    The batch call runs with a deadline (``timeout`` seconds per sample, at least ``timeout``); if it
    raises or overruns, each sample is retried alone with ``timeout``; a sample that still raises or
    overruns scores 0.0 and is reported through ``stats``. (A Python thread cannot be killed: an
    overrunning custom function keeps running in the background; the built-in answer check has its
    own hard, process-level timeout.) ``count_completions``: this instance also counts completions
    and truncated ones (exactly one guarded reward per run does).
    """

    def __init__(self, fn: Callable, stats: RewardStats, timeout: float | None = None, eos_ids=(),
                 count_completions: bool = False):
        from trl.trainer.utils import get_callable_name

        self.fn, self.stats, self.timeout = fn, stats, timeout
        self.eos_ids = frozenset(eos_ids)
        self.count_completions = count_completions
        self.__name__ = get_callable_name(fn)

    def _call(self, timeout, kwargs):
        if not timeout:
            return self.fn(**kwargs)
        box: dict = {}

        def target():
            try:
                box["out"] = self.fn(**kwargs)
            except BaseException as e:  # noqa: BLE001 - reported to the caller
                box["err"] = e

        t = threading.Thread(target=target, daemon=True, name=f"reward-{self.__name__}")
        t.start()
        t.join(timeout)
        if t.is_alive():
            raise TimeoutError(f"reward '{self.__name__}' ran over {timeout:g} s")
        if "err" in box:
            raise box["err"]
        return box["out"]

    def __call__(self, prompts, completions, completion_ids=None, log_metric=None, **kw):
        n = len(completions)
        if self.count_completions and completion_ids is not None:
            trunc = sum(not _finished(c, self.eos_ids) for c in completion_ids)
            with self.stats.lock:
                self.stats.completions += n
                self.stats.truncated += trunc
            if log_metric is not None and n:
                log_metric("truncated", trunc / n)
        kwargs = dict(prompts=prompts, completions=completions, completion_ids=completion_ids,
                      log_metric=log_metric, **kw)
        try:
            out = self._call(self.timeout * max(1, n) if self.timeout else None, kwargs)
            out = list(out)
            if len(out) != n:
                raise ValueError(f"returned {len(out)} rewards for {n} completions")
            return [self._clean(v, i) for i, v in enumerate(out)]
        except M1Error:
            raise
        except Exception as e:  # noqa: BLE001 - one bad batch must not end the run
            batch_error = f"{type(e).__name__}: {e}"
        logger.warning("reward '%s' failed on a batch (%s); scoring its %d samples one by one",
                       self.__name__, batch_error, n)
        scores = []
        ids = kw.get("problem_id") if isinstance(kw.get("problem_id"), list) else None
        for i in range(n):
            one = {k: ([v[i]] if isinstance(v, list) and len(v) == n else v) for k, v in kwargs.items()}
            one["log_metric"] = _no_op
            if "log_extra" in one:
                one["log_extra"] = _no_op
            try:
                v = list(self._call(self.timeout, one))
                if len(v) != 1:
                    raise ValueError(f"returned {len(v)} rewards for 1 completion")
                scores.append(self._clean(v[0], i))
            except M1Error:
                raise
            except Exception as e:  # noqa: BLE001
                pid = ids[i] if ids else f"#{i}"
                self.stats.note_failure(f"reward '{self.__name__}' failed on problem {pid}: {type(e).__name__}: "
                                        f"{str(e)[:200]}; scored 0", timeout=isinstance(e, TimeoutError))
                scores.append(0.0)
        return scores

    def _clean(self, v, i):
        if v is None:
            return None  # TRL: "not applicable" (NaN, ignored for this function)
        try:
            f = float(v)
        except (TypeError, ValueError):
            self.stats.note_failure(f"reward '{self.__name__}' returned a non-number ({v!r}) for sample {i}; scored 0")
            return 0.0
        if not math.isfinite(f):
            self.stats.note_failure(f"reward '{self.__name__}' returned {f} for sample {i}; scored 0")
            return 0.0
        return f


# =================================================================================================
# Problems
# =================================================================================================
@dataclass
class RLProblem:
    id: str
    question: str
    answer: str
    where: str
    meta: dict = field(default_factory=dict)  # a task's own fields (arith: steps, digits -> matching few-shot)


def _gold_from_row(row: dict, where: str) -> str:
    from ..eval.grading import extract_answer

    ans = row.get("answer")
    if isinstance(ans, bool):
        ans = None
    if isinstance(ans, (int, float)):
        ans = str(int(ans)) if float(ans).is_integer() else str(ans)
    if isinstance(ans, str) and ans.strip():
        if "####" in ans:  # a raw GSM8K row
            final = ans.rpartition("####")[2].strip().replace(",", "")
            if final:
                return final
        else:
            return ans.strip()
    sol = row.get("solution")
    if isinstance(sol, str) and sol.strip():
        got = extract_answer(sol)
        if got:
            return got
    raise M1Error(f"{where}: row has no answer: give an 'answer' (e.g. \"72\" or \"\\\\frac{{1}}{{2}}\"), or a "
                  "'solution' ending in \\boxed{...} / '#### N'; RL needs a gold answer to reward against")


def read_rl_jsonl(path: Path) -> list[RLProblem]:
    from .data import jsonl_objects

    out = []
    for n, where, row in jsonl_objects(path, "task", "give arith[:options], gsm8k, a task name or a .jsonl file"):
        if not isinstance(row, dict):
            raise M1Error(f"{where}: expected a JSON object, got {type(row).__name__}")
        q = next((row[k] for k in ("question", "problem", "prompt") if isinstance(row.get(k), str) and row[k].strip()),
                 None)
        if q is None:
            raise M1Error(f"{where}: row has no question: give a non-empty 'question' (or 'problem') string")
        out.append(RLProblem(id=str(row.get("id", f"{path.name}:{n}")), question=q, answer=_gold_from_row(row, where),
                             where=where))
    if not out:
        raise M1Error(f"task file {path} has no rows")
    return out


def load_rl_problems(task: str, limit: int | None = None, seed: int = 0) -> list[RLProblem]:
    """Problems with gold answers for ``--task`` (arith[:opts], gsm8k / gsm8k-train, a task, FILE.jsonl)."""
    from .data import is_file_spec, task_train_problems

    if not task or not str(task).strip():
        raise M1Error("--task is empty: give arith[:options], gsm8k, a task name or a .jsonl file")
    task = str(task).strip()
    if is_file_spec(task):
        problems = read_rl_jsonl(Path(task).expanduser())
        _check_golds(problems)
        return problems if limit is None else problems[:limit]
    name, loaded = task_train_problems(task, "--task", limit, seed, DEFAULT_ARITH_PROBLEMS, needs="RL")
    out = []
    for p in loaded:
        if p.answer is None or not str(p.answer).strip():
            raise M1Error(f"--task {task}: problem {p.id} has no answer; RL needs a gold answer for every problem")
        out.append(RLProblem(id=p.id, question=p.question, answer=str(p.answer), where=f"{name}:{p.id}",
                             meta=dict(p.meta or {})))
    if not out:
        raise M1Error(f"--task {task}: no problems (check --limit)")
    return out


def _check_golds(problems: list[RLProblem]) -> None:
    from ..eval.grading import gold_parses

    ok = gold_parses([p.answer for p in problems])
    bad = [p for p, good in zip(problems, ok) if not good]
    if bad:
        shown = "; ".join(f"{p.where}: {p.answer[:60]!r}" for p in bad[:3])
        raise M1Error(f"{len(bad)} gold answer(s) cannot be parsed by the answer checker ({shown}"
                      f"{' ...' if len(bad) > 3 else ''}): fix or drop those rows")


def to_rl_dataset(problems: list[RLProblem], few_shot: int = 0):
    """TRL conversational prompt dataset with the gold ``answer`` and ``problem_id`` columns."""
    from datasets import Dataset

    from ..tasks.base import Problem
    from ..tasks.prompts import build_messages

    rows = []
    for p in problems:
        msgs = build_messages(Problem(id=p.id, question=p.question, answer=p.answer, meta=p.meta), few_shot=few_shot)
        rows.append({"prompt": msgs, "answer": p.answer, "problem_id": p.id})
    return Dataset.from_list(rows)


# =================================================================================================
# Settings
# =================================================================================================
@dataclass
class GRPOSettings:
    """Every setting of a GRPO run; saved as ``grpo_config.json`` in each checkpoint and in the output.
    The `m1 grpo` flags are generated from these fields (m1.settings)."""
    model: str = setting(help="checkpoint directory to train (usually from m1 sft)", group="what")
    task: str = setting("arith", "arith[:opts], gsm8k, TASK[:opts] or FILE.jsonl", group="what")
    limit: int | None = setting(None, "use at most this many problems (arith: default 1000)", group="what")
    few_shot: int = setting(0, "solved examples before each problem", group="what")
    num_generations: int = setting(8, "completions per problem, the group", group="GRPO")
    prompts_per_step: int = setting(4, "problems per optimizer step over all processes", group="GRPO")
    loss_type: str = setting("grpo", "grpo (per-sequence mean, M1), dr_grpo (constant normaliser), dapo (token mean)",
                             choices=LOSS_TYPES, group="GRPO")
    beta: float = setting(0.0, "KL coefficient; 0 = no KL term and no reference model (M1)", group="GRPO")
    entropy_coef: float = setting(1e-3, "entropy bonus: loss - coef x mean token entropy (0 = off)", group="GRPO")
    epsilon: float = setting(0.2, "PPO clip range", group="GRPO")
    epsilon_high: float | None = setting(None, "upper clip (DAPO: 0.28; default = epsilon)", group="GRPO")
    num_iterations: int = setting(1, "updates per generated batch", group="GRPO")
    scale_rewards: str = setting("group", "divide advantages by the group / batch reward std, or not (Dr. GRPO)",
                                 choices=SCALE_REWARDS, group="GRPO")
    format_reward: float = setting(0.0, "weight of a reward for a finished completion with a closed \\boxed{} "
                                   "(0 = off)", group="GRPO")
    mask_truncated: bool = setting(False, "leave completions that hit --max-completion-length out of the loss (DAPO)",
                                   group="GRPO")
    reward_timeout: float = setting(5.0, "seconds per answer check / per sample of a custom reward", group="GRPO")
    max_completion_length: int = setting(512, "new tokens per completion", group="sampling")
    temperature: float = setting(1.0, "sampling temperature", group="sampling")
    top_p: float = setting(1.0, "nucleus sampling (1 = off)", group="sampling")
    top_k: int = setting(0, "top-k sampling (0 = off)", group="sampling")
    rollout: str = setting("auto", "auto = vllm on a CUDA machine with vllm installed, else hf (transformers "
                           "generate); engine = m1's batched sampler", choices=ROLLOUTS, group="sampling")
    vllm_mode: str = setting("colocate", "vllm in the training process (default) or a `trl vllm-serve` server",
                             choices=("colocate", "server"), group="sampling")
    vllm_gpu_memory_utilization: float = setting(0.3, "GPU memory fraction for colocated vLLM", group="sampling")
    max_steps: int = setting(200, "optimizer steps (<= 0: use --epochs)", group="budget and optimizer")
    epochs: float = setting(1.0, "passes over the problems when --max-steps <= 0", group="budget and optimizer")
    micro_batch_size: int | None = setting(None, "completions per forward per process; the rest is accumulation "
                                           "(default: the largest divisor of the completions per process <= 4 on "
                                           "CPU, <= 8 on CUDA)", group="budget and optimizer")
    learning_rate: float = setting(1e-6, "learning rate", flag="--lr", group="budget and optimizer")
    lr_scheduler: str = setting("constant", "transformers scheduler name", group="budget and optimizer")
    warmup_ratio: float = setting(0.0, "warm-up fraction of the steps", group="budget and optimizer")
    weight_decay: float = setting(0.0, "AdamW weight decay", group="budget and optimizer")
    max_grad_norm: float = setting(1.0, "gradient clipping", group="budget and optimizer")
    seed: int = setting(0, "seed for sampling, data order and arith problems", group="budget and optimizer")
    bf16: str = setting("auto", "bf16 mixed precision: auto = on a CUDA GPU that supports it, else float32; "
                        "on = also on a CPU with AVX512-BF16/AMX", choices=("auto", "on", "off"), group="hardware")
    gradient_checkpointing: bool = setting(False, "recompute activations (saves memory)", group="hardware")
    mamba_chunk_size: int | None = setting(None, "Mamba2 scan chunk while training (default: 64 on CPU, the "
                                           "model's own on GPU)", group="hardware")
    save_steps: int = setting(50, "steps between checkpoints", group="run")
    save_total_limit: int = setting(2, "checkpoints kept (at least 2)", group="run")
    logging_steps: int = setting(1, "steps between progress/metrics rows", group="run")
    reward_funcs: list = field(default_factory=list)  # names of custom reward functions (Python API only)

    def validate(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise M1Error(f"--loss-type must be one of {', '.join(LOSS_TYPES)}, got '{self.loss_type}'")
        if self.rollout not in ROLLOUTS:
            raise M1Error(f"--rollout must be one of {', '.join(ROLLOUTS)}, got '{self.rollout}'")
        if self.scale_rewards not in SCALE_REWARDS:
            raise M1Error(f"--scale-rewards must be one of {', '.join(SCALE_REWARDS)}, got '{self.scale_rewards}'")
        if self.vllm_mode not in ("colocate", "server"):
            raise M1Error(f"--vllm-mode must be colocate or server, got '{self.vllm_mode}'")
        if self.num_generations < 2:
            raise M1Error(f"--num-generations must be >= 2 (advantages are relative to the group), "
                          f"got {self.num_generations}")
        for name in ("prompts_per_step", "max_completion_length", "save_steps", "logging_steps", "num_iterations"):
            if getattr(self, name) < 1:
                raise M1Error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise M1Error(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}")
        if self.limit is not None and self.limit < 1:
            raise M1Error(f"--limit must be >= 1, got {self.limit}")
        check_max_steps(self.max_steps)
        if self.max_steps <= 0 and self.epochs <= 0:
            raise M1Error("give a training budget: --max-steps N or --epochs > 0")
        if self.learning_rate <= 0 or not math.isfinite(self.learning_rate):
            raise M1Error(f"--lr must be > 0, got {self.learning_rate}")
        if self.temperature <= 0:
            raise M1Error(f"--temperature must be > 0 for RL sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise M1Error(f"--top-p must be in (0, 1], got {self.top_p}")
        for name in ("beta", "entropy_coef", "format_reward", "epsilon"):
            if getattr(self, name) < 0:
                raise M1Error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.reward_timeout <= 0:
            raise M1Error(f"--reward-timeout must be > 0, got {self.reward_timeout}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise M1Error(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.save_total_limit < 1:
            raise M1Error(f"--save-total-limit must be >= 1, got {self.save_total_limit}")


# settings that may change between a run and its --resume: they change neither the data nor the update
GRPO_RESUME_NEUTRAL = ("save_steps", "save_total_limit", "logging_steps", "rollout", "vllm_mode",
                       "vllm_gpu_memory_utilization", "micro_batch_size", "mamba_chunk_size")


@dataclass
class GRPOResult:
    out: Path
    steps: int
    seconds: float
    stats: dict
    metrics: list[dict] = field(default_factory=list)


GRPO_COLUMNS = [("reward", "reward"), ("accuracy", "acc"), ("entropy", "entropy"),
                ("completions/mean_length", "len"), ("truncated", "trunc"), ("kl", "kl"), ("loss", "loss"),
                ("grad_norm", "grad")]


def resolve_rollout(rollout: str) -> str:
    """``auto`` -> ``vllm`` when vllm is importable and CUDA is available, else ``hf``."""
    import importlib.util

    has_vllm = importlib.util.find_spec("vllm") is not None
    if rollout == "auto":
        return "vllm" if (has_vllm and on_cuda()) else "hf"
    if rollout == "vllm":
        if not has_vllm:
            raise M1Error("--rollout vllm: vllm is not installed (pip install vllm, on a CUDA machine); "
                          "use --rollout hf or engine")
        if not on_cuda():
            raise M1Error("--rollout vllm needs a CUDA GPU; use --rollout hf or engine here")
    return rollout


def engine_rollout(max_batch_size: int | None = None):
    """A TRL ``rollout_func`` sampling with :class:`m1.engine.Engine` on the live policy weights.

    Identical consecutive prompts (TRL repeats each problem ``num_generations`` times) are prefilled
    once and sampled as one request with ``n`` samples.
    """
    import random

    from ..engine import Engine, SamplingParams

    def rollout(prompts, trainer):
        tok = trainer.processing_class
        model = trainer.accelerator.unwrap_model(trainer.model)
        was_training = model.training
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) if isinstance(p, list)
                 else p for p in prompts]
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        groups: list[tuple[list[int], int]] = []
        for x in ids:
            if groups and groups[-1][0] == x:
                groups[-1] = (x, groups[-1][1] + 1)
            else:
                groups.append((x, 1))
        args = trainer.args
        base = random.Random(f"{args.seed}-{trainer.state.global_step}-{trainer.accelerator.process_index}")
        params = [SamplingParams(n=n, max_new_tokens=args.max_completion_length, temperature=args.temperature,
                                 top_p=args.top_p, top_k=args.top_k or 0, seed=base.randrange(1 << 40))
                  for _, n in groups]
        eng = Engine(model, tok, max_batch_size=max_batch_size)
        try:
            outs = eng.generate([g[0] for g in groups], params)
        finally:
            eng.release()  # the training step needs that memory back
            model.train(was_training)
        prompt_ids, completion_ids = [], []
        for (p_ids, _), o in zip(groups, outs):
            for c in o.completions:
                prompt_ids.append(list(p_ids))
                completion_ids.append(list(c.token_ids))
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}

    return rollout


# =================================================================================================
# GRPO
# =================================================================================================
def grpo(cfg: GRPOSettings, out: str | Path, *, resume: bool = False, force: bool = False,
         keep_checkpoints: bool = False, reward_funcs: list[Callable] | None = None,
         reward_weights: list[float] | None = None, log: Callable[[str], None] = print,
         callbacks: list | None = None) -> GRPOResult:
    """RL-train ``cfg.model`` on ``cfg.task`` with GRPO and write the result to ``out``; see the module
    docstring.

    ``reward_funcs`` (Python API): TRL-style reward functions replacing the built-in accuracy (+ format)
    rewards, with ``reward_weights``; their names are recorded in the saved settings. Every user-facing
    problem raises :class:`M1Error`, before anything is loaded.
    """
    if cfg.reward_funcs:
        raise M1Error("pass reward functions as grpo(cfg, out, reward_funcs=[f, ...]), not in the settings")
    from trl.trainer.utils import get_callable_name

    cfg = replace(cfg, model=str(cfg.model), task=str(cfg.task),  # paths welcome; the record is JSON
                  reward_funcs=[get_callable_name(f) for f in (reward_funcs or [])])
    cfg.validate()
    if reward_weights is not None and len(reward_weights) != len(reward_funcs or []):
        raise M1Error(f"{len(reward_weights)} reward weights for {len(reward_funcs or [])} reward functions")
    out = Path(out)
    base = check_model_dir(cfg.model)
    check_fits_context(base, cfg.max_completion_length, "--max-completion-length")
    settings = {**asdict(cfg), "reward_weights": reward_weights, "model_fingerprint": model_fingerprint(base)}
    ckpt = prepare_run(out, settings, stage="grpo", marker=GRPO_CONFIG_FILE, neutral=GRPO_RESUME_NEUTRAL,
                       resume=resume, force=force)
    barrier()  # every process has checked the directories before the main one writes anything
    rollout = resolve_rollout(cfg.rollout)
    undo = quiet_transformers()
    try:
        return _grpo(cfg, settings, base, out, ckpt, force, keep_checkpoints, reward_funcs, reward_weights,
                     rollout, log, callbacks or [])
    finally:
        undo()


def build_grpo_trainer(cfg: GRPOSettings, settings: dict, model, tokenizer, dataset, work: Path, *,
                       rewards: list, weights: list[float], rollout: str, num_processes: int, callbacks: list):
    """The TRL ``GRPOTrainer`` of an m1 run."""
    from trl import GRPOConfig, GRPOTrainer

    completions = cfg.prompts_per_step * cfg.num_generations
    if completions % num_processes:
        raise M1Error(f"--prompts-per-step {cfg.prompts_per_step} x --num-generations {cfg.num_generations} = "
                      f"{completions} completions per step must split evenly over {num_processes} processes")
    per_process = completions // num_processes
    micro = cfg.micro_batch_size or default_micro_batch(per_process, on_cuda())
    if per_process % micro:
        raise M1Error(f"--micro-batch-size {micro} must divide the {per_process} completions per process and step")
    kw = {}
    if rollout == "vllm":
        kw.update(use_vllm=True, vllm_mode=cfg.vllm_mode, vllm_gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)
    args = GRPOConfig(
        output_dir=str(work / CHECKPOINTS),
        max_steps=cfg.max_steps if cfg.max_steps > 0 else -1,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=per_process // micro,  # one generation batch per optimizer step
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        beta=cfg.beta,
        entropy_coef=cfg.entropy_coef,
        loss_type=cfg.loss_type,
        epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high,
        num_iterations=cfg.num_iterations,
        scale_rewards=cfg.scale_rewards,
        mask_truncated_completions=cfg.mask_truncated,
        reward_weights=weights,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=resolve_precision(cfg.bf16),
        fp16=False,
        activation_checkpointing=cfg.gradient_checkpointing,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=max(2, cfg.save_total_limit),
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=on_cuda(),
        use_cpu=not on_cuda(),
        router_aux_loss_coef=0.0,  # GraniteMoeHybrid has the attribute but no experts
        log_completions=False,
        **kw,
    )
    trainer_cls = with_checkpoint_marker(GRPOTrainer, GRPO_CONFIG_FILE,
                                         lambda tr: {"stage": "grpo", "settings": settings})
    trainer = trainer_cls(model=model, reward_funcs=rewards, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=callbacks,
                          rollout_func=engine_rollout() if rollout == "engine" else None)
    return quiet_trainer(trainer)


def _grpo(cfg, settings, base, out, ckpt, force, keep_checkpoints, reward_funcs, reward_weights, rollout,
          log, callbacks) -> GRPOResult:
    import os

    state = run_state()
    main = state.is_main_process
    say = log if main else (lambda *a, **k: None)
    work = work_dir(out)

    problems = load_rl_problems(cfg.task, cfg.limit, cfg.seed)
    dataset = to_rl_dataset(problems, cfg.few_shot)
    model, tokenizer = load_policy(base, say)
    set_mamba_chunk_size(model, cfg.mamba_chunk_size)
    eos = eos_token_ids(model, tokenizer)
    stats = RewardStats()
    if reward_funcs:
        rewards = [GuardedReward(f, stats, cfg.reward_timeout, eos, count_completions=(i == 0))
                   for i, f in enumerate(reward_funcs)]
        weights = list(reward_weights) if reward_weights is not None else [1.0] * len(rewards)
    else:
        # the built-in check has its own per-check hard timeout in worker processes
        rewards = [GuardedReward(AccuracyReward(stats, cfg.reward_timeout), stats, None, eos, count_completions=True)]
        weights = [1.0]
        if cfg.format_reward > 0:
            rewards.append(GuardedReward(FormatReward(eos), stats, cfg.reward_timeout, eos))
            weights.append(cfg.format_reward)
    say(f"grpo {base} on {cfg.task}: {len(problems):,} problems; {cfg.prompts_per_step} problems x "
        f"{cfg.num_generations} completions per step, max {cfg.max_completion_length} new tokens; "
        f"loss {cfg.loss_type}, beta {cfg.beta:g}, entropy bonus {cfg.entropy_coef:g}, lr {cfg.learning_rate:g}; "
        f"rewards {', '.join(f'{r.__name__} x{w:g}' for r, w in zip(rewards, weights))}; rollouts: {rollout}")

    if main:
        open_work_dir(work, ckpt, GRPO_CONFIG_FILE, {"stage": "grpo", "settings": settings}, say)
    state.wait_for_everyone()

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func (--rollout engine) is "experimental"
    metrics_cb = make_metrics_callback(work / METRICS_FILE, say, GRPO_COLUMNS, stats=stats.as_dict)
    guard = make_divergence_guard()
    trainer = build_grpo_trainer(cfg, settings, model, tokenizer, dataset, work, rewards=rewards, weights=weights,
                                 rollout=rollout, num_processes=state.num_processes,
                                 callbacks=[metrics_cb, guard, *callbacks])
    t0 = time.perf_counter()
    train_guarded(trainer, guard, work, GRPO_CONFIG_FILE, ckpt)
    seconds = time.perf_counter() - t0
    rows = read_metrics(work / METRICS_FILE)
    totals = stats.as_dict()
    if state.num_processes > 1:  # each process counted its own completions
        from accelerate.utils import gather_object

        every = gather_object([totals])
        totals = {k: sum(t[k] for t in every) for k in totals}
    if totals["truncated_total"]:
        say(f"{totals['truncated_total']} of {totals['completions_total']} completions never finished "
            f"(hit --max-completion-length {cfg.max_completion_length}) in this session")
    if totals["reward_failures_total"]:
        say(f"{totals['reward_failures_total']} completions scored 0 because a reward failed or timed out "
            f"({totals['reward_timeouts_total']} timeouts); first: {stats.examples[0]}")
    section = {"settings": settings, "task": {"spec": cfg.task, "problems": len(problems)},
               "steps": trainer.state.global_step, "seconds": round(seconds, 1), "processes": state.num_processes,
               "rollout": rollout, "rewards": [r.__name__ for r in rewards], "reward_weights": weights,
               "session_counts": totals,
               "last_log": next((r for r in reversed(rows) if "reward" in r), None)}
    record = lineage_record(base, "grpo", section)
    finalize(trainer, out, tokenizer=tokenizer, record=record, force=force, save_dtype=base_dtype(base),
             extra_files={GRPO_CONFIG_FILE: work / GRPO_CONFIG_FILE, "grpo_metrics.jsonl": work / METRICS_FILE},
             log=say)
    if main and not keep_checkpoints:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return GRPOResult(out=out, steps=trainer.state.global_step, seconds=seconds, stats=totals, metrics=rows)
