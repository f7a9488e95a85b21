"""What a caller asks for and gets back: sampling parameters per request, completions, stream events."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..errors import M1Error

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_BUDGET = "budget"  # only when generate() is given a deadline

# which sampler runs: auto (fast where the model supports it, else hf), fast (m1's decode step), hf
# (model.forward with HF's cache: the reference), vllm (the same API on vLLM)
BACKENDS = ("auto", "fast", "hf", "vllm")
# the dtype a checkpoint is sampled in; auto = as saved
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class SamplingParams:
    """How to sample one request (one prompt).

    ``n`` samples; ``temperature`` 0 = greedy; ``top_k`` 0 = off; ``top_p`` 1 = off; ``min_p`` 0 = off.
    Filters apply in the order temperature -> top-k -> top-p -> min-p. ``seed``: sample j uses
    ``seed + j`` (None = a fresh random seed, recorded in each completion). ``stop``: strings that end
    a completion (cut from the returned text); ``stop_token_ids``: extra ids that end it (kept in
    ``token_ids``, like EOS). ``ignore_eos`` keeps going past EOS (benchmarks).
    """
    n: int = 1
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def validate(self) -> "SamplingParams":
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        checks = [
            (isinstance(self.n, int) and self.n >= 1, f"n (samples per prompt) must be at least 1, got {self.n}"),
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             f"max_new_tokens must be at least 1, got {self.max_new_tokens}"),
            (self.temperature is not None and math.isfinite(self.temperature) and self.temperature >= 0,
             f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (self.top_p is not None and 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (self.min_p is not None and 0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.seed is None or (isinstance(self.seed, int) and self.seed >= 0),
             f"seed must be a non-negative integer, got {self.seed}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, msg in checks:
            if not ok:
                raise M1Error(msg)
        return self


@dataclass
class Completion:
    """One sample. ``seconds``: from the start of its batch (prefill included) until it finished."""
    index: int
    text: str
    token_ids: list[int]
    num_tokens: int
    finish_reason: str  # "stop" | "length" ("budget" only with a deadline)
    seconds: float
    seed: int | None = None
    finished_at: float = 0.0  # time.perf_counter() when it finished


@dataclass
class RequestOutput:
    """All samples of one prompt."""
    index: int
    prompt: str | list[int]
    prompt_token_ids: list[int]
    completions: list[Completion]
    seconds: float = 0.0

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]


@dataclass
class StreamEvent:
    """Passed to ``on_token`` after every generated token (``text``: newly printable text, may be empty)."""
    request: int
    sample: int
    token_id: int
    text: str
    finished: bool
    finish_reason: str | None


def requests_of(prompts, params) -> tuple[list, list[SamplingParams]]:
    """``generate``'s arguments as (prompts, one SamplingParams per prompt): a single prompt (a
    string or a token-id list) becomes a list of one; one SamplingParams serves every prompt."""
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                    and all(isinstance(t, int) for t in prompts)):
        prompts = [prompts]
    prompts = list(prompts)
    params = SamplingParams() if params is None else params
    plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    if len(plist) != len(prompts):
        raise M1Error(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
    return prompts, plist
