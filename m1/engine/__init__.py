"""Batched sampling engine: prefill each prompt once, replicate its state to n samples, decode in batches.

Serves hybrid ``GraniteMoeHybridForCausalLM`` checkpoints (Mamba2 + attention layers) and pure
transformers (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, all-attention GraniteMoeHybrid) alike.

How a call to :meth:`Engine.generate` runs
------------------------------------------
1. Prompts are tokenised (optionally through the chat template) and validated; requests are packed
   into *groups* of at most ``max_batch_size`` sample rows whose cache fits ``max_cache_bytes``.
2. **Prefill once per distinct prompt**: the group's prompts go through ``model.forward`` in
   left-padded batches (``attention_mask`` marks padding, ``position_ids = cumsum(mask) - 1`` like HF
   ``generate``) with a transformers ``DynamicCache``. For Mamba layers the HF mixer zeroes padded
   positions before ``in_proj`` (no projection bias in m1 checkpoints), so padding leaves the conv
   and SSM state exactly as an unpadded run would.
3. **Replicate**: every cache tensor -- attention K/V, Mamba conv state and SSM state -- is
   ``index_select``-ed / ``repeat_interleave``-d on its batch dimension, prompt i -> its n rows. A
   Mamba layer's state is O(1) in the sequence length, so this costs the same for any prompt length.
4. **Decode** all rows in lock step, one token per step, sampling each row with its own
   ``torch.Generator`` (inverse CDF: one uniform ``u`` from the row's generator per step, the token
   whose cumulative-probability interval holds ``u``), which is exactly a draw from ``p`` and does
   not depend on which other rows share the batch. Sample j of a request with seed s uses seed
   ``s + j``, so it equals an independent run with ``n=1, seed=s+j``. Temperature 0 is greedy
   (argmax of the raw logits).
5. **Per-row stopping** on EOS (``generation_config.eos_token_id`` and the tokenizer's EOS), extra
   stop token ids, stop strings (the returned text is cut before the stop string) and
   ``max_new_tokens`` (or the context length). Finished rows are **compacted** out of the batch so
   they stop costing compute: the fast backend moves the last live rows into the freed slots of its
   preallocated buffers (a copy of only the moved rows); the reference backend index-selects.

Backends
--------
``"fast"`` (default when the architecture is supported): m1's own decode step over the model's
modules (``step.py``) on preallocated buffers (``state.py``). Weights are never copied: the engine
always sees the current weights (usable for RL rollouts on a model being trained). On CUDA the step
runs with static shapes and is **captured as CUDA graphs** and replayed (``graphs.py``);
``cuda_graphs=False`` turns that off. ``compile=True`` instead wraps the static step in
``torch.compile``; token-identical to the reference on CPU and on an H100, but compiling takes
~1 minute per shape on CPU.

``fused_decode=True`` (CUDA, needs Triton) updates each Mamba layer's state with one Triton kernel
(:func:`m1.model.kernels.mamba_state_step_fused`: the state read and written once, against about 2.5
passes for the torch version); opt-in until measured on a GPU (its math is tested on CPU under
Triton's interpreter).

``ssm_dtype``: the dtype the Mamba SSM state is kept in between steps (default float32, as
transformers' scan returns it; ``"model"`` = the weights' dtype, as vLLM does by default, halves the
state bytes per step in bf16). The update itself is computed in float32 either way.

``"hf"``: the reference path, ``model.forward`` with the HF ``DynamicCache`` for every step
(replication and compaction done on the cache's own tensors). Used automatically for
architectures the fast path does not know (MoE experts, dynamic RoPE, sliding windows, ...).

``"vllm"`` (:class:`VLLMEngine`, ``vllm.py``; only when ``vllm`` is importable): maps
:class:`SamplingParams` onto vLLM's. vLLM's seeding differs (one generator per request), streaming
callbacks are not supported there.

Files, in the order a call meets them
-------------------------------------
``params.py`` what a caller asks for and gets back · ``prompts.py`` prompts as token ids ·
``scheduler.py`` requests, rows, groups, prefill batches · ``prefill.py`` the batched prefill and
cache replication · ``backends.py`` the fast and hf backends behind one interface · ``arch.py``,
``state.py``, ``step.py``, ``graphs.py`` the fast decode (model layout, buffers, the step, static
shapes) · ``sampling.py`` one token per row · ``stopping.py`` when a row ends, its text, streaming ·
``engine.py`` :class:`Engine`, which drives them · ``vllm.py`` the vLLM backend.
"""

# names load on first use (PEP 562), so that light modules (the settings behind `m1 eval` / `m1 generate`
# flags) can import m1.engine.params without importing torch
_HOMES = {"BACKENDS": "params", "Engine": "engine", "VLLMEngine": "vllm", "SamplingParams": "params",
          "Completion": "params", "RequestOutput": "params", "StreamEvent": "params", "FINISH_STOP": "params",
          "FINISH_LENGTH": "params", "FINISH_BUDGET": "params", "NonFiniteLogits": "sampling",
          "filter_logits": "sampling", "sample_tokens": "sampling", "inverse_cdf_draw": "sampling",
          "encode_prompt": "prompts", "check_context": "prompts"}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'm1.engine' has no attribute '{name}'")
    import importlib

    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
