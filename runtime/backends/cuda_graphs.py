"""CUDA-graph capture shared by the compiled backends and the static-cache decoder.

`capture(fn, args, ...)` warms a function up on a side stream (the first call compiles) and records
one call into a `torch.cuda.CUDAGraph` over static input buffers; replaying it re-runs the recorded
kernels with no Python and no launch overhead. `graph_mode` turns a backend's `cuda_graphs` option
into 'cuda', 'emulate' (the same static-buffer bookkeeping on the CPU, so tests exercise the host
logic without a GPU) or 'off'.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import warnings
from collections import OrderedDict

import torch
from torch.utils._pytree import tree_leaves, tree_map


def sync_if_cuda(device: torch.device) -> None:
    """Wait for this thread's current stream, not the whole device: in a serving engine other
    threads keep long calls running on their own streams, and this thread need not wait for them
    (torch.cuda.graph still synchronizes the device when a capture begins)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


# Each thread captures on a stream of its own. Never the caller's current stream: an engine's
# request threads enqueue their input copies on the token2wav thread's stream, and a copy landing
# on a stream while it captures breaks the capture (seen on an H100: "operation not permitted when
# stream is capturing", then every later capture fails). Nor one stream shared by all threads
# (torch.cuda.graph's default): two threads capturing at once would record into each other's graph.
_capture_streams = threading.local()


@contextlib.contextmanager
def capture_stream(stream):
    """Graphs this thread captures inside go on `stream` (None: the thread's own side stream). A
    stream of a CUDA green context confines a graph's kernels to the context's SMs only when the
    graph is captured on a stream of that context (measured: docs/serving.md), so a thread that
    replays on a green stream captures on a second stream of the same context."""
    before = getattr(_capture_streams, "override", None)
    _capture_streams.override = stream
    try:
        yield
    finally:
        _capture_streams.override = before


def _thread_capture_stream(device: torch.device) -> torch.cuda.Stream:
    override = getattr(_capture_streams, "override", None)
    if override is not None:
        return override
    own = getattr(_capture_streams, "by_device", None)
    if own is None:
        own = _capture_streams.by_device = {}
    if device not in own:
        own[device] = torch.cuda.Stream(device)
    return own[device]


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

    CUDA: `warmup` calls on the thread's capture stream (the first one compiles; timed
    separately), then `after_warmup()` (e.g. reset state the warm-up mutated) on the caller's
    stream, then one capture with torch.cuda.graph into `pool` on the capture stream. Emulated: one
    call, `after_warmup()`, outputs cloned as the static outputs."""
    t0 = time.perf_counter()
    if mode == "emulate":
        outs = fn(*args)
        t1 = time.perf_counter()
        if after_warmup is not None:
            after_warmup()
        outs = tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, outs)
        return EmulatedGraph(fn, args, outs), outs, t1 - t0, 0.0
    # warm-up and capture on this thread's capture stream (see `capture_stream`), ordered after
    # the caller's work; the caller's stream then waits for it, and replays go on the caller's stream
    side = _thread_capture_stream(device)
    current = torch.cuda.current_stream(device)
    side.wait_stream(current)
    t1 = t0
    with torch.cuda.stream(side):
        for i in range(max(warmup, 1)):
            fn(*args)
            if i == 0:
                side.synchronize()
                t1 = time.perf_counter()
    current.wait_stream(side)
    if after_warmup is not None:
        after_warmup()
    side.wait_stream(current)
    graph = torch.cuda.CUDAGraph()
    # thread_local: other threads of the process (a serving engine runs the LM and token2wav on
    # separate threads and streams) may keep launching work while this thread captures
    with torch.cuda.graph(graph, pool=pool, stream=side, capture_error_mode="thread_local"):
        outs = fn(*args)
    current.wait_stream(side)
    side.synchronize()
    return graph, outs, t1 - t0, time.perf_counter() - t1


class CapturedFunction:
    """A function of a backend's module (a family runs it itself: CosyVoice3's prefix solve) replayed
    as one CUDA graph per call signature: the shapes and dtypes of its tensor arguments and the values
    of the others (the module, ints). The caller pads its calls to few signatures with `rows(n)` and
    `size(n)` (it knows which padding is exact; `fixed_shapes` tells it to).

    Static inputs come from one arena shared by every signature (calls are serialised by a lock, and
    a graph reads its inputs only while it replays), so a hundred signatures cost the largest call's
    inputs once, not a hundred times: a function that writes its results into an input (the prefix
    keys and values) and returns it adds no memory per signature either. A call whose inputs do not
    fit the arena runs as it is (such a call is large enough to keep the GPU busy without a graph), and
    so does every call after a capture that failed (a warning says why; `stats()["failed"]` keeps it).
    What a replay returns is the graph's static buffers: valid until the next call of this function
    (the caller copies what it keeps).

    `defer()` true (the owning backend's `defer_new_shapes`, read at each call): a signature met for the
    first time runs uncaptured and waits for `capture_deferred` (an idle engine) or its `capture_after`-th
    meeting (a run of calls with that signature), as the backend's own graphs do. A waiting signature
    keeps only its arguments' shapes and dtypes: its capture runs on zeros in the arena (a graph records
    kernels, not values; a replay copies the real inputs in), so a deferred call holds no copy of its
    inputs."""

    fixed_shapes = True

    def __init__(self, fn, device: torch.device, mode: str, size, pool=None, arena_bytes: int = 2 << 30,
                 max_graphs: int = 256, defer=None, capture_after: int = 3):
        """size: the backend's bucket rule for lengths (n -> padded n)."""
        self.fn, self.device, self.mode, self.pool = fn, device, mode, pool
        self._defer = defer or (lambda: False)
        self.capture_after = capture_after
        self._deferred: OrderedDict = OrderedDict()  # signature -> [argument template, uncaptured calls]
        self.deferred_calls = 0
        self._last_key = None
        self.arena_bytes, self.max_graphs = arena_bytes, max_graphs
        self._bucket = size
        self.__name__ = getattr(fn, "__name__", "captured")
        self._arena: torch.Tensor | None = None
        self._graphs: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.captures = self.replays = self.uncaptured_calls = self.evictions = 0
        self.capture_seconds = 0.0
        self.failed: str | None = None  # why a capture failed (then every call runs uncaptured)

    def rows(self, n: int) -> int:
        """Rows a call of n runs as: the next power of two."""
        return 1 << max(n - 1, 0).bit_length()

    def size(self, n: int) -> int:
        """A padded length of n (the backend's bucket rule)."""
        return self._bucket(n)

    @staticmethod
    def _aligned(nbytes: int) -> int:
        return -(-nbytes // 256) * 256

    def _signature(self, args) -> tuple:
        return tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else ("value", id(a) if isinstance(a, torch.nn.Module) else a)
                     for a in args)

    def _static(self, args) -> list:
        """The arguments' static copies, carved from the arena (tensors; a `_Template` gives zeros) or
        as they are (the rest)."""
        if self._arena is None:
            self._arena = torch.empty(self.arena_bytes, dtype=torch.uint8, device=self.device)
        out, offset = [], 0
        for a in args:
            if isinstance(a, (torch.Tensor, _Template)):
                n = a.numel() * a.element_size()
                view = self._arena[offset: offset + n].view(a.dtype).view(a.shape)
                view.copy_(a) if isinstance(a, torch.Tensor) else view.zero_()
                out.append(view)
                offset += self._aligned(n)
            else:
                out.append(a)
        return out

    def _capture(self, key, static: list):
        """Capture fn over `static` as `key`'s graph: its outputs, or None when the capture failed (said
        once; every later call then runs uncaptured). Called under the lock."""
        if self.mode == "cuda":
            torch.cuda.synchronize(self.device)
        try:
            graph, outs, first, rest = capture(self.fn, static, self.device, self.mode, self.pool, warmup=1)
        except Exception as e:  # noqa: BLE001 - said loudly and kept in stats(); the calls go on uncaptured
            first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            self.failed = f"{type(e).__name__}: {first_line}"
            warnings.warn(f"{self.__name__} could not be captured as a CUDA graph ({self.failed}); it runs "
                          "uncaptured from now on", RuntimeWarning, stacklevel=3)
            self._graphs.clear()
            self._deferred.clear()
            self._arena = None
            return None
        self.captures += 1
        self.capture_seconds += first + rest
        self._graphs[key] = (graph, static, outs)
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
            self.evictions += 1
        return outs

    @property
    def deferred_shapes(self) -> int:
        """Signatures run uncaptured and not yet captured (see `defer`)."""
        return len(self._deferred)

    def capture_deferred(self, limit: int = 1) -> int:
        """Capture up to `limit` deferred signatures, oldest first; how many were captured."""
        done = 0
        with self._lock, torch.inference_mode():
            while self._deferred and done < limit and self.failed is None:
                key, (template, _) = self._deferred.popitem(last=False)
                if key not in self._graphs and self._capture(key, self._static(template)) is not None:
                    done += 1
        return done

    def __call__(self, *args):
        need = sum(self._aligned(a.numel() * a.element_size()) for a in args if isinstance(a, torch.Tensor))
        if self.mode == "off" or need > self.arena_bytes or self.failed is not None:
            self.uncaptured_calls += 1
            return self.fn(*args)
        key = self._signature(args)
        with self._lock, torch.inference_mode():  # the arena and the graphs' buffers are inference tensors
            entry = self._graphs.get(key)
            # a caller's run of calls with one signature (the 10 Euler steps of one flow round) is one
            # meeting of it, so `capture_after` counts rounds, not calls
            same_run, self._last_key = key == self._last_key, key
            if entry is None and self._defer():
                waiting = self._deferred.get(key)
                if waiting is None or same_run or waiting[1] + 1 < self.capture_after:
                    if waiting is None:
                        waiting = self._deferred[key] = [[_Template.of(a) if isinstance(a, torch.Tensor) else a
                                                          for a in args], 0]
                    waiting[1] += 0 if same_run else 1
                    self.deferred_calls += 1
                    return self.fn(*args)
                del self._deferred[key]  # met often enough: it is worth the stall now
            if entry is None:
                outs = self._capture(key, self._static(args))
                if outs is None:
                    self.uncaptured_calls += 1
                    return self.fn(*args)
                return outs
            self._graphs.move_to_end(key)
            graph, static, outs = entry
            for dst, src in zip(static, args):
                if isinstance(src, torch.Tensor):
                    dst.copy_(src)
            graph.replay()
            self.replays += 1
            return outs

    def stats(self) -> dict:
        return {"graphs": len(self._graphs), "captures": self.captures, "replays": self.replays,
                "uncaptured_calls": self.uncaptured_calls, "evictions": self.evictions,
                "deferred_calls": self.deferred_calls, "deferred_shapes": len(self._deferred),
                "capture_seconds": round(self.capture_seconds, 3), "failed": self.failed,
                "arena_bytes": 0 if self._arena is None else self.arena_bytes}

    def release(self) -> None:
        with self._lock:
            self._graphs.clear()
            self._deferred.clear()
            self._arena = None


class _Template:
    """A tensor argument's shape and dtype, all a deferred capture needs of it."""

    def __init__(self, shape, dtype: torch.dtype):
        self.shape, self.dtype = tuple(shape), dtype

    @classmethod
    def of(cls, t: torch.Tensor) -> "_Template":
        return cls(t.shape, t.dtype)

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()
