r"""Chat prompts for math problems.

One instruction for every task -- reason step by step, put the final answer
in ``\boxed{}`` -- because :func:`m1.eval.grading.extract_answer` looks for the last
box first, and because this is the wording Qwen2.5-Math / M1 evaluations use.
Instruct models get a single user turn.  Base models do much better with a few
solved examples first (``few_shot=k``): they are taken from the GSM8K train
split (for benchmark problems) or from the ``arith`` train split (for arith
problems), never from a test split, and their solutions already end in
``\boxed{N}``, so the model sees the answer format it must produce.
"""

from __future__ import annotations

import random
from functools import lru_cache

from .base import Problem

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def user_message(question: str, instruction: str = INSTRUCTION) -> str:
    return f"{question.strip()}\n\n{instruction}" if instruction else question.strip()


@lru_cache(maxsize=4)
def _gsm8k_train() -> tuple[Problem, ...]:
    from . import gsm8k
    return tuple(gsm8k.load("train"))


def few_shot_examples(problem: Problem | None, k: int, *, seed: int = 0,
                      source: str | None = None) -> list[Problem]:
    """``k`` solved examples for ``problem`` (deterministic for ``seed``).

    ``source`` is ``"gsm8k"`` or ``"arith"``; by default arith problems get
    arith examples with the same settings and everything else GSM8K ones.
    """
    if k <= 0:
        return []
    meta = problem.meta if problem is not None else {}
    if source is None:
        source = "arith" if problem is not None and problem.id.startswith("arith-") else "gsm8k"
    if source == "arith":
        from . import arith
        return arith.load("train", n=k, seed=1_000_003 + seed,
                          steps=meta.get("steps", 2), digits=meta.get("digits", 2),
                          ops=meta.get("ops", "+-*/"), negatives=meta.get("negatives", False))
    if source != "gsm8k":
        raise ValueError(f"few-shot source must be 'gsm8k' or 'arith', not {source!r}")
    pool = _gsm8k_train()
    idx = random.Random(seed).sample(range(len(pool)), k + 1)
    shots = [pool[i] for i in idx if problem is None or pool[i].question != problem.question]
    return shots[:k]


def build_messages(problem: Problem, few_shot: int = 0, *, system: str | None = None,
                   instruction: str = INSTRUCTION, seed: int = 0,
                   shots: list[Problem] | None = None) -> list[dict[str, str]]:
    """Chat messages asking for step-by-step reasoning and a boxed answer.

    ``few_shot`` solved examples (user/assistant pairs) precede the problem;
    pass ``shots`` to choose them yourself.  ``system`` adds a system turn
    (off by default: several small chat templates handle it poorly).
    """
    messages: list[dict[str, str]] = []
    if system:
        messages.append({"role": "system", "content": system})
    if shots is None:
        shots = few_shot_examples(problem, few_shot, seed=seed)
    for ex in shots:
        if not ex.solution:
            raise ValueError(f"few-shot example {ex.id!r} has no solution")
        messages.append({"role": "user", "content": user_message(ex.question, instruction)})
        messages.append({"role": "assistant", "content": ex.solution.strip()})
    messages.append({"role": "user", "content": user_message(problem.question, instruction)})
    return messages


def render_prompt(tokenizer, messages) -> list[int]:
    """Prompt token ids: the chat template when there is one (it carries its own special tokens)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    return list(tokenizer("\n\n".join(m["content"] for m in messages) + "\n").input_ids)
