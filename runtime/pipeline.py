"""Text -> speech with one backend per graph.

The pipeline owns the generic parts: one backend per graph (runtime.backends), the autoregressive
loop over the family's LM graph, per-stage timing, and the real-time factor. Everything
family-specific (prompt format, sampling rule, tokens -> audio) is asked of the model object.

A Pipeline holds no per-request state: each request gets a `RequestRun` (stage timings, first-audio
time, tokens, warnings) and a `GraphCalls` bound to it, so several threads may run requests through
one pipeline when its backends allow concurrent calls (`BackendKind.concurrent`). What a caller
wants to see of a run (calibration recording graph inputs, progress per sentence) comes through an
explicit `PipelineObserver`.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from models.family import TTSModel, Utterance
from runtime.backends import KINDS, BackendChoice, Loaded, load_backend


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


def capped_warning(utt: Utterance, tokens: list[int], fixed_tokens: int | None) -> None:
    """Say so when generation stopped at the graphs' limit rather than at a stop token."""
    if fixed_tokens is None and utt.token_limit is not None and len(tokens) >= utt.max_tokens == utt.token_limit:
        utt.warnings.append(f"generation stopped at the {utt.token_limit}-token limit of this model's graphs, not at "
                            f"a stop token; the speech may be cut short (split the sentence)")


def request_generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """(sampling, noise) generators of a request. Two streams, so that how often token2wav draws
    noise (once offline, once per chunk when streaming) never changes the sampled tokens: the same
    seed gives the same tokens streamed or not."""
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 0x5EED_0000_0000)


class PipelineObserver:
    """What a caller may watch of a pipeline's runs; every method is a no-op here."""

    def graph_call(self, graph: str, feed: dict) -> None:
        """Before every graph call (the LM's explicit-cache calls included), with its feed."""

    def sentence(self, index: int, total: int) -> None:
        """When the request starts sentence `index` (0-based) of `total`."""


class RequestRun:
    """The state of one request: stage timings, start time, first audio, tokens, warnings."""

    def __init__(self, stages: tuple[str, ...]):
        self.stage_seconds = {s: 0.0 for s in stages}
        self.t0 = time.perf_counter()
        self.first: float | None = None
        self.tokens: list[list[int]] = []
        self.warnings: list[str] = []

    def audio_arrived(self) -> None:
        if self.first is None:
            self.first = time.perf_counter() - self.t0


class GraphCalls:
    """The `GraphRunner` a family calls graphs through during one request: runs the graph's backend,
    notifies the observer, and adds the (device-synchronised) time to the request's stage."""

    def __init__(self, pipe: "Pipeline", run: RequestRun):
        self.pipe, self.run = pipe, run
        self.options = pipe.options

    def __call__(self, graph: str, feed: dict) -> dict:
        with self.pipe.timed(self.run, self.pipe.stage_of[graph]):
            return self.pipe.call(graph, feed)

    def module(self, graph: str):
        """The eager module behind `graph` when its backend runs one as such (torch), else None (a
        compiled, captured or exported graph is not called around): for a family that keeps
        per-request state a graph's fixed inputs cannot carry (CosyVoice3's flow prefix)."""
        runner = self.pipe.runners.get(graph)
        eager = getattr(runner, "eager_module", None)
        return eager() if eager is not None else None

    def compiled(self, graph: str, fn):
        """`fn`, a function of `graph`'s eager module, as that graph's backend runs such code (compiled
        by the compile backend, as it is otherwise: `Backend.compiled`)."""
        return self.pipe.runners[graph].compiled(fn)

    def timed(self, graph: str):
        """Time a block that runs `graph`'s module directly, in that graph's stage."""
        return self.pipe.timed(self.run, self.pipe.stage_of[graph])

    def batched(self, graph: str, solve, item, size: int):
        """`solve([item])[0]`, timed in `graph`'s stage: a family's call that a serving engine batches
        across requests (`solve(items) -> results`, see models/family.py GraphRunner); one request
        here. `size` (the item's cost, e.g. frames) matters only to a batching caller."""
        with self.timed(graph):
            return solve([item])[0]

    # per-stream state (CosyVoice3's flow prefix) kept without a bound: one request at a time
    stream_state_budget = None


class Pipeline:
    def __init__(self, model: TTSModel, backends: str | dict | BackendChoice = "torch", device: str = "cpu",
                 engines_dir: str | None = None, precision: str = "fp32", options: dict | None = None,
                 observer: PipelineObserver | None = None, stages: tuple[str, ...] | None = None):
        """stages: load only these stages' backends (default every one); a serving engine that runs
        one side of a disaggregated placement loads the LM alone, or everything but the LM."""
        self.model = model
        self.device = torch.device(device)
        # sample speech tokens on the device (the logits never leave it; one host read per step for
        # the stop check) instead of on the host; a CPU pipeline gains nothing from it
        self.sample_on_device = self.device.type == "cuda"
        self.options = model.resolve_options(options)
        self.choice = BackendChoice.for_model(backends, model)
        self.observer = observer or PipelineObserver()
        specs = model.graph_specs()
        self.loaded: dict[str, Loaded] = {}
        for stage, graphs in model.stage_graphs(self.options).items():
            if stages is not None and stage not in stages:
                continue
            for g in graphs:
                self.loaded[g] = load_backend(self.choice.of(stage, g), model, specs[g], self.device, engines_dir,
                                              precision)
        self.runners = {g: x.backend for g, x in self.loaded.items()}
        self.stage_of = {g: specs[g].stage for g in self.runners}
        self.lm = model.lm
        # per graph, the largest size its bucketable dim has been called with: what a warm-up of
        # every shape up to a workload's lengths needs to know (Engine.warm_graphs)
        self.longest: dict[str, int] = {}
        self._longest_lock = threading.Lock()

    # -- backends ---------------------------------------------------------------------------------
    def activate(self) -> "Pipeline":
        for r in self.runners.values():
            r.activate()
        return self

    def deactivate(self) -> None:
        for r in self.runners.values():
            r.deactivate()

    @property
    def concurrent(self) -> bool:
        """Whether requests may run through this pipeline from several threads at once."""
        return all(KINDS[r.kind].concurrent for r in self.runners.values())

    def serial_reasons(self) -> list[str]:
        return sorted({KINDS[r.kind].serial_reason for r in self.runners.values() if not KINDS[r.kind].concurrent})

    def compile_seconds(self) -> float:
        """Seconds the backends spent compiling and capturing graphs so far (0 for those that do not)."""
        total = 0.0
        for r in self.runners.values():
            m = r.metadata()
            total += float(m.get("compile_seconds", 0.0)) + float(m.get("capture_seconds", 0.0))
        return total

    def describe_backends(self) -> str:
        """`stage=kind:precision` per stage (per graph where a stage's graphs run different ones), plus
        what a fallback chain passed over and why."""
        parts, notes = {}, []
        for g, x in self.loaded.items():
            parts.setdefault(self.stage_of[g], {})[g] = str(x.option)
            notes += [f"{g}: {o} passed over ({reason})" for o, reason in x.passed_over]
            reached = getattr(x.backend, "precision_reached", None)
            if reached == "fp32" and x.option.precision not in (None, "fp32"):
                # a build allowed to fall back put an fp32 file in this slot: say what really runs
                notes.append(f"{g}: {x.option} runs fp32 (its {x.option.precision} build fell back; see the manifest)")
        line = ", ".join(f"{s}={next(iter(k.values()))}" if len(set(k.values())) == 1
                         else ", ".join(f"{g}={o}" for g, o in k.items()) for s, k in parts.items())
        return line + "".join(f"\n  {n}" for n in notes)

    # -- graph calls --------------------------------------------------------------------------------
    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, run: RequestRun, stage: str, sync: bool = True):
        """Context manager adding the wall time of the block to `run`'s `stage`. sync=False for blocks
        that end in a host read anyway (a decode step ends when the host reads the sampled token):
        two extra device synchronisations per token would cost more than they measure."""
        return _Timed(self, run, stage, sync)

    def call(self, graph: str, feed: dict) -> dict:
        """One graph call, observed, untimed. A request below the graph's smallest size on its
        bucketable dim is padded up to it (exact: the spec's pad rule) and its outputs cut back."""
        self.observer.graph_call(graph, feed)
        runner = self.runners[graph]
        if runner.spec.pad is not None:
            n = runner.spec.sizes_of(feed)[runner.spec.pad.dim]
            if n > self.longest.get(graph, 0):
                with self._longest_lock:
                    self.longest[graph] = max(n, self.longest.get(graph, 0))
        feed, sizes = runner.spec.pad_to_min(feed)
        out = runner.infer(feed)
        return out if sizes is None else runner.spec.slice_outputs(out, sizes)

    @property
    def run(self) -> GraphCalls:
        """Graph calls outside any request (tests, benchmarks): timed into a throwaway run."""
        return GraphCalls(self, RequestRun(self.model.stages))

    def calls(self, run: RequestRun) -> GraphCalls:
        return GraphCalls(self, run)

    # -- LLM --------------------------------------------------------------------------------------
    def _decoder(self, batch: int, max_len: int):
        graph = self.lm.graph
        return self.runners[graph].decoder(*self.lm.cache_shape, batch=batch, max_len=max_len,
                                           call=lambda feed: self.call(graph, feed))

    def generate(self, utt: Utterance, generator: torch.Generator, fixed_tokens: int | None = None,
                 run: RequestRun | None = None) -> list[int]:
        """All speech tokens of one utterance."""
        return list(self.tokens(utt, generator, fixed_tokens, run))

    def tokens(self, utt: Utterance, generator: torch.Generator, fixed_tokens: int | None = None,
               run: RequestRun | None = None):
        """Speech tokens one at a time, as the LLM produces them. The LM stage time covers the decode
        steps and the sampling, measured per step so a streaming caller's flow and vocoder calls in
        between are not counted twice."""
        lm, dev = self.lm, self.device
        run = run or RequestRun(self.model.stages)
        stage = self.stage_of[lm.graph]
        steps = fixed_tokens if fixed_tokens is not None else utt.max_tokens
        with self.timed(run, stage):
            decoder = self._decoder(1, len(utt.prompt_ids) + steps)
            sampler = self.model.make_sampler(utt, generator, fixed_tokens)
            logits = decoder.prefill(torch.tensor([utt.prompt_ids], dtype=torch.int64, device=dev))
            pick = None
            if self.sample_on_device:
                # sample on the device: the logits never leave the GPU; reading the chosen id for the
                # stop check is the one host sync per token. Eager, not captured: capturing the sampler
                # failed inside full requests on the H200; its ~15 small kernels cost far less than a step
                vocab = self.runners[lm.graph].spec.outputs[0].shape[1]
                pick = sampler.to_device(vocab, dev, generator=generator)
        history: list[int] = []
        for step in range(steps):
            with self.timed(run, stage, sync=False):
                if pick is not None:
                    tok = pick(logits)
                    token = int(tok)
                else:
                    token = sampler(logits[0], history, step)  # the host sync per token: the stop check needs it
                stop = fixed_tokens is None and lm.is_stop(token)
                if not stop:
                    history.append(token)
                    if step + 1 < steps:
                        next_ids = (tok + lm.token_offset).view(1, 1) if pick is not None else \
                            torch.tensor([[lm.next_input_id(token)]], dtype=torch.int64, device=dev)
                        logits = decoder.step(next_ids)
            if stop:
                return
            yield token

    def generate_batch(self, utts: list[Utterance], generator: torch.Generator,
                       fixed_tokens: int | None = None, run: RequestRun | None = None) -> list[list[int]]:
        """Several utterances through one LLM batch: prompts left-padded (the attention mask hides the
        padding), one decode step for all rows per token, each row sampled by its own sampler and
        stopped by its own stop token or length limit (a finished row idles until all are done)."""
        lm, dev = self.lm, self.device
        run = run or RequestRun(self.model.stages)
        B = len(utts)
        steps = fixed_tokens if fixed_tokens is not None else max(u.max_tokens for u in utts)
        width = max(len(u.prompt_ids) for u in utts)
        ids = torch.zeros(B, width, dtype=torch.int64)
        mask = torch.zeros(B, width, dtype=torch.int64)
        for i, u in enumerate(utts):
            ids[i, width - len(u.prompt_ids):] = torch.tensor(u.prompt_ids)
            mask[i, width - len(u.prompt_ids):] = 1
        out: list[list[int]] = [[] for _ in utts]
        with self.timed(run, self.stage_of[lm.graph]):
            decoder = self._decoder(B, width + steps)
            samplers = [self.model.make_sampler(u, generator, fixed_tokens) for u in utts]
            logits = decoder.prefill(ids.to(dev), mask.to(dev))
            picks = None
            if self.sample_on_device:
                # each row's own device sampler, as `tokens` uses for one request (so one request gives
                # the same tokens either way); copying whole logits rows to the host and sampling there
                # cost Orpheus (156,940 logits per row) ~12 ms a token on an H100 (derived from two latencies)
                vocab = self.runners[lm.graph].spec.outputs[0].shape[1]
                picks = [s.to_device(vocab, dev, generator=generator) for s in samplers]
            done = [False] * B
            idle = lm.next_input_id(0)
            for step in range(steps):
                for i, u in enumerate(utts):
                    if not done[i] and fixed_tokens is None and step >= u.max_tokens:
                        done[i] = True
                live = [i for i in range(B) if not done[i]]
                if picks is not None:  # one host read per step for the whole batch
                    chosen = torch.cat([picks[i](logits[i:i + 1]).view(-1) for i in live]).tolist() if live else []
                    drawn = dict(zip(live, chosen))
                else:
                    host = logits.float().cpu()  # one sync per step for the whole batch
                feed = []
                for i, u in enumerate(utts):
                    if done[i]:
                        feed.append(idle)
                        continue
                    token = drawn[i] if picks is not None else samplers[i](host[i], out[i], step)
                    if fixed_tokens is None and lm.is_stop(token):
                        done[i] = True
                        feed.append(idle)
                        continue
                    out[i].append(token)
                    feed.append(lm.next_input_id(token))
                if all(done) or step + 1 == steps:
                    break
                logits = decoder.step(torch.tensor(feed, dtype=torch.int64, device=dev).view(B, 1))
        return out

    def synthesize_batch(self, texts: list[str], seed: int = 0, fixed_tokens: int | None = None,
                         voice: str | None = None) -> BatchResult:
        """Several requests sharing every stage's calls (up to the spec's batch limit per call)."""
        run = RequestRun(self.model.stages)
        generator, noise = request_generators(seed)
        speaker = self.model.make_speaker(None, None, voice)
        rows = [(k, self.model.make_utterance(s, speaker)) for k, text in enumerate(texts)
                for s in self.model.split_text(text, speaker)]
        limit = self.model.batch_limit(self.options)
        pieces: list[list[torch.Tensor]] = [[] for _ in texts]
        tokens: list[list[list[int]]] = [[] for _ in texts]
        calls = self.calls(run)
        for start in range(0, len(rows), limit):
            group = rows[start:start + limit]
            toks = self.generate_batch([u for _, u in group], generator, fixed_tokens, run)
            keep = [(k, u, t) for (k, u), t in zip(group, toks) if t]
            audio = self.model.token2wav_batch([t for _, _, t in keep], [u for _, u, _ in keep], calls, noise,
                                               self.device) if keep else []
            for (k, _, t), a in zip(keep, audio):
                pieces[k].append(a.float().cpu())
            for (k, _), t in zip(group, toks):
                tokens[k].append(t)
        self._sync()
        audios = [torch.cat(p) if p else torch.zeros(0) for p in pieces]
        return BatchResult(audios, self.model.sample_rate, dict(run.stage_seconds), time.perf_counter() - run.t0, tokens)

    # -- whole request ----------------------------------------------------------------------------
    def synthesize(self, text: str, prompt_wav: str | None = None, prompt_text: str | None = None,
                   voice: str | None = None, seed: int = 0, fixed_tokens: int | None = None,
                   speaker: dict | None = None) -> SynthesisResult:
        """The whole audio of a request. `speaker`: conditioning made beforehand (the family's
        `make_speaker` output), instead of prompt_wav / prompt_text / voice."""
        stream = self.stream(text, prompt_wav, prompt_text, voice, seed, fixed_tokens, speaker, _streaming=False)
        for _ in stream:
            pass
        return stream.result

    def stream(self, text: str, prompt_wav: str | None = None, prompt_text: str | None = None,
               voice: str | None = None, seed: int = 0, fixed_tokens: int | None = None,
               speaker: dict | None = None, _streaming: bool = True) -> "Stream":
        """Audio chunks (CPU float32 [n]) as soon as they exist: iterate the returned `Stream`; its
        `result` then holds the timings (with `first_chunk_seconds`), the tokens and the audio."""
        return Stream(self, text, prompt_wav, prompt_text, voice, seed, fixed_tokens, speaker, _streaming)


class Stream:
    """One request's audio chunks; `result` (a SynthesisResult) once they are all out."""

    def __init__(self, pipe: Pipeline, text, prompt_wav, prompt_text, voice, seed, fixed_tokens, speaker, streaming):
        self.result: SynthesisResult | None = None
        self._chunks = self._produce(pipe, text, prompt_wav, prompt_text, voice, seed, fixed_tokens, speaker, streaming)

    def __iter__(self):
        return self._chunks

    def _produce(self, pipe: Pipeline, text, prompt_wav, prompt_text, voice, seed, fixed_tokens, speaker, streaming):
        model, dev = pipe.model, pipe.device
        run = RequestRun(model.stages)
        calls = pipe.calls(run)
        generator, noise = request_generators(seed)
        model.split_text(text)  # empty text fails before a prompt recording is read
        if speaker is None:
            speaker = model.make_speaker(prompt_wav, prompt_text, voice)
        sentences = model.split_text(text, speaker)
        # every sentence checked before any work (limits of the graphs, a fixed token count)
        utts = [model.make_utterance(s, speaker) for s in sentences]
        for utt in utts:
            utt.check_fixed(fixed_tokens)
        pieces = []
        for index, utt in enumerate(utts):
            pipe.observer.sentence(index, len(sentences))
            tokens: list[int] = []
            if streaming:
                decoder = model.stream_decoder(utt, calls, noise, dev)
                for token in pipe.tokens(utt, generator, fixed_tokens, run):
                    tokens.append(token)
                    for chunk in decoder.push(tokens):
                        run.audio_arrived()
                        pieces.append(chunk.float().cpu())
                        yield pieces[-1]
                chunks = decoder.finish(tokens) if tokens else []
            else:
                tokens = pipe.generate(utt, generator, fixed_tokens, run)
                chunks = [model.token2wav(tokens, utt, calls, noise, dev)] if tokens else []
            for chunk in chunks:
                if chunk.numel():
                    run.audio_arrived()
                    pieces.append(chunk.float().cpu())
                    yield pieces[-1]
            run.tokens.append(tokens)
            capped_warning(utt, tokens, fixed_tokens)
            run.warnings += [f"sentence {len(run.tokens)}: {w}" for w in utt.warnings]
        pipe._sync()
        audio = torch.cat(pieces) if pieces else torch.zeros(0)
        self.result = SynthesisResult(audio, model.sample_rate, dict(run.stage_seconds),
                                      time.perf_counter() - run.t0, run.tokens, sentences, run.warnings, run.first)


class _Timed:
    def __init__(self, pipe: Pipeline, run: RequestRun, stage: str, sync: bool):
        self.pipe, self.run, self.stage, self.sync = pipe, run, stage, sync

    def __enter__(self):
        if self.sync:
            self.pipe._sync()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.sync:
            self.pipe._sync()
        self.run.stage_seconds[self.stage] += time.perf_counter() - self.t0
        return False
