"""Per-row stopping and streaming: when a sample ends (EOS, stop ids, stop strings, length, deadline),
the text it returns (cut before a stop string), and the text a stream may show so far."""

from __future__ import annotations

from .params import FINISH_BUDGET, FINISH_LENGTH, FINISH_STOP, Completion, RequestOutput, StreamEvent
from .scheduler import Request, Row


class Stopping:
    """The stopping rules of one engine: its tokenizer (stop strings are matched on decoded text)
    and its end-of-sequence ids."""

    def __init__(self, tokenizer, eos_ids):
        self.tokenizer, self.eos_ids = tokenizer, eos_ids

    def append(self, row: Row, tok: int, on_token, now: float, t0: float) -> None:
        """Add a sampled token to ``row``, end the row if a rule says so, stream it."""
        row.tokens.append(tok)
        p = row.params
        reason = None
        if (tok in self.eos_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            reason = FINISH_STOP
        elif p.stop:
            # only the tail can hold a new stop string: decoding it, not the whole row, keeps a step O(1)
            tail = self.tokenizer.decode(row.tokens[-row.stop_window:], skip_special_tokens=p.skip_special_tokens)
            if any(s in tail for s in p.stop):
                reason = FINISH_STOP
        if reason is None and len(row.tokens) >= row.max_new:
            reason = FINISH_LENGTH
        if reason is not None:
            self.finish(row, reason, now, t0, None)
        if on_token is not None:
            self.stream(row, tok, on_token)

    def finish(self, row: Row, reason: str, now: float, t0: float, on_token) -> None:
        row.done, row.finish, row.t_done = True, reason, now
        row.secs = now - t0  # seconds since the group started
        if on_token is not None and reason == FINISH_BUDGET:
            self.stream(row, None, on_token)

    def text(self, row: Row) -> str:
        p = row.params
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=p.skip_special_tokens)
        if p.stop:
            cut = [i for i in (text.find(s) for s in p.stop) if i >= 0]
            if cut:
                text = text[:min(cut)]
        return text

    def stream(self, row: Row, tok, on_token) -> None:
        text = self.text(row)
        end = len(text)
        if not row.done:
            while end > row.emitted and text[end - 1] == "\ufffd":  # incomplete UTF-8 sequence
                end -= 1
            if row.params.stop:  # hold back what could be the start of a stop string
                hold = max(len(s) for s in row.params.stop) - 1
                end = max(row.emitted, end - hold)
        delta = text[row.emitted:end]
        row.emitted = max(row.emitted, end)
        on_token(StreamEvent(row.req, row.sample, -1 if tok is None else tok, delta, row.done, row.finish))

    def request_output(self, req: Request, rows) -> RequestOutput:
        """The finished request; its rows drop their generators (they are not needed any more)."""
        comps = [Completion(index=r.sample, text=self.text(r), token_ids=list(r.tokens), num_tokens=len(r.tokens),
                            finish_reason=r.finish, seconds=r.secs, seed=r.seed, finished_at=r.t_done)
                 for r in rows]
        for r in rows:
            r.gen = None
        return RequestOutput(index=req.index, prompt=req.prompt, prompt_token_ids=list(req.ids), completions=comps,
                             seconds=max(c.seconds for c in comps))
