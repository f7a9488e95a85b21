"""The model: what a hybrid checkpoint is, how it is made from a teacher, and how it is read and written.

- ``convert.py``: Llama / Qwen2 teacher -> hybrid Mamba2/attention GraniteMoeHybrid checkpoint (``m1 convert``)
- ``checkpoint.py``: checkpoint directories: atomic writes, loading with clear errors, portable configs
- ``teachers.py``: a teacher spec (short name, HF directory, ``.gguf``) -> (model, tokenizer)
- ``kernels.py``: the Mamba2 scan (fla's Triton kernel on CUDA, a chunked torch scan elsewhere), decode steps
- ``info.py``: layers, parameters and decode-state sizes of a checkpoint (``m1 info``)
- ``tiny.py``: tiny random teachers with a real tokenizer, for tests and the smoke demo
"""
