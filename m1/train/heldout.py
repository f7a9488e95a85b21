"""Held-out language-modelling loss: mean next-token NLL (and perplexity) of a model on texts.

Used to compare initialisations after ``m1 convert`` and to report before/after numbers of
``m1 distill``. Texts are scored one padded batch at a time; padding and the first token of each
text carry no loss, so the result does not depend on the batch size.

``completion_reports`` scores students against their teacher on the same positions: the mean
KL(teacher || student) of the next-token distributions and both models' NLL, on the completion
tokens (and their digit tokens) and, for ``m1 distill``'s report, on every predicted position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class HeldoutLoss:
    nll: float  # mean negative log-likelihood per predicted token, nats
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)


def _batches(tokenizer, texts: list[str], max_len: int, batch_size: int, device):
    """Right-padded (ids, mask) batches of the texts, tokenized without special tokens."""
    enc = [tokenizer(t, add_special_tokens=False).input_ids[:max_len] for t in texts]
    yield from _id_batches(enc, tokenizer.pad_token_id or 0, batch_size, device)


def _id_batches(ids_list: list[list[int]], pad: int, batch_size: int, device):
    """Right-padded (ids, mask) batches of token lists (positions start at 0 in every row)."""
    from .data import collate

    for i in range(0, len(ids_list), batch_size):
        ids, mask = collate(ids_list[i:i + batch_size], pad)
        yield ids.to(device), mask.to(device)


def _nll(logits, ids, mask):
    """Per-position next-token NLL (positions 0..L-2) and the mask of positions that have a next token."""
    import torch.nn.functional as F

    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return nll, mask[:, 1:].bool()


def heldout_loss(model, tokenizer, texts: list[str], max_len: int = 256, batch_size: int = 8) -> HeldoutLoss:
    import torch

    total, count = 0.0, 0
    device = next(model.parameters()).device
    for ids, mask in _batches(tokenizer, texts, max_len, batch_size, device):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        nll, m = _nll(logits, ids, mask)
        total += nll[m].double().sum().item()
        count += int(m.sum().item())
    return HeldoutLoss(nll=total / max(count, 1), tokens=count)


@dataclass
class HeldoutReport:
    kl: float  # mean KL(teacher || student) per predicted token, nats
    student_nll: float
    teacher_nll: float
    tokens: int

    @property
    def student_ppl(self) -> float:
        return math.exp(self.student_nll)

    @property
    def teacher_ppl(self) -> float:
        return math.exp(self.teacher_nll)

    def as_dict(self) -> dict:
        return {"kl": self.kl, "student_nll": self.student_nll, "student_ppl": self.student_ppl,
                "teacher_nll": self.teacher_nll, "teacher_ppl": self.teacher_ppl, "tokens": self.tokens}

    @staticmethod
    def combine(parts: list["HeldoutReport"]) -> "HeldoutReport":
        """Token-weighted merge of reports over disjoint text shards."""
        n = sum(p.tokens for p in parts)
        w = [p.tokens / max(n, 1) for p in parts]
        return HeldoutReport(kl=sum(a * p.kl for a, p in zip(w, parts)),
                             student_nll=sum(a * p.student_nll for a, p in zip(w, parts)),
                             teacher_nll=sum(a * p.teacher_nll for a, p in zip(w, parts)), tokens=n)


def digit_token_mask(tokenizer):
    """(vocab,) bool tensor: tokens whose text holds a digit -- where arithmetic results are written."""
    import torch

    vocab = len(tokenizer)
    texts = tokenizer.convert_ids_to_tokens(list(range(vocab)))
    return torch.tensor([any(ch.isdigit() for ch in (t or "")) for t in texts], dtype=torch.bool)


def completion_report(student, teacher, tokenizer, rows: list[list[int]], prompt_lens: list[int],
                      batch_size: int = 8) -> dict:
    """KL(teacher || student) on the completion tokens of prompt + completion ``rows`` (e.g. the
    teacher's own answers to held-out prompts), overall and on the positions whose target token holds
    a digit (the results of the arithmetic: the average over all tokens hides them, since most
    completion tokens are copied wording), plus both models' NLL there."""
    return completion_reports({"student": student}, teacher, tokenizer, rows, prompt_lens, batch_size)["student"]


def completion_reports(students: dict, teacher, tokenizer, rows: list[list[int]], prompt_lens: list[int],
                       batch_size: int = 8, all_tokens: bool = False) -> dict[str, dict]:
    """:func:`completion_report` for several students (name -> model) against one teacher: each batch's
    teacher forward is shared by all of them (on a CPU it is half the cost of one report). A row whose
    prompt length is 0 has no completion tokens. ``all_tokens``: also each student's
    KL and both NLLs on every predicted position of the rows (a :class:`HeldoutReport`), from the same
    forwards, under "all" (``m1 distill``'s held-out report needs both: one pass instead of two)."""
    import torch

    from .losses import forward_kl_per_token

    device = next(teacher.parameters()).device
    digits = digit_token_mask(tokenizer).to(device)
    keys = ("kl", "kl_digits", "student_nll", "teacher_nll", "kl_all", "student_nll_all", "teacher_nll_all")
    sums = {name: dict.fromkeys(keys, 0.0) for name in students}
    n_all = n_dig = n_pos = 0
    batches = _id_batches(rows, tokenizer.pad_token_id or 0, batch_size, device)
    for i, (ids, mask) in zip(range(0, len(rows), batch_size), batches):
        pos = torch.arange(ids.shape[1] - 1, device=device)
        lens = mask.sum(1, keepdim=True)
        plen = torch.tensor(prompt_lens[i:i + batch_size], device=device).unsqueeze(1)
        comp = (pos >= plen - 1) & (pos < lens - 1) & (plen > 0)  # positions that predict a completion token
        target = ids[:, 1:]
        dig = comp & digits[target.clamp(max=digits.numel() - 1)]
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=mask).logits.float()
        t_nll, m = _nll(t_logits, ids, mask)
        for name, student in students.items():
            with torch.no_grad():
                s_logits = student(input_ids=ids, attention_mask=mask).logits.float()
            k = forward_kl_per_token(s_logits[:, :-1], t_logits[:, :-1])
            s_nll, _ = _nll(s_logits, ids, mask)
            acc = sums[name]
            acc["kl"] += k[comp].double().sum().item()
            acc["kl_digits"] += k[dig].double().sum().item()
            acc["student_nll"] += s_nll[comp].double().sum().item()
            acc["teacher_nll"] += t_nll[comp].double().sum().item()
            if all_tokens:
                acc["kl_all"] += k[m].double().sum().item()
                acc["student_nll_all"] += s_nll[m].double().sum().item()
                acc["teacher_nll_all"] += t_nll[m].double().sum().item()
        n_all += int(comp.sum())
        n_dig += int(dig.sum())
        n_pos += int(m.sum().item())
    out = {name: {"kl": acc["kl"] / max(n_all, 1), "kl_digits": acc["kl_digits"] / max(n_dig, 1),
                  "student_nll": acc["student_nll"] / max(n_all, 1), "teacher_nll": acc["teacher_nll"] / max(n_all, 1),
                  "tokens": n_all, "digit_tokens": n_dig} for name, acc in sums.items()}
    if all_tokens:
        for name, acc in sums.items():
            c = max(n_pos, 1)
            out[name]["all"] = HeldoutReport(kl=acc["kl_all"] / c, student_nll=acc["student_nll_all"] / c,
                                             teacher_nll=acc["teacher_nll_all"] / c, tokens=n_pos)
    return out


def teacher_answers(model_dir, task: str, limit: int, max_new_tokens: int, seed: int = 0) -> tuple[list, list[int]]:
    """A model's greedy answers to the ``limit`` problems ``m1 eval --task TASK --limit LIMIT --seed SEED``
    scores, prompted as it prompts them: (prompt + completion ids per problem, prompt lengths), for
    :func:`completion_report` (KL on the teacher's own answers)."""
    from ..engine import Engine, SamplingParams
    from ..tasks import load_task
    from ..tasks.prompts import build_messages, render_prompt

    eng = Engine.from_pretrained(model_dir, dtype="float32")
    prompts = [render_prompt(eng.tokenizer, build_messages(p)) for p in load_task(task, limit=limit, seed=seed)]
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    return [list(p) + list(o.completions[0].token_ids) for p, o in zip(prompts, outs)], [len(p) for p in prompts]


def gsm8k_chat_texts(tokenizer, n: int = 16) -> list[str]:
    """The held-out GSM8K train chats that generality (perplexity) is measured on: the ``n`` that
    ``m1 distill --data gsm8k-train --heldout N`` holds out with seed 0, so the demo's general
    distillation never trains on them (score them with :func:`heldout_loss`, ``max_len=256``)."""
    from .data import load_data

    return load_data("gsm8k-train", tokenizer, seq_len=256, heldout=n, seed=0).heldout_texts
