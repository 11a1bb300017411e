"""Small layers shared by several model families."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def chunk_attention_mask(valid: torch.Tensor, chunk_frames: torch.Tensor | int) -> torch.Tensor:
    """Attention mask [B, T, T] (True = may attend) for upstream's static-chunk streaming.

    Query i sees key j iff j is valid and j < (i // chunk + 1) * chunk; `chunk_frames` <= 0 means
    full context. Rows that would see nothing are opened fully, as upstream's
    `add_optional_chunk_mask` does, so softmax never meets an all-masked row. `chunk_frames` may be a
    tensor so one exported graph serves both streaming and offline calls.
    """
    B, T = valid.shape
    pos = torch.arange(T, device=valid.device)
    chunk = torch.as_tensor(chunk_frames, device=valid.device, dtype=torch.int64).reshape(-1)[:1]
    chunk = torch.where(chunk > 0, chunk, torch.full_like(chunk, T))
    limit = (torch.div(pos, chunk, rounding_mode="floor") + 1) * chunk  # [T]
    causal = pos.unsqueeze(0) < limit.unsqueeze(1)  # [T, T]
    mask = valid.unsqueeze(1) & causal.unsqueeze(0)  # [B, T, T]
    empty = ~mask.any(dim=-1, keepdim=True)
    return mask | empty


class InverseFrequencies(nn.Module):
    """Holds a rotary embedding's persistent `inv_freq` buffer ([dim/2], 1/base^(2i/dim)) in float32
    whatever the module is cast to (as HF computes RoPE): in bf16 the positions past 256 and every
    angle past a few radians lose the bits that make them a rotation (position 257 reads as 256; an
    angle of ~300 rad is off by a radian), so a cast keeps `inv_freq` float32 and the callers round
    only cos / sin to the compute dtype."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim, self.base = dim, base
        self.register_buffer("inv_freq", self._inverse_frequencies())

    def _inverse_frequencies(self, device=None) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=device).float() / self.dim))

    def _apply(self, fn, recurse=True):
        kept = self.inv_freq
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32 and self.inv_freq.device.type != "meta":
            # a dtype cast: the float32 values (the checkpoint's) survive it, on the new device
            self.inv_freq = kept.to(device=self.inv_freq.device, dtype=torch.float32) \
                if kept.dtype == torch.float32 else self._inverse_frequencies(self.inv_freq.device)
        return self


class PreLookaheadLayer(nn.Module):
    """Upstream PreLookaheadLayer: conv over the current and `pre_lookahead_len` future tokens, then a
    causal conv, with a residual. Input and output are [B, N, C].

    Upstream's streaming call passes the last `pre_lookahead_len` tokens as `context`; that equals
    running on all tokens and dropping the last `pre_lookahead_len` outputs, which is what callers do,
    so the forward has one code path."""

    def __init__(self, in_channels: int, channels: int, pre_lookahead_len: int = 3):
        super().__init__()
        self.pre_lookahead_len = pre_lookahead_len
        self.conv1 = nn.Conv1d(in_channels, channels, kernel_size=pre_lookahead_len + 1)
        self.conv2 = nn.Conv1d(channels, in_channels, kernel_size=3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs.transpose(1, 2)
        x = F.leaky_relu(self.conv1(F.pad(x, (0, self.pre_lookahead_len))))
        x = self.conv2(F.pad(x, (self.conv2.kernel_size[0] - 1, 0)))
        return x.transpose(1, 2) + inputs
