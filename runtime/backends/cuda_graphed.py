"""`--backend cudagraph`: our eager PyTorch modules, each shape bucket recorded once as a CUDA graph.

What makes small-batch token2wav slow is launch overhead, not arithmetic: one eager DiT solve is
thousands of small kernels, each waiting on Python. Replaying a captured CUDA graph removes that
overhead without torch.compile, so a new (batch, length) bucket costs one eager call and a capture
(a fraction of a second) instead of a compile (seconds to minutes): the choice for a server that must
warm up tens of shape buckets per graph quickly. `compile` still fuses kernels (faster per call, much
slower to warm up); measure both (`python -m runtime.loadtest`, docs/serving.md).

It is the compile backend with compilation switched off (runtime/backends/compiled.py says how
shapes are bucketed, captured, evicted and cast), so precision islands, padding rules and the
static-cache LLM decoder are the same code. Off CUDA there is nothing to capture: it runs eagerly.
"""

from __future__ import annotations

from models.spec import PRECISION_DTYPES
from runtime.backends.base import BackendKind
from runtime.backends.compiled import CompiledBackend


class CudaGraphBackend(CompiledBackend):
    kind = "cudagraph"

    def __init__(self, spec, device, module_factory, dtype, **kwargs):
        # one eager call before the capture is enough: there is nothing to compile, it only lets
        # cuBLAS / cuDNN pick their algorithms and the caching allocator settle outside the graph
        kwargs.setdefault("warmup", 1)
        super().__init__(spec, device, module_factory, dtype, compile_backend=None, **kwargs)


KIND = BackendKind(
    "cudagraph", ("fp32", "fp16", "bf16"),
    make=lambda model, spec, device, precision: CudaGraphBackend(
        spec, device, lambda: model.graph_module(spec.name), PRECISION_DTYPES[precision], copy_module=precision != "fp32"),
    doc="eager modules replayed as one CUDA graph per shape bucket (no compile: fast warm-up)",
    concurrent=False,
    serial_reason="the cudagraph backend keeps captured buffers per shape, so concurrent requests would overwrite "
                  "each other")
