"""Held-out language-modelling loss: mean next-token NLL (and perplexity) of a model on texts.

Used to compare initialisations after ``m1 convert`` and to report before/after numbers of
``m1 distill``. Texts are scored one padded batch at a time; padding and the first token of each
text carry no loss, so the result does not depend on the batch size.
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


def heldout_loss(model, tokenizer, texts: list[str], max_len: int = 256, batch_size: int = 8) -> HeldoutLoss:
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(texts), batch_size):
        enc = [tokenizer(t, add_special_tokens=False).input_ids[:max_len] for t in texts[i:i + batch_size]]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, e in enumerate(enc):  # right padding: positions start at 0 for every row
            ids[r, :len(e)] = torch.tensor(e)
            mask[r, :len(e)] = 1
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        logp = F.log_softmax(logits[:, :-1], dim=-1)
        tgt = ids[:, 1:]
        nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        m = mask[:, 1:].bool()
        total += nll[m].double().sum().item()
        count += int(m.sum().item())
    return HeldoutLoss(nll=total / max(count, 1), tokens=count)
