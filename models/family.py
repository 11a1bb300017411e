"""What every model family provides to export and to the runtime.

A family object (CosyVoice2, CosyVoice3, Orpheus) is the only place that knows the family: its
graphs and their specs, the torch module behind each graph, the text front end, the LLM prompt and
sampling rules, and how speech tokens become audio. Export and the runtime are written against this
interface only and ask it for capabilities; they never branch on the family or on a graph's name:

- `lm` (SpeechLM): which graph is the autoregressive LM, its cache shape, how a sampled token is fed
  back, which tokens stop; `make_sampler` gives a per-request sampler with a device twin.
- `graph_specs()`: every graph's shapes plus what backends need (bucketable dim, fp32 islands, rows
  per request, the part to compile); `batch_limit()` follows from them.
- `options`: per-pipeline choices the family offers (e.g. the flow layout), validated by
  `resolve_options` and passed to the family with every call through the runner.
- `synthetic_tokens` / `graph_sizes`: benchmark inputs in the family's own token layout.

`token2wav` and the stream decoders call graphs through a `GraphRunner` the runtime passes in
(`run(graph_name, feed) -> outputs`, plus `run.options`), so the family decides *what* to run and
the runtime decides *how*.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Protocol

import torch

from models.errors import UserError
from models.sampling import Sampler
from models.spec import GraphSpec


class GraphRunner(Protocol):
    """How a family calls graphs: `run(graph, feed) -> outputs` (torch tensors by spec name), and
    the pipeline's resolved `options` (see `TTSModel.options`). The runtime's runners also offer
    `module(graph)` (the eager module behind a graph, or None), `compiled(graph, fn)` (a function of
    that module as the graph's backend runs such code: compiled, or as it is), `timed(graph)` (a block timed in the
    graph's stage), `batched(graph, solve, item, size) -> result` (a call a serving engine batches
    with other requests' items: `solve(items) -> results`, one per item; a single request runs
    `solve([item])`) and `stream_state_budget` (None, or a `runtime.engine.StateBudget` that bounds
    the bytes streams keep between their chunks)."""

    options: dict

    def __call__(self, graph: str, feed: dict) -> dict: ...


@dataclass(frozen=True)
class SpeechLM:
    """What a runtime needs to drive a family's autoregressive speech LM.

    graph: the LM graph (spec.autoregressive); layers / kv_heads / head_dim: its KV cache;
    token_offset: a sampled logit index t is fed back as input id t + token_offset;
    stop_tokens: the sampled indices that end a generation."""

    graph: str
    layers: int
    kv_heads: int
    head_dim: int
    token_offset: int
    stop_tokens: range

    @property
    def cache_shape(self) -> tuple[int, int, int]:
        return self.layers, self.kv_heads, self.head_dim

    def is_stop(self, token: int) -> bool:
        return token in self.stop_tokens

    def next_input_id(self, token: int) -> int:
        return token + self.token_offset


@dataclass
class Utterance:
    """One sentence after the front end, ready for the LLM."""

    text: str
    prompt_ids: list[int]  # LLM prompt in the model's input-id space
    text_tokens: int  # number of text tokens (drives upstream's min/max length rule)
    min_tokens: int
    max_tokens: int  # the most speech tokens it may generate (the family's rule, within token_limit)
    speaker: dict = field(default_factory=dict)  # family-specific conditioning tensors
    warnings: list = field(default_factory=list)  # problems found on the way (e.g. undecodable tokens)
    token_limit: int | None = None  # what the graphs can take at all (LM context, one flow call)

    def check_fixed(self, fixed_tokens: int | None) -> None:
        """A fixed token count (benchmarks) beyond what the graphs take is refused before any work."""
        if fixed_tokens is not None and fixed_tokens < 1:  # 0 would read as "no fixed count" in places
            raise UserError(f"--tokens {fixed_tokens} is not a positive count.", "pass --tokens 1 or more", param="tokens")
        if fixed_tokens is not None and self.token_limit is not None and fixed_tokens > self.token_limit:
            raise UserError(f"--tokens {fixed_tokens} is more than the {self.token_limit} speech tokens this model "
                            f"takes for one sentence here (the limit of its graphs).",
                            f"pass --tokens {self.token_limit} or fewer", param="tokens")


class TTSModel(abc.ABC):
    family: str = "abstract"
    sample_rate: int = 24000
    stages: tuple[str, ...] = ()
    # per-pipeline choices: option name -> allowed values, the first being the default
    options: dict[str, tuple[str, ...]] = {}

    def __init__(self, name: str, source: str, random_weights: bool):
        self.name = name  # preset name or folder name
        self.source = source  # where weights came from: a folder path or "preset:<name>"
        self.random_weights = random_weights

    # -- graphs -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def graph_specs(self) -> dict[str, GraphSpec]:
        """Every exportable graph, keyed by name; spec.stage says which stage it belongs to."""

    @abc.abstractmethod
    def graph_module(self, name: str) -> torch.nn.Module:
        """The eager torch module of graph `name`; forward takes the spec inputs in order."""

    def seeded_build(self, build, offset: int):
        """Construct a module with seeded random weights (presets), without touching the global RNG,
        and move it to the build device. `offset` gives each component its own stream.

        The weights are always drawn on the CPU: CUDA's generator gives other numbers for the same
        seed, so a preset drawn on the GPU would be another model than the one exported, validated and
        calibrated on the CPU under the same name and seed (and the same fingerprint). Drawing the 3B
        Orpheus LM on the CPU costs seconds at load; a model that is not the artifacts' costs the
        meaning of every comparison."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(getattr(self, "seed", 0) * 1000 + offset)
            with torch.device("cpu"):
                module = build()
        return module.to(getattr(self, "build_device", torch.device("cpu")))

    def graphs_of(self, stage: str) -> list[str]:
        return [n for n, s in self.graph_specs().items() if s.stage == stage]

    def stage_graphs(self, options: dict | None = None) -> dict[str, list[str]]:
        """The graphs a pipeline with these options calls, per stage (export may produce more)."""
        return {s: self.graphs_of(s) for s in self.stages}

    def resolve_options(self, options: dict | None = None) -> dict:
        """Every option of the family with its value: the given ones checked, the rest defaulted."""
        given = {k: v for k, v in (options or {}).items() if v is not None}
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            offered = f"it offers {', '.join(self.options)}" if self.options else "it has no options"
            raise UserError(f"{self.name} ({self.family}) has no option {', '.join(unknown)}; {offered}.",
                            f"leave out {', '.join(unknown)}")
        out = {}
        for name, allowed in self.options.items():
            value = given.get(name, allowed[0])
            if value not in allowed:
                raise UserError(f"unknown {name} {value!r}.", f"choose one of {', '.join(allowed)}")
            out[name] = value
        return out

    def batch_limit(self, options: dict | None = None) -> int:
        """Requests one call of every graph a pipeline uses can take (from the specs)."""
        specs = self.graph_specs()
        return min(specs[g].max_requests for graphs in self.stage_graphs(options).values() for g in graphs)

    def checkpoint_hashes(self) -> dict[str, str]:
        """sha256 of the weight files per stage (empty for random presets)."""
        return {}

    # -- what an artifact is bound to -------------------------------------------------------------
    def stage_sources(self, stage: str) -> tuple[dict[str, str], object]:
        """What the graphs of `stage` compute with: ({name in the model folder: path} of the weight
        and config files the stage reads (empty for random presets), the stage's module config)."""
        raise NotImplementedError(f"{type(self).__name__} does not say what its {stage} stage is made from")

    def provenance(self, graph: str) -> dict:
        """The facts an exported artifact of `graph` is bound to: family, graph, the stage's module
        config and the graph spec (digests), and the weights: preset name and seed for random
        presets, the sha256 of every file the stage reads for model folders. Anything that changes
        what the graph computes changes one of them (files are named relative to the model folder,
        so a moved folder still matches)."""
        spec = self.graph_specs()[graph]
        files, config = self.stage_sources(spec.stage)
        facts = {"family": self.family, "graph": graph, "config": _digest(repr(config)), "spec": _digest(spec.to_json())}
        if files:
            facts["files"] = {name: _file_sha256(path) for name, path in sorted(files.items())}
        else:
            facts.update(preset=self.name, seed=int(getattr(self, "seed", 0)))
        return facts

    def fingerprint(self, graph: str) -> str:
        """sha256 of `provenance(graph)`: an artifact made from the same weights, config and spec has
        the same fingerprint, and the runtime refuses one whose fingerprint differs."""
        return provenance_fingerprint(self.provenance(graph))

    def describe(self) -> dict:
        return {"family": self.family, "name": self.name, "source": self.source,
                "random_weights": self.random_weights, "sample_rate": self.sample_rate}

    # -- front end --------------------------------------------------------------------------------
    @abc.abstractmethod
    def split_text(self, text: str, speaker: dict | None = None) -> list[str]:
        """Normalise and split text into utterances; UserError on empty text. With `speaker`, each
        utterance also leaves room for what that speaker adds to the LM prompt (a cloned voice's
        transcript and speech tokens): a long prompt makes shorter sentences, not failed requests."""

    @abc.abstractmethod
    def make_speaker(self, prompt_wav: str | None, prompt_text: str | None, voice: str | None = None) -> dict:
        """Speaker conditioning: a prompt recording (zero-shot cloning) or a named voice, or the
        family's default speaker when both are None. UserError for what the family cannot do."""

    @abc.abstractmethod
    def make_utterance(self, text: str, speaker: dict) -> Utterance: ...

    def named_voices(self) -> tuple[str, ...]:
        """Voices `make_speaker(None, None, voice)` knows by name (besides the default speaker)."""
        return ()

    @property
    def zero_shot(self) -> bool:
        """Whether `make_speaker` can clone a voice from a prompt recording (and its transcript)."""
        return False

    # -- LLM ----------------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def lm(self) -> SpeechLM: ...

    @abc.abstractmethod
    def make_sampler(self, utt: Utterance, generator: torch.Generator, fixed_tokens: int | None) -> Sampler:
        """The request's sampler (host side; `sampler.to_device(...)` gives its device twin)."""

    # -- tokens -> audio ----------------------------------------------------------------------------
    @abc.abstractmethod
    def token2wav(self, tokens: list[int], utt: Utterance, run: GraphRunner, generator: torch.Generator,
                  device: torch.device, streaming: bool = False) -> torch.Tensor:
        """Audio [N] float32 for the generated tokens (`streaming`: with the model's streaming masks)."""

    def token2wav_batch(self, token_lists: list[list[int]], utts: list[Utterance], run: GraphRunner,
                        generator: torch.Generator, device: torch.device) -> list[torch.Tensor]:
        """Audio per request; families whose graphs batch unequal lengths exactly override this."""
        return [self.token2wav(t, u, run, generator, device) for t, u in zip(token_lists, utts)]

    @abc.abstractmethod
    def stream_decoder(self, utt: Utterance, run: GraphRunner, generator: torch.Generator, device: torch.device):
        """An object with `push(tokens) -> [audio chunks]` (called as tokens arrive),
        `finish(tokens) -> [audio chunks]` and `tokens_for_next_chunk()` (how many tokens the next
        chunk waits for; models/streaming.py)."""

    def token_rate(self) -> float:
        """Speech tokens per second of audio (for --tokens and RTF planning)."""
        return 25.0

    # -- benchmark inputs -----------------------------------------------------------------------------
    @abc.abstractmethod
    def synthetic_tokens(self, n: int, generator: torch.Generator) -> list[int]:
        """About `n` generated speech tokens that decode to audio (benchmarks without an LLM run)."""

    @abc.abstractmethod
    def graph_sizes(self, graph: str, tokens: int, batch: int = 1) -> dict[str, int]:
        """Dim sizes of `graph` for `batch` requests of `tokens` speech tokens each (unclipped)."""


def require_text(text: str | None) -> str:
    if text is None or not text.strip():
        raise UserError("the text to synthesize is empty.", "pass some words with --text")
    return text


def provenance_fingerprint(facts: dict) -> str:
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# (real path, size, mtime) -> sha256: a multi-GB checkpoint is hashed once per process, not once per
# graph; an edited file has a new mtime or size, so it is hashed again
_FILE_DIGESTS: dict[tuple, str] = {}


def _file_sha256(path: str) -> str:
    from models.checkpoint import sha256_file

    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        _FILE_DIGESTS[key] = sha256_file(path)
    return _FILE_DIGESTS[key]
