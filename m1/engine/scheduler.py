"""Scheduling: requests and their sample rows, packed into groups that fit the batch and memory
bounds, and each group's prompts split into prefill batches."""

from __future__ import annotations


class Row:
    """One sample being decoded: its request, seed and generator, tokens so far, and how it ended."""

    __slots__ = ("req", "sample", "seed", "gen", "tokens", "done", "finish", "t_done", "max_new", "emitted",
                 "params", "stop_window", "secs")

    def __init__(self, req, sample, seed, params, max_new):
        self.req, self.sample, self.seed, self.params, self.max_new = req, sample, seed, params, max_new
        self.gen = None
        self.tokens: list[int] = []
        self.done = False
        self.finish = None
        self.t_done = 0.0
        self.emitted = 0
        self.stop_window = (max(len(s) for s in params.stop) + 8) if params.stop else 0


class Request:
    """One prompt: its index in the call, the prompt as given, its token ids, its SamplingParams."""

    def __init__(self, index, prompt, ids, params):
        self.index, self.prompt, self.ids, self.params = index, prompt, ids, params


def plan_groups(reqs, rows_by_req, max_rows: int, max_bytes: int, row_bytes) -> list[list[Row]]:
    """Pack rows into groups (in request order) of at most ``max_rows`` whose decode state,
    ``rows * row_bytes(longest prompt + max_new)``, fits ``max_bytes``."""
    groups, cur, cur_len = [], [], 0
    for r in reqs:
        rows = rows_by_req[r.index]
        need = len(r.ids) + max(row.max_new for row in rows)
        for row in rows:
            new_len = max(cur_len, need)
            if cur and (len(cur) + 1 > max_rows or (len(cur) + 1) * row_bytes(new_len) > max_bytes):
                groups.append(cur)
                cur, new_len = [], need
            cur.append(row)
            cur_len = new_len
    if cur:
        groups.append(cur)
    return groups


def prefill_batches(req_ids, lengths, max_tokens: int) -> list[list[int]]:
    """Split prompts (sorted by length) into prefill batches of at most ``max_tokens`` padded tokens."""
    order = sorted(range(len(req_ids)), key=lambda i: lengths[i])
    batches, cur, mx = [], [], 0
    for i in order:
        m = max(mx, lengths[i])
        if cur and m * (len(cur) + 1) > max_tokens:
            batches.append(cur)
            cur, m = [], lengths[i]
        cur.append(req_ids[i])
        mx = m
    if cur:
        batches.append(cur)
    return batches


def row_bytes(config, length: int, dtype, ssm_dtype) -> int:
    """Bytes one row of ``length`` tokens holds in the decode buffers (state, bias, position)."""
    from ..model.info import state_bytes_per_row

    return state_bytes_per_row(config, length, torch_esize(dtype), torch_esize(ssm_dtype)) + 8 * length


def torch_esize(dtype) -> int:
    import torch

    return torch.empty(0, dtype=dtype).element_size()
