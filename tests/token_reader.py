"""Reads chosen token ids on the host without waiting for work queued after them (test helper)."""

from __future__ import annotations

import torch


class TokenReader:
    """`start(ids)` queues a copy into pinned memory and records an event; `wait()` blocks on that
    event only, so a caller can queue the next decode step before reading the token for its stop
    check (the step then runs while the host checks; one wasted step after the stop token)."""

    def __init__(self, batch: int, device):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.host = torch.zeros(batch, dtype=torch.int64, pin_memory=cuda)
        self.event = torch.cuda.Event() if cuda else None

    def start(self, ids: torch.Tensor) -> None:
        self.host.copy_(ids.reshape(-1), non_blocking=True)
        if self.event is not None:
            self.event.record()

    def wait(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()
