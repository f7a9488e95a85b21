"""Prefill: prompts through ``model.forward`` in left-padded batches with a transformers cache, and
the helpers that replicate / select rows of such a cache (every tensor: K/V, Mamba conv and SSM state)."""

from __future__ import annotations


def prefill(model, ids_list, pad_id: int, device):
    """Left-padded batched forward with a fresh DynamicCache -> (cache, last logits, mask, lengths).

    ``position_ids = cumsum(mask) - 1`` as HF ``generate`` does; a Mamba layer zeroes padded positions
    before ``in_proj`` (no projection bias in m1 checkpoints), so padding leaves its state as an
    unpadded run would."""
    import torch
    from transformers import DynamicCache

    lens = [len(x) for x in ids_list]
    lp = max(lens)
    inp = torch.full((len(ids_list), lp), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids_list), lp), dtype=torch.long)
    for i, x in enumerate(ids_list):
        inp[i, lp - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, lp - len(x):] = 1
    inp, mask = inp.to(device), mask.to(device)
    pos = mask.cumsum(-1) - 1
    pos.masked_fill_(mask == 0, 1)
    cache = DynamicCache(config=model.config)
    with cpu_scan_chunk(model):
        out = model(input_ids=inp, attention_mask=mask, position_ids=pos, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
    return cache, out.logits[:, -1, :].float(), mask, torch.tensor(lens, device=device)


class cpu_scan_chunk:
    """While prefilling on CPU, run the torch Mamba2 scan with chunks of at most 64 tokens (checkpoints
    say 256): its intra-chunk work grows with the chunk size, and 64 made a SmolLM2-shape prefill of
    16 x 256 tokens 1.6x faster in bf16, 1.3x in float32 (measured with transformers' scan, before
    m1's ``ssd_chunked`` replaced it; same result up to rounding; the training recipes do the same).
    The model's own setting is restored afterwards."""

    def __init__(self, model):
        self.saved = []
        if next(model.parameters()).device.type == "cpu":
            from ..model.kernels import mamba_mixers

            self.saved = [(m, m.chunk_size) for m in mamba_mixers(model)]

    def __enter__(self):
        from ..model.kernels import CPU_SCAN_CHUNK

        for m, c in self.saved:
            m.chunk_size = min(c, CPU_SCAN_CHUNK)

    def __exit__(self, *exc):
        for m, c in self.saved:
            m.chunk_size = c


def cache_tensors(cache):
    """(layer, attribute, key) triples for every tensor of a transformers cache: K/V, conv, SSM state."""
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    out = []
    for layer in cache.layers:
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            for attr in ("conv_states", "recurrent_states"):
                for k, v in getattr(layer, attr).items():
                    if v is not None:
                        out.append((layer, attr, k))
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            out.append((layer, "keys", None))
            out.append((layer, "values", None))
    return out


def cache_apply(cache, fn) -> None:
    """Replace every tensor of ``cache`` by ``fn(tensor)`` (batch replication / selection)."""
    for layer, attr, k in cache_tensors(cache):
        if k is None:
            setattr(layer, attr, fn(getattr(layer, attr)))
        else:
            getattr(layer, attr)[k] = fn(getattr(layer, attr)[k])


def replicate_cache(cache, repeats):
    """Repeat every cache tensor (K/V, Mamba conv and SSM state) on its batch dim: int or per-row counts."""
    import torch

    if isinstance(repeats, int):
        cache_apply(cache, lambda t: t.repeat_interleave(repeats, dim=0))
    else:
        r = torch.as_tensor(repeats)
        cache_apply(cache, lambda t: t.repeat_interleave(r.to(t.device), dim=0))
    return cache
