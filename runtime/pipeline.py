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
    first_chunk_seconds: float | None = None  # time to the first audio (streaming: the first chunk)

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
        if self.first_chunk_seconds is not None:
            lines.append(f"  first audio after {self.first_chunk_seconds * 1000:.1f} ms")
        return "\n".join(lines)


@dataclass
class BatchResult:
    audios: list[torch.Tensor]  # one per request
    sample_rate: int
    stage_seconds: dict[str, float]
    wall_seconds: float
    tokens: list[list[list[int]]]

    @property
    def audio_seconds(self) -> float:
        return sum(a.numel() for a in self.audios) / self.sample_rate

    @property
    def rtf(self) -> float:
        return self.wall_seconds / max(self.audio_seconds, 1e-9)


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
    def _timed(self, stage: str, sync: bool = True):
        """Add the wall time of the block to `stage`. sync=False for blocks that end in a host read
        anyway (a decode step ends when the host reads the sampled token): two extra device
        synchronisations per token would cost more than they measure."""
        if sync:
            self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                self._sync()
            self.stage_seconds[stage] += time.perf_counter() - t0

    def run(self, graph: str, feed: dict) -> dict:
        with self._timed(self._stage_of[graph]):
            return self.runners[graph].infer(feed)

    # -- LLM --------------------------------------------------------------------------------------
    def generate(self, utt: Utterance, generator: torch.Generator, fixed_tokens: int | None = None) -> list[int]:
        """All speech tokens of one utterance."""
        return list(self.tokens(utt, generator, fixed_tokens))

    def tokens(self, utt: Utterance, generator: torch.Generator, fixed_tokens: int | None = None):
        """Speech tokens one at a time, as the LLM produces them. The llm stage time covers the decode
        steps and the sampling, measured per step so a streaming caller's flow and vocoder calls in
        between are not counted twice."""
        model, dev = self.model, self.device
        steps = fixed_tokens if fixed_tokens is not None else utt.max_tokens
        with self._timed("llm"):
            decoder = self.runners["llm"].decoder(*model.llm_cache_shape(), batch=1,
                                                  max_len=len(utt.prompt_ids) + steps)
            sampler = model.make_sampler(utt, generator, fixed_tokens)
            logits = decoder.prefill(torch.tensor([utt.prompt_ids], dtype=torch.int64, device=dev))
            pick = None
            if dev.type == "cuda":
                # sample on the device: the logits never leave the GPU; reading the chosen id for the
                # stop check is the one host sync per token
                from runtime.llm_decode import device_sampler_for

                vocab = self.runners["llm"].spec.outputs[0].shape[1]
                # eager on the device: capturing the sampler in a CUDA graph failed inside full requests on
                # the H200 (capture invalidated); its ~15 small kernels cost far less than a decode step
                pick = device_sampler_for(sampler, vocab, dev, generator, compile=False, cuda_graph=False)
                offset = model.next_input_id(0)  # every family feeds a token back as token + offset
        history: list[int] = []
        for step in range(steps):
            with self._timed("llm", sync=False):
                if pick is not None:
                    tok = pick(logits)
                    token = int(tok)
                else:
                    token = sampler(logits[0], history, step)  # the host sync per token: the stop check needs it
                stop = fixed_tokens is None and model.is_stop(token)
                if not stop:
                    history.append(token)
                    if step + 1 < steps:
                        next_ids = (tok + offset).view(1, 1) if pick is not None else \
                            torch.tensor([[model.next_input_id(token)]], dtype=torch.int64, device=dev)
                        logits = decoder.step(next_ids)
            if stop:
                return
            yield token

    def generate_batch(self, utts: list[Utterance], generator: torch.Generator,
                       fixed_tokens: int | None = None) -> list[list[int]]:
        """Several utterances through one LLM batch: prompts left-padded (the attention mask hides the
        padding), one decode step for all rows per token, each row sampled by its own sampler and
        stopped by its own stop token or length limit (a finished row idles until all are done)."""
        model, dev = self.model, self.device
        B = len(utts)
        steps = fixed_tokens if fixed_tokens is not None else max(u.max_tokens for u in utts)
        width = max(len(u.prompt_ids) for u in utts)
        ids = torch.zeros(B, width, dtype=torch.int64)
        mask = torch.zeros(B, width, dtype=torch.int64)
        for i, u in enumerate(utts):
            ids[i, width - len(u.prompt_ids):] = torch.tensor(u.prompt_ids)
            mask[i, width - len(u.prompt_ids):] = 1
        out: list[list[int]] = [[] for _ in utts]
        with self._timed("llm"):
            decoder = self.runners["llm"].decoder(*model.llm_cache_shape(), batch=B, max_len=width + steps)
            samplers = [model.make_sampler(u, generator, fixed_tokens) for u in utts]
            logits = decoder.prefill(ids.to(dev), mask.to(dev))
            done = [False] * B
            idle = model.next_input_id(0)
            for step in range(steps):
                host = logits.float().cpu()  # one sync per step for the whole batch
                feed = []
                for i, u in enumerate(utts):
                    if not done[i] and fixed_tokens is None and step >= u.max_tokens:
                        done[i] = True
                    if done[i]:
                        feed.append(idle)
                        continue
                    token = samplers[i](host[i], out[i], step)
                    if fixed_tokens is None and model.is_stop(token):
                        done[i] = True
                        feed.append(idle)
                        continue
                    out[i].append(token)
                    feed.append(model.next_input_id(token))
                if all(done) or step + 1 == steps:
                    break
                logits = decoder.step(torch.tensor(feed, dtype=torch.int64, device=dev).view(B, 1))
        return out

    def synthesize_batch(self, texts: list[str], seed: int = 0, fixed_tokens: int | None = None,
                         voice: str | None = None) -> "BatchResult":
        """Several requests sharing every stage's calls (up to the spec's batch limit per call)."""
        self.stage_seconds = {s: 0.0 for s in self.model.stages}
        generator = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        speaker = self.model.make_speaker(None, None, voice)
        rows = [(k, self.model.make_utterance(s, speaker)) for k, text in enumerate(texts) for s in self.model.split_text(text)]
        limit = min(spec.dim("B").max for name, spec in self.model.graph_specs().items()
                    if name in self.runners and name != "flow_estimator")
        pieces: list[list[torch.Tensor]] = [[] for _ in texts]
        tokens: list[list[list[int]]] = [[] for _ in texts]
        for start in range(0, len(rows), limit):
            group = rows[start:start + limit]
            toks = self.generate_batch([u for _, u in group], generator, fixed_tokens)
            keep = [(k, u, t) for (k, u), t in zip(group, toks) if t]
            audio = self.model.token2wav_batch([t for _, _, t in keep], [u for _, u, _ in keep], self.run, generator,
                                               self.device) if keep else []
            for (k, _, t), a in zip(keep, audio):
                pieces[k].append(a.float().cpu())
            for (k, _), t in zip(group, toks):
                tokens[k].append(t)
        self._sync()
        audios = [torch.cat(p) if p else torch.zeros(0) for p in pieces]
        return BatchResult(audios, self.model.sample_rate, dict(self.stage_seconds), time.perf_counter() - t0, tokens)

    # -- whole request ----------------------------------------------------------------------------
    def synthesize(self, text: str, prompt_wav: str | None = None, prompt_text: str | None = None,
                   voice: str | None = None, seed: int = 0, fixed_tokens: int | None = None) -> SynthesisResult:
        pieces = []
        result = None
        for chunk in self._run(text, prompt_wav, prompt_text, voice, seed, fixed_tokens, stream=False):
            if isinstance(chunk, SynthesisResult):
                result = chunk
            else:
                pieces.append(chunk)
        result.audio = torch.cat(pieces) if pieces else torch.zeros(0)
        return result

    def stream(self, text: str, prompt_wav: str | None = None, prompt_text: str | None = None,
               voice: str | None = None, seed: int = 0, fixed_tokens: int | None = None):
        """Audio chunks (CPU float32 [n]) as soon as they exist; `last_result` then holds the timings
        (with `first_chunk_seconds`) and the tokens."""
        self.last_result = None
        pieces = []
        for chunk in self._run(text, prompt_wav, prompt_text, voice, seed, fixed_tokens, stream=True):
            if isinstance(chunk, SynthesisResult):
                chunk.audio = torch.cat(pieces) if pieces else torch.zeros(0)
                self.last_result = chunk
            else:
                pieces.append(chunk)
                yield chunk

    def _run(self, text, prompt_wav, prompt_text, voice, seed, fixed_tokens, stream: bool):
        self.stage_seconds = {s: 0.0 for s in self.model.stages}
        generator = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        first = None
        sentences = self.model.split_text(text)
        speaker = self.model.make_speaker(prompt_wav, prompt_text, voice)
        all_tokens, warnings = [], []
        for sentence in sentences:
            utt = self.model.make_utterance(sentence, speaker)
            tokens: list[int] = []
            if stream:
                decoder = self.model.stream_decoder(utt, self.run, generator, self.device)
                for token in self.tokens(utt, generator, fixed_tokens):
                    tokens.append(token)
                    for chunk in decoder.push(tokens):
                        first = first if first is not None else time.perf_counter() - t0
                        yield chunk.float().cpu()
                chunks = decoder.finish(tokens) if tokens else []
            else:
                tokens = self.generate(utt, generator, fixed_tokens)
                chunks = [self.model.token2wav(tokens, utt, self.run, generator, self.device)] if tokens else []
            for chunk in chunks:
                if chunk.numel():
                    first = first if first is not None else time.perf_counter() - t0
                    yield chunk.float().cpu()
            all_tokens.append(tokens)
            warnings += [f"sentence {len(all_tokens)}: {w}" for w in utt.warnings]
        self._sync()
        wall = time.perf_counter() - t0
        yield SynthesisResult(torch.zeros(0), self.model.sample_rate, dict(self.stage_seconds), wall, all_tokens,
                              sentences, warnings, first)
