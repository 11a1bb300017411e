"""CosyVoice2's token encoder: upstream `UpsampleConformerEncoder` and the token -> mu path around it.

State-dict keys equal upstream's `flow.encoder.*` (for `UpsampleConformerEncoder`) and `flow.*` minus
`decoder.*` (for `CosyVoice2TokenEncoder`). Inference only: dropout layers are omitted (no params).

Structure (upstream, CosyVoice2 config): LinearNoSubsampling embed (Linear + LayerNorm, then
x * sqrt(d) and an ESPnet relative positional table) -> PreLookaheadLayer (3 tokens of look-ahead)
-> `num_blocks` conformer layers (rel-pos self-attention with pos_bias_u/v, pre-norm, SiLU FFN; no
macaron FFN, no convolution module) -> Upsample1D x2 (nearest, left zero-pad 4, conv k5) -> `up_embed`
-> 4 more conformer layers (`up_encoders`, hard-coded in upstream) -> `after_norm`.

Streaming (upstream `streaming=True`) uses static chunk masks: `chunk_tokens` tokens for `encoders`
and `chunk_tokens * stride` frames for `up_encoders` (upstream: `static_chunk_size *
up_layer.stride`), with unlimited left context. `chunk_tokens` is a tensor input so one exported
graph serves both modes (0 = offline / full context).

Look-ahead context (upstream `flow.inference(..., finalize=False)`): upstream cuts the last
`pre_lookahead_len` tokens off and passes them to the encoder as `context`, where they only feed the
PreLookaheadLayer. The embed is per position and the PreLookaheadLayer's conv1 only looks right, so
that equals embedding all tokens, running the PreLookaheadLayer over all of them, and then treating
the context tokens as padding (never attended to; the causal up-sampling conv never looks right
either). `context_tokens` does exactly that, so outputs keep the static shape 2N and the caller keeps
the first 2 * (len - context) frames (`valid_up` marks them). Rows are assumed right-padded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import UserError
from models.layers import PreLookaheadLayer, chunk_attention_mask

# Upstream UpsampleConformerEncoder.__init__ defaults (CosyVoice @ ace7c47f), used to resolve the
# kwargs a config file leaves out before they are checked against what this module implements.
_UPSTREAM_ENCODER_DEFAULTS = dict(
    output_size=256, attention_heads=4, linear_units=2048, num_blocks=6, dropout_rate=0.1,
    positional_dropout_rate=0.1, attention_dropout_rate=0.0, input_layer="conv2d",
    pos_enc_layer_type="rel_pos", normalize_before=True, static_chunk_size=0, use_dynamic_chunk=False,
    global_cmvn=None, use_dynamic_left_chunk=False, positionwise_conv_kernel_size=1, macaron_style=True,
    selfattention_layer_type="rel_selfattn", activation_type="swish", use_cnn_module=True,
    cnn_module_kernel=15, causal=False, cnn_module_norm="batch_norm", key_bias=True,
    gradient_checkpointing=False,
)
# What this implementation supports (the CosyVoice2 configuration); anything else is refused.
_REQUIRED = dict(input_layer="linear", pos_enc_layer_type="rel_pos_espnet", normalize_before=True,
                 selfattention_layer_type="rel_selfattn", macaron_style=False, use_cnn_module=False,
                 global_cmvn=None)
_ACTIVATIONS = {"swish": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


@dataclass(frozen=True)
class ConformerEncoderConfig:
    """Hyper-parameters of `UpsampleConformerEncoder`; defaults are CosyVoice2-0.5B's."""

    input_size: int = 512
    output_size: int = 512
    attention_heads: int = 8
    linear_units: int = 2048
    num_blocks: int = 6
    num_up_blocks: int = 4  # hard-coded in upstream
    static_chunk_size: int = 25  # tokens; the up-encoders use static_chunk_size * upsample_stride frames
    pre_lookahead_len: int = 3  # hard-coded in upstream (PreLookaheadLayer(512, 512, 3))
    upsample_stride: int = 2  # hard-coded in upstream (Upsample1D(512, 512, stride=2))
    activation_type: str = "swish"
    key_bias: bool = True

    def __post_init__(self):
        if self.output_size % self.attention_heads:
            raise UserError(f"encoder output_size {self.output_size} is not divisible by attention_heads "
                            f"{self.attention_heads}.", "fix the flow encoder config")
        if self.input_size != self.output_size:
            # upstream feeds the upsampled output_size features into up_embed, a Linear(input_size, ...)
            raise UserError(f"encoder input_size {self.input_size} != output_size {self.output_size}; upstream's "
                            "up_embed needs them equal.", "fix the flow encoder config")
        if self.activation_type not in _ACTIVATIONS:
            raise UserError(f"encoder activation_type {self.activation_type!r} is not supported.",
                            f"use one of {sorted(_ACTIVATIONS)}")

    @classmethod
    def from_upstream(cls, kwargs: dict) -> "ConformerEncoderConfig":
        """From upstream `UpsampleConformerEncoder(**kwargs)` (cosyvoice2.yaml `flow.encoder`)."""
        unknown = sorted(set(kwargs) - set(_UPSTREAM_ENCODER_DEFAULTS) - {"input_size"})
        if unknown:
            raise UserError(f"unknown UpsampleConformerEncoder kwargs {unknown}.", "check the flow encoder config")
        if "input_size" not in kwargs:
            raise UserError("UpsampleConformerEncoder kwargs lack input_size.", "add input_size to the flow encoder config")
        kw = {**_UPSTREAM_ENCODER_DEFAULTS, **kwargs}
        bad = {k: kw[k] for k, v in _REQUIRED.items() if kw[k] != v}
        if bad:
            raise UserError(f"UpsampleConformerEncoder settings {bad} are not supported (CosyVoice2 uses {_REQUIRED}).",
                            "use a CosyVoice2 flow config")
        if kw["use_dynamic_chunk"]:
            raise UserError("use_dynamic_chunk=True is a training option and is not supported.", "set it to false")
        return cls(input_size=kw["input_size"], output_size=kw["output_size"], attention_heads=kw["attention_heads"],
                   linear_units=kw["linear_units"], num_blocks=kw["num_blocks"],
                   static_chunk_size=kw["static_chunk_size"], activation_type=kw["activation_type"],
                   key_bias=kw["key_bias"])


def rel_position_table(size: int | torch.SymInt, d_model: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """ESPnet relative positional encoding for a length-`size` sequence: [1, 2*size-1, d_model].

    Row k encodes the relative position r = size-1-k (keys to the left of the query are positive),
    i.e. upstream EspnetRelPositionalEncoding's table centre slice, computed with tensor ops so any
    length works (upstream precomputes 5000 positions and extends on demand). Same float32
    arithmetic as upstream: sin/cos of (r * div_term)."""
    div_term = torch.exp(torch.arange(0, d_model, 2, device=device, dtype=torch.float32)
                         * -(math.log(10000.0) / d_model))
    pos = (size - 1) - torch.arange(0, 2 * size - 1, device=device, dtype=torch.int64)
    angle = pos.to(torch.float32).unsqueeze(1) * div_term  # [2T-1, d/2]
    pe = torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1).reshape(1, -1, d_model)
    return pe.to(dtype)


class LinearEmbed(nn.Module):
    """Upstream LinearNoSubsampling + EspnetRelPositionalEncoding (keys `out.0`, `out.1`)."""

    def __init__(self, idim: int, odim: int):
        super().__init__()
        self.odim = odim
        self.xscale = math.sqrt(odim)
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5), nn.Identity())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.out(x) * self.xscale
        return x, rel_position_table(x.shape[1], self.odim, device=x.device, dtype=x.dtype)


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, 2T-1] scores against relative positions (row k = position T-1-k) -> [B, H, T, T]
    with out[..., i, j] = x[..., i, T-1-i+j] (the Transformer-XL pad-and-reshape trick)."""
    t, n = x.shape[-2], x.shape[-1]
    x = F.pad(x, (1, 0)).flatten(-2)  # [B, H, T*2T]
    x = x.unflatten(-1, (n + 1, t))[:, :, 1:]  # [B, H, 2T-1, T]
    return x.flatten(-2).unflatten(-1, (t, n))[..., :t]


class RelPositionAttention(nn.Module):
    """Upstream RelPositionMultiHeadedAttention (inference): scores = ((q+u)k^T + rel_shift((q+v)p^T)) / sqrt(d_k)."""

    def __init__(self, n_head: int, n_feat: int, key_bias: bool = True):
        super().__init__()
        self.h = n_head
        self.d_k = n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat, bias=key_bias)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_head, self.d_k))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        """x [B, T, C], mask [B, T, T] bool (True = may attend; no all-False rows), pos_emb [1, 2T-1, C]."""
        b, t, _ = x.shape
        q = self.linear_q(x).reshape(b, t, self.h, self.d_k)
        k = self.linear_k(x).reshape(b, t, self.h, self.d_k).transpose(1, 2)
        v = self.linear_v(x).reshape(b, t, self.h, self.d_k).transpose(1, 2)
        p = self.linear_pos(pos_emb).reshape(pos_emb.shape[0], -1, self.h, self.d_k).transpose(1, 2)
        q_u = (q + self.pos_bias_u).transpose(1, 2)  # [B, H, T, d_k]
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        matrix_ac = torch.matmul(q_u, k.transpose(-2, -1))  # [B, H, T, T]
        matrix_bd = rel_shift(torch.matmul(q_v, p.transpose(-2, -1)))  # [B, H, T, T]
        scores = (matrix_ac + matrix_bd) / math.sqrt(self.d_k)
        # upstream fills -inf and zeroes masked weights after the softmax; rows are never all-masked,
        # so the finite minimum gives bitwise the same weights and stays NaN-free in any precision.
        scores = scores.masked_fill(~mask.unsqueeze(1), torch.finfo(scores.dtype).min)
        attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, t, self.h * self.d_k)
        return self.linear_out(out)


class FeedForward(nn.Module):
    """Upstream PositionwiseFeedForward: w_2(act(w_1(x)))."""

    def __init__(self, idim: int, hidden: int, activation: str):
        super().__init__()
        self.w_1 = nn.Linear(idim, hidden)
        self.activation = _ACTIVATIONS[activation]()
        self.w_2 = nn.Linear(hidden, idim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.activation(self.w_1(x)))


class ConformerLayer(nn.Module):
    """Upstream ConformerEncoderLayer with normalize_before=True, no macaron FFN, no conv module."""

    def __init__(self, size: int, heads: int, linear_units: int, activation: str, key_bias: bool):
        super().__init__()
        self.self_attn = RelPositionAttention(heads, size, key_bias)
        self.feed_forward = FeedForward(size, linear_units, activation)
        self.norm_ff = nn.LayerNorm(size, eps=1e-12)
        self.norm_mha = nn.LayerNorm(size, eps=1e-12)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), mask, pos_emb)
        return x + self.feed_forward(self.norm_ff(x))


class Upsample1D(nn.Module):
    """Upstream encoder Upsample1D: nearest x stride, left zero-pad 2*stride, Conv1d(kernel 2*stride+1). [B, C, T] -> [B, C, stride*T]."""

    def __init__(self, channels: int, out_channels: int, stride: int = 2):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, out_channels, stride * 2 + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t = x.shape
        x = x.unsqueeze(-1).expand(b, c, t, self.stride).reshape(b, c, t * self.stride)  # == nearest interpolation
        return self.conv(F.pad(x, (self.stride * 2, 0)))


def _keep_context_out(valid: torch.Tensor, context_tokens: torch.Tensor | int | None) -> torch.Tensor:
    """`valid` minus the last `context_tokens` valid positions of each (right-padded) row."""
    if context_tokens is None:
        return valid
    ctx = torch.as_tensor(context_tokens, device=valid.device, dtype=torch.int64).reshape(-1, 1)
    length = valid.to(torch.int64).sum(dim=1, keepdim=True)
    pos = torch.arange(valid.shape[1], device=valid.device).unsqueeze(0)
    return valid & (pos < length - ctx)


class UpsampleConformerEncoder(nn.Module):
    """Upstream `UpsampleConformerEncoder` (CosyVoice2 flow.encoder), graph-friendly.

    forward(xs [B, N, input_size] float, valid [B, N] bool (right padding), chunk_tokens int64 [1]
    (0 = offline, >0 = static chunk of that many tokens; the up-encoders use chunk_tokens * stride
    frames), context_tokens int64 [1] or [B] or None (trailing valid tokens that are look-ahead only,
    upstream finalize=False)) -> (ys [B, stride*N, output_size], valid_up [B, stride*N] bool).

    Frames where `valid_up` is False (padding and look-ahead context) hold unspecified values."""

    def __init__(self, cfg: ConformerEncoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.output_size
        layer = lambda: ConformerLayer(d, cfg.attention_heads, cfg.linear_units, cfg.activation_type, cfg.key_bias)  # noqa: E731
        self.embed = LinearEmbed(cfg.input_size, d)
        self.pre_lookahead_layer = PreLookaheadLayer(d, d, cfg.pre_lookahead_len)
        self.encoders = nn.ModuleList([layer() for _ in range(cfg.num_blocks)])
        self.up_layer = Upsample1D(d, d, cfg.upsample_stride)
        self.up_embed = LinearEmbed(cfg.input_size, d)
        self.up_encoders = nn.ModuleList([layer() for _ in range(cfg.num_up_blocks)])
        self.after_norm = nn.LayerNorm(d, eps=1e-5)

    def forward(self, xs: torch.Tensor, valid: torch.Tensor, chunk_tokens: torch.Tensor | int = 0,
                context_tokens: torch.Tensor | int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        stride = self.cfg.upsample_stride
        x, pos_emb = self.embed(xs)
        # zero past each row's end: the look-ahead conv then sees what a batch-1 call sees (zero padding)
        x = x * valid.unsqueeze(-1).to(x.dtype)
        x = self.pre_lookahead_layer(x)
        att_valid = _keep_context_out(valid, context_tokens)
        chunk = torch.as_tensor(chunk_tokens, device=xs.device, dtype=torch.int64).reshape(-1)[:1]
        mask = chunk_attention_mask(att_valid, chunk)
        for layer in self.encoders:
            x = layer(x, mask, pos_emb)

        x = self.up_layer(x.transpose(1, 2)).transpose(1, 2)
        b, n = att_valid.shape
        valid_up = att_valid.unsqueeze(-1).expand(b, n, stride).reshape(b, n * stride)
        x, pos_emb = self.up_embed(x)
        mask = chunk_attention_mask(valid_up, chunk * stride)
        for layer in self.up_encoders:
            x = layer(x, mask, pos_emb)
        return self.after_norm(x), valid_up


# Upstream CausalMaskedDiffWithXvec.__init__ defaults.
_UPSTREAM_FLOW_DEFAULTS = dict(input_size=512, output_size=80, spk_embed_dim=192, output_type="mel", vocab_size=4096,
                               input_frame_rate=50, only_mask_loss=True, token_mel_ratio=2, pre_lookahead_len=3,
                               encoder=None, decoder=None, decoder_conf=None)


@dataclass(frozen=True)
class TokenEncoderConfig:
    """CosyVoice2 flow front half (CausalMaskedDiffWithXvec minus the decoder); defaults are CosyVoice2-0.5B's."""

    vocab_size: int = 6561
    input_size: int = 512
    output_size: int = 80  # mel bins
    spk_embed_dim: int = 192
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3
    encoder: ConformerEncoderConfig = ConformerEncoderConfig()

    def __post_init__(self):
        if self.token_mel_ratio != self.encoder.upsample_stride:
            raise UserError(f"token_mel_ratio {self.token_mel_ratio} != encoder upsampling {self.encoder.upsample_stride}.",
                            "use a CosyVoice2 flow config")
        if self.pre_lookahead_len != self.encoder.pre_lookahead_len:
            raise UserError(f"flow pre_lookahead_len {self.pre_lookahead_len} != encoder {self.encoder.pre_lookahead_len}.",
                            "use a CosyVoice2 flow config")
        if self.input_size != self.encoder.input_size:
            raise UserError(f"flow input_size {self.input_size} != encoder input_size {self.encoder.input_size}.",
                            "fix the flow config")

    @classmethod
    def from_upstream(cls, flow_kwargs: dict, encoder_kwargs: dict) -> "TokenEncoderConfig":
        """From upstream `CausalMaskedDiffWithXvec(**flow_kwargs)` and `UpsampleConformerEncoder(**encoder_kwargs)`."""
        unknown = sorted(set(flow_kwargs) - set(_UPSTREAM_FLOW_DEFAULTS))
        if unknown:
            raise UserError(f"unknown CausalMaskedDiffWithXvec kwargs {unknown}.", "check the flow config")
        kw = {**_UPSTREAM_FLOW_DEFAULTS, **flow_kwargs}
        enc = ConformerEncoderConfig.from_upstream(encoder_kwargs)
        enc = ConformerEncoderConfig(**{**{f.name: getattr(enc, f.name) for f in fields(enc)},
                                        "pre_lookahead_len": kw["pre_lookahead_len"]})
        return cls(vocab_size=kw["vocab_size"], input_size=kw["input_size"], output_size=kw["output_size"],
                   spk_embed_dim=kw["spk_embed_dim"], token_mel_ratio=kw["token_mel_ratio"],
                   pre_lookahead_len=kw["pre_lookahead_len"], encoder=enc)


class CosyVoice2TokenEncoder(nn.Module):
    """Tokens -> mu and speaker projection: the `flow_encoder` graph of CosyVoice2.

    Keys: `input_embedding`, `encoder.*`, `encoder_proj`, `spk_embed_affine_layer` (upstream flow.pt
    without `decoder.*`).

    forward(tokens [B, N] int64 (-1 = padding, right-padded), embedding [B, spk_embed_dim] raw x-vector,
    chunk_tokens int64 [1] (0 = offline, 25 = CosyVoice2 streaming), context_tokens int64 [1]/[B] or
    None (trailing tokens that are look-ahead only: upstream finalize=False passes pre_lookahead_len))
    -> (mu [B, 80, ratio*N] with zeros on padded / context frames, spks [B, 80]).

    Upstream equivalence (batch 1, prompt tokens concatenated in front of the new ones by the caller):
    finalize=True -> context_tokens None/0; mu == flow.decoder's mu. finalize=False -> context_tokens =
    pre_lookahead_len; the first ratio*(N - context) frames == upstream mu, the rest are zero."""

    # numerically sensitive in fp16 (a rung of the fp16 precision ladder keeps it float32)
    SENSITIVE_PARTS = ("spk_embed_affine_layer",)

    def __init__(self, cfg: TokenEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.encoder = UpsampleConformerEncoder(cfg.encoder)
        self.encoder_proj = nn.Linear(cfg.encoder.output_size, cfg.output_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)

    def frame_valid(self, tokens: torch.Tensor, context_tokens: torch.Tensor | int | None = None) -> torch.Tensor:
        """[B, ratio*N] bool: the mel frames `forward` computes for real (not padding, not context)."""
        valid = _keep_context_out(tokens >= 0, context_tokens)
        return valid.repeat_interleave(self.cfg.token_mel_ratio, dim=1)

    def forward(self, tokens: torch.Tensor, embedding: torch.Tensor, chunk_tokens: torch.Tensor | int = 0,
                context_tokens: torch.Tensor | int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        spks = self.spk_embed_affine_layer(F.normalize(embedding, dim=1))
        valid = tokens >= 0
        x = self.input_embedding(torch.clamp(tokens, min=0)) * valid.unsqueeze(-1).to(spks.dtype)
        h, valid_up = self.encoder(x, valid, chunk_tokens, context_tokens)
        mu = self.encoder_proj(h) * valid_up.unsqueeze(-1).to(h.dtype)
        return mu.transpose(1, 2), spks


__all__ = ["ConformerEncoderConfig", "UpsampleConformerEncoder", "TokenEncoderConfig", "CosyVoice2TokenEncoder",
           "rel_position_table", "rel_shift"]
