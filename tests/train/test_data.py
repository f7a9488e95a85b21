"""m1.train.data: m1 sft's examples (GSM8K rows boxed, bad rows named), JSONL rows with clear errors, chat rendering,
the held-out split, deterministic batches."""

from __future__ import annotations

import json

import pytest

from m1.errors import M1Error
from m1.model.tiny import tiny_tokenizer
from m1.train.data import (BatchPlan, collate, gsm8k_train_rows, load_data, load_sft_examples, micro_batches,
                           read_jsonl_rows, read_rows, read_sft_jsonl, solution_from_fields)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_gsm8k_row_becomes_boxed_solution_without_calculator_annotations():
    row = {"question": "q", "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips.\nSo 1,056 in all.\n#### 1,080"}
    sol = solution_from_fields(row, "f:1")
    assert "<<" not in sol and ">>" not in sol and "####" not in sol
    assert "48/2 = 24 clips" in sol
    assert sol.endswith("The answer is \\boxed{1080}.")


def test_solution_gets_boxed_answer_appended_or_kept():
    assert solution_from_fields({"solution": "2 + 2 = 4.", "answer": "4"}, "f:1").endswith("\\boxed{4}.")
    boxed = "So it is \\boxed{\\frac{1}{2}}."
    assert solution_from_fields({"solution": boxed}, "f:1") == boxed


def test_builtin_data_specs():
    ex = load_sft_examples("gsm8k-train", limit=3)
    assert len(ex) == 3
    for e in ex:
        assert e.prompt[-1]["role"] == "user" and "\\boxed{}" in e.prompt[-1]["content"]
        assert "<<" not in e.solution and e.solution.rstrip(".").endswith("}")
    ar = load_sft_examples("arith:steps=1,digits=1", limit=5, seed=3)
    assert len(ar) == 5 and all("\\boxed{" in e.solution for e in ar)
    again = load_sft_examples("arith:steps=1,digits=1", limit=5, seed=3)
    assert [e.solution for e in ar] == [e.solution for e in again]
    with pytest.raises(M1Error, match="no train split.*--data math500:split=test"):
        load_sft_examples("math500")
    with pytest.raises(M1Error, match="unknown task"):
        load_sft_examples("nonsense-set")


def test_bad_sft_rows_name_file_and_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"question": "1+1?", "solution": "1+1=2 so \\boxed{2}"}) + "\n"
                 + json.dumps({"question": "2+2?"}) + "\n")
    with pytest.raises(M1Error, match=rf"{f}:2: row has no solution"):
        read_sft_jsonl(f)
    f.write_text(json.dumps({"solution": "\\boxed{2}"}) + "\n")
    with pytest.raises(M1Error, match=rf"{f}:1: row has no question"):
        read_sft_jsonl(f)
    f.write_text("{not json\n")
    with pytest.raises(M1Error, match=rf"{f}:1: not valid JSON"):
        read_sft_jsonl(f)
    f.write_text(json.dumps({"question": "q", "solution": "no box here"}) + "\n")
    with pytest.raises(M1Error, match="does not end in"):
        read_sft_jsonl(f)
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(M1Error, match="assistant turn"):
        read_sft_jsonl(f)
    ok = tmp_path / "ok.jsonl"
    ok.write_text("\n" + json.dumps({"messages": [{"role": "user", "content": "1+1?"},
                                                  {"role": "assistant", "content": "\\boxed{2}"}]}) + "\n")
    (ex,) = read_sft_jsonl(ok)
    assert ex.prompt == [{"role": "user", "content": "1+1?"}] and ex.solution == "\\boxed{2}"
    assert ex.where == f"{ok}:2"


def test_text_and_messages_rows(tmp_path, tok):
    f = _write(tmp_path / "d.jsonl", [
        json.dumps({"text": "Tom has 12 apples."}),
        "",  # blank lines are skipped
        json.dumps({"messages": [{"role": "user", "content": "What is 3 * 4?"},
                                 {"role": "assistant", "content": "12"}]}),
    ])
    rows = read_jsonl_rows(f)
    assert [r.where for r in rows] == [f"{f}:1", f"{f}:3"]
    data = load_data(str(f), tok, seq_len=64, heldout=0)
    texts = [tok.decode(ids) for ids in data.train]
    assert "Tom has 12 apples." in texts
    assert "<|im_start|>user\nWhat is 3 * 4?<|im_end|>\n<|im_start|>assistant\n12<|im_end|>\n" in texts


@pytest.mark.parametrize("line,needle", [
    ("{not json", "not valid JSON"),
    (json.dumps([1, 2]), "expected a JSON object"),
    (json.dumps({"text": ""}), "empty 'text'"),
    (json.dumps({"text": 3}), "'text' must be a string"),
    (json.dumps({"prompt": "x"}), "exactly one of 'text' or 'messages'"),
    (json.dumps({"text": "a", "messages": []}), "exactly one of"),
    (json.dumps({"messages": []}), "non-empty list"),
    (json.dumps({"messages": [{"role": "user"}]}), "message 0"),
    (json.dumps({"messages": [{"role": "user", "content": "  "}]}), "every message is empty"),
])
def test_bad_rows_name_file_and_line(tmp_path, line, needle):
    f = _write(tmp_path / "bad.jsonl", [json.dumps({"text": "fine"}), line])
    with pytest.raises(M1Error) as e:
        read_jsonl_rows(f)
    assert f"{f}:2: " in str(e.value) and needle in str(e.value)


def test_missing_and_empty_sources(tmp_path, tok):
    with pytest.raises(M1Error, match="not found"):
        read_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(M1Error, match="no rows"):
        read_rows(str(_write(tmp_path / "e.jsonl", ["", "  "])))
    with pytest.raises(M1Error, match="empty"):
        read_rows("")
    with pytest.raises(M1Error, match="directory"):
        read_rows(str(tmp_path))


def test_messages_need_a_chat_template(tmp_path, tok):
    f = _write(tmp_path / "m.jsonl", [json.dumps({"messages": [{"role": "user", "content": "hi"}]})] * 3)
    tok2 = tiny_tokenizer()
    tok2.chat_template = None
    with pytest.raises(M1Error, match=f"{f}:1: .*chat template"):
        load_data(str(f), tok2, heldout=0)


def test_gsm8k_train_rows(tok):
    rows = gsm8k_train_rows()
    assert len(rows) == 7473
    first = rows[0]
    assert [m["role"] for m in first.prompt] == ["user"]
    assert first.prompt[0]["content"].startswith("Natalia sold clips") and "\\boxed{}" in first.prompt[0]["content"]
    assert first.completion.endswith("\\boxed{72}.") and "<<" not in first.completion


def test_seq_len_heldout_split_and_combining_sources(tmp_path, tok):
    f = _write(tmp_path / "d.jsonl", [json.dumps({"text": f"Tom has {i} apples and {i + 1} more " * 5})
                                      for i in range(20)])
    g = _write(tmp_path / "g.jsonl", [json.dumps({"text": "Solve step by step."})] * 4)
    data = load_data(f"{f},{g}", tok, seq_len=10, heldout=5, seed=3)
    assert len(data.train) == 19 and len(data.heldout_texts) == 5
    assert max(len(r) for r in data.train) == 10
    again = load_data(f"{f},{g}", tok, seq_len=10, heldout=5, seed=3)
    assert again.train == data.train and again.heldout_texts == data.heldout_texts
    other = load_data(f"{f},{g}", tok, seq_len=10, heldout=5, seed=4)
    assert other.heldout_texts != data.heldout_texts
    with pytest.raises(M1Error, match="hold out"):
        load_data(str(g), tok, heldout=4)
    with pytest.raises(M1Error, match="seq-len"):
        load_data(str(g), tok, seq_len=1, heldout=0)


def test_batch_plan_is_deterministic_and_covers_each_epoch():
    plan = BatchPlan(10, 4, seed=0)
    first_epoch = plan.rows(0) + plan.rows(1) + plan.rows(2)[:2]
    assert sorted(first_epoch) == list(range(10))
    assert BatchPlan(10, 4, seed=0).rows(7) == plan.rows(7)
    assert BatchPlan(10, 4, seed=1).rows(0) != plan.rows(0)


def test_micro_batches_same_for_accumulation_and_processes():
    lengths = [5, 1, 9, 3, 7, 2, 8, 4]
    rows = list(range(8))
    one = micro_batches(rows, lengths, micro=2, world=1, rank=0)  # 1 process, accumulation 4
    two = [micro_batches(rows, lengths, micro=2, world=2, rank=r) for r in (0, 1)]  # 2 processes, accumulation 2
    assert one == [[1, 5], [3, 7], [0, 4], [6, 2]]
    assert two[0] == [one[0], one[2]] and two[1] == [one[1], one[3]]


def test_collate_right_pads():
    ids, mask = collate([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_split_spec_keeps_task_options_together():
    from m1.train.data import split_spec

    assert split_spec("gsm8k-train,arith:steps=2,digits=1,x.jsonl") == ["gsm8k-train", "arith:steps=2,digits=1",
                                                                          "x.jsonl"]
    assert split_spec("arith:steps=1,digits=1,n=20") == ["arith:steps=1,digits=1,n=20"]
    assert split_spec(" a.jsonl , ,arith ,b.jsonl") == ["a.jsonl", "arith", "b.jsonl"]
    assert split_spec("arith:n=3,dir/k=v.jsonl") == ["arith:n=3", "dir/k=v.jsonl"]  # a path is never an option


def test_task_rows_know_their_prompt(tmp_path, tok):
    """Task rows: ids = the chat template's prompt + completion, prompt_lens = where the completion starts
    (the prompt alone ends in the generation prompt); text rows have prompt_len 0; seq_len cuts both."""
    from m1.train.data import render_prompt_completion, task_rows

    rows = task_rows("arith:steps=1,digits=1,n=6", seed=1)  # the seed picks the generated problems
    f = _write(tmp_path / "t.jsonl", [json.dumps({"text": "Tom has 12 apples."})])
    data = load_data(f"arith:steps=1,digits=1,n=6,{f}", tok, seq_len=4096, heldout=2, seed=1)
    assert data.sources == ["arith:steps=1,digits=1,n=6", str(f)]
    assert len(data.train) == len(data.prompt_lens) == 5 and len(data.heldout_prompt_lens) == 2
    rendered = {tuple(render_prompt_completion(tok, r.prompt, r.completion)[0]): r for r in rows}
    for ids, n in zip(data.train + data.heldout_ids, data.prompt_lens + data.heldout_prompt_lens):
        if n == 0:
            assert tok.decode(ids) == "Tom has 12 apples."
            continue
        r = rendered[tuple(ids)]
        prompt_ids = tok.apply_chat_template(r.prompt, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
        assert ids[:n] == list(prompt_ids)
        assert tok.decode(ids[n:]) == r.completion + "<|im_end|>\n"
    assert sum(n == 0 for n in data.prompt_lens + data.heldout_prompt_lens) == 1
    short = load_data(f"arith:steps=1,digits=1,n=6,{f}", tok, seq_len=50, heldout=2, seed=1)
    assert all(len(r) <= 50 for r in short.train) and all(n <= 50 for n in short.prompt_lens)
    assert [min(n, 50) for n in data.prompt_lens] == short.prompt_lens
