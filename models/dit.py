"""CosyVoice3's flow-matching estimator: the DiT (diffusion transformer) of upstream
`cosyvoice/flow/DiT/dit.py` + `modules.py`, rewritten as one export-friendly graph.

The module tree mirrors upstream so that `state_dict()` keys equal upstream's
`flow.decoder.estimator.*` keys (with that prefix removed), including the persistent
`rotary_embed.inv_freq` buffer upstream files carry:

    time_embed.time_mlp.{0,2}                  sinusoidal(256, scale 1000) -> Linear -> SiLU -> Linear
    input_embed.proj                           Linear(cat[x, cond, mu, spks] -> dim)
    input_embed.conv_pos_embed.conv{1,2}.0     causal grouped Conv1d(k=31, groups=16) + Mish, residual
    rotary_embed.inv_freq                      x-transformers RotaryEmbedding(dim_head) buffer
    transformer_blocks.N.attn_norm.linear      AdaLayerNormZero (6 modulation vectors from t)
    transformer_blocks.N.attn.to_{q,k,v}, to_out.0
    transformer_blocks.N.ff.ff.0.0, ff.ff.2    FeedForward, GELU(tanh)
    norm_out.linear                            AdaLayerNormZero_Final (scale, shift)
    proj_out                                   Linear(dim -> mel_dim)

Numerics follow upstream op for op (same op order, same SDPA call with a boolean [B,1,T,T] mask),
so outputs agree with upstream to float32 rounding. Two upstream quirks are kept on purpose:

* Rotary embedding (x-transformers, interleaved pairs, freqs of width dim_head) is applied to the
  full-width q/k BEFORE the head split, so only the first dim_head channels (head 0) rotate.
* Each attention output is zeroed where the LAST ROW of the attention mask is False
  (`x.masked_fill(~mask[:, 0, -1, :, None], 0)`), i.e. at invalid frames.

Graph rules: no host syncs, no branches on tensor values, no random ops (dropout is replaced by
identities; it only exists in training). Streaming vs offline is an input, `chunk_frames` (int64 [1]):
0 = full attention over valid frames (upstream streaming=False), >0 = static-chunk attention with
that chunk size in frames (upstream streaming=True uses static_chunk_size = 50).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from models.errors import UserError
from models.layers import InverseFrequencies, chunk_attention_mask


@dataclass(frozen=True)
class DiTConfig:
    dim: int
    depth: int
    heads: int
    dim_head: int
    ff_mult: int = 2
    mel_dim: int = 80
    mu_dim: int = 80
    spk_dim: int = 80
    out_channels: int = 80
    static_chunk_size: int = 50
    num_decoding_left_chunks: int = -1

    @classmethod
    def from_upstream(cls, kwargs: dict) -> "DiTConfig":
        """Build from upstream `DiT(**kwargs)` constructor kwargs (config.json
        `flow.decoder.estimator.kwargs` or a `{"kwargs": ...}` entry). Training-only kwargs (dropout)
        are ignored; options this implementation does not provide raise UserError."""
        if "kwargs" in kwargs and isinstance(kwargs["kwargs"], dict):
            kwargs = kwargs["kwargs"]
        kw = dict(kwargs)
        if kw.pop("long_skip_connection", False):
            raise UserError("DiT config sets long_skip_connection=True, which CosyVoice3 does not use and this "
                            "implementation does not provide.", "use a CosyVoice3 flow config (long_skip_connection=false)")
        kw.pop("dropout", None)
        if "dim" not in kw:
            raise UserError("DiT config has no 'dim'.", "pass the flow.decoder.estimator kwargs of the model config")
        if kw.get("mu_dim") is None:
            kw["mu_dim"] = kw.get("mel_dim", cls.mel_dim)
        if kw.get("spk_dim") is None:
            # upstream treats spk_dim=None as 0 (no speaker input); CosyVoice3 always has one
            raise UserError("DiT config has spk_dim=None (no speaker input), which CosyVoice3 does not use.",
                            "use a CosyVoice3 flow config (spk_dim=80)")
        if kw.get("out_channels") is None:
            kw["out_channels"] = kw.get("mel_dim", cls.mel_dim)
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise UserError(f"DiT config has unknown keys {unknown}.", "pass upstream DiT constructor kwargs")
        cfg = cls(**{k: int(v) for k, v in kw.items()})
        if cfg.dim % 16:
            raise UserError(f"DiT dim {cfg.dim} is not divisible by 16 (the conv position embedding groups).",
                            "use the model's own config")
        return cfg


# ------------------------------------------------------------------------------------------------
# building blocks (names follow upstream so state_dict keys match)


class TimestepEmbedding(nn.Module):
    """Sinusoidal embedding of the flow time (scale 1000, `freq_embed_dim` wide) -> MLP."""

    def __init__(self, dim: int, freq_embed_dim: int = 256):
        super().__init__()
        self.freq_embed_dim = freq_embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(freq_embed_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # [B] -> [B, dim]
        half = self.freq_embed_dim // 2
        step = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=t.device).float() * -step)
        arg = 1000 * t.float().unsqueeze(1) * freqs.unsqueeze(0)  # float32 whatever t's dtype (see FlowSolver)
        hidden = torch.cat((arg.sin(), arg.cos()), dim=-1).to(self.time_mlp[0].weight.dtype)
        return self.time_mlp(hidden)


class CausalConvPositionEmbedding(nn.Module):
    def __init__(self, dim: int, kernel_size: int = 31, groups: int = 16):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv1 = nn.Sequential(nn.Conv1d(dim, dim, kernel_size, groups=groups), nn.Mish())
        self.conv2 = nn.Sequential(nn.Conv1d(dim, dim, kernel_size, groups=groups), nn.Mish())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        h = x.permute(0, 2, 1)
        h = self.conv1(F.pad(h, (self.kernel_size - 1, 0)))
        h = self.conv2(F.pad(h, (self.kernel_size - 1, 0)))
        return h.permute(0, 2, 1)


class InputEmbedding(nn.Module):
    def __init__(self, mel_dim: int, mu_dim: int, out_dim: int, spk_dim: int):
        super().__init__()
        self.proj = nn.Linear(mel_dim * 2 + mu_dim + spk_dim, out_dim)
        self.conv_pos_embed = CausalConvPositionEmbedding(out_dim)

    def forward(self, x, cond, mu, spks):  # [B,T,80] x3, [B,S] -> [B,T,D]
        spks = spks.unsqueeze(1).expand(-1, x.shape[1], -1)
        h = self.proj(torch.cat([x, cond, mu, spks], dim=-1))
        return self.conv_pos_embed(h) + h


class RotaryEmbedding(InverseFrequencies):
    """x-transformers RotaryEmbedding(dim) without xpos / interpolation: holds the persistent
    `inv_freq` buffer (float32 through any cast: `models.layers.InverseFrequencies`) and returns
    interleaved angles [1, T, dim]."""

    def forward(self, seq_len_like: torch.Tensor) -> torch.Tensor:
        """Float32 angles for positions 0..T-1, T = seq_len_like.shape[1]."""
        pos = torch.arange(seq_len_like.shape[1], device=self.inv_freq.device, dtype=torch.float32)
        return rotary_angles(pos[None], self.inv_freq)


def rotary_angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Interleaved angles [R, T, dim] of positions [R, T], in float32."""
    freqs = positions.float()[..., None] * inv_freq.float()  # [R, T, dim/2]
    return torch.stack((freqs, freqs), dim=-1).flatten(-2)  # pairs interleaved


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` channels of x [B, T, C] (interleaved pairs (x0, x1) ->
    (x0 cos - x1 sin, x1 cos + x0 sin)); the remaining channels pass through."""
    rot_dim = cos.shape[-1]
    xr, xp = x[..., :rot_dim], x[..., rot_dim:]
    pairs = xr.unflatten(-1, (rot_dim // 2, 2))
    x1, x2 = pairs.unbind(dim=-1)
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return torch.cat((xr * cos + rotated * sin, xp), dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads = heads
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Identity()])  # [1] was Dropout upstream

    def forward(self, x, attn_mask, cos, sin):
        """x [B,T,D]; attn_mask bool [B,1,T,T] (True = may attend); cos/sin [1,T,dim_head]."""
        B = x.shape[0]
        q = apply_rotary(self.to_q(x), cos, sin)
        k = apply_rotary(self.to_k(x), cos, sin)
        v = self.to_v(x)
        head_dim = k.shape[-1] // self.heads
        q = q.view(B, -1, self.heads, head_dim).transpose(1, 2)
        k = k.view(B, -1, self.heads, head_dim).transpose(1, 2)
        v = v.view(B, -1, self.heads, head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=0.0, is_causal=False)
        o = o.transpose(1, 2).reshape(B, -1, self.heads * head_dim).to(q.dtype)
        o = self.to_out[1](self.to_out[0](o))
        # upstream: zero the output where the last row of the attention mask is False
        return o.masked_fill(~attn_mask[:, 0, -1].unsqueeze(-1), 0.0)


class AdaLayerNormZero(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, dim * 6)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x, emb):
        emb = self.linear(self.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = torch.chunk(emb, 6, dim=1)
        x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormZeroFinal(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, dim * 2)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x, emb):
        emb = self.linear(self.silu(emb))
        scale, shift = torch.chunk(emb, 2, dim=1)
        return self.norm(x) * (1 + scale)[:, None, :] + shift[:, None, :]


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int):
        super().__init__()
        inner = int(dim * mult)
        # indices as upstream: ff.0 = (Linear, GELU), ff.1 = Dropout (identity here), ff.2 = Linear
        self.ff = nn.Sequential(nn.Sequential(nn.Linear(dim, inner), nn.GELU(approximate="tanh")),
                                nn.Identity(), nn.Linear(inner, dim))

    def forward(self, x):
        return self.ff(x)


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int):
        super().__init__()
        self.attn_norm = AdaLayerNormZero(dim)
        self.attn = Attention(dim, heads, dim_head)
        self.ff_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, ff_mult)

    def forward(self, x, t, attn_mask, cos, sin):
        norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.attn_norm(x, t)
        x = x + gate_msa.unsqueeze(1) * self.attn(norm, attn_mask, cos, sin)
        ff_in = self.ff_norm(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp.unsqueeze(1) * self.ff(ff_in)


# ------------------------------------------------------------------------------------------------


class DiT(nn.Module):
    """Velocity estimator of CosyVoice3's flow matching.

    forward(x [B,80,T], mask [B,1,T] float (1 = valid frame), mu [B,80,T], t [B], spks [B,80],
            cond [B,80,T], chunk_frames int64 [1]) -> velocity [B,80,T]
    """

    # numerically sensitive in fp16 (a rung of the fp16 precision ladder keeps them float32)
    SENSITIVE_PARTS = ("time_embed", "rotary_embed")

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.static_chunk_size = cfg.static_chunk_size
        self.time_embed = TimestepEmbedding(cfg.dim)
        self.input_embed = InputEmbedding(cfg.mel_dim, cfg.mu_dim, cfg.dim, cfg.spk_dim)
        self.rotary_embed = RotaryEmbedding(cfg.dim_head)
        self.transformer_blocks = nn.ModuleList(
            [DiTBlock(cfg.dim, cfg.heads, cfg.dim_head, cfg.ff_mult) for _ in range(cfg.depth)])
        self.norm_out = AdaLayerNormZeroFinal(cfg.dim)
        self.proj_out = nn.Linear(cfg.dim, cfg.mel_dim)

    def forward(self, x, mask, mu, t, spks, cond, chunk_frames):
        x = x.transpose(1, 2)
        mu = mu.transpose(1, 2)
        cond = cond.transpose(1, 2)
        temb = self.time_embed(t)
        h = self.input_embed(x, cond, mu, spks)

        angles = self.rotary_embed(h)  # float32; only cos / sin are rounded to the compute dtype
        cos, sin = angles.cos().to(h.dtype), angles.sin().to(h.dtype)
        attn_mask = chunk_attention_mask(mask[:, 0, :] != 0, chunk_frames).unsqueeze(1)  # [B,1,T,T]

        for block in self.transformer_blocks:
            h = block(h, temb, attn_mask, cos, sin)
        h = self.norm_out(h, temb)
        return self.proj_out(h).transpose(1, 2)


# ------------------------------------------------------------------------------------------------
# the repeated prefix of streaming: a chunk's frames computed against the kept keys / values of
# the frames before it


@dataclass
class DiTPrefix:
    """What the estimator needs to know of the frames before the new ones, for every row of its
    batch: per layer the keys (already rotated) and the values, `kv` [layers, 2, rows, frames,
    inner] (keys at [:, 0], values at [:, 1], one tensor so that many streams' prefixes are
    stacked into one batch and split back with one copy each), and the last kernel-1 frames at the
    inputs of the two causal position convolutions. Streaming with the static chunk mask, a frame in
    a completed chunk never sees a later frame (the attention is chunk-causal, the position
    convolutions causal), so these stay exact once their chunk is done. Cost: 2 x depth x inner
    values per frame (CosyVoice3 at bf16: 22 x 1024 x 2 x 2 bytes = 88 KiB per frame and per CFG
    row, per Euler step)."""

    kv: torch.Tensor  # [layers, 2, rows, frames, inner]
    conv_in: torch.Tensor  # [rows, kernel-1, dim] the first convolution's input history
    conv_mid: torch.Tensor  # [rows, kernel-1, dim] the second convolution's input history

    @property
    def frames(self) -> int:
        return self.kv.shape[3]

    @classmethod
    def empty(cls, dit: "DiT", batch: int, device, dtype) -> "DiTPrefix":
        inner = dit.cfg.heads * dit.cfg.dim_head
        hist = dit.input_embed.conv_pos_embed.kernel_size - 1
        return cls(torch.zeros(len(dit.transformer_blocks), 2, batch, 0, inner, device=device, dtype=dtype),
                   torch.zeros(batch, hist, dit.cfg.dim, device=device, dtype=dtype),
                   torch.zeros(batch, hist, dit.cfg.dim, device=device, dtype=dtype))

    @classmethod
    def stack_cfg(cls, prefixes: list["DiTPrefix"], frames: int | None = None) -> "DiTPrefix":
        """One prefix for the CFG batch of several streams: each of `prefixes` holds one stream's
        [conditional, unconditional] rows; the result holds [every stream's conditional row, then
        every unconditional row] (the order of `models.flow.solve_euler_cfg`), frames zero-padded
        at the end to `frames` (default the longest; the caller masks the padding)."""
        B = len(prefixes)
        first = prefixes[0]
        L, _, _, _, inner = first.kv.shape
        if any(p.kv.shape[2] != 2 for p in prefixes):
            raise ValueError("stack_cfg takes one stream's [conditional, unconditional] rows per prefix")
        frames = max(p.frames for p in prefixes) if frames is None else frames
        if B == 1 and frames == first.frames:  # already in that order and unpadded: no copy
            return first
        kv = first.kv.new_zeros(L, 2, 2 * B, frames, inner)
        conv_in = first.conv_in.new_empty(2 * B, *first.conv_in.shape[1:])
        conv_mid = first.conv_mid.new_empty(2 * B, *first.conv_mid.shape[1:])
        for b, p in enumerate(prefixes):  # rows b and B + b: this stream's conditional and unconditional row
            kv[:, :, b::B, : p.frames] = p.kv
            conv_in[b::B] = p.conv_in
            conv_mid[b::B] = p.conv_mid
        return cls(kv, conv_in, conv_mid)


def dit_forward_rows(dit: "DiT", x, mu, t, spks, cond, prefix: DiTPrefix, starts: torch.Tensor,
                     lengths: torch.Tensor, chunk_frames: int):
    """The velocity of the new frames of R rows that each follow their own earlier frames: row r
    has `starts[r]` earlier frames (the first ones of `prefix`, padded to `prefix.frames` past
    them) and `lengths[r]` new ones (the first of x's N, padded past them). x, mu, cond [R, 80, N],
    t [R], spks [R, 80], starts / lengths int64 [R]. Returns the velocity [R, 80, N] (valid for each
    row's new frames), the keys / values of prefix and new frames side by side, kv [layers, 2, R,
    prefix.frames + N, inner], and each row's convolution histories at the end of its new frames.
    (`dit_forward_rows_into` with a buffer made here.)"""
    L, _, R, P, inner = prefix.kv.shape
    kv = prefix.kv.new_empty(L, 2, R, P + x.shape[2], inner)
    kv[:, :, :, :P] = prefix.kv
    return dit_forward_rows_into(dit, x, mu, t, spks, cond, kv, prefix.conv_in, prefix.conv_mid, starts, lengths,
                                 chunk_frames)


def dit_forward_rows_into(dit: "DiT", x, mu, t, spks, cond, kv: torch.Tensor, conv_in: torch.Tensor,
                          conv_mid: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, chunk_frames: int):
    """`dit_forward_rows` with the keys / values in one buffer the caller made: kv [layers, 2, R,
    P + N, inner] holds the rows' kept frames in its first P = kv.shape[3] - N frames, and the new
    frames' keys / values are written into the rest (in place; kv is also returned). conv_in /
    conv_mid [R, kernel-1, dim]: the rows' convolution histories. Every tensor is an argument and
    every shape a function of the arguments' shapes, so a backend can replay it as one CUDA graph per
    shape key (the cudagraph backend's `compiled`).
    Padding changes nothing valid: a padded key is masked out of every valid query, a padded frame
    comes after every valid one in the causal convolutions, and a padded query (whose output is
    discarded) sees the valid frames only, so nothing is NaN (every row brings at least one new
    frame; a row with neither kept nor new frames would see no key). Every start must be whole chunks
    (see `dit_forward_after_prefix`)."""
    R, _, N = x.shape
    P = kv.shape[3] - N
    device = x.device
    emb = dit.input_embed
    temb = dit.time_embed(t)
    spk = spks.unsqueeze(1).expand(-1, N, -1)
    h = emb.proj(torch.cat([x.transpose(1, 2), cond.transpose(1, 2), mu.transpose(1, 2), spk], dim=-1))
    pos = emb.conv_pos_embed
    hist = pos.kernel_size - 1
    conv_in = torch.cat([conv_in, h], dim=1)  # the left zero padding, or the frames before
    mid = pos.conv1(conv_in.transpose(1, 2)).transpose(1, 2)  # [R, N, D]
    conv_mid = torch.cat([conv_mid, mid], dim=1)
    h = pos.conv2(conv_mid.transpose(1, 2)).transpose(1, 2) + h
    # each row's histories end at its last new frame: positions lengths[r] .. lengths[r] + hist - 1
    at_end = (lengths.to(device)[:, None] + torch.arange(hist, device=device)[None, :])[:, :, None].expand(-1, -1, h.shape[2])
    conv_in_end, conv_mid_end = conv_in.gather(1, at_end), conv_mid.gather(1, at_end)
    rel = torch.arange(N, device=device)
    angles = rotary_angles(starts.to(device)[:, None] + rel[None, :], dit.rotary_embed.inv_freq)  # [R, N, dim_head]
    cos, sin = angles.cos().to(h.dtype), angles.sin().to(h.dtype)
    # new frame i sees its row's earlier frames and its row's new frames up to the end of its chunk
    chunk = chunk_frames if chunk_frames > 0 else N
    chunk_end = (rel // chunk + 1) * chunk  # [N]
    sees_prefix = torch.arange(P, device=device)[None, :] < starts.to(device)[:, None]  # [R, P]
    sees_new = rel[None, None, :] < torch.minimum(chunk_end[None, :, None], lengths.to(device)[:, None, None])
    mask = torch.cat([sees_prefix[:, None, :].expand(R, N, P), sees_new], dim=2)[:, None]  # [R, 1, N, P + N]
    # as an additive bias in the compute dtype, made once for every layer (a bool mask is converted in
    # each attention call), its rows 16-aligned: CUDA's memory-efficient kernel wants an aligned bias
    # (eager pads a copy per call; a compiled graph may refuse it), so P + N arbitrary costs nothing.
    # Always some padding (1-16 columns): whether there is any would be one more compiled variant
    keys = P + N
    bias = torch.full((R, 1, N, (keys // 16 + 1) * 16), float("-inf"), dtype=h.dtype, device=device)[..., :keys]
    bias.masked_fill_(mask, 0.0)  # in place: the view keeps the aligned row stride
    for layer, block in enumerate(dit.transformer_blocks):
        norm, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.attn_norm(h, temb)
        attn = block.attn
        q = apply_rotary(attn.to_q(norm), cos, sin)
        kv[layer, 0, :, P:] = apply_rotary(attn.to_k(norm), cos, sin)
        kv[layer, 1, :, P:] = attn.to_v(norm)
        heads = attn.heads
        split = lambda a: a.reshape(R, a.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        o = F.scaled_dot_product_attention(split(q), split(kv[layer, 0]), split(kv[layer, 1]), attn_mask=bias,
                                           dropout_p=0.0)
        o = o.transpose(1, 2).reshape(R, N, -1).to(q.dtype)
        h = h + gate_msa.unsqueeze(1) * attn.to_out[1](attn.to_out[0](o))
        ff_in = block.ff_norm(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        h = h + gate_mlp.unsqueeze(1) * block.ff(ff_in)
    h = dit.norm_out(h, temb)
    return dit.proj_out(h).transpose(1, 2), kv, conv_in_end, conv_mid_end


def _check_whole_chunks(start: int, chunk_frames: int) -> None:
    if (chunk_frames > 0 and start % chunk_frames) or (chunk_frames <= 0 and start):
        raise ValueError(f"a prefix of {start} frames is not whole chunks of {chunk_frames}: later frames "
                         "would change what it saw")


def dit_forward_after_prefix(dit: "DiT", x, mu, t, spks, cond, prefix: DiTPrefix,
                             chunk_frames: int) -> tuple[torch.Tensor, DiTPrefix]:
    """The velocity of `n` new frames that follow `prefix.frames` earlier ones, and the prefix
    extended by them: equal (to float rounding) to the last `n` frames of `dit.forward` on all
    `prefix.frames + n` frames with every frame valid. x, mu, cond [B, 80, n], t [B], spks [B, 80].
    The earlier frames must be whole chunks (`prefix.frames` a multiple of `chunk_frames`; 0 means
    full attention, where only an empty prefix is exact)."""
    start = prefix.frames
    _check_whole_chunks(start, chunk_frames)
    B, _, n = x.shape
    every = lambda v: torch.full((B,), v, dtype=torch.int64, device=x.device)  # noqa: E731
    velocity, kv, conv_in, conv_mid = dit_forward_rows(dit, x, mu, t, spks, cond, prefix, every(start), every(n),
                                                       chunk_frames)
    return velocity, DiTPrefix(kv, conv_in, conv_mid)
