"""HiFT vocoder (NSF source + iSTFTNet) of CosyVoice2 (`HiFTGenerator`) and CosyVoice3
(`CausalHiFTGenerator`), re-implemented for export.

One module covers both upstream classes; `HiFTConfig.causal` selects CosyVoice3's causal layout.
State-dict keys are upstream's after `models.checkpoint.fold_weight_norm` (`f0_predictor.*`,
`m_source.l_linear.*`, `conv_pre`, `ups`, `source_downs`, `source_resblocks`, `resblocks`,
`conv_post`); the STFT bases are non-persistent buffers.

Pipeline, with T mel frames and S = T * samples_per_frame (480) audio samples:

    mel [B, 80, T] --f0 predictor--> f0 [B, T] (Hz)
    f0 + noise --harmonic source--> source [B, 1, S]
    mel + STFT(source) --conv/upsample/ResBlocks--> log-magnitude, phase --iSTFT--> audio [B, S]

Randomness is explicit (no random ops in the graph): `noise` [B, S, 9] is what upstream multiplies
by the noise amplitude: a standard-normal draw for CosyVoice2 (`torch.randn_like`), the
construction-time uniform table `sine_waves[:, :S]` for CosyVoice3. `SourceNoise` creates both.
Upstream also draws an initial phase (`rand(B, 9)`), but adds it to the first *sample* of the
per-sample phase increments and then brings those to frame rate with linear interpolation (scale
1/480), which reads samples 480*i + 239 and 480*i + 240 only: the draw never reaches the output
(checked against upstream), so it is not an input here.

The harmonic phase is accumulated as a 16-bit fixed-point phase accumulator in int32 (as a DDS
oscillator does) instead of upstream's float32 `cumsum`. Upstream's phase reaches ~1e6 rad after
10 s, where float32 resolves only ~0.06 rad, so every backend (ONNX Runtime, TensorRT, another
torch build) would drift differently with length. Integer sums are exact and identical everywhere;
the cost is a phase quantisation of 2**-16 cycle per frame, far below upstream's own float32
rounding past the first few frames. With T <= 32767 frames (11 minutes) the int32 sum cannot wrap.

CosyVoice3's f0 predictor runs in float64 upstream; here it runs in float32 by default (TensorRT
has no float64; the golden data puts the effect at 1.5e-4 Hz on f0 and 3.5e-6 on the source).
Set `HiFTGenerator.f0_float64 = True` (torch only) to run it in float64 as upstream does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoint import fold_weight_norm, load_strict, read_state_dict, strip_prefix
from models.errors import UserError
from models.stft import ISTFT, STFT

# Upstream CausalHiFT draws its noise tables for 300 s at 24 kHz.
UPSTREAM_TABLE_SAMPLES = 300 * 24000
# fixed-point phase: one cycle = 2**16 steps
PHASE_ONE = 1 << 16


# -------------------------------------------------------------------------------------------------
# configuration
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HiFTConfig:
    """Hyper-parameters of upstream HiFTGenerator / CausalHiFTGenerator and their f0 predictor.

    Defaults are the released CosyVoice2 / CosyVoice3 yaml values (24 kHz, 480 samples per mel
    frame); `causal=True` selects CosyVoice3's CausalHiFTGenerator + CausalConvRNNF0Predictor."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple = (8, 5, 3)
    upsample_kernel_sizes: tuple = (16, 11, 7)
    n_fft: int = 16
    hop_len: int = 4
    resblock_kernel_sizes: tuple = (3, 7, 11)
    resblock_dilation_sizes: tuple = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple = (7, 7, 11)
    source_resblock_dilation_sizes: tuple = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    causal: bool = False
    conv_pre_look_right: int = 4
    f0_cond_channels: int = 512

    def __post_init__(self):
        # accept lists (from yaml / json) but store hashable tuples
        for name in ("upsample_rates", "upsample_kernel_sizes", "resblock_kernel_sizes",
                     "source_resblock_kernel_sizes"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        for name in ("resblock_dilation_sizes", "source_resblock_dilation_sizes"):
            object.__setattr__(self, name, tuple(tuple(int(d) for d in ds) for ds in getattr(self, name)))
        for name in ("in_channels", "base_channels", "nb_harmonics", "sampling_rate", "n_fft", "hop_len",
                     "conv_pre_look_right", "f0_cond_channels"):
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("nsf_alpha", "nsf_sigma", "nsf_voiced_threshold", "lrelu_slope", "audio_limit"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "causal", bool(self.causal))
        if len(self.upsample_rates) != len(self.upsample_kernel_sizes):
            raise ValueError("upsample_rates and upsample_kernel_sizes differ in length")
        if len(self.resblock_kernel_sizes) != len(self.resblock_dilation_sizes):
            raise ValueError("resblock_kernel_sizes and resblock_dilation_sizes differ in length")
        if len(self.source_resblock_kernel_sizes) != len(self.upsample_rates) or \
                len(self.source_resblock_dilation_sizes) != len(self.upsample_rates):
            raise ValueError("need one source resblock (kernel, dilations) per upsampling level")
        if self.n_fft % 2:
            raise ValueError("n_fft must be even")

    @property
    def samples_per_frame(self) -> int:
        """Audio samples per mel frame: prod(upsample_rates) * hop_len (480 for CosyVoice)."""
        return math.prod(self.upsample_rates) * self.hop_len

    @property
    def harmonics(self) -> int:
        """Number of sine components of the source: fundamental + nb_harmonics overtones (9)."""
        return self.nb_harmonics + 1

    @property
    def f0_look_right(self) -> int:
        """Frames of right context the causal f0 predictor's first conv reads (kernel 4 -> 3)."""
        return 3 if self.causal else 0

    @property
    def stream_holdback_frames(self) -> int:
        """Mel frames at the end of a non-final CosyVoice3 chunk whose audio upstream withholds:
        f0 look-right (3) + conv_pre look-right (4) + the dropped last frame of samples (1)."""
        return self.f0_look_right + self.conv_pre_look_right + 1 if self.causal else 0

    @classmethod
    def from_upstream(cls, hift_kwargs: dict, f0_kwargs: dict, causal: bool) -> "HiFTConfig":
        """Build from the kwargs of upstream's yaml / golden config.json (`hift` and
        `hift.f0_predictor` entries); `causal` says whether the class is CausalHiFTGenerator."""
        kw = dict(hift_kwargs)
        kw.pop("f0_predictor", None)  # a module reference in resolved kwargs, not a number
        istft = kw.pop("istft_params", {"n_fft": 16, "hop_len": 4})
        names = {f for f in cls.__dataclass_fields__} - {"n_fft", "hop_len", "causal", "f0_cond_channels"}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise UserError(f"HiFT config has unknown keys {unknown}.",
                            "pass the kwargs of upstream HiFTGenerator / CausalHiFTGenerator")
        if not causal:
            kw.pop("conv_pre_look_right", None)
        if int(kw.get("sampling_rate", 24000)) == 22050:
            raise UserError("HiFT with sampling_rate 22050 uses upstream's SineGen v1, which is not implemented.",
                            "use a 24 kHz CosyVoice2/3 vocoder")
        f0 = dict(f0_kwargs)
        if int(f0.get("num_class", 1)) != 1:
            raise UserError(f"f0 predictor num_class={f0['num_class']} is not supported.", "use num_class 1")
        in_ch = int(kw.get("in_channels", 80))
        if int(f0.get("in_channels", in_ch)) != in_ch:
            raise UserError(f"f0 predictor in_channels={f0['in_channels']} differs from HiFT in_channels={in_ch}.",
                            "make both equal to the number of mel bins")
        return cls(**kw, n_fft=int(istft["n_fft"]), hop_len=int(istft["hop_len"]), causal=bool(causal),
                   f0_cond_channels=int(f0.get("cond_channels", 512)))


# -------------------------------------------------------------------------------------------------
# layers
# -------------------------------------------------------------------------------------------------
def snake(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Snake activation with per-channel alpha [C] on x [B, C, L]: x + 1/(alpha+1e-9) * sin(alpha*x)^2."""
    a = alpha.view(1, -1, 1)
    return x + (1.0 / (a + 1e-9)) * torch.sin(x * a).pow(2)


class Snake(nn.Module):
    """Holds upstream's `alpha` parameter; the activation itself is `snake`."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return snake(x, self.alpha)


class PaddedConv1d(nn.Conv1d):
    """Conv1d with explicit (left, right) zero padding, covering upstream's symmetric convs and its
    CausalConv1d ('left' / 'right') / CausalConv1dDownSample. Symmetric padding uses the conv's own
    padding argument (as upstream's plain Conv1d does); otherwise the input is zero-padded first.
    The weight is cast to the input dtype, so the float64 f0 path needs no float64 parameters."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1,
                 pad: tuple[int, int] = (0, 0)):
        left, right = pad
        sym = left == right
        super().__init__(cin, cout, kernel, stride=stride, dilation=dilation, padding=left if sym else 0)
        self.extra_pad = (0, 0) if sym else (left, right)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.extra_pad != (0, 0):
            x = F.pad(x, self.extra_pad)
        w, b = self.weight, self.bias
        if w.dtype != x.dtype:
            w, b = w.to(x.dtype), b.to(x.dtype)
        return self._conv_forward(x, w, b)


def nearest_upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Repeat every step of the last axis `factor` times (= nn.Upsample(mode='nearest') for the
    integer factors used here, checked bitwise; written as expand + reshape for TensorRT)."""
    shape = x.shape
    return x.unsqueeze(-1).expand(*shape, factor).reshape(*shape[:-1], shape[-1] * factor)


class NearestUpConv1d(nn.Conv1d):
    """Upstream CausalConv1dUpsample: nearest upsampling by `rate`, left pad kernel-1, conv."""

    def __init__(self, cin: int, cout: int, kernel: int, rate: int):
        super().__init__(cin, cout, kernel)
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(nearest_upsample(x, self.rate), (self.kernel_size[0] - 1, 0))
        return super().forward(x)


def _same_pad(kernel: int, dilation: int, causal: bool) -> tuple[int, int]:
    # upstream get_padding for plain convs, CausalConv1d('left') for causal ones
    if causal:
        return ((kernel - 1) * dilation, 0)
    p = (kernel * dilation - dilation) // 2
    return (p, p)


class ResBlock(nn.Module):
    """HiFi-GAN ResBlock with Snake activations: x += conv2(snake(conv1(snake(x)))) per dilation."""

    def __init__(self, channels: int, kernel: int, dilations: tuple, causal: bool):
        super().__init__()
        self.convs1 = nn.ModuleList(
            PaddedConv1d(channels, channels, kernel, dilation=d, pad=_same_pad(kernel, d, causal)) for d in dilations)
        self.convs2 = nn.ModuleList(
            PaddedConv1d(channels, channels, kernel, pad=_same_pad(kernel, 1, causal)) for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = c2(a2(c1(a1(x)))) + x
        return x


class F0Predictor(nn.Module):
    """Upstream ConvRNNF0Predictor (causal=False) / CausalConvRNNF0Predictor (causal=True):
    5 x (conv k=3, ELU) then Linear -> |.|. The causal variant's first conv has kernel 4 with
    3 frames of right padding (look-ahead); the other four are left-causal."""

    def __init__(self, in_channels: int, cond_channels: int, causal: bool):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            cin = in_channels if i == 0 else cond_channels
            if not causal:
                conv = PaddedConv1d(cin, cond_channels, 3, pad=(1, 1))
            elif i == 0:
                conv = PaddedConv1d(cin, cond_channels, 4, pad=(0, 3))
            else:
                conv = PaddedConv1d(cin, cond_channels, 3, pad=(2, 0))
            layers += [conv, nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel [B, 80, T] (float32 or float64) -> f0 [B, T] in the same dtype."""
        x = self.condnet(mel).transpose(1, 2)
        w, b = self.classifier.weight, self.classifier.bias
        if w.dtype != x.dtype:
            w, b = w.to(x.dtype), b.to(x.dtype)
        return torch.abs(F.linear(x, w, b).squeeze(-1))


class SourceModule(nn.Module):
    """Upstream SourceModuleHnNSF + SineGen2 (harmonic branch only; the noise branch is discarded
    by HiFT). Keeps upstream's parameter name `l_linear` (9 harmonics -> 1, then tanh)."""

    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        self.sampling_rate = cfg.sampling_rate
        self.sine_amp = cfg.nsf_alpha
        self.noise_std = cfg.nsf_sigma
        self.voiced_threshold = cfg.nsf_voiced_threshold
        self.upsample = cfg.samples_per_frame
        self.linear_phase = not cfg.causal  # CosyVoice2 interpolates the phase linearly, CosyVoice3 nearest
        self.l_linear = nn.Linear(cfg.harmonics, 1)
        self.register_buffer("multipliers", torch.arange(1, cfg.harmonics + 1, dtype=torch.float32),
                             persistent=False)

    def forward(self, f0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """f0 [B, T] (Hz), noise [B, T*up, 9] -> source [B, 1, T*up]."""
        B, T = f0.shape
        up = self.upsample
        # per-sample phase increment (cycles) of every harmonic, as upstream's `rad_values`. Upstream
        # computes it at sample rate from the nearest-upsampled f0 and brings it back to frame rate
        # by linear interpolation, which averages two equal samples: identical to per-frame values.
        rad = f0.unsqueeze(-1) * self.multipliers / self.sampling_rate  # [B, T, 9]
        rad = rad - torch.floor(rad)  # == rad % 1 for rad >= 0
        advance = rad * up  # phase advance over one frame, in cycles (upstream: cumsum * 2pi * 480)
        frac = advance - torch.floor(advance)
        steps = torch.round(frac * PHASE_ONE).to(torch.int32)
        acc = torch.remainder(torch.cumsum(steps, dim=1, dtype=torch.int32), PHASE_ONE)  # exact, backend-independent
        cycles = acc.to(f0.dtype) / PHASE_ONE  # frame phase in [0, 1) cycles, [B, T, 9]
        if self.linear_phase:
            cycles = self._interpolate_linear(cycles, advance)  # [B, S, 9]
        else:
            cycles = nearest_upsample(cycles.transpose(1, 2), up).transpose(1, 2)
        sines = torch.sin(2 * math.pi * cycles) * self.sine_amp  # [B, S, 9]
        # voiced / unvoiced per sample from the nearest-upsampled f0
        uv = (nearest_upsample(f0, up) > self.voiced_threshold).to(sines.dtype).unsqueeze(-1)  # [B, S, 1]
        noise_amp = uv * self.noise_std + (1 - uv) * self.sine_amp / 3
        waves = sines * uv + noise_amp * noise
        return torch.tanh(self.l_linear(waves)).transpose(1, 2)

    def _interpolate_linear(self, cycles: torch.Tensor, advance: torch.Tensor) -> torch.Tensor:
        """Upstream's F.interpolate(mode='linear', align_corners=False) of the frame phase to sample
        rate, done on the wrapped phase: sample m of frame k sits at w = (m + 0.5)/up - 0.5 frames
        from the frame centre, between frame k-1 and k (w < 0) or k and k+1 (w >= 0), and the
        unwrapped phase difference between neighbours is the next frame's advance. The first half
        of frame 0 and the second half of the last frame hold the end values, as interpolate does."""
        B, T, H = cycles.shape
        up = self.upsample
        w = (torch.arange(up, device=cycles.device, dtype=cycles.dtype) + 0.5) / up - 0.5  # [up]
        # advance into frame k (none before frame 0) and into frame k+1 (none after the end); written
        # without a length-(T-1) slice so that export does not specialise on T == 2
        first = torch.arange(T, device=cycles.device).view(1, T, 1) == 0
        left = torch.where(first, torch.zeros_like(advance), advance)
        right = F.pad(advance, (0, 0, 0, 1))[:, 1:]
        w = w.view(1, 1, up, 1)
        delta = torch.where(w < 0, w * left.unsqueeze(2), w * right.unsqueeze(2))  # [B, T, up, H]
        return (cycles.unsqueeze(2) + delta).reshape(B, T * up, H)


# -------------------------------------------------------------------------------------------------
# generator
# -------------------------------------------------------------------------------------------------
def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # no-op (and no Cast node in an exported graph) when the dtype already matches
    return x if x.dtype == dtype else x.to(dtype)


class HiFTGenerator(nn.Module):
    """CosyVoice2 HiFTGenerator (cfg.causal False) / CosyVoice3 CausalHiFTGenerator (True).

    forward(mel [B, 80, T] float32, noise [B, T*480, 9]) -> audio [B, T*480],
    equal to upstream `inference(mel)` (finalize=True for CosyVoice3) given the same random draws.

    Mixed precision: the parts in FP32_PARTS may stay float32 while the network between them runs
    in a lower dtype (a backend casts the module with these islands kept); the forward casts at
    their boundaries, which costs nothing when everything is float32. Why: the f0 predictor and the
    harmonic source accumulate phase (tens of cycles per frame for the upper harmonics: in bf16 the
    per-frame advance would be off by ~0.2 % of itself, accumulating), and the (i)STFT bases are
    exact float32 tables."""

    FP32_PARTS = ("f0_predictor", "m_source", "stft", "istft")

    def __init__(self, cfg: HiFTConfig, f0_float64: bool = False):
        super().__init__()
        self.cfg = cfg
        self.f0_float64 = f0_float64
        causal = cfg.causal
        nb = cfg.n_fft // 2 + 1
        self.spec_bins = nb
        base = cfg.base_channels
        levels = len(cfg.upsample_rates)
        self.num_kernels = len(cfg.resblock_kernel_sizes)

        self.f0_predictor = F0Predictor(cfg.in_channels, cfg.f0_cond_channels, causal)
        self.m_source = SourceModule(cfg)
        self.stft = STFT(cfg.n_fft, cfg.hop_len)
        self.istft = ISTFT(cfg.n_fft, cfg.hop_len)

        if causal:
            k = cfg.conv_pre_look_right + 1
            self.conv_pre = PaddedConv1d(cfg.in_channels, base, k, pad=(0, cfg.conv_pre_look_right))
        else:
            self.conv_pre = PaddedConv1d(cfg.in_channels, base, 7, pad=(3, 3))

        self.ups = nn.ModuleList()
        for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
            cin, cout = base // 2 ** i, base // 2 ** (i + 1)
            if causal:
                self.ups.append(NearestUpConv1d(cin, cout, k, u))
            else:
                self.ups.append(nn.ConvTranspose1d(cin, cout, k, u, padding=(k - u) // 2))

        # the source STFT (frame rate hop) is brought down to each level's rate
        rates = [1, *reversed(cfg.upsample_rates)][:levels]
        cum = [math.prod(rates[: j + 1]) for j in range(levels)][::-1]
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(zip(cum, cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes)):
            ch = base // 2 ** (i + 1)
            if u == 1:
                self.source_downs.append(PaddedConv1d(cfg.n_fft + 2, ch, 1))
            else:
                pad = (u - 1, 0) if causal else (u // 2, u // 2)
                self.source_downs.append(PaddedConv1d(cfg.n_fft + 2, ch, 2 * u, stride=u, pad=pad))
            self.source_resblocks.append(ResBlock(ch, k, d, causal))

        self.resblocks = nn.ModuleList()
        for i in range(levels):
            ch = base // 2 ** (i + 1)
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(ResBlock(ch, k, d, causal))
        self.conv_post = PaddedConv1d(ch, cfg.n_fft + 2, 7, pad=(6, 0) if causal else (3, 3))

    # -- pieces ----------------------------------------------------------------------------------
    def f0(self, mel: torch.Tensor, finalize: bool = True, float64: bool | None = None) -> torch.Tensor:
        """mel [B, 80, T] -> f0 [B, T] (Hz, float32). finalize=False (CosyVoice3 streaming) drops
        the last `cfg.f0_look_right` frames, which upstream uses as right context only; the kept
        frames equal the first frames of the finalize=True result. float64 (default:
        `self.f0_float64`) runs the predictor in float64 as upstream CosyVoice3 does (torch only)."""
        use64 = self.f0_float64 if float64 is None else float64
        x = mel.to(torch.float64) if use64 else _cast(mel, _dtype_of(self.f0_predictor))
        f0 = self.f0_predictor(x)
        if f0.dtype != torch.float32:  # the source module takes float32 f0 (see FP32_PARTS)
            f0 = f0.float()
        if not finalize and self.cfg.f0_look_right:
            f0 = f0[:, : f0.shape[1] - self.cfg.f0_look_right]
        return f0

    def source(self, f0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """f0 [B, T], noise [B, T*480, 9] -> NSF excitation [B, 1, T*480]."""
        return self.m_source(f0, noise)

    def spectrum(self, mel: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network part of `decode`: mel [B, 80, T], source [B, 1, T*480] ->
        (magnitude, phase), each [B, n_fft/2+1, T*120+1], as upstream feeds them to `_istft`
        (magnitude before the 1e2 clip)."""
        net = self.conv_pre.weight.dtype
        # [B, 2F, frames]: real then imag, as upstream cat; a module call, so the STFT island is scoped
        s_stft = _cast(self.stft(source.squeeze(1), stacked=True), net)
        x = self.conv_pre(_cast(mel, net))
        last = len(self.ups) - 1
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, self.cfg.lrelu_slope))
            if i == last:
                x = torch.cat([x[:, :, 1:2], x], dim=2)  # ReflectionPad1d((1, 0))
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            xs = blocks[0](x)
            for block in blocks[1:]:
                xs = xs + block(x)
            x = xs / self.num_kernels
        x = self.conv_post(F.leaky_relu(x))  # default slope 0.01, as upstream
        magnitude = torch.exp(x[:, : self.spec_bins])
        phase = torch.sin(x[:, self.spec_bins :])  # upstream's (redundant) sin
        return magnitude, phase

    def polar_istft(self, magnitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """Upstream `_istft`: clip magnitude at 1e2, polar -> cartesian, inverse STFT (no clamp).
        [B, F, frames] x 2 -> [B, hop*(frames-1)]."""
        magnitude = torch.clamp(_cast(magnitude, torch.float32), max=1e2)
        phase = _cast(phase, torch.float32)
        return self.istft(magnitude * torch.cos(phase), magnitude * torch.sin(phase))

    def decode(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """mel [B, 80, T], source [B, 1, T*480] -> audio [B, T*480] clamped to +-audio_limit
        (upstream `decode(x, s)`, finalize=True)."""
        audio = self.polar_istft(*self.spectrum(mel, source))
        return torch.clamp(audio, -self.cfg.audio_limit, self.cfg.audio_limit)

    # -- graph entry points -----------------------------------------------------------------------
    def forward(self, mel: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """mel [B, 80, T], noise [B, T*480, 9] -> audio [B, T*480]."""
        f0 = self.f0(mel)
        return self.decode(mel, self.source(f0, noise))

    def stream_decode(self, mel: torch.Tensor, noise: torch.Tensor,
                      finalize: bool) -> torch.Tensor:
        """Upstream `CausalHiFTGenerator.inference(mel, finalize)` for CosyVoice3 streaming, where
        `mel` is the whole mel received so far and `noise` covers all T*480 samples.

        finalize=False returns [B, (T - 8)*480]: upstream trims the f0 look-ahead (3 frames), the
        conv_pre look-ahead (4) and the last 480 samples. Every layer is left-causal apart from
        those two look-aheads and the STFT / iSTFT windows, and the kept region never reaches the
        zero padding or window edges, so that output equals the first (T-8)*480 samples of the
        finalize=True output on the same mel; it is computed that way (one graph for both).
        finalize=True is `forward`."""
        if not finalize and not self.cfg.causal:
            raise ValueError("stream_decode(finalize=False) exists for the causal (CosyVoice3) vocoder only")
        audio = self.forward(mel, noise)
        if finalize:
            return audio
        keep = max(mel.shape[2] - self.cfg.stream_holdback_frames, 0) * self.cfg.samples_per_frame
        return audio[:, :keep]


# -------------------------------------------------------------------------------------------------
# checkpoints and random inputs
# -------------------------------------------------------------------------------------------------
def load_hift_state_dict(gen: HiFTGenerator, sd: dict, source: str = "hift.pt") -> None:
    """Load an upstream hift state_dict (weight-norm keys in either style, optional `generator.`
    prefix as upstream's loader strips it) with strict keys; raises UserError on a mismatch."""
    if any(k.startswith("generator.") for k in sd):
        sd = strip_prefix(sd, "generator.")
    load_strict(gen, fold_weight_norm(sd), source)


def load_hift(cfg: HiFTConfig, path: str, f0_float64: bool = False) -> HiFTGenerator:
    """Build a HiFTGenerator for `cfg`, load upstream `hift.pt` from `path`, return it in eval mode."""
    gen = HiFTGenerator(cfg, f0_float64=f0_float64)
    load_hift_state_dict(gen, read_state_dict(path), path)
    return gen.eval()


class SourceNoise:
    """Creates the explicit noise input [B, S, 9] of HiFTGenerator.

    * fixed=True (CosyVoice3, as upstream CausalHiFT): a table drawn once from `seed` with a
      torch.Generator in upstream's order (the unused initial-phase draw rand(1, 9), then the uniform
      table rand(1, max_samples, 9)); `draw` returns batch-expanded views, so slicing is free.
      Upstream's tables are 300 s long (UPSTREAM_TABLE_SAMPLES = 7.2M samples, 259 MB): pass a
      smaller `max_samples` when long audio is not needed.
    * fixed=False (CosyVoice2): every `draw` takes fresh values from a torch.Generator seeded with
      `seed` (or the one passed to `draw`), in upstream's order and memory layout: the (unused)
      initial phase rand(B, 9), then standard-normal noise [B, S, 9] filled as upstream's randn_like
      fills it, so a generator seeded like upstream's global RNG yields upstream's exact noise.
    """

    def __init__(self, fixed: bool, seed: int = 0, max_samples: int = UPSTREAM_TABLE_SAMPLES,
                 harmonics: int = 9, device: torch.device | str | None = None):
        self.fixed = fixed
        self.harmonics = harmonics
        self.generator = torch.Generator().manual_seed(seed)
        self.device = device
        if fixed:
            torch.rand(1, harmonics, generator=self.generator)  # upstream's rand_ini: keeps the stream aligned
            self.table = torch.rand(1, max_samples, harmonics, generator=self.generator).to(device)
            self.max_samples = max_samples

    @classmethod
    def for_config(cls, cfg: HiFTConfig, seed: int = 0, max_samples: int = UPSTREAM_TABLE_SAMPLES,
                   device=None) -> "SourceNoise":
        """Fixed tables for the causal (CosyVoice3) vocoder, per-call draws otherwise."""
        return cls(fixed=cfg.causal, seed=seed, max_samples=max_samples, harmonics=cfg.harmonics, device=device)

    def draw(self, batch: int, samples: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """-> noise [batch, samples, 9] float32."""
        if self.fixed:
            if samples > self.max_samples:
                raise UserError(f"the vocoder noise table holds {self.max_samples} samples, {samples} were requested.",
                                "synthesize shorter audio or build SourceNoise with a larger max_samples")
            return self.table[:, :samples].expand(batch, samples, self.harmonics)
        g = generator if generator is not None else self.generator
        dev = g.device
        torch.rand(batch, self.harmonics, generator=g, device=dev)  # upstream's initial-phase draw (never reaches the output)
        # upstream's randn_like(sine_waves) fills a [B, S, 9] view whose memory is laid out as
        # [B, 9, S] (a transposed interpolate output); filling the same layout reproduces its stream
        noise = torch.empty(batch, self.harmonics, samples, device=dev).transpose(1, 2).normal_(generator=g)
        return noise.contiguous().to(self.device if dev.type == "cpu" else dev)
