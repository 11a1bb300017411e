"""ONNX Runtime: CPU execution provider, or CUDA with IOBinding on torch's device tensors.

On CUDA nothing crosses to the host: inputs are bound by pointer, outputs are preallocated torch
tensors whose shapes the spec computes, and ORT runs on torch's current stream, so no copies and no
extra synchronisation between stages.

ONNX Runtime may run some nodes of a CUDA session on the CPU without saying so (it keeps shape
arithmetic there on purpose, and places any node the CUDA provider has no kernel for there too). The
session records where every node went (`session.record_ep_graph_assignment_info`): a matmul,
convolution, normalisation or attention node on the CPU is an error, the shape nodes it keeps there
are listed in `metadata()["cpu_nodes"]`.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from models.errors import UserError
from models.spec import DTYPES, GraphSpec
from runtime.artifacts import ORT_CUDA_OPTIONS_KEY, read_metadata
from runtime.backends.base import ArtifactBackend, BackendKind

# ORT's IOBinding names element types by numpy dtype
_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.int32: np.int32,
       torch.bool: np.bool_}
GPU_FIX = ("install onnxruntime-gpu in place of onnxruntime (pip uninstall onnxruntime; "
           "pip install onnxruntime-gpu), or run this stage with another backend, e.g. --backend {stage}=torch")


# nodes whose placement on the CPU in a CUDA session means the graph's work runs there (ORT itself
# moves only shape arithmetic to the CPU); the names cover ORT's fused forms of them too
COMPUTE_OPS = frozenset({
    "MatMul", "Gemm", "Conv", "ConvTranspose", "FusedMatMul", "FusedConv", "FusedGemm", "MatMulNBits",
    "MatMulInteger", "QLinearMatMul", "QLinearConv", "ConvInteger", "Attention", "MultiHeadAttention",
    "GroupQueryAttention", "LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization", "RMSNormalization", "Softmax", "Einsum", "GRU", "LSTM", "RNN", "STFT", "DFT"})
ASSIGNMENT_KEY = "session.record_ep_graph_assignment_info"


def placement(session) -> dict[str, list[tuple[str, str]]] | None:
    """Execution provider -> [(node name, op type)] of a session created with ASSIGNMENT_KEY set
    (None when this onnxruntime cannot say)."""
    if not hasattr(session, "get_provider_graph_assignment_info"):
        return None
    out: dict[str, list[tuple[str, str]]] = {}
    for sub in session.get_provider_graph_assignment_info():
        out.setdefault(sub.ep_name, []).extend((n.name, n.op_type) for n in sub.get_nodes())
    return out


def check_placement(where: dict[str, list[tuple[str, str]]] | None, graph: str, stage: str) -> dict:
    """UserError when compute nodes of a CUDA session run on the CPU; otherwise the facts to record
    (how many nodes, by op type, ORT keeps on the CPU, or that placement could not be read)."""
    if where is None:
        return {"cpu_nodes": "unknown (this onnxruntime cannot report node placement)"}
    cpu = where.get("CPUExecutionProvider", [])
    compute = [(n, op) for n, op in cpu if op in COMPUTE_OPS]
    if compute:
        ops = sorted({op for _, op in compute})
        raise UserError(f"ONNX Runtime runs {len(compute)} compute node(s) of {graph} on the CPU although CUDA was asked "
                        f"for ({', '.join(ops)}, e.g. {compute[0][0]}): the CUDA provider has no kernel for them here.",
                        f"run stage {stage} with another backend (e.g. --backend {stage}=trt or {stage}=compile), "
                        f"or use an fp32 artifact")
    ops: dict[str, int] = {}
    for _, op in cpu:
        ops[op] = ops.get(op, 0) + 1
    return {"cpu_nodes": len(cpu), "cpu_node_ops": ops}


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def cuda_provider_options(index: int, stream: int | None = None, **overrides) -> dict:
    """The CUDA execution provider's options every ORT session of the runtime uses (the HiFT probe,
    scripts/probe_ort_fp16.py, varies them one by one from here)."""
    # use_tf32 0: an fp32 artifact computes in fp32 (ORT's CUDA EP defaults to TF32 matmuls, which
    # moved fp32 LLM logits by 2.7e-4 of their scale on the H200, beyond the fp32 tolerance)
    # kSameAsRequested: the arena grows by what a call needs, not to the next power of two (a 9 GB
    # request would reserve 16 GB and run out of memory on an 80 GB card beside torch)
    # HEURISTIC: with DEFAULT (+ NC1D layout) ORT ran HiFT's fp32 convs in "fallback mode", 5-9x
    # slower on the H200 (docs/performance.md). The heuristic finds no cuDNN plan for some fp16
    # dilated 1-D convs ("HEURISTIC_QUERY_FAILED"): fp16 files with 1-D convs ask for the NC1D padding
    # in their metadata (ORT_CUDA_OPTIONS_KEY; export/precision.py says what was measured).
    opts = {"device_id": index, "cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "0",
            "arena_extend_strategy": "kSameAsRequested"}
    if stream is not None:
        opts["user_compute_stream"] = str(stream)
    opts.update({k: str(v) for k, v in overrides.items()})
    return opts


class OrtBackend(ArtifactBackend):
    kind = "ort"

    def __init__(self, spec: GraphSpec, device, path: str, built: dict | None = None, rebuild: str = "",
                 graph_spec: GraphSpec | None = None, threads: int = 0):
        super().__init__(spec, device, path, built or {}, rebuild or "python -m export onnx", graph_spec)
        self.threads = threads
        self.session = None
        self.meta: dict = {}
        self.placement: dict = {}

    def file_cuda_options(self) -> dict[str, str]:
        """The CUDA provider options the file asks for in its metadata (the conversion that made it
        records what its kernels need, e.g. export/precision.py: ort_cuda_options_of_fp16)."""
        text = self.meta.get(ORT_CUDA_OPTIONS_KEY)
        if not text:
            return {}
        try:
            opts = json.loads(text)
            if not isinstance(opts, dict):
                raise ValueError("not an object")
        except ValueError as e:
            raise UserError(f"{self.path} has unreadable {ORT_CUDA_OPTIONS_KEY} metadata ({e}).",
                            f"build it again: {self.rebuild}") from None
        return {str(k): str(v) for k, v in opts.items()}

    def providers(self) -> list:
        """Execution providers for this device; a missing CUDA provider is an error, never a fallback."""
        import onnxruntime as ort

        if self.device.type != "cuda":
            return ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" not in available_providers():
            raise UserError(f"stage {self.spec.stage} asks for ONNX Runtime on CUDA, but this onnxruntime has no "
                            f"CUDA execution provider.", GPU_FIX.format(stage=self.spec.stage))
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # use the CUDA / cuDNN libraries torch already loaded
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.meta = self.meta or read_metadata(self.path)  # after the check above: no CUDA provider is the error to name
        cuda = cuda_provider_options(index, torch.cuda.current_stream(index).cuda_stream, **self.file_cuda_options())
        return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]

    def _activate(self) -> None:
        import onnxruntime as ort

        self.meta = {}  # read again at every activation (providers() reads it first on CUDA)
        providers = self.providers()
        self.meta = self.meta or read_metadata(self.path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if self.threads:
            opts.intra_op_num_threads = self.threads
        if self.device.type == "cuda":
            opts.add_session_config_entry(ASSIGNMENT_KEY, "1")
        try:
            self.session = ort.InferenceSession(self.path, opts, providers=providers)
        except Exception as e:  # ORT raises its own exception types; the message is what helps
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"ONNX Runtime cannot load {self.path}: {first[:200]}", f"build it again: {self.rebuild}") from None
        # ORT's Python session retries a run whose CUDA kernel fails on the CPU provider, silently: a
        # failure must be one (an fp16 HiFT passed for "inf" in three builds that way, docs/performance.md)
        if hasattr(self.session, "disable_fallback"):
            self.session.disable_fallback()
        if self.device.type == "cuda":
            if self.session.get_providers()[0] != "CUDAExecutionProvider":
                raise UserError(f"ONNX Runtime did not put {self.spec.name} on CUDA.", GPU_FIX.format(stage=self.spec.stage))
            # providers[0] says CUDA is registered, not that the nodes run there: read where each went
            try:
                self.placement = check_placement(placement(self.session), self.spec.name, self.spec.stage)
            except UserError:
                self.session = None
                raise

    def _release(self) -> None:
        self.session = None

    def _infer(self, feed):
        if self.device.type != "cuda":
            outs = self.session.run(None, {t.name: _host(feed[t.name], t.dtype) for t in self.spec.inputs},
                                    self._run_options("cpu:0"))
            # on CUDA the spec's shapes are bound as outputs; here the file decides, so check them: a file
            # that returns less (half the audio) must not pass for one that returns all of it
            want = self.spec.output_shapes(self.spec.sizes_of(feed))
            for t, o in zip(self.spec.outputs, outs):
                if tuple(o.shape) != want[t.name]:
                    raise UserError(f"{self.path} computes {t.name} of graph {self.spec.name} as {tuple(o.shape)}, but "
                                    f"the spec says {want[t.name]}: file and spec disagree.", f"build it again: {self.rebuild}")
            return {t.name: torch.from_numpy(o) for t, o in zip(self.spec.outputs, outs)}
        sizes = self.spec.sizes_of(feed)
        io = self.session.io_binding()
        idx = self.device.index if self.device.index is not None else torch.cuda.current_device()
        keep = []
        for t in self.spec.inputs:
            x = feed[t.name].to(self.device, DTYPES[t.dtype]).contiguous()
            keep.append(x)
            io.bind_input(t.name, "cuda", idx, _NP[x.dtype], tuple(x.shape), x.data_ptr())
        outs = {}
        for t, shape in zip(self.spec.outputs, self.spec.output_shapes(sizes).values()):
            y = torch.empty(shape, dtype=DTYPES[t.dtype], device=self.device)
            outs[t.name] = y
            io.bind_output(t.name, "cuda", idx, _NP[y.dtype], tuple(y.shape), y.data_ptr())
        self.session.run_with_iobinding(io, self._run_options(f"gpu:{idx}"))
        return outs

    def _run_options(self, arena: str):
        """None, or (release_scratch) options that shrink ONNX Runtime's arena after the run."""
        if not self.release_scratch:
            return None
        import onnxruntime as ort

        opts = ort.RunOptions()
        opts.add_run_config_entry("memory.enable_memory_arena_shrinkage", arena)
        return opts

    def metadata(self):
        m = {**super().metadata(), "precision": self.meta.get("tts.precision", "?")}
        if self.device.type == "cuda" and self.file_cuda_options():
            m["ort_cuda_options"] = self.file_cuda_options()
        if self.session is not None:
            m["providers"] = self.session.get_providers()
        m.update(self.placement)
        return m


def _host(x: torch.Tensor, dtype: str) -> np.ndarray:
    return x.detach().to("cpu", DTYPES[dtype]).contiguous().numpy()


KIND = BackendKind("ort", ("fp32", "fp16", "int8"), make=OrtBackend, artifact="onnx",
                   doc="ONNX Runtime, CPU or CUDA with IOBinding")
