"""Training data: ``m1 sft``'s prompt + solution examples (:func:`load_sft_examples`) and distillation's
rows (JSONL files or training tasks, rendered as ``m1 sft`` renders them), tokenized, unpacked.

A data spec is a comma-separated list of sources:

* a training task: ``gsm8k-train`` (the 7,473 GSM8K train problems), ``arith:steps=2,digits=1``
  (procedural, 2,000 problems unless ``n=`` says otherwise), or any task name with a train split.
  Each problem becomes prompt + reference solution rendered by :func:`render_prompt_completion`,
  exactly as ``m1 sft`` renders it (the prompt is m1's step-by-step instruction, the completion
  the worked solution ending in ``\\boxed{N}``); such rows know where their completion starts,
  so distillation can put its loss on completion tokens only and on-policy distillation can
  sample from their prompts.
* ``path/to/file.jsonl`` -- one JSON object per line, either ``{"text": "..."}`` (tokenized as
  is, no BOS added) or ``{"messages": [{"role": "user", "content": "..."}, ...]}`` (rendered with
  the tokenizer's chat template). Blank lines are skipped; anything else that is not such a row
  (bad JSON, empty text, no messages, a message without role/content) is an error that names the
  file and the line.

Every row is one training sample, truncated to ``seq_len`` tokens and right-padded within its
micro-batch. Samples are never packed together: a Mamba layer's state would carry over from one
sample into the next (transformers raises on CPU rather than honouring ``seq_idx``), so packing
would teach the student to read across document boundaries.

Batching is a pure function of (seed, step): epoch ``e`` visits the training rows in the order of
``numpy.random.default_rng([seed, e]).permutation``, and global batch ``k`` is rows
``[k*G, (k+1)*G)`` of that endless stream. So "where are we in the data" is just the step number,
and a resumed or multi-process run sees exactly the batches of an uninterrupted single-process one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import M1Error

BUILTIN_DATA = {
    "gsm8k-train": "GSM8K train solutions (7,473) as user/assistant chats, rendered with the teacher's chat template",
    "arith[:options]": "procedural arithmetic word problems with worked solutions (m1.tasks.arith)",
}


@dataclass
class Row:
    """One sample before tokenization: plain text or chat messages, and where it came from."""
    text: str | None = None
    messages: list[dict] | None = None
    where: str = ""  # "file.jsonl:12" or "gsm8k-train:12"
    prompt: list[dict] | None = None  # task rows: the prompt messages ...
    completion: str | None = None  # ... and the reference solution (rendered by render_prompt_completion)


@dataclass
class TextData:
    """Tokenized training rows and the held-out texts used for the before/after report."""
    train: list[list[int]]  # token ids per sample (already truncated to seq_len)
    heldout_texts: list[str]  # rendered texts, never trained on
    heldout_ids: list[list[int]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    # tokens of each row's prompt (0: a text row, all of it is "completion"); same order as train / heldout_ids
    prompt_lens: list[int] = field(default_factory=list)
    heldout_prompt_lens: list[int] = field(default_factory=list)

    @property
    def train_tokens(self) -> int:
        return sum(len(r) for r in self.train)


# ----------------------------------------------------------------------------------- reading rows
def gsm8k_train_rows() -> list[Row]:
    return task_rows("gsm8k-train")


def task_rows(spec: str, seed: int = 0) -> list[Row]:
    """Prompt + reference-solution rows of a training task: the examples ``m1 sft`` trains on."""
    examples = load_sft_examples(spec, seed=seed, needs="distillation")
    return [Row(prompt=e.prompt, completion=e.solution, where=e.where) for e in examples]


def split_spec(spec: str) -> list[str]:
    """The sources of a comma-separated --data value. A task's own options contain commas too
    (``arith:steps=2,digits=1``): a ``key=value`` piece belongs to the source before it."""
    import re

    parts: list[str] = []
    for piece in (p.strip() for p in spec.split(",")):
        if not piece:
            continue
        if parts and ":" in parts[-1] and re.fullmatch(r"[A-Za-z_]\w*=[^:/]*", piece) and not is_file_spec(piece):
            parts[-1] += "," + piece
        else:
            parts.append(piece)
    return parts


def jsonl_objects(path: Path, kind: str, hint: str):
    """Yield ``(line_number, "FILE:LINE", parsed object)`` for the non-blank lines of a JSONL file.

    The one reader behind distill data, SFT data and RL task files, so that a missing file, a
    directory, an unreadable file and a bad JSON line give the same kind of error everywhere.
    ``kind`` names the file in messages ("data", "task"); ``hint`` says what to give instead.
    """
    if not path.exists():
        raise M1Error(f"{kind} file {path} not found: {hint}")
    if path.is_dir():
        raise M1Error(f"{kind} {path} is a directory: give a .jsonl file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise M1Error(f"cannot read {kind} file {path}: {e}") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            yield n, where, json.loads(line)
        except ValueError as e:
            raise M1Error(f"{where}: not valid JSON ({e})") from None


def is_file_spec(spec: str) -> bool:
    """True when a --data / --task value names a JSONL file rather than a task."""
    import os

    return spec.endswith((".jsonl", ".json")) or os.sep in spec or Path(spec).exists()


def task_train_problems(spec: str, flag: str, limit: int | None, seed: int, default_generated: int,
                        needs: str = "training"):
    """``m1.tasks`` problems for a training --data/--task value (``gsm8k-train``, ``arith:steps=2``,
    ``gsm8k:split=test``...): the train split unless a split is named; a generated task (arith) gets
    ``default_generated`` problems when neither --limit nor n= is given."""
    from ..tasks import TASKS, load_task, parse_task_spec

    spec_ = "gsm8k:split=train" if spec == "gsm8k-train" else spec
    try:
        name, opts = parse_task_spec(spec_)
    except ValueError as e:
        raise M1Error(f"{flag} {spec}: {e}") from None
    if name not in TASKS:
        raise M1Error(f"{flag} {spec}: unknown task; give gsm8k-train, arith[:options], one of "
                      f"{', '.join(sorted(TASKS))}, or a .jsonl file")
    info = TASKS[name]
    split = opts.pop("split", "train" if "train" in info.splits else None)
    if split is None:
        raise M1Error(f"{flag} {spec}: {name} has no train split (only {', '.join(info.splits)}); {needs} on a "
                      f"test set is allowed only when asked for explicitly: {flag} {name}:split={info.splits[0]}")
    if split not in info.splits:
        raise M1Error(f"{flag} {spec}: {name} has no '{split}' split (it has {', '.join(info.splits)})")
    if info.generated and limit is None and "n" not in opts:
        limit = default_generated
    try:
        problems = load_task(name, split=split, limit=limit, seed=seed if info.generated else None, **opts)
    except (ValueError, TypeError) as e:
        raise M1Error(f"{flag} {spec}: {e}") from None
    return name, problems


def read_jsonl_rows(path: str | Path) -> list[Row]:
    """Rows of a ``text`` / ``messages`` JSONL file; errors name the file and the line."""
    path = Path(path).expanduser()
    hint = f"give a .jsonl file with 'text' or 'messages' rows, or one of: {', '.join(BUILTIN_DATA)}"
    rows = [parse_row(obj, where) for _, where, obj in jsonl_objects(path, "data", hint)]
    if not rows:
        raise M1Error(f"data file {path} has no rows: each line must be a JSON object with 'text' or 'messages'")
    return rows


def parse_row(obj, where: str) -> Row:
    if not isinstance(obj, dict):
        raise M1Error(f"{where}: expected a JSON object with 'text' or 'messages', got {type(obj).__name__}")
    has_text, has_msgs = "text" in obj, "messages" in obj
    if has_text == has_msgs:
        raise M1Error(f"{where}: a row needs exactly one of 'text' or 'messages' (found keys: {', '.join(sorted(obj)) or 'none'})")
    if has_text:
        text = obj["text"]
        if not isinstance(text, str):
            raise M1Error(f"{where}: 'text' must be a string, got {type(text).__name__}")
        if not text.strip():
            raise M1Error(f"{where}: empty 'text'")
        return Row(text=text, where=where)
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise M1Error(f"{where}: 'messages' must be a non-empty list of {{'role': ..., 'content': ...}} objects")
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise M1Error(f"{where}: message {k} must be an object with string 'role' and 'content'")
        if not m["role"].strip():
            raise M1Error(f"{where}: message {k} has an empty role")
    if not any(m["content"].strip() for m in msgs):
        raise M1Error(f"{where}: every message is empty")
    return Row(messages=[{"role": m["role"], "content": m["content"]} for m in msgs], where=where)


def read_rows(spec: str, seed: int = 0) -> list[Row]:
    """All rows of a comma-separated data spec (training tasks and/or JSONL paths)."""
    if not spec or not spec.strip():
        raise M1Error(f"--data is empty: give {' or '.join(BUILTIN_DATA)}, a task name or a .jsonl file")
    rows = []
    for part in split_spec(spec):
        rows.extend(read_jsonl_rows(part) if is_file_spec(part) else task_rows(part, seed))
    return rows


# --------------------------------------------------------- prompt + solution examples (m1 sft's data)
DEFAULT_ARITH_EXAMPLES = 2000


@dataclass
class SFTExample:
    """One training pair: the prompt messages and the assistant's solution, and where it came from."""
    prompt: list[dict]
    solution: str
    where: str


def _has_box(text: str) -> bool:
    from ..eval.grading import extract_answer

    return "\\boxed" in text and extract_answer(text) is not None


def solution_from_fields(row: dict, where: str) -> str:
    r"""The worked solution of a question row, ending in ``\boxed{answer}`` (GSM8K rows converted)."""
    from ..tasks.base import boxed, integer_answer, strip_calculator

    sol = row.get("solution")
    ans = row.get("answer")
    if sol is not None and not isinstance(sol, str):
        raise M1Error(f"{where}: 'solution' must be a string, got {type(sol).__name__}")
    if isinstance(ans, (int, float)) and not isinstance(ans, bool):
        ans = str(int(ans)) if float(ans).is_integer() else str(ans)
    if ans is not None and not isinstance(ans, str):
        raise M1Error(f"{where}: 'answer' must be a string or a number, got {type(ans).__name__}")
    if (sol is None or not sol.strip()) and isinstance(ans, str) and "####" in ans:
        body, _, final = ans.rpartition("####")  # a raw GSM8K row
        try:
            gold = integer_answer(final)
        except ValueError:
            gold = final.strip()
        if not gold:
            raise M1Error(f"{where}: the '#### N' line of 'answer' has no number")
        return f"{strip_calculator(body).strip()}\nThe answer is {boxed(gold)}."
    if sol is None or not sol.strip():
        raise M1Error(f"{where}: row has no solution: SFT needs a 'solution' (a worked solution ending in "
                      "\\boxed{...}) or a GSM8K-style 'answer' ending in '#### N'")
    sol = strip_calculator(sol).strip()
    if "####" in sol:
        body, _, final = sol.rpartition("####")
        if final.strip():
            return f"{body.strip()}\nThe answer is {boxed(final.strip().replace(',', ''))}."
    if _has_box(sol):
        return sol
    if isinstance(ans, str) and ans.strip():
        return f"{sol}\nThe answer is {boxed(ans.strip())}."
    raise M1Error(f"{where}: the solution does not end in \\boxed{{...}} and the row has no 'answer' to box; "
                  "m1 trains the model to put its final answer in \\boxed{}")


def _question_of(row: dict, where: str) -> str:
    for key in ("question", "problem", "prompt"):
        q = row.get(key)
        if isinstance(q, str) and q.strip():
            return q
    raise M1Error(f"{where}: row has no question: give a non-empty 'question' (or 'problem') string")


def read_sft_jsonl(path: Path) -> list[SFTExample]:
    """Rows of an SFT JSONL file (see the module docstring); errors name ``FILE:LINE``."""
    from ..tasks.base import Problem
    from ..tasks.prompts import build_messages

    out = []
    for n, where, row in jsonl_objects(path, "data",
                                       "give gsm8k-train, arith[:options], a task name or a .jsonl file"):
        if not isinstance(row, dict):
            raise M1Error(f"{where}: expected a JSON object, got {type(row).__name__}")
        if "messages" in row:
            msgs = row["messages"]
            if (not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs)):
                raise M1Error(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} string objects")
            last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
            if last is None or last == 0 or not msgs[last]["content"].strip():
                raise M1Error(f"{where}: 'messages' needs a non-empty assistant turn after at least one prompt turn")
            out.append(SFTExample([{"role": m["role"], "content": m["content"]} for m in msgs[:last]],
                                  msgs[last]["content"].strip(), where))
            continue
        q = _question_of(row, where)
        sol = solution_from_fields(row, where)
        out.append(SFTExample(build_messages(Problem(id=where, question=q, answer="")), sol, where))
    if not out:
        raise M1Error(f"data file {path} has no rows")
    return out


def load_sft_examples(data: str, limit: int | None = None, seed: int = 0, needs: str = "SFT") -> list[SFTExample]:
    """Training pairs for ``--data`` (see the module docstring)."""
    from ..tasks.prompts import build_messages

    if not data or not str(data).strip():
        raise M1Error("--data is empty: give gsm8k-train, arith[:options], a task name or a .jsonl file")
    data = str(data).strip()
    if is_file_spec(data):
        examples = read_sft_jsonl(Path(data).expanduser())
        return examples if limit is None else examples[:limit]
    name, problems = task_train_problems(data, "--data", limit, seed, DEFAULT_ARITH_EXAMPLES, needs=needs)
    out = []
    for p in problems:
        where = f"{name}:{p.id}"
        sol = solution_from_fields({"solution": p.solution, "answer": p.answer}, where)
        out.append(SFTExample(build_messages(p), sol, where))
    if not out:
        raise M1Error(f"--data {data}: no examples (check --limit)")
    return out


# ------------------------------------------------------------------------------------ tokenizing
def render_prompt_completion(tokenizer, prompt: list[dict], completion: str) -> tuple[list[int], int]:
    """(token ids of prompt + completion, tokens of the prompt) through the chat template.

    The one renderer of prompt/completion pairs in m1: it produces what TRL's ``SFTTrainer`` trains on
    in ``m1 sft`` (conversational prompt/completion: the prompt with the generation prompt appended, the
    pair rendered whole, the completion starting where the two token lists part; tested against TRL),
    and the prompt alone (``ids[:prompt_len]``) is what ``m1 generate`` / ``m1 eval`` feed the model.
    """
    def ids_of(messages, **kw):
        try:
            out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)
        except Exception as e:  # template errors (e.g. roles it does not accept)
            raise M1Error(f"the chat template rejected a row: {type(e).__name__}: {str(e)[:200]}") from None
        return list(out["input_ids"])

    if not getattr(tokenizer, "chat_template", None):
        raise M1Error("task data needs a chat template, and the tokenizer has none; use a .jsonl file of 'text' rows")
    prompt_ids = ids_of(prompt, add_generation_prompt=True)
    ids = ids_of(prompt + [{"role": "assistant", "content": completion}])
    n = 0
    while n < min(len(prompt_ids), len(ids)) and prompt_ids[n] == ids[n]:
        n += 1
    return ids, n


def render(row: Row, tokenizer) -> str:
    if row.text is not None:
        return row.text
    if not getattr(tokenizer, "chat_template", None):
        raise M1Error(f"{row.where}: a 'messages' row needs a chat template, and the tokenizer has none; "
                      "use 'text' rows for this model")
    try:
        return tokenizer.apply_chat_template(row.messages, tokenize=False)
    except Exception as e:  # template errors (e.g. roles it does not accept)
        raise M1Error(f"{row.where}: the chat template rejected this row: {type(e).__name__}: {str(e)[:200]}") from None


def tokenize(texts: list[str], tokenizer, seq_len: int) -> list[list[int]]:
    """Token ids per text, no special tokens added (chat templates carry their own), cut to seq_len."""
    if not texts:
        return []
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [list(ids[:seq_len]) for ids in enc]


def load_data(spec: str, tokenizer, seq_len: int = 512, heldout: int = 64, seed: int = 0,
              rows: list[Row] | None = None) -> TextData:
    """Read, render and tokenize ``spec``; hold out ``heldout`` rows (chosen by ``seed``) for the report."""
    import numpy as np

    if seq_len < 2:
        raise M1Error(f"--seq-len must be at least 2, got {seq_len}")
    if heldout < 0:
        raise M1Error(f"--heldout must be >= 0, got {heldout}")
    rows = read_rows(spec, seed) if rows is None else rows
    if heldout >= len(rows):
        raise M1Error(f"--data has {len(rows)} rows, not enough to hold out {heldout} and still train; "
                      "lower --heldout or add data")
    order = np.random.default_rng([seed, 1_000_003]).permutation(len(rows))
    held = sorted(order[:heldout].tolist())
    train_idx = sorted(order[heldout:].tolist())
    ids_all, plens = [], []
    text_rows = [i for i, r in enumerate(rows) if r.prompt is None]
    text_ids = dict(zip(text_rows, tokenize([render(rows[i], tokenizer) for i in text_rows], tokenizer, 1 << 30)))
    for i, r in enumerate(rows):
        if r.prompt is None:
            ids, n = text_ids[i], 0
        else:
            ids, n = render_prompt_completion(tokenizer, r.prompt, r.completion)
        ids_all.append(ids[:seq_len])
        plens.append(min(n, seq_len))
    empty = [rows[i].where for i in train_idx if not ids_all[i]]
    if empty:
        raise M1Error(f"{empty[0]}: the row tokenizes to no tokens")
    held_ids = [ids_all[i] for i in held]
    return TextData(train=[ids_all[i] for i in train_idx],
                    heldout_texts=[tokenizer.decode(x) for x in held_ids], heldout_ids=held_ids,
                    sources=split_spec(spec), prompt_lens=[plens[i] for i in train_idx],
                    heldout_prompt_lens=[plens[i] for i in held])


# -------------------------------------------------------------------------------------- batching
class BatchPlan:
    """Which training rows form global batch ``step``: a pure function of (seed, step)."""

    def __init__(self, n_rows: int, global_batch: int, seed: int):
        if n_rows < 1:
            raise M1Error("no training rows")
        self.n, self.g, self.seed = n_rows, global_batch, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        import numpy as np

        if epoch not in self._perms:
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n).tolist()
        return self._perms[epoch]

    def rows(self, step: int) -> list[int]:
        out = []
        for pos in range(step * self.g, (step + 1) * self.g):
            out.append(self._perm(pos // self.n)[pos % self.n])
        return out

    def epoch(self, step: int) -> float:
        return step * self.g / self.n


def micro_batches(rows: list[int], lengths, micro: int, world: int, rank: int) -> list[list[int]]:
    """Split a global batch into this rank's micro-batches.

    Rows are sorted by length (less padding), cut into consecutive chunks of ``micro``, and chunk
    ``a * world + rank`` goes to rank ``rank`` at accumulation step ``a``. One process with
    ``accum = 2`` and two processes with ``accum = 1`` therefore compute the very same micro-batches.
    """
    ordered = sorted(rows, key=lambda r: (lengths[r], r))
    chunks = [ordered[i:i + micro] for i in range(0, len(ordered), micro)]
    return chunks[rank::world]


def collate(samples: list[list[int]], pad_id: int):
    """Right-padded ``(input_ids, attention_mask)`` LongTensors; positions start at 0 in every row."""
    import torch

    width = max(len(s) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for r, s in enumerate(samples):
        ids[r, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, :len(s)] = 1
    return ids, mask
