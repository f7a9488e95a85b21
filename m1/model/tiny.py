"""Tiny random Llama / Qwen2 teachers with a real tokenizer, for tests and the ``smoke`` demo.

They load and convert exactly like a real checkpoint directory (config.json + safetensors +
tokenizer with a ChatML chat template), but build in about a second and run in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained on a few arithmetic sentences (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [
        "Tom has 12 apples. He buys 7 more. How many apples does he have now?",
        "The answer is \\boxed{19}. First, 12 + 7 = 19. So the total is 19.",
        "Solve step by step and put the final answer in \\boxed{}.",
        "user assistant system What is 3 * 4 - 5? 0 1 2 3 4 5 6 7 8 9",
    ] * 4
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None)
    fast.chat_template = CHATML
    return fast


def tiny_config(arch: str = "llama", vocab_size: int = 384, hidden: int = 64, layers: int = 4, heads: int = 4,
                kv_heads: int = 2, intermediate: int = 128, tie: bool = True, rope_scaling: bool = True,
                **extra):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    if arch == "llama":
        rope = {"rope_type": "default", "rope_theta": 10000.0}
        if rope_scaling:
            rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return LlamaConfig(rope_parameters=rope, **common)
    if arch == "qwen2":
        return Qwen2Config(rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **common)
    raise ValueError(f"unknown tiny arch {arch}")


def make_tiny_teacher(out: str | Path, arch: str = "llama", seed: int = 0, **config_kwargs) -> Path:
    """Write a random tiny teacher checkpoint directory and return its path."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out)
    tokenizer = tiny_tokenizer()
    cfg = tiny_config(arch, vocab_size=len(tokenizer), **config_kwargs)
    cfg.bos_token_id = tokenizer.bos_token_id
    cfg.eos_token_id = tokenizer.eos_token_id
    cfg.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # random biases too, so a dropped bias would show up in parity tests
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    model.generation_config = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                               pad_token_id=cfg.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
