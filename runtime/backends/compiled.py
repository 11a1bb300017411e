"""`--backend compile`: torch.compile (inductor) + CUDA graphs + optional bf16/fp16, per graph.

Upstream is launch-bound: every kernel waits on Python. This backend removes that overhead with
inductor fusion and, on CUDA, by replaying each graph as one captured CUDA graph.

Life cycle (as every backend, see `runtime.backends.base`): construction is cheap; `activate()` moves
the module to the device and dtype (in place, as TorchBackend does, unless `copy_module=True`: a
model object shared with another backend in the same process then keeps its fp32 weights; the llm
decoder also re-lays q/k/v and gate/up weights back to back, values unchanged) and wraps it with
`torch.compile`; compilation happens lazily at the first call of each new shape, CUDA graphs are
captured lazily per shape key.

Precision. `dtype` (float32 | bfloat16 | float16) is the dtype of weights and activations; graph
inputs and outputs keep the spec's dtypes and are cast at the boundary. A few places keep float32 on
purpose ("fp32 islands"), because a cast there costs accuracy for no speed:
  * flow_solver: the Euler state (the noise input `z` and every x update) and the t / dt schedule
    stay float32; the estimator runs in `dtype` (solve_euler_cfg casts x to it per step).
  * vocoder (HiFT): the f0 predictor, the harmonic source (phase accumulation) and the inverse STFT
    run in float32, the network between them in `dtype`. In bf16 the per-frame phase advance of the
    upper harmonics (tens of cycles per frame) would be off by ~0.2 % of itself, i.e. up to ~0.1
    cycle per frame, accumulating.
  * llm: RoPE frequencies and RMSNorm statistics are float32 inside the model already; the decode
    attention computes scores and softmax in float32 (runtime.llm_decode).

Shape keys and padding (one compiled specialisation and one CUDA graph per key):
  * Bucketed graphs pad one dim up to a bucket and slice every output back to the request's size.
    That is only done where padding provably leaves the valid region unchanged (tests/test_compiled.py
    checks each case numerically on the tiny presets, padded vs exact):
      - flow_estimator, flow_solver: dim T (mel frames). Inputs x/z, mu, cond are padded with 0 and
        `mask` with 0. The DiT (CosyVoice3) masks attention keys with the mask, its position conv is
        causal (left padded) and its "zero the output where the last mask row is False" quirk reads
        the same row either way; the CosyVoice2 U-Net multiplies every block's input and output by
        the mask, uses causal convs and a -1e10 attention bias on masked keys. So frames < T never
        see a padded frame (max rel. difference ~1e-7 in fp32: summation order only).
      - flow_encoder: dim N (tokens), padded with -1 (the graph's own padding id). CosyVoice3's
        pre-lookahead conv sees zero embeddings past the end either way; CosyVoice2's conformer
        masks padded tokens (bitwise equal on the presets).
    Bucket rule (`bucket_size`): n <= 16 -> 16; otherwise round up to a multiple of
    2**(floor(log2(n-1)) - 2), i.e. four buckets per octave and at most 25 % padding (100 -> 112,
    1000 -> 1024), capped at the spec's max for that dim.
  * Exact-shape graphs (one graph per exact input shape, at most `max_graphs`, least recently used
    evicted): everything else, in particular
      - vocoder, both HiFT variants: the non-causal CosyVoice2 HiFT's last ~10 frames see the
        padding; the causal CosyVoice3 HiFT's output prefix does not depend on later mel frames
        except through its STFT / iSTFT edges: with zero padding the LAST frame (480 samples)
        changes (~8 % of the output scale on the tiny preset), earlier frames agree to ~5e-7.
        A padded call would therefore change audio, so both are exact-shape.
      - vocoder (SNAC): symmetric convolutions and transposed convs: padding changes the tail.
      - the batch dim B everywhere.
    Exact-shape graphs are compiled with torch.compile's automatic dynamic shapes (`dynamic=None`:
    the first shape static, later ones through one dynamic recompile) so new lengths cost a CUDA
    graph capture, not a compile; bucketed graphs compile statically (`dynamic=False`: one compile
    per bucket, best kernels; `warmup()` compiles chosen buckets ahead of time).
  * llm: `infer` (explicit cache, shapes change every call) runs the module eagerly in `dtype`; the
    fast path is `decoder()`, a static-cache decoder with one captured graph per decode step
    (runtime.llm_decode), one per (batch, cache length rounded up to a power of two >= 1024).

What is compiled. The whole module, except flow_solver, where only the estimator is compiled and
the 10-step Euler loop around it runs as plain torch ops (all captured into the same CUDA graph):
the compiled estimator is shared by the 10 calls, so compile time is that of one estimator.

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
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from models.spec import DTYPES, GraphSpec
from runtime.backends.base import Backend

DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}


def as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compile backend dtype must be float32, bfloat16 or float16, got {dtype}")
        return dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"compile backend dtype must be one of {sorted(DTYPE_NAMES)}, got {dtype!r}")
    return DTYPE_NAMES[dtype]


def bucket_size(n: int, minimum: int = 16) -> int:
    """Round n up to its bucket: `minimum` for n <= minimum, else a multiple of
    2**(floor(log2(n-1)) - 2) (four buckets per octave, at most 25 % padding)."""
    if n <= minimum:
        return minimum
    granule = 1 << max(int(math.floor(math.log2(n - 1))) - 2, 0)
    return -(-n // granule) * granule


@dataclass(frozen=True)
class PadRule:
    """Graph `dim` may be padded up to a bucket: inputs whose shape uses it are padded at the end of
    those axes with `fill[name]` (default 0); outputs are sliced back."""

    dim: str
    fill: dict = field(default_factory=dict)


# graph name -> rule (None: exact shapes). See the module docstring for why each is safe.
PAD_RULES: dict[str, PadRule | None] = {
    "flow_estimator": PadRule("T", {"mask": 0.0}),
    "flow_solver": PadRule("T", {"mask": 0.0}),
    "flow_encoder": PadRule("N", {"tokens": -1}),
    "vocoder": None,
    "llm": None,
}
HIFT_FP32_PARTS = ("f0_predictor", "m_source", "stft", "istft")
# inputs kept float32 whatever the compute dtype (fp32 islands)
KEEP_FP32: dict[str, frozenset] = {"flow_solver": frozenset({"z"}), "vocoder": frozenset({"mel", "noise"})}


class _SolverFn(nn.Module):
    """FlowSolver with only its estimator compiled and a float32 Euler schedule / state."""

    def __init__(self, solver: nn.Module, estimator_fn):
        super().__init__()
        from models.flow import euler_schedule

        self.solver = solver
        self.estimator_fn = estimator_fn
        t, dt = euler_schedule(solver.cfg)
        dev = solver.t_steps.device
        self.register_buffer("t_steps", t.to(dev), persistent=False)
        self.register_buffer("dt_steps", dt.to(dev), persistent=False)

    def forward(self, z, mask, mu, spks, cond, chunk_frames):
        from models.flow import solve_euler_cfg

        return solve_euler_cfg(self.estimator_fn, self.solver.cfg, self.t_steps, self.dt_steps, z.float(), mask, mu,
                               spks, cond, chunk_frames)


class _HiFTMixed(nn.Module):
    """HiFTGenerator.forward with f0 predictor, source and iSTFT in float32 and the network in
    `dtype` (the module's f0_predictor / m_source / istft must be float32, the rest in dtype)."""

    def __init__(self, hift: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.hift = hift
        self.dtype = dtype

    def forward(self, mel, noise):
        m = self.hift
        mel = mel.float()
        source = m.source(m.f0(mel), noise.float())
        magnitude, phase = m.spectrum(mel.to(self.dtype), source.to(self.dtype))
        audio = m.polar_istft(magnitude.float(), phase.float())
        return torch.clamp(audio, -m.cfg.audio_limit, m.cfg.audio_limit)


@dataclass
class _Captured:
    graph: object
    inputs: list
    outputs: tuple


class CompiledBackend(Backend):
    kind = "compile"

    def __init__(self, spec: GraphSpec, device, module_factory, dtype="float32", cuda_graphs: bool | None = None,
                 buckets: bool = True, max_graphs: int = 16, compile_backend: str = "inductor",
                 compile_mode: str | None = None, dynamic: bool | None | str = "auto", warmup: int = 3,
                 fullgraph: bool = False, compile_options: dict | None = None, decoder_options: dict | None = None,
                 copy_module: bool = False):
        """dtype: compute dtype (name or torch dtype). cuda_graphs: None = on for CUDA devices.
        buckets: pad bucketable dims (PAD_RULES) or use exact shapes everywhere. max_graphs: LRU cap
        on captured graphs. compile_backend / compile_mode: torch.compile's backend and mode
        (compile_backend=None: no torch.compile, CUDA graphs of the eager module only; with CUDA
        graphs use a mode without inductor cudagraphs: None, 'default', 'max-autotune-no-cudagraphs').
        dynamic: 'auto' (bucketed graphs False, exact-shape graphs None = automatic) or torch.compile's
        own value. compile_options: torch.compile `options` (inductor config; not with compile_mode).
        cuda_graphs="emulate": the CUDA-graph bookkeeping on the CPU (tests).
        decoder_options: extra StaticCacheDecoder kwargs for `decoder()`. copy_module: work on a deep
        copy of the factory's module (the model object keeps its device, dtype and weight layout;
        costs a second copy of the weights), instead of moving / casting it in place."""
        super().__init__(spec, device)
        self._factory = module_factory
        self.dtype = as_dtype(dtype)
        if self.device.type == "cuda" and self.device.index is None and torch.cuda.is_available():
            self.device = torch.device("cuda", torch.cuda.current_device())
        from runtime.llm_decode import graph_mode

        self.graph_mode = graph_mode(cuda_graphs, self.device)
        self.cuda_graphs = self.graph_mode != "off"
        if self.graph_mode == "cuda" and compile_mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"compile_mode {compile_mode!r} adds inductor's own CUDA graphs inside ours; use "
                             "'default' or 'max-autotune-no-cudagraphs', or cuda_graphs=False")
        self.rule = PAD_RULES.get(spec.name) if buckets else None
        self.keep_fp32 = KEEP_FP32.get(spec.name, frozenset()) if self.dtype != torch.float32 else frozenset()
        self.max_graphs = max_graphs
        self.compile_backend = compile_backend
        self.compile_mode = compile_mode
        self.dynamic = (False if self.rule is not None else None) if dynamic == "auto" else dynamic
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
        self.compile_seconds = 0.0
        self.capture_seconds = 0.0
        self.evictions = 0

    # -- activation -------------------------------------------------------------------------------
    def _compile(self, fn):
        if self.compile_backend is None:
            return fn
        kw = {} if self.compile_mode is None else {"mode": self.compile_mode}
        if self.compile_options:
            kw["options"] = dict(self.compile_options)
        return torch.compile(fn, backend=self.compile_backend, dynamic=self.dynamic, fullgraph=self.fullgraph, **kw)

    def _activate(self) -> None:
        from models.flow import FlowSolver
        from models.hift import HiFTGenerator

        if self.compile_backend is not None:
            # one static compile per bucket / decoder: keep dynamo from falling back to eager after 8
            cfg = torch._dynamo.config
            name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
            setattr(cfg, name, max(getattr(cfg, name), 64))
        module = self._factory()
        if self.copy_module:
            import copy

            module = copy.deepcopy(module)
        if isinstance(module, HiFTGenerator) and self.dtype != torch.float32:
            # fp32 islands: never round-trip their weights / bases through the low dtype
            module.to(self.device)
            for name, child in module.named_children():
                if name not in HIFT_FP32_PARTS:
                    child.to(self.dtype)
        else:
            module.to(self.device, self.dtype)
        module.eval()
        self.module = module
        if self.spec.name == "llm":
            self._fn = module  # explicit-cache calls stay eager; decoder() is the fast path
            return
        if isinstance(module, FlowSolver):
            self._fn = _SolverFn(module, self._compile(module.estimator))
        elif isinstance(module, HiFTGenerator) and self.dtype != torch.float32:
            self._fn = self._compile(_HiFTMixed(module, self.dtype))
        else:
            self._fn = self._compile(module)
        if self.graph_mode == "cuda":
            self._pool = torch.cuda.graph_pool_handle()

    def deactivate(self) -> None:
        self._graphs.clear()
        self._decoders.clear()
        super().deactivate()

    # -- shapes -----------------------------------------------------------------------------------
    def _sizes(self, feed: dict) -> dict[str, int]:
        """Dim sizes of a feed (already checked by `infer`, or trusted with check=False)."""
        where = self.__dict__.get("_dim_axes")
        if where is None:
            where = {}
            for t in self.spec.inputs:
                for axis, s in enumerate(t.shape):
                    if isinstance(s, str) and s.isidentifier():
                        where.setdefault(s, (t.name, axis))
            self._dim_axes = where
        return {d: feed[name].shape[axis] for d, (name, axis) in where.items()}

    def padded_sizes(self, sizes: dict[str, int]) -> dict[str, int]:
        """The dim sizes a request with `sizes` runs at (bucketed dim rounded up, capped at its max)."""
        if self.rule is None:
            return dict(sizes)
        d = self.spec.dim(self.rule.dim)
        out = dict(sizes)
        out[d.name] = max(min(bucket_size(sizes[d.name]), d.max), sizes[d.name])
        return out

    def _cast(self, name: str, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if x.is_floating_point() and name not in self.keep_fp32:
            x = x.to(self.dtype)
        return x

    def _prepare(self, feed: dict, padded: dict[str, int]) -> list[torch.Tensor]:
        """Inputs on the device, in the compute dtype, padded to the shape key (eager / compiled path)."""
        args = []
        for t in self.spec.inputs:
            x = self._cast(t.name, feed[t.name])
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
        return self.dtype if x.is_floating_point() and name not in self.keep_fp32 else x.dtype

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
        sizes = self._sizes(feed)
        padded = self.padded_sizes(sizes)
        with torch.inference_mode():
            if self.spec.name == "llm" or not self.cuda_graphs:
                args = self._prepare(feed, padded)
                key = tuple(tuple(a.shape) for a in args)
                first = key not in self._seen_keys and self.spec.name != "llm" and self.compile_backend is not None
                t0 = time.perf_counter()
                outs = self._fn(*args)
                if first:
                    self._seen_keys.add(key)
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    self.compile_seconds += time.perf_counter() - t0
                return self._finish(outs, sizes, copy=False)
            key = self._key(feed, padded)
            entry = self._graphs.get(key)
            if entry is None:
                entry = self._capture(key, self._prepare(feed, padded))
            else:
                self._graphs.move_to_end(key)
                self._fill_static(entry, feed)
            entry.graph.replay()
            return self._finish(entry.outputs, sizes, copy=True)

    def _capture(self, key, args: list[torch.Tensor]) -> _Captured:
        from runtime.llm_decode import capture

        # own copies (a feed tensor may be the caller's), allocated outside the graph pool
        static = [a.clone(memory_format=torch.contiguous_format) for a in args]
        if self.graph_mode == "cuda":
            torch.cuda.synchronize(self.device)
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

    def warmup(self, points: list[dict] | None = None) -> "CompiledBackend":
        """Compile (and capture) ahead of time at the given dim sizes (spec points such as
        {"T": 112}; default: the spec's opt point) with synthetic inputs."""
        self.activate()
        for p in points or ["opt"]:
            self.infer(self.spec.sample_feed(p, device=self.device))
        return self

    # -- LLM --------------------------------------------------------------------------------------
    def decoder(self, layers: int, kv_heads: int, head_dim: int, batch: int = 1, max_len: int = 0):
        """A `runtime.llm_decode.StaticCacheDecoder` for the `llm` graph, reused per (batch, cache
        length) and reset for each generation: one live generation per key at a time (at most two
        decoders are kept). The cache length is max_len (0: the spec's P max) rounded up to a power of
        two, at least 1024: each new length is a new compile + capture of the step, and attending over
        a longer masked tail costs little (Qwen2-0.5B: ~12 KB of cache per column and step).
        Other graphs: the base class's decoder."""
        self.activate()
        if self.spec.name != "llm":
            return super().decoder(layers, kv_heads, head_dim, batch, max_len)
        from runtime.llm_decode import StaticCacheDecoder

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
    def metadata(self):
        decs = list(self._decoders.values())
        d = {**super().metadata(), "dtype": str(self.dtype).replace("torch.", ""), "cuda_graphs": self.graph_mode,
             "compile_backend": self.compile_backend, "compile_mode": self.compile_mode or "default",
             "dynamic": self.dynamic, "shapes": f"bucketed {self.rule.dim}" if self.rule else "exact",
             "graphs": len(self._graphs), "evictions": self.evictions,
             "compile_seconds": round(self.compile_seconds + sum(d.compile_seconds for d in decs), 3),
             "capture_seconds": round(self.capture_seconds + sum(d.capture_seconds for d in decs), 3)}
        if self._decoders:
            d["decoders"] = [x.metadata() for x in self._decoders.values()]
        return d
