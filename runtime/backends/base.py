"""The one interface every backend implements.

Like Polygraphy's runners: construction is cheap and loads nothing; `activate()` builds what is
needed (moves weights, creates sessions, deserialises engines, compiles); `infer(feed)` maps input
names to torch tensors and returns output names to torch tensors on the backend's device;
`deactivate()` drops all of it so its memory is freed; `metadata()` says what actually runs. The
pipeline only ever calls these, so it never knows which backend runs a stage.

Two families of backends share helpers here:
- module backends (torch, compile) run the family's torch module; `cast_module` / `cast_input`
  apply the spec's fp32 islands the same way for every one of them;
- artifact backends (ort, trt, aoti) run a file from the manifest (`ArtifactBackend`): the spec they
  check feeds against is the artifact's own (its export limits), not the live model's.
"""

from __future__ import annotations

import abc
import gc
from dataclasses import dataclass
from typing import Callable

import torch

from models.errors import UserError
from models.spec import GraphSpec


class Backend(abc.ABC):
    kind = "abstract"

    def __init__(self, spec: GraphSpec, device: torch.device):
        self.spec = spec
        self.device = torch.device(device)
        self.active = False
        # give per-call scratch memory back to the device after every call instead of keeping it for
        # the next one: validation alternates torch and the candidate on one GPU, and the memory one
        # keeps at a large point is what the other lacks (backends with their own arena honour it)
        self.release_scratch = False

    def activate(self) -> "Backend":
        if not self.active:
            self._activate()
            self.active = True
        return self

    def deactivate(self) -> None:
        """Drop sessions, engines, compiled functions and device buffers (`_release`), then give the
        memory back to the device; the next `infer` activates again."""
        if self.active:
            self._release()
            self.active = False
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def check(self) -> None:
        """Load and prove the backend can run (a choice with fallbacks calls it at load time, so a
        backend that would fail on its first request is passed over instead). Default: activate."""
        self.activate()

    def infer(self, feed: dict[str, torch.Tensor], check: bool = True) -> dict[str, torch.Tensor]:
        """Run the graph. `check` validates the feed against the spec first (names, dtypes, dim
        ranges) so that a shape beyond an engine profile is a clear error, not a crash inside it. A call
        whose largest tensor would pass ELEMENTS_LIMIT runs as several calls of fewer rows."""
        sizes = self.spec.check_feed(feed) if check else self.spec.sizes_of(feed)
        self.activate()
        groups = self.spec.row_groups(sizes)
        if len(groups) == 1:
            return self._infer(feed)
        # a tensor past ELEMENTS_LIMIT (GraphSpec.largest): fewer rows per call (exact: rows are independent)
        return self.spec.join_rows([self._infer(self.spec.take_rows(feed, a, b)) for a, b in groups])

    @abc.abstractmethod
    def _activate(self) -> None: ...

    @abc.abstractmethod
    def _release(self) -> None:
        """Drop every reference to what `_activate` built."""

    @abc.abstractmethod
    def _infer(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def metadata(self) -> dict:
        return {"kind": self.kind, "graph": self.spec.name, "device": str(self.device)}

    def preferred_rows(self, n: int) -> int:
        """How many rows a caller batching n rows should send (padding with copies of a row); backends
        with one graph per shape round up to few sizes."""
        return n

    def warm_points(self, max_rows: int) -> list[dict[str, int]]:
        """Dim sizes (spec points) at which a first call compiles or captures something, one per shape
        bucket a caller sending up to `max_rows` rows can reach: a server calls them before it takes
        requests. Empty for backends whose first call at a new shape costs nothing extra."""
        return []

    # A shape met for the first time in service may cost a compile or a capture; backends that have
    # such shapes (compile, cudagraph) can run it uncompiled now and capture it later instead when a
    # serving engine sets `defer_new_shapes` (runtime/backends/compiled.py). Others have none.
    defer_new_shapes = False

    @property
    def deferred_shapes(self) -> int:
        return 0

    def capture_deferred(self, limit: int = 1) -> int:
        return 0

    def compiled(self, fn: Callable) -> Callable:
        """`fn` (a function of this graph's eager module that a family runs itself, e.g. CosyVoice3's
        prefix solve) as this backend runs such code: as it is here; compiled by the compile backend."""
        return fn

    def decoder(self, layers: int, kv_heads: int, head_dim: int, batch: int = 1, max_len: int = 0,
                call: Callable[[dict], dict] | None = None) -> "LLMDecoder":
        """Generation state for an autoregressive graph (see LLMDecoder). `call` runs one feed of
        the graph (default: this backend's `infer`); a pipeline passes its own to observe calls."""
        self.activate()
        return LLMDecoder(call or self.infer, self.device, layers, kv_heads, head_dim, batch)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.name} on {self.device})"


class LLMDecoder:
    """Autoregressive state of one generation: `prefill(ids [B,S]) -> logits [B,V]`, then one
    `step(ids [B,1]) -> logits [B,V]` per token. This default drives any backend's autoregressive
    graph with the explicit KV cache in and out (the cache grows by concatenation inside the graph);
    backends with a faster path (a static cache and a captured decode step) return their own from
    `Backend.decoder`."""

    def __init__(self, call: Callable[[dict], dict], device: torch.device, layers: int, kv_heads: int,
                 head_dim: int, batch: int = 1):
        self.call = call
        self.keys = torch.zeros(layers, batch, kv_heads, 0, head_dim, device=device)
        self.values = torch.zeros_like(self.keys)
        self.mask = torch.zeros(batch, 0, dtype=torch.int64, device=device)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._run(input_ids, torch.ones_like(input_ids) if attention_mask is None else attention_mask)

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._run(input_ids, torch.ones_like(input_ids))

    def _run(self, ids: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, new_mask.to(self.mask.device)], dim=1)
        out = self.call({"input_ids": ids, "attention_mask": self.mask, "past_keys": self.keys,
                         "past_values": self.values})
        self.keys, self.values = out["present_keys"], out["present_values"]
        return out["logits"]


# -- module backends: one precision rule --------------------------------------------------------------
def cast_module(module: torch.nn.Module, spec: GraphSpec, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move `module` to `device` (in place) and cast it to `dtype`, except the spec's fp32 islands
    (`spec.fp32_scopes`: child modules or tensors), which stay float32: the module's forward casts at
    their edges. Subtrees without an island are cast with `Module.to`, so modules that keep their
    own float32 tables through a cast (RoPE frequencies) still do; islands never round-trip through
    the low dtype."""
    module.to(device)
    if dtype != torch.float32:
        _cast_outside_islands(module, spec, dtype)
    return module


def _cast_outside_islands(module: torch.nn.Module, spec: GraphSpec, dtype: torch.dtype) -> None:
    if not _holds_island(module, spec):
        module.to(dtype)
        return
    for name, child in module.named_children():
        if not spec.in_fp32_scope(name):
            _cast_outside_islands(child, spec, dtype)
    for table in (module._parameters, module._buffers):
        for name, t in table.items():
            if t is not None and t.is_floating_point() and not spec.in_fp32_scope(name):
                if isinstance(t, torch.nn.Parameter):
                    t.data = t.data.to(dtype)
                else:
                    table[name] = t.to(dtype)


def _holds_island(module: torch.nn.Module, spec: GraphSpec) -> bool:
    names = [n for n, _ in module.named_modules()] + [n for n, _ in module.named_parameters()] + \
        [n for n, _ in module.named_buffers()]
    return any(spec.in_fp32_scope(n) for n in names if n)


def cast_input(spec: GraphSpec, name: str, x: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A feed tensor on `device` in the compute dtype (floating inputs outside `spec.fp32_inputs`)."""
    x = x.to(device, non_blocking=True)
    if x.is_floating_point() and name not in spec.fp32_inputs and x.dtype != dtype:
        x = x.to(dtype)
    return x


# -- artifact backends --------------------------------------------------------------------------------
class ArtifactBackend(Backend):
    """A backend that runs a file from the manifest (already hash-checked by the registry).

    `spec` is the artifact's own spec (the limits it was exported with); `graph_spec` is the live
    model's, and the two must agree on input and output names, or the file is refused with
    `rebuild` (the command that makes it again)."""

    # what the artifact's content computes in (the registry sets it from the manifest; a build that
    # was allowed to fall back records fp32 here for a file in the fp16 / int8 slot)
    precision_reached: str | None = None

    def __init__(self, spec: GraphSpec, device, path: str, built: dict, rebuild: str,
                 graph_spec: GraphSpec | None = None):
        super().__init__(spec, device)
        self.path = path
        self.built = built
        self.rebuild = rebuild
        if graph_spec is not None:
            names = lambda s: ([t.name for t in s.inputs], [t.name for t in s.outputs])  # noqa: E731
            if names(spec) != names(graph_spec):
                raise UserError(f"{path} was exported for other inputs/outputs than graph {graph_spec.name} has now.",
                                f"build it again: {rebuild}")

    def metadata(self) -> dict:
        m = {**super().metadata(), "file": self.path}
        if self.precision_reached:
            m["precision_reached"] = self.precision_reached
        return m


# -- the registry's entry per backend ---------------------------------------------------------------
@dataclass(frozen=True)
class BackendKind:
    """What the runtime needs to know about one backend, declared in the backend's own file.

    make: module backends (artifact None): make(model, spec, device, precision) -> Backend;
        artifact backends: the class, called as make(file_spec, device, path, built, rebuild, graph_spec).
    artifact: the manifest artifact kind it runs ("onnx", "pt2", "plan") or None.
    build_flags: what `python -m export build` needs to make that artifact ({device} is filled in).
    concurrent: whether several requests may call `infer` at the same time (else `serial_reason`)."""

    name: str
    precisions: tuple[str, ...]
    make: Callable
    doc: str
    artifact: str | None = None
    build_flags: str = ""
    concurrent: bool = True
    serial_reason: str = ""

    def rebuild_command(self, model_ref: str, precision: str, device: torch.device, engines_dir: str | None) -> str:
        """The command that (re)makes this backend's artifact for `model_ref` at `precision`."""
        out = f" --out-dir {engines_dir}" if engines_dir else ""
        if self.artifact == "onnx" and precision == "fp32":
            return f"python -m export onnx --model {model_ref}{out}"
        flags = self.build_flags.format(device=torch.device(device).type)
        return f"python -m export build --model {model_ref} --precision {precision}{flags}{out}"
