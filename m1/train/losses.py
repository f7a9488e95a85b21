r"""Distillation losses as small named functions: forward KL, reverse KL, JSD, hidden-state MSE.

Every loss is a per-token quantity reduced by a *mask-aware token mean*: padding (``mask == 0``)
contributes nothing, and the result is ``sum(per_token * mask) / normalizer`` where the normalizer
is ``mask.sum()`` by default. Pass ``normalizer=`` explicitly to divide by the number of tokens of
a whole global batch instead, which is what makes gradient accumulation and data-parallel training
give the same gradient as one big batch (see :mod:`m1.train.distill`).

Definitions, with ``p = softmax(teacher_logits / T)`` (teacher) and ``q = softmax(student_logits / T)``
(student), per token position, summed over the vocabulary ``v``:

    forward_kl  KL(p || q) = sum_v p_v (log p_v - log q_v)          mass-covering ("mean seeking")
    reverse_kl  KL(q || p) = sum_v q_v (log q_v - log p_v)          mode-seeking; M1's choice
    jsd(beta)   m = beta p + (1 - beta) q
                JSD_beta = beta KL(p || m) + (1 - beta) KL(q || m)   bounded by log 2 at beta = 0.5
    hidden_mse  mean over the hidden dimension of (student - teacher)^2

No ``T^2`` factor is applied; at the default ``T = 1`` it makes no difference.
Logits are upcast to float32 (float64 stays float64) before the softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["masked_sum", "masked_token_mean", "forward_kl", "reverse_kl", "jsd", "hidden_mse",
           "forward_kl_per_token", "reverse_kl_per_token", "jsd_per_token", "hidden_mse_per_token",
           "cross_entropy", "LOSSES", "kd_loss", "kd_per_token", "chunked_head_loss"]


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _mask_like(per_token: torch.Tensor, mask) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(per_token)
    if mask.shape != per_token.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but the per-token loss has {tuple(per_token.shape)}")
    return mask.to(per_token.dtype)


def masked_sum(per_token: torch.Tensor, mask=None) -> torch.Tensor:
    """Sum of ``per_token`` over the positions where ``mask`` is non-zero (all positions if None)."""
    return (per_token * _mask_like(per_token, mask)).sum()


def masked_token_mean(per_token: torch.Tensor, mask=None, normalizer=None) -> torch.Tensor:
    """``masked_sum / normalizer``; the normalizer defaults to the number of unmasked tokens.

    An all-masked input gives 0 (not NaN) when no normalizer is given.
    """
    total = masked_sum(per_token, mask)
    if normalizer is None:
        normalizer = _mask_like(per_token, mask).sum().clamp(min=1)
    return total / normalizer


def _log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return F.log_softmax(_upcast(logits) / temperature, dim=-1)


def forward_kl_per_token(student_logits, teacher_logits, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) at each position: ``sum_v p_v (log p_v - log q_v)``."""
    log_q = _log_probs(student_logits, temperature)
    log_p = _log_probs(teacher_logits, temperature)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def reverse_kl_per_token(student_logits, teacher_logits, temperature: float = 1.0) -> torch.Tensor:
    """KL(student || teacher) at each position: ``sum_v q_v (log q_v - log p_v)``."""
    log_q = _log_probs(student_logits, temperature)
    log_p = _log_probs(teacher_logits, temperature)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def jsd_per_token(student_logits, teacher_logits, beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Generalised Jensen-Shannon divergence: ``beta KL(p||m) + (1-beta) KL(q||m)``, ``m = beta p + (1-beta) q``."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be strictly between 0 and 1, got {beta} (use forward_kl / reverse_kl for the limits)")
    log_q = _log_probs(student_logits, temperature)
    log_p = _log_probs(teacher_logits, temperature)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1.0 - beta)]), dim=0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return beta * kl_pm + (1.0 - beta) * kl_qm


def hidden_mse_per_token(student_hidden, teacher_hidden) -> torch.Tensor:
    """Mean over the last (hidden) dimension of the squared difference."""
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"hidden states differ in shape: {tuple(student_hidden.shape)} vs {tuple(teacher_hidden.shape)}")
    return (_upcast(student_hidden) - _upcast(teacher_hidden)).pow(2).mean(-1)


def forward_kl(student_logits, teacher_logits, mask=None, temperature: float = 1.0, normalizer=None):
    """Token mean of KL(teacher || student) over unmasked positions."""
    return masked_token_mean(forward_kl_per_token(student_logits, teacher_logits, temperature), mask, normalizer)


def reverse_kl(student_logits, teacher_logits, mask=None, temperature: float = 1.0, normalizer=None):
    """Token mean of KL(student || teacher) over unmasked positions (M1's distillation loss)."""
    return masked_token_mean(reverse_kl_per_token(student_logits, teacher_logits, temperature), mask, normalizer)


def jsd(student_logits, teacher_logits, mask=None, temperature: float = 1.0, beta: float = 0.5, normalizer=None):
    """Token mean of the generalised JSD (see :func:`jsd_per_token`)."""
    return masked_token_mean(jsd_per_token(student_logits, teacher_logits, beta, temperature), mask, normalizer)


def hidden_mse(student_hidden, teacher_hidden, mask=None, normalizer=None):
    """Token mean (over unmasked positions) of the per-token mean squared error of hidden states."""
    return masked_token_mean(hidden_mse_per_token(student_hidden, teacher_hidden), mask, normalizer)


def cross_entropy(logits, labels, mask=None, normalizer=None):
    """Token mean of ``-log softmax(logits)[label]`` (no shifting: align ``labels`` yourself)."""
    logp = F.log_softmax(_upcast(logits), dim=-1)
    nll = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return masked_token_mean(nll, mask, normalizer)


LOSSES = ("reverse_kl", "forward_kl", "jsd")


def kd_per_token(name: str, student_logits, teacher_logits, temperature: float = 1.0, beta: float = 0.5):
    """The per-token loss named by ``m1 distill --loss``."""
    if name == "reverse_kl":
        return reverse_kl_per_token(student_logits, teacher_logits, temperature)
    if name == "forward_kl":
        return forward_kl_per_token(student_logits, teacher_logits, temperature)
    if name == "jsd":
        return jsd_per_token(student_logits, teacher_logits, beta, temperature)
    raise ValueError(f"unknown distillation loss '{name}': choose one of {', '.join(LOSSES)}")


def kd_loss(name: str, student_logits, teacher_logits, mask=None, temperature: float = 1.0, beta: float = 0.5,
            normalizer=None):
    """Token mean of :func:`kd_per_token` (the loss ``m1 distill --loss`` names)."""
    return masked_token_mean(kd_per_token(name, student_logits, teacher_logits, temperature, beta), mask, normalizer)


class _ChunkedHeadLoss(torch.autograd.Function):
    """See :func:`chunked_head_loss`. The gradients are computed in the forward pass, chunk by chunk
    (each chunk's logits live only while their loss and its gradient are taken), and only scaled
    in the backward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, token_loss, chunk):
        dev = hidden.device.type
        f = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # float64 stays (tests)
        with torch.autocast(dev, enabled=False):
            w = weight.detach().to(f)
            b = None if bias is None else bias.detach().to(f)
            g_hidden = torch.empty(hidden.shape, dtype=f, device=hidden.device)
            # a frozen head (distill --trainable mamba) needs no (V, d) gradient: skip its matmuls
            g_weight = torch.zeros_like(w) if weight.requires_grad else None
            g_bias = None if b is None or not bias.requires_grad else torch.zeros_like(b)
            total, parts = None, None
            for start in range(0, max(1, hidden.shape[0]), chunk):  # no rows: one empty chunk
                rows = slice(start, start + chunk)
                h = hidden[rows].detach().to(f)  # (c, d)
                logits = F.linear(h, w, b).requires_grad_()  # (c, V): a leaf of this chunk's own graph
                with torch.enable_grad():
                    loss, extra = token_loss(logits, rows)
                    (g_logits,) = torch.autograd.grad(loss, logits)
                g_hidden[rows] = g_logits @ w
                if g_weight is not None:
                    g_weight.addmm_(g_logits.T, h)
                if g_bias is not None:
                    g_bias += g_logits.sum(0)
                total = loss.detach() if total is None else total + loss.detach()
                extra = extra.detach()
                parts = extra if parts is None else parts + extra
        ctx.save_for_backward(g_hidden, g_weight, g_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(parts)
        return total, parts

    @staticmethod
    def backward(ctx, g_total, g_parts):
        g_hidden, g_weight, g_bias = ctx.saved_tensors
        dh, dw, db = ctx.dtypes
        return ((g_hidden * g_total).to(dh), None if g_weight is None else (g_weight * g_total).to(dw),
                None if g_bias is None else (g_bias * g_total).to(db), None, None)


def chunked_head_loss(hidden, weight, bias, token_loss, chunk: int | None = None):
    """``sum over chunks of token_loss(F.linear(hidden, weight, bias)[rows], rows)`` without ever holding
    the logits of all rows: a loss over a 49k-150k vocabulary at a few thousand tokens would
    otherwise keep several (tokens, vocab) float32 tensors alive for backward (0.4 GB each for
    SmolLM2 at 8 x 256 tokens).

    ``hidden``: (N, d) the rows that carry a loss, differentiable; ``weight``: (V, d), ``bias``:
    (V,) or None, the output head (gradients flow to all three). ``token_loss(logits, rows)`` gets a
    chunk's float32 logits (c, V) and the ``slice`` of rows they belong to, and returns ``(loss,
    extra)``: a differentiable scalar, and a 1-D tensor of numbers to report (summed over chunks,
    not differentiated). Returns ``(sum of loss, sum of extra)``. The head runs in float32 whatever
    the autocast (float64 for float64 inputs). ``chunk``: rows per chunk (default: about 2^25 logits per chunk).

    The same trick as Liger-Kernel's fused linear cross-entropy, written here in plain torch so
    that any per-token loss works (the chunk's gradient comes from autograd) and it runs on CPU.
    """
    if chunk is None:
        chunk = max(1, (1 << 25) // max(1, weight.shape[0]))
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"chunked_head_loss: hidden (N, d) and weight (V, d) expected, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    return _ChunkedHeadLoss.apply(hidden, weight, bias, token_loss, int(chunk))
