"""TensorRT: a deserialized plan run with device-memory I/O.

Before anything touches the GPU, the plan's manifest entry is checked against the running GPU
(name and compute capability) and TensorRT version: a plan built elsewhere is refused with the
rebuild command, instead of failing inside the CUDA runtime. Inputs are torch tensors bound with
`set_tensor_address`, shapes set with `set_input_shape`, outputs preallocated from the spec, and the
engine is enqueued on torch's current stream with `execute_async_v3`.
"""

from __future__ import annotations

import torch

from models.errors import UserError
from models.spec import DTYPES, GraphSpec
from runtime.backends.base import Backend


def check_plan_matches(built: dict, rebuild: str) -> None:
    """UserError unless the plan was built with this GPU and this TensorRT version."""
    import tensorrt as trt

    if not torch.cuda.is_available():
        raise UserError("TensorRT plans need a CUDA GPU, and none is visible.", "run on a GPU machine or use --backend ort")
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    here = {"gpu": p.name, "compute_capability": f"{p.major}.{p.minor}", "tensorrt": trt.__version__}
    compat = built.get("flags", {})
    for key in ("compute_capability", "gpu", "tensorrt"):
        if key == "gpu" and compat.get("hardware_compat"):
            continue
        if key == "tensorrt" and compat.get("version_compat") and str(built.get(key, "")).split(".")[0] == here[key].split(".")[0]:
            continue
        if str(built.get(key)) != here[key]:
            raise UserError(f"this plan was built for {key} {built.get(key)!r}, but this machine has {here[key]!r}.",
                            f"rebuild it here: {rebuild}")


class TrtBackend(Backend):
    kind = "trt"

    def __init__(self, spec: GraphSpec, device, path: str, built: dict, rebuild: str):
        super().__init__(spec, device)
        self.path = path
        self.built = built
        self.rebuild = rebuild
        self.engine = None
        self.context = None

    def _activate(self) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise UserError("stage asks for TensorRT, but the tensorrt package is not installed.",
                            "run ./setup_tensorrt.sh, or choose --backend ort for this stage") from None
        if self.device.type != "cuda":
            raise UserError("TensorRT runs on CUDA only.", "use --device cuda, or --backend ort / torch for this stage")
        check_plan_matches(self.built, self.rebuild)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        with open(self.path, "rb") as f:
            self.engine = runtime.deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise UserError(f"TensorRT could not deserialize {self.path}.", f"rebuild it: {self.rebuild}")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        missing = [t.name for t in (*self.spec.inputs, *self.spec.outputs) if t.name not in names]
        if missing:
            raise UserError(f"{self.path} lacks tensors {missing} of graph {self.spec.name}.", f"rebuild it: {self.rebuild}")

    def _infer(self, feed):
        sizes = {}
        keep = []
        for t in self.spec.inputs:
            x = feed[t.name].to(self.device, DTYPES[t.dtype]).contiguous()
            keep.append(x)
            for s, n in zip(t.shape, x.shape):
                if isinstance(s, str) and s.isidentifier():
                    sizes[s] = int(n)
            self.context.set_input_shape(t.name, tuple(x.shape))
            self.context.set_tensor_address(t.name, x.data_ptr())
        outs = {}
        for t, shape in zip(self.spec.outputs, self.spec.output_shapes(sizes).values()):
            y = torch.empty(shape, dtype=DTYPES[t.dtype], device=self.device)
            outs[t.name] = y
            self.context.set_tensor_address(t.name, y.data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise UserError(f"TensorRT failed to run {self.spec.name}.", f"validate or rebuild it: {self.rebuild}")
        return outs

    def metadata(self):
        return {**super().metadata(), "file": self.path, **{k: v for k, v in self.built.items() if k != "flags"}}
