"""One decoder-only transformer body for Qwen2 (CosyVoice2/3) and Llama-3.2 (Orpheus).

Architecture (both families): token embedding, N x [RMSNorm -> GQA self-attention with RoPE ->
residual, RMSNorm -> SwiGLU MLP -> residual], final RMSNorm. Differences are configuration only:
Qwen2 has q/k/v biases (no o_proj bias) and plain RoPE; Llama-3.x has no biases and llama3-scaled
RoPE frequencies. State-dict keys equal HF's inner `model.*` module (`embed_tokens.weight`,
`layers.N.self_attn.{q,k,v,o}_proj.*`, `layers.N.mlp.{gate,up,down}_proj.weight`,
`layers.N.{input,post_attention}_layernorm.weight`, `norm.weight`), so HF / upstream checkpoints load
with strict keys.

The KV cache is explicit tensors in and out, stacked over layers:

    forward(inputs_embeds [B,S,D], attention_mask [B,P+S] (1 = real token, 0 = left padding),
            past_keys [L,B,KVH,P,HD], past_values [L,B,KVH,P,HD])
        -> hidden [B,S,D] (after the final norm), present_keys / present_values [L,B,KVH,P+S,HD]

P = 0 is the prefill. Cached keys are post-RoPE (as HF's DynamicCache). Position ids are derived from
the mask inside the graph (cumsum(mask) - 1, clamped at 0, last S columns), so left-padded batches get
the same positions as their unpadded rows. Attention is causal over cache + new tokens and ignores
padded keys; every query may always attend to itself, so padded query rows never see an all-masked row
(their outputs are finite garbage that nobody reads). No host syncs, no branches on tensor values, no
data-dependent shapes: torch.export captures it with dynamic B, S and P.

Exporting: give the mask length its own dim, e.g. `{0: B, 1: Dim("T", min=1)}` next to `{1: B, 3: P}`
for the caches; the forward states T == P + S with `torch._check`, so export records the relation
(`P + S` cannot be written as a derived Dim, and `Dim.AUTO` there inherits a [4, ...] lower bound from
the 0/1-specialisation hints of S and P). With that, the exported program accepts P = 0 and S = 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import UserError

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # None (plain RoPE) or {"rope_type": "llama3", factor, low/high_freq_factor, original_max_position_embeddings}
    attention_bias: bool  # bias on q/k/v projections (Qwen2: always; Llama: config.attention_bias)
    tie_word_embeddings: bool
    max_position_embeddings: int
    o_proj_bias: bool = False  # bias on o_proj (Llama with attention_bias=True; never Qwen2)
    mlp_bias: bool = False  # bias on gate/up/down (Llama mlp_bias)

    def __hash__(self):  # rope_scaling is a dict: hash a canonical form instead
        return hash(tuple((k, tuple(sorted(v.items())) if isinstance(v, dict) else v) for k, v in asdict(self).items()))

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @classmethod
    def from_hf_config(cls, d: dict) -> "DecoderConfig":
        """Read a HF `config.json` dict of a Qwen2 or Llama model."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UserError(f"model config has model_type {model_type!r}; only {list(SUPPORTED_MODEL_TYPES)} are supported.",
                            "pass the config.json of a Qwen2 (CosyVoice) or Llama (Orpheus) checkpoint")

        def need(key):
            if key not in d:
                raise UserError(f"model config ({model_type}) lacks the key {key!r}.", "pass the complete HF config.json of the checkpoint")
            return d[key]

        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise UserError(f"model config has hidden_act {act!r}; only 'silu' (SwiGLU) is supported.", "use a Qwen2 / Llama checkpoint")
        if model_type == "qwen2" and d.get("use_sliding_window", False):
            raise UserError("model config enables use_sliding_window, which is not implemented.",
                            "use a config with use_sliding_window=false (as Qwen2.5 / CosyVoice ship)")
        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        head_dim = d.get("head_dim") or hidden // heads
        if model_type == "qwen2":
            qkv_bias, o_bias, mlp_bias = True, False, False
        else:
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
            mlp_bias = bool(d.get("mlp_bias", False))
        return cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            rope_scaling=_normalise_rope_scaling(d.get("rope_scaling")),
            attention_bias=qkv_bias,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            o_proj_bias=o_bias,
            mlp_bias=mlp_bias,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _normalise_rope_scaling(rs: dict | None) -> dict | None:
    if not rs:
        return None
    rope_type = rs.get("rope_type", rs.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise UserError(f"rope_scaling type {rope_type!r} is not supported (only default and llama3).",
                        "use a Qwen2 / Llama-3.x checkpoint")
    try:
        return {
            "rope_type": "llama3",
            "factor": float(rs["factor"]),
            "low_freq_factor": float(rs["low_freq_factor"]),
            "high_freq_factor": float(rs["high_freq_factor"]),
            "original_max_position_embeddings": int(rs["original_max_position_embeddings"]),
        }
    except KeyError as e:
        raise UserError(f"llama3 rope_scaling lacks the key {e.args[0]!r}.", "pass the complete HF config.json") from None


def rope_inv_freq(cfg: DecoderConfig) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim/2] float32, computed as HF does (default or llama3 scaling)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    # Llama 3.x: wavelengths above original_ctx / low_freq_factor are divided by `factor`, those below
    # original_ctx / high_freq_factor are kept, and the band in between is interpolated smoothly.
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old_ctx = rs["original_max_position_embeddings"]
    low_freq_wavelen = old_ctx / low
    high_freq_wavelen = old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_attention_scaling(cfg: DecoderConfig) -> float:
    """Factor HF multiplies cos/sin with; 1.0 for the default and llama3 rope types."""
    return 1.0


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B,H,S,HD], cos/sin [B,1,S,HD] -> rotated x (HF's rotate_half convention)."""
    return x * cos + _rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.groups = cfg.num_heads // cfg.num_kv_heads
        self.scale = cfg.head_dim ** -0.5
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, cfg.num_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, d, bias=cfg.o_proj_bias)

    def _repeat_kv(self, x: torch.Tensor) -> torch.Tensor:
        # [B,KVH,T,HD] -> [B,H,T,HD], head h uses kv head h // groups (HF repeat_kv). Explicit instead of
        # SDPA's enable_gqa so ONNX / TensorRT see plain ops; repeat_interleave (unlike expand + reshape)
        # adds no `P + S != 1` guard to an exported program.
        if self.groups == 1:
            return x
        return torch.repeat_interleave(x, self.groups, dim=1)

    def forward(self, x, cos, sin, mask, past_k, past_v):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        k_all = torch.cat([past_k, k], dim=2)
        v_all = torch.cat([past_v, v], dim=2)
        out = F.scaled_dot_product_attention(q, self._repeat_kv(k_all), self._repeat_kv(v_all),
                                             attn_mask=mask, scale=self.scale)
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.o_proj(out), k_all, v_all


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past_k, past_v):
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_k, past_v)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


def attention_inputs(attention_mask: torch.Tensor, s: int):
    """(position ids [B,S] int64, boolean attention mask [B,1,S,P+S]) for the last `s` columns of
    `attention_mask` [B,P+S]. Pure tensor ops (no host sync)."""
    t = attention_mask.shape[1]
    dev = attention_mask.device
    valid = attention_mask > 0
    k_idx = torch.arange(t, device=dev)
    # absolute indices of the new tokens; index_select instead of slicing [t - s:], whose symbolic
    # start makes torch.export add guards that break P = 0 or S = P + S at run time
    q_idx = torch.arange(s, device=dev) + (t - s)
    positions = (attention_mask.to(torch.int64).cumsum(-1) - 1).clamp(min=0).index_select(1, q_idx)
    causal = k_idx[None, :] <= q_idx[:, None]  # [S,T]
    self_pos = k_idx[None, :] == q_idx[:, None]  # [S,T]
    allowed = (causal[None] & valid[:, None, :]) | self_pos[None]  # [B,S,T]
    return positions, allowed[:, None]


class DecoderBody(nn.Module):
    """HF `Qwen2Model` / `LlamaModel` equivalent with an explicit, stacked KV cache."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # not persistent: state_dict keys stay HF's; always float32 (see _apply)
        self.register_buffer("rope_inv_freq", rope_inv_freq(cfg), persistent=False)
        self.rope_attention_scaling = rope_attention_scaling(cfg)

    def _apply(self, fn, recurse=True):
        # `.half()` / `.to(dtype)` / meta materialisation would also cast the RoPE frequencies;
        # recompute them in float32 on the buffer's (new) device so positions stay exact.
        out = super()._apply(fn, recurse)
        dev = self.rope_inv_freq.device
        if self.rope_inv_freq.dtype != torch.float32 or dev.type == "meta":
            self.rope_inv_freq = rope_inv_freq(self.config).to(dev)
        return out

    def reset_rope(self, device=None) -> None:
        """Recompute the RoPE buffer (after building on the meta device and loading with assign=True)."""
        self.rope_inv_freq = rope_inv_freq(self.config).to(device or self.embed_tokens.weight.device)

    def empty_cache(self, batch: int, dtype=None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty past_keys / past_values [L,B,KVH,0,HD] for a prefill."""
        w = self.embed_tokens.weight
        c = self.config
        z = torch.zeros(c.num_layers, batch, c.num_kv_heads, 0, c.head_dim, dtype=dtype or w.dtype, device=device or w.device)
        return z, z.clone()

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin [B,1,S,HD] for integer positions [B,S] (computed in float32, as HF)."""
        freqs = positions.float()[..., None] * self.rope_inv_freq.float()  # [B,S,HD/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.rope_attention_scaling
        sin = emb.sin() * self.rope_attention_scaling
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_keys: torch.Tensor | None = None, past_values: torch.Tensor | None = None):
        """See the module docstring. `attention_mask` / `past_*` may be None in eager use (no padding,
        empty cache); graphs always pass them."""
        b, s, _ = inputs_embeds.shape
        if past_keys is None or past_values is None:
            past_keys, past_values = self.empty_cache(b, inputs_embeds.dtype, inputs_embeds.device)
        if attention_mask is None:
            attention_mask = torch.ones(b, past_keys.shape[3] + s, dtype=torch.int64, device=inputs_embeds.device)
        # shape-only check (no tensor sync): tells torch.export that mask length == P + S before any
        # broadcasting, so no spurious guards (e.g. P + S != 1) end up in the exported program
        torch._check(attention_mask.shape[1] == past_keys.shape[3] + s)
        positions, mask = attention_inputs(attention_mask, s)
        cos, sin = self.rope(positions, inputs_embeds.dtype)
        h = inputs_embeds
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            h, k, v = layer(h, cos, sin, mask, past_keys[i], past_values[i])
            keys.append(k)
            values.append(v)
        return self.norm(h), torch.stack(keys), torch.stack(values)
