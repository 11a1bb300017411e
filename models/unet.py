"""CosyVoice2's flow-matching estimator: upstream `CausalConditionalDecoder` (a 1-D U-Net), graph-friendly.

State-dict keys equal upstream's `flow.decoder.estimator.*`. Inference only: dropout is omitted.
The building blocks come from Matcha-TTS (SinusoidalPosEmb, TimestepEmbedding, ResnetBlock1D,
Downsample1D, Upsample1D) and diffusers (BasicTransformerBlock with a self-attention `attn1`, `norm1`,
`norm3` and FeedForward `ff`); CosyVoice makes the convolutions causal (left padding) and swaps
GroupNorm for a LayerNorm over channels.

The call signature is the one the shared CFM solver uses for every estimator (also CosyVoice3's DiT):
`forward(x, mask, mu, t, spks, cond, chunk_frames)`; `chunk_frames` 0 = upstream `streaming=False`
(attention over all valid frames), > 0 = upstream `streaming=True` with that static chunk
(CosyVoice2: 50 frames, no left limit). It is a tensor so one exported graph serves both modes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import UserError
from models.layers import chunk_attention_mask

# Upstream CausalConditionalDecoder.__init__ defaults (CosyVoice @ ace7c47f).
_UPSTREAM_DEFAULTS = dict(channels=(256, 256), dropout=0.05, attention_head_dim=64, n_blocks=1, num_mid_blocks=2,
                          num_heads=4, act_fn="snake", static_chunk_size=50, num_decoding_left_chunks=2)
_FF_ACTIVATIONS = ("gelu", "gelu-approximate", "geglu")


@dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of `CausalConditionalDecoder`; defaults are CosyVoice2-0.5B's."""

    in_channels: int = 320  # x, mu, spks, cond: 4 * 80
    out_channels: int = 80
    channels: tuple = (256,)
    attention_head_dim: int = 64
    n_blocks: int = 4
    num_mid_blocks: int = 12
    num_heads: int = 8
    act_fn: str = "gelu"
    static_chunk_size: int = 50  # frames, used when the caller streams (chunk_frames > 0 picks the value)

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if not self.channels:
            raise UserError("U-Net estimator needs at least one entry in channels.", "fix the flow decoder config")
        if self.act_fn not in _FF_ACTIVATIONS:
            raise UserError(f"U-Net estimator act_fn {self.act_fn!r} is not supported.", f"use one of {_FF_ACTIVATIONS}")

    @classmethod
    def from_upstream(cls, kwargs: dict) -> "UNetConfig":
        """From upstream `CausalConditionalDecoder(**kwargs)` (cosyvoice2.yaml `flow.decoder.estimator`).

        `dropout` is a training setting and `num_decoding_left_chunks` is stored but never used by
        upstream's forward (its chunk masks always get -1 = unlimited left context); both are accepted."""
        unknown = sorted(set(kwargs) - set(_UPSTREAM_DEFAULTS) - {"in_channels", "out_channels"})
        if unknown:
            raise UserError(f"unknown CausalConditionalDecoder kwargs {unknown}.", "check the flow decoder config")
        missing = [k for k in ("in_channels", "out_channels") if k not in kwargs]
        if missing:
            raise UserError(f"CausalConditionalDecoder kwargs lack {missing}.", "add them to the flow decoder config")
        kw = {**_UPSTREAM_DEFAULTS, **kwargs}
        return cls(in_channels=kw["in_channels"], out_channels=kw["out_channels"], channels=tuple(kw["channels"]),
                   attention_head_dim=kw["attention_head_dim"], n_blocks=kw["n_blocks"],
                   num_mid_blocks=kw["num_mid_blocks"], num_heads=kw["num_heads"], act_fn=kw["act_fn"],
                   static_chunk_size=kw["static_chunk_size"])


def sinusoidal_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Matcha SinusoidalPosEmb: [B] -> [B, dim] = cat(sin, cos)(scale * t * exp(-i * ln(1e4) / (dim/2 - 1)))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
    emb = scale * t.reshape(-1).unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat((emb.sin(), emb.cos()), dim=-1).to(t.dtype)


class TimestepEmbedding(nn.Module):
    """diffusers/Matcha TimestepEmbedding: linear_2(silu(linear_1(x)))."""

    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class CausalConv1d(nn.Conv1d):
    """Conv1d with left zero padding kernel_size-1 (stride 1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__(in_channels, out_channels, kernel_size)
        self.causal_padding = kernel_size - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (self.causal_padding, 0)))


class Transpose(nn.Module):
    def __init__(self, dim0: int, dim1: int):
        super().__init__()
        self.dim0, self.dim1 = dim0, dim1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(self.dim0, self.dim1)


class CausalBlock1D(nn.Module):
    """CausalConv1d(k3) -> LayerNorm over channels -> Mish, masked in and out (keys block.0, block.2)."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.block = nn.Sequential(CausalConv1d(dim, dim_out, 3), Transpose(1, 2), nn.LayerNorm(dim_out),
                                   Transpose(1, 2), nn.Mish())

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.block(x * mask) * mask


class CausalResnetBlock1D(nn.Module):
    """Matcha ResnetBlock1D with causal blocks: block2(block1(x) + mlp(t)) + res_conv(x * mask)."""

    def __init__(self, dim: int, dim_out: int, time_emb_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = CausalBlock1D(dim, dim_out)
        self.block2 = CausalBlock1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x, mask) + self.mlp(temb).unsqueeze(-1)
        h = self.block2(h, mask)
        return h + self.res_conv(x * mask)


class Downsample1D(nn.Module):
    """Matcha Downsample1D: Conv1d(k3, stride 2, pad 1) (only used when channels has > 1 entry)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample1D(nn.Module):
    """Matcha Upsample1D(use_conv_transpose=True): ConvTranspose1d(k4, stride 2, pad 1) (channels > 1 entry only)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(dim, dim, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Attention(nn.Module):
    """diffusers Attention (AttnProcessor2_0) as self-attention: to_q/k/v without bias, to_out.0 with bias."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Identity()])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, T, C], bias [B, 1, T, T] additive."""
        b, t, _ = x.shape
        q = self.to_q(x).reshape(b, t, self.heads, -1).transpose(1, 2)
        k = self.to_k(x).reshape(b, t, self.heads, -1).transpose(1, 2)
        v = self.to_v(x).reshape(b, t, self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(b, t, -1)
        return self.to_out[0](out)


class GELU(nn.Module):
    """diffusers GELU / GEGLU projection (key `proj`)."""

    def __init__(self, dim_in: int, dim_out: int, kind: str):
        super().__init__()
        self.kind = kind
        self.proj = nn.Linear(dim_in, dim_out * 2 if kind == "geglu" else dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        if self.kind == "geglu":
            x, gate = x.chunk(2, dim=-1)
            return x * F.gelu(gate)
        return F.gelu(x, approximate="tanh" if self.kind == "gelu-approximate" else "none")


class FeedForward(nn.Module):
    """diffusers FeedForward (mult 4): net = [GELU(proj), Dropout, Linear]."""

    def __init__(self, dim: int, act_fn: str, mult: int = 4):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.ModuleList([GELU(dim, inner, act_fn), nn.Identity(), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            x = module(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Matcha/diffusers BasicTransformerBlock with layer_norm, self-attention only: x += attn1(norm1(x)); x += ff(norm3(x))."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, act_fn: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, act_fn)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x), bias) + x
        return self.ff(self.norm3(x)) + x


def _attention_bias(mask: torch.Tensor, chunk_frames: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, T] float mask -> [B, 1, T, T] additive bias, upstream's mask_to_bias((1 - m) * -1e10)."""
    allowed = chunk_attention_mask(mask[:, 0, :] != 0, chunk_frames)
    return ((1.0 - allowed.to(dtype)) * -1.0e10).unsqueeze(1)


class CausalConditionalDecoder(nn.Module):
    """Upstream CosyVoice2 U-Net estimator.

    forward(x [B, 80, T] noisy mel, mask [B, 1, T] float (1 = valid frame), mu [B, 80, T] encoder
    condition, t [B] flow time in [0, 1], spks [B, 80] projected speaker embedding, cond [B, 80, T]
    prompt-mel condition, chunk_frames int64 [1] (0 = full context, > 0 = static chunk attention))
    -> velocity [B, 80, T] (zero where mask is 0)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        channels = cfg.channels
        temb_dim = channels[0] * 4
        self.time_mlp = TimestepEmbedding(cfg.in_channels, temb_dim)

        def transformers(dim):
            return nn.ModuleList([BasicTransformerBlock(dim, cfg.num_heads, cfg.attention_head_dim, cfg.act_fn)
                                  for _ in range(cfg.n_blocks)])

        self.down_blocks = nn.ModuleList()
        out_ch = cfg.in_channels
        for i, ch in enumerate(channels):
            in_ch, out_ch = out_ch, ch
            last = i == len(channels) - 1
            self.down_blocks.append(nn.ModuleList([
                CausalResnetBlock1D(in_ch, out_ch, temb_dim), transformers(out_ch),
                CausalConv1d(out_ch, out_ch, 3) if last else Downsample1D(out_ch)]))
        self.mid_blocks = nn.ModuleList([
            nn.ModuleList([CausalResnetBlock1D(channels[-1], channels[-1], temb_dim), transformers(channels[-1])])
            for _ in range(cfg.num_mid_blocks)])
        up = channels[::-1] + (channels[0],)
        self.up_blocks = nn.ModuleList()
        for i in range(len(up) - 1):
            last = i == len(up) - 2
            self.up_blocks.append(nn.ModuleList([
                CausalResnetBlock1D(up[i] * 2, up[i + 1], temb_dim), transformers(up[i + 1]),
                CausalConv1d(up[i + 1], up[i + 1], 3) if last else Upsample1D(up[i + 1])]))
        self.final_block = CausalBlock1D(up[-1], up[-1])
        self.final_proj = nn.Conv1d(up[-1], cfg.out_channels, 1)

    @staticmethod
    def _attend(blocks: nn.ModuleList, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x.transpose(1, 2).contiguous()
        for block in blocks:
            x = block(x, bias)
        return x.transpose(1, 2).contiguous()

    def forward(self, x: torch.Tensor, mask: torch.Tensor, mu: torch.Tensor, t: torch.Tensor, spks: torch.Tensor,
                cond: torch.Tensor, chunk_frames: torch.Tensor | int = 0) -> torch.Tensor:
        chunk = torch.as_tensor(chunk_frames, device=x.device, dtype=torch.int64).reshape(-1)[:1]
        # t may come in float32 while the module runs in a lower dtype (models/flow.py FlowSolver)
        temb = self.time_mlp(sinusoidal_embedding(t.float(), self.cfg.in_channels).to(self.time_mlp.linear_1.weight.dtype))
        h = torch.cat([x, mu, spks.unsqueeze(-1).expand(-1, -1, x.shape[-1]), cond], dim=1)

        hiddens, masks = [], [mask]
        for i, (resnet, blocks, down) in enumerate(self.down_blocks):
            m = masks[-1]
            h = resnet(h, m, temb)
            h = self._attend(blocks, h, _attention_bias(m, chunk, h.dtype))
            hiddens.append(h)
            h = down(h * m)
            if i < len(self.down_blocks) - 1:  # upstream also builds the last level's mask, then drops it
                masks.append(m[:, :, ::2])
        m = masks[-1]
        if len(self.mid_blocks):
            bias = _attention_bias(m, chunk, h.dtype)
            for resnet, blocks in self.mid_blocks:
                h = resnet(h, m, temb)
                h = self._attend(blocks, h, bias)
        for resnet, blocks, upsample in self.up_blocks:
            m = masks.pop()
            skip = hiddens.pop()
            h = torch.cat([h[:, :, : skip.shape[-1]], skip], dim=1)
            h = resnet(h, m, temb)
            h = self._attend(blocks, h, _attention_bias(m, chunk, h.dtype))
            h = upsample(h * m)
        h = self.final_block(h, m)
        return self.final_proj(h * m) * mask


__all__ = ["UNetConfig", "CausalConditionalDecoder", "sinusoidal_embedding"]
