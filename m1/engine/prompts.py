"""Prompts as token ids, the same for every backend (fast, hf, vLLM)."""

from __future__ import annotations

from ..errors import M1Error


def encode_prompt(tokenizer, prompt, chat: bool = False) -> list[int]:
    """Token ids of a prompt, the same for every backend: a token-id list as is; a string through
    the tokenizer, or through its chat template (whose text already holds any BOS, so no special
    tokens are added again)."""
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise M1Error("empty prompt: a prompt needs at least one token")
        if not all(isinstance(t, int) and t >= 0 for t in prompt):
            raise M1Error("a token-id prompt must be a list of non-negative integers")
        return list(prompt)
    if not isinstance(prompt, str):
        raise M1Error(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    if not prompt.strip():
        raise M1Error("empty prompt: give some text to continue")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise M1Error("the tokenizer has no chat template: use --no-chat (chat=False)")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def check_context(ids: list[int], max_context: int) -> list[int]:
    if len(ids) >= max_context:
        raise M1Error(f"the prompt is {len(ids)} tokens, longer than the model's context of "
                      f"{max_context} tokens (it needs room for at least one new token)")
    return ids
