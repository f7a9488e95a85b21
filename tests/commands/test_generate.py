"""`m1 generate` through the CLI: streaming, JSONL output, voting, time budget, and bad input."""

from __future__ import annotations

import json

import pytest

from m1.cli import main


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_single_prompt_streams_the_greedy_text(tiny_hybrid, capsys):
    from m1.engine import Engine, SamplingParams

    code = main(["generate", "--model", str(tiny_hybrid), "--prompt", "Tom has 12 apples.", "--temperature", "0",
                 "--max-new-tokens", "12", "--no-chat"])
    out, err = capsys.readouterr()
    assert code == 0, err
    ref = Engine.from_pretrained(tiny_hybrid).generate("Tom has 12 apples.",
                                                       SamplingParams(max_new_tokens=12, temperature=0))[0]
    assert out == ref.completions[0].text + "\n"
    assert "tokens/s" in err


def test_file_with_samples_vote_and_output(tiny_hybrid, tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"id": "a", "prompt": "Tom has 12 apples.", "answer": "19"}) + "\n"
                 + json.dumps("What is 3 * 4 - 5?") + "\n\n"
                 + json.dumps({"problem": "Solve step by step."}) + "\n")
    out = tmp_path / "out.jsonl"
    code = main(["generate", "--model", str(tiny_hybrid), "--file", str(f), "-n", "3", "--max-new-tokens", "8",
                 "--seed", "4", "--vote", "--output", str(out), "--chat"])
    _, err = capsys.readouterr()
    assert code == 0, err
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert rows[0]["id"] == "a" and rows[0]["gold"] == "19" and rows[1]["prompt"] == "What is 3 * 4 - 5?"
    for r in rows:
        assert len(r["completions"]) == len(r["num_tokens"]) == len(r["seconds"]) == len(r["answers"]) == 3
        assert r["seeds"] == [4, 5, 6]
        assert all(1 <= n <= 8 for n in r["num_tokens"]) and all(s >= 0 for s in r["seconds"])
        assert "vote" in r and isinstance(r["votes"], dict)
    assert "generate" in err  # the progress bar went to stderr


def test_budget_mode_records_arrivals(tiny_hybrid, capsys):
    code = main(["generate", "--model", str(tiny_hybrid), "--prompt", "Tom has", "-n", "2", "--max-new-tokens", "6",
                 "--budget-seconds", "0.5"])
    out, err = capsys.readouterr()
    assert code == 0, err
    row = json.loads(out)
    assert row["rounds"] >= 1 and row["elapsed"] >= 0.5
    assert len(row["arrival_seconds"]) == len(row["completions"]) == 2 * row["rounds"]


@pytest.mark.parametrize("args,needle", [
    (["--prompt", ""], "empty prompt"),
    (["--prompt", "hi", "-n", "0"], "at least 1"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature"),
    (["--prompt", "hi", "--top-p", "0"], "top_p"),
    (["--prompt", "hi", "--top-p", "1.5"], "top_p"),
    (["--prompt", "hi", "--budget-seconds", "0"], "budget"),
    (["--prompt", "word " * 700], "longer than the model's context"),
    (["--prompt", "hi", "--device", "cpu", "--fused-decode"], "fused_decode"),
])
def test_bad_input_is_one_error_line(tiny_hybrid, capsys, args, needle):
    code = main(["generate", "--model", str(tiny_hybrid), "--no-chat", *args])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 1 and needle in line, line


def test_bad_model_directory(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"]) == 1
    assert "does not exist" in _one_error_line(capsys.readouterr().err)
    (tmp_path / "empty").mkdir()
    assert main(["generate", "--model", str(tmp_path / "empty"), "--prompt", "hi"]) == 1
    assert "not a model checkpoint" in _one_error_line(capsys.readouterr().err)
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    assert main(["generate", "--model", str(tmp_path / "empty"), "--file", str(f)]) == 1
    assert "bad.jsonl:2" in _one_error_line(capsys.readouterr().err)


def test_output_resumes_after_an_interruption(tiny_hybrid, tmp_path, capsys):
    """A rerun with the same --output skips the prompts already written (a partial last row is redone)
    and gives the same file as an uninterrupted run; other prompts or settings are refused."""
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"id": i, "prompt": f"What is {i} + {i}?"}) + "\n" for i in range(4)))
    args = ["generate", "--model", str(tiny_hybrid), "--file", str(f), "-n", "2", "--max-new-tokens", "6",
            "--seed", "3", "--max-batch-size", "2"]  # one prompt per engine call
    full = tmp_path / "full.jsonl"
    assert main([*args, "--output", str(full)]) == 0
    want = [json.loads(x) for x in full.read_text().splitlines()]
    assert [r["index"] for r in want] == [0, 1, 2, 3] and want[0]["generation"]["seed"] == 3

    part = tmp_path / "part.jsonl"
    lines = full.read_text().splitlines(keepends=True)
    part.write_text(lines[0] + lines[1] + lines[2][:40])  # killed while writing row 2
    capsys.readouterr()
    assert main([*args, "--output", str(part)]) == 0
    err = capsys.readouterr().err
    assert "resuming: 2 of 4 prompts" in err
    got = [json.loads(x) for x in part.read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(got) == strip(want)

    assert main([*args, "--output", str(part)]) == 0  # nothing left to do
    assert "resuming: 4 of 4" in capsys.readouterr().err and part.read_text().count("\n") == 4

    assert main([*args, "--output", str(part), "--temperature", "0.3"]) == 1
    line = _one_error_line(capsys.readouterr().err)
    assert "other settings" in line and "temperature" in line
    f.write_text("".join(json.dumps({"prompt": f"Other {i}"}) + "\n" for i in range(4)))
    assert main([*args, "--output", str(part)]) == 1
    assert "other prompts" in _one_error_line(capsys.readouterr().err)
    assert main([*args, "--output", str(part), "--overwrite"]) == 0
    assert [json.loads(x)["prompt"] for x in part.read_text().splitlines()] == [f"Other {i}" for i in range(4)]
    capsys.readouterr()
    assert main([*args, "--output", str(tmp_path)]) == 1
    assert "is a directory" in _one_error_line(capsys.readouterr().err)


def test_vllm_backend_through_the_cli(tiny_hybrid, tmp_path, capsys, fake_vllm):
    """`--backend vllm` with a stand-in vllm module: prompts checked up front, rows written."""
    from m1.model.checkpoint import load_model

    fake = fake_vllm(load_model(tiny_hybrid)[1])
    out = tmp_path / "v.jsonl"
    code = main(["generate", "--model", str(tiny_hybrid), "--backend", "vllm", "--prompt", "Tom has 12 apples.",
                 "-n", "2", "--seed", "3", "--output", str(out), "--no-chat"])
    _, err = capsys.readouterr()
    assert code == 0, err
    (row,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(row["completions"]) == 2 and vars(fake.calls[0][1][0])["seed"] == 3
    long_prompt = "Tom has 12 apples. " * 400
    assert main(["generate", "--model", str(tiny_hybrid), "--backend", "vllm", "--prompt", long_prompt,
                 "--no-chat"]) == 1
    assert "longer than the model's context" in _one_error_line(capsys.readouterr().err)
    assert len(fake.calls) == 1


def test_library_function_is_the_command(tiny_hybrid, tmp_path, capsys):
    """m1.generate.generate(GenerateSettings(...)) writes the rows `m1 generate` writes for the same settings."""
    import io

    from m1.generate import GenerateSettings, generate

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps("What is 3 * 4?") + "\n" + json.dumps({"question": "2 + 2?", "answer": "4"}) + "\n")
    cfg = GenerateSettings(model=str(tiny_hybrid), file=str(f), n=2, max_new_tokens=5, seed=1, chat=False, vote=True)
    buf = io.StringIO()
    res = generate(cfg, stream=buf, log=lambda m: None, progress=False)
    assert (res.prompts, res.written, res.streamed) == (2, 2, None)
    assert main(["generate", "--model", str(tiny_hybrid), "--file", str(f), "-n", "2", "--max-new-tokens", "5",
                 "--seed", "1", "--no-chat", "--vote"]) == 0
    strip = lambda text: [{k: v for k, v in json.loads(x).items() if k != "seconds"}  # noqa: E731
                          for x in text.splitlines()]
    assert strip(buf.getvalue()) == strip(capsys.readouterr().out)
    assert json.loads(buf.getvalue().splitlines()[1])["gold"] == "4"
