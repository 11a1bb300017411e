"""TensorRT plans from our ONNX artifacts (TensorRT 10 and 11 Python API).

Thin on purpose: precision comes from the ONNX (FP16 tensors, INT8 Q/DQ), so the network is always
strongly typed (TensorRT 11 has nothing else; on TensorRT 10 we set STRONGLY_TYPED) and no precision
flags or calibrators are used. Optimisation profiles come from the graph spec (min / opt / max).
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


def build_plan(onnx_file: str, plan_file: str, spec: GraphSpec, workspace_gb: float = 8.0, opt_level: int = 3,
               timing_cache: str | None = None, hardware_compat: bool = False, version_compat: bool = False,
               log=print) -> dict:
    """Parse `onnx_file`, build a serialized engine with the spec's profile, write `plan_file`."""
    trt = import_tensorrt()
    if trt is None:
        raise UserError("TensorRT is not installed, so no plan can be built.", INSTALL_FIX)
    major = int(trt.__version__.split(".")[0])
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if major < 11 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_file):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_file}: {errors[:300]}", "check the ONNX with python -m export validate")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.builder_optimization_level = opt_level
    if hardware_compat:
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    if version_compat:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    cache = None
    if timing_cache:
        blob = open(timing_cache, "rb").read() if os.path.isfile(timing_cache) else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in spec.profile().items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
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
    return {"tensorrt": trt.__version__, **gpu_facts(), "build_seconds": round(time.perf_counter() - t0, 1),
            "flags": {"strongly_typed": True, "workspace_gb": workspace_gb, "opt_level": opt_level,
                      "hardware_compat": hardware_compat, "version_compat": version_compat,
                      "timing_cache": timing_cache or ""}}
