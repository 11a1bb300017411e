"""`--backend compile`: torch.compile (inductor) + CUDA graphs + optional bf16/fp16, per graph.

Upstream is launch-bound: every kernel waits on Python. This backend removes that overhead with
inductor fusion and, on CUDA, by replaying each graph as one captured CUDA graph.

Life cycle (as every backend, see `runtime.backends.base`): construction is cheap; `activate()` moves
the module to the device and dtype (in place, as TorchBackend does, unless `copy_module=True`: a
model object shared with another backend in the same process then keeps its fp32 weights; the llm
decoder also re-lays q/k/v and gate/up weights back to back, values unchanged) and wraps it with
`torch.compile`; compilation happens lazily at the first call of each new shape, CUDA graphs are
captured lazily per shape key.

Everything graph-specific comes from the spec the family declares (models/spec.py); nothing here
knows a graph or a family:
  * Precision. `dtype` (float32 | bfloat16 | float16) is the dtype of weights and activations; graph
    inputs and outputs keep the spec's dtypes and are cast at the boundary. `spec.fp32_scopes`
    (modules / buffers) and `spec.fp32_inputs` stay float32 ("fp32 islands": e.g. the flow solver's
    Euler state and schedule, HiFT's f0 predictor, source and (i)STFT); the modules cast at their
    edges themselves, and their docstrings say why each island exists.
  * Shape keys (one compiled specialisation and one CUDA graph per key). `spec.pad` names the one
    dim that may be padded up to a bucket (inputs padded with the rule's fills, outputs sliced back);
    the family declares it only where padding provably leaves the valid region unchanged, and
    tests/test_compiled.py checks each case numerically (padded vs exact). Bucket rule
    (`bucket_size`): n <= 16 -> 16; otherwise round up to a multiple of 2**(floor(log2(n-1)) - 2),
    i.e. four buckets per octave and at most 25 % padding (100 -> 112, 1000 -> 1024), capped at the
    dim's max. Every other dim (the batch dim, the vocoders' frames) runs at exact shapes: one graph
    per input shape, at most `max_graphs`, least recently used evicted. Every graph compiles with
    torch.compile's automatic dynamic shapes (`dynamic=None`: the first shape static, the dims that
    change later through one dynamic recompile), so a new bucket or batch costs a CUDA graph capture,
    not a compile: a serving engine sees tens of (batch, length) keys per graph, and one static
    compile each would take minutes to warm up. `dynamic=False` compiles every key statically (best
    kernels, one compile per key). `preferred_rows` rounds a batch up to a power of two, so a batching
    caller reuses a few graphs.
  * What is compiled: the whole module, or only `spec.compiled_part` (the flow solver's estimator:
    the 10-step Euler loop around it runs as plain torch ops, all captured into the same CUDA graph,
    and compile time is that of one estimator, not of ten inlined copies).
  * Autoregressive graphs (`spec.autoregressive`): `infer` (explicit cache, shapes change every
    call) runs the module eagerly in `dtype`; the fast path is `decoder()`, a static-cache decoder
    with one captured graph per decode step (runtime/backends/static_cache.py), one per (batch, cache
    length rounded up to a power of two >= 1024).

CUDA graphs (`cuda_graphs`, default on for CUDA devices): per shape key, warm up `warmup` times on a
side stream (the first call compiles), then capture with `torch.cuda.graph` into static input buffers
(allocated outside the graph pool) and static outputs; all graphs of a backend share one memory pool.
A call copies (and pads) the inputs into the static buffers, replays, and returns COPIES of the
outputs (sliced to the valid region, cast to the spec dtype). Copies, not views: the static outputs
are overwritten by the next replay of the same graph and, because the pool is shared, possibly by
another graph's intermediates; callers (token2wav, the Euler host loop in per-step mode) hold
outputs across later calls. The copy is one device kernel per output.

Compilation cost is reported in `metadata()`: compile_seconds (first call at each new shape key,
which includes compilation), capture_seconds (the remaining warm-up calls and the captures).

What runs compiled is checked, not assumed: dynamo falls back to eager silently in two ways, and each
becomes a fact or an error. A graph break (fullgraph=False) splits the graph and runs the code between
the pieces eagerly: counted per backend (`metadata()["graph_breaks"]`, with the first reasons, and
`"compiled": "partly"`) and warned about once. Hitting the recompile limit would run that call (and
later ones) eagerly: our calls run with `fail_on_recompile_limit_hit`, so it is a UserError instead.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from models.errors import UserError
from models.spec import DTYPES, PRECISION_DTYPES, GraphSpec, dtype_name
from runtime.backends.base import Backend, BackendKind, cast_input, cast_module
from runtime.backends.cuda_graphs import CapturedFunction, capture, graph_mode

# dynamo's config is one per process, and the engine calls compiled graphs from several threads at once: a
# per-call `config.patch` restored by whichever call leaves first would switch the check off under another
# call still compiling (and leave it on for good when the calls interleave the other way). So the first
# call in sets it and the last one out restores it.
_limit_lock = threading.Lock()
_limit_users = 0
_limit_saved = None


@contextlib.contextmanager
def _fail_on_recompile_limit():
    global _limit_users, _limit_saved
    cfg = torch._dynamo.config
    if not hasattr(cfg, "fail_on_recompile_limit_hit"):
        yield
        return
    with _limit_lock:
        if _limit_users == 0:
            _limit_saved = cfg.fail_on_recompile_limit_hit
            cfg.fail_on_recompile_limit_hit = True
        _limit_users += 1
    try:
        yield
    finally:
        with _limit_lock:
            _limit_users -= 1
            if _limit_users == 0:
                cfg.fail_on_recompile_limit_hit = _limit_saved

def bucket_size(n: int, minimum: int = 16) -> int:
    """Round n up to its bucket: `minimum` for n <= minimum, else a multiple of
    2**(floor(log2(n-1)) - 2) (four buckets per octave, at most 25 % padding)."""
    if n <= minimum:
        return minimum
    granule = 1 << max(int(math.floor(math.log2(n - 1))) - 2, 0)
    return -(-n // granule) * granule


def _with_compiled_part(module: nn.Module, part: str, compiled: nn.Module) -> nn.Module:
    """A shallow copy of `module` whose child `part` is `compiled`: the same parameters and
    buffers, its own table of children, so the model object (which other backends may share)
    keeps its plain child."""
    shell = copy.copy(module)
    shell._modules = dict(module._modules)
    shell._modules[part] = compiled
    return shell


@dataclass
class _Captured:
    graph: object
    inputs: list
    outputs: tuple


class CompiledBackend(Backend):
    kind = "compile"

    def __init__(self, spec: GraphSpec, device, module_factory, dtype=torch.float32, cuda_graphs: bool | None = None,
                 buckets: bool = True, max_graphs: int = 256, compile_backend: str = "inductor",
                 compile_mode: str | None = None, dynamic: bool | None | str = "auto", warmup: int = 3,
                 fullgraph: bool = False, compile_options: dict | None = None, decoder_options: dict | None = None,
                 copy_module: bool = False):
        """dtype: compute dtype (a torch dtype or its spec name, e.g. "bfloat16"; the spec's fp32
        islands stay float32). cuda_graphs: None = on for CUDA devices.
        buckets: pad the spec's bucketable dim (spec.pad) or use exact shapes everywhere. max_graphs: LRU cap
        on captured graphs. compile_backend / compile_mode: torch.compile's backend and mode
        (compile_backend=None: no torch.compile, CUDA graphs of the eager module only; with CUDA
        graphs use a mode without inductor cudagraphs: None, 'default', 'max-autotune-no-cudagraphs').
        dynamic: 'auto' (None: torch.compile's automatic dynamic shapes) or torch.compile's own value. compile_options: torch.compile `options` (inductor config; not with compile_mode).
        cuda_graphs="emulate": the CUDA-graph bookkeeping on the CPU (tests).
        decoder_options: extra StaticCacheDecoder kwargs for `decoder()`. copy_module: work on a deep
        copy of the factory's module (the model object keeps its device, dtype and weight layout;
        costs a second copy of the weights), instead of moving / casting it in place."""
        super().__init__(spec, device)
        self._factory = module_factory
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compile backend dtype must be float32, bfloat16 or float16, got {dtype}")
        if self.device.type == "cuda" and self.device.index is None and torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.graph_mode = graph_mode(cuda_graphs, self.device)
        self.cuda_graphs = self.graph_mode != "off"
        if self.graph_mode == "cuda" and compile_mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"compile_mode {compile_mode!r} adds inductor's own CUDA graphs inside ours; use "
                             "'default' or 'max-autotune-no-cudagraphs', or cuda_graphs=False")
        self.rule = spec.pad if buckets else None
        self.max_graphs = max_graphs
        self.compile_backend = compile_backend
        self.compile_mode = compile_mode
        self.dynamic = None if dynamic == "auto" else dynamic
        self.warmup_calls = max(int(warmup), 1)
        self.fullgraph = fullgraph
        self.compile_options = dict(compile_options) if compile_options else None
        self.decoder_options = dict(decoder_options or {})
        self.copy_module = copy_module
        self.module: nn.Module | None = None
        self._fn = None
        self._graphs: OrderedDict = OrderedDict()
        self._seen_keys: set = set()
        self._pool = None
        self._decoders: OrderedDict = OrderedDict()
        self._functions: dict = {}  # compiled(fn) per function
        self._functions_lock = threading.Lock()  # compiled() is called from request threads
        # the static inputs of every signature of a captured function share one arena of this size
        # (runtime.backends.cuda_graphs.CapturedFunction); larger calls run eagerly
        self.capture_arena_bytes = 2 << 30 if self.graph_mode == "cuda" else 64 << 20
        self.compile_seconds = 0.0
        self.capture_seconds = 0.0
        self.evictions = 0
        self.graph_breaks = 0
        self.break_reasons: list[str] = []
        # defer_new_shapes (set by a serving engine once warmed up): a shape key met for the first time
        # runs on the eager module now and is captured later (`capture_deferred`, when the caller is
        # idle, or at its `capture_after`-th call), so one listener's new length does not stall every
        # stream behind a compile and `torch.cuda.graph`'s device-wide wait
        self.defer_new_shapes = False
        self.capture_after = 3
        self._deferred: OrderedDict = OrderedDict()  # key -> [prepared inputs (own copies), eager calls]
        self._eager_calls = 0

    # -- activation -------------------------------------------------------------------------------
    def _compile(self, fn):
        if self.compile_backend is None:
            return fn
        kw = {} if self.compile_mode is None else {"mode": self.compile_mode}
        if self.compile_options:
            kw["options"] = dict(self.compile_options)
        return torch.compile(fn, backend=self.compile_backend, dynamic=self.dynamic, fullgraph=self.fullgraph, **kw)

    @contextlib.contextmanager
    def _watched(self):
        """Around every call that may compile: count graph breaks (parts that run eagerly) and turn
        dynamo's silent eager fallback at the recompile limit into an error."""
        if self.compile_backend is None:
            yield
            return
        from torch._dynamo.utils import counters

        before = dict(counters["graph_break"])
        cfg = torch._dynamo.config
        try:
            with _fail_on_recompile_limit():
                yield
        except Exception as e:
            if type(e).__name__ != "FailOnRecompileLimitHit":
                raise
            limit = getattr(cfg, "recompile_limit", getattr(cfg, "cache_size_limit", "?"))
            raise UserError(f"torch.compile reached its recompile limit ({limit}) on graph {self.spec.name}: this "
                            f"call would run eagerly, not compiled.",
                            f"run stage {self.spec.stage} with fewer distinct shapes, or choose --backend "
                            f"{self.spec.stage}=torch") from None
        finally:
            new = {k: v - before.get(k, 0) for k, v in counters["graph_break"].items() if v > before.get(k, 0)}
            if new:
                self.graph_breaks += sum(new.values())
                first_time = not self.break_reasons
                for reason in new:
                    line = reason.strip().splitlines()[0][:160] if reason.strip() else "?"
                    if line not in self.break_reasons and len(self.break_reasons) < 5:
                        self.break_reasons.append(line)
                if first_time:
                    warnings.warn(f"compile backend: graph {self.spec.name} has graph breaks, so parts of it run eagerly "
                                  f"({self.break_reasons[0]})", RuntimeWarning, stacklevel=2)

    def _activate(self) -> None:
        if self.compile_backend is not None:
            # one static compile per bucket / decoder: keep dynamo from falling back to eager after 8
            cfg = torch._dynamo.config
            name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
            setattr(cfg, name, max(getattr(cfg, name), 64))
        module = self._factory()
        if self.copy_module:
            module = copy.deepcopy(module)
        # fp32 islands (spec.fp32_scopes) keep float32 weights; the module casts at their edges
        self.module = cast_module(module, self.spec, self.device, self.dtype).eval()
        if self.spec.autoregressive:
            self._fn = self.module  # explicit-cache calls stay eager; decoder() is the fast path
            return
        part = self.spec.compiled_part
        if part is not None:
            self._fn = _with_compiled_part(self.module, part, self._compile(getattr(self.module, part)))
        else:
            self._fn = self._compile(self.module)
        if self.graph_mode == "cuda":
            self._pool = torch.cuda.graph_pool_handle()

    def eager_module(self):
        """The cast module without compilation or graphs (activated), for callers that run it their own
        way (CosyVoice3's flow prefix); `compiled(fn)` compiles their functions of it."""
        return self.module

    # modes whose CUDA graphs would hand out outputs that the next replay overwrites: a function's
    # outputs here are kept by its caller (the flow prefix's keys and values), so never those
    _NO_CUDAGRAPH_MODES = {"reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs"}

    def compiled(self, fn):
        """`fn` compiled with this backend's torch.compile settings (backend, options, fullgraph; the
        mode without its CUDA graphs) and dynamic shapes (its callers' shapes change every call: rows,
        new frames, kept frames); cached per function; graph breaks and the recompile limit are
        watched as for the graph itself."""
        if self.compile_backend is None:
            if not self.cuda_graphs:
                return fn
            # the cudagraph backend: replayed as one CUDA graph per padded call signature
            with self._functions_lock:
                if fn not in self._functions:
                    # the serving engine's new-shape policy holds for these graphs as for the module's
                    self._functions[fn] = CapturedFunction(fn, self.device, self.graph_mode, bucket_size, self._pool,
                                                           arena_bytes=self.capture_arena_bytes,
                                                           defer=lambda: self.defer_new_shapes,
                                                           capture_after=self.capture_after)
                return self._functions[fn]
        with self._functions_lock:  # two request threads must not compile the same function twice
            if fn not in self._functions:
                mode = self._NO_CUDAGRAPH_MODES.get(self.compile_mode, self.compile_mode)
                # torch.compile takes a mode or options, not both (the constructor allows one of them)
                kw = {"options": dict(self.compile_options)} if self.compile_options else \
                    ({} if mode is None else {"mode": mode})
                inner = torch.compile(fn, backend=self.compile_backend, dynamic=True, fullgraph=self.fullgraph, **kw)

                def watched(*args, **kwargs):
                    with self._watched():
                        return inner(*args, **kwargs)

                self._functions[fn] = watched
            return self._functions[fn]

    def _release(self) -> None:
        # graphs first (they hold the pool's memory), then the decoders' caches, then the module
        self._functions.clear()
        self._graphs.clear()
        self._deferred.clear()
        self._decoders.clear()
        self._fn = self.module = self._pool = None

    def check(self) -> None:
        """Compile (and capture) at the spec's opt point now, so a compile failure shows at load."""
        if self.spec.autoregressive:
            self.activate()
        else:
            self.warmup()

    # -- shapes -----------------------------------------------------------------------------------
    def preferred_rows(self, n: int) -> int:
        """A batch of n rows runs as the next power of two (capped at the spec's max): one graph per
        bucket instead of one per batch size."""
        if "B" not in {d.name for d in self.spec.dims}:
            return n
        return max(min(1 << max(n - 1, 0).bit_length(), self.spec.dim("B").max), n)

    def warm_points(self, max_rows: int) -> list[dict[str, int]]:
        """Every (batch bucket, bucket of the padded dim) pair, the other dims at their opt size (a dim
        that is neither batch nor padded takes the exact shape of each call, so it cannot be listed)."""
        names = {d.name for d in self.spec.dims}
        rows = [None]
        if "B" in names:
            b = self.spec.dim("B")
            rows = sorted({self.preferred_rows(n) for n in range(b.min, max(min(max_rows, b.max), b.min) + 1)})
        if self.rule is None:
            lengths = [None]
        else:
            d = self.spec.dim(self.rule.dim)
            lengths = sorted({self.padded_sizes({d.name: n})[d.name] for n in range(d.min, d.max + 1)})
        points = []
        for b in rows:
            for n in lengths:
                p = {}
                if b is not None:
                    p["B"] = b
                if n is not None:
                    p[self.rule.dim] = n
                points.append(p)
        return points

    def padded_sizes(self, sizes: dict[str, int]) -> dict[str, int]:
        """The dim sizes a request with `sizes` runs at (bucketed dim rounded up, capped at its max)."""
        if self.rule is None:
            return dict(sizes)
        d = self.spec.dim(self.rule.dim)
        out = dict(sizes)
        out[d.name] = max(min(bucket_size(sizes[d.name]), d.max), sizes[d.name])
        return out

    def _prepare(self, feed: dict, padded: dict[str, int]) -> list[torch.Tensor]:
        """Inputs on the device, in the compute dtype, padded to the shape key (eager / compiled path)."""
        args = []
        for t in self.spec.inputs:
            x = cast_input(self.spec, t.name, feed[t.name], self.device, self.dtype)
            want = self.spec.shape_of(t, padded)
            if tuple(x.shape) != want:
                fill = self.rule.fill.get(t.name, 0) if self.rule else 0
                y = torch.full(want, fill, dtype=x.dtype, device=x.device)
                y[tuple(slice(0, n) for n in x.shape)] = x
                x = y
            args.append(x)
        return args

    def _key(self, feed: dict, padded: dict[str, int]) -> tuple:
        return tuple((self.spec.shape_of(t, padded), self._in_dtype(t.name, feed[t.name])) for t in self.spec.inputs)

    def _in_dtype(self, name: str, x: torch.Tensor) -> torch.dtype:
        return self.dtype if x.is_floating_point() and name not in self.spec.fp32_inputs else x.dtype

    def _fill_static(self, entry: "_Captured", feed: dict) -> None:
        """Write a request into a graph's static inputs: one copy (with the dtype cast) per input, plus
        one fill of the padded tail along each padded axis (the tail may hold an earlier, longer
        request of the same bucket)."""
        for t, static in zip(self.spec.inputs, entry.inputs):
            x = feed[t.name]
            if tuple(x.shape) == tuple(static.shape):
                static.copy_(x, non_blocking=True)
                continue
            static[tuple(slice(0, n) for n in x.shape)].copy_(x, non_blocking=True)
            fill = self.rule.fill.get(t.name, 0) if self.rule else 0
            for axis, (n, m) in enumerate(zip(x.shape, static.shape)):
                if n != m:
                    static.narrow(axis, n, m - n).fill_(fill)

    def _finish(self, outs, sizes: dict[str, int], copy: bool) -> dict[str, torch.Tensor]:
        if isinstance(outs, torch.Tensor):
            outs = (outs,)
        result = {}
        for t, o in zip(self.spec.outputs, outs):
            want = self.spec.shape_of(t, sizes)
            if tuple(o.shape) != want:
                o = o[tuple(slice(0, n) for n in want)]
            dtype = DTYPES[t.dtype]
            if o.dtype != dtype:
                o = o.to(dtype)  # a new tensor already
            elif copy:
                o = o.clone(memory_format=torch.contiguous_format)
            result[t.name] = o
        return result

    # -- running ----------------------------------------------------------------------------------
    def _infer(self, feed):
        sizes = self.spec.sizes_of(feed)
        padded = self.padded_sizes(sizes)
        with torch.inference_mode():
            if self.spec.autoregressive or not self.cuda_graphs:
                args = self._prepare(feed, padded)
                key = tuple(tuple(a.shape) for a in args)
                first = key not in self._seen_keys and not self.spec.autoregressive and self.compile_backend is not None
                t0 = time.perf_counter()
                with self._watched() if not self.spec.autoregressive else contextlib.nullcontext():
                    outs = self._fn(*args)
                if first:
                    self._seen_keys.add(key)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    self.compile_seconds += time.perf_counter() - t0
                return self._finish(outs, sizes, copy=False)
            key = self._key(feed, padded)
            entry = self._graphs.get(key)
            if entry is None and self.defer_new_shapes:
                args = self._prepare(feed, padded)
                waiting = self._deferred.get(key)
                if waiting is None or waiting[1] + 1 < self.capture_after:
                    if waiting is None:
                        waiting = self._deferred[key] = [[a.clone() for a in args], 0]
                    waiting[1] += 1
                    self._eager_calls += 1
                    return self._finish(self.module(*args), sizes, copy=False)
                del self._deferred[key]  # met often enough: it is worth the stall now
                entry = self._capture(key, args)
            elif entry is None:
                entry = self._capture(key, self._prepare(feed, padded))
            else:
                self._graphs.move_to_end(key)
                self._fill_static(entry, feed)
            entry.graph.replay()
            return self._finish(entry.outputs, sizes, copy=True)

    def _capture(self, key, args: list[torch.Tensor]) -> _Captured:
        # own copies (a feed tensor may be the caller's), allocated outside the graph pool
        static = [a.clone(memory_format=torch.contiguous_format) for a in args]
        if self.graph_mode == "cuda":
            torch.cuda.synchronize(self.device)
        with self._watched():
            graph, outs, first, rest = capture(self._fn, static, self.device, self.graph_mode, self._pool,
                                               self.warmup_calls)
        if key in self._seen_keys:  # re-capture after eviction: nothing was compiled
            self.capture_seconds += first + rest
        else:
            self.compile_seconds += first
            self.capture_seconds += rest
            self._seen_keys.add(key)
        entry = _Captured(graph, static, outs if isinstance(outs, tuple) else (outs,))
        self._graphs[key] = entry
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
            self.evictions += 1
        return entry

    def _captured_functions(self) -> list:
        return [f for f in list(self._functions.values()) if isinstance(f, CapturedFunction)]

    @property
    def deferred_shapes(self) -> int:
        """Shape keys run eagerly and not yet captured (see `defer_new_shapes`), the captured
        functions' signatures included."""
        return len(self._deferred) + sum(f.deferred_shapes for f in self._captured_functions())

    @property
    def deferred_calls(self) -> int:
        """Calls run eagerly because their shape was deferred (module and captured functions)."""
        return self._eager_calls + sum(f.deferred_calls for f in self._captured_functions())

    def capture_deferred(self, limit: int = 1) -> int:
        """Capture up to `limit` deferred shape keys, the module's oldest first, then the captured
        functions'; returns how many."""
        done = 0
        with torch.inference_mode():
            while self._deferred and done < limit:
                key, (args, _) = self._deferred.popitem(last=False)
                if key not in self._graphs:
                    self._capture(key, args)
                    done += 1
        for f in self._captured_functions():
            if done < limit:
                done += f.capture_deferred(limit - done)
        return done

    def warmup(self, points: list[dict] | None = None) -> "CompiledBackend":
        """Compile (and capture) ahead of time at the given dim sizes (spec points such as
        {"T": 112}; default: the spec's opt point) with synthetic inputs."""
        self.activate()
        for p in points or ["opt"]:
            self.infer(self.spec.sample_feed(p, device=self.device))
        return self

    # -- LLM --------------------------------------------------------------------------------------
    def decoder(self, layers: int, kv_heads: int, head_dim: int, batch: int = 1, max_len: int = 0, call=None):
        """A `runtime.backends.static_cache.StaticCacheDecoder` for the autoregressive graph, reused per (batch, cache
        length) and reset for each generation: one live generation per key at a time (at most two
        decoders are kept). The cache length is max_len (0: the spec's P max) rounded up to a power of
        two, at least 1024: each new length is a new compile + capture of the step, and attending over
        a longer masked tail costs little (Qwen2-0.5B: ~12 KB of cache per column and step).
        Other graphs: the base class's decoder."""
        self.activate()
        if not self.spec.autoregressive:
            return super().decoder(layers, kv_heads, head_dim, batch, max_len, call)
        from runtime.backends.static_cache import StaticCacheDecoder

        cfg = self.module.body.config
        if (layers, kv_heads, head_dim) != (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim):
            raise ValueError(f"decoder asked for a ({layers}, {kv_heads}, {head_dim}) cache, the llm module has "
                             f"({cfg.num_layers}, {cfg.num_kv_heads}, {cfg.head_dim})")
        n = max_len if max_len > 0 else self.spec.dim("P").max
        n = max(1024, 1 << (max(n, 1) - 1).bit_length())
        key = (batch, n)
        dec = self._decoders.get(key)
        if dec is None:
            opts = {"compile": self.compile_backend is not None, "compile_backend": self.compile_backend or "inductor",
                    "compile_mode": self.compile_mode, "compile_options": self.compile_options,
                    "cuda_graphs": self.graph_mode, **self.decoder_options}
            dec = StaticCacheDecoder(self.module, batch, n, self.device, self.dtype, **opts)
            self._decoders[key] = dec
            while len(self._decoders) > 2:
                self._decoders.popitem(last=False)
        else:
            self._decoders.move_to_end(key)
        return dec.reset()

    # -- reporting --------------------------------------------------------------------------------
    def _compiled_state(self) -> str:
        """What really runs compiled (metadata), from what the calls so far did."""
        if self.compile_backend is None:
            return "no (eager module, CUDA graphs only)" if self.cuda_graphs else "no (eager)"
        if self.spec.autoregressive:
            return "decode step (static cache); explicit-cache calls run eagerly"
        if not self._seen_keys:
            return "not yet (compiles at the first call)"
        return f"partly: {self.graph_breaks} graph break(s), the parts between run eagerly" if self.graph_breaks \
            else "whole graph"

    def metadata(self):
        decs = list(self._decoders.values())
        d = {**super().metadata(), "dtype": dtype_name(self.dtype), "cuda_graphs": self.graph_mode,
             "compile_backend": self.compile_backend, "compile_mode": self.compile_mode or "default",
             "dynamic": self.dynamic, "shapes": f"bucketed {self.rule.dim}" if self.rule else "exact",
             "graphs": len(self._graphs), "evictions": self.evictions,
             "deferred_calls": self.deferred_calls, "deferred_shapes": self.deferred_shapes,
             # functions of the module its callers run themselves, compiled here (Backend.compiled)
             "compiled_functions": [getattr(f, "__name__", "?") for f in self._functions],
             "captured_functions": {getattr(f, "__name__", "?"): c.stats() for f, c in self._functions.items()
                                    if isinstance(c, CapturedFunction)},
             "compiled": self._compiled_state(),
             "graph_breaks": self.graph_breaks, "graph_break_reasons": list(self.break_reasons),
             "compile_seconds": round(self.compile_seconds + sum(d.compile_seconds for d in decs), 3),
             "capture_seconds": round(self.capture_seconds + sum(d.capture_seconds for d in decs), 3)}
        if self._decoders:
            d["decoders"] = [x.metadata() for x in self._decoders.values()]
        return d


KIND = BackendKind(
    "compile", ("fp32", "fp16", "bf16"),
    # a private copy of the weights when casting, so a model shared with other backends keeps fp32
    make=lambda model, spec, device, precision: CompiledBackend(
        spec, device, lambda: model.graph_module(spec.name), PRECISION_DTYPES[precision], copy_module=precision != "fp32"),
    doc="torch.compile + CUDA graphs per shape bucket, static-cache LLM decode step",
    concurrent=False,
    serial_reason="the compile backend keeps one static KV cache and captured buffers per shape, so concurrent "
                  "requests would overwrite each other")
