"""Audio I/O and the feature extractors CosyVoice's zero-shot front end needs.

- `load_wav`: any file soundfile reads, mixed to mono, resampled with soxr.
- `save_wav` / `AudioWriter`: .wav / .flac / .ogg or a WAV on stdout, all or nothing (models/files.py).
- `cosyvoice_mel`: Matcha-TTS `mel_spectrogram` (n_fft 1920, hop 480, 80 Slaney mels, log) used for
  the prompt mel that conditions the flow.
- `kaldi_fbank`: 80-bin Kaldi fbank (what campplus.onnx was trained on), via kaldi-native-fbank.
- `whisper_log_mel`: Whisper's 128-bin log-mel (what speech_tokenizer_v2/v3.onnx expect).
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import torch

from models.errors import UserError


# --out extension -> (soundfile format, subtype). Checked before any work; "-" is a WAV on stdout.
OUTPUT_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS")}
STDOUT = "-"
# shorter prompts give the speaker encoder and the speech tokenizer (25 tokens/s) almost nothing, and
# below 30 ms the mel front end cannot even pad the signal
PROMPT_MIN_SECONDS = 0.5


def load_wav(path: str, sample_rate: int) -> torch.Tensor:
    """Read `path` as mono float32 in [-1, 1] at `sample_rate`: a [1, N] tensor."""
    import soundfile as sf
    import soxr

    if os.path.isdir(path):
        raise UserError(f"audio file {path} is a directory.", "pass the path of a WAV/FLAC file")
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
    bad = int(np.count_nonzero(~np.isfinite(mono)))
    if bad:  # a float WAV can hold NaN / inf; every feature computed from it would be NaN
        raise UserError(f"audio file {path} holds {bad} NaN or infinite sample(s).",
                        "pass a clean recording (re-export it as 16-bit PCM)")
    if sr != sample_rate:
        mono = soxr.resample(mono, sr, sample_rate, quality="HQ").astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray(mono)).unsqueeze(0)


def check_prompt_wav(path: str) -> None:
    """Refuse a prompt recording that cannot work (missing, a folder, undecodable, NaN, too short)
    before the model is loaded."""
    wav = load_wav(path, 16000)
    seconds = wav.shape[1] / 16000
    if seconds < PROMPT_MIN_SECONDS:
        raise UserError(f"the prompt recording {path} is {seconds * 1000:.0f} ms long; at least "
                        f"{PROMPT_MIN_SECONDS} s are needed.", "pass a few seconds of clean speech with --prompt-wav")


def output_format(path: str) -> tuple[str, str]:
    """(soundfile format, subtype) for an output path, or a UserError listing what is supported."""
    import soundfile as sf

    if path == STDOUT:
        return OUTPUT_FORMATS[".wav"]
    ext = os.path.splitext(path)[1].lower()
    supported = ", ".join(OUTPUT_FORMATS)
    if ext not in OUTPUT_FORMATS:
        has = f"the extension {ext}" if ext else "no extension"
        raise UserError(f"output path {path} has {has}; audio is written as {supported} (by extension).",
                        f"end --out with one of {supported}, or pass --out - for a WAV on stdout")
    fmt, subtype = OUTPUT_FORMATS[ext]
    if not sf.check_format(fmt, subtype):
        raise UserError(f"this libsndfile build cannot write {fmt} {subtype} ({ext}).", "write a .wav")
    return fmt, subtype


def check_writable(path: str) -> None:
    """Refuse an output path we could not write, before minutes of synthesis are spent: an audio
    format we do not write, a directory, a missing or unwritable folder."""
    from models.files import check_folder_writable

    if path != STDOUT and os.path.isdir(path):
        raise UserError(f"output path {path} is a directory.", "pass a file name such as out.wav")
    output_format(path)
    if path == STDOUT:
        return
    check_folder_writable(os.path.dirname(os.path.abspath(path)), path)


def _wav_header(sample_rate: int, data_bytes: int | None) -> bytes:
    """A 44-byte PCM_16 mono WAV header; `data_bytes` None: an open length (0xFFFFFFFF, what
    streaming writers such as ffmpeg and sox emit when the length is not known yet)."""
    import struct

    data = 0xFFFFFFFF if data_bytes is None else min(data_bytes, 0xFFFFFFFF - 36)
    riff = 0xFFFFFFFF if data_bytes is None else data + 36
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", riff, b"WAVE", b"fmt ", 16, 1, 1, sample_rate,
                       sample_rate * 2, 2, 16, b"data", data)


def _pcm16(audio: torch.Tensor | np.ndarray) -> bytes:
    a = audio.detach().float().cpu().numpy() if isinstance(audio, torch.Tensor) else np.asarray(audio, np.float32)
    # clip, as a 16-bit integer wraps a sample beyond full scale into a click of the opposite sign
    return np.rint(np.clip(a.reshape(-1), -1.0, 1.0) * 32767).astype("<i2").tobytes()


class AudioWriter:
    """Mono audio written chunk by chunk to `path`, in the format its extension names.

    A file is written beside the target and renamed into place only when complete (models/files.py),
    so a failed or interrupted run leaves an earlier file untouched. `path` "-" streams a 16-bit WAV to
    `stdout` (a binary stream) as chunks arrive: the header carries an open length (0xFFFFFFFF) unless
    `samples` is known up front, and is patched with the real one at the end when stdout is a
    seekable file. WAV goes to the disk as it arrives; FLAC / OGG are encoded in memory and written at
    the end (the encoder cannot report a full disk with its errno)."""

    def __init__(self, path: str, sample_rate: int, samples: int | None = None, stdout=None):
        from models.files import AtomicFile

        self.path, self.sample_rate = path, sample_rate
        self.format, self.subtype = output_format(path)
        self.samples = 0
        self._encoder = self._memory = self._atomic = self._start = None
        if path == STDOUT:
            self._out = stdout if stdout is not None else sys.stdout.buffer
        else:
            self._atomic = AtomicFile(path)
            self._out = self._atomic.file
        self._header = None
        if self.format == "WAV":
            # written with the first chunk: a run that fails before any audio puts nothing on stdout
            self._header = _wav_header(sample_rate, None if samples is None else 2 * samples)
        else:
            import io

            import soundfile as sf

            self._memory = io.BytesIO()
            self._encoder = sf.SoundFile(self._memory, "w", samplerate=sample_rate, channels=1, format=self.format,
                                         subtype=self.subtype)

    def _write_header(self) -> None:
        if self._header is not None:
            self._start = self._tell()
            self._out.write(self._header)
            self._header = None

    def _tell(self) -> int | None:
        """Where the header starts, when it can be patched: a regular file only (not a pipe or a
        terminal, nor an in-memory stream that copies what is written elsewhere)."""
        import stat

        try:
            return self._out.tell() if stat.S_ISREG(os.fstat(self._out.fileno()).st_mode) else None
        except (AttributeError, OSError, ValueError):
            return None

    def write(self, chunk: torch.Tensor | np.ndarray) -> None:
        if self._encoder is not None:
            a = chunk.detach().float().cpu().numpy() if isinstance(chunk, torch.Tensor) else np.asarray(chunk, np.float32)
            self._encoder.write(np.clip(a.reshape(-1), -1.0, 1.0))
            self.samples += a.size
            return
        data = _pcm16(chunk)
        self._write_header()
        self._out.write(data)
        self._out.flush()  # a reader of stdout (a player) gets the chunk now
        self.samples += len(data) // 2

    def close(self) -> None:
        """Finish the file: the real length in the WAV header, the encoder's last block, the rename."""
        try:
            if self.format == "WAV":
                self._write_header()  # still pending when there was no audio at all: a valid empty WAV
                if self._start is not None:  # a file (or stdout redirected to one): the real length
                    end = self._out.tell()
                    self._out.seek(self._start)
                    self._out.write(_wav_header(self.sample_rate, 2 * self.samples))
                    self._out.seek(end)
            else:
                self._encoder.close()
                self._encoder = None
                self._out.write(self._memory.getvalue())
            if self._atomic is None:
                self._out.flush()
        except BaseException as e:
            self.abort(e)
        if self._atomic is not None:
            self._atomic.commit()  # removes the temporary file itself when the rename fails

    def abort(self, error: BaseException) -> None:
        """Drop the output (an earlier file stays) and re-raise `error` with a note saying so."""
        from models.files import reraise_with_note

        if self._encoder is not None:
            try:
                self._encoder.close()
            except Exception:
                pass  # its output is being thrown away
        if self._atomic is None:
            reraise_with_note(error, None, "stdout")
        self._atomic.abort()
        reraise_with_note(error, f"{self.path} was left as it was" if self._atomic.existed else f"{self.path} was not written",
                          self.path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None:
            self.close()
        else:
            self.abort(exc)
        return False


def save_wav(path: str, audio: torch.Tensor | np.ndarray, sample_rate: int, stdout=None) -> None:
    """Write float audio to `path` in the format its extension names (16-bit PCM WAV / FLAC, Vorbis
    OGG; "-": a WAV on stdout), all or nothing: an earlier file survives any failure."""
    n = audio.numel() if isinstance(audio, torch.Tensor) else np.asarray(audio).size
    with AudioWriter(path, sample_rate, samples=n, stdout=stdout) as w:
        w.write(audio)


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
