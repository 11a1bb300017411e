"""TensorRT plans from our ONNX artifacts (TensorRT 10 and 11 Python API).

Thin on purpose: precision comes from the ONNX (FP16 tensors, INT8 Q/DQ), so the network is always
strongly typed (TensorRT 11 has nothing else; on TensorRT 10 we set STRONGLY_TYPED, and EXPLICIT_BATCH
is deprecated there and gone in 11, so it is never passed) and no precision flags or calibrators are
used. Optimisation profiles come from the graph spec (min / opt / max).
"""

from __future__ import annotations

import os
import time

from models.errors import UserError
from models.spec import GraphSpec

INSTALL_FIX = "run ./setup_tensorrt.sh (installs the TensorRT wheel matching your torch's CUDA)"


def import_tensorrt():
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError:
        return None
    return trt


def gpu_facts() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {}
    i = torch.cuda.current_device()
    p = torch.cuda.get_device_properties(i)
    return {"gpu": p.name, "compute_capability": f"{p.major}.{p.minor}"}


def _strongly_typed_network(trt, builder, major: int):
    """(network, creation flags). TensorRT 11 networks are always strongly typed and its
    STRONGLY_TYPED flag is deprecated and ignored; TensorRT 10 needs the flag, and we read it back
    rather than trust it. Older TensorRT cannot build a strongly typed network: refused."""
    if major >= 11:
        return builder.create_network(0), 0
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if major < 10 or flag is None:
        raise UserError(f"TensorRT {trt.__version__} cannot build strongly typed networks (our FP16 / INT8 ONNX need them).",
                        f"install TensorRT 10 or newer: {INSTALL_FIX}")
    flags = 1 << int(flag)
    network = builder.create_network(flags)
    if network is None or not network.get_flag(flag):
        raise UserError(f"TensorRT {trt.__version__} did not create a strongly typed network.",
                        f"reinstall TensorRT: {INSTALL_FIX}")
    return network, flags


def _timing_cache(trt, config, path: str | None, log):
    """Attach the timing cache at `path` (a new one when missing, unreadable, or from another GPU /
    TensorRT: set_timing_cache refuses a mismatched cache, and TensorRT warns a forced one may be wrong)."""
    if not path:
        return None
    blob = b""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            blob = f.read()
    cache = config.create_timing_cache(blob)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    log(f"timing cache {path} is unreadable or from another GPU / TensorRT version: starting a new one")
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise UserError("TensorRT could not create a timing cache.", "build without --timing-cache")
    return cache


def build_plan(onnx_file: str, plan_file: str, spec: GraphSpec, workspace_gb: float = 8.0, opt_level: int = 3,
               timing_cache: str | None = None, hardware_compat: bool = False, version_compat: bool = False,
               log=print) -> dict:
    """Parse `onnx_file`, build a serialized engine with the spec's profile, write `plan_file`."""
    trt = import_tensorrt()
    if trt is None:
        raise UserError("TensorRT is not installed, so no plan can be built.", INSTALL_FIX)
    from runtime.backends.tensorrt import AMPERE, shared_logger

    gpu = gpu_facts()
    if not gpu:
        raise UserError("TensorRT builds plans on a CUDA GPU, and none is visible.", "build on the GPU machine that will run them")
    cc = tuple(int(p) for p in gpu["compute_capability"].split("."))
    if hardware_compat and cc < AMPERE:
        raise UserError(f"hardware-compatible (Ampere and newer) plans must be built on an Ampere or newer GPU, "
                        f"not {gpu['gpu']} ({gpu['compute_capability']}).", "build without --hardware-compat")
    if not 0 <= opt_level <= 5:
        raise UserError(f"TensorRT optimization levels are 0 to 5, not {opt_level}.", "pass --opt-level 0..5")
    major = int(trt.__version__.split(".")[0])
    logger = shared_logger(trt)
    builder = trt.Builder(logger)
    network, network_flags = _strongly_typed_network(trt, builder, major)
    # parse_from_file (not parse(bytes)) so that external weights (.onnx.data) are found next to the file
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(onnx_file)
    if not ok or parser.num_errors:
        errors = "; ".join(str(parser.get_error(i)).replace("\n", " ") for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_file}: {errors[:300] or 'no details'}",
                        "check the ONNX with python -m export validate")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.builder_optimization_level = opt_level
    if hardware_compat:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if version_compat:
        # The lean runtime stays in the plan (no EXCLUDE_LEAN_RUNTIME): excluding it would mean shipping
        # that library and loading it with Runtime.load_runtime; keeping it means the runtime must
        # allow host code when deserializing (runtime/backends/tensorrt.py does).
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    cache = _timing_cache(trt, config, timing_cache, log)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in spec.profile().items():
        profile.set_shape(name, lo, opt, hi)
    if config.add_optimization_profile(profile) < 0:
        raise UserError(f"TensorRT rejected the optimisation profile of {spec.name} for {os.path.basename(onnx_file)}.",
                        "export the ONNX again: its inputs do not match the graph spec")
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT failed to build {os.path.basename(onnx_file)} (see the TensorRT log above).",
                        "try a lower --opt-level or a larger --workspace-gb")
    os.makedirs(os.path.dirname(os.path.abspath(plan_file)), exist_ok=True)
    with open(plan_file, "wb") as f:
        f.write(serialized)
    if cache is not None:
        with open(timing_cache, "wb") as f:
            f.write(memoryview(config.get_timing_cache().serialize()))
    return {"tensorrt": trt.__version__, **gpu, "build_seconds": round(time.perf_counter() - t0, 1),
            "flags": {"strongly_typed": True, "network_flags": network_flags, "workspace_gb": workspace_gb,
                      "opt_level": opt_level, "hardware_compat": hardware_compat, "version_compat": version_compat,
                      "timing_cache": timing_cache or ""}}
