"""CUDA-graph capture shared by the compiled backends and the static-cache decoder.

`capture(fn, args, ...)` warms a function up on a side stream (the first call compiles) and records
one call into a `torch.cuda.CUDAGraph` over static input buffers; replaying it re-runs the recorded
kernels with no Python and no launch overhead. `graph_mode` turns a backend's `cuda_graphs` option
into 'cuda', 'emulate' (the same static-buffer bookkeeping on the CPU, so tests exercise the host
logic without a GPU) or 'off'.
"""

from __future__ import annotations

import time

import torch
from torch.utils._pytree import tree_leaves, tree_map


def sync_if_cuda(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def graph_mode(cuda_graphs, device: torch.device) -> str:
    """'cuda', 'emulate' or 'off' from a backend's `cuda_graphs` option (None = 'cuda' on CUDA
    devices). 'emulate' (CPU tests): the same static-buffer bookkeeping, `replay` re-runs the
    function and copies its results into the static outputs."""
    if cuda_graphs is None:
        return "cuda" if device.type == "cuda" else "off"
    if cuda_graphs == "emulate":
        return "emulate"
    if cuda_graphs is True or cuda_graphs == "cuda":
        if device.type != "cuda":
            raise ValueError("cuda_graphs=True needs a CUDA device")
        return "cuda"
    if cuda_graphs is False or cuda_graphs == "off":
        return "off"
    raise ValueError(f"cuda_graphs must be None, True, False or 'emulate', got {cuda_graphs!r}")


class EmulatedGraph:
    """Stand-in for torch.cuda.CUDAGraph on the CPU: `replay()` calls fn(*static_args) and copies
    the results into the outputs captured first, so callers see the same buffers as with a real graph."""

    def __init__(self, fn, args, outputs):
        self.fn, self.args, self.outputs = fn, args, outputs

    def replay(self) -> None:
        for dst, src in zip(tree_leaves(self.outputs), tree_leaves(self.fn(*self.args))):
            dst.copy_(src)


def capture(fn, args, device: torch.device, mode: str, pool=None, warmup: int = 3, after_warmup=None):
    """Warm `fn(*args)` up and capture it: (graph, static outputs, first-call seconds, rest seconds).

    CUDA: `warmup` calls on a side stream (the first one compiles; timed separately), then
    `after_warmup()` (e.g. reset state the warm-up mutated), then one capture with torch.cuda.graph
    into `pool`. Emulated: one call, `after_warmup()`, outputs cloned as the static outputs."""
    t0 = time.perf_counter()
    if mode == "emulate":
        outs = fn(*args)
        t1 = time.perf_counter()
        if after_warmup is not None:
            after_warmup()
        outs = tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, outs)
        return EmulatedGraph(fn, args, outs), outs, t1 - t0, 0.0
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    t1 = t0
    with torch.cuda.stream(side):
        for i in range(max(warmup, 1)):
            fn(*args)
            if i == 0:
                torch.cuda.synchronize(device)
                t1 = time.perf_counter()
    torch.cuda.current_stream(device).wait_stream(side)
    if after_warmup is not None:
        after_warmup()
    graph = torch.cuda.CUDAGraph()
    # capture on the caller's own stream when it has one: a stream of a CUDA green context (the
    # engine's token2wav side with SMs reserved for the LM) confines the graph's kernels to its SMs
    # only when the graph is captured there; replayed on it after a capture on an ordinary side stream
    # they spread over every SM (measured: docs/serving.md). The default stream cannot capture.
    current = torch.cuda.current_stream(device)
    own = None if current == torch.cuda.default_stream(device) else current
    # thread_local: other threads of the process (a serving engine runs the LM and token2wav on
    # separate threads and streams) may keep launching work while this thread captures
    with torch.cuda.graph(graph, pool=pool, stream=own, capture_error_mode="thread_local"):
        outs = fn(*args)
    torch.cuda.synchronize(device)
    return graph, outs, t1 - t0, time.perf_counter() - t1
