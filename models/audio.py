"""Audio I/O and the feature extractors CosyVoice's zero-shot front end needs.

- `load_wav`: any file soundfile reads, mixed to mono, resampled with soxr.
- `cosyvoice_mel`: Matcha-TTS `mel_spectrogram` (n_fft 1920, hop 480, 80 Slaney mels, log) used for
  the prompt mel that conditions the flow.
- `kaldi_fbank`: 80-bin Kaldi fbank (what campplus.onnx was trained on), via kaldi-native-fbank.
- `whisper_log_mel`: Whisper's 128-bin log-mel (what speech_tokenizer_v2/v3.onnx expect).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from models.errors import UserError


def load_wav(path: str, sample_rate: int) -> torch.Tensor:
    """Read `path` as mono float32 in [-1, 1] at `sample_rate`: a [1, N] tensor."""
    import soundfile as sf
    import soxr

    if not os.path.isfile(path):
        raise UserError(f"audio file {path} does not exist.", "pass the path of a WAV/FLAC file")
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises its own LibsndfileError / RuntimeError types
        raise UserError(f"audio file {path} cannot be decoded ({str(e).splitlines()[0][:120]}).",
                        "pass a valid WAV or FLAC file") from None
    mono = data.mean(axis=1)
    if mono.size == 0:
        raise UserError(f"audio file {path} is empty.", "pass a recording of the prompt speaker")
    if sr != sample_rate:
        mono = soxr.resample(mono, sr, sample_rate, quality="HQ").astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(mono)).unsqueeze(0)


def save_wav(path: str, audio: torch.Tensor | np.ndarray, sample_rate: int) -> None:
    """Write float audio as 16-bit PCM WAV. Fails with a UserError before any work if unwritable."""
    import soundfile as sf

    a = audio.detach().float().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio, np.float32)
    sf.write(path, a.reshape(-1), sample_rate, subtype="PCM_16")


def check_writable(path: str) -> None:
    """Refuse an output path we could not write, before minutes of synthesis are spent."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"output path {path} is a directory.", "pass a file name such as out.wav")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"output path {path} is inside {folder}, which is a file, not a folder.", "choose another --out")
    if not os.path.isdir(folder):
        raise UserError(f"output folder {folder} does not exist.", "create it or choose another --out")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UserError(f"output path {path} is not writable.", "choose a --out in a folder you can write to")


def slaney_mel_filters(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None) -> torch.Tensor:
    """librosa.filters.mel(htk=False, norm='slaney'): [n_mels, n_fft // 2 + 1]."""
    fmax = sample_rate / 2 if fmax is None else fmax

    def hz_to_mel(f):
        f = np.asanyarray(f, dtype=np.float64)
        lin = f / (200.0 / 3)
        log_start = 1000.0 / (200.0 / 3)
        return np.where(f >= 1000.0, log_start + np.log(np.maximum(f, 1e-10) / 1000.0) / (math.log(6.4) / 27.0), lin)

    def mel_to_hz(m):
        m = np.asanyarray(m, dtype=np.float64)
        log_start = 1000.0 / (200.0 / 3)
        return np.where(m >= log_start, 1000.0 * np.exp((math.log(6.4) / 27.0) * (m - log_start)), m * (200.0 / 3))

    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2: n_mels + 2] - mel_f[:n_mels]))[:, None]
    return torch.from_numpy(weights.astype(np.float32))


def cosyvoice_mel(audio: torch.Tensor, sample_rate: int = 24000, n_fft: int = 1920, hop: int = 480,
                  n_mels: int = 80, fmax: float | None = None) -> torch.Tensor:
    """Matcha-TTS mel_spectrogram(center=False): [B, 80, frames] log-mel of [B, N] audio."""
    pad = (n_fft - hop) // 2
    x = torch.nn.functional.pad(audio.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    window = torch.hann_window(n_fft, dtype=audio.dtype)
    spec = torch.stft(x, n_fft, hop, n_fft, window=window, center=False, onesided=True, return_complex=True)
    mag = torch.sqrt(spec.real.pow(2) + spec.imag.pow(2) + 1e-9)
    mel = slaney_mel_filters(sample_rate, n_fft, n_mels, 0.0, fmax) @ mag
    return torch.log(torch.clamp(mel, min=1e-5))


def kaldi_fbank(audio_16k: torch.Tensor, num_bins: int = 80) -> torch.Tensor:
    """torchaudio.compliance.kaldi.fbank(num_mel_bins=80, dither=0, sample_frequency=16000): [frames, 80]."""
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = 16000
    opts.mel_opts.num_bins = num_bins
    # torchaudio's defaults (and so upstream's): HTK-style mel scale, no Slaney area normalisation
    opts.mel_opts.norm = ""
    opts.mel_opts.use_slaney_mel_scale = False
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(16000, audio_16k.reshape(-1).tolist())
    fb.input_finished()
    frames = [fb.get_frame(i) for i in range(fb.num_frames_ready)]
    if not frames:
        raise UserError("prompt audio is shorter than one 25 ms frame.", "pass a prompt recording of a few seconds")
    return torch.tensor(np.array(frames), dtype=torch.float32)


def whisper_log_mel(audio_16k: torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """whisper.log_mel_spectrogram(audio, n_mels): [1, n_mels, frames] (n_fft 400, hop 160)."""
    x = audio_16k.reshape(1, -1).float()
    window = torch.hann_window(400)
    stft = torch.stft(x, 400, 160, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    mel = slaney_mel_filters(16000, 400, n_mels) @ power
    log_spec = torch.clamp(mel, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0
