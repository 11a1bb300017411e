"""Streaming tokens -> audio, as upstream does it.

A stream decoder receives the growing token list (`push`) while the LLM generates and returns audio
chunks as soon as enough tokens exist; `finish` returns the rest. Graphs are called through the same
`run(graph, feed)` as offline synthesis, so every backend streams.

CosyVoice (upstream `CosyVoice2Model` / `CosyVoice3Model.tts(stream=True)`): the first chunk waits
for 25 tokens (plus what pads the prompt to a multiple of 25) and 3 look-ahead tokens; the hop then
doubles up to 100 tokens. Each chunk re-runs the flow over all tokens so far with the static-chunk
attention mask (50 frames = 25 tokens, so emitted frames never attend to unfinished chunks) and keeps
the mel of the new tokens.
- CosyVoice3: the causal vocoder re-runs over all mel so far and emits what it had not emitted,
  holding back the last 8 frames (its look-ahead). The concatenated chunks equal `token2wav(...,
  streaming=True)` on all tokens: chunking changes nothing but latency.
- CosyVoice2: HiFT is not causal. Each chunk is vocoded with the previous chunk's last 8 mel frames
  and NSF source in front, and the first 3840 samples are cross-faded (Hamming window) with the
  previous chunk's held-back tail. Streamed audio therefore differs from offline audio around chunk
  joins (and in the per-chunk noise draws); that is upstream's design.

Orpheus (canopyai/Orpheus-TTS's decoder): every complete 7-token frame, once 4 frames exist, the last
4 frames are decoded on their own and the window's second frame is emitted. We also emit the first
window's first frame and, at the end, the last window's last two frames, which Orpheus drops, so the
streamed audio has the length of the whole-utterance decode; samples differ from it because each frame
sees only 1 frame of left and 2 of right context (docs/models.md).
"""

from __future__ import annotations

import math

import torch

from models.snac import CodeParser


class CosyVoiceStream:
    first_hop = 25
    max_hop = 100
    hop_scale = 2
    cache_frames = 8  # CosyVoice2: mel frames (and their source samples) carried into the next chunk

    def __init__(self, model, utt, run, generator, device):
        self.model, self.utt, self.run, self.generator, self.device = model, utt, run, generator, torch.device(device)
        prompt = len(utt.speaker["prompt_tokens"])
        self.pad = int(math.ceil(prompt / self.first_hop) * self.first_hop - prompt)
        self.hop = self.first_hop
        self.offset = 0  # tokens whose audio was emitted
        self.hop_samples = model.cfg.hift.samples_per_frame
        self.causal = model.cfg.hift.causal
        self.mel_all = None  # CosyVoice3: every mel frame so far
        self.emitted = 0  # CosyVoice3: samples emitted
        self.cache = None  # CosyVoice2: (mel tail, source tail, speech tail)
        # flow_mode "prefix": the flow solves each chunk's new frames only (models/dit.py DiTPrefix),
        # while the runner's budget for what streams keep between chunks lets this one keep them
        self.flow_state = {} if run.options.get("flow_mode") == "prefix" else None
        self.budget = getattr(run, "stream_state_budget", None)
        if self.budget is not None and self.flow_state is not None:
            self.budget.open(self)

    def tokens_for_next_chunk(self) -> int:
        """How many tokens `push` needs before it returns the next chunk (a caller fed tokens one
        by one may wait until then)."""
        return self.offset + self.hop + (self.pad if self.offset == 0 else 0) + self.model.lookahead

    def push(self, tokens: list[int]) -> list[torch.Tensor]:
        chunks = []
        while True:
            hop = self.hop + (self.pad if self.offset == 0 else 0)
            if len(tokens) - self.offset < hop + self.model.lookahead:
                return chunks
            chunks.append(self._chunk(tokens[: self.offset + hop + self.model.lookahead], finalize=False))
            self.offset += hop
            self.hop = min(self.max_hop, self.hop * self.hop_scale)

    def finish(self, tokens: list[int]) -> list[torch.Tensor]:
        try:
            return [self._chunk(tokens, finalize=True)]
        finally:
            self.close()

    def _keeps_prefix(self, tokens, finalize: bool) -> bool:
        """Whether this chunk solves after the kept prefix. Past the budget the stream lets its
        prefix go and recomputes every frame from then on, as without flow_mode prefix (the same
        frames to float rounding; a budget frees what ended streams held, never what live ones hold)."""
        if self.flow_state is None:
            return False
        if self.flow_state.get("frames") and "prefixes" not in self.flow_state:
            self._let_prefix_go()  # a failed solve took them: what the frames were computed against is gone
            return False
        if self.budget is None:
            return True
        frames = (len(self.utt.speaker["prompt_tokens"]) + len(tokens) - (0 if finalize else self.model.lookahead)) \
            * self.model.cfg.token_mel_ratio
        if finalize or self.budget.charge(self, frames * self.model.prefix_bytes_per_frame(self.run.module("flow_solver"))):
            return True  # the last chunk keeps nothing afterwards: it needs no new budget
        self._let_prefix_go()
        return False

    def _let_prefix_go(self) -> None:
        self.flow_state = None
        if self.budget is not None:
            self.budget.close(self)

    def close(self) -> None:
        """The stream is done (or abandoned): what it kept goes (its frame count stays), and so does its
        budget charge."""
        if self.flow_state is not None:
            self.flow_state.pop("prefixes", None)
        if self.budget is not None:
            self.budget.close(self)

    def _chunk(self, tokens, finalize: bool) -> torch.Tensor:
        r = self.model.cfg.token_mel_ratio
        if self._keeps_prefix(tokens, finalize):  # the frames after the emitted ones only
            mel = self.model.token2mel_after_prefix(tokens, self.utt.speaker, self.run, self.device, finalize,
                                                    self.flow_state)
        else:
            mel = self.model.token2mel(tokens, self.utt.speaker, self.run, self.device, streaming=True,
                                       finalize=finalize)
            mel = mel[:, :, self.offset * r:]
        if self.causal:
            return self._causal(mel, finalize)
        return self._crossfaded(mel, finalize)

    def _causal(self, mel, finalize: bool) -> torch.Tensor:
        self.mel_all = mel if self.mel_all is None else torch.cat([self.mel_all, mel], dim=2)
        audio, _ = self.model.vocode(self.mel_all, self.run, self.generator, self.device)
        if not finalize:  # the causal vocoder's last 8 frames still wait for their look-ahead
            held = self.model.cfg.hift.stream_holdback_frames * self.hop_samples
            audio = audio[: max(audio.numel() - held, 0)]
        out = audio[self.emitted:]
        self.emitted += out.numel()
        return out

    def _crossfaded(self, mel, finalize: bool) -> torch.Tensor:
        overlap = self.cache_frames * self.hop_samples
        prefix = None
        if self.cache is not None:
            mel = torch.cat([self.cache[0], mel], dim=2)
            prefix = self.cache[1]
        audio, source = self.model.vocode(mel, self.run, self.generator, self.device, source_prefix=prefix)
        if self.cache is not None:
            window = torch.hamming_window(2 * overlap, periodic=False, dtype=audio.dtype, device=audio.device)
            head = audio[:overlap] * window[:overlap] + self.cache[2] * window[overlap:]
            audio = torch.cat([head, audio[overlap:]])
        if finalize:
            return audio
        self.cache = (mel[:, :, -self.cache_frames:], source[:, :, -overlap:], audio[-overlap:])
        return audio[:-overlap]


class OrpheusStream:
    window = 4  # frames per decoded window (28 tokens)

    def __init__(self, model, utt, run, generator, device):
        from models.sampling import device_generator
        from models.snac import FrameNoise

        self.model, self.utt, self.run, self.device = model, utt, run, torch.device(device)
        # the same noise per frame as an offline decode: only the window context differs
        self.noise = FrameNoise(model.snac_cfg, device_generator(generator, device), device)
        self.decoded_until = 0  # end (exclusive) of the last decoded window, in frames
        self.last = None  # that window's audio
        self.parser = CodeParser()  # the tokens parsed so far (each token once)

    def _codes(self, tokens: list[int]):
        self.parser.feed(tokens[self.parser.report.n_tokens:])
        return (*self.parser.codes(), self.parser.report)

    def _decode(self, c0, c1, c2, start: int, end: int) -> torch.Tensor:
        return self.model.decode_frames((c0, c1, c2), start, end, self.noise, self.run, self.device)

    def tokens_for_next_chunk(self) -> int:
        """How many tokens `push` needs at least before it returns the next chunk (every token an
        audio token; with others in between it needs more, and `push` then returns nothing)."""
        from models.snac import FRAME_TOKENS

        return max(self.decoded_until + 1, self.window) * FRAME_TOKENS

    def push(self, tokens: list[int]) -> list[torch.Tensor]:
        if max(self.decoded_until + 1, self.window) > self.parser.feed(tokens[self.parser.report.n_tokens:]).frames:
            return []  # no new window yet (the common case: decided without building tensors)
        c0, c1, c2, _ = self._codes(tokens)
        spf = self.model.snac_cfg.samples_per_frame
        out = []
        while c0.shape[1] >= max(self.decoded_until + 1, self.window):
            end = max(self.decoded_until + 1, self.window)
            audio = self._decode(c0, c1, c2, end - self.window, end)
            # the window's second frame; the very first window also gives its first frame
            out.append(audio[: 2 * spf] if self.last is None else audio[spf: 2 * spf])
            self.decoded_until, self.last = end, audio
        return out

    def finish(self, tokens: list[int]) -> list[torch.Tensor]:
        c0, c1, c2, report = self._codes(tokens)
        if not report.ok:
            self.utt.warnings.append(f"Orpheus tokens not decoded: {report.summary()}")
        out = self.push(tokens)
        spf = self.model.snac_cfg.samples_per_frame
        if self.last is not None:  # the last window's last two frames, which Orpheus itself never emits
            return out + [self.last[2 * spf:]]
        if c0.shape[1] == 0:
            return out
        return out + [self._decode(c0, c1, c2, 0, c0.shape[1])]  # shorter than one window: decode it whole
