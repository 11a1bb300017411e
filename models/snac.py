"""SNAC decoder (codes -> audio) for Orpheus, state-dict compatible with the `snac` package.

Our `SNACDecoder` holds the package's `quantizer.*` and `decoder.*` weights under the package's key
names, with weight norm folded (`models.checkpoint.fold_weight_norm`; `snac` 1.2.1 wraps its convs in
`torch.nn.utils.parametrizations.weight_norm`, so its files carry
`X.parametrizations.weight.original0/1`; the old `weight_g/weight_v` style folds the same way). The
encoder and the quantizers' `in_proj` convs are only used for encoding and are not held.

The graph (one pure function, exportable with a dynamic frame count F):

    forward(codes_0 [B,F], codes_1 [B,F*s0/s1], ..., noise_0 [B,1,N_0], noise_1, ...) -> audio [B, F*H]

with `s_i = vq_strides[i]`, `H = hop_length * s0` audio samples per frame (2048 for the 24 kHz model)
and one noise tensor per `NoiseBlock` (one per decoder block when `noise=True`, none otherwise):
`N_i = F * s0 * prod(decoder_rates[:i+1])`. For the 24 kHz model used by Orpheus (vq_strides [4,2,1],
decoder rates [8,8,4,2]):

    codes_0 [B,F]   codes_1 [B,2F]   codes_2 [B,4F]          (int64, values in [0, 4096))
    noise_0 [B,1,32F]  noise_1 [B,1,256F]  noise_2 [B,1,1024F]  noise_3 [B,1,2048F]   (float)
    audio   [B,2048F]

The package draws each NoiseBlock's noise with `torch.randn` inside the forward; TensorRT ignores
RandomNormal seeds, so here the noise is an input. Passing standard-normal noise reproduces the
package's sampling; passing zeros disables the noise (bit-for-bit the same as a model built with
`noise=False` carrying the same other weights). `make_noise` builds either.

Codes are gathered from the codebooks inside the graph; they are clamped to the codebook range there
only so that a GPU backend can never read out of bounds. Range checking is the host's job:
`check_codes` (called by both decode helpers) and `tokens_to_codes` refuse or report bad codes, so a
clamped value is never decoded silently through these helpers.

Orpheus helpers (host side, not part of the graph):

- `tokens_to_codes` maps LLM token ids to the three code streams and reports every token it could not
  use; `codes_to_tokens` is its inverse.
- `decode_whole` decodes an utterance in one call; `decode_streaming_windows` reproduces Orpheus'
  streaming decoder (4-frame windows, samples 2048:4096 of each). See `decode_streaming_windows` for
  how the two differ.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoint import fold_weight_norm, load_strict, read_state_dict
from models.errors import UserError
from models.layers import InverseFrequencies

# -- config -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SNACConfig:
    """The `snac.SNAC(...)` constructor arguments (a SNAC folder's config.json); defaults are the
    package's defaults (the 44.1 kHz model), as `SNAC.from_config` would fill them."""

    sampling_rate: int = 44100
    encoder_dim: int = 64
    encoder_rates: tuple = (3, 3, 7, 7)
    decoder_dim: int = 1536
    decoder_rates: tuple = (7, 7, 3, 3)
    attn_window_size: int | None = 32
    codebook_size: int = 4096
    codebook_dim: int = 8
    vq_strides: tuple = (8, 4, 2, 1)
    noise: bool = True
    depthwise: bool = True
    latent_dim: int | None = None

    def __post_init__(self):
        for name in ("encoder_rates", "decoder_rates", "vq_strides"):
            object.__setattr__(self, name, tuple(int(x) for x in getattr(self, name)))
        if self.latent_dim is None:
            object.__setattr__(self, "latent_dim", self.encoder_dim * 2 ** len(self.encoder_rates))
        s0 = self.vq_strides[0] if self.vq_strides else 0
        if s0 <= 0 or any(s <= 0 or s0 % s for s in self.vq_strides):
            raise UserError(f"SNAC config: vq_strides {list(self.vq_strides)} must be positive divisors of the first.",
                            "use the config.json that came with the checkpoint")
        if self.decoder_dim % 2 ** len(self.decoder_rates):
            raise UserError(f"SNAC config: decoder_dim {self.decoder_dim} is not divisible by 2**{len(self.decoder_rates)}.",
                            "use the config.json that came with the checkpoint")
        if self.attn_window_size is not None and self.decoder_dim % 64:
            raise UserError(f"SNAC config: decoder_dim {self.decoder_dim} is not a multiple of the 64-wide attention heads.",
                            "use the config.json that came with the checkpoint")

    # derived sizes
    @property
    def hop_length(self) -> int:
        """Audio samples per latent step (= prod(encoder_rates) = prod(decoder_rates))."""
        return math.prod(self.encoder_rates)

    @property
    def n_codebooks(self) -> int:
        return len(self.vq_strides)

    @property
    def samples_per_frame(self) -> int:
        """Audio samples per frame, a frame being one step of the coarsest codebook (codes_0)."""
        return self.hop_length * self.vq_strides[0]

    def code_lengths(self, frames) -> list:
        """Lengths of codes_0.. for `frames` frames (works for ints and symbolic sizes)."""
        return [frames * (self.vq_strides[0] // s) for s in self.vq_strides]

    def code_factors(self) -> list[int]:
        return [self.vq_strides[0] // s for s in self.vq_strides]

    def noise_factors(self) -> list[int]:
        """Noise length per frame for each NoiseBlock: noise_i is [B, 1, F * noise_factors()[i]]."""
        if not self.noise:
            return []
        out, t = [], self.vq_strides[0]
        for r in self.decoder_rates:
            t *= r
            out.append(t)
        return out

    def input_names(self) -> list[str]:
        return [f"codes_{i}" for i in range(self.n_codebooks)] + [f"noise_{i}" for i in range(len(self.noise_factors()))]

    @classmethod
    def from_json(cls, d: dict) -> "SNACConfig":
        """Read a SNAC folder's config.json (already parsed); unknown keys are refused."""
        if not isinstance(d, dict):
            raise UserError("SNAC config.json is not a JSON object.", "use the config.json from the SNAC model folder")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"SNAC config.json has unknown keys {unknown}.",
                            "use the config.json from a hubertsiuzdak/snac_* folder (snac 1.2 format)")
        try:
            return cls(**d)
        except (TypeError, ValueError) as e:
            raise UserError(f"SNAC config.json cannot be read ({e}).", "use the config.json from the SNAC model folder") from None

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


# hubertsiuzdak/snac_24khz, the codec Orpheus uses
SNAC_24KHZ = SNACConfig(
    sampling_rate=24000, encoder_dim=48, encoder_rates=(2, 4, 8, 8), decoder_dim=1024,
    decoder_rates=(8, 8, 4, 2), attn_window_size=None, codebook_size=4096, codebook_dim=8,
    vq_strides=(4, 2, 1), noise=True, depthwise=True)


# -- layers (package key names, plain weights) ----------------------------------------------------


def snake(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x + sin(alpha x)^2 / alpha, the package's formula and op order. A plain function: the package's
    @torch.jit.script version makes the TorchScript ONNX exporter emit a wrong Reshape."""
    return x + (alpha + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)


class Snake1d(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x):
        return snake(x, self.alpha)


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int = 1, kernel: int = 7, groups: int = 1):
        super().__init__()
        pad = ((kernel - 1) * dilation) // 2
        self.block = nn.Sequential(
            Snake1d(dim),
            nn.Conv1d(dim, dim, kernel_size=kernel, dilation=dilation, padding=pad, groups=groups),
            Snake1d(dim),
            nn.Conv1d(dim, dim, kernel_size=1),
        )

    def forward(self, x):
        # odd kernel, "same" padding: the package's centre crop of x is always empty
        return x + self.block(x)


class NoiseBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Conv1d(dim, dim, kernel_size=1, bias=False)

    def forward(self, x, noise):
        """noise [B, 1, T]: the package's `torch.randn((B, 1, T))`, here an input."""
        return x + noise * self.linear(x)


class DecoderBlock(nn.Module):
    def __init__(self, input_dim: int, output_dim: int, stride: int, noise: bool, groups: int = 1):
        super().__init__()
        layers = [
            Snake1d(input_dim),
            nn.ConvTranspose1d(input_dim, output_dim, kernel_size=2 * stride, stride=stride,
                               padding=math.ceil(stride / 2), output_padding=stride % 2),
        ]
        if noise:
            layers.append(NoiseBlock(output_dim))
        layers += [ResidualUnit(output_dim, dilation=d, groups=groups) for d in (1, 3, 9)]
        self.block = nn.ModuleList(layers)  # same keys as the package's nn.Sequential

    def forward(self, x, noise: torch.Tensor | None = None):
        for layer in self.block:
            x = layer(x, noise) if isinstance(layer, NoiseBlock) else layer(x)
        return x


class SinusoidalEmbeddings(InverseFrequencies):
    """Only the persistent `inv_freq` buffer (a state-dict key upstream; float32 through any cast);
    xpos is off upstream."""


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class LocalMHA(nn.Module):
    """The package's windowed self-attention (32/44 kHz models; the 24 kHz model has none).
    Needs T % window_size == 0, which `check_codes` enforces."""

    def __init__(self, dim: int, window_size: int, dim_head: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.heads = dim // dim_head
        self.dim_head = dim_head
        self.window_size = window_size
        self.to_qkv = nn.Linear(dim, dim * 3, bias=False)
        self.rel_pos = SinusoidalEmbeddings(dim_head)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        B, C, T = x.shape
        residual = x
        x = self.norm(x.transpose(1, 2))
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)

        def split(t):  # b (w n) (h d) -> b h w n d
            return t.reshape(B, -1, self.window_size, self.heads, self.dim_head).permute(0, 3, 1, 2, 4)

        q, k, v = split(q), split(k), split(v)
        pos = torch.arange(self.window_size, device=x.device, dtype=torch.float32)
        freqs = pos[:, None] * self.rel_pos.inv_freq.float()[None, :]
        freqs = torch.cat((freqs, freqs), dim=-1)  # [n, d]
        cos, sin = freqs.cos().to(q.dtype), freqs.sin().to(q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.permute(0, 2, 3, 1, 4).reshape(B, T, C)  # b h w n d -> b (w n) (h d)
        return self.to_out(out).transpose(1, 2) + residual


class Decoder(nn.Module):
    def __init__(self, cfg: SNACConfig, d_out: int = 1):
        super().__init__()
        cin, ch = cfg.latent_dim, cfg.decoder_dim
        if cfg.depthwise:
            layers = [nn.Conv1d(cin, cin, kernel_size=7, padding=3, groups=cin), nn.Conv1d(cin, ch, kernel_size=1)]
        else:
            layers = [nn.Conv1d(cin, ch, kernel_size=7, padding=3)]
        if cfg.attn_window_size is not None:
            layers.append(LocalMHA(ch, cfg.attn_window_size))
        for i, stride in enumerate(cfg.decoder_rates):
            din, dout = ch // 2 ** i, ch // 2 ** (i + 1)
            layers.append(DecoderBlock(din, dout, stride, cfg.noise, groups=dout if cfg.depthwise else 1))
        layers += [Snake1d(dout), nn.Conv1d(dout, d_out, kernel_size=7, padding=3), nn.Tanh()]
        self.model = nn.ModuleList(layers)  # same keys as the package's nn.Sequential

    def forward(self, x, noise: list):
        i = 0
        for layer in self.model:
            if isinstance(layer, DecoderBlock):
                x = layer(x, noise[i] if noise else None)
                i += 1
            else:
                x = layer(x)
        return x


class VectorQuantize(nn.Module):
    """Decode side only: codebook lookup and out_proj (the encoder-only in_proj is not held)."""

    def __init__(self, input_dim: int, codebook_size: int, codebook_dim: int, stride: int):
        super().__init__()
        self.stride = stride
        self.out_proj = nn.Conv1d(codebook_dim, input_dim, kernel_size=1)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def forward(self, codes):
        codes = codes.clamp(0, self.codebook.num_embeddings - 1)  # OOB guard only; hosts validate
        z = self.out_proj(F.embedding(codes, self.codebook.weight).transpose(1, 2))
        if self.stride > 1:  # repeat_interleave as expand + flatten
            z = z.unsqueeze(-1).expand(-1, -1, -1, self.stride).flatten(2)
        return z


class ResidualVectorQuantize(nn.Module):
    def __init__(self, cfg: SNACConfig):
        super().__init__()
        self.quantizers = nn.ModuleList(
            [VectorQuantize(cfg.latent_dim, cfg.codebook_size, cfg.codebook_dim, s) for s in cfg.vq_strides])

    def forward(self, codes: list):
        z = self.quantizers[0](codes[0])
        for q, c in zip(self.quantizers[1:], codes[1:]):
            z = z + q(c)
        return z


class SNACDecoder(nn.Module):
    """codes + explicit noise -> audio; see the module docstring for shapes.

    `forward(codes_0, ..., codes_{n-1}, noise_0, ..., noise_{m-1})` with n = len(vq_strides) and m =
    len(decoder_rates) if `noise` else 0; returns audio [B, F * samples_per_frame] (the package's
    decode() returns the same samples as [B, 1, T])."""

    def __init__(self, cfg: SNACConfig):
        super().__init__()
        self.config = cfg
        self.quantizer = ResidualVectorQuantize(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        n, m = self.config.n_codebooks, len(self.config.noise_factors())
        assert len(inputs) == n + m, f"expected {n} code and {m} noise tensors, got {len(inputs)} inputs"
        codes, noise = list(inputs[:n]), list(inputs[n:])
        z = self.quantizer(codes)
        return self.decoder(z, noise).squeeze(1)

    @staticmethod
    def ignored_prefixes(cfg: SNACConfig) -> tuple[str, ...]:
        """Upstream keys we deliberately do not hold: the encoder and the quantizers' in_proj."""
        return ("encoder.",) + tuple(f"quantizer.quantizers.{i}.in_proj." for i in range(cfg.n_codebooks))

    def load_upstream(self, sd: dict, source: str = "state_dict") -> "SNACDecoder":
        """Load a `snac.SNAC` state_dict (either weight-norm style); strict on every decoder key."""
        load_strict(self, fold_weight_norm(sd), source, ignore=self.ignored_prefixes(self.config))
        return self


def load_snac(folder: str) -> SNACDecoder:
    """Read a SNAC folder (config.json + pytorch_model.bin, or model.safetensors) into an eval
    SNACDecoder. The file is read with weights_only; keys must fit exactly (encoder keys ignored)."""
    if not os.path.isdir(folder):
        raise UserError(f"SNAC folder {folder} does not exist.",
                        "download hubertsiuzdak/snac_24khz (config.json and pytorch_model.bin) into it")
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise UserError(f"SNAC folder {folder} has no config.json.", "copy config.json from the SNAC model repository")
    try:
        with open(cfg_path) as f:
            cfg = SNACConfig.from_json(json.load(f))
    except json.JSONDecodeError as e:
        raise UserError(f"SNAC config {cfg_path} is not valid JSON ({e.msg}, line {e.lineno}).",
                        "re-download config.json") from None
    weights = next((os.path.join(folder, n) for n in ("pytorch_model.bin", "model.safetensors")
                    if os.path.isfile(os.path.join(folder, n))), None)
    if weights is None:
        raise UserError(f"SNAC folder {folder} has no pytorch_model.bin or model.safetensors.",
                        "download the weights file next to config.json")
    model = SNACDecoder(cfg)
    model.load_upstream(read_state_dict(weights), weights)
    return model.eval()


# -- noise ------------------------------------------------------------------------------------------


def noise_shapes(cfg: SNACConfig, batch: int, frames: int) -> list[tuple[int, int, int]]:
    return [(batch, 1, frames * k) for k in cfg.noise_factors()]


def make_noise(cfg: SNACConfig, batch: int, frames: int, generator: torch.Generator | None = None,
               dtype=torch.float32, device="cpu") -> list[torch.Tensor]:
    """The NoiseBlock inputs for `batch` x `frames`: standard normal drawn from `generator` (on CPU, in
    order noise_0, noise_1, ...), or zeros (noise disabled) when `generator` is None."""
    shapes = noise_shapes(cfg, batch, frames)
    if generator is None:
        return [torch.zeros(s, dtype=dtype, device=device) for s in shapes]
    if generator.device.type != "cpu":
        return [torch.randn(s, generator=generator, device=generator.device).to(dtype=dtype, device=device) for s in shapes]
    return [torch.randn(s, generator=generator).to(dtype=dtype, device=device) for s in shapes]


class FrameNoise:
    """The NoiseBlock inputs as a function of the frame: blocks of BLOCK frames drawn in order from
    one generator, so the frames [start, end) get the same noise however an utterance is cut into
    calls (one offline call, streamed windows, a decode split at the graph's limit)."""

    BLOCK = 64

    def __init__(self, cfg: SNACConfig, generator: torch.Generator, device="cpu"):
        self.cfg, self.generator, self.device = cfg, generator, device
        self.parts: list[torch.Tensor] | None = None
        self.frames = 0

    def window(self, start: int, end: int) -> list[torch.Tensor]:
        while self.frames < end:
            block = make_noise(self.cfg, 1, self.BLOCK, self.generator, device=self.device)
            self.parts = block if self.parts is None else [torch.cat([a, b], dim=2) for a, b in zip(self.parts, block)]
            self.frames += self.BLOCK
        return [p[:, :, start * k:end * k] for p, k in zip(self.parts, self.cfg.noise_factors())]


# -- graph spec -------------------------------------------------------------------------------------


def graph_spec(cfg: SNACConfig = SNAC_24KHZ, frames: tuple[int, int, int] = (1, 4, 512),
               batch: tuple[int, int, int] = (1, 1, 8)):
    """The `vocoder` GraphSpec of the SNAC decoder (dims B and F = frames of codes_0)."""
    from models.spec import Dim, GraphSpec, TensorSpec, integers, normal

    def expr(k):
        return "F" if k == 1 else f"F*{k}"

    inputs = [TensorSpec(f"codes_{i}", "int64", ("B", expr(k)), integers(0, cfg.codebook_size),
                         f"codebook {i} codes, {k} per frame") for i, k in enumerate(cfg.code_factors())]
    inputs += [TensorSpec(f"noise_{i}", "float32", ("B", 1, expr(k)), normal(),
                          f"NoiseBlock {i} noise (standard normal; zeros disable it)")
               for i, k in enumerate(cfg.noise_factors())]
    out = TensorSpec("audio", "float32", ("B", expr(cfg.samples_per_frame)), doc=f"{cfg.sampling_rate} Hz audio")
    # the widest activation: decoder block i halves the channels and upsamples by rates[i], so per
    # output sample it holds (decoder_dim / 2^(i+1)) * prod(rates[:i+1]) / prod(rates) elements
    hop = math.prod(cfg.decoder_rates)
    per_sample = max(math.ceil((cfg.decoder_dim >> (i + 1)) * math.prod(cfg.decoder_rates[:i + 1]) / hop)
                     for i in range(len(cfg.decoder_rates)))
    return GraphSpec("vocoder", "vocoder", tuple(inputs), (out,),
                     (Dim("B", *batch, doc="batch"), Dim("F", *frames, doc="SNAC frames")),
                     doc="SNAC decoder: codes + explicit noise -> audio",
                     largest=f"B*{per_sample}*{expr(cfg.samples_per_frame)}")


# -- host-side code checks and decoding -------------------------------------------------------------


def check_codes(cfg: SNACConfig, codes) -> int:
    """Validate a code list on the host (count, dtype, shapes, range); return the frame count F."""
    codes = list(codes)
    if len(codes) != cfg.n_codebooks:
        raise UserError(f"SNAC decode got {len(codes)} code tensors, the model has {cfg.n_codebooks} codebooks.",
                        "pass one code tensor per codebook")
    for i, c in enumerate(codes):
        if not isinstance(c, torch.Tensor) or c.dtype != torch.int64 or c.dim() != 2:
            raise UserError(f"SNAC codes_{i} must be an int64 tensor [B, T].", "convert the codes with torch.as_tensor(..., dtype=torch.int64)")
    B, frames = codes[0].shape
    if frames < 1:
        raise UserError("SNAC decode got no frames.", "decode at least one complete frame")
    for i, (c, n) in enumerate(zip(codes, cfg.code_lengths(frames))):
        if tuple(c.shape) != (B, n):
            raise UserError(f"SNAC codes_{i} has shape {tuple(c.shape)}, expected {(B, n)} for {frames} frames.",
                            "keep whole frames: codebook i holds vq_strides[0]/vq_strides[i] codes per frame")
        lo, hi = int(c.min()), int(c.max())
        if lo < 0 or hi >= cfg.codebook_size:
            raise UserError(f"SNAC codes_{i} hold values in [{lo}, {hi}], outside [0, {cfg.codebook_size}).",
                            "check the token-to-code mapping (tokens_to_codes reports bad tokens)")
    if cfg.attn_window_size is not None and (frames * cfg.vq_strides[0]) % cfg.attn_window_size:
        raise UserError(f"SNAC decode: {frames} frames are not a whole number of attention windows "
                        f"({cfg.attn_window_size} latent steps).", "pad the codes to a multiple of the window")
    return frames


def _call(decoder, codes, noise):
    with torch.inference_mode():
        return decoder(*codes, *noise)


def decode_whole(decoder, codes, generator: torch.Generator | None = None, noise: list | None = None,
                 cfg: SNACConfig | None = None) -> torch.Tensor:
    """Decode a whole utterance in one call: codes [B, ...] -> audio [B, F * samples_per_frame].

    `decoder` is a SNACDecoder or any callable with its signature (e.g. a runtime backend; then pass
    `cfg`). Noise: `noise` if given, else drawn from `generator`, else zeros."""
    cfg = cfg or decoder.config
    frames = check_codes(cfg, codes)
    if noise is None:
        noise = make_noise(cfg, codes[0].shape[0], frames, generator)
    return _call(decoder, codes, noise)


def decode_streaming_windows(decoder, codes, generator: torch.Generator | None = None,
                             cfg: SNACConfig | None = None, window_frames: int = 4, emit_frame: int = 1,
                             max_batch: int = 64) -> torch.Tensor:
    """Orpheus' streaming decode: audio [B, (F - window_frames + 1) * samples_per_frame].

    Orpheus decodes, each time a frame completes and at least 4 frames exist, the last 4 frames
    (28 tokens) on their own and emits samples 2048:4096 of that window, i.e. the audio of the
    window's second frame (`emit_frame=1`). The window ending at frame k (0-based, k = 3..F-1)
    therefore emits frame k-2, and the concatenated stream covers frames 1..F-3:

    - the first 2048 samples (frame 0) are never emitted: the stream starts one frame late, and
      sample 0 of the stream is sample 2048 of the whole-utterance decode;
    - the last two frames (F-2, F-1: the last 4096 samples) are never emitted either, they only serve
      as right context; with fewer than 4 frames nothing is emitted at all.

    How the two modes differ. `decode_whole` runs the decoder once over all F frames: every sample
    sees its full receptive field (the convolutions reach about +-2 frames around a sample at the
    24 kHz config), the only zero padding is at the utterance edges, all frames are emitted, and the
    cost is one pass over F frames, but nothing is heard before the LLM has finished. Streaming
    windows decode each 4-frame window independently: an emitted frame sees only 1 frame of left and
    2 frames of right context, and everything beyond is replaced by the convolutions' zero padding
    at the window edges, so its samples differ from the whole decode's (the tests measure by how
    much) and consecutive emitted frames may not join smoothly; each window draws its own noise; the
    decoder runs 4 frames per emitted frame (~4x the work of `decode_whole` for the same audio), but
    the first audio is ready after 4 frames (28 tokens). Here all windows of a call are decoded as
    one batch (B * windows, in chunks of `max_batch`), which gives the same samples as Orpheus'
    one-window-at-a-time loop.

    Noise: every window gets its own standard-normal draws from `generator` (per chunk of up to
    `max_batch` windows, `make_noise(cfg, chunk, window_frames, generator)`), or zeros when
    `generator` is None. With zeros the result does not depend on `max_batch`.
    """
    cfg = cfg or decoder.config
    frames = check_codes(cfg, codes)
    if not 0 <= emit_frame < window_frames:
        raise UserError(f"emit_frame {emit_frame} is outside the {window_frames}-frame window.",
                        "use 0 <= emit_frame < window_frames")
    B, H = codes[0].shape[0], cfg.samples_per_frame
    W = frames - window_frames + 1
    if W <= 0:
        return torch.zeros(B, 0)
    # [B, T_i] -> [B*W, window_frames * k_i]: window w holds frames w .. w+window_frames-1
    wins = [c.unfold(1, window_frames * k, k).reshape(B * W, window_frames * k)
            for c, k in zip(codes, cfg.code_factors())]
    check_codes(cfg, wins)
    outs = []
    for start in range(0, B * W, max_batch):
        part = [w[start:start + max_batch] for w in wins]
        noise = make_noise(cfg, part[0].shape[0], window_frames, generator)
        audio = _call(decoder, part, noise)
        outs.append(audio[:, emit_frame * H:(emit_frame + 1) * H])
    return torch.cat(outs).reshape(B, W * H)


# -- Orpheus tokens <-> SNAC codes ------------------------------------------------------------------

AUDIO_TOKEN_BASE = 128266  # <custom_token_10>: audio token id = base + (i mod 7) * 4096 + code
FRAME_TOKENS = 7
ORPHEUS_CODEBOOK = 4096
# position in the 7-token frame -> (codebook, slot within the frame's codes of that codebook)
FRAME_LAYOUT = ((0, 0), (1, 0), (2, 0), (2, 1), (1, 1), (2, 2), (2, 3))


@dataclass
class TokenReport:
    """What `tokens_to_codes` kept and what it could not use (`ok` is False when audio was dropped)."""

    n_tokens: int = 0
    n_audio: int = 0          # tokens with id >= AUDIO_TOKEN_BASE (each occupies one frame position)
    non_audio: int = 0        # ids below AUDIO_TOKEN_BASE (text, special markers): skipped
    offset_mismatch: int = 0  # audio tokens of another frame position than expected (frame desync)
    out_of_range: int = 0     # ids beyond every position's codebook (>= base + 7 * 4096)
    frames: int = 0           # complete frames returned
    dropped_frames: int = 0   # complete frames dropped because a token in them was bad
    partial_tail: int = 0     # audio tokens of a trailing incomplete frame (0..6), dropped
    first_bad: list = field(default_factory=list)  # up to 8 (index, id, expected position) of bad tokens

    @property
    def ok(self) -> bool:
        return self.dropped_frames == 0 and self.partial_tail == 0

    def summary(self) -> str:
        s = (f"{self.n_tokens} tokens: {self.n_audio} audio, {self.non_audio} non-audio skipped; "
             f"{self.frames} frames kept")
        if self.dropped_frames:
            s += (f", {self.dropped_frames} frames dropped ({self.offset_mismatch} tokens at the wrong frame "
                  f"position, {self.out_of_range} out of range; first {self.first_bad[:3]})")
        if self.partial_tail:
            s += f", trailing partial frame of {self.partial_tail} tokens dropped"
        return s


class CodeParser:
    """`tokens_to_codes` one token at a time: `feed(new_ids)` parses only what is new (a stream
    decoder calls it as tokens arrive; re-parsing the whole list per chunk made streaming quadratic),
    `codes()` gives the three code rows of the complete frames so far and `report` what was dropped."""

    def __init__(self):
        self.report = TokenReport(n_tokens=0)
        self.c0: list[int] = []
        self.c1: list[int] = []
        self.c2: list[int] = []
        self.frame, self.frame_bad, self.pos = [0] * FRAME_TOKENS, False, 0

    def feed(self, token_ids) -> "CodeParser":
        rep = self.report
        for tid in token_ids:
            idx, tid = rep.n_tokens, int(tid)
            rep.n_tokens += 1
            if tid < AUDIO_TOKEN_BASE:
                rep.non_audio += 1
                continue
            rep.n_audio += 1
            pos = self.pos
            code = tid - AUDIO_TOKEN_BASE - pos * ORPHEUS_CODEBOOK
            if not 0 <= code < ORPHEUS_CODEBOOK:
                self.frame_bad = True
                if (tid - AUDIO_TOKEN_BASE) // ORPHEUS_CODEBOOK < FRAME_TOKENS:
                    rep.offset_mismatch += 1
                else:
                    rep.out_of_range += 1
                if len(rep.first_bad) < 8:
                    rep.first_bad.append((idx, tid, pos))
            self.frame[pos] = code
            self.pos += 1
            if self.pos == FRAME_TOKENS:
                f = self.frame
                if self.frame_bad:
                    rep.dropped_frames += 1
                else:
                    self.c0.append(f[0])
                    self.c1 += [f[1], f[4]]
                    self.c2 += [f[2], f[3], f[5], f[6]]
                    rep.frames += 1
                self.frame, self.frame_bad, self.pos = [0] * FRAME_TOKENS, False, 0
        rep.partial_tail = self.pos
        return self

    @property
    def frames(self) -> int:
        return len(self.c0)

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        def t(x):
            return torch.tensor(x, dtype=torch.int64).reshape(1, -1)

        return t(self.c0), t(self.c1), t(self.c2)


def tokens_to_codes(token_ids, strict: bool = False):
    """Orpheus LLM token ids -> (codes_0 [1,F], codes_1 [1,2F], codes_2 [1,4F], TokenReport).

    Tokens below AUDIO_TOKEN_BASE (text, start/end-of-speech markers) are skipped and counted; they do
    not advance the frame position (as in Orpheus). The k-th audio token sits at frame position
    p = k mod 7 and must encode code = id - base - p*4096 in [0, 4096); a token from another position
    (a lost or extra token upstream) or beyond the audio vocabulary is counted and its whole frame is
    dropped; a trailing incomplete frame is dropped and counted. Nothing is dropped silently: check
    `report.ok` / `report.summary()`, or pass strict=True to raise UserError on any dropped audio.
    A frame of 7 tokens gives c0: [f0], c1: [f1, f4], c2: [f2, f3, f5, f6]."""
    parser = CodeParser().feed(token_ids)
    rep = parser.report
    if strict and not rep.ok:
        raise UserError(f"Orpheus audio tokens do not form clean SNAC frames ({rep.summary()}).",
                        "check the LLM output and its token offsets")
    return (*parser.codes(), rep)


def codes_to_tokens(codes_0, codes_1, codes_2) -> list[int]:
    """Inverse of `tokens_to_codes` for one sequence (codes [1, F], [1, 2F], [1, 4F] or 1-D)."""
    c = [torch.as_tensor(x).reshape(-1).tolist() for x in (codes_0, codes_1, codes_2)]
    if len(c[1]) != 2 * len(c[0]) or len(c[2]) != 4 * len(c[0]):
        raise UserError("codes_1 / codes_2 must hold 2 / 4 codes per codes_0 frame.", "pass whole frames")
    out = []
    for j in range(len(c[0])):
        for p, (book, slot) in enumerate(FRAME_LAYOUT):
            out.append(AUDIO_TOKEN_BASE + p * ORPHEUS_CODEBOOK + c[book][j * (1, 2, 4)[book] + slot])
    return out
