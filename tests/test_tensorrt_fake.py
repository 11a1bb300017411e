"""The TensorRT build and runtime paths against a recording fake of the TensorRT 10 / 11 API
(tests/fake_tensorrt.py): the calls made, their order and arguments, and what happens when TensorRT
says no. Runs on CPU; nothing here needs TensorRT or a GPU."""

import gc
import json
import sys
import weakref

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from export import tensorrt_build
from models.errors import UserError
from models.spec import GraphSpec, TensorSpec
from models.speech_lm import llm_graph_spec
from runtime.backends import tensorrt as trt_backend
from tests import fake_tensorrt
from tests.fake_tensorrt import names

SPEC = llm_graph_spec(layers=2, heads=4, kv_heads=2, head_dim=4, input_vocab=50, logits=10, max_batch=2, max_new=8,
                      max_past=16, opt_past=4)
REBUILD = "python -m export build --model m --precision fp16 --trt"
H200 = {"gpu": "NVIDIA H200", "compute_capability": "9.0", "tensorrt": "10.9.0.34"}
ONNX_TYPE = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64}


def write_onnx(spec: GraphSpec, path) -> str:
    """An ONNX file with the spec's inputs and outputs (names, dtypes, dims as ints / dim_params),
    which is all the fake parser reads."""
    def vi(t):
        return helper.make_tensor_value_info(t.name, ONNX_TYPE[t.dtype], list(t.shape))

    model = helper.make_model(helper.make_graph([], spec.name, [vi(t) for t in spec.inputs], [vi(t) for t in spec.outputs]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return str(path)


@pytest.fixture
def fake(monkeypatch):
    """install(version, gpu, cc) puts a fresh fake in sys.modules["tensorrt"] (and makes the build
    see that GPU) and returns the module; its `.fake` holds the call log and the knobs."""
    def install(version="10.9.0.34", gpu="NVIDIA H200", cc=(9, 0)):
        mod = fake_tensorrt.make(version, gpu, cc)
        monkeypatch.setitem(sys.modules, "tensorrt", mod)
        monkeypatch.setattr(tensorrt_build, "gpu_facts", lambda: {"gpu": gpu, "compute_capability": f"{cc[0]}.{cc[1]}"})
        return mod
    return install


def build(tmp_path, spec=SPEC, **kw):
    logs = []
    built = tensorrt_build.build_plan(write_onnx(spec, tmp_path / f"{spec.name}.onnx"), str(tmp_path / f"{spec.name}.plan"),
                                      spec, log=logs.append, **kw)
    return built, logs


def plan_of(tmp_path, spec=SPEC):
    blob = (tmp_path / f"{spec.name}.plan").read_bytes()
    return json.loads(blob[len(fake_tensorrt.PLAN_MAGIC):])


def args(mod, name):
    return [a for c, a in mod.fake.calls if c == name]


# -- build ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version, network_flags", [("10.9.0.34", 1 << 1), ("11.1.0.106", 0)])
def test_build_sequence_flags_profile_and_config(fake, tmp_path, version, network_flags):
    mod = fake(version)
    built, _ = build(tmp_path, timing_cache=str(tmp_path / "timing.cache"), hardware_compat=True, version_compat=True)
    calls = [c for c in names(mod.fake) if c != "INetworkDefinition.get_flag"]
    assert calls == ["Logger.__init__", "Builder.__init__", "Builder.create_network", "OnnxParser.__init__",
                     "OnnxParser.parse_from_file", "Builder.create_builder_config", "IBuilderConfig.set_memory_pool_limit",
                     "IBuilderConfig.builder_optimization_level", "IBuilderConfig.hardware_compatibility_level",
                     "IBuilderConfig.set_flag", "IBuilderConfig.create_timing_cache", "IBuilderConfig.set_timing_cache",
                     "Builder.create_optimization_profile"] + ["IOptimizationProfile.set_shape"] * 4 + \
                    ["IBuilderConfig.add_optimization_profile", "Builder.build_serialized_network",
                     "IBuilderConfig.get_timing_cache"]
    # STRONGLY_TYPED on 10 (read back), nothing on 11 (always strongly typed, the flag deprecated); never EXPLICIT_BATCH
    assert args(mod, "Builder.create_network") == [{"flags": network_flags}]
    assert args(mod, "INetworkDefinition.get_flag") == ([{"flag": "STRONGLY_TYPED"}] if version < "11" else [])
    assert args(mod, "IBuilderConfig.set_memory_pool_limit") == [{"pool": "WORKSPACE", "pool_size": 8 << 30}]
    assert args(mod, "IBuilderConfig.builder_optimization_level") == [{"value": 3}]
    assert args(mod, "IBuilderConfig.hardware_compatibility_level") == [{"value": "AMPERE_PLUS"}]
    assert args(mod, "IBuilderConfig.set_flag") == [{"flag": "VERSION_COMPATIBLE"}]  # lean runtime kept, no precision flags
    assert [(a["input"], (a["min"], a["opt"], a["max"])) for a in args(mod, "IOptimizationProfile.set_shape")] == \
        list(SPEC.profile().items())
    assert [c for c in names(mod.fake) if c.startswith("log.")] == []  # no deprecation warnings, no errors
    plan = plan_of(tmp_path)
    assert plan["strongly_typed"] and plan["flags"] == ["VERSION_COMPATIBLE"] and plan["hardware"] == "AMPERE_PLUS"
    assert built["tensorrt"] == version and built["gpu"] == "NVIDIA H200" and built["compute_capability"] == "9.0"
    assert built["flags"]["strongly_typed"] is True and built["flags"]["network_flags"] == network_flags
    assert built["flags"]["hardware_compat"] and built["flags"]["version_compat"]


def test_strongly_typed_is_recorded_only_when_it_is_true(fake, tmp_path):
    mod = fake("10.9.0.34")
    mod.fake.ignore_strongly_typed = True  # a TensorRT 10 that did not honour the flag
    with pytest.raises(UserError, match="did not create a strongly typed network.*Fix: reinstall TensorRT"):
        build(tmp_path)
    fake("8.6.1.6")  # STRONGLY_TYPED does not exist yet
    with pytest.raises(UserError, match=r"TensorRT 8\.6\.1\.6 cannot build strongly typed.*TensorRT 10 or newer"):
        build(tmp_path)
    assert not (tmp_path / "llm.plan").exists()


def test_build_failures_are_user_errors(fake, tmp_path):
    mod = fake()
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match=r"TensorRT cannot parse .*bad\.onnx: .*INVALID_GRAPH.*Fix: check the ONNX"):
        tensorrt_build.build_plan(str(tmp_path / "bad.onnx"), str(tmp_path / "bad.plan"), SPEC)
    mod.fake.fail_build = True
    with pytest.raises(UserError, match=r"failed to build llm\.onnx.*Fix: try a lower --opt-level"):
        build(tmp_path)  # build_serialized_network returned None
    assert not (tmp_path / "llm.plan").exists()
    other = GraphSpec("llm", "llm", SPEC.inputs[:1] + (TensorSpec("extra", "int64", ("B", "S")),) + SPEC.inputs[1:],
                      SPEC.outputs, SPEC.dims)
    mod.fake.fail_build = False
    write_onnx(SPEC, tmp_path / "llm.onnx")  # the file lacks the spec's "extra" input: the profile names a non-input
    with pytest.raises(UserError, match="failed to build"):
        tensorrt_build.build_plan(str(tmp_path / "llm.onnx"), str(tmp_path / "llm.plan"), other)
    with pytest.raises(UserError, match="optimization levels are 0 to 5"):
        build(tmp_path, opt_level=7)
    fake(gpu="Tesla T4", cc=(7, 5))
    with pytest.raises(UserError, match=r"must be built on an Ampere or newer GPU, not Tesla T4 \(7\.5\)"):
        build(tmp_path, hardware_compat=True)


def test_timing_cache_is_reused_and_replaced_when_from_another_gpu(fake, tmp_path):
    cache = tmp_path / "timing.cache"
    fake()
    build(tmp_path, timing_cache=str(cache))
    first = json.loads(cache.read_bytes()[len(fake_tensorrt.CACHE_MAGIC):])
    mod = fake()
    _, logs = build(tmp_path, timing_cache=str(cache))
    assert args(mod, "IBuilderConfig.set_timing_cache") == [{"device": first["device"], "ignore_mismatch": False}]
    assert not logs and json.loads(cache.read_bytes()[len(fake_tensorrt.CACHE_MAGIC):])["entries"] == 2
    mod = fake(gpu="NVIDIA A100-SXM4-80GB", cc=(8, 0))
    _, logs = build(tmp_path, timing_cache=str(cache))
    assert [a["ignore_mismatch"] for a in args(mod, "IBuilderConfig.set_timing_cache")] == [False, False]
    assert "from another GPU / TensorRT version: starting a new one" in logs[0]
    assert "A100" in json.loads(cache.read_bytes()[len(fake_tensorrt.CACHE_MAGIC):])["device"]


# -- which plans run where ---------------------------------------------------------------------------
A100, T4 = {"gpu": "NVIDIA A100", "compute_capability": "8.0"}, {"gpu": "Tesla T4", "compute_capability": "7.5"}
VC, HC = {"version_compat": True}, {"hardware_compat": True}
# (id, manifest facts of the plan, facts of this machine, refusal pattern or None, does TensorRT load it)
CASES = [
    ("same-gpu-same-trt", {}, {}, None, True),
    ("other-gpu", A100, {}, r"built for compute_capability '8\.0'.*--hardware-compat", False),
    ("same-cc-other-model", {"gpu": "NVIDIA H100"}, {}, r"built for gpu 'NVIDIA H100'", True),  # TensorRT only warns
    ("ampere-plus-on-newer", {**A100, "flags": HC}, {}, None, True),
    ("ampere-plus-on-older-ampere", {"flags": HC}, A100, None, True),
    ("ampere-plus-on-turing", {"flags": HC}, T4, r"Ampere and newer GPUs .* Tesla T4 has compute capability 7\.5", False),
    ("older-trt", {"tensorrt": "10.8.0.43"}, {}, r"built for tensorrt '10\.8\.0\.43'.*--version-compat", False),
    ("vc-older-same-major", {"tensorrt": "10.8.0.43", "flags": VC}, {}, None, True),
    ("vc-newer-trt", {"tensorrt": "10.10.0.31", "flags": VC}, {}, r"newer than the '10\.9\.0\.34' here.*upgrade", False),
    ("vc-10-on-11", {"tensorrt": "10.16.1.11", "flags": VC}, {"tensorrt": "11.1.0.106"}, None, True),
    ("10-on-11", {"tensorrt": "10.16.1.11"}, {"tensorrt": "11.1.0.106"}, r"only plans built with --version-compat", False),
    ("vc-8-on-11", {"tensorrt": "8.6.1.6", "flags": VC}, {"tensorrt": "11.1.0.106"}, r"cannot run TensorRT 8 plans", False),
    ("vc-11-on-10", {"tensorrt": "11.0.0.114", "flags": VC}, {}, r"newer than", False),
    ("vc-and-hc", {**A100, "tensorrt": "10.8.0.43", "flags": {**VC, **HC}}, {}, None, True),
]


@pytest.mark.parametrize("built, here, refused", [c[1:4] for c in CASES], ids=[c[0] for c in CASES])
def test_check_plan_matches(built, here, refused):
    built, here = {**H200, "flags": {}, **built}, {**H200, **here}
    if refused is None:
        trt_backend.check_plan_matches(built, REBUILD, here=here)
        return
    with pytest.raises(UserError, match=refused) as e:
        trt_backend.check_plan_matches(built, REBUILD, here=here)
    assert "\n" not in str(e.value) and f"rebuild it here: {REBUILD}" in str(e.value)


@pytest.mark.parametrize("built, here, refused, loads", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_fake_agrees_with_the_check(built, here, refused, loads):
    """The check never accepts a plan that TensorRT's rules (the fake's deserializer) refuse; it is
    stricter only for another GPU model of the same compute capability, where TensorRT just warns."""
    built, here = {**H200, "flags": {}, **built}, {**H200, **here}
    flags = built["flags"]
    plan = {"version": built["tensorrt"], "gpu": built["gpu"], "cc": [int(p) for p in built["compute_capability"].split(".")],
            "flags": ["VERSION_COMPATIBLE"] if flags.get("version_compat") else [],
            "hardware": "AMPERE_PLUS" if flags.get("hardware_compat") else "NONE", "inputs": [], "outputs": []}
    mod = fake_tensorrt.make(here["tensorrt"], here["gpu"], tuple(int(p) for p in here["compute_capability"].split(".")))
    runtime = mod.Runtime(mod.Logger())
    runtime.engine_host_code_allowed = bool(flags.get("version_compat"))  # as TrtBackend does
    engine = runtime.deserialize_cuda_engine(fake_tensorrt.PLAN_MAGIC + json.dumps(plan).encode())
    assert (engine is not None) == loads
    assert refused is not None or loads


def test_check_reads_this_machine(monkeypatch, fake):
    fake("10.9.0.34")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="need a CUDA GPU"):
        trt_backend.check_plan_matches({**H200, "flags": {}}, REBUILD)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"name": "NVIDIA H200", "major": 9, "minor": 0}))
    assert trt_backend.running_facts() == H200
    trt_backend.check_plan_matches({**H200, "flags": {}}, REBUILD)


# -- running a plan ----------------------------------------------------------------------------------
class CpuTrtBackend(trt_backend.TrtBackend):
    """The production backend with only its three CUDA touch points replaced (device check, running
    GPU facts, stream), so its real code runs on CPU tensors against the fake. TrtBackend itself still
    refuses any device but CUDA (test_activation_refusals)."""
    ALIGN = 64  # torch's CPU allocator aligns to 64 bytes (its CUDA allocator to 512)
    STREAM = 0x5EED

    def _require_cuda(self):
        pass

    def _running_facts(self):
        f = sys.modules["tensorrt"].fake
        return {"gpu": f.gpu, "compute_capability": f"{f.cc[0]}.{f.cc[1]}", "tensorrt": f.version}

    def _stream_handle(self):
        return self.STREAM


@pytest.fixture
def runnable(fake, tmp_path):
    """(fake module, a CPU backend on a plan the fake built from SPEC)."""
    def make(spec=SPEC, **build_kw):
        mod = fake()
        mod.fake.align = CpuTrtBackend.ALIGN
        built, _ = build(tmp_path, **build_kw)
        mod.fake.calls.clear()
        return mod, CpuTrtBackend(spec, "cpu", str(tmp_path / "llm.plan"), built, REBUILD)
    return make


def test_runtime_sequence_zero_size_past_and_outputs_from_context(runnable):
    mod, backend = runnable()
    dec = backend.decoder(layers=2, kv_heads=2, head_dim=4)
    loaded = names(mod.fake)
    assert loaded[:4] == ["Runtime.__init__", "Runtime.deserialize_cuda_engine", "ICudaEngine.create_execution_context",
                          "ICudaEngine.num_io_tensors"]
    assert "Runtime.engine_host_code_allowed" not in loaded  # only version-compatible plans may run host code
    mod.fake.calls.clear()
    ids = torch.arange(10)[1:4].view(1, 3)  # a view 8 bytes into its storage: not aligned for TensorRT
    logits = dec.prefill(ids)
    calls = mod.fake.calls
    order = [c for c, _ in calls]
    assert order[-1] == "IExecutionContext.execute_async_v3" and calls[-1][1] == {"stream_handle": CpuTrtBackend.STREAM}
    shapes = {a["name"]: a["shape"] for c, a in calls if c == "IExecutionContext.set_input_shape"}
    assert all(a["ok"] for c, a in calls if c in ("IExecutionContext.set_input_shape", "IExecutionContext.set_tensor_address"))
    assert shapes == {"input_ids": (1, 3), "attention_mask": (1, 3), "past_keys": (2, 1, 2, 0, 4), "past_values": (2, 1, 2, 0, 4)}
    # every input shape is set before shapes are inferred and the outputs' shapes asked for
    last_input = max(i for i, c in enumerate(order) if c == "IExecutionContext.set_input_shape")
    assert last_input < order.index("IExecutionContext.infer_shapes") < order.index("IExecutionContext.get_tensor_shape")
    addr = {a["name"]: a["address"] for c, a in calls if c == "IExecutionContext.set_tensor_address"}
    assert set(addr) == {t.name for t in (*SPEC.inputs, *SPEC.outputs)}
    assert all(a and a % CpuTrtBackend.ALIGN == 0 for a in addr.values()) and len(set(addr.values())) == len(addr)
    assert addr["input_ids"] != ids.data_ptr()  # the misaligned view was copied
    # the empty past (P = 0) is bound to a small buffer of its own, not to null
    assert addr["past_keys"] == backend._empty["past_keys"].data_ptr() != backend._empty["past_values"].data_ptr()
    out_shapes = {a["name"]: a["shape"] for c, a in calls if c == "IExecutionContext.get_tensor_shape"}
    assert out_shapes == {"logits": (1, 10), "present_keys": (2, 1, 2, 3, 4), "present_values": (2, 1, 2, 3, 4)}
    assert tuple(logits.shape) == (1, 10) and logits.data_ptr() == addr["logits"]
    assert dec.keys.data_ptr() == addr["present_keys"] and bool((dec.keys.view(torch.uint8) == mod.fake.fill).all())
    mod.fake.calls.clear()
    dec.step(torch.tensor([[7]]))  # a decode step: the grown cache goes back in as the past
    addr = {a["name"]: a["address"] for c, a in mod.fake.calls if c == "IExecutionContext.set_tensor_address"}
    assert args(mod, "IExecutionContext.get_tensor_shape")[1] == {"name": "present_keys", "shape": (2, 1, 2, 4, 4)}
    assert addr["past_keys"] not in (0, backend._empty["past_keys"].data_ptr())


def test_output_shapes_come_from_the_context(runnable):
    mod, backend = runnable()
    mod.fake.shape_override = {"logits": (1, 11)}  # the plan computes another shape than the spec
    with pytest.raises(UserError, match=r"plan computes logits of graph llm as \(1, 11\), but the spec says \(1, 10\)"):
        backend.infer(SPEC.sample_feed("min"))
    assert "IExecutionContext.execute_async_v3" not in names(mod.fake)


def test_refusals_while_running_are_user_errors(runnable):
    mod, backend = runnable()
    feed = SPEC.sample_feed({"B": 1, "S": 9, "P": 0})  # S beyond the profile; the spec check is skipped
    with pytest.raises(UserError, match=r"refused shape \(1, 9\) for input input_ids of graph llm: the plan's profile "
                                        r"allows \(1, 1\) to \(2, 8\)\. Fix: keep requests within the profile, or rebuild"):
        backend.infer(feed, check=False)
    mod.fake.refuse_address = {"past_values"}
    with pytest.raises(UserError, match=r"refused the address of tensor past_values of graph llm\. Fix: rebuild the plan"):
        backend.infer(SPEC.sample_feed("opt"))
    mod.fake.refuse_address, mod.fake.fail_execute = set(), True
    with pytest.raises(UserError, match=r"TensorRT failed to run llm.*Fix: validate or rebuild it: python -m export"):
        backend.infer(SPEC.sample_feed("opt"))
    mod.fake.fail_execute = False
    assert set(backend.infer(SPEC.sample_feed("max"))) == {"logits", "present_keys", "present_values"}


def test_version_compatible_plan_allows_host_code_before_deserializing(runnable, tmp_path):
    mod, backend = runnable(version_compat=True)
    backend.activate()
    order = names(mod.fake)
    assert args(mod, "Runtime.engine_host_code_allowed") == [{"value": True}]
    assert order.index("Runtime.engine_host_code_allowed") < order.index("Runtime.deserialize_cuda_engine")
    runtime = mod.Runtime(mod.Logger())  # and the fake refuses it without: as TensorRT does
    assert runtime.deserialize_cuda_engine((tmp_path / "llm.plan").read_bytes()) is None
    assert "set engine_host_code_allowed" in mod.fake.errors[-1]


def test_runtime_lives_as_long_as_the_engine_and_deactivate_frees_all(runnable, tmp_path):
    mod, backend = runnable()
    backend.activate()
    gc.collect()
    backend.infer(SPEC.sample_feed("opt"))  # the engine's runtime is still alive: the backend holds it
    refs = [weakref.ref(o) for o in (backend.context, backend.engine, backend.runtime)]
    mod.fake.calls.clear()
    backend.deactivate()
    gc.collect()
    assert [r() for r in refs] == [None, None, None] and not backend.active and not backend._empty
    assert names(mod.fake) == ["IExecutionContext.__del__", "ICudaEngine.__del__", "Runtime.__del__"]
    backend.infer(SPEC.sample_feed("opt"))  # activates again
    assert names(mod.fake).count("Runtime.__init__") == 1
    orphan = mod.Runtime(mod.Logger()).deserialize_cuda_engine((tmp_path / "llm.plan").read_bytes())
    with pytest.raises(RuntimeError, match="after the Runtime"):  # what keeping the runtime prevents
        orphan.create_execution_context()


def test_activation_refusals(runnable, tmp_path):
    mod, backend = runnable()
    with pytest.raises(UserError, match="TensorRT runs on CUDA only"):  # the production class on CPU
        trt_backend.TrtBackend(SPEC, "cpu", backend.path, backend.built, REBUILD).activate()
    with pytest.raises(UserError, match=r"built for compute_capability '8\.0'.*rebuild it here"):
        CpuTrtBackend(SPEC, "cpu", backend.path, {**backend.built, "compute_capability": "8.0"}, REBUILD).activate()
    assert "Runtime.__init__" not in names(mod.fake)  # refused before TensorRT was touched
    (tmp_path / "junk.plan").write_bytes(b"junk")
    with pytest.raises(UserError, match=r"could not deserialize .*junk\.plan.*Fix: rebuild it: python -m export"):
        CpuTrtBackend(SPEC, "cpu", str(tmp_path / "junk.plan"), backend.built, REBUILD).activate()
    half = GraphSpec("llm", "llm", SPEC.inputs, (TensorSpec("logits", "float16", ("B", 10)),) + SPEC.outputs[1:], SPEC.dims)
    with pytest.raises(UserError, match="has logits as FLOAT, but graph llm has float16"):
        CpuTrtBackend(half, "cpu", backend.path, backend.built, REBUILD).activate()
    renamed = GraphSpec("llm", "llm", SPEC.inputs, (TensorSpec("scores", "float32", ("B", 10)),) + SPEC.outputs[1:], SPEC.dims)
    with pytest.raises(UserError, match=r"has I/O tensors .* but graph llm has"):
        CpuTrtBackend(renamed, "cpu", backend.path, backend.built, REBUILD).activate()
