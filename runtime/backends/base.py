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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.name} on {self.device})"
