"""m1: turn a pretrained transformer into a fast hybrid Mamba2/attention reasoning model.

Pipeline: convert -> distill -> sft -> grpo -> generate -> eval -> bench. Every stage reads and
writes a plain Hugging Face checkpoint directory (``GraniteMoeHybridForCausalLM``).
"""

__version__ = "0.1.0"
