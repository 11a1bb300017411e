"""Audio chunks -> bytes of a response format, as they arrive (the speech server's encoders).

    enc = Encoder("flac", 24000, streaming=True)
    for chunk in chunks:            # float32 audio in [-1, 1]
        send(enc.feed(chunk))       # bytes ready now (may be empty: the codec waits for a full block)
    send(enc.finish())

Formats (the names of OpenAI's `response_format`):

- `wav`: 16-bit PCM mono. Streamed, the header carries an open length (0xFFFFFFFF, what ffmpeg and
  sox write when streaming; libsndfile, ffmpeg and browsers read to the end of the data); complete
  (`streaming=False`), the real length.
- `pcm`: the same samples without a header (16-bit little-endian signed, mono, the model's rate).
- `flac`, `mp3`, `opus` (Ogg Opus): libsndfile's encoders writing into memory, handing out whatever
  the encoder has written since the last call. Encoders seek back at the end to patch their headers
  (FLAC: total samples and MD5 in STREAMINFO); bytes already sent cannot change, so a streamed FLAC
  says "length unknown" (0 samples, no MD5), which the FLAC format allows and ffmpeg, the flac tool
  and browsers read, but python-soundfile (libsndfile) cannot (it seeks past the end): ask for the
  complete file (`"stream": false`) for such readers. MP3 is written at a constant bit rate so that
  it needs no Xing header patched in at the end (readers estimate a VBR stream's length from its first
  frame without one); like every MP3 without a LAME tag, it starts with the encoder's delay.
- `aac` is not offered: libsndfile has no AAC encoder.
"""

from __future__ import annotations

import io

import numpy as np

from models.audio import _pcm16 as pcm16
from models.audio import _wav_header as wav_header
from models.errors import UserError

# response_format -> (content type, soundfile format, subtype); None: written here without libsndfile
FORMATS = {
    "wav": ("audio/wav", None, None),
    "pcm": ("audio/pcm", None, None),
    "flac": ("audio/flac", "FLAC", "PCM_16"),
    "mp3": ("audio/mpeg", "MP3", "MPEG_LAYER_III"),
    "opus": ("audio/ogg", "OGG", "OPUS"),
}
# asked for by OpenAI clients, but not writable here (said in the error)
UNSUPPORTED = {"aac": "libsndfile, the audio library here, has no AAC encoder"}


def available_formats() -> list[str]:
    """The formats this libsndfile build can write (wav and pcm always)."""
    import soundfile as sf

    return [name for name, (_, fmt, sub) in FORMATS.items() if fmt is None or sf.check_format(fmt, sub)]


def check_format(name: str) -> str:
    """The content type of a response format, or a UserError naming the formats on offer."""
    offered = available_formats()
    if name in offered:
        return FORMATS[name][0]
    why = UNSUPPORTED.get(name) or ("this libsndfile build cannot write it" if name in FORMATS else None)
    what = f"response_format {name!r} is not supported" + (f" ({why})" if why else "")
    raise UserError(f"{what}.", f"choose one of {', '.join(offered)}")


class _Sink(io.RawIOBase):
    """A seekable in-memory file for libsndfile that remembers what was already handed out: writes
    into that part (header patches at the end) are dropped when streaming, kept otherwise."""

    def __init__(self, streaming: bool):
        super().__init__()
        self.buf = bytearray()
        self.pos = 0
        self.sent = 0
        self.streaming = streaming

    def writable(self):
        return True

    def seekable(self):
        return True

    def readable(self):
        return False

    def write(self, data) -> int:
        b = bytes(data)
        n = len(b)
        if self.streaming and self.pos < self.sent:
            skip = min(self.sent - self.pos, n)
            b, self.pos = b[skip:], self.pos + skip
        end = self.pos + len(b)
        if end > len(self.buf):
            self.buf.extend(b"\0" * (end - len(self.buf)))
        self.buf[self.pos:end] = b
        self.pos = end
        return n

    def seek(self, offset, whence=io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: len(self.buf)}[whence]
        self.pos = max(base + offset, 0)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def take(self) -> bytes:
        out = bytes(self.buf[self.sent:])
        self.sent = len(self.buf)
        return out


class Encoder:
    """One response's encoder: `feed(chunk) -> bytes`, then `finish() -> bytes`. With
    `streaming=False` everything comes from `finish()`, with its headers complete."""

    def __init__(self, name: str, sample_rate: int, streaming: bool = True):
        check_format(name)
        self.name, self.sample_rate, self.streaming = name, sample_rate, streaming
        self.samples = 0
        self._pending = bytearray()  # non-streaming wav / pcm
        self._header_sent = False
        _, fmt, sub = FORMATS[name]
        self._sink = self._file = None
        if fmt is not None:
            import soundfile as sf

            self._sink = _Sink(streaming)
            # MP3: a constant 64 kbit/s (libsndfile maps compression level 0.6 to it at 24 kHz), see above
            extra = {"bitrate_mode": "CONSTANT", "compression_level": 0.6} if fmt == "MP3" else {}
            self._file = sf.SoundFile(self._sink, "w", samplerate=sample_rate, channels=1, format=fmt, subtype=sub,
                                      **extra)

    def feed(self, chunk) -> bytes:
        a = np.asarray(chunk, dtype=np.float32).reshape(-1)
        self.samples += a.size
        data = pcm16(a)
        if self._file is not None:
            # the same 16-bit samples as wav / pcm (libsndfile's own float conversion rounds differently)
            self._file.write(np.frombuffer(data, "<i2"))
            return self._sink.take() if self.streaming else b""
        if not self.streaming:
            self._pending += data
            return b""
        if self.name == "wav" and not self._header_sent:
            self._header_sent = True
            return wav_header(self.sample_rate, None) + data
        return data

    def finish(self) -> bytes:
        if self._file is not None:
            self._file.close()
            return self._sink.take()
        if not self.streaming:
            head = wav_header(self.sample_rate, len(self._pending)) if self.name == "wav" else b""
            return head + bytes(self._pending)
        if self.name == "wav" and not self._header_sent:  # no audio at all: a valid empty file
            self._header_sent = True
            return wav_header(self.sample_rate, 0)
        return b""

    def close(self) -> None:
        """Drop the encoder without finishing (the client went away)."""
        if self._file is not None and not self._file.closed:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001 - its output is being thrown away
                pass
