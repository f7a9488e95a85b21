"""Test-time scaling: majority vote, verifier-weighted vote, best-of-N, and sampling to a time budget.

* :func:`majority_vote` -- extract each sample's final answer (:func:`m1.eval.grading.extract_answer`),
  group equal answers (:func:`m1.eval.grading.answer_key`, so ``1,080`` and ``1080`` are one vote; with a
  checker also answers it calls equivalent, as ``m1 eval``'s maj@k does), and return the largest group. Ties go to the answer seen first; samples without an answer do not vote.
* :func:`weighted_vote` -- the same groups, each weighted by the sum of its samples' verifier scores.
* :func:`best_of_n` -- the single sample with the highest verifier score (ties: the first).
* Verifiers: :class:`RewardModel` (an ``AutoModelForSequenceClassification`` directory with a scalar
  head, scoring prompt + completion) or :class:`SelfVerifier` (the policy's own probability of "Yes"
  when asked "Is this solution correct?"). :func:`load_verifier` picks one from a spec.
* :func:`sample_until_budget` -- keep sampling a prompt in rounds until a wall-clock budget is spent,
  recording when each sample (and its answer) arrived, so accuracy can be read off at any time
  ``t <= budget`` with :meth:`BudgetResult.vote`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

from ..errors import M1Error


# ------------------------------------------------------------------------------------ voting
@dataclass
class VoteGroup:
    answer: str  # first-seen spelling
    key: str
    count: int
    weight: float
    first: int  # index of the first sample with this answer
    members: list[int] = field(default_factory=list)


@dataclass
class Vote:
    """Result of a vote: the winning answer (None when no sample had one) and every group."""
    answer: str | None
    count: int
    weight: float
    groups: list[VoteGroup]
    answers: list[str | None]

    def as_dict(self) -> dict:
        return {"answer": self.answer, "count": self.count, "weight": self.weight,
                "votes": {g.answer: g.count for g in self.groups}}


def extract_answers(texts: Sequence[str]) -> list[str | None]:
    """Final answer of each completion (:func:`m1.eval.grading.extract_answer`), None where there is none."""
    from .grading import extract_answer

    return [extract_answer(t) for t in texts]


def _vote(answers: Sequence[str | None], weights: Sequence[float], checker=None) -> Vote:
    """Groups from :func:`m1.eval.evaluate.vote_labels` and the winner from :func:`m1.eval.metrics.vote_winner`:
    the same grouping and tie rule as ``m1 eval``'s maj@k, so both elect the same answer."""
    from .evaluate import vote_labels
    from .grading import answer_key
    from .metrics import vote_winner

    labels = vote_labels(list(answers), None, checker)
    groups: dict[int, VoteGroup] = {}
    for i, (a, g, w) in enumerate(zip(answers, labels, weights)):
        if g is None:
            continue
        if g not in groups:
            groups[g] = VoteGroup(answer=a, key=answer_key(a), count=0, weight=0.0, first=i)
        groups[g].count += 1
        groups[g].weight += float(w)
        groups[g].members.append(i)
    ordered = sorted(groups.values(), key=lambda grp: grp.first)
    win = vote_winner(labels, range(len(labels)), list(weights))
    if win is None:
        return Vote(None, 0, 0.0, [], list(answers))
    best = groups[labels[win]]
    return Vote(best.answer, best.count, best.weight, ordered, list(answers))


def majority_vote(texts: Sequence[str] | None = None, *, answers: Sequence[str | None] | None = None,
                  checker=None) -> Vote:
    """Most common final answer among ``texts`` (or already extracted ``answers``); ties -> first seen.
    With a :class:`m1.eval.grading.Checker`, answers it calls equivalent (``x+1``, ``1+x``) are one vote."""
    if answers is None:
        if texts is None:
            raise ValueError("give texts or answers")
        answers = extract_answers(texts)
    return _vote(answers, [1.0] * len(answers), checker)


def weighted_vote(texts: Sequence[str] | None, scores: Sequence[float], *,
                  answers: Sequence[str | None] | None = None, checker=None) -> Vote:
    """Answer with the largest total verifier score; ``count`` is still the number of its samples."""
    if answers is None:
        answers = extract_answers(texts or [])
    if len(scores) != len(answers):
        raise M1Error(f"got {len(scores)} scores for {len(answers)} samples")
    return _vote(answers, scores, checker)


def best_of_n(texts: Sequence[str], scores: Sequence[float]) -> tuple[int, str, float]:
    """(index, text, score) of the highest-scoring sample; ties go to the first."""
    if not texts:
        raise M1Error("best-of-N needs at least one sample")
    if len(scores) != len(texts):
        raise M1Error(f"got {len(scores)} scores for {len(texts)} samples")
    best = 0
    for i in range(1, len(texts)):
        if scores[i] > scores[best]:
            best = i
    return best, texts[best], float(scores[best])


# --------------------------------------------------------------------------------- verifiers
class RewardModel:
    """A reward model directory (``AutoModelForSequenceClassification`` with one output) as verifier.

    Each (prompt, completion) is rendered with the reward model's chat template when it has one
    (user: prompt, assistant: completion), else as ``prompt + "\\n" + completion``, and scored alone
    (no padding, so any pad-token convention of the reward model is irrelevant).
    """

    def __init__(self, directory, device: str | None = None, dtype=None, max_length: int | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from ..model.checkpoint import check_model_dir

        d = check_model_dir(directory)
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(d, dtype=dtype or "auto").eval()
            self.tokenizer = AutoTokenizer.from_pretrained(d)
        except Exception as e:
            raise M1Error(f"cannot load a reward model from {d}: {type(e).__name__}: {str(e)[:200]}") from None
        if getattr(self.model.config, "num_labels", 1) != 1:
            raise M1Error(f"{d} has {self.model.config.num_labels} labels: a reward model needs a scalar head (num_labels=1)")
        if device:
            self.model.to(device)
        self.max_length = max_length

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        import torch

        tok = self.tokenizer
        dev = next(self.model.parameters()).device
        out = []
        with torch.inference_mode():
            for p, c in zip(prompts, completions):
                if getattr(tok, "chat_template", None):
                    text = tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                                                   tokenize=False)
                    enc = tok(text, add_special_tokens=False, return_tensors="pt")
                else:
                    enc = tok(p + "\n" + c, return_tensors="pt")
                ids = enc["input_ids"]
                if self.max_length and ids.shape[1] > self.max_length:
                    ids = ids[:, -self.max_length:]
                logits = self.model(input_ids=ids.to(dev)).logits
                out.append(float(logits.reshape(-1)[0]))
        return out


class SelfVerifier:
    """The policy as its own verifier: P(Yes) / (P(Yes) + P(No)) for the next token after asking
    "Is this solution correct?" about the problem and the proposed solution (chat template if any).
    Token variants ("Yes", " Yes", "yes", ...) are summed; a spelling that is several tokens counts
    by its first token (first tokens shared by a Yes and a No spelling are dropped)."""

    QUESTION = "Is this solution correct? Answer Yes or No."

    def __init__(self, engine, question: str | None = None, batch_size: int = 8):
        self.engine = engine
        self.question = question or self.QUESTION
        self.batch_size = batch_size
        tok = engine.tokenizer
        yes = self._variants(tok, ["Yes", " Yes", "yes", " yes", "YES"])
        no = self._variants(tok, ["No", " No", "no", " no", "NO"])
        self.yes, self.no = sorted(yes - no), sorted(no - yes)
        if not self.yes or not self.no:
            raise M1Error("the tokenizer cannot tell 'Yes' from 'No' by their first token: the self-verifier cannot score")

    @staticmethod
    def _variants(tok, words) -> set[int]:
        """First token of each spelling (the whole word for any real tokenizer)."""
        ids = set()
        for w in words:
            enc = tok(w, add_special_tokens=False)["input_ids"]
            if enc:
                ids.add(enc[0])
        return ids

    def _prompt(self, problem: str, solution: str) -> list[int]:
        tok = self.engine.tokenizer
        content = f"Problem:\n{problem}\n\nProposed solution:\n{solution}\n\n{self.question}"
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True)
            return list(tok(text, add_special_tokens=False)["input_ids"])
        return list(tok(content + "\nAnswer:")["input_ids"])

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        import torch

        ids = [self._prompt(p, c) for p, c in zip(prompts, completions)]
        limit = self.engine.max_context
        ids = [x[-(limit - 1):] for x in ids]
        out = []
        for b in range(0, len(ids), self.batch_size):
            logits = self.engine.next_token_logits(ids[b:b + self.batch_size])
            probs = torch.softmax(logits, dim=-1)
            py = probs[:, self.yes].sum(-1)
            pn = probs[:, self.no].sum(-1)
            out.extend((py / (py + pn).clamp_min(1e-30)).tolist())
        return out


def load_verifier(spec: str, engine=None):
    """``"self"`` -> :class:`SelfVerifier` over ``engine``; a directory -> :class:`RewardModel`."""
    if spec == "self":
        if engine is None:
            raise M1Error("the self-verifier needs the policy engine")
        return SelfVerifier(engine)
    return RewardModel(spec, device=str(engine.device) if engine is not None and hasattr(engine, "device") else None)


# ------------------------------------------------------------------------------- time budget
@dataclass
class BudgetSample:
    text: str
    answer: str | None
    num_tokens: int
    arrival: float  # seconds since the start of sample_until_budget
    finish_reason: str
    seed: int | None
    round: int


@dataclass
class BudgetResult:
    prompt: str | list[int]
    budget_seconds: float
    elapsed: float
    rounds: int
    samples: list[BudgetSample]

    def completed(self, at: float | None = None) -> list[BudgetSample]:
        """Finished samples (not cut by the budget) that arrived by ``at`` seconds (default: the budget)."""
        t = self.budget_seconds if at is None else at
        return [s for s in self.samples if s.finish_reason != "budget" and s.arrival <= t]

    def vote(self, at: float | None = None, checker=None) -> Vote:
        """Majority vote over the samples that had arrived ``at`` seconds after the start."""
        return majority_vote(answers=[s.answer for s in self.completed(at)], checker=checker)

    def as_dict(self, checker=None) -> dict:
        v = self.vote(checker=checker)
        return {"budget_seconds": self.budget_seconds, "elapsed": round(self.elapsed, 4), "rounds": self.rounds,
                "vote": v.answer, "votes": {g.answer: g.count for g in v.groups},
                "completions": [s.text for s in self.samples], "answers": [s.answer for s in self.samples],
                "num_tokens": [s.num_tokens for s in self.samples],
                "arrival_seconds": [round(s.arrival, 4) for s in self.samples],
                "finish_reasons": [s.finish_reason for s in self.samples], "seeds": [s.seed for s in self.samples]}


def sample_until_budget(engine, prompt, budget_seconds: float, params=None, *, round_size: int | None = None,
                        chat: bool = False, on_round=None) -> BudgetResult:
    """Sample ``prompt`` in rounds of ``round_size`` until ``budget_seconds`` of wall clock are spent.

    Sample k (over all rounds) uses seed ``params.seed + k``, so the sequence of samples is
    reproducible. The last round is cut at the budget: its unfinished samples are kept with
    finish_reason "budget" and do not vote. ``arrival`` is when each sample finished, in seconds
    since the call started.
    """
    from ..engine import SamplingParams

    if not budget_seconds or budget_seconds <= 0:
        raise M1Error(f"the time budget must be positive seconds, got {budget_seconds}")
    base = params or SamplingParams()
    base.validate()
    size = round_size or base.n
    if size < 1:
        raise M1Error(f"round size must be at least 1, got {size}")
    seed0 = base.seed if base.seed is not None else int(time.time_ns() % (1 << 40))
    start = time.perf_counter()
    deadline = start + budget_seconds
    samples: list[BudgetSample] = []
    rounds = 0
    while time.perf_counter() < deadline:
        sp = SamplingParams(**{**base.__dict__, "n": size, "seed": seed0 + len(samples)})
        out = engine.generate([prompt], sp, chat=chat, deadline=deadline)[0]
        texts = [c.text for c in out.completions]
        answers = extract_answers(texts)
        for c, a in zip(out.completions, answers):
            samples.append(BudgetSample(text=c.text, answer=a if c.finish_reason != "budget" else None,
                                        num_tokens=c.num_tokens, arrival=c.finished_at - start,
                                        finish_reason=c.finish_reason, seed=c.seed, round=rounds))
        rounds += 1
        if on_round is not None:
            on_round(rounds, samples)
    return BudgetResult(prompt=prompt, budget_seconds=float(budget_seconds), elapsed=time.perf_counter() - start,
                        rounds=rounds, samples=samples)
