"""AOTInductor packages: a graph compiled ahead of time into a `.pt2` that loads without our Python.

`torch.export` captures the graph with the spec's dynamic dims (as for ONNX), AOTInductor compiles it
to kernels plus a C++ wrapper and packages them with the weights; `torch._inductor.aoti_load_package`
runs it in any process that has torch, without the model's source code.
"""

from __future__ import annotations

import os
import time
import warnings

import torch

from models.errors import UserError
from models.family import TTSModel
from models.spec import dtype_name


def build_aoti(model: TTSModel, graph: str, path: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    from export.onnx_export import example_feed, torch_dynamic_shapes

    from runtime.backends.base import cast_input, cast_module

    spec = model.graph_specs()[graph]
    module = model.graph_module(graph)
    if dtype != torch.float32:  # the model object keeps its fp32 weights
        import copy

        module = copy.deepcopy(module)
    # the same precision rule as the torch and compile backends (the spec's fp32 islands stay fp32)
    module = cast_module(module, spec, torch.device(device), dtype).eval()
    feed = example_feed(spec)
    args = tuple(cast_input(spec, t.name, feed[t.name], torch.device(device), dtype) for t in spec.inputs)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.export.export(module, args, dynamic_shapes=torch_dynamic_shapes(spec), strict=False)
            if os.path.exists(path):
                os.remove(path)
            torch._inductor.aoti_compile_and_package(program, package_path=path)
    except Exception as e:  # torch.export / inductor raise many types; the first line is what helps
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"AOTInductor could not compile graph {graph}: {first[:300]}",
                        "use the compile backend (torch.compile) for this graph instead") from e
    return {"torch": torch.__version__, "device": device, "dtype": dtype_name(dtype),
            "build_seconds": round(time.perf_counter() - t0, 1)}
