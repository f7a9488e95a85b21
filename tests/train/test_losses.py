"""m1.train.losses against direct float64 formulas: values, masking, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from m1.train import losses

B, L, V = 2, 5, 7


def _inputs(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    t = (torch.randn(B, L, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return s, t, mask


def _softmax(z, T):
    """exp / sum exp, written out (no log_softmax), float64."""
    z = z.double() / T
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def _direct(name, s, t, mask, T=1.0, beta=0.5):
    """Loop over unmasked positions, summing the textbook formula; divide by the token count."""
    q, p = _softmax(s, T), _softmax(t, T)
    total, n = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            if not mask[b, i]:
                continue
            pb, qb = p[b, i], q[b, i]
            if name == "forward_kl":
                v = (pb * torch.log(pb / qb)).sum()
            elif name == "reverse_kl":
                v = (qb * torch.log(qb / pb)).sum()
            elif name == "jsd":
                m = beta * pb + (1 - beta) * qb
                v = beta * (pb * torch.log(pb / m)).sum() + (1 - beta) * (qb * torch.log(qb / m)).sum()
            total = total + v
            n += 1
    return total / n


def _ours(name, s, t, mask, T=1.0, beta=0.5, **kw):
    if name == "forward_kl":
        return losses.forward_kl(s, t, mask, temperature=T, **kw)
    if name == "reverse_kl":
        return losses.reverse_kl(s, t, mask, temperature=T, **kw)
    return losses.jsd(s, t, mask, temperature=T, beta=beta, **kw)


CASES = [("forward_kl", 1.0, 0.5), ("reverse_kl", 1.0, 0.5), ("forward_kl", 2.0, 0.5), ("reverse_kl", 0.7, 0.5),
         ("jsd", 1.0, 0.5), ("jsd", 1.5, 0.2), ("jsd", 1.0, 0.9)]


@pytest.mark.parametrize("name,T,beta", CASES)
def test_value_matches_direct_formula(name, T, beta):
    s, t, mask = _inputs()
    ours = _ours(name, s, t, mask, T, beta)
    ref = _direct(name, s, t, mask, T, beta)
    assert ours.dtype == torch.float64
    assert abs(ours.item() - ref.item()) <= 1e-12, (ours.item(), ref.item())


@pytest.mark.parametrize("name,T,beta", CASES)
def test_gradient_matches_direct_formula(name, T, beta):
    s, t, mask = _inputs(1)
    s1 = s.clone().requires_grad_(True)
    t1 = t.clone().requires_grad_(True)
    _ours(name, s1, t1, mask, T, beta).backward()
    s2 = s.clone().requires_grad_(True)
    t2 = t.clone().requires_grad_(True)
    _direct(name, s2, t2, mask, T, beta).backward()
    assert torch.allclose(s1.grad, s2.grad, atol=1e-12, rtol=0)
    assert torch.allclose(t1.grad, t2.grad, atol=1e-12, rtol=0)
    # masked positions get exactly zero gradient
    assert torch.all(s1.grad[1, 3:] == 0)


@pytest.mark.parametrize("name,T,beta", CASES[:5])
def test_gradcheck(name, T, beta):
    s, t, mask = _inputs(2)
    s, t = s[:, :3, :4].clone().requires_grad_(True), t[:, :3, :4].clone().requires_grad_(True)
    m = mask[:, :3]
    assert torch.autograd.gradcheck(lambda a, b: _ours(name, a, b, m, T, beta), (s, t))


def test_closed_form_student_gradients():
    """d KL(p||q)/dz_q = (q - p)/T ;  d KL(q||p)/dz_q = q (log q - log p - KL(q||p)) / T  (per token, / N)."""
    s, t, mask = _inputs(3)
    T, n = 1.3, mask.sum().item()
    q, p = _softmax(s, T), _softmax(t, T)
    w = mask[..., None].double()
    z = s.clone().requires_grad_(True)
    losses.forward_kl(z, t, mask, temperature=T).backward()
    assert torch.allclose(z.grad, (q - p) / T / n * w, atol=1e-13)
    z = s.clone().requires_grad_(True)
    losses.reverse_kl(z, t, mask, temperature=T).backward()
    kl = (q * (q.log() - p.log())).sum(-1, keepdim=True)
    assert torch.allclose(z.grad, q * (q.log() - p.log() - kl) / T / n * w, atol=1e-13)


def test_identical_distributions_give_zero_and_jsd_bounded():
    s, _, mask = _inputs()
    for fn in (losses.forward_kl, losses.reverse_kl, losses.jsd):
        assert abs(fn(s, s.clone(), mask).item()) < 1e-12
    # disjoint one-hot distributions: JSD(0.5) -> log 2
    big = torch.full((1, 1, 2), -1e4, dtype=torch.float64)
    a, b = big.clone(), big.clone()
    a[..., 0] = 0
    b[..., 1] = 0
    assert abs(losses.jsd(a, b).item() - math.log(2)) < 1e-9


def test_hidden_mse_direct():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(B, L, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(B, L, 6, generator=g, dtype=torch.float64)
    _, _, mask = _inputs()
    ours = losses.hidden_mse(a, b, mask)
    total, n = 0.0, 0
    for i in range(B):
        for j in range(L):
            if mask[i, j]:
                total += sum((a[i, j, k].item() - b[i, j, k].item()) ** 2 for k in range(6)) / 6
                n += 1
    assert abs(ours.item() - total / n) < 1e-12
    ours.backward()
    expected = 2 * (a.detach() - b) / 6 / n * mask[..., None]
    assert torch.allclose(a.grad, expected, atol=1e-14)


def test_normalizer_and_masked_mean():
    s, t, mask = _inputs()
    per = losses.reverse_kl_per_token(s, t)
    assert torch.allclose(losses.reverse_kl(s, t, mask, normalizer=20.0), (per * mask).sum() / 20.0)
    # splitting a batch and dividing each part by the global count sums to the global mean
    whole = losses.reverse_kl(s, t, mask)
    n = mask.sum()
    parts = sum(losses.reverse_kl(s[i:i + 1], t[i:i + 1], mask[i:i + 1], normalizer=n) for i in range(B))
    assert torch.allclose(whole, parts, atol=1e-14)
    # all masked -> 0, not NaN; no mask -> plain mean
    assert losses.masked_token_mean(per, torch.zeros_like(mask)).item() == 0.0
    assert torch.allclose(losses.masked_token_mean(per), per.mean())


def test_float32_inputs_are_close_to_float64():
    s, t, mask = _inputs(5, torch.float32)
    for name in ("forward_kl", "reverse_kl", "jsd"):
        a = _ours(name, s, t, mask)
        assert a.dtype == torch.float32
        assert abs(a.item() - _direct(name, s, t, mask).item()) < 1e-5


def test_cross_entropy_and_bad_args():
    s, _, mask = _inputs()
    labels = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(0))
    q = _softmax(s, 1.0)
    ref = sum(-math.log(q[b, i, labels[b, i]].item()) for b in range(B) for i in range(L) if mask[b, i]) / mask.sum()
    assert abs(losses.cross_entropy(s, labels, mask).item() - ref) < 1e-12
    with pytest.raises(ValueError, match="beta"):
        losses.jsd(s, s, mask, beta=1.0)
    with pytest.raises(ValueError, match="temperature"):
        losses.forward_kl(s, s, mask, temperature=0)
    with pytest.raises(ValueError, match="mask"):
        losses.forward_kl(s, s, mask[:, :2])
    with pytest.raises(ValueError, match="unknown"):
        losses.kd_loss("kl", s, s)


def test_chunked_head_loss_equals_full_logits():
    # values, reported extras and gradients (hidden, weight, bias) of the plain computation, for chunk
    # sizes that split the rows evenly, raggedly, one row at a time and not at all
    from m1.train.losses import chunked_head_loss, reverse_kl_per_token

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    weight = torch.randn(11, 5, generator=gen, dtype=torch.float64)
    bias = torch.randn(11, generator=gen, dtype=torch.float64)
    teacher = torch.randn(7, 11, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 11, (7,), generator=gen)
    w = torch.tensor([1.0, 1, 0, 1, 1, 1, 0], dtype=torch.float64)

    def token_loss(z, rows):
        kd = reverse_kl_per_token(z, teacher[rows], 1.5) * w[rows]
        ce = F.cross_entropy(z, labels[rows], reduction="none")
        return kd.sum() + 0.3 * ce.sum(), torch.stack([kd.sum(), ce.sum()]).detach()

    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    want, want_extra = token_loss(F.linear(*leaves), slice(None))
    (want * 2.5).backward()
    want_grads = [t.grad for t in leaves]
    for chunk in (1, 3, 7, 100):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
        got, extra = chunked_head_loss(*leaves, token_loss, chunk)
        (got * 2.5).backward()
        assert abs(got.item() - want.item()) < 1e-12 and torch.allclose(extra, want_extra, atol=1e-12, rtol=0)
        for g, wg in zip((t.grad for t in leaves), want_grads):
            assert (g - wg).abs().max() < 1e-12, chunk


def test_chunked_head_loss_float32_head_under_bf16_autocast():
    from m1.train.losses import chunked_head_loss

    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 8, generator=gen).to(torch.bfloat16).requires_grad_(True)
    weight = torch.randn(50, 8, generator=gen).requires_grad_(True)
    seen = []

    def token_loss(z, rows):
        seen.append(z.dtype)
        return torch.logsumexp(z, -1).sum(), torch.zeros(1)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = chunked_head_loss(hidden, weight, None, token_loss, 4)
    want = torch.logsumexp(hidden.detach().float() @ weight.detach().T, -1).sum()
    assert seen == [torch.float32, torch.float32] and abs(loss.item() - want.item()) < 1e-4
    loss.backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    # no rows at all: a zero loss whose gradients are zero
    empty = torch.zeros(0, 8, requires_grad=True)
    loss, extra = chunked_head_loss(empty, weight, None, token_loss)
    assert loss.item() == 0.0 and extra.tolist() == [0.0]
    # a frozen head: the hidden states still get their gradient, the head none
    frozen = weight.detach()
    h2 = hidden.detach().float().requires_grad_(True)
    loss, _ = chunked_head_loss(h2, frozen, None, token_loss, 4)
    loss.backward()
    want = torch.softmax(h2.detach() @ frozen.T, -1) @ frozen
    assert frozen.grad is None and (h2.grad - want).abs().max() < 1e-5
    with pytest.raises(ValueError, match="hidden"):
        chunked_head_loss(torch.zeros(3, 7), weight, None, token_loss)
