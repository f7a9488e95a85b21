"""m1.model.convert: exactness of the all-attention mapping, hybrid consistency, layouts."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from m1.errors import M1Error
from m1.model.convert import (ConvertSettings, build_hybrid, calibrate, convert, default_attention_layers,
                              parse_layout)


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


@pytest.mark.parametrize("name", ["llama_tied", "llama_untied", "qwen2"])
def test_all_attention_reproduces_teacher_logits(tiny_teachers, tmp_path, name):
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teachers[name]).eval()
    out = convert(ConvertSettings(teacher=str(tiny_teachers[name]), attn_layers="all"),
                  tmp_path / "h", log=lambda m: None)
    hybrid = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hybrid).__name__ == "GraniteMoeHybridForCausalLM"
    ids = torch.randint(0, teacher.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    # positions past original_max_position_embeddings (64) exercise the llama3 rope scaling
    ids = torch.cat([ids, ids], dim=1)
    diff = (_logits(teacher, ids) - _logits(hybrid, ids)).abs().max().item()
    assert diff <= 1e-5, diff


def test_tied_embeddings_stay_tied(tiny_teachers, tmp_path):
    out = convert(ConvertSettings(teacher=str(tiny_teachers["llama_tied"])), tmp_path / "h", log=lambda m: None)
    hybrid = AutoModelForCausalLM.from_pretrained(out)
    assert hybrid.config.tie_word_embeddings
    assert hybrid.lm_head.weight.data_ptr() == hybrid.model.embed_tokens.weight.data_ptr()


def test_real_teacher_all_attention_is_exact(smollm2_teacher):
    hybrid = build_hybrid(smollm2_teacher.model, list(range(smollm2_teacher.model.config.num_hidden_layers)))
    text = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May."
    ids = smollm2_teacher.tokenizer(text, return_tensors="pt").input_ids
    diff = (_logits(smollm2_teacher.model, ids) - _logits(hybrid, ids)).abs().max().item()
    assert diff <= 1e-5, diff


def test_hybrid_reloads_with_plain_automodel(tiny_teachers, tmp_path):
    from transformers import AutoTokenizer

    from m1.model.convert import calibration_texts

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teachers["qwen2"])
    cal = calibrate(teacher, AutoTokenizer.from_pretrained(tiny_teachers["qwen2"]), calibration_texts(16))
    in_memory = build_hybrid(teacher, [3], seed=0, calibration=cal).eval()
    out = convert(ConvertSettings(teacher=str(tiny_teachers["qwen2"]), attn_layers="3"),
                  tmp_path / "h", log=lambda m: None)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["GraniteMoeHybridForCausalLM"] and "auto_map" not in cfg
    assert "quantization_config" not in cfg
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, teacher.config.vocab_size, (1, 20))
    assert torch.equal(_logits(in_memory, ids), _logits(reloaded, ids))


def test_checkpoint_contents(tiny_hybrid):
    names = {p.name for p in tiny_hybrid.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "m1.json", "tokenizer.json",
            "tokenizer_config.json"} <= names
    rec = json.loads((tiny_hybrid / "m1.json").read_text())
    assert rec["attn_layers"] == [1, 3] and rec["mamba_layers"] == [0, 2] and rec["init"] == "attention"
    assert {"m1", "torch", "transformers"} <= set(rec["versions"])
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_hybrid)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    cfg = json.loads((tiny_hybrid / "config.json").read_text())
    # the names llama.cpp's converter and transformers 4.x read too (5.x maps them on load)
    assert cfg["layer_types"] == ["mamba", "attention", "mamba", "attention"]
    assert json.loads((tiny_hybrid / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert cfg["router_aux_loss_coef"] == 0.0 and cfg["num_local_experts"] == 0
    assert cfg["position_embedding_type"] == "rope" and cfg["rope_theta"] == 500000.0


def test_prefill_equals_token_by_token_decoding(tiny_hybrid):
    model = AutoModelForCausalLM.from_pretrained(tiny_hybrid).eval()
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    full = _logits(model, ids)
    with torch.no_grad():
        out = model(ids[:, :1], use_cache=True)
        steps = [out.logits[:, -1]]
        for t in range(1, ids.shape[1]):
            out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[:, -1])
    assert (torch.stack(steps, 1) - full).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["llama_untied", "qwen2"])
def test_left_padded_row_equals_prompt_alone(tiny_teachers, tmp_path, name):
    out = convert(ConvertSettings(teacher=str(tiny_teachers[name]), attn_layers="2"),
                  tmp_path / "h", log=lambda m: None)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():  # trained-looking conv weights: padding must not leak through the conv window
        for n, p in model.named_parameters():
            if "conv1d" in n:
                p.normal_(0, 0.5)
    g = torch.Generator().manual_seed(2)
    a = torch.randint(3, model.config.vocab_size, (1, 10), generator=g)
    b = torch.randint(3, model.config.vocab_size, (1, 6), generator=g)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    batch = _logits(model, ids, attention_mask=mask, position_ids=pos)
    assert (batch[0] - _logits(model, a)[0]).abs().max().item() < 1e-5
    assert (batch[1, 4:] - _logits(model, b)[0]).abs().max().item() < 1e-5


def test_attention_init_copies_qkv_into_mamba_projection(tiny_teachers):
    from transformers import AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teachers["llama_untied"])
    tok = AutoTokenizer.from_pretrained(tiny_teachers["llama_untied"])
    cal = calibrate(teacher, tok, ["Tom has 12 apples. He buys 7 more.", "What is 3 * 4 - 5?"])
    hybrid = build_hybrid(teacher, [3], calibration=cal)
    tattn, mixer = teacher.model.layers[0].self_attn, hybrid.model.layers[0].mamba
    hid, P = teacher.config.hidden_size, 16
    w = mixer.in_proj.weight
    # x rows come from v_proj with each KV head repeated for its 2 query heads (repeat_kv order)
    v = tattn.v_proj.weight
    assert torch.equal(w[hid:hid + P], v[:P]) and torch.equal(w[hid + P:hid + 2 * P], v[:P])
    assert torch.equal(w[hid + 2 * P:hid + 3 * P], v[P:2 * P])
    assert torch.equal(w[3 * hid:4 * hid], tattn.q_proj.weight)
    assert torch.equal(mixer.out_proj.weight, tattn.o_proj.weight)
    # the gate rows are one shared vector (a per-head scalar the gated norm cancels) ...
    z = w[:hid]
    assert torch.equal(z, z[:1].expand_as(z)) and z.abs().sum() > 0
    # ... the norm restores each head's measured output scale, and there is no skip term
    assert torch.allclose(mixer.norm.weight.view(4, P), cal.head_rms[0][:, None].expand(4, P))
    assert torch.equal(mixer.D, torch.zeros(4))
    with pytest.raises(ValueError, match="calibration"):
        build_hybrid(teacher, [3])
    rand = build_hybrid(teacher, [3], init="random")
    assert torch.equal(rand.model.layers[0].mamba.D, torch.ones(4))
    assert not torch.equal(rand.model.layers[0].mamba.in_proj.weight[3 * hid:4 * hid], tattn.q_proj.weight)
    # everything outside the mixer is copied in both modes
    assert torch.equal(rand.model.layers[0].shared_mlp.output_linear.weight, teacher.model.layers[0].mlp.down_proj.weight)


def test_bfloat16_output(tiny_teachers, tmp_path):
    out = convert(ConvertSettings(teacher=str(tiny_teachers["llama_tied"]), dtype="bfloat16"),
                  tmp_path / "h", log=lambda m: None)
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.dtype == torch.bfloat16


def test_default_layout_spreads_attention_like_m1():
    assert default_attention_layers(28) == [4, 8, 13, 18, 22, 27]
    assert default_attention_layers(30) == [4, 9, 14, 19, 24, 29]
    assert default_attention_layers(4) == [3]
    assert default_attention_layers(10, 0.0) == []
    assert parse_layout("all", 4) == [0, 1, 2, 3] and parse_layout("none", 4) == []
    assert parse_layout("3, 1", 4) == [1, 3]


@pytest.mark.parametrize("spec,msg", [("7", "out of range"), ("-1", "out of range"), ("1,1", "twice"),
                                      (",", "names no layers"), ("a,b", "comma-separated")])
def test_bad_layouts(spec, msg):
    with pytest.raises(M1Error, match=msg):
        parse_layout(spec, 4)


def test_calibration_measures_attention_output_rms(tiny_teachers):
    from transformers import AutoTokenizer

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teachers["qwen2"])
    tok = AutoTokenizer.from_pretrained(tiny_teachers["qwen2"])
    text = "Tom has 12 apples. He buys 7 more."
    cal = calibrate(teacher, tok, [text])
    seen = {}
    h = teacher.model.layers[2].self_attn.o_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        teacher(tok(text, return_tensors="pt", add_special_tokens=False).input_ids)
    h.remove()
    x = seen["x"].reshape(-1, 4, 16).double()
    assert torch.allclose(cal.head_rms[2].double(), x.pow(2).mean(dim=(0, 2)).sqrt(), atol=1e-6)
    assert cal.tokens == x.shape[0]


@pytest.mark.slow
def test_attention_init_beats_random_init_on_heldout_gsm8k(smollm2_teacher):
    """The README's comparison, on a smaller sample: attention init must have lower held-out NLL."""
    from m1.model.convert import calibration_texts
    from m1.tasks import load_task
    from m1.train.heldout import heldout_loss

    texts = [f"{p.question}\n{p.solution}" for p in load_task("gsm8k", split="test")[:12]]
    layers = default_attention_layers(30)
    cal = calibrate(smollm2_teacher.model, smollm2_teacher.tokenizer, calibration_texts(16))
    tok = smollm2_teacher.tokenizer
    att = heldout_loss(build_hybrid(smollm2_teacher.model, layers, calibration=cal).eval(), tok, texts, max_len=128)
    rnd = heldout_loss(build_hybrid(smollm2_teacher.model, layers, init="random").eval(), tok, texts, max_len=128)
    assert att.nll < rnd.nll - 1.0, (att.nll, rnd.nll)


def test_teacher_dir_without_tokenizer_is_one_clear_error(tiny_teachers, tmp_path):
    """transformers 5.x returns an empty tokenizer for such a dir; convert then died with KeyError: 0."""
    import shutil

    from m1.errors import M1Error
    from m1.model.convert import ConvertSettings, convert

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_teachers["llama_tied"] / f, bare / f)
    with pytest.raises(M1Error, match="no tokenizer files"):
        convert(ConvertSettings(teacher=str(bare)), tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_bad_layout_syntax_fails_before_the_teacher_loads(monkeypatch, tmp_path):
    import m1.model.teachers
    from m1.errors import M1Error
    from m1.model.convert import ConvertSettings, convert

    def never(*a, **k):
        raise AssertionError("the teacher was loaded before the layout was checked")

    monkeypatch.setattr(m1.model.teachers, "load_teacher", never)
    for spec in ("a,b", ",", "1,1"):
        with pytest.raises(M1Error):
            convert(ConvertSettings(teacher="smollm2-135m", attn_layers=spec), tmp_path / "o", log=lambda m: None)
    # "all" / "none" / the default reach the teacher (the early check must not expand them: it once built
    # a list of 2^30 layers for "all")
    class Reached(Exception):
        pass

    def reached(*a, **k):
        raise Reached

    monkeypatch.setattr(m1.model.teachers, "load_teacher", reached)
    for spec in ("all", "none", None):
        with pytest.raises(Reached):
            convert(ConvertSettings(teacher="smollm2-135m", attn_layers=spec), tmp_path / "o", log=lambda m: None)


# ------------------------------------------------------------------ --attn-layers auto
def test_most_sensitive_layers_takes_the_top_fraction_ties_to_the_lower_index():
    from m1.model.convert import most_sensitive_layers

    assert most_sensitive_layers([0.1, 0.5, 0.2, 0.5, 0.0], 0.4) == [1, 3]
    assert most_sensitive_layers([0.3, 0.3, 0.3, 0.3], 0.5) == [0, 1]
    assert most_sensitive_layers([0.1, 0.9, 0.2], 0.0) == []
    with pytest.raises(M1Error, match="between 0 and 1"):
        most_sensitive_layers([0.1], 1.5)


def test_layer_sensitivity_equals_the_kl_of_the_one_mamba_layer_hybrid(tiny_teachers):
    """The hook-based score of layer i against the reference: a hybrid built with only layer i as
    Mamba (every other layer attention, which is exact), its KL to the teacher on the same tokens."""
    from transformers import AutoTokenizer

    from m1.model.convert import calibration_texts, layer_sensitivity
    from m1.train.losses import forward_kl_per_token

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teachers["qwen2"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_teachers["qwen2"])
    cal = calibrate(teacher, tok, calibration_texts(4))
    text = calibration_texts(1)[0]
    scores = layer_sensitivity(teacher, tok, [text], cal, max_len=10_000)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    ref = _logits(teacher, ids).float()
    n = teacher.config.num_hidden_layers
    assert len(scores) == n
    for i in range(n):
        one = build_hybrid(teacher, [j for j in range(n) if j != i], calibration=cal).eval()
        want = forward_kl_per_token(_logits(one, ids).float(), ref).double().mean().item()
        assert scores[i] > 0 and abs(scores[i] - want) <= 1e-4 * max(1.0, want), (i, scores[i], want)
    # the teacher is left as it was: no hook or replayed forward stays behind
    assert torch.equal(_logits(teacher, ids).float(), ref)
    assert not any("forward" in vars(layer) for layer in teacher.model.layers)


def test_layer_sensitivity_replaying_the_earlier_layers_is_bit_identical_to_running_them(tiny_teachers):
    """The fast path (layers before i replay the teacher's recorded outputs) against running the whole
    teacher with layer i's attention swapped: the same float64 scores, bit for bit."""
    from transformers import AutoTokenizer

    from m1.model.convert import calibration_texts, layer_sensitivity
    from m1.train.losses import forward_kl_per_token

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teachers["llama_untied"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_teachers["llama_untied"])
    cal = calibrate(teacher, tok, calibration_texts(4))
    texts = calibration_texts(3)
    scores = layer_sensitivity(teacher, tok, texts, cal, max_len=32, max_rows=3)
    stream = [t for text in texts for t in tok(text, add_special_tokens=False)["input_ids"]]
    ids = torch.tensor(stream[:3 * 32]).reshape(3, 32)
    mamba = build_hybrid(teacher, [], calibration=cal).eval()
    with torch.no_grad():
        ref = teacher(input_ids=ids).logits.float()
        want = []
        for i, layer in enumerate(teacher.model.layers):
            mixer = mamba.model.layers[i].mamba
            def swap(_m, args, kwargs, out, mixer=mixer):
                y = mixer(hidden_states=kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
                return (y, *out[1:]) if isinstance(out, tuple) else y

            hook = layer.self_attn.register_forward_hook(swap, with_kwargs=True)
            want.append(forward_kl_per_token(teacher(input_ids=ids).logits.float(), ref).double().mean().item())
            hook.remove()
    assert scores == want
    assert len(set(scores)) == len(scores)  # every layer scored on its own swap


def test_convert_auto_keeps_the_most_sensitive_layers(tiny_teachers, tmp_path):
    from m1.model.convert import most_sensitive_layers

    out = convert(ConvertSettings(teacher=str(tiny_teachers["llama_untied"]), attn_layers="auto", attn_fraction=0.5),
                  tmp_path / "h", log=lambda m: None)
    rec = json.loads((out / "m1.json").read_text())
    assert len(rec["layer_sensitivity"]) == 4
    assert rec["attn_layers"] == most_sensitive_layers(rec["layer_sensitivity"], 0.5)
    assert len(rec["attn_layers"]) == 2
    cfg = json.loads((out / "config.json").read_text())
    assert [i for i, t in enumerate(cfg["layer_types"]) if t == "attention"] == rec["attn_layers"]


def test_convert_auto_needs_the_attention_init(tmp_path, monkeypatch):
    import m1.model.teachers

    monkeypatch.setattr(m1.model.teachers, "load_teacher", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    with pytest.raises(M1Error, match="needs --init attention"):
        convert(ConvertSettings(teacher="smollm2-135m", attn_layers="auto", init="random"),
                tmp_path / "o", log=lambda m: None)
