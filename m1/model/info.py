"""``m1 info``: what a checkpoint is made of and what it costs to decode with.

Decode memory per sequence: each attention layer caches K and V for every token
(2 * kv_heads * head_dim values per token per layer), while each Mamba2 layer keeps a fixed state
whatever the length: the conv window (conv_dim * d_conv) plus the SSM state (heads * P * N).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import M1Error
from .checkpoint import check_model_dir, mamba_layer_mask, read_config, read_record, saved_dtype

BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass
class ModelInfo:
    path: str
    architecture: str
    num_layers: int
    attention_layers: list[int]
    mamba_layers: list[int]
    parameters: int
    dtype: str
    kv_bytes_per_token: int  # all attention layers together
    mamba_state_bytes_per_sequence: int  # all Mamba layers together, independent of length
    record: dict

    def break_even_tokens(self) -> float | None:
        """Sequence length at which the KV cache outgrows the fixed Mamba state."""
        if not self.kv_bytes_per_token:
            return None
        return self.mamba_state_bytes_per_sequence / self.kv_bytes_per_token


def layer_types(cfg: dict) -> list[str]:
    """"mamba" or "attention" per layer, whichever spelling the config uses."""
    return ["mamba" if m else "attention" for m in mamba_layer_mask(cfg)]


def mamba_state_sizes(cfg: dict) -> tuple[int, int]:
    """(conv-state values, SSM-state values) per sequence over all Mamba layers (0, 0 without Mamba)."""
    types = layer_types(cfg)
    if "mamba" not in types:
        return 0, 0
    inner = int(cfg.get("mamba_expand", 2) * cfg["hidden_size"])
    n_groups, d_state = cfg.get("mamba_n_groups", 1), cfg.get("mamba_d_state", 256)
    m_heads = cfg.get("mamba_n_heads", 128)
    d_head = cfg.get("mamba_d_head") or inner // m_heads
    conv_dim = inner + 2 * n_groups * d_state
    n = types.count("mamba")
    return n * conv_dim * cfg.get("mamba_d_conv", 4), n * m_heads * d_head * d_state


def state_sizes(cfg: dict) -> tuple[int, int]:
    """(KV values per token over all attention layers, Mamba state values per sequence)."""
    types = layer_types(cfg)
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    kv_heads = cfg.get("num_key_value_heads") or heads
    kv = types.count("attention") * 2 * kv_heads * head_dim
    return kv, sum(mamba_state_sizes(cfg))


def state_bytes_per_row(cfg, length: int, esize: int, ssm_esize: int = 4) -> int:
    """Decode state of one sequence of ``length`` tokens as the engine holds it: K/V and the Mamba
    conv window in the model dtype (``esize`` bytes), the SSM state in ``ssm_esize`` (float32 unless
    the engine's ``ssm_dtype`` says otherwise). ``cfg``: a config dict or a transformers config."""
    cfg = cfg if isinstance(cfg, dict) else cfg.to_dict()
    kv, _ = state_sizes(cfg)
    conv, ssm = mamba_state_sizes(cfg)
    return kv * length * esize + conv * esize + ssm * ssm_esize


def model_info(directory) -> ModelInfo:
    d = check_model_dir(directory)
    cfg = read_config(d)
    types = layer_types(cfg)
    dtype = saved_dtype(cfg) or "float32"
    kv, mamba = state_sizes(cfg)
    nbytes = BYTES.get(dtype, 4)
    return ModelInfo(
        path=str(d), architecture=(cfg.get("architectures") or [cfg.get("model_type", "?")])[0],
        num_layers=len(types), attention_layers=[i for i, t in enumerate(types) if t == "attention"],
        mamba_layers=[i for i, t in enumerate(types) if t == "mamba"], parameters=_count_parameters(d),
        dtype=dtype, kv_bytes_per_token=kv * nbytes, mamba_state_bytes_per_sequence=mamba * nbytes,
        record=read_record(d))


def _count_parameters(d: Path) -> int:
    """Count from safetensors headers (no weights loaded); tied embeddings are stored once."""
    from safetensors import safe_open

    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise M1Error(f"{d} has no .safetensors weights")
    total = 0
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    n = 1
                    for s in st.get_slice(k).get_shape():
                        n *= s
                    total += n
        except Exception as e:
            raise M1Error(f"cannot read {f}: {type(e).__name__}: {e}. The file may be truncated or corrupt") from None
    return total


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def format_info(info: ModelInfo) -> str:
    att = ",".join(map(str, info.attention_layers)) or "none"
    lines = [
        f"checkpoint      {info.path}",
        f"architecture    {info.architecture}",
        f"layers          {info.num_layers}: {len(info.attention_layers)} attention, {len(info.mamba_layers)} mamba2",
        f"attention at    {att}",
        f"parameters      {info.parameters:,} ({info.parameters / 1e6:.1f}M)",
        f"dtype           {info.dtype}",
        f"KV cache        {_human(info.kv_bytes_per_token)} per token (grows with length)",
        f"Mamba state     {_human(info.mamba_state_bytes_per_sequence)} per sequence (fixed)",
    ]
    for length in (1024, 8192):
        per_seq = info.kv_bytes_per_token * length + info.mamba_state_bytes_per_sequence
        lines.append(f"decode memory   {_human(per_seq)} per sequence at {length} tokens")
    if info.record:
        r = info.record
        lines.append(f"made by         m1 {r.get('stage', '?')} from {r.get('teacher', '?')} (init={r.get('init', '?')})")
    return "\n".join(lines)


def info_json(info: ModelInfo) -> str:
    return json.dumps(asdict(info), indent=2)
