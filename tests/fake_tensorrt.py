"""A recording fake of the `tensorrt` module: the TensorRT 10 / 11 Python API surface this project uses.

TensorRT cannot be installed here, so tests install `make(version, gpu, cc)` as
`sys.modules["tensorrt"]`. Every call is appended to `fake.calls` as (Class.method, {arguments}) in
order, and each call is validated the way the real library does (per its headers, Python binding
docstrings and Polygraphy's use of them), returning None / False and logging an error where TensorRT
does. Plans and timing caches are small JSON blobs. Execution happens on CPU tensors: outputs are
filled with `fake.fill` bytes through their bound addresses, which proves address and size.

Deliberately stricter than the Python bindings in one respect: an engine holds only a weak reference
to its runtime, and a context to its engine (the bindings keep them alive), so code that drops the
Runtime while its engine lives fails here, as it would against TensorRT's documented object lifetimes.
"""

from __future__ import annotations

import ctypes
import enum
import json
import types
import weakref

import onnx

PLAN_MAGIC = b"FAKE-TRT-PLAN\n"
CACHE_MAGIC = b"FAKE-TRT-CACHE\n"
CROSS_MAJOR = {(8, 10), (10, 11)}  # version-compatible plans across majors (TensorRT support matrix)
ITEMSIZE = {"FLOAT": 4, "HALF": 2, "BF16": 2, "INT32": 4, "INT64": 8, "BOOL": 1, "INT8": 1, "UINT8": 1}
ONNX_TYPES = {onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "HALF", onnx.TensorProto.BFLOAT16: "BF16",
              onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64", onnx.TensorProto.BOOL: "BOOL"}


def _v(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))


class _Api:
    _fake = None  # the fake's state, bound per fake module (see make)
    _trt = None

    def _rec(self, method, **args):
        self._fake.calls.append((f"{type(self).__name__}.{method}", args))

    def _error(self, msg):
        self._fake.errors.append(msg)
        self._fake.calls.append(("log.error", {"msg": msg}))

    def _warn(self, msg):
        self._fake.calls.append(("log.warning", {"msg": msg}))


class Logger(_Api):
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

    def __init__(self, min_severity=WARNING):
        self.min_severity = min_severity
        self._rec("__init__", min_severity=min_severity)


class ITensor:
    def __init__(self, name, dims, dtype):
        self.name, self.dims, self.dtype = name, dims, dtype  # dims: ints and dim names / expressions


class INetworkDefinition(_Api):
    def __init__(self, flags, strongly_typed):
        self.flags, self.strongly_typed, self.inputs, self.outputs = flags, strongly_typed, [], []

    def get_flag(self, flag):
        self._rec("get_flag", flag=flag.name)
        if flag.name == "STRONGLY_TYPED":  # what the network is, whatever was asked
            return self.strongly_typed
        return bool(self.flags & (1 << int(flag)))

    @property
    def num_inputs(self):
        return len(self.inputs)


class OnnxParser(_Api):
    def __init__(self, network, logger):
        assert isinstance(network, INetworkDefinition) and isinstance(logger, Logger)
        self.network, self.errors = network, []
        self._rec("__init__")

    def parse_from_file(self, model):
        self._rec("parse_from_file", model=model)
        try:
            m = onnx.load(model, load_external_data=False)
        except Exception as e:  # noqa: BLE001 - the real parser reports any failure as a parser error
            self.errors.append(f"In node -1 (parseFromFile): INVALID_GRAPH: cannot read {model} ({type(e).__name__})")
            return False
        weights = {i.name for i in m.graph.initializer}

        def tensors(values):
            out = []
            for v in values:
                t = v.type.tensor_type
                dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
                out.append(ITensor(v.name, dims, ONNX_TYPES.get(t.elem_type, "UNSUPPORTED")))
            return out

        self.network.inputs = tensors(v for v in m.graph.input if v.name not in weights)
        self.network.outputs = tensors(m.graph.output)
        if not self.network.inputs or not self.network.outputs:
            self.errors.append("In node -1 (importModel): INVALID_GRAPH: the graph has no inputs or no outputs")
        return not self.errors

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, index):
        return self.errors[index]


class IOptimizationProfile(_Api):
    def __init__(self):
        self.shapes = {}

    def set_shape(self, input, min, opt, max):  # noqa: A002 - the real keyword names
        self._rec("set_shape", input=input, min=tuple(min), opt=tuple(opt), max=tuple(max))
        if not len(min) == len(opt) == len(max) or any(not a <= b <= c for a, b, c in zip(min, opt, max)):
            raise RuntimeError("Shape provided for min is inconsistent with other shapes.")
        self.shapes[input] = (tuple(min), tuple(opt), tuple(max))


class ITimingCache(_Api):
    def __init__(self, device, entries=0):
        self.device, self.entries = device, entries

    def serialize(self):
        return CACHE_MAGIC + json.dumps({"device": self.device, "entries": self.entries}).encode()


class IBuilderConfig(_Api):
    def __init__(self):
        self.pools, self.flags, self.profiles, self.cache = {}, set(), [], None
        self._opt_level, self._hw = 3, self._trt.HardwareCompatibilityLevel.NONE

    def set_memory_pool_limit(self, pool, pool_size):
        self._rec("set_memory_pool_limit", pool=pool.name, pool_size=pool_size)
        self.pools[pool.name] = pool_size

    @property
    def builder_optimization_level(self):
        return self._opt_level

    @builder_optimization_level.setter
    def builder_optimization_level(self, level):
        self._rec("builder_optimization_level", value=level)
        self._opt_level = level

    @property
    def hardware_compatibility_level(self):
        return self._hw

    @hardware_compatibility_level.setter
    def hardware_compatibility_level(self, level):
        self._rec("hardware_compatibility_level", value=level.name)
        self._hw = level

    def set_flag(self, flag):
        self._rec("set_flag", flag=flag.name)
        self.flags.add(flag.name)

    def get_flag(self, flag):
        return flag.name in self.flags

    def create_timing_cache(self, serialized_timing_cache):
        blob = bytes(serialized_timing_cache)
        self._rec("create_timing_cache", nbytes=len(blob))
        if not blob:
            return self._trt.ITimingCache(None)
        if not blob.startswith(CACHE_MAGIC):
            self._error("createTimingCache: the blob is not a timing cache")
            return None
        d = json.loads(blob[len(CACHE_MAGIC):])
        return self._trt.ITimingCache(d["device"], d["entries"])

    def set_timing_cache(self, cache, ignore_mismatch):
        here = self._fake.device_tag()
        self._rec("set_timing_cache", device=cache.device, ignore_mismatch=ignore_mismatch)
        if cache.device not in (None, here) and not ignore_mismatch:
            self._error(f"setTimingCache: the cache was made on {cache.device}, not {here}")
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        self._rec("get_timing_cache")
        return self.cache

    def add_optimization_profile(self, profile):
        self._rec("add_optimization_profile", shapes=dict(profile.shapes))
        if not profile.shapes:
            return -1
        self.profiles.append(profile)
        return len(self.profiles) - 1


class Builder(_Api):
    def __init__(self, logger):
        assert isinstance(logger, Logger)
        self._rec("__init__")

    def create_network(self, flags=0):
        self._rec("create_network", flags=flags)
        F = self._trt.NetworkDefinitionCreationFlag
        if flags & ~sum(1 << int(f) for f in F):
            self._error(f"createNetworkV2: unknown flags {flags}")
            return None
        if self._fake.major >= 11:
            if flags & (1 << int(F.STRONGLY_TYPED)):
                self._warn("STRONGLY_TYPED is deprecated in TensorRT 11 and ignored: networks are always strongly typed")
            return self._trt.INetworkDefinition(flags, True)
        if "EXPLICIT_BATCH" in F.__members__ and flags & (1 << int(F.EXPLICIT_BATCH)):
            self._warn("EXPLICIT_BATCH is deprecated and ignored: networks are always explicit batch in TensorRT 10")
        strong = "STRONGLY_TYPED" in F.__members__ and bool(flags & (1 << int(F.STRONGLY_TYPED)))
        return self._trt.INetworkDefinition(flags, strong and not self._fake.ignore_strongly_typed)

    def create_builder_config(self):
        self._rec("create_builder_config")
        return self._trt.IBuilderConfig()

    def create_optimization_profile(self):
        self._rec("create_optimization_profile")
        return self._trt.IOptimizationProfile()

    def build_serialized_network(self, network, config):
        self._rec("build_serialized_network")
        f = self._fake
        problem = None
        if f.fail_build:
            problem = "the builder found no implementation for a layer"
        elif not network.inputs:
            problem = "the network has no inputs (was the ONNX parsed?)"
        elif not 0 <= config.builder_optimization_level <= 5:
            problem = "builder optimization level must be in [0, 5]"
        elif config.hardware_compatibility_level.name == "AMPERE_PLUS" and f.cc < (8, 0):
            problem = "hardware compatibility AMPERE_PLUS is only supported on Ampere and later GPUs"
        profile = config.profiles[0].shapes if config.profiles else {}
        inputs = []
        for t in network.inputs:
            rng = profile.get(t.name)
            if rng is None and any(isinstance(d, str) for d in t.dims):
                problem = problem or f"dynamic input {t.name} has no optimization profile"
            elif rng and (len(rng[0]) != len(t.dims) or any(isinstance(d, int) and not d == lo == hi
                                                           for d, lo, hi in zip(t.dims, rng[0], rng[2]))):
                problem = problem or f"profile of {t.name} {rng} does not fit its dimensions {t.dims}"
            inputs.append({"name": t.name, "dtype": t.dtype, "dims": t.dims, "profile": rng or [t.dims] * 3})
        unknown = set(profile) - {t.name for t in network.inputs}
        if unknown:
            problem = problem or f"the profile names tensors that are no network inputs: {sorted(unknown)}"
        if problem:
            self._error(f"buildSerializedNetwork: {problem}")
            return None
        if config.cache is not None:
            config.cache.device, config.cache.entries = f.device_tag(), config.cache.entries + 1
        plan = {"version": f.version, "gpu": f.gpu, "cc": list(f.cc), "strongly_typed": network.strongly_typed,
                "flags": sorted(config.flags), "hardware": config.hardware_compatibility_level.name,
                "inputs": inputs, "outputs": [{"name": t.name, "dtype": t.dtype, "dims": t.dims} for t in network.outputs]}
        return PLAN_MAGIC + json.dumps(plan).encode()


class Runtime(_Api):
    def __init__(self, logger):
        assert isinstance(logger, Logger)
        self._host_code = False
        self._rec("__init__")

    @property
    def engine_host_code_allowed(self):
        return self._host_code

    @engine_host_code_allowed.setter
    def engine_host_code_allowed(self, value):
        self._rec("engine_host_code_allowed", value=value)
        self._host_code = bool(value)

    def deserialize_cuda_engine(self, serialized_engine):
        blob = bytes(serialized_engine)
        self._rec("deserialize_cuda_engine", nbytes=len(blob))
        why = self._refusal(blob)
        if why:
            self._error(f"IRuntime::deserializeCudaEngine: {why}")
            return None
        return self._trt.ICudaEngine(json.loads(blob[len(PLAN_MAGIC):]), self)

    def _refusal(self, blob):
        """What TensorRT would refuse about this plan here, or None."""
        f = self._fake
        if not blob.startswith(PLAN_MAGIC):
            return "the magic tag does not match (not a plan, or a corrupt one)"
        plan = json.loads(blob[len(PLAN_MAGIC):])
        built, here, vc = _v(plan["version"]), _v(f.version), "VERSION_COMPATIBLE" in plan["flags"]
        if built != here and (not vc or built > here or (built[0] != here[0] and (built[0], here[0]) not in CROSS_MAJOR)):
            return f"the plan was built by TensorRT {plan['version']} and cannot run on {f.version}"
        if vc and "EXCLUDE_LEAN_RUNTIME" in plan["flags"]:
            return "the plan has no lean runtime: load one with Runtime.load_runtime"
        if vc and not self._host_code:
            return "the plan contains host code; set engine_host_code_allowed to deserialize it"
        if plan["hardware"] == "AMPERE_PLUS":
            return None if f.cc >= (8, 0) else f"hardware-compatible plans need compute capability 8.0+, not {f.cc}"
        if tuple(plan["cc"]) != f.cc:
            return f"the plan was built for compute capability {plan['cc']}, this GPU has {f.cc}"
        if plan["gpu"] != f.gpu:
            self._warn("using an engine plan file across different models of devices is not recommended")
        return None

    def __del__(self):
        self._rec("__del__")


class ICudaEngine(_Api):
    def __init__(self, plan, runtime):
        self.plan, self._runtime = plan, weakref.ref(runtime)
        self.io = {t["name"]: ("INPUT", t) for t in plan["inputs"]} | {t["name"]: ("OUTPUT", t) for t in plan["outputs"]}

    def _alive(self):
        if self._runtime() is None:
            raise RuntimeError("ICudaEngine used after the Runtime that deserialized it was destroyed")

    @property
    def num_io_tensors(self):
        self._rec("num_io_tensors")
        return len(self.io)

    def get_tensor_name(self, index):
        self._rec("get_tensor_name", index=index)
        return list(self.io)[index]

    def get_tensor_mode(self, name):
        self._rec("get_tensor_mode", name=name)
        return self._trt.TensorIOMode[self.io[name][0] if name in self.io else "NONE"]

    def get_tensor_dtype(self, name):
        self._rec("get_tensor_dtype", name=name)
        return self._trt.DataType[self.io[name][1]["dtype"]]

    def get_tensor_profile_shape(self, name, profile_index):
        self._rec("get_tensor_profile_shape", name=name, profile_index=profile_index)
        return [tuple(s) for s in self.io[name][1]["profile"]]

    def create_execution_context(self):
        self._alive()
        self._rec("create_execution_context")
        return self._trt.IExecutionContext(self)

    def __del__(self):
        self._rec("__del__")


class IExecutionContext(_Api):
    def __init__(self, engine):
        self._engine, self.shapes, self.addresses = weakref.ref(engine), {}, {}

    @property
    def engine(self):
        e = self._engine()
        if e is None:
            raise RuntimeError("IExecutionContext used after its ICudaEngine was destroyed")
        e._alive()
        return e

    def set_input_shape(self, name, shape):
        shape = tuple(int(n) for n in shape)
        ok = self._shape_ok(name, shape)
        self._rec("set_input_shape", name=name, shape=shape, ok=ok)
        if ok:
            self.shapes[name] = shape
        return ok

    def _shape_ok(self, name, shape):
        mode, t = self.engine.io.get(name, ("NONE", None))
        if mode != "INPUT" or len(shape) != len(t["dims"]):
            return False
        lo, _, hi = t["profile"]
        return all((n == d if isinstance(d, int) else a <= n <= b) for n, d, a, b in zip(shape, t["dims"], lo, hi))

    def _named(self):
        """Sizes of named dimensions from the input shapes set; RuntimeError where two disagree."""
        sizes = {}
        for name, shape in self.shapes.items():
            for d, n in zip(self.engine.io[name][1]["dims"], shape):
                if isinstance(d, str) and sizes.setdefault(d, n) != n:
                    raise RuntimeError(f"inferShapes: dimension {d!r} is {sizes[d]} in one input and {n} in {name}")
        return sizes

    def _shape(self, name):
        mode, t = self.engine.io[name]
        if mode == "INPUT":
            return self.shapes.get(name, tuple(d if isinstance(d, int) else -1 for d in t["dims"]))
        if name in self._fake.shape_override:
            return tuple(self._fake.shape_override[name])
        sizes = self._named()
        ids = {k: v for k, v in sizes.items() if k.isidentifier()}

        def size(d):
            if isinstance(d, int):
                return d
            if d in sizes:
                return sizes[d]
            try:
                return int(eval(d, {"__builtins__": {}}, ids))  # an output's dim expression, e.g. "T*480"
            except (NameError, SyntaxError):
                return -1

        return tuple(size(d) for d in t["dims"])

    def get_tensor_shape(self, name):
        shape = self._shape(name)
        self._rec("get_tensor_shape", name=name, shape=shape)
        return shape

    def infer_shapes(self):
        self._rec("infer_shapes")
        return self._unset()

    def _unset(self):
        self._named()
        return [n for n, (m, t) in self.engine.io.items()
                if m == "INPUT" and n not in self.shapes and any(isinstance(d, str) for d in t["dims"])]

    def set_tensor_address(self, name, memory):
        ok = name in self.engine.io and name not in self._fake.refuse_address and memory % self._fake.align == 0
        self._rec("set_tensor_address", name=name, address=memory, ok=ok)
        if ok:
            self.addresses[name] = memory
        return ok

    def get_tensor_address(self, name):
        return self.addresses.get(name, 0)

    def execute_async_v3(self, stream_handle):
        if not isinstance(stream_handle, int):
            raise TypeError("execute_async_v3(): incompatible function arguments (stream_handle: int)")
        engine = self.engine
        self._rec("execute_async_v3", stream_handle=stream_handle)
        try:
            unset = self._unset()
        except RuntimeError as e:
            return self._fail(str(e))
        if unset:
            return self._fail(f"enqueueV3: input shapes not set for {unset}")
        sizes = {n: self._shape(n) for n in engine.io}
        for name, (mode, _) in engine.io.items():
            empty = 0 in sizes[name]
            if not self.addresses.get(name) and not (mode == "INPUT" and empty and self._fake.null_ok_for_empty_inputs):
                return self._fail(f"enqueueV3: address is not set for tensor {name}")
        if self._fake.fail_execute:
            return self._fail("enqueueV3: a kernel failed")
        for name, (mode, t) in engine.io.items():
            n = 1
            for d in sizes[name]:
                n *= d
            if mode == "OUTPUT" and n:
                ctypes.memset(self.addresses[name], self._fake.fill, n * ITEMSIZE[t["dtype"]])
        return True

    def _fail(self, msg):
        self._error(msg)
        return False

    def __del__(self):
        self._rec("__del__")


_CLASSES = (Logger, INetworkDefinition, OnnxParser, IOptimizationProfile, ITimingCache, IBuilderConfig, Builder,
            Runtime, ICudaEngine, IExecutionContext)


def _enums(major):
    if major >= 11:
        network = {"STRONGLY_TYPED": 0, "PREFER_JIT_PYTHON_PLUGINS": 1, "PREFER_AOT_PYTHON_PLUGINS": 2}
        builder = {"VERSION_COMPATIBLE": 12, "EXCLUDE_LEAN_RUNTIME": 13}  # weak-typing flags removed in 11
    elif major == 10:
        network = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1, "PREFER_JIT_PYTHON_PLUGINS": 2, "PREFER_AOT_PYTHON_PLUGINS": 3}
        builder = {"FP16": 0, "INT8": 1, "OBEY_PRECISION_CONSTRAINTS": 5, "VERSION_COMPATIBLE": 12, "EXCLUDE_LEAN_RUNTIME": 13}
    else:  # 8.6: no strongly typed networks yet
        network = {"EXPLICIT_BATCH": 0}
        builder = {"FP16": 0, "INT8": 1, "VERSION_COMPATIBLE": 12, "EXCLUDE_LEAN_RUNTIME": 13}
    return {"NetworkDefinitionCreationFlag": network, "BuilderFlag": builder,
            "HardwareCompatibilityLevel": {"NONE": 0, "AMPERE_PLUS": 1, "SAME_COMPUTE_CAPABILITY": 2},
            "MemoryPoolType": {"WORKSPACE": 0, "DLA_MANAGED_SRAM": 1},
            "TensorIOMode": {"NONE": 0, "INPUT": 1, "OUTPUT": 2},
            "DataType": {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "UINT8": 5, "BF16": 7, "INT64": 8}}


def make(version: str = "10.9.0.34", gpu: str = "NVIDIA H200", cc: tuple = (9, 0)) -> types.ModuleType:
    """A fresh fake `tensorrt` module reporting `version`, on a GPU named `gpu` with compute capability `cc`."""
    fake = types.SimpleNamespace(
        version=version, major=_v(version)[0], gpu=gpu, cc=tuple(cc), calls=[], errors=[],
        align=256,                       # TensorRT: tensor addresses aligned to 256 bytes
        null_ok_for_empty_inputs=False,  # older TensorRT: even empty tensors need a non-null address
        fail_build=False, fail_execute=False, ignore_strongly_typed=False,
        refuse_address=set(), shape_override={}, fill=1)
    fake.device_tag = lambda: f"{fake.gpu}/{fake.cc[0]}.{fake.cc[1]}/{fake.version}"
    mod = types.ModuleType("tensorrt")
    mod.__version__, mod.fake = version, fake
    for name, members in _enums(fake.major).items():
        setattr(mod, name, enum.IntEnum(name, members))
    for cls in _CLASSES:
        setattr(mod, cls.__name__, type(cls.__name__, (cls,), {"_fake": fake, "_trt": mod}))
    return mod


def names(fake) -> list[str]:
    """The call log as names only."""
    return [c for c, _ in fake.calls]
