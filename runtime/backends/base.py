"""The one interface every backend implements.

Like Polygraphy's runners: construction is cheap and loads nothing; `activate()` builds what is
needed (moves weights, creates sessions, deserialises engines, compiles); `infer(feed)` maps input
names to torch tensors and returns output names to torch tensors on the backend's device;
`metadata()` says what actually runs. The pipeline only ever calls these, so it never knows which
backend runs a stage.
"""

from __future__ import annotations

import abc

import torch

from models.spec import GraphSpec


class Backend(abc.ABC):
    kind = "abstract"

    def __init__(self, spec: GraphSpec, device: torch.device):
        self.spec = spec
        self.device = torch.device(device)
        self.active = False

    def activate(self) -> "Backend":
        if not self.active:
            self._activate()
            self.active = True
        return self

    def deactivate(self) -> None:
        self.active = False

    def infer(self, feed: dict[str, torch.Tensor], check: bool = True) -> dict[str, torch.Tensor]:
        """Run the graph. `check` validates the feed against the spec first (names, dtypes, dim
        ranges) so that a shape beyond an engine profile is a clear error, not a crash inside it."""
        if check:
            self.spec.check_feed(feed)
        self.activate()
        return self._infer(feed)

    @abc.abstractmethod
    def _activate(self) -> None: ...

    @abc.abstractmethod
    def _infer(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def metadata(self) -> dict:
        return {"kind": self.kind, "graph": self.spec.name, "device": str(self.device)}

    def decoder(self, layers: int, kv_heads: int, head_dim: int, batch: int = 1, max_len: int = 0) -> "LLMDecoder":
        """Generation state for the `llm` graph (see LLMDecoder)."""
        self.activate()
        return LLMDecoder(self, layers, kv_heads, head_dim, batch)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.name} on {self.device})"


class LLMDecoder:
    """Autoregressive state of one generation: `prefill(ids [B,S]) -> logits [B,V]`, then one
    `step(ids [B,1]) -> logits [B,V]` per token. This default drives any backend's `llm` graph with
    the explicit KV cache in and out (the cache grows by concatenation inside the graph); backends
    with a faster path (a static cache and a captured decode step) return their own from
    `Backend.decoder`."""

    def __init__(self, backend: Backend, layers: int, kv_heads: int, head_dim: int, batch: int = 1):
        self.backend = backend
        dev = backend.device
        self.keys = torch.zeros(layers, batch, kv_heads, 0, head_dim, device=dev)
        self.values = torch.zeros_like(self.keys)
        self.mask = torch.zeros(batch, 0, dtype=torch.int64, device=dev)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._run(input_ids, torch.ones_like(input_ids) if attention_mask is None else attention_mask)

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._run(input_ids, torch.ones_like(input_ids))

    def _run(self, ids: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, new_mask.to(self.mask.device)], dim=1)
        out = self.backend.infer({"input_ids": ids, "attention_mask": self.mask,
                                  "past_keys": self.keys, "past_values": self.values})
        self.keys, self.values = out["present_keys"], out["present_values"]
        return out["logits"]
