"""Voting, best-of-N, verifiers and the time-budget mode."""

from __future__ import annotations

import time

import pytest
import torch

from m1.engine import Engine, SamplingParams
from m1.errors import M1Error
from m1.eval.scaling import RewardModel, SelfVerifier, best_of_n, majority_vote, sample_until_budget, weighted_vote


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(tiny_hybrid):
    return Engine.from_pretrained(tiny_hybrid)


# ------------------------------------------------------------------------------------- voting
def test_majority_vote_tie_goes_to_first_seen():
    texts = ["so \\boxed{3}", "\\boxed{5}", "The answer is 5", "no answer here", "\\boxed{3}."]
    v = majority_vote(texts)
    assert v.answers == ["3", "5", "5", None, "3"]
    assert v.answer == "3" and v.count == 2
    assert [(g.answer, g.count) for g in v.groups] == [("3", 2), ("5", 2)]
    v2 = majority_vote(texts[1:])  # now 5 is seen first
    assert v2.answer == "5"


def test_majority_vote_groups_equivalent_spellings():
    v = majority_vote(["\\boxed{1,080}", "\\boxed{7}", "\\boxed{1080}", "\\boxed{1080.0}", "\\boxed{7}"])
    assert v.answer == "1,080" and v.count == 3  # first-seen spelling represents the group
    assert majority_vote(["nothing", "at all"]).answer is None
    assert majority_vote(answers=[None, "x", "y", "y"]).answer == "y"


def test_generate_vote_and_eval_maj_elect_the_same_answer():
    """One vote: with the checker, m1 generate's majority vote merges what the checker calls
    equivalent, exactly as m1 eval's maj@k grouping does, and both elect the same sample."""
    from m1.eval.evaluate import vote_labels
    from m1.eval.grading import Checker
    from m1.eval.metrics import vote_winner

    answers = ["7", "x+1", "1+x", "2x", "2*x", "x*2", None]
    assert majority_vote(answers=answers).answer == "7"  # without the checker: seven singletons, first wins
    with Checker(1) as checker:
        v = majority_vote(answers=answers, checker=checker)
        assert (v.answer, v.count) == ("2x", 3)
        assert [(g.answer, g.count) for g in v.groups] == [("7", 1), ("x+1", 2), ("2x", 3)]
        labels = vote_labels(answers, [False] * len(answers), checker)
        assert answers[vote_winner(labels, range(len(answers)))] == v.answer
        w = weighted_vote(None, [5.0, 2.0, 2.0, 1.0, 1.0, 1.0, 9.0], answers=answers, checker=checker)
        assert (w.answer, w.weight) == ("7", 5.0)  # a sample without an answer has no weight


def test_weighted_vote_and_best_of_n():
    texts = ["\\boxed{3}", "\\boxed{5}", "\\boxed{5}", "\\boxed{3}", "\\boxed{9}"]
    scores = [0.9, 0.2, 0.3, 0.8, 0.95]
    assert majority_vote(texts).answer == "3"
    w = weighted_vote(texts, scores)
    assert w.answer == "3" and w.weight == pytest.approx(1.7)
    w2 = weighted_vote(texts, [0.1, 0.6, 0.6, 0.1, 0.95])
    assert w2.answer == "5"  # 1.2 > 0.95
    assert best_of_n(texts, scores) == (4, "\\boxed{9}", 0.95)
    assert best_of_n(["a", "b", "c"], [1.0, 3.0, 3.0])[0] == 1  # ties -> first
    with pytest.raises(M1Error):
        best_of_n(["a"], [1.0, 2.0])


# ---------------------------------------------------------------------------------- verifiers
def test_self_verifier_is_the_models_p_yes(engine):
    v = SelfVerifier(engine)
    probs = ["What is 2 + 2?", "What is 3 * 3?"]
    sols = ["2 + 2 = 4, so \\boxed{4}.", "It is \\boxed{10}."]
    scores = v.score(probs, sols)
    assert all(0.0 <= s <= 1.0 for s in scores)
    for p, s, got in zip(probs, sols, scores):  # direct, unbatched computation
        ids = v._prompt(p, s)
        with torch.no_grad():
            pr = torch.softmax(engine.model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        py, pn = pr[v.yes].sum(), pr[v.no].sum()
        assert got == pytest.approx(float(py / (py + pn)), rel=1e-4)


def test_reward_model_scores_and_best_of_n(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from m1.model.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    rm = RewardModel(tmp_path / "rm")
    texts = ["\\boxed{3}", "\\boxed{4} because", "so 12 + 7 = 19"]
    scores = rm.score(["What?"] * 3, texts)
    assert len(set(scores)) == 3
    i, _, s = best_of_n(texts, scores)
    assert s == max(scores) and i == scores.index(max(scores))
    with pytest.raises(M1Error, match="does not exist"):
        RewardModel(tmp_path / "missing")


# -------------------------------------------------------------------------------- time budget
def test_time_budget_stops_after_the_budget_and_records_arrivals(engine):
    budget = 1.0
    params = SamplingParams(max_new_tokens=24, temperature=1.0, seed=5)
    t0 = time.perf_counter()
    res = sample_until_budget(engine, "Tom has 12 apples.", budget, params, round_size=4)
    wall = time.perf_counter() - t0
    assert res.elapsed >= budget
    assert wall < budget + 5.0  # the last round is cut at the budget, not run to completion
    assert res.rounds >= 2 and len(res.samples) == 4 * res.rounds
    arrivals = [s.arrival for s in res.samples]
    assert all(0 < a <= res.elapsed for a in arrivals)
    per_round = [max(s.arrival for s in res.samples if s.round == r) for r in range(res.rounds)]
    assert per_round == sorted(per_round)
    assert [s.seed for s in res.samples] == list(range(5, 5 + len(res.samples)))
    done = [s for s in res.samples if s.finish_reason != "budget"]
    assert any(s.arrival <= budget for s in done)
    # a sample of the sequence is reproducible alone from its seed
    s = done[-1]
    alone = engine.generate("Tom has 12 apples.", SamplingParams(max_new_tokens=24, temperature=1.0, seed=s.seed))
    assert alone[0].completions[0].text == s.text
    # votes only count samples that had arrived
    assert res.vote(at=0.0).answer is None and res.completed(at=0.0) == []
    assert len(res.completed()) == len([x for x in done if x.arrival <= budget])


def test_time_budget_rejects_bad_budget(engine):
    with pytest.raises(M1Error, match="budget"):
        sample_until_budget(engine, "hi", 0, SamplingParams())
