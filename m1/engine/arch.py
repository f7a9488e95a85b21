"""What the fast decode step needs to know about a model: its layers in order, their kinds and sizes."""

from __future__ import annotations

from ..model.checkpoint import mamba_layer_mask


class Arch:
    """What the fast decode step needs to know about a supported model (references, no copies)."""

    def __init__(self, model):
        cfg = model.config
        mt = getattr(cfg, "model_type", None)
        self.model_type = mt
        inner = model.model
        self.embed = inner.embed_tokens
        self.norm = inner.norm
        self.lm_head = model.lm_head
        self.rotary = getattr(inner, "rotary_emb", None)
        self.emb_mult = float(getattr(cfg, "embedding_multiplier", 1.0)) if mt == "granitemoehybrid" else 1.0
        self.res_mult = float(getattr(cfg, "residual_multiplier", 1.0)) if mt == "granitemoehybrid" else 1.0
        self.logit_scale = float(getattr(cfg, "logits_scaling", 1.0)) if mt == "granitemoehybrid" else 1.0
        self.layers = []  # (kind, slot, layer module)
        self.n_attn = self.n_mamba = 0
        for layer, is_mamba in zip(inner.layers, mamba_layer_mask(cfg)):
            if is_mamba:
                self.layers.append(("mamba", self.n_mamba, layer))
                self.n_mamba += 1
            else:
                self.layers.append(("attn", self.n_attn, layer))
                self.n_attn += 1
        self.mlp_name = "shared_mlp" if mt == "granitemoehybrid" else "mlp"
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        if self.n_mamba:
            m = next(layer.mamba for kind, _, layer in self.layers if kind == "mamba")
            self.m_heads, self.m_head_dim, self.m_state = m.num_heads, m.head_dim, m.ssm_state_size
            self.m_groups, self.m_inner, self.m_conv_dim, self.m_conv_k = (
                m.n_groups, m.intermediate_size, m.conv_dim, m.conv_kernel_size)

    @staticmethod
    def unsupported(model) -> str | None:
        """Why the fast path cannot serve ``model`` (None when it can)."""
        cfg = model.config
        mt = getattr(cfg, "model_type", None)
        if mt not in ("granitemoehybrid", "llama", "qwen2"):
            return f"architecture '{mt}'"
        if mt == "granitemoehybrid" and getattr(cfg, "num_local_experts", 0):
            return "MoE experts"
        if mt == "qwen2" and getattr(cfg, "use_sliding_window", False):
            return "sliding-window attention"
        rope = getattr(cfg, "rope_parameters", None) or {}
        if isinstance(rope, dict) and rope.get("rope_type") in ("dynamic", "longrope"):
            return f"rope_type '{rope.get('rope_type')}'"
        if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "eager", None):
            return f"attention implementation '{cfg._attn_implementation}'"
        return None
