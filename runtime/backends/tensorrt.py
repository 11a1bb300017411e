"""TensorRT: a deserialized plan run with device-memory I/O (TensorRT 10 / 11 Python API).

Before anything touches the GPU, the plan's manifest entry is checked against the running GPU
(name and compute capability) and TensorRT version, following TensorRT's own compatibility rules
(see `check_plan_matches`): a plan built elsewhere is refused with the rebuild command instead of
failing inside the CUDA runtime. Per call: every input shape is set (`set_input_shape`, whose False
means "outside the plan's profile"), output shapes are read back from the context
(`get_tensor_shape`, which is what TensorRT will write), every tensor is bound by address, and the
engine is enqueued on torch's current stream with `execute_async_v3`.
"""

from __future__ import annotations

import torch

from models.errors import UserError
from models.spec import DTYPES, GraphSpec
from runtime.backends.base import ArtifactBackend, BackendKind

INSTALL_FIX = "run ./setup_tensorrt.sh, or choose --backend ort for this stage"
# The TensorRT support matrix allows exactly these pairs across major versions, and only for plans
# built with VERSION_COMPATIBLE: a TensorRT 8 plan on a TensorRT 10 runtime, a 10 plan on 11.
CROSS_MAJOR = {(8, 10), (10, 11)}
AMPERE = (8, 0)  # HardwareCompatibilityLevel.AMPERE_PLUS: Ampere and newer, compute capability 8.0+
_TORCH_OF = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "BOOL": torch.bool}
_logger = (None, None)


def shared_logger(trt):
    """One logger per process: TensorRT keeps the first logger it is given as its global one (and
    says so in its log whenever a later builder or runtime brings another)."""
    global _logger
    if _logger[0] is not trt:
        _logger = (trt, trt.Logger(trt.Logger.WARNING))
    return _logger[1]


def _version(v) -> tuple[int, ...] | None:
    try:
        return tuple(int(p) for p in str(v).split("."))
    except ValueError:
        return None


def running_facts() -> dict:
    """The GPU and TensorRT this process would run a plan with."""
    import tensorrt as trt

    if not torch.cuda.is_available():
        raise UserError("TensorRT plans need a CUDA GPU, and none is visible.", "run on a GPU machine or use --backend ort")
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"gpu": p.name, "compute_capability": f"{p.major}.{p.minor}", "tensorrt": trt.__version__}


def check_plan_matches(built: dict, rebuild: str, *, here: dict | None = None) -> None:
    """UserError unless TensorRT can run this plan here (`here` defaults to `running_facts()`).

    TensorRT version: a plan runs only on the TensorRT that built it, unless it was built
    VERSION_COMPATIBLE; then on the same or a newer version of the same major, or across exactly the
    major pairs the support matrix lists. A newer builder than the runtime is never accepted.
    GPU: a plan runs only on the GPU model (and compute capability) it was built on, unless built
    with hardware compatibility AMPERE_PLUS; then on any GPU of compute capability 8.0 or newer,
    whatever the build GPU was (so the build GPU's name and capability do not matter then)."""
    here = running_facts() if here is None else here
    flags = built.get("flags") or {}
    fix = f"rebuild it here: {rebuild}"
    b, r = built.get("tensorrt"), here["tensorrt"]
    bv, rv = _version(b), _version(r)
    if bv is None or rv is None:
        raise UserError(f"this plan was built for tensorrt {b!r}, but this machine has {r!r}.", fix)
    if bv != rv:
        if not flags.get("version_compat"):
            raise UserError(f"this plan was built for tensorrt {b!r}, but this machine has {r!r} (only plans built "
                            f"with --version-compat run on another TensorRT version).", fix)
        if bv > rv:
            raise UserError(f"this plan was built for tensorrt {b!r}, newer than the {r!r} here (a version-compatible "
                            f"plan runs on the same or a newer TensorRT only).", f"upgrade TensorRT (./setup_tensorrt.sh) or {fix}")
        if bv[0] != rv[0] and (bv[0], rv[0]) not in CROSS_MAJOR:
            raise UserError(f"this plan was built for tensorrt {b!r}, but this machine has {r!r} (TensorRT {rv[0]} "
                            f"cannot run TensorRT {bv[0]} plans, even version-compatible ones).", fix)
    cc = tuple(int(p) for p in str(here["compute_capability"]).split("."))
    if flags.get("hardware_compat"):
        if cc < AMPERE:
            raise UserError(f"this plan was built for Ampere and newer GPUs (compute capability 8.0+), but this "
                            f"machine's {here['gpu']} has compute capability {here['compute_capability']}.", fix)
        return
    for key in ("compute_capability", "gpu"):
        if str(built.get(key)) != str(here[key]):
            raise UserError(f"this plan was built for {key} {built.get(key)!r}, but this machine has {here[key]!r}.",
                            f"{fix} (or build with --hardware-compat for any Ampere or newer GPU)")


class TrtBackend(ArtifactBackend):
    kind = "trt"
    # TensorRT requires tensor addresses aligned to 256 bytes (IExecutionContext::setTensorAddress);
    # torch's CUDA allocator returns 512-byte aligned blocks, but a view into one may start anywhere.
    ALIGN = 256

    def __init__(self, spec: GraphSpec, device, path: str, built: dict, rebuild: str,
                 graph_spec: GraphSpec | None = None):
        super().__init__(spec, device, path, built, rebuild, graph_spec)
        self.runtime = None
        self.engine = None
        self.context = None
        self._empty: dict[str, torch.Tensor] = {}

    # -- the three places that touch CUDA itself; tests on CPU replace exactly these ------------------
    def _require_cuda(self) -> None:
        if self.device.type != "cuda":
            raise UserError("TensorRT runs on CUDA only.", "use --device cuda, or --backend ort / torch for this stage")

    def _running_facts(self) -> dict:
        return running_facts()

    def _stream_handle(self) -> int:
        return torch.cuda.current_stream(self.device).cuda_stream

    # -- lifecycle ---------------------------------------------------------------------------------
    def _activate(self) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise UserError("stage asks for TensorRT, but the tensorrt package is not installed.", INSTALL_FIX) from None
        self._require_cuda()
        check_plan_matches(self.built, self.rebuild, here=self._running_facts())
        fix = f"rebuild it: {self.rebuild}"
        # The runtime is kept on the backend: TensorRT's rule is that a factory (the runtime) outlives
        # what it made (the engine). The Python bindings also keep it alive from the engine, but
        # holding it here makes the lifetime explicit and lets deactivate() free in the right order.
        runtime = trt.Runtime(shared_logger(trt))
        if (self.built.get("flags") or {}).get("version_compat"):
            # A version-compatible plan carries its own lean runtime (host code); TensorRT refuses to
            # deserialize it unless allowed. Allowed only for these plans, whose sha256 the manifest
            # has already checked.
            runtime.engine_host_code_allowed = True
        with open(self.path, "rb") as f:
            engine = runtime.deserialize_cuda_engine(f.read())
        if engine is None:
            raise UserError(f"TensorRT could not deserialize {self.path} (see the TensorRT log above).", fix)
        context = engine.create_execution_context()
        if context is None:
            raise UserError(f"TensorRT could not create an execution context for {self.path} (out of GPU memory?).",
                            "free GPU memory, or run fewer stages with TensorRT on this GPU")
        modes = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            modes[name] = engine.get_tensor_mode(name)
        want = {**{t.name: trt.TensorIOMode.INPUT for t in self.spec.inputs},
                **{t.name: trt.TensorIOMode.OUTPUT for t in self.spec.outputs}}
        if modes != want:
            raise UserError(f"{self.path} has I/O tensors {sorted(modes)} but graph {self.spec.name} has {sorted(want)} "
                            f"(or their directions differ).", fix)
        for t in (*self.spec.inputs, *self.spec.outputs):
            dtype = engine.get_tensor_dtype(t.name)
            if _TORCH_OF.get(dtype.name) is not DTYPES[t.dtype]:
                raise UserError(f"{self.path} has {t.name} as {dtype.name}, but graph {self.spec.name} has {t.dtype}.", fix)
        self.runtime, self.engine, self.context = runtime, engine, context

    def _release(self) -> None:
        """Free the plan's GPU memory: context, then engine, then runtime (reverse of creation)."""
        self.context = None
        self.engine = None
        self.runtime = None
        self._empty.clear()

    # -- running -----------------------------------------------------------------------------------
    def _bind(self, name: str, x: torch.Tensor) -> None:
        if x.numel():
            address = x.data_ptr()
        else:
            # torch gives empty tensors a null data_ptr. TensorRT wants a non-null address even for an
            # empty tensor in some versions (the 8.x guide: "still needs a non-null memory address, and
            # different tensors should have different addresses"; 10.x accepts null only for empty
            # inputs), so every empty tensor (the LLM's past_keys at prefill, P = 0) gets its own small
            # buffer, kept until deactivate(). Nothing is read from or written to it.
            if name not in self._empty:
                self._empty[name] = torch.empty(self.ALIGN, dtype=torch.uint8, device=self.device)
            address = self._empty[name].data_ptr()
        if not self.context.set_tensor_address(name, address):
            raise UserError(f"TensorRT refused the address of tensor {name} of graph {self.spec.name}.",
                            f"rebuild the plan: {self.rebuild}")

    def _infer(self, feed):
        ctx = self.context
        sizes = {}
        keep = []  # the inputs stay referenced until the engine is enqueued
        for t in self.spec.inputs:
            x = feed[t.name].to(self.device, DTYPES[t.dtype]).contiguous()
            if x.numel() and x.data_ptr() % self.ALIGN:
                x = x.clone()
            keep.append(x)
            for s, n in zip(t.shape, x.shape):
                if isinstance(s, str) and s.isidentifier():
                    sizes[s] = int(n)
            if not ctx.set_input_shape(t.name, tuple(x.shape)):
                lo, _, hi = (tuple(s) for s in self.engine.get_tensor_profile_shape(t.name, 0))
                raise UserError(f"TensorRT refused shape {tuple(x.shape)} for input {t.name} of graph {self.spec.name}: "
                                f"the plan's profile allows {lo} to {hi}.",
                                f"keep requests within the profile, or rebuild the plan for this spec: {self.rebuild}")
            self._bind(t.name, x)
        try:  # the names of inputs still insufficiently specified; RuntimeError for anything else
            unset = list(ctx.infer_shapes())
            why = f"not specified: {unset}"
        except RuntimeError as e:
            unset, why = [None], (str(e).splitlines() or ["inconsistent input shapes"])[0]
        if unset:
            raise UserError(f"TensorRT cannot infer the output shapes of graph {self.spec.name} ({why}).",
                            f"rebuild the plan: {self.rebuild}")
        outs = {}
        for t, want in zip(self.spec.outputs, self.spec.output_shapes(sizes).values()):
            shape = tuple(ctx.get_tensor_shape(t.name))  # what TensorRT will write, now that inputs are set
            if shape != want:
                raise UserError(f"the plan computes {t.name} of graph {self.spec.name} as {shape}, but the spec says "
                                f"{want}: plan and spec disagree.", f"rebuild the plan: {self.rebuild}")
            outs[t.name] = y = torch.empty(shape, dtype=DTYPES[t.dtype], device=self.device)
            self._bind(t.name, y)
        if not ctx.execute_async_v3(self._stream_handle()):
            raise UserError(f"TensorRT failed to run {self.spec.name} (see the TensorRT log above).",
                            f"validate or rebuild it: {self.rebuild}")
        return outs

    def metadata(self):
        return {**super().metadata(), "file": self.path, **{k: v for k, v in self.built.items() if k != "flags"}}


KIND = BackendKind("trt", ("fp32", "fp16", "int8"), make=TrtBackend, artifact="plan", build_flags=" --trt",
                   doc="TensorRT plans from the same ONNX (strongly typed)", concurrent=False,
                   serial_reason="a TensorRT backend shares one execution context between calls, so concurrent "
                                 "requests would race")
