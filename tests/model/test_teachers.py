"""Teacher loading: the in-process copy of the last GGUF teacher (m1.model.teachers._GGUF_LOADED)."""

import torch

from m1.model import teachers
from m1.model.teachers import load_teacher


def test_a_gguf_teacher_is_parsed_once_and_each_caller_gets_its_own_copy(smollm2_teacher, monkeypatch):
    first = load_teacher("smollm2-135m")  # the session fixture loaded it already: served from the copy kept

    def no_reparse(*a, **k):
        raise AssertionError("the GGUF file was parsed again")

    monkeypatch.setattr(teachers, "_check_gguf", no_reparse)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_reparse)
    second = load_teacher("smollm2-135m")
    assert first.model is not second.model and first.model is not smollm2_teacher.model
    ref = smollm2_teacher.model.state_dict()
    with torch.no_grad():
        for p in first.model.parameters():
            p.add_(1.0)  # a caller that trains its copy
    for name, value in second.model.state_dict().items():
        assert torch.equal(value, ref[name]), name
    third = load_teacher("smollm2-135m")
    assert torch.equal(third.model.lm_head.weight, ref["lm_head.weight"])
    assert not torch.equal(first.model.lm_head.weight, ref["lm_head.weight"])
    ids = smollm2_teacher.tokenizer("2 + 3 = 5")["input_ids"]
    assert third.tokenizer("2 + 3 = 5")["input_ids"] == ids


def test_the_kept_copy_is_dropped_when_the_file_changes(tmp_path):
    f = tmp_path / "t.gguf"
    f.write_bytes(b"a" * 10)
    key = teachers._gguf_key(f, torch.float32)
    assert teachers._gguf_key(f, torch.float32) == key
    assert teachers._gguf_key(f, torch.bfloat16) != key
    f.write_bytes(b"b" * 11)
    assert teachers._gguf_key(f, torch.float32) != key
