"""STFT / inverse STFT as fixed convolutions, for graphs that must export.

`torch.stft` / `torch.istft` lower to complex FFT ops that ONNX and TensorRT do not take in a usable
form, so both transforms are written here as a strided `conv1d` (analysis) and a strided
`conv_transpose1d` (overlap-add synthesis) over a real DFT basis that already includes the window.
The results equal `torch.stft(..., center=True, pad_mode="reflect", onesided=True)` and
`torch.istft(..., center=True)` with a periodic Hann window up to float32 rounding (~1e-7 relative).

The bases are non-persistent buffers: they never appear in a state_dict, so modules that hold an
STFT keep upstream's checkpoint keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def hann_periodic(n_fft: int) -> torch.Tensor:
    """Periodic Hann window in float64 (scipy `get_window("hann", n, fftbins=True)`)."""
    n = torch.arange(n_fft, dtype=torch.float64)
    return 0.5 - 0.5 * torch.cos(2.0 * math.pi * n / n_fft)


def _angles(n_fft: int) -> torch.Tensor:
    """2*pi*k*n/N as a float64 [N/2+1, N] table, with k*n reduced mod N first so large products
    keep full precision."""
    k = torch.arange(n_fft // 2 + 1, dtype=torch.int64)
    n = torch.arange(n_fft, dtype=torch.int64)
    kn = (k[:, None] * n[None, :]) % n_fft
    return 2.0 * math.pi * kn.to(torch.float64) / n_fft


def _as(buf: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    # cast a float32 basis only when the signal has another dtype (keeps exported graphs cast-free)
    return buf if buf.dtype == like.dtype else buf.to(like.dtype)


class STFT(nn.Module):
    """Onesided STFT with a periodic Hann window of length n_fft, centred with reflect padding.

    forward(x [B, L]) -> (real, imag), each [B, n_fft//2+1, L//hop + 1], as upstream HiFT `_stft`.
    `stacked(x)` returns the two halves already concatenated on the channel axis ([B, 2F, frames]),
    which is the layout HiFT feeds to its source convolutions."""

    def __init__(self, n_fft: int, hop: int):
        super().__init__()
        if n_fft % 2:
            raise ValueError("n_fft must be even")
        self.n_fft = n_fft
        self.hop = hop
        self.bins = n_fft // 2 + 1
        window = hann_periodic(n_fft)
        ang = _angles(n_fft)
        cos_rows = torch.cos(ang) * window
        sin_rows = -torch.sin(ang) * window
        # exact zeros where sin(k*pi*n) vanishes analytically (DC and Nyquist rows)
        sin_rows[0] = 0.0
        sin_rows[-1] = 0.0
        basis = torch.cat([cos_rows, sin_rows], dim=0).unsqueeze(1)  # [2F, 1, N]
        self.register_buffer("basis", basis.to(torch.float32), persistent=False)

    def _reflect_pad(self, x: torch.Tensor) -> torch.Tensor:
        # reflect padding by n_fft/2 on both sides, written as slices + flips (ONNX Slice/Concat)
        p = self.n_fft // 2
        left = x[:, 1 : p + 1].flip(-1)
        right = x[:, -(p + 1) : -1].flip(-1)
        return torch.cat([left, x, right], dim=-1)

    def stacked(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, L] -> [B, 2*(n_fft//2+1), L//hop + 1]: real parts, then imaginary parts."""
        xp = self._reflect_pad(x).unsqueeze(1)
        return F.conv1d(xp, _as(self.basis, x), stride=self.hop)

    def forward(self, x: torch.Tensor, stacked: bool = False):
        """(real, imag), or with `stacked` the [B, 2F, frames] layout of `stacked`. Call the module,
        not the method, where it must show in an exported graph: only a module call gives its nodes
        the name scope that fp32 islands are found by (export.precision.fp32_nodes)."""
        spec = self.stacked(x)
        return spec if stacked else (spec[:, : self.bins], spec[:, self.bins :])


class ISTFT(nn.Module):
    """Inverse of `STFT`, equal to `torch.istft(center=True, window=periodic hann, onesided)`.

    forward(real, imag) with both [B, n_fft//2+1, frames] -> [B, hop*(frames-1)]. The imaginary
    parts of the DC and Nyquist bins are ignored (as irfft does). The window-envelope
    normalisation is computed with a transposed convolution of ones, so the output length stays a
    function of the input length only (dynamic in exported graphs)."""

    def __init__(self, n_fft: int, hop: int):
        super().__init__()
        if n_fft % 2:
            raise ValueError("n_fft must be even")
        self.n_fft = n_fft
        self.hop = hop
        self.bins = n_fft // 2 + 1
        window = hann_periodic(n_fft)
        ang = _angles(n_fft)
        # Hermitian weights of the onesided inverse DFT: 1 for DC and Nyquist, 2 for the rest
        weight = torch.full((self.bins, 1), 2.0, dtype=torch.float64)
        weight[0] = 1.0
        weight[-1] = 1.0
        cos_rows = weight * torch.cos(ang) / n_fft * window
        sin_rows = -weight * torch.sin(ang) / n_fft * window
        sin_rows[0] = 0.0
        sin_rows[-1] = 0.0
        basis = torch.cat([cos_rows, sin_rows], dim=0).unsqueeze(1)  # [2F, 1, N]
        self.register_buffer("basis", basis.to(torch.float32), persistent=False)
        self.register_buffer("window_sq", (window * window).to(torch.float32).view(1, 1, n_fft), persistent=False)

    def forward(self, real: torch.Tensor, imag: torch.Tensor) -> torch.Tensor:
        spec = torch.cat([real, imag], dim=1)  # [B, 2F, frames]
        frames = F.conv_transpose1d(spec, _as(self.basis, spec), stride=self.hop)  # [B, 1, hop*(n-1)+N]
        ones = torch.ones_like(real[:1, :1, :])
        envelope = F.conv_transpose1d(ones, _as(self.window_sq, spec), stride=self.hop)
        half = self.n_fft // 2
        length = frames.shape[-1] - 2 * half  # = hop * (frames - 1)
        y = frames[:, 0, half : half + length]
        env = envelope[:, 0, half : half + length]
        return y / env
