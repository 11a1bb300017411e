"""What every model family provides to export and to the runtime.

A family object (CosyVoice2, CosyVoice3, Orpheus) is the only place that knows the family: its
graphs and their specs, the torch module behind each graph, the text front end, the LLM prompt and
sampling rules, and how speech tokens become audio. Export and the runtime are written against this
interface only; they never branch on the family.

`token2wav` and the LLM loop call graphs through a `run(graph_name, feed) -> outputs` callable the
runtime passes in, so the family decides *what* to run and the runtime decides *how*.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable

import torch

from models.errors import UserError
from models.spec import GraphSpec

RunFn = Callable[[str, dict], dict]


@dataclass
class Utterance:
    """One sentence after the front end, ready for the LLM."""

    text: str
    prompt_ids: list[int]  # LLM prompt in the model's input-id space
    text_tokens: int  # number of text tokens (drives upstream's min/max length rule)
    min_tokens: int
    max_tokens: int
    speaker: dict = field(default_factory=dict)  # family-specific conditioning tensors
    warnings: list = field(default_factory=list)  # problems found on the way (e.g. undecodable tokens)


class Sampler(abc.ABC):
    """Chooses the next token from last-position logits [V] (float32, on any device)."""

    @abc.abstractmethod
    def __call__(self, logits: torch.Tensor, history: list[int], step: int) -> int: ...


class TTSModel(abc.ABC):
    family: str = "abstract"
    sample_rate: int = 24000
    stages: tuple[str, ...] = ()

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
        """Construct a module with seeded random weights (presets) on the build device, without
        touching the global RNG. `offset` gives each component its own stream."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(getattr(self, "seed", 0) * 1000 + offset)
            with torch.device(getattr(self, "build_device", "cpu")):
                return build()

    def graphs_of(self, stage: str) -> list[str]:
        return [n for n, s in self.graph_specs().items() if s.stage == stage]

    def stage_graphs(self) -> dict[str, list[str]]:
        """The graphs a pipeline needs per stage (export may produce more, e.g. the estimator)."""
        return {s: self.graphs_of(s) for s in self.stages}

    def checkpoint_hashes(self) -> dict[str, str]:
        """sha256 of the weight files per stage (empty for random presets)."""
        return {}

    def describe(self) -> dict:
        return {"family": self.family, "name": self.name, "source": self.source,
                "random_weights": self.random_weights, "sample_rate": self.sample_rate}

    # -- front end --------------------------------------------------------------------------------
    @abc.abstractmethod
    def split_text(self, text: str) -> list[str]:
        """Normalise and split text into utterances; UserError on empty text."""

    @abc.abstractmethod
    def make_speaker(self, prompt_wav: str | None, prompt_text: str | None, voice: str | None = None) -> dict:
        """Speaker conditioning: a prompt recording (zero-shot cloning) or a named voice, or the
        family's default speaker when both are None. UserError for what the family cannot do."""

    @abc.abstractmethod
    def make_utterance(self, text: str, speaker: dict) -> Utterance: ...

    # -- LLM ----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def make_sampler(self, utt: Utterance, generator: torch.Generator, fixed_tokens: int | None) -> Sampler: ...

    @abc.abstractmethod
    def is_stop(self, token: int) -> bool: ...

    @abc.abstractmethod
    def next_input_id(self, token: int) -> int:
        """LLM input id that feeds a generated token back."""

    @abc.abstractmethod
    def llm_cache_shape(self) -> tuple[int, int, int]:
        """(layers, kv_heads, head_dim) of the LLM's KV cache."""

    # -- tokens -> audio ----------------------------------------------------------------------------
    @abc.abstractmethod
    def token2wav(self, tokens: list[int], utt: Utterance, run: RunFn, generator: torch.Generator,
                  device: torch.device, streaming: bool = False) -> torch.Tensor:
        """Audio [N] float32 for the generated tokens (`streaming`: with the model's streaming masks)."""

    def token2wav_batch(self, token_lists: list[list[int]], utts: list[Utterance], run: RunFn,
                        generator: torch.Generator, device: torch.device) -> list[torch.Tensor]:
        """Audio per request; families whose graphs batch unequal lengths exactly override this."""
        return [self.token2wav(t, u, run, generator, device) for t, u in zip(token_lists, utts)]

    @abc.abstractmethod
    def stream_decoder(self, utt: Utterance, run: RunFn, generator: torch.Generator, device: torch.device):
        """An object with `push(tokens) -> [audio chunks]` (called as tokens arrive) and
        `finish(tokens) -> [audio chunks]` (models/streaming.py)."""

    def token_rate(self) -> float:
        """Speech tokens per second of audio (for --tokens and RTF planning)."""
        return 25.0


def require_text(text: str | None) -> str:
    if text is None or not text.strip():
        raise UserError("the text to synthesize is empty.", "pass some words with --text")
    return text


def device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded from `generator` (CPU): per-call noise is then drawn where it is
    used instead of being drawn on the host and copied. On the CPU it is `generator` itself, so CPU
    runs keep upstream's exact random streams."""
    device = torch.device(device)
    if device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)
