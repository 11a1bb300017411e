"""Text -> speech with one backend per stage.

The pipeline owns the generic parts: one backend per graph, the autoregressive loop over the `llm`
graph with its explicit KV cache, per-stage timing, and the real-time factor. Everything
family-specific (prompt format, sampling rule, tokens -> audio) is asked of the model object.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from models.family import TTSModel, Utterance
from runtime.backends import create_backend, parse_backends, split_choice


@dataclass
class SynthesisResult:
    audio: torch.Tensor  # [N] float32 on the CPU
    sample_rate: int
    stage_seconds: dict[str, float]
    wall_seconds: float
    tokens: list[list[int]] = field(default_factory=list)  # generated speech tokens per utterance
    utterances: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def audio_seconds(self) -> float:
        return self.audio.numel() / self.sample_rate

    @property
    def rtf(self) -> float:
        return self.wall_seconds / max(self.audio_seconds, 1e-9)

    def summary(self) -> str:
        lines = []
        total = sum(self.stage_seconds.values()) or 1e-9
        for stage, sec in self.stage_seconds.items():
            lines.append(f"  {stage:<8} {sec * 1000:9.1f} ms  {100 * sec / total:5.1f} %")
        lines.append(f"  audio {self.audio_seconds:.2f} s, wall {self.wall_seconds * 1000:.1f} ms, "
                     f"{sum(len(t) for t in self.tokens)} speech tokens, RTF {self.rtf:.4f}")
        return "\n".join(lines)


class Pipeline:
    def __init__(self, model: TTSModel, backends: str | dict[str, str] = "torch", device: str = "cpu",
                 engines_dir: str | None = None, precision: str = "fp32"):
        self.model = model
        self.device = torch.device(device)
        self.choice = parse_backends(backends, model.stages)
        specs = model.graph_specs()
        self.runners = {}
        for stage, graphs in model.stage_graphs().items():
            for g in graphs:
                kind, prec = split_choice(self.choice[stage], precision)
                self.runners[g] = create_backend(kind, model, specs[g], self.device, engines_dir=engines_dir,
                                                 precision=prec)
        self._stage_of = {g: specs[g].stage for g in self.runners}
        self.stage_seconds: dict[str, float] = {s: 0.0 for s in model.stages}

    def activate(self) -> "Pipeline":
        for r in self.runners.values():
            r.activate()
        return self

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def _timed(self, stage: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.stage_seconds[stage] += time.perf_counter() - t0

    def run(self, graph: str, feed: dict) -> dict:
        with self._timed(self._stage_of[graph]):
            return self.runners[graph].infer(feed)

    # -- LLM --------------------------------------------------------------------------------------
    def generate(self, utt: Utterance, generator: torch.Generator, fixed_tokens: int | None = None) -> list[int]:
        """Autoregressive loop over the `llm` graph; the llm stage time includes sampling."""
        with self._timed("llm"):
            return self._generate(utt, generator, fixed_tokens)

    def _generate(self, utt: Utterance, generator: torch.Generator, fixed_tokens: int | None) -> list[int]:
        model, dev = self.model, self.device
        steps = fixed_tokens if fixed_tokens is not None else utt.max_tokens
        decoder = self.runners["llm"].decoder(*model.llm_cache_shape(), batch=1, max_len=len(utt.prompt_ids) + steps)
        sampler = model.make_sampler(utt, generator, fixed_tokens)
        logits = decoder.prefill(torch.tensor([utt.prompt_ids], dtype=torch.int64, device=dev))
        tokens: list[int] = []
        if dev.type == "cuda":
            # sample on the device: the logits never leave the GPU; reading the chosen id for the stop
            # check is the one host sync per token
            from runtime.llm_decode import device_sampler_for

            vocab = self.runners["llm"].spec.outputs[0].shape[1]
            pick = device_sampler_for(sampler, vocab, dev, generator, logits_buffer=getattr(decoder, "logits_out", None))
            offset = model.next_input_id(0)  # every family feeds a token back as token + offset
            for step in range(steps):
                tok = pick(logits)
                token = int(tok)
                if fixed_tokens is None and model.is_stop(token):
                    break
                tokens.append(token)
                if step + 1 < steps:
                    logits = decoder.step((tok + offset).view(1, 1))
            return tokens
        for step in range(steps):
            token = sampler(logits[0], tokens, step)  # the one host sync per token: the stop check needs it
            if fixed_tokens is None and model.is_stop(token):
                break
            tokens.append(token)
            if step + 1 < steps:
                logits = decoder.step(torch.tensor([[model.next_input_id(token)]], dtype=torch.int64, device=dev))
        return tokens

    # -- whole request ----------------------------------------------------------------------------
    def synthesize(self, text: str, prompt_wav: str | None = None, prompt_text: str | None = None,
                   voice: str | None = None, seed: int = 0, fixed_tokens: int | None = None) -> SynthesisResult:
        self.stage_seconds = {s: 0.0 for s in self.model.stages}
        generator = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        sentences = self.model.split_text(text)
        speaker = self.model.make_speaker(prompt_wav, prompt_text, voice)
        pieces, all_tokens, warnings = [], [], []
        for sentence in sentences:
            utt = self.model.make_utterance(sentence, speaker)
            tokens = self.generate(utt, generator, fixed_tokens)
            all_tokens.append(tokens)
            if tokens:
                pieces.append(self.model.token2wav(tokens, utt, self.run, generator, self.device).float().cpu())
            warnings += [f"sentence {len(all_tokens)}: {w}" for w in utt.warnings]
        self._sync()
        wall = time.perf_counter() - t0
        audio = torch.cat(pieces) if pieces else torch.zeros(0)
        return SynthesisResult(audio, self.model.sample_rate, dict(self.stage_seconds), wall, all_tokens, sentences, warnings)
