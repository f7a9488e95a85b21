"""The batches of ``m1 distill --stage onpolicy``: the student's own samples for task prompts, drawn with m1's
engine (:class:`Rollouts`); and the loss spans of a row (prompt excluded), which every kd stage uses."""

from __future__ import annotations

import time

from ..errors import M1Error


def loss_span(length: int, prompt_len: int) -> tuple[int, int]:
    """Positions [lo, hi) of a row that carry the kd loss: every token of a text row (prompt_len 0, as
    before task data existed), else the positions that predict a completion token."""
    return (0, length) if prompt_len <= 0 else (prompt_len - 1, length - 1)


def span_mask(spans, width: int):
    """(rows, width) float mask that is 1 on each row's [lo, hi)."""
    import torch

    pos = torch.arange(width)
    lo = torch.tensor([a for a, _ in spans]).unsqueeze(1)
    hi = torch.tensor([b for _, b in spans]).unsqueeze(1)
    return ((pos >= lo) & (pos < hi)).float()


class Rollouts:
    """The onpolicy stage's batches: the student's own samples for task prompts (GKD, Agarwal et al. 2024).

    At step ``k`` the ``batch_size / num_samples`` prompts of batch ``k`` of a prompt stream (a pure
    function of (seed, k), like :class:`m1.train.data.BatchPlan`) are prefilled once and sampled
    ``num_samples`` times each by m1's engine, with seeds derived from (seed, k): a resumed run
    samples exactly what the killed one would have. The loss is then the kd loss of the configured
    ``loss`` (reverse KL: M1's and GKD's on-policy choice) on the sampled completion tokens only.
    With ``lmbda < 1`` a step is on-policy with probability ``lmbda`` (drawn from (seed, k)), else it
    trains on the data's reference completions (GKD's mix).

    Why not TRL's ``GKDTrainer``: it samples with ``model.generate``, which for this hybrid runs HF's
    unbatched-state Mamba path (~23 tok/s at batch 1 on the 2-core CPU), while m1's engine prefills once
    and decodes all rows together; and this loop already has the resume, NaN and chunked-loss machinery
    that a second trainer would duplicate.
    """

    def __init__(self, student, tokenizer, data, cfg, contexts: tuple[int, ...]):
        self.student, self.tokenizer, self.cfg = student, tokenizer, cfg
        self.rows = [i for i, n in enumerate(data.prompt_lens) if n > 0]
        self.prompts = [data.train[i][:data.prompt_lens[i]] for i in self.rows]
        if not self.rows:
            raise M1Error("--stage onpolicy: no training row has a prompt (give a training task as --data)")
        longest, limit = max(len(p) for p in self.prompts), min(contexts)
        if longest + cfg.max_new_tokens > limit:
            raise M1Error(f"--stage onpolicy: the longest prompt ({longest} tokens) + --max-new-tokens "
                          f"{cfg.max_new_tokens} exceeds the context ({limit} tokens) of student or teacher: lower "
                          "--max-new-tokens")
        from .data import BatchPlan

        self.plan = BatchPlan(len(self.rows), cfg.batch_size // cfg.num_samples, cfg.seed + 1)

    def on_policy(self, step: int) -> bool:
        import numpy as np

        return self.cfg.lmbda >= 1.0 or bool(np.random.default_rng([self.cfg.seed, step, 17]).random() < self.cfg.lmbda)

    def sample(self, step: int):
        """(token rows prompt + completion, loss spans, metrics) of on-policy step ``step``."""
        from ..engine import Engine, SamplingParams

        cfg = self.cfg
        picked = self.plan.rows(step)
        base = (cfg.seed * 1_000_003 + step * 7_919) % (1 << 31)
        params = [SamplingParams(n=cfg.num_samples, max_new_tokens=cfg.max_new_tokens, temperature=cfg.gen_temperature,
                                 seed=base + k * cfg.num_samples) for k in range(len(picked))]
        t0 = time.perf_counter()
        outs = Engine(self.student, self.tokenizer).generate([self.prompts[i] for i in picked], params)
        seqs, spans, gen = [], [], 0
        for i, out in zip(picked, outs):
            prompt = self.prompts[i]
            for c in out.completions:
                seqs.append(list(prompt) + list(c.token_ids))
                spans.append(loss_span(len(seqs[-1]), len(prompt)))
                gen += len(c.token_ids)
        return seqs, spans, {"onpolicy": True, "gen_tokens": gen, "gen_s": round(time.perf_counter() - t0, 3)}
