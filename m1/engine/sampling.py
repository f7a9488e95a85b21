"""Sampling one token per row: temperature / top-k / top-p / min-p filtering and the inverse-CDF draw.

Row i's randomness comes only from its own ``torch.Generator``, so a sample does not depend on which
other rows share its batch (what makes ``n`` replicated rows equal ``n`` independent runs)."""

from __future__ import annotations

from ..errors import M1Error


def filter_logits(logits, temperature, top_k=None, top_p=None, min_p=None):
    """``logits / temperature`` with the tokens removed by top-k, top-p and min-p set to -inf.

    ``logits``: (rows, vocab) float. Each parameter is a float/int (all rows) or a 1-D tensor (per
    row); ``top_k`` 0, ``top_p`` 1 and ``min_p`` 0 turn a filter off. top-k keeps every token whose
    logit ties the k-th largest; top-p keeps the smallest prefix of the sorted tokens whose mass
    reaches p (so at least one token); min-p drops tokens with probability < min_p * max probability.
    Temperatures must be > 0 here (greedy rows are handled by :func:`sample_tokens`).
    """
    import torch

    rows, vocab = logits.shape
    dev = logits.device

    def col(v, dtype):
        t = torch.as_tensor(v, dtype=dtype, device=dev)
        return t.expand(rows) if t.dim() == 0 else t

    x = logits.float() / col(temperature, torch.float32)[:, None]
    neg = float("-inf")
    k = col(0 if top_k is None else top_k, torch.long)
    p = col(1.0 if top_p is None else top_p, torch.float32)
    on_k = k > 0
    if bool(on_k.any()):
        # the k-th largest logit from topk, not a full sort (a 49k-vocabulary sort costs ~4 ms a row on CPU)
        kmax = int(k[on_k].max().clamp(max=vocab))
        kth = x.topk(kmax, dim=-1).values.gather(1, (k.clamp(1, kmax) - 1)[:, None])
        x = x.masked_fill((x < kth) & on_k[:, None], neg)
    on_p = p < 1.0
    if bool(on_p.any()):
        rows_p = on_p.nonzero().flatten()
        xp = x.index_select(0, rows_p)
        thr = _top_p_threshold(xp, p.index_select(0, rows_p))
        x = x.index_copy(0, rows_p, xp.masked_fill(xp < thr, neg))
    if min_p is not None:
        mp = col(min_p, torch.float32)
        if bool((mp > 0).any()):
            probs = torch.softmax(x, dim=-1)
            x = x.masked_fill(probs < mp[:, None] * probs.max(dim=-1, keepdim=True).values, neg)
    return x


TOP_P_WIDTHS = (64, 1024)  # sorted-prefix widths tried before a full sort (see _top_p_threshold)


def _top_p_threshold(x, p):
    """Per row of ``x`` (rows, vocab), the smallest logit top-p keeps: the one at the last rank of the
    smallest prefix of the sorted tokens whose probability mass reaches ``p`` (rows,) -> (rows, 1).

    Only a prefix of the sorted logits is needed, so it is taken with ``topk`` at the widths in
    ``TOP_P_WIDTHS`` and widened (to a full sort at the end) for the rows whose kept set does not end
    inside it: with a 49k vocabulary a full sort costs ~4 ms per row on CPU, ``topk(64)`` ~0.1 ms, and
    at the usual temperatures a row's nucleus is a few dozen tokens. The mass uses the full softmax
    normaliser (logsumexp over all tokens), so any width gives the same threshold."""
    import torch

    rows, vocab = x.shape
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    thr = torch.empty(rows, 1, dtype=x.dtype, device=x.device)
    todo = torch.arange(rows, device=x.device)
    for w in [w for w in TOP_P_WIDTHS if w < vocab] + [vocab]:
        xs = x.index_select(0, todo)
        vals = xs.topk(w, dim=-1).values if w < vocab else xs.sort(dim=-1, descending=True).values
        probs = torch.exp(vals - lse.index_select(0, todo))
        before = probs.cumsum(dim=-1) - probs  # mass strictly above each rank
        keep = (before < p.index_select(0, todo)[:, None]).sum(dim=-1)
        # keep < w: some rank inside the prefix already has mass >= p above it, so the kept set ends here
        done = (keep < w) if w < vocab else torch.ones_like(keep, dtype=torch.bool)
        thr[todo[done]] = vals[done].gather(1, (keep[done].clamp(min=1) - 1)[:, None])
        todo = todo[~done]
        if todo.numel() == 0:
            break
    return thr


class NonFiniteLogits(M1Error):
    """Raised instead of sampling from NaN/inf logits (token ids out of range, or silently wrong text)."""


def sample_tokens(logits, temperature, top_k, top_p, min_p, generators):
    """One token per row: greedy where temperature == 0, else a draw from the filtered softmax.

    A draw is an inverse-CDF lookup: one uniform ``u`` from the row's generator, the token is the first
    whose cumulative probability (float64) exceeds ``u`` times the row's total. Row i's randomness comes
    only from ``generators[i]``, so a row's draw does not depend on the other rows of the batch. One
    number per row and step rather than a noise vector over the vocabulary (an exponential race drew
    49k exponentials per row: 17 of the 24 ms a batch-16 step's sampling took on CPU).
    """
    import torch

    rows, vocab = logits.shape
    dev = logits.device
    if not bool(torch.isfinite(logits.amax(dim=-1)).all()):  # a NaN/+inf anywhere in a row shows in its max
        raise NonFiniteLogits("the model's next-token logits are not finite (NaN or inf): its weights are "
                              "broken (a diverged training run?) -- nothing sampled from them")
    temps = torch.as_tensor(temperature, dtype=torch.float32, device=dev)
    if temps.dim() == 0:
        temps = temps.expand(rows)
    greedy = temps == 0
    out = logits.argmax(dim=-1)
    if bool(greedy.all()):
        return out
    sel = (~greedy).nonzero().flatten()
    every = len(sel) == rows
    sub = lambda v: v if every or not (torch.is_tensor(v) and v.dim() > 0) else v[sel]  # noqa: E731
    x = filter_logits(sub(logits), sub(temps), sub(torch.as_tensor(top_k)), sub(torch.as_tensor(top_p)),
                      sub(torch.as_tensor(min_p)))
    u = torch.tensor([float(torch.rand((), dtype=torch.float64, generator=generators[i], device=generators[i].device))
                      for i in sel.tolist()], dtype=torch.float64, device=dev)
    out[sel] = inverse_cdf_draw(torch.softmax(x, dim=-1), u)
    return out



def sampling_tensors(params, device):
    """The per-row filter settings :func:`sample_tokens` takes, from each row's SamplingParams:
    (temperature, top_k, top_p, min_p) as 1-D tensors on ``device``."""
    import torch

    f = lambda vals, dt: torch.tensor(vals, dtype=dt, device=device)  # noqa: E731
    return (f([p.temperature for p in params], torch.float32), f([p.top_k for p in params], torch.long),
            f([p.top_p for p in params], torch.float32), f([p.min_p for p in params], torch.float32))


def inverse_cdf_draw(probs, u):
    """Row i's token: the first whose cumulative probability exceeds ``u[i]`` (in [0, 1)) times the row's
    total. probs: (rows, vocab), rows need not sum to 1 exactly; the sums run in float64. A token of
    probability 0 is never returned."""
    import torch

    cdf = probs.to(torch.float64).cumsum(dim=-1)
    total = cdf[:, -1:].contiguous()
    tok = torch.searchsorted(cdf, u[:, None] * total, right=True)
    # u * total rounds up to total only for u within 2^-53 of 1: then the last token with mass
    last = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(tok, last)[:, 0]
