"""FP16 and INT8 artifacts: precision lives in the ONNX file.

TensorRT 11 dropped weak typing (no FP16/INT8 builder flags, no calibrators): every network is
strongly typed, so the ONNX must already say which tensors are FP16 and where INT8 Q/DQ pairs sit.
We make those files with well-kept tools and choose how much to convert by measurement:

- FP16: ONNX Runtime's float16 converter (`onnxruntime.transformers.float16`), graph I/O kept FP32.
  Candidates go from "everything FP16" to more FP32 islands (normalisations and reductions, then
  special functions and the modules the graph's spec declares (its fp32 islands and sensitive
  modules: f0 predictor, NSF source, (i)STFT, time embedding, ...)) until validation at the spec's min / opt / max passes the FP16 tolerance. The chosen
  level and the nodes that stay FP32 are recorded in the manifest.
- INT8: ONNX Runtime static quantisation to explicit, symmetric Q/DQ (what TensorRT consumes),
  per-channel weights, MinMax calibration on captured pipeline inputs (export/calibration.py).
  Candidates: MatMul/Gemm + convolutions, then MatMul/Gemm only (the LLM body and the estimator's
  matmuls carry the FLOPs); a graph where neither passes keeps FP32 weights and says so.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
from dataclasses import dataclass, field

import numpy as np
import onnx

from models.errors import UserError
from models.spec import GraphSpec

EXTERNAL_DATA_BYTES = 1 << 30

NORM_OPS = ["LayerNormalization", "SimplifiedLayerNormalization", "ReduceMean", "ReduceSum", "ReduceSumSquare",
            "ReduceL2", "Pow", "Sqrt", "Reciprocal", "Softmax", "CumSum"]
SPECIAL_OPS = ["Exp", "Log", "Sin", "Cos", "Erf", "Tanh", "Mod", "Floor", "Round", "Div"]
HEAVY_OPS = ["MatMul", "Gemm", "Conv", "ConvTranspose"]


@dataclass
class FP16Level:
    name: str
    block_ops: list = field(default_factory=list)
    spec_scopes: bool = False  # keep the graph's declared fp32 islands and sensitive modules in FP32
    only_heavy: bool = False  # keep everything but HEAVY_OPS in FP32
    all_fp32: bool = False


FP16_LEVELS = [
    FP16Level("all-fp16"),
    FP16Level("fp32-norms", NORM_OPS),
    FP16Level("fp32-norms-special", NORM_OPS + SPECIAL_OPS, spec_scopes=True),
    FP16Level("fp16-matmul-conv-only", NORM_OPS + SPECIAL_OPS, spec_scopes=True, only_heavy=True),
    FP16Level("all-fp32", all_fp32=True),
]

INT8_LEVELS = [("matmul+conv", ["MatMul", "Gemm", "Conv", "ConvTranspose"]), ("matmul", ["MatMul", "Gemm"]),
               ("none", [])]


def _scopes(node) -> list[str]:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                return [s for s in ast.literal_eval(p.value) if isinstance(s, str)]
            except (ValueError, SyntaxError):
                return []
    return []


def fp32_nodes(model: onnx.ModelProto, level: FP16Level, spec: GraphSpec) -> list[str]:
    """Names of the nodes that level keeps in FP32 (module scopes from the graph's spec: its fp32
    islands and sensitive modules, matched against the exporter's name scopes)."""
    scopes = set(spec.fp32_scopes) | set(spec.sensitive_scopes) if level.spec_scopes else set()
    names = []
    for n in model.graph.node:
        scoped = any(part.split(".")[0] in scopes or part in scopes for part in _scopes(n))
        if level.all_fp32 or n.op_type in level.block_ops or scoped or (level.only_heavy and n.op_type not in HEAVY_OPS):
            names.append(n.name)
    return names


def _save(model: onnx.ModelProto, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    for p in (path, path + ".data"):
        if os.path.exists(p):
            os.remove(p)
    large = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    if large:
        onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=os.path.basename(path) + ".data", size_threshold=1024)
    else:
        onnx.save(model, path)


def _dedupe_casts(model: onnx.ModelProto) -> None:
    """Repair two defects of ORT's float16 converter when one tensor feeds several FP32 islands: it
    inserts the same Cast twice (same input, same output name) and names nodes alike. The second
    identical Cast is dropped (its output already exists); other duplicate node names get a suffix."""
    produced: dict[str, onnx.NodeProto] = {}
    keep, names = [], {}
    for n in model.graph.node:
        dup = [o for o in n.output if o in produced]
        if dup:
            first = produced[dup[0]]
            if n.op_type == first.op_type == "Cast" and list(n.input) == list(first.input) and n.attribute == first.attribute:
                continue
            raise ValueError(f"float16 conversion produced two different definitions of {dup[0]}")
        for o in n.output:
            produced[o] = n
        if n.name in names:
            names[n.name] += 1
            n.name = f"{n.name}__{names[n.name]}"
        else:
            names[n.name] = 0
        keep.append(n)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def to_fp16(src: str, dst: str, level: FP16Level) -> dict:
    """Write an FP16 variant of `src` keeping `level`'s nodes in FP32; returns what was kept."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(src)
    meta = {p.key: p.value for p in model.metadata_props}
    keep = fp32_nodes(model, level, GraphSpec.from_json(meta["tts.spec"]))
    if level.all_fp32:
        converted = model
    else:
        converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST),
                                             node_block_list=keep, disable_shape_infer=False)
        _dedupe_casts(converted)
    del converted.metadata_props[:]
    for k, v in {**meta, "tts.precision": "fp16", "tts.fp16_level": level.name}.items():
        converted.metadata_props.add(key=k, value=v)
    _save(converted, dst)
    ops = {}
    for n in model.graph.node:
        if n.name in keep:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
    total_compute = sum(1 for n in model.graph.node if n.op_type in HEAVY_OPS)
    fp16_compute = sum(1 for n in model.graph.node if n.op_type in HEAVY_OPS and n.name not in keep)
    return {"level": level.name, "fp32_nodes": len(keep), "nodes": len(model.graph.node), "fp32_ops": ops,
            "matmul_conv_in_fp16": f"{fp16_compute}/{total_compute}", "fp32_node_names": keep}


class FeedReader:
    """onnxruntime.quantization CalibrationDataReader over captured feeds."""

    def __init__(self, feeds: list[dict], input_names: list[str]):
        self._it = iter([{k: np.ascontiguousarray(f[k].numpy()) for k in input_names} for f in feeds])

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - not used by quantize_static
        pass


def to_int8(src: str, dst: str, feeds: list[dict], op_types: list[str]) -> dict:
    """Write a Q/DQ INT8 variant of `src` (symmetric, per-channel weights) quantising `op_types`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(src, load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    inputs = [i.name for i in model.graph.input]
    if not op_types:
        shutil.copy(src, dst)
        if os.path.exists(src + ".data"):
            shutil.copy(src + ".data", dst + ".data")
        quantized = 0
    else:
        if not feeds:
            raise UserError(f"no calibration data for {os.path.basename(src)}.", "run the build again (it captures them)")
        os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
        tmp = dst + ".tmp.onnx"
        logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer advises pre-processing on every call
        quantize_static(src, tmp, FeedReader(feeds, inputs), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=op_types, calibrate_method=CalibrationMethod.MinMax,
                        use_external_data_format=os.path.exists(src + ".data"),
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
        q = onnx.load(tmp)
        for p in (tmp, tmp + ".data"):
            if os.path.exists(p):
                os.remove(p)
        quantized = sum(1 for n in q.graph.node if n.op_type == "DequantizeLinear")
        del q.metadata_props[:]
        for k, v in meta.items():
            q.metadata_props.add(key=k, value=v)
        _save(q, dst)
    m = onnx.load(dst, load_external_data=False)
    del m.metadata_props[:]
    for k, v in {**meta, "tts.precision": "int8", "tts.int8_ops": ",".join(op_types) or "none"}.items():
        m.metadata_props.add(key=k, value=v)
    onnx.save(m, dst)
    return {"ops": op_types, "dequantize_nodes": quantized, "calibration_samples": len(feeds)}


def write_sidecar(path: str, facts: dict) -> None:
    with open(path, "w") as f:
        json.dump(facts, f, indent=1)
