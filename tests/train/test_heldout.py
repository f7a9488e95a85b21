"""m1.train.heldout.completion_reports against a direct float64 computation, one row at a time."""

import torch

from m1.model.checkpoint import load_model
from m1.train.heldout import completion_reports


def _direct(student, teacher, rows, plens):
    """Unbatched, unpadded, float64: per position (KL(t||s), student NLL, teacher NLL, is completion)."""
    out = []
    for ids, plen in zip(rows, plens):
        x = torch.tensor([ids])
        with torch.no_grad():
            lt = torch.log_softmax(teacher(input_ids=x).logits[0, :-1].double(), -1)
            ls = torch.log_softmax(student(input_ids=x).logits[0, :-1].double(), -1)
        kl = (lt.exp() * (lt - ls)).sum(-1)
        tgt = x[0, 1:, None]
        for p in range(len(ids) - 1):
            out.append((kl[p].item(), -ls[p].gather(-1, tgt[p]).item(), -lt[p].gather(-1, tgt[p]).item(),
                        plen > 0 and p >= plen - 1))
    return out


def test_completion_and_all_token_stats_equal_the_direct_formula(tiny_hybrid):
    student, tok = load_model(tiny_hybrid)
    teacher, _ = load_model(tiny_hybrid)
    with torch.no_grad():  # a teacher that differs from the student everywhere
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    lens = [12, 7, 15, 9, 11]
    rows = [torch.randint(3, tok.vocab_size, (n,), generator=g).tolist() for n in lens]
    plens = [5, 3, 0, 4, 6]  # the third row is text: no completion tokens
    rep = completion_reports({"s": student.eval()}, teacher.eval(), tok, rows, plens, batch_size=2,
                             all_tokens=True)["s"]
    d = _direct(student, teacher, rows, plens)
    comp = [x for x in d if x[3]]
    assert rep["tokens"] == len(comp) == sum(n - p for n, p in zip(lens, plens) if p > 0)
    assert abs(rep["kl"] - sum(x[0] for x in comp) / len(comp)) < 1e-5
    assert abs(rep["student_nll"] - sum(x[1] for x in comp) / len(comp)) < 1e-5
    whole = rep["all"]
    assert whole.tokens == len(d) == sum(n - 1 for n in lens)
    assert abs(whole.kl - sum(x[0] for x in d) / len(d)) < 1e-5
    assert abs(whole.student_nll - sum(x[1] for x in d) / len(d)) < 1e-5
    assert abs(whole.teacher_nll - sum(x[2] for x in d) / len(d)) < 1e-5
    assert whole.kl > 1e-3 and abs(whole.kl - rep["kl"]) > 1e-6  # the two masks differ and both matter
    assert "all" not in completion_reports({"s": student}, teacher, tok, rows, plens)["s"]
