"""The stage spec: one declaration of every exportable graph's inputs, outputs and dynamic dims.

Everything that needs a shape reads it from here: ONNX export (names, dynamic axes), TensorRT
optimisation profiles, calibration and validation feeds (min / opt / max points), and the runtime's
input checks. A shape entry is an int (static) or an expression over dim names, such as "T", "T*480"
or "P+S"; every dim must appear alone in at least one input so that sizes can be read back from a
feed. `fill` says how synthetic data for that input is drawn, so validation feeds look like real
ones (token ids in range, masks of ones, flow time in [0, 1)).
"""

from __future__ import annotations

import ast
import functools
import json
import operator
from dataclasses import asdict, dataclass, field

import torch

from models.errors import UserError

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
# precision names of the command line (--backend kind:precision) -> the torch compute dtype
PRECISION_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
POINTS = ("min", "opt", "max")
# the most elements one call's attention scores may hold (see GraphSpec.largest): ONNX Runtime's CUDA
# kernels index such tensors with 32 bits, and beyond this they return wrong values without an error
# (the real-size CosyVoice2 estimator at B=64, T=3000: 4.6e9 score elements, 1.46 relative error
# against torch on an H100); it also bounds the memory one call's scores take (8 GiB in fp32)
ELEMENTS_LIMIT = 2**31 - 1


def dtype_name(dtype: torch.dtype) -> str:
    """The spec's name of a torch dtype ("float32", ...)."""
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class Dim:
    name: str
    min: int
    opt: int
    max: int
    doc: str = ""

    def __post_init__(self):
        if not (0 <= self.min <= self.opt <= self.max):
            raise ValueError(f"dim {self.name}: need 0 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")


@dataclass(frozen=True)
class Fill:
    """How synthetic values for an input are drawn: normal(a=mean, b=std), uniform[a, b),
    integers[a, b), const(a), or one of `values`."""

    kind: str = "normal"
    a: float = 0.0
    b: float = 1.0
    values: tuple = ()


def normal(std: float = 1.0, mean: float = 0.0) -> Fill:
    return Fill("normal", mean, std)


def uniform(lo: float = 0.0, hi: float = 1.0) -> Fill:
    return Fill("uniform", lo, hi)


def integers(lo: int, hi: int) -> Fill:
    return Fill("integers", lo, hi)


def const(value: float) -> Fill:
    return Fill("const", value)


def choice(*values) -> Fill:
    return Fill("choice", values=tuple(values))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple
    fill: Fill = field(default_factory=Fill)
    doc: str = ""

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"tensor {self.name}: unknown dtype {self.dtype}")


@dataclass(frozen=True)
class PadRule:
    """Dim `dim` may be padded up to a bucket without changing the valid region of any output:
    inputs using it are padded at the end of those axes with `fill[name]` (default 0), outputs are
    sliced back. Declared by the family only where padding provably changes nothing (tests check
    each numerically); the compile backend buckets that dim, every other dim runs at exact shapes."""

    dim: str
    fill: dict = field(default_factory=dict)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def _eval(expr: str, sizes: dict[str, int]) -> int:
    def walk(node):
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return sizes[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"unsupported shape expression {expr!r}")

    return walk(_parse(expr))


@functools.lru_cache(maxsize=None)
def _parse(expr: str) -> ast.Expression:
    """Parsed once: shapes and row groups are evaluated on every graph call."""
    return ast.parse(expr, mode="eval")


def _names(expr) -> set[str]:
    if isinstance(expr, int):
        return set()
    return {n.id for n in ast.walk(ast.parse(expr, mode="eval")) if isinstance(n, ast.Name)}


@dataclass(frozen=True)
class GraphSpec:
    """One graph: inputs, outputs, dims, plus what backends need to know to run it well.

    pad: the dim a backend may bucket (PadRule) or None (exact shapes only).
    fp32_inputs: floating inputs that stay float32 whatever the compute dtype (e.g. flow noise).
    fp32_scopes: module names (any component of a parameter / buffer path, or of an ONNX node's
        name scope) whose weights and arithmetic stay float32 in low-precision builds ("fp32
        islands"); the module's forward casts at their boundaries itself.
    sensitive_scopes: module names that a low-precision build may also keep float32 when
        validation needs it (a rung of the fp16 ladder), never by default.
    rows_per_request: rows of dim B one request occupies (2 for a CFG estimator: conditional and
        unconditional), so the number of requests one call takes is B.max // rows_per_request.
    compiled_part: a child module that compiling backends compile alone, running the rest of the
        forward as plain torch ops around it (the flow solver's 10-step loop around its estimator:
        the compile time of one estimator, not of ten inlined copies). None: the whole module.
    autoregressive: the graph is an LM step with an explicit KV cache in and out; backends may
        drive it through a faster decoder (static cache, captured step) instead of `infer`.
    largest: the element count of the largest tensor one call materialises (attention scores, a
        vocoder's widest upsampled layer), as an expression over the dims ("B*8*T*T"); "" where no
        tensor can come near the limit. Every backend runs a call whose largest tensor would pass
        ELEMENTS_LIMIT as several calls of fewer rows of B (`row_groups`), so a request is never
        refused or miscomputed for being large."""

    name: str
    stage: str
    inputs: tuple
    outputs: tuple
    dims: tuple
    doc: str = ""
    pad: PadRule | None = None
    fp32_inputs: frozenset = frozenset()
    fp32_scopes: tuple = ()
    sensitive_scopes: tuple = ()
    rows_per_request: int = 1
    compiled_part: str | None = None
    autoregressive: bool = False
    largest: str = ""

    def __post_init__(self):
        declared = {d.name for d in self.dims}
        alone = {s for t in self.inputs for s in t.shape if isinstance(s, str) and s.isidentifier()}
        for t in (*self.inputs, *self.outputs):
            for s in t.shape:
                unknown = _names(s) - declared
                if unknown:
                    raise ValueError(f"{self.name}.{t.name}: undeclared dims {sorted(unknown)}")
        missing = declared - alone
        if missing:
            raise ValueError(f"{self.name}: dims {sorted(missing)} never appear alone in an input shape")
        if self.pad is not None and self.pad.dim not in declared:
            raise ValueError(f"{self.name}: pad dim {self.pad.dim!r} is not declared")
        unknown = set(self.fp32_inputs) - {t.name for t in self.inputs}
        if unknown:
            raise ValueError(f"{self.name}: fp32_inputs {sorted(unknown)} are not inputs")
        if self.largest and (_names(self.largest) - declared or "B" not in _names(self.largest)):
            raise ValueError(f"{self.name}: largest {self.largest!r} must be an expression over its dims with B in it")

    # -- splitting a call along B -------------------------------------------------------------------
    def row_groups(self, sizes: dict[str, int]) -> list[tuple[int, int]]:
        """[start, stop) row ranges of B to run as separate calls: one range unless the call's largest
        tensor would pass ELEMENTS_LIMIT (then as many rows per call as stay under it, at least one)."""
        rows = sizes.get("B", 1)
        if not self.largest or rows <= 1:
            return [(0, rows)]
        per_row = _eval(self.largest, {**sizes, "B": 1})
        step = max(1, ELEMENTS_LIMIT // max(per_row, 1))
        return [(a, min(a + step, rows)) for a in range(0, rows, step)]

    def take_rows(self, feed: dict, start: int, stop: int) -> dict:
        """The rows [start, stop) of every input that has dim B (the others whole)."""
        return {t.name: (feed[t.name].narrow(t.shape.index("B"), start, stop - start) if "B" in t.shape
                         else feed[t.name]) for t in self.inputs}

    def join_rows(self, parts: list[dict]) -> dict:
        """Outputs of the calls of `row_groups`, put back together along B."""
        return {t.name: (torch.cat([p[t.name] for p in parts], dim=t.shape.index("B")) if "B" in t.shape
                         else parts[0][t.name]) for t in self.outputs}

    @property
    def max_requests(self) -> int:
        """How many requests one call can take (dim B's max over the rows one request needs); 1
        for a graph without a batch dim."""
        names = {d.name for d in self.dims}
        return self.dim("B").max // self.rows_per_request if "B" in names else 1

    def in_fp32_scope(self, qualified_name: str) -> bool:
        """Whether a parameter / buffer / ONNX scope path lies inside one of the fp32 islands."""
        parts = qualified_name.replace("/", ".").split(".")
        return any(p in self.fp32_scopes for p in parts)

    # -- sizes and shapes -------------------------------------------------------------------------
    def dim(self, name: str) -> Dim:
        for d in self.dims:
            if d.name == name:
                return d
        raise KeyError(name)

    def sizes_at(self, point: str | dict) -> dict[str, int]:
        if isinstance(point, dict):
            sizes = {d.name: getattr(d, "opt") for d in self.dims}
            sizes.update(point)
            return sizes
        if point not in POINTS:
            raise ValueError(f"point must be one of {POINTS}")
        return {d.name: getattr(d, point) for d in self.dims}

    @staticmethod
    def shape_of(tensor: TensorSpec, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(s if isinstance(s, int) else _eval(s, sizes) for s in tensor.shape)

    def input_shapes(self, sizes: dict[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: self.shape_of(t, sizes) for t in self.inputs}

    def output_shapes(self, sizes: dict[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: self.shape_of(t, sizes) for t in self.outputs}

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Per-input (min, opt, max) shapes: a TensorRT optimisation profile."""
        points = [self.input_shapes(self.sizes_at(p)) for p in POINTS]
        return {t.name: tuple(p[t.name] for p in points) for t in self.inputs}

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Axis names per input and output for ONNX export (an expression keeps its text)."""
        return {t.name: {i: s for i, s in enumerate(t.shape) if isinstance(s, str)}
                for t in (*self.inputs, *self.outputs)}

    # -- checking a feed --------------------------------------------------------------------------
    def sizes_of(self, feed: dict) -> dict[str, int]:
        """Dim sizes read from a feed without checking it (the first input where each dim stands
        alone). Use `check_feed` for an untrusted feed."""
        sizes: dict[str, int] = {}
        for t in self.inputs:
            for s, n in zip(t.shape, feed[t.name].shape):
                if isinstance(s, str) and s.isidentifier():
                    sizes.setdefault(s, int(n))
        return sizes

    def pad_to_min(self, feed: dict) -> tuple[dict, dict[str, int] | None]:
        """A feed whose bucketable dim (`pad`) is below its minimum, padded up to it with the rule's
        fills, and the original sizes to slice the outputs back with (`slice_outputs`); the feed
        itself and None when nothing needs padding. Exact by the pad rule's contract: an ordinary
        request is never refused because an engine profile starts above it (a 1-token request)."""
        if self.pad is None:
            return feed, None
        sizes = self.sizes_of(feed)
        d = self.dim(self.pad.dim)
        if sizes[d.name] >= d.min:
            return feed, None
        target = {**sizes, d.name: d.min}
        out = {}
        for t in self.inputs:
            x = feed[t.name]
            want = self.shape_of(t, target)
            if tuple(x.shape) != want:
                y = torch.full(want, self.pad.fill.get(t.name, 0), dtype=x.dtype, device=x.device)
                y[tuple(slice(0, n) for n in x.shape)] = x
                x = y
            out[t.name] = x
        return out, sizes

    def slice_outputs(self, outs: dict, sizes: dict[str, int]) -> dict:
        """Outputs of a padded call cut back to the request's own sizes."""
        return {t.name: outs[t.name][tuple(slice(0, n) for n in self.shape_of(t, sizes))] for t in self.outputs}

    def check_feed(self, feed: dict) -> dict[str, int]:
        """Validate names, ranks, dtypes and dim ranges of `feed`; return the dim sizes.

        Raises UserError naming the offending input and the allowed range, so a request beyond
        an engine profile is refused before any backend sees it."""
        names = [t.name for t in self.inputs]
        missing = [n for n in names if n not in feed]
        extra = [n for n in feed if n not in names]
        if missing or extra:
            raise UserError(f"graph {self.name}: inputs {sorted(feed)} do not match the spec {names}.",
                            "pass exactly the inputs the spec lists")
        sizes: dict[str, int] = {}
        for t in self.inputs:
            shape = tuple(feed[t.name].shape)
            if len(shape) != len(t.shape):
                raise UserError(f"graph {self.name}: input {t.name} has rank {len(shape)}, expected {len(t.shape)} {t.shape}.",
                                "reshape the input to the spec")
            dtype = str(feed[t.name].dtype).replace("torch.", "")
            if dtype != t.dtype:
                raise UserError(f"graph {self.name}: input {t.name} is {dtype}, expected {t.dtype}.",
                                f"cast it to {t.dtype}")
            for s, n in zip(t.shape, shape):
                if isinstance(s, str) and s.isidentifier():
                    if sizes.setdefault(s, n) != n:
                        raise UserError(f"graph {self.name}: dim {s} is {sizes[s]} in one input and {n} in {t.name}.",
                                        "make the inputs agree")
        for d in self.dims:
            n = sizes[d.name]
            if not d.min <= n <= d.max:
                what = d.doc or d.name
                raise UserError(
                    f"graph {self.name}: {what} = {n} is outside the supported range [{d.min}, {d.max}] "
                    f"(dim {d.name}).", "shorten or split the request, or rebuild with a larger profile")
        for t in self.inputs:
            want = self.shape_of(t, sizes)
            got = tuple(feed[t.name].shape)
            if want != got:
                raise UserError(f"graph {self.name}: input {t.name} has shape {got}, expected {want}.",
                                "make its shape follow the spec")
        return sizes

    # -- synthetic feeds --------------------------------------------------------------------------
    def sample_feed(self, point: str | dict = "opt", seed: int = 0, device="cpu") -> dict[str, torch.Tensor]:
        sizes = self.sizes_at(point)
        gen = torch.Generator().manual_seed(seed)
        feed = {}
        for t in self.inputs:
            feed[t.name] = sample_tensor(t, self.shape_of(t, sizes), gen).to(device)
        return feed

    # -- serialisation (ONNX metadata, manifests) --------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["fp32_inputs"] = sorted(self.fp32_inputs)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "GraphSpec":
        def tensor(x):
            return TensorSpec(x["name"], x["dtype"], tuple(x["shape"]),
                              Fill(x["fill"]["kind"], x["fill"]["a"], x["fill"]["b"], tuple(x["fill"]["values"])),
                              x.get("doc", ""))
        pad = d.get("pad")
        return cls(d["name"], d["stage"], tuple(tensor(t) for t in d["inputs"]),
                   tuple(tensor(t) for t in d["outputs"]), tuple(Dim(**x) for x in d["dims"]), d.get("doc", ""),
                   PadRule(pad["dim"], dict(pad.get("fill", {}))) if pad else None,
                   frozenset(d.get("fp32_inputs", ())), tuple(d.get("fp32_scopes", ())), tuple(d.get("sensitive_scopes", ())),
                   int(d.get("rows_per_request", 1)), d.get("compiled_part"), bool(d.get("autoregressive", False)),
                   str(d.get("largest", "")))

    @classmethod
    def from_json(cls, s: str) -> "GraphSpec":
        return cls.from_dict(json.loads(s))


def sample_tensor(t: TensorSpec, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    dtype = DTYPES[t.dtype]
    f = t.fill
    if f.kind == "normal":
        x = torch.randn(shape, generator=gen) * f.b + f.a
    elif f.kind == "uniform":
        x = torch.rand(shape, generator=gen) * (f.b - f.a) + f.a
    elif f.kind == "integers":
        x = torch.randint(int(f.a), int(f.b), shape, generator=gen)
    elif f.kind == "const":
        x = torch.full(shape, f.a)
    elif f.kind == "choice":
        idx = torch.randint(0, len(f.values), shape, generator=gen)
        x = torch.tensor(f.values)[idx]
    else:
        raise ValueError(f"unknown fill {f.kind}")
    return x.to(dtype)
