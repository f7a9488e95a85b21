"""The sampling engine against HF generate, against itself run sample by sample, and its sampler."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from m1.engine import Engine, SamplingParams, filter_logits, sample_tokens
from m1.errors import M1Error


pytestmark = pytest.mark.usefixtures("one_torch_thread")


PROMPTS = ["Tom has 12 apples.", "What is 3 * 4 - 5? The answer is", "Solve", "The total is 19. So"]


@pytest.fixture(scope="module")
def models(tiny_teachers, tiny_hybrid):
    """name -> (model, tokenizer): the tiny hybrid (attention at 1,3), its Llama teacher, a Qwen2 teacher."""
    from m1.model.checkpoint import load_model

    return {"hybrid": load_model(tiny_hybrid), "teacher": load_model(tiny_teachers["llama_untied"]),
            "qwen2": load_model(tiny_teachers["qwen2"])}


def _hf_greedy(model, tok, prompt, n_new):
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n_new, do_sample=False)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def _static_on_cpu(eng) -> None:
    """Decode through the static-shape runner (what CUDA graphs capture), which on CPU runs eagerly."""
    from m1.engine.graphs import StaticRunner

    eng.runner.static = StaticRunner(eng.decode, eng.device)


def _chi2_limit(df: int, z: float = 3.72) -> float:
    """Upper chi-square quantile (Wilson-Hilferty), z=3.72 ~ p=1e-4."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


# ---------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("name", ["hybrid", "teacher", "qwen2"])
@pytest.mark.parametrize("backend", ["fast", "hf"])
def test_greedy_equals_hf_generate(models, name, backend):
    model, tok = models[name]
    eng = Engine(model, tok, backend=backend)
    assert eng.backend == backend
    outs = eng.generate(PROMPTS, SamplingParams(max_new_tokens=24, temperature=0))  # one left-padded batch
    for p, o in zip(PROMPTS, outs):
        ref = _hf_greedy(model, tok, p, 24)
        c = o.completions[0]
        assert c.token_ids == ref, (name, backend, p)
        assert c.num_tokens == len(ref)
        assert c.finish_reason == ("stop" if ref[-1] in eng.eos_ids else "length")


@pytest.mark.parametrize("name", ["hybrid", "teacher"])
def test_fast_step_logits_match_model_forward(models, name):
    """Teacher-forced: the fast decode step's logits equal model.forward on the full left-padded sequence."""
    model, tok = models[name]
    eng = Engine(model, tok, backend="fast")
    ids = [eng.encode(p) for p in PROMPTS[:3]]
    reqs = [type("R", (), {"ids": x})() for x in ids]
    from m1.engine.scheduler import Row

    rows = [Row(i, 0, 0, SamplingParams(), 8) for i in range(3)]
    gen = torch.Generator().manual_seed(0)
    cont = torch.randint(3, 300, (3, 6), generator=gen)
    with torch.inference_mode():
        st, logits = eng.runner.start(reqs, [0, 1, 2], rows)
        got = [logits]
        for t in range(5):
            got.append(eng.decode.dynamic(st, cont[:, t]))
        lp = max(len(x) for x in ids)
        for i, x in enumerate(ids):
            full = torch.tensor([x + cont[i, :5].tolist()])
            ref = model(input_ids=full).logits[0, len(x) - 1:].float()
            mine = torch.stack([g[i] for g in got])
            assert torch.allclose(mine, ref, atol=2e-4, rtol=1e-4), (name, i, (mine - ref).abs().max())
        assert lp > min(len(x) for x in ids)  # the batch really was padded


@pytest.mark.slow
def test_greedy_equals_hf_generate_smollm2_hybrid(smollm2_hybrid):
    from m1.model.checkpoint import load_model

    model, tok = load_model(smollm2_hybrid)
    eng = Engine(model, tok)
    assert eng.backend == "fast"
    prompts = ["What is 12 + 7?", "Write one sentence about the sea."]
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=16, temperature=0), chat=True)
    for p, o in zip(prompts, outs):
        ids = eng.encode(p, chat=True)
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=16, do_sample=False)[0, len(ids):].tolist()
        assert o.completions[0].token_ids == ref


# -------------------------------------------------------------------- replication and batching
@pytest.mark.parametrize("name,backend", [("hybrid", "fast"), ("teacher", "fast"), ("hybrid", "hf")])
def test_replicated_samples_equal_independent_runs(models, name, backend):
    model, tok = models[name]
    eng = Engine(model, tok, backend=backend)
    params = SamplingParams(n=5, max_new_tokens=16, temperature=1.0, seed=10, ignore_eos=True)
    together = eng.generate(PROMPTS[0], params)[0].completions
    assert len({tuple(c.token_ids) for c in together}) > 1  # really different samples
    for j, c in enumerate(together):
        alone = eng.generate(PROMPTS[0], SamplingParams(n=1, max_new_tokens=16, temperature=1.0, seed=10 + j,
                                                        ignore_eos=True))[0].completions[0]
        assert c.seed == 10 + j
        assert c.token_ids == alone.token_ids, j


@pytest.mark.parametrize("name", ["hybrid", "teacher"])
def test_left_padded_mixed_batch_equals_unbatched(models, name):
    model, tok = models[name]
    eng = Engine(model, tok)
    params = [SamplingParams(n=2, max_new_tokens=12, temperature=0.9, top_p=0.95, seed=100 * i) for i in range(4)]
    lens = {len(eng.encode(p)) for p in PROMPTS}
    assert len(lens) > 2  # mixed lengths -> left padding
    batched = eng.generate(PROMPTS, params)
    for i, p in enumerate(PROMPTS):
        alone = eng.generate([p], params[i])[0]
        assert [c.token_ids for c in batched[i].completions] == [c.token_ids for c in alone.completions]
        assert [c.text for c in batched[i].completions] == [c.text for c in alone.completions]


def test_small_batches_and_prefill_chunks_change_nothing(models):
    """Groups split by max_batch_size and prefill split by prefill_tokens give the same samples."""
    model, tok = models["hybrid"]
    params = SamplingParams(n=3, max_new_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    ref = Engine(model, tok).generate(PROMPTS, params)
    small = Engine(model, tok, max_batch_size=2, prefill_tokens=8).generate(PROMPTS, params)
    assert [[c.token_ids for c in o.completions] for o in ref] == [[c.token_ids for c in o.completions] for o in small]


# ------------------------------------------------------------------------------------ stopping
def test_per_row_stop_tokens_compact_the_batch(models):
    """Rows that stop early (at different steps) leave the others exactly as independent runs."""
    model, tok = models["hybrid"]
    eng = Engine(model, tok)
    free = eng.generate(PROMPTS[0], SamplingParams(n=8, max_new_tokens=20, temperature=1.0, seed=3,
                                                    ignore_eos=True))[0].completions
    stop_tok = free[0].token_ids[4]  # a token that really occurs
    params = SamplingParams(n=8, max_new_tokens=20, temperature=1.0, seed=3, ignore_eos=True,
                            stop_token_ids=[stop_tok])
    got = eng.generate(PROMPTS[0], params)[0].completions
    reasons = set()
    for c, f in zip(got, free):
        if stop_tok in f.token_ids:
            k = f.token_ids.index(stop_tok)
            assert c.token_ids == f.token_ids[:k + 1] and c.finish_reason == "stop"
        else:
            assert c.token_ids == f.token_ids and c.finish_reason == "length"
        reasons.add(c.finish_reason)
        alone = eng.generate(PROMPTS[0], SamplingParams(**{**params.__dict__, "n": 1, "seed": c.seed}))[0].completions[0]
        assert alone.token_ids == c.token_ids
    assert reasons == {"stop", "length"}
    assert got[0].num_tokens == 5


def test_eos_from_generation_config_stops_a_row(models):
    model, tok = models["teacher"]
    eng = Engine(model, tok)
    assert tok.eos_token_id in eng.eos_ids
    greedy = eng.generate(PROMPTS[:2], SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True))
    a, b = greedy[0].completions[0].token_ids, greedy[1].completions[0].token_ids
    eos = next(t for t in a[3:] if t not in b)  # ends prompt 0 early, never occurs in prompt 1
    eng.eos_ids = frozenset({eos})
    out = eng.generate(PROMPTS[:2], SamplingParams(max_new_tokens=20, temperature=0))
    k = a.index(eos)
    assert out[0].completions[0].token_ids == a[:k + 1]
    assert out[0].completions[0].finish_reason == "stop"
    assert out[1].completions[0].token_ids == b and out[1].completions[0].finish_reason == "length"
    ignored = eng.generate(PROMPTS[0], SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True))
    assert ignored[0].completions[0].token_ids == a


def test_stop_strings(models):
    model, tok = models["teacher"]
    eng = Engine(model, tok)
    free = eng.generate(PROMPTS[1], SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True))[0].completions[0]
    full = tok.decode(free.token_ids)
    stop = next(full[i:i + 2] for i in range(4, len(full) - 2) if full[i:i + 2].isascii() and full[i:i + 2].strip())
    c = eng.generate(PROMPTS[1], SamplingParams(max_new_tokens=30, temperature=0, ignore_eos=True,
                                                stop=[stop]))[0].completions[0]
    assert c.finish_reason == "stop"
    assert c.token_ids == free.token_ids[:c.num_tokens]
    assert stop in tok.decode(c.token_ids) and stop not in tok.decode(c.token_ids[:-1])  # stopped at once
    assert c.text == tok.decode(c.token_ids)[:tok.decode(c.token_ids).find(stop)]
    assert stop not in c.text


def test_context_limit_and_length_finish(models):
    model, tok = models["hybrid"]
    eng = Engine(model, tok)
    ctx = model.config.max_position_embeddings
    ids = [5] * (ctx - 3)
    c = eng.generate([ids], SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True))[0].completions[0]
    assert c.num_tokens == 3 and c.finish_reason == "length"
    with pytest.raises(M1Error, match="longer than the model's context"):
        eng.generate([[5] * ctx], SamplingParams(max_new_tokens=5))
    with pytest.raises(M1Error, match="empty prompt"):
        eng.generate(["  "], SamplingParams())


def test_streaming_callback_reassembles_the_text(models):
    model, tok = models["hybrid"]
    eng = Engine(model, tok)
    events = []
    outs = eng.generate(PROMPTS[:2], SamplingParams(n=2, max_new_tokens=12, temperature=1.0, seed=1, stop=["4"]),
                        on_token=events.append)
    for o in outs:
        for c in o.completions:
            evs = [e for e in events if (e.request, e.sample) == (o.index, c.index)]
            assert len(evs) == c.num_tokens
            assert [e.token_id for e in evs] == c.token_ids
            assert "".join(e.text for e in evs) == c.text
            assert evs[-1].finished and evs[-1].finish_reason == c.finish_reason


@pytest.mark.parametrize("backend", ["fast", "hf"])
def test_on_output_fires_when_a_prompt_ends_mid_batch(models, backend):
    """A prompt whose samples end early is handed over while the others still decode, once, whole."""
    model, tok = models["hybrid"]
    eng = Engine(model, tok, backend=backend)
    tokens_so_far, handed = [0], []
    params = [SamplingParams(n=2, max_new_tokens=m, temperature=1.0, seed=3, ignore_eos=True) for m in (10, 2, 6)]

    def on_token(e):
        tokens_so_far[0] += 1

    outs = eng.generate(PROMPTS[:3], params, on_token=on_token,
                        on_output=lambda o: handed.append((o.index, tokens_so_far[0], o)))
    assert [i for i, _, _ in handed] == [1, 2, 0]  # in the order they ended
    assert [t for _, t, _ in handed] == [6 * 2, 6 * 2 + 4 * 4, 6 * 2 + 4 * 4 + 2 * 4]  # rows x steps
    for i, _, o in handed:
        assert o is outs[i] and [c.num_tokens for c in o.completions] == [params[i].max_new_tokens] * 2


def test_bad_sampling_params():
    for kw, msg in [({"n": 0}, "n "), ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"),
                    ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"), ({"min_p": 2.0}, "min_p"),
                    ({"max_new_tokens": 0}, "max_new_tokens")]:
        with pytest.raises(M1Error, match=msg):
            SamplingParams(**kw).validate()


# ------------------------------------------------------------------------------------ sampler
def _direct_probs(logits: np.ndarray, t: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """The filtered distribution computed the obvious way, one token at a time."""
    x = logits.astype(np.float64) / t
    order = np.argsort(-x, kind="stable")
    keep = np.ones_like(x, dtype=bool)
    if top_k:
        kth = x[order[top_k - 1]]
        keep &= x >= kth
    if top_p < 1:
        p = np.exp(np.where(keep, x, -np.inf) - x.max())
        p /= p.sum()
        mass = 0.0
        kept = np.zeros_like(keep)
        for i in order:
            if not keep[i]:
                continue
            if mass >= top_p:
                break
            kept[i] = True
            mass += p[i]
        keep &= kept
    p = np.exp(np.where(keep, x, -np.inf) - x.max())
    p /= p.sum()
    if min_p:
        keep &= p >= min_p * p.max()
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


@pytest.mark.parametrize("t,top_k,top_p,min_p", [(1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.0, 4, 1.0, 0.0),
                                                  (1.3, 0, 0.7, 0.0), (1.0, 0, 1.0, 0.15), (0.8, 6, 0.9, 0.05)])
def test_sampled_frequencies_match_filtered_softmax(t, top_k, top_p, min_p):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 12, generator=gen) * 1.5
    expected = _direct_probs(logits[0].numpy(), t, top_k, top_p, min_p)
    filt = torch.softmax(filter_logits(logits, t, top_k, top_p, min_p), -1)[0].double().numpy()
    assert np.allclose(filt, expected, atol=1e-6)
    rows = 6000
    gens = [torch.Generator().manual_seed(1000 + i) for i in range(rows)]
    toks = sample_tokens(logits.expand(rows, -1), torch.full((rows,), t), torch.full((rows,), top_k),
                         torch.full((rows,), top_p), torch.full((rows,), min_p), gens)
    counts = np.bincount(toks.numpy(), minlength=12)
    assert counts[expected == 0].sum() == 0  # filtered tokens are never drawn
    live = expected > 0
    chi2 = (((counts[live] - rows * expected[live]) ** 2) / (rows * expected[live])).sum()
    assert chi2 < _chi2_limit(max(1, live.sum() - 1)), (chi2, counts, expected)


@pytest.mark.parametrize("widths", [(2, 5), (64, 1024)])
def test_filter_logits_prefix_widths_equal_direct_filter(monkeypatch, widths):
    """top-k / top-p from a sorted prefix (topk, widened for rows whose nucleus does not end inside it,
    then a full sort) keep exactly the tokens the one-token-at-a-time filter keeps, row by row."""
    import m1.engine.sampling as sampling

    monkeypatch.setattr(sampling, "TOP_P_WIDTHS", widths)
    gen = torch.Generator().manual_seed(3)
    rows, vocab = 40, 30
    # rows from peaked (nucleus of 1-2 tokens) to flat (nucleus of most of the vocabulary), with ties
    logits = torch.randn(rows, vocab, generator=gen) * torch.linspace(6, 0.1, rows)[:, None]
    logits[::7, :4] = logits[::7, :1]  # four-way ties at the top
    t = torch.rand(rows, generator=gen) + 0.3
    top_k = torch.randint(0, 12, (rows,), generator=gen)
    top_p = torch.where(torch.rand(rows, generator=gen) < 0.2, 1.0, torch.rand(rows, generator=gen) * 0.98 + 0.01)
    x = filter_logits(logits, t, top_k, top_p, 0.0)
    for i in range(rows):
        expected = _direct_probs(logits[i].numpy(), float(t[i]), int(top_k[i]), float(top_p[i]), 0.0)
        got = torch.softmax(x[i].double(), -1).numpy()
        assert np.array_equal(got > 0, expected > 0), (i, widths)
        assert np.allclose(got, expected, atol=1e-6)


def test_inverse_cdf_draw_edges():
    from m1.engine import inverse_cdf_draw

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0, 0.0], [0.25, 0.0, 0.25, 0.0, 0.5, 0.0]])
    u_top = 1.0 - 2.0 ** -53  # rounds u * total up to total
    for u, expected in [(0.0, [1, 0]), (0.4999, [1, 2]), (0.5, [3, 4]), (u_top, [3, 4])]:
        got = inverse_cdf_draw(probs, torch.full((2,), u, dtype=torch.float64))
        assert got.tolist() == expected, (u, got)
    # unnormalised rows: the draw is relative to the row's own total
    assert inverse_cdf_draw(probs * 3, torch.tensor([0.6, 0.6], dtype=torch.float64)).tolist() == [3, 4]


def test_greedy_rows_and_per_row_parameters():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 50, generator=gen)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    toks = sample_tokens(logits, torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0, 1, 0]), torch.tensor([1.0, 1.0, 1.0]),
                         torch.tensor([0.0, 0.0, 0.0]), gens)
    assert toks.tolist() == [int(logits[0].argmax()), int(logits[1].argmax()), int(logits[2].argmax())]  # top_k=1


def test_engine_first_token_distribution(models):
    """End to end: first sampled tokens of 3000 replicated rows follow softmax(logits / T) with top-k."""
    model, tok = models["hybrid"]
    eng = Engine(model, tok)
    ids = eng.encode(PROMPTS[0])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    t, k = 1.5, 8
    expected = _direct_probs(logits.numpy(), t, k, 1.0, 0.0)
    rows = 3000
    out = eng.generate([ids], SamplingParams(n=rows, max_new_tokens=1, temperature=t, top_k=k, seed=0))[0]
    counts = np.bincount([c.token_ids[0] for c in out.completions], minlength=len(expected))
    live = expected > 0
    assert counts[~live].sum() == 0
    chi2 = (((counts[live] - rows * expected[live]) ** 2) / (rows * expected[live])).sum()
    assert chi2 < _chi2_limit(int(live.sum()) - 1), (chi2, counts[live], expected[live])


def test_static_step_with_key_buckets_equals_fast_step(tiny_hybrid, monkeypatch):
    """The static-shape step that CUDA graphs capture (rows padded to a power of two after rows
    finish, keys read in buckets, buffers reset and reused by the next group), run eagerly here:
    the same samples as the dynamic fast step."""
    import m1.engine.graphs as graphs_mod
    from m1.model.checkpoint import load_model

    model, tok = load_model(tiny_hybrid)
    monkeypatch.setattr(graphs_mod, "GRAPH_KEY_BUCKET", 8)
    params = [SamplingParams(n=3, max_new_tokens=9 + 7 * i, temperature=0.9, seed=i, ignore_eos=True)
              for i in range(3)]
    params[1].max_new_tokens = 30  # rows end at different steps: compaction, nbb 9 -> 8 -> 4 ...
    want = Engine(model, tok).generate(PROMPTS[:3], params)
    eng = Engine(model, tok)
    _static_on_cpu(eng)  # on CPU the graph step runs its static step eagerly
    widths = []
    real = eng.decode.static
    eng.decode.static = lambda st, toks, kb=None: widths.append((len(toks), kb)) or real(st, toks, kb)
    for _ in range(2):  # the second call resets and reuses the first call's buffers
        got = eng.generate(PROMPTS[:3], params)
        assert [[c.token_ids for c in o.completions] for o in got] == [[c.token_ids for c in o.completions]
                                                                      for o in want]
    assert eng.static.kept is not None and eng.static.kept.rows == 9
    assert {w for w, _ in widths} >= {9, 8, 4} and {kb for _, kb in widths} >= {16, 24, 32}
    assert all(kb % 8 == 0 or kb == eng.static.kept.cap for _, kb in widths)
    # the kept buffers die with the engine, without waiting for the cycle collector (GPU memory)
    import gc
    import weakref

    eng2 = Engine(model, tok)
    _static_on_cpu(eng2)
    eng2.generate(PROMPTS[:1], SamplingParams(max_new_tokens=3, temperature=0))
    ref = weakref.ref(eng2.static.kept)
    gc.disable()
    try:
        del eng2
        assert ref() is None
    finally:
        gc.enable()
    eng.release()
    assert eng.static.kept is None


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_step_on_cpu_equals_fast_step(tiny_hybrid, monkeypatch):
    """Engine(compile=True) on CPU: the torch.compile'd static step (key buckets crossed, rows
    compacted) samples what the eager step samples, and a second call compiles nothing new."""
    import m1.engine.graphs as graphs_mod
    from torch._dynamo.utils import counters

    from m1.model.checkpoint import load_model

    model, tok = load_model(tiny_hybrid)
    monkeypatch.setattr(graphs_mod, "GRAPH_KEY_BUCKET", 8)
    params = [SamplingParams(n=3, max_new_tokens=9 + 7 * i, temperature=0.9, seed=i, ignore_eos=True)
              for i in range(3)]
    params[1].max_new_tokens = 30
    want = [[c.token_ids for c in o.completions] for o in Engine(model, tok).generate(PROMPTS[:3], params)]
    torch._dynamo.reset()
    eng = Engine(model, tok, compile=True)
    compiled, key_lengths = eng.static.compiled, []
    eng.static.compiled = lambda st, toks, kb: key_lengths.append(kb) or compiled(st, toks, kb)
    got = [[c.token_ids for c in o.completions] for o in eng.generate(PROMPTS[:3], params)]
    assert got == want
    assert len(set(key_lengths)) >= 3 and all(kb % 8 == 0 or kb == eng.static.kept.cap for kb in key_lengths)
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 4  # key length and rows turn symbolic instead of one compile per bucket
    got = [[c.token_ids for c in o.completions] for o in eng.generate(PROMPTS[:3], params)]
    assert got == want and counters["stats"]["unique_graphs"] == graphs


def test_ssm_state_in_model_dtype(tiny_hybrid):
    """ssm_dtype: the SSM state buffers in bf16 (half the bytes per step), updates in float32."""
    from m1.model.checkpoint import load_model

    model, tok = load_model(tiny_hybrid)
    params = SamplingParams(n=2, max_new_tokens=6, temperature=0)
    want = Engine(model, tok).generate(PROMPTS[:2], params)
    eng = Engine(model, tok, ssm_dtype="bfloat16")
    _static_on_cpu(eng)  # keeps the buffers for inspection (the static step, eagerly on CPU)
    got = eng.generate(PROMPTS[:2], params)
    assert all(t.dtype == torch.bfloat16 for t in eng.static.kept.ssm)
    full, half = Engine(model, tok).row_bytes(100), eng.row_bytes(100)
    cfg = model.config
    n_mamba = sum(t == "linear_attention" for t in cfg.layer_types)
    assert full - half == n_mamba * cfg.mamba_n_heads * cfg.mamba_d_head * cfg.mamba_d_state * 2
    assert [[c.token_ids for c in o.completions] for o in got] == [[c.token_ids for c in o.completions] for o in want]
    with pytest.raises(M1Error, match="ssm_dtype"):
        Engine(model, tok, ssm_dtype="int8")
    with pytest.raises(M1Error, match="ssm_dtype"):
        Engine(model, tok, ssm_dtype="half-ish")


def test_cpu_prefill_uses_small_scan_chunks_and_restores_them(tiny_hybrid, monkeypatch):
    import m1.model.kernels
    from m1.model.checkpoint import load_model

    model, tok = load_model(tiny_hybrid)
    from m1.model.kernels import mamba_mixers

    mixers = mamba_mixers(model)
    saved = mixers[0].chunk_size
    seen = []
    hook = mixers[0].register_forward_pre_hook(lambda mod, args: seen.append(mod.chunk_size))
    monkeypatch.setattr(m1.model.kernels, "CPU_SCAN_CHUNK", 4)
    params = SamplingParams(n=2, max_new_tokens=8, temperature=0)
    got = Engine(model, tok).generate(PROMPTS[:2], params)
    hook.remove()
    assert seen[0] == 4 and all(m.chunk_size == saved for m in mixers) and saved > 4
    for prompt, o in zip(PROMPTS[:2], got):  # HF generate prefills with the checkpoint's chunk size
        assert o.completions[0].token_ids == _hf_greedy(model, tok, prompt, 8)


# ------------------------------------------------------------------------------------ GPU only
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("mode", ["eager", "graphs", "compile"])
def test_cuda_engine_matches_cpu_reference(tiny_hybrid, mode):
    """On CUDA (eager, CUDA graphs, torch.compile) greedy samples equal the CPU reference backend."""
    from m1.model.checkpoint import load_model

    params = [SamplingParams(n=3, max_new_tokens=16, temperature=0), SamplingParams(n=2, max_new_tokens=12, temperature=0)]
    model, tok = load_model(tiny_hybrid)
    ref = Engine(model, tok, backend="hf").generate(PROMPTS[:2], params)
    gpu_model, _ = load_model(tiny_hybrid, device="cuda")
    eng = Engine(gpu_model, tok, compile=mode == "compile", cuda_graphs=mode == "graphs")
    assert (eng.static.mode if eng.static else None) == {"eager": None, "graphs": "graphs", "compile": "compile"}[mode]
    for _ in range(2):  # the second run replays what the first compiled / captured
        got = eng.generate(PROMPTS[:2], params)
        assert [[c.token_ids for c in o.completions] for o in got] == [[c.token_ids for c in o.completions] for o in ref]
    # a group of another shape frees the buffers and graphs, then captures anew (a later pool)
    short = [SamplingParams(n=1, max_new_tokens=3, temperature=0)] * 2
    assert [o.completions[0].token_ids for o in eng.generate(PROMPTS[:2], short)] == \
        [o.completions[0].token_ids[:3] for o in ref]
    got = eng.generate(PROMPTS[:2], params)
    assert [[c.token_ids for c in o.completions] for o in got] == [[c.token_ids for c in o.completions] for o in ref]


def test_bf16_cpu_decode_uses_bucketed_key_lengths(tiny_hybrid, monkeypatch):
    """bf16 on CPU: the attention reads key lengths in multiples of KEY_BUCKET (masked beyond the
    sequence), so oneDNN sees few shapes; the tokens equal those of exact-length attention."""
    import m1.engine.state as state_mod
    from m1.model.checkpoint import load_model

    model, tok = load_model(tiny_hybrid, dtype=torch.bfloat16)
    eng = Engine(model, tok)
    params = [SamplingParams(n=2, max_new_tokens=40, temperature=0.8, seed=7 * i, ignore_eos=True) for i in range(4)]
    monkeypatch.setattr(state_mod, "KEY_BUCKET", 16)
    lengths, real = set(), torch.matmul

    def spy(a, b):
        if a.dim() == 4 and b.dim() == 4 and a.shape[-2] * a.shape[1] == model.config.num_attention_heads \
                and b.shape[-1] != a.shape[-1]:
            lengths.add(b.shape[-1])  # q (nb, KV, H/KV, hd) @ K^T (nb, KV, hd, keys)
        return real(a, b)

    monkeypatch.setattr(torch, "matmul", spy)
    bucketed = eng.generate(PROMPTS, params)
    monkeypatch.setattr(torch, "matmul", real)
    # multiples of the bucket, the last one capped at the state's capacity
    assert len(lengths) >= 2 and all(n % 16 == 0 for n in sorted(lengths)[:-1]) and len(lengths) <= 5
    monkeypatch.setattr(state_mod, "KEY_BUCKET", 0)
    exact = eng.generate(PROMPTS, params)
    assert [[c.token_ids for c in r.completions] for r in bucketed] == [[c.token_ids for c in r.completions]
                                                                        for r in exact]


def test_cpu_lm_head_slices_equal_one_projection(models, monkeypatch):
    """The CPU float32 output projection runs in vocabulary slices (ragged here: 7 rows each); the
    logits and greedy tokens equal those of the single projection."""
    import m1.engine.step as step_mod

    model, tok = models["hybrid"]
    monkeypatch.setattr(step_mod, "LM_HEAD_SLICE", 7)
    sliced = Engine(model, tok, backend="fast")
    assert len(sliced.decode.head_slices) == -(-model.config.vocab_size // 7) > 1
    plain = Engine(model, tok, backend="fast")
    plain.decode.head_slices = None
    h = torch.randn(5, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = torch.nn.functional.linear(h, model.lm_head.weight)
        assert torch.allclose(sliced.decode.lm_head(h), ref, atol=1e-6, rtol=1e-6)
    params = SamplingParams(max_new_tokens=12, temperature=0)
    assert ([o.completions[0].token_ids for o in sliced.generate(PROMPTS, params)]
            == [o.completions[0].token_ids for o in plain.generate(PROMPTS, params)])


# ------------------------------------------------------------- vllm backend, against a stand-in
def test_vllm_backend_maps_requests_and_outputs(tiny_hybrid, models, fake_vllm):
    model, tok = models["hybrid"]
    fake = fake_vllm(tok)
    eng = Engine.from_pretrained(tiny_hybrid, backend="vllm", gpu_memory_utilization=0.5, max_batch_size=8)
    assert eng.backend == "vllm"
    assert fake.llm_kw == {"model": str(tiny_hybrid), "dtype": "float32", "gpu_memory_utilization": 0.5}
    fast = Engine(model, tok, backend="fast")

    sp = SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=0, min_p=0.05, seed=11, max_new_tokens=20,
                        stop=["\n\n"])
    outs = eng.generate([PROMPTS[0], fast.encode(PROMPTS[1])], sp, chat=True)
    inputs, vparams = fake.calls[-1]
    # the same prompt ids as the fast backend (chat template applied once, token ids passed through)
    assert inputs == [{"prompt_token_ids": fast.encode(PROMPTS[0], chat=True)},
                      {"prompt_token_ids": fast.encode(PROMPTS[1])}]
    v = vars(vparams[0])
    assert (v["n"], v["temperature"], v["top_p"], v["top_k"], v["min_p"], v["seed"], v["max_tokens"],
            v["stop"], v["stop_token_ids"], v["ignore_eos"]) == (3, 0.7, 0.9, -1, 0.05, 11, 20, ["\n\n"], None, False)
    assert [len(o.completions) for o in outs] == [3, 3]
    c = outs[0].completions
    assert [x.finish_reason for x in c] == ["length", "stop", "length"]  # vLLM's "abort" is not a length stop
    assert c[0].token_ids == inputs[0]["prompt_token_ids"][-2:] and c[0].num_tokens == 2
    assert outs[1].prompt_token_ids == inputs[1]["prompt_token_ids"] and outs[0].prompt == PROMPTS[0]

    # max_tokens never runs past the context; bad input is refused before vLLM sees it
    near = [5] * (model.config.max_position_embeddings - 4)
    eng.generate(near, SamplingParams(max_new_tokens=100))
    assert vars(fake.calls[-1][1][0])["max_tokens"] == 4
    n_calls = len(fake.calls)
    for bad, msg in [(([7] * model.config.max_position_embeddings,), "longer than the model's context"),
                     (("  ",), "empty prompt"), ((PROMPTS[0], SamplingParams(top_p=0)), "top_p")]:
        with pytest.raises(M1Error, match=msg):
            eng.generate(*bad)
    with pytest.raises(M1Error, match="streaming"):
        eng.generate(PROMPTS[0], on_token=lambda e: None)
    assert len(fake.calls) == n_calls


def test_vllm_backend_missing_is_one_error(tiny_hybrid, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(M1Error, match="needs the vllm package"):
        Engine.from_pretrained(tiny_hybrid, backend="vllm")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_non_finite_logits_are_refused_not_sampled(tiny_hybrid, temperature):
    """NaN weights used to give greedy text silently, or token ids past the vocabulary when sampling."""
    from m1.engine import NonFiniteLogits
    from m1.model.checkpoint import load_model

    model, tok = load_model(tiny_hybrid)
    with torch.no_grad():
        model.get_output_embeddings().weight[5, 0] = float("nan")
    with pytest.raises(NonFiniteLogits, match="not finite"):
        Engine(model, tok).generate(PROMPTS[:2], SamplingParams(max_new_tokens=4, temperature=temperature, seed=0))
    logits = torch.zeros(2, 7)
    logits[1, 3] = float("inf")
    with pytest.raises(NonFiniteLogits):
        sample_tokens(logits, 1.0, 0, 1.0, 0.0, [torch.Generator().manual_seed(i) for i in range(2)])
    assert sample_tokens(torch.zeros(2, 7), 0.0, 0, 1.0, 0.0, [None, None]).tolist() == [0, 0]
